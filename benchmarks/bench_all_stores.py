"""Every store side by side: the same 20-feature view in all seven adapters, one `featuredao bench` run.

Starts throwaway PostgreSQL, MariaDB, Redis and ClickHouse servers plus the project's local HBase and
TableStore servers, writes one config with the same logical view on each store (`config.json` in the
output folder), seeds the same synthetic rows everywhere with `featuredao bench seed`, then measures all
views in one `featuredao bench run --baseline` and writes results.json, report.md and charts.png.

    .venv/bin/python benchmarks/bench_all_stores.py [--rows 5000] [--requests 200] [--batch 100]
        [--out benchmarks/results/all_stores]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from featuredao.testing.hbase import HBaseThriftServer
from featuredao.testing.servers import ClickHouseServer, MariaDbServer, PostgresServer, RedisServer
from featuredao.testing.tablestore import DEFAULT_ACCESS_KEY_SECRET, TableStoreServer

FEATURES = {
    **{f"f{i}": "float" for i in range(10)}, **{f"n{i}": "int" for i in range(5)},
    "s0": "str", "s1": "str", "flag": "bool", "tags": "list[str]", "emb": "list[float]",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--batch", default="100")
    parser.add_argument("--concurrency", default="1")
    parser.add_argument("--out", default="benchmarks/results/all_stores")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("featuredao"))
    with ExitStack() as stack:
        pg = stack.enter_context(PostgresServer())
        maria = stack.enter_context(MariaDbServer())
        redis = stack.enter_context(RedisServer())
        ch = stack.enter_context(ClickHouseServer())
        hbase = HBaseThriftServer().start()
        stack.callback(hbase.stop)
        ots = TableStoreServer().start()
        stack.callback(ots.stop)
        env = {**os.environ, "PG_PASSWORD": pg.password, "MARIA_PASSWORD": maria.password,
               "CH_PASSWORD": ch.password, "OTS_SECRET": DEFAULT_ACCESS_KEY_SECRET}
        sources: dict[str, Any] = {
            "sqlite": {"type": "sqlite", "path": "bench.db"},
            "mysql": {"type": "mysql", "host": maria.host, "port": maria.port, "user": maria.user,
                      "password": "${MARIA_PASSWORD}", "database": maria.database},
            "hologres": {"type": "hologres", "host": pg.host, "port": pg.port, "user": pg.user,
                         "password": "${PG_PASSWORD}", "database": pg.dbname, "sslmode": "disable"},
            "clickhouse": {"type": "clickhouse", "host": ch.host, "port": ch.port, "user": ch.user,
                           "password": "${CH_PASSWORD}", "database": ch.database},
            "redis": {"type": "redis", "host": redis.host, "port": redis.port},
            "hbase": {"type": "hbase", "host": "127.0.0.1", "port": hbase.port},
            "tablestore": {"type": "tablestore", "endpoint": ots.endpoint, "instance_name": ots.instance_name,
                           "access_key_id": ots.access_key_id, "access_key_secret": "${OTS_SECRET}"},
        }
        options = {"redis": {"layout": "string", "encoding": "msgpack"}}
        views = [{"name": f"items_{store}", "entity": "item", "source": store, "table": "bench_items",
                  "key": "item_id", "key_type": "int", "features": FEATURES, "prefix": f"{store}_",
                  "timeout_ms": 5000, "options": options.get(store, {})} for store in sources]
        config = {"sources": sources, "views": views, "service": {"deadline_ms": 5000}}
        path = out / "config.json"
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        names = ",".join(v["name"] for v in views)
        subprocess.run([exe, "bench", "seed", str(path), "--view", names, "--rows", str(args.rows)],
                       check=True, env=env)
        subprocess.run([exe, "bench", "run", str(path), "--view", names, "--batch", args.batch,
                        "--concurrency", args.concurrency, "--requests", str(args.requests),
                        "--rows", str(args.rows), "--baseline", "--out", str(out / "results.json"),
                        "--report", str(out / "report.md"), "--plot", str(out / "charts.png")],
                       check=True, env=env)


if __name__ == "__main__":
    main()
