"""Start-up: ``import featuredao`` + ``FeatureService.from_config`` of a 10-view config, in fresh processes.

Each run is a new interpreter that times, from before its first featuredao import, the import and the
build of a service over 10 views (5 user, 5 item) on an embedded SQLite file; the figure is the median of
``--runs``. ``--importtime`` also prints the modules that cost the most, from ``python -X importtime``.

    .venv/bin/python benchmarks/bench_startup.py [--runs 15] [--importtime]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import time
started = time.perf_counter()
from featuredao import FeatureService
cfg = {"sources": {"db": {"type": "sqlite", "path": %(path)r}},
       "views": [{"name": f"v{i}", "entity": "item" if i %% 2 else "user", "source": "db", "table": f"t{i}",
                  "key": "id", "prefix": f"v{i}_", "features": {"a": "float", "b": "int", "c": "str"}}
                 for i in range(10)]}
service = FeatureService.from_config(cfg)
print(time.perf_counter() - started)
service.close()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--importtime", action="store_true", help="the costliest imports of one run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        code = CHILD % {"path": os.path.join(scratch, "startup.db")}
        times = sorted(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            check=True).stdout) for _ in range(args.runs))
        print(f"{args.runs} fresh processes, load average {os.getloadavg()[0]:.1f}: import + from_config "
              f"median {statistics.median(times) * 1000:.0f} ms (min {times[0] * 1000:.0f}, "
              f"max {times[-1] * 1000:.0f})")
        if args.importtime:
            err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True,
                                 text=True, check=True).stderr
            rows = [line.split("|") for line in err.splitlines() if line.startswith("import time:")]
            costly = sorted(((int(r[1]), r[2].rstrip()) for r in rows if r[1].strip().isdigit()),
                            reverse=True)
            print("costliest imports (cumulative microseconds):")
            for micros, name in costly[:15]:
                print(f"{micros:>9} {name}")


if __name__ == "__main__":
    main()
