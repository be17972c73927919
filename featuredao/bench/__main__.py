"""``python -m featuredao.bench``: the bench group on its own."""

from featuredao.bench.cli import main

if __name__ == "__main__":
    main()
