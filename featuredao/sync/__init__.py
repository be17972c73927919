"""Offline-to-online feature synchronization: full, incremental and change-data-capture jobs.

Jobs are declared in the config's ``sync`` list (validated by :mod:`featuredao.sync.config`) and run by
:class:`featuredao.sync.engine.SyncEngine` or ``featuredao sync run``. Functions named by ``compute``
transforms and custom conflict strategies are registered in code, never evaluated from text.
"""

from featuredao.sync import config as _config  # noqa: F401 - registers the ``sync`` section's validator
from featuredao.sync.functions import register_conflict, register_transform

__all__ = ["register_conflict", "register_transform"]
