"""``python -m featuredao``: the same command line as ``featuredao``."""

from featuredao.cli import main

main()
