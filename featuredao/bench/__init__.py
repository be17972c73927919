"""``featuredao bench``: seed views with synthetic rows and measure them side by side.

``featuredao.bench.cli.bench`` is the click group (registered under ``featuredao``); ``runner`` measures,
``stats`` holds the HdrHistogram-based statistics, ``report`` writes JSON, Markdown and PNG charts.
Importing this package loads only click: the runner, HdrHistogram and matplotlib load when used.
"""

from featuredao.bench.cli import bench

__all__ = ["bench"]
