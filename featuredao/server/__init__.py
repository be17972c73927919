"""``featuredao serve``: the feature server, an HTTP/JSON API over FeatureService for rankers in any language.

The supervisor (``supervisor``) runs N worker processes on one port and hot-reloads the config; each
worker (``worker``) serves the API (``app``) with its own FeatureService. ``featuredao.client`` is the
Python client. Needs the ``server`` extra (starlette, uvicorn, orjson, httpx, prometheus-client).
"""

from featuredao.server.settings import ServeSettings, usable_cores
from featuredao.server.supervisor import ServeError, serve

__all__ = ["ServeError", "ServeSettings", "serve", "usable_cores"]
