"""Finding the programs a server needs and installing missing Debian packages (``apt-get``, as root
only), with the table that says which programs prove a package is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from featuredao.testing.servers.errors import _LOG_TAIL_LINES, MissingPackageError

PG_BINDIR = Path("/usr/lib/postgresql/15/bin")
_PG_LIBDIR = Path("/usr/lib/postgresql/15/lib")

_EXTRA_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

_apt_lock = threading.Lock()
_apt_updated = False

# Debian package -> programs (names searched on PATH + sbin dirs, or absolute paths)
# whose presence means the package is installed.
_PACKAGE_PROGRAMS: dict[str, tuple[str, ...]] = {
    "postgresql": (str(PG_BINDIR / "postgres"), str(PG_BINDIR / "initdb"), str(PG_BINDIR / "psql")),
    "postgresql-15": (str(PG_BINDIR / "postgres"), str(PG_BINDIR / "initdb")),
    "postgresql-client-15": (str(PG_BINDIR / "psql"),),
    "postgresql-15-wal2json": (str(_PG_LIBDIR / "wal2json.so"),),
    "mariadb-server": ("mariadbd", "mariadb-install-db"),
    "mariadb-client": ("mariadb",),
    "redis-server": ("redis-server",),
    "redis-tools": ("redis-cli",),
    "clickhouse-server": ("clickhouse-server",),
    "clickhouse-client": ("clickhouse-client",),
}


def _which(program: str) -> str | None:
    if os.path.isabs(program):
        return program if os.path.exists(program) else None
    path = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH])
    return shutil.which(program, path=path)


def _require_program(program: str, package: str) -> str:
    found = _which(program)
    if found is None:
        raise MissingPackageError(f"program {program!r} not found; install Debian package {package!r}")
    return found


def _is_root() -> bool:
    return os.geteuid() == 0


def _package_installed(package: str) -> bool:
    programs = _PACKAGE_PROGRAMS.get(package)
    if programs is not None:
        return all(_which(p) is not None for p in programs)
    if _which("dpkg-query") is None:
        return False
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0 and result.stdout.strip().endswith("installed")


def _run_apt(args: Sequence[str]) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-_LOG_TAIL_LINES:])
        raise MissingPackageError(f"{' '.join(cmd)} failed with exit code {result.returncode}:\n{tail}")


def ensure_packages(*debian_packages: str) -> None:
    """Make sure the given Debian packages are installed.

    Packages that are already present are skipped cheaply.  Missing ones are
    installed with ``apt-get install -y --no-install-recommends`` (after one
    ``apt-get update`` per process) when running as root; otherwise a
    :class:`MissingPackageError` naming the packages is raised.
    """
    global _apt_updated
    missing = [p for p in debian_packages if not _package_installed(p)]
    if not missing:
        return
    names = " ".join(missing)
    if not _is_root():
        raise MissingPackageError(
            f"missing Debian package(s): {names}; not running as root, so install them yourself: "
            f"sudo apt-get install -y --no-install-recommends {names}"
        )
    if _which("apt-get") is None:
        raise MissingPackageError(f"missing package(s) {names} and apt-get is not available")
    with _apt_lock:
        missing = [p for p in missing if not _package_installed(p)]
        if not missing:
            return
        if not _apt_updated:
            _run_apt(["update"])
            _apt_updated = True
        _run_apt(["install", "-y", "--no-install-recommends", *missing])
    still_missing = [p for p in missing if not _package_installed(p)]
    if still_missing:
        raise MissingPackageError(f"apt-get installed {names} but {' '.join(still_missing)} still missing")
