"""``python -m featuredao.testing.tablestore``: run the local TableStore server until Ctrl-C or SIGTERM."""

import sys

from featuredao.testing.tablestore.server import main

if __name__ == "__main__":
    sys.exit(main())
