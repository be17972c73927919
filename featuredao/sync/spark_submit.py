"""The application file for ``spark-submit``: ``featuredao sync run CONFIG --job NAME --engine spark``.

spark-submit runs a Python file, not a console script; on a cluster::

    spark-submit --master yarn --files features.json \\
        "$(python -c 'import featuredao.sync.spark_submit as m; print(m.__file__)')" \\
        features.json --job items_full

The arguments are those of ``featuredao sync run`` (``--engine spark`` is implied); the SparkSession is
spark-submit's, so its ``--master`` and ``--conf`` apply.
"""

from __future__ import annotations

import sys

from featuredao.exits import run
from featuredao.sync.cli import sync


def main(argv: list[str] | None = None) -> None:
    """Run ``featuredao sync run ARGS --engine spark`` with featuredao's exit codes."""
    args = list(sys.argv[1:] if argv is None else argv)
    run(sync, ["run", *args, "--engine", "spark"], "featuredao sync")


if __name__ == "__main__":
    main()
