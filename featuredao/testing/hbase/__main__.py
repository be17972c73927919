"""``python -m featuredao.testing.hbase``: run the local HBase Thrift server until Ctrl-C."""

from featuredao.testing.hbase.server import main

if __name__ == "__main__":
    raise SystemExit(main())
