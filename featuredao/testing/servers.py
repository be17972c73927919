"""Throwaway real database servers for integration tests.

Every server runs in its own temporary directory, listens on a free port on
127.0.0.1 only and is torn down (process group killed, directory removed) by
:meth:`ServerProcess.stop`, by an ``atexit`` hook and - where possible - by the
kernel when the Python process that started it dies (``PR_SET_PDEATHSIG`` via
``setpriv``).

The module has no pytest dependency and no database-driver dependency: readiness
probes speak just enough of each wire protocol (PostgreSQL startup packet, MySQL
handshake, RESP, ClickHouse HTTP ``/ping``) to know the server accepts clients,
and one-time bootstrap SQL goes through the servers' own command line clients
(``psql``, ``mariadb``) or ClickHouse's HTTP interface.

Example::

    with PostgresServer() as pg:
        conn = psycopg.connect(pg.conninfo)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

from featuredao.testing._lifecycle import StartStop

__all__ = [
    "LOCALHOST",
    "PG_BINDIR",
    "ClickHouseServer",
    "MariaDbServer",
    "MissingPackageError",
    "PostgresServer",
    "RedisCluster",
    "RedisServer",
    "ServerError",
    "ServerProcess",
    "ServerStartError",
    "ensure_packages",
    "free_port",
]

LOCALHOST = "127.0.0.1"
PG_BINDIR = Path("/usr/lib/postgresql/15/bin")
_PG_LIBDIR = Path("/usr/lib/postgresql/15/lib")

_EXTRA_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
_LOG_TAIL_LINES = 40


class ServerError(RuntimeError):
    """Base class of errors raised by this module."""


class MissingPackageError(ServerError):
    """A Debian package the server needs is not installed and cannot be installed."""


class ServerStartError(ServerError):
    """A server failed to initialise, start or become ready."""


# --------------------------------------------------------------------------- ports


_port_lock = threading.Lock()
_issued_ports: set[int] = set()


def _port_range() -> tuple[int, int]:
    """Ports to hand out: below the kernel's ephemeral range, so that outgoing client
    sockets can never squat on a port a server wants to (re)bind."""
    low_ephemeral = 32768
    with contextlib.suppress(OSError, ValueError):
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low_ephemeral = int(text.split()[0])
    if low_ephemeral < 12000:  # unusual kernel config: fall back to the top of the port space
        return 61000, 65535
    return 10000, low_ephemeral


def _port_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def _pick_ports(offsets: Sequence[int]) -> int:
    """Pick a base port ``p`` such that every ``p + offset`` is currently bindable."""
    low, high = _port_range()
    high -= max(offsets)
    rng = random.SystemRandom()
    with _port_lock:
        for _ in range(2000):
            port = rng.randrange(low, high)
            candidates = [port + off for off in offsets]
            if any(c in _issued_ports for c in candidates):
                continue
            if all(_port_bindable(c) for c in candidates):
                _issued_ports.update(candidates)
                return port
    raise ServerError(f"could not find a free TCP port in [{low}, {high}) on {LOCALHOST}")


def free_port() -> int:
    """Return a TCP port that is currently free on 127.0.0.1.

    Ports come from below the ephemeral range and are never handed out twice by
    this process, so concurrently started servers do not collide.
    """
    return _pick_ports((0,))


# ----------------------------------------------------------------------- packages


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


# ------------------------------------------------------------------ small helpers


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by server")
        buf += chunk
    return bytes(buf)


def _run_checked(
    cmd: Sequence[str],
    what: str,
    *,
    input_text: str | None = None,
    timeout: float = 120.0,
    **kwargs: Any,
) -> str:
    try:
        result = subprocess.run(
            list(cmd),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )
    except subprocess.TimeoutExpired as exc:
        raise ServerStartError(f"{what} timed out after {timeout}s: {' '.join(cmd)}") from exc
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-_LOG_TAIL_LINES:])
        raise ServerStartError(f"{what} failed (exit code {result.returncode}): {' '.join(cmd)}\n{output}")
    return str(result.stdout)


def _system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError as exc:
        raise ServerStartError(f"system user {name!r} does not exist (needed to run as root)") from exc


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), uid, gid)


# ------------------------------------------------------------------ process registry

_live_lock = threading.Lock()
_live: dict[int, ServerProcess] = {}


def _register(server: ServerProcess) -> None:
    with _live_lock:
        _live[id(server)] = server


def _unregister(server: ServerProcess) -> None:
    with _live_lock:
        _live.pop(id(server), None)


_OWNER_FILE = ".featuredao-owner"
_DIR_PREFIX = "featuredao-"
_swept: set[str] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rpartition(")")[2].split()[0] in ("Z", "X"):  # zombie: dead, just not reaped
            return False
    return True


def _write_owner(base: Path, server_pid: int | None) -> None:
    (base / _OWNER_FILE).write_text(f"{os.getpid()}\n{server_pid or 0}\n")


def _sweep_stale_dirs(parent: str) -> None:
    """Remove temp dirs left behind by sessions that died without cleaning up
    (e.g. SIGKILLed), once their owner and server processes are both gone."""
    with _live_lock:
        if parent in _swept:
            return
        _swept.add(parent)
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            if not entry.name.startswith(_DIR_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                pids = [int(x) for x in Path(entry.path, _OWNER_FILE).read_text().split()]
            except (OSError, ValueError):
                continue
            if not any(pid > 0 and _pid_alive(pid) for pid in pids):
                shutil.rmtree(entry.path, ignore_errors=True)


@atexit.register
def _stop_all_servers() -> None:
    with _live_lock:
        servers = list(_live.values())
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


# ------------------------------------------------------------------------ base class


class ServerProcess(StartStop):
    """A server process living in its own temporary directory.

    Subclasses implement :meth:`_prepare` (one-time initialisation of the
    directory), :meth:`_command` (argv of the server), :meth:`_probe` (raise
    unless the server accepts clients) and optionally :meth:`_bootstrap`
    (one-time setup after the first successful start, e.g. creating users).

    The process runs in its own session/process group; :meth:`kill`,
    :meth:`freeze` and :meth:`thaw` signal the whole group.
    """

    name: ClassVar[str] = "server"
    packages: ClassVar[tuple[str, ...]] = ()
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    stop_timeout: ClassVar[float] = 15.0
    run_as: ClassVar[str | None] = None  # system user to drop to when running as root

    def __init__(
        self,
        *,
        port: int | None = None,
        startup_timeout: float = 60.0,
        tmp_parent: str | os.PathLike[str] | None = None,
    ) -> None:
        self._host = LOCALHOST
        self._auto_port = port is None
        self._port = port if port is not None else free_port()
        self.startup_timeout = startup_timeout
        self._tmp_parent = None if tmp_parent is None else os.fspath(tmp_parent)
        self._base: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._frozen = False
        self._bootstrapped = False

    # ---------------------------------------------------------------- properties
    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        """PID of the server process (the process-group leader), None when not running."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def base_dir(self) -> Path:
        """The server's temporary directory (exists between start() and stop())."""
        if self._base is None:
            raise ServerError(f"{self.name} server has not been started")
        return self._base

    @property
    def log_path(self) -> Path:
        """File receiving the server's stdout and stderr."""
        return self.base_dir / f"{self.name}.out"

    @property
    def log_files(self) -> list[Path]:
        """All log files worth showing when something goes wrong."""
        return [self.log_path]

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state} pid={self.pid}>"

    # ------------------------------------------------------------ subclass hooks
    def _prepare(self) -> None:
        """One-time initialisation of :attr:`base_dir` before the first launch."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> None:
        """Raise unless the server accepts client connections."""
        with socket.create_connection((self.host, self.port), timeout=1.0):
            pass

    def _bootstrap(self) -> None:
        """One-time setup (databases, users) after the first successful start."""

    def _repick_ports(self) -> bool:
        """Choose new auto-assigned port(s) after a bind conflict; False if ports were given."""
        if not self._auto_port:
            return False
        self._port = free_port()
        return True

    def _env(self) -> dict[str, str]:
        return {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "TZ": "UTC"}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Initialise (first time only), launch and wait until ready. Idempotent."""
        if self.running:
            return self
        try:
            if self._base is None:
                ensure_packages(*self.packages)
                parent = self._tmp_parent or tempfile.gettempdir()
                _sweep_stale_dirs(parent)
                self._base = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{self.name}-", dir=parent))
                _write_owner(self._base, None)
                _register(self)
                self._prepare()
            self._launch_until_ready(repick=not self._bootstrapped)
            if not self._bootstrapped:
                self._bootstrap()
                self._bootstrapped = True
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop gracefully (kill after :attr:`stop_timeout`), kill strays, remove the temp dir."""
        try:
            self._terminate(graceful=True)
        finally:
            if self._base is not None:
                shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
            self._bootstrapped = False
            _unregister(self)

    def kill(self) -> None:
        """SIGKILL the server's whole process group (simulated crash); data dir is kept."""
        self._terminate(graceful=False)

    def freeze(self) -> None:
        """SIGSTOP the server's process group: connections hang, nothing is answered."""
        self._signal_group(signal.SIGSTOP)
        self._frozen = True
        if self._proc is not None:
            self._wait_stopped(self._proc.pid)

    def thaw(self) -> None:
        """SIGCONT the server's process group after :meth:`freeze`."""
        self._signal_group(signal.SIGCONT)
        self._frozen = False

    def restart(self, *, graceful: bool = True) -> Self:
        """Stop (if running) and start again on the same port with the same data dir."""
        if self._base is None:
            return self.start()
        self._terminate(graceful=graceful)
        try:
            self._launch()
            self.wait_ready()
        except BaseException:
            self._terminate(graceful=False)
            raise
        return self

    def _launch_until_ready(self, *, repick: bool, attempts: int = 3) -> None:
        for attempt in range(1, attempts + 1):
            self._launch()
            try:
                self.wait_ready()
                return
            except ServerStartError as exc:
                # Another process may grab an auto-picked port between our check and
                # the server's bind(): try again on fresh port(s).
                text = str(exc).lower()
                in_use = "already in use" in text or "address in use" in text
                if attempt == attempts or not (repick and in_use and self._repick_ports()):
                    raise
                self._terminate(graceful=False)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll :meth:`_probe` until it succeeds; raise :class:`ServerStartError` with log tails."""
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay = 0.02
        last_error: BaseException | None = None
        while True:
            proc = self._proc
            if proc is None:
                raise ServerStartError(f"{self.name} server is not running{self._log_report()}")
            code = proc.poll()
            if code is not None:
                raise ServerStartError(
                    f"{self.name} server (pid {proc.pid}) exited with code {code} "
                    f"before becoming ready on {self.host}:{self.port}{self._log_report()}"
                )
            try:
                self._probe()
                return
            except Exception as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"{self.name} server not ready on {self.host}:{self.port} after {timeout:.0f}s "
                    f"(last probe error: {last_error!r}){self._log_report()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)


    # ------------------------------------------------------------------ internals
    def _log_report(self) -> str:
        parts = []
        for path in self.log_files if self._base is not None else []:
            text = _tail(path)
            if text:
                parts.append(f"\n--- last lines of {path} ---\n{text}")
        return "".join(parts)

    def _user_kwargs(self) -> dict[str, Any]:
        if self.run_as is None or not _is_root():
            return {}
        entry = _system_user(self.run_as)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _launch(self) -> None:
        cmd = self._command()
        setpriv = _which("setpriv")
        if setpriv is not None and threading.current_thread() is threading.main_thread():
            # Parent-death signal: the server dies with the process that started it,
            # even if that process is SIGKILLed and atexit never runs.  (Only from the
            # main thread: the signal fires when the *thread* that forked it exits.)
            cmd = [setpriv, "--pdeathsig=KILL", "--", *cmd]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=self._env(),
                start_new_session=True,
                **self._user_kwargs(),
            )
        self._frozen = False
        with contextlib.suppress(OSError):
            _write_owner(self.base_dir, self._proc.pid)

    def _signal_group(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise ServerError(f"{self.name} server is not running")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    @staticmethod
    def _wait_stopped(pid: int, timeout: float = 2.0) -> None:
        """Signals are delivered asynchronously: wait until every thread of ``pid`` is stopped."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                states = [
                    Path(task.path, "stat").read_text().rpartition(")")[2].split()[0]
                    for task in os.scandir(f"/proc/{pid}/task")
                ]
            except (OSError, IndexError):
                return  # no procfs (or the task list changed): best effort
            if all(state in ("T", "t", "Z", "X") for state in states):
                return
            time.sleep(0.005)

    def _exited(self, pid: int) -> bool:
        """Has ``pid`` (our child) exited?  Does not reap it, so its PID/PGID stay reserved."""
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def _terminate(self, *, graceful: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        pid = proc.pid
        if proc.returncode is None:
            if graceful and not self._exited(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, self.stop_signal)
                    os.killpg(pid, signal.SIGCONT)  # in case it is frozen
                deadline = time.monotonic() + self.stop_timeout
                while not self._exited(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
            # The leader is dead or still a zombie (so its PGID cannot have been
            # reused): kill whatever is left of the group, then reap.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            proc.wait()
        self._proc = None
        self._frozen = False


# ------------------------------------------------------------------------ PostgreSQL


class PostgresServer(ServerProcess):
    """PostgreSQL 15 (Debian layout) with a password-authenticated superuser.

    TCP connections need the password (scram-sha-256 in pg_hba.conf); the unix
    socket in :attr:`socket_dir` trusts everybody.  ``wal_level=logical`` with
    replication slots/WAL senders so logical decoding (wal2json) works.
    """

    name = "postgres"
    packages = ("postgresql", "postgresql-15-wal2json")
    stop_signal = signal.SIGINT  # "fast" shutdown: do not wait for clients to disconnect
    run_as = "postgres"

    DEFAULT_SETTINGS: ClassVar[dict[str, str]] = {
        # fsync=off only risks data on an OS crash; committed data survives kill().
        "fsync": "off",
        "full_page_writes": "off",
        "wal_level": "logical",
        "max_replication_slots": "10",
        "max_wal_senders": "10",
        "max_connections": "100",
        "shared_buffers": "32MB",
        "logging_collector": "off",
        "log_min_messages": "warning",
        "timezone": "UTC",
    }

    def __init__(
        self,
        *,
        port: int | None = None,
        user: str = "featuredao",
        password: str | None = None,
        dbname: str = "featuredao",
        settings: Mapping[str, str] | None = None,
        bindir: str | os.PathLike[str] = PG_BINDIR,
        startup_timeout: float = 60.0,
        tmp_parent: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(port=port, startup_timeout=startup_timeout, tmp_parent=tmp_parent)
        self.user = user
        self.password = password if password is not None else secrets.token_hex(12)
        self.dbname = dbname
        self.settings = {**self.DEFAULT_SETTINGS, **(settings or {})}
        self.bindir = Path(bindir)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir

    @property
    def dsn(self) -> str:
        """``postgresql://user:password@127.0.0.1:port/dbname``"""
        user = urllib.parse.quote(self.user, safe="")
        password = urllib.parse.quote(self.password, safe="")
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{self.dbname}"

    @property
    def conninfo(self) -> str:
        """libpq key=value connection string (TCP, with password)."""
        return (
            f"host={self.host} port={self.port} user={self.user} "
            f"password={self.password} dbname={self.dbname}"
        )

    def _prepare(self) -> None:
        base = self.base_dir
        pwfile = base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if _is_root():
            entry = _system_user("postgres")
            _chown_tree(base, entry.pw_uid, entry.pw_gid)
        _run_checked(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            "initdb",
            cwd=base,
            env=self._env(),
            **self._user_kwargs(),
        )
        pwfile.unlink()
        settings = {**self._build_specific_settings(), **self.settings}
        settings = {
            **settings,
            "listen_addresses": f"'{self.host}'",
            "unix_socket_directories": f"'{self.socket_dir}'",
        }
        # Appending keeps the file's owner (postgres); later settings win.
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# featuredao.testing.servers\n")
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")

    def _build_specific_settings(self) -> dict[str, str]:
        """Settings only some builds know about (unknown names would abort startup)."""
        described = _run_checked(
            [str(self.bindir / "postgres"), "--describe-config"],
            "postgres --describe-config",
            cwd=self.base_dir,
            **self._user_kwargs(),
        )
        known = {line.split("\t", 1)[0] for line in described.splitlines()}
        extra: dict[str, str] = {}
        if "output_plugin_libraries" in known:
            # Some (patched) builds only allow allow-listed logical decoding output
            # plugins; the default list lacks wal2json, which CDC needs.
            extra["output_plugin_libraries"] = "'pgoutput, test_decoding, wal2json'"
        return extra

    def _command(self) -> list[str]:
        # Only called when no process of ours is left (the whole group was killed),
        # so a postmaster.pid is stale: remove it rather than risk a PID-reuse clash.
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "postmaster.pid").unlink()
        return [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]

    def _probe(self) -> None:
        # Send a startup packet: the server asks for authentication ('R') only once
        # it accepts connections; while starting up / shutting down it sends 'E'.
        params = b"".join(
            [b"user\0", self.user.encode(), b"\0database\0postgres\0application_name\0probe\0\0"]
        )
        body = struct.pack("!I", 196608) + params
        with socket.create_connection((self.host, self.port), timeout=2.0) as sock:
            sock.sendall(struct.pack("!I", len(body) + 4) + body)
            tag = _recv_exact(sock, 1)
            if tag == b"R":
                return
            if tag == b"E":
                (length,) = struct.unpack("!I", _recv_exact(sock, 4))
                fields = _recv_exact(sock, length - 4).split(b"\0")
                message = next((f[1:] for f in fields if f[:1] == b"M"), b"?")
                raise ConnectionError(f"server said: {message.decode('utf-8', 'replace')}")
            raise ConnectionError(f"unexpected reply {tag!r}")

    def psql(self, sql: str, *, dbname: str | None = None) -> str:
        """Run SQL through ``psql`` over the (trusted) unix socket; returns unaligned output."""
        return _run_checked(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                dbname or self.dbname,
                "-c",
                sql,
            ],
            "psql",
            env={**self._env(), "PGCONNECT_TIMEOUT": "10"},
            timeout=60.0,
        )

    def _bootstrap(self) -> None:
        self.psql(f'CREATE DATABASE "{self.dbname}"', dbname="postgres")


# --------------------------------------------------------------------------- MariaDB


class MariaDbServer(ServerProcess):
    """MariaDB with row-based binary logging and a password-authenticated user.

    ``root`` has no password but is only reachable through the unix socket
    (:attr:`socket_path`); ``user``@``127.0.0.1``/``localhost``/``%`` has ALL
    privileges on ``*.*`` (including REPLICATION SLAVE / REPLICATION CLIENT).
    """

    name = "mariadb"
    packages = ("mariadb-server", "mariadb-client")

    def __init__(
        self,
        *,
        port: int | None = None,
        user: str = "featuredao",
        password: str | None = None,
        database: str = "featuredao",
        extra_args: Iterable[str] = (),
        startup_timeout: float = 60.0,
        tmp_parent: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(port=port, startup_timeout=startup_timeout, tmp_parent=tmp_parent)
        self.user = user
        self.password = password if password is not None else secrets.token_hex(12)
        self.database = database
        self.extra_args = list(extra_args)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_path(self) -> Path:
        return self.base_dir / "mysqld.sock"

    @property
    def error_log(self) -> Path:
        return self.base_dir / "mariadb.err"

    @property
    def log_files(self) -> list[Path]:
        return [self.log_path, self.error_log]

    def _user_args(self) -> list[str]:
        return ["--user=root"] if _is_root() else []

    def _prepare(self) -> None:
        (self.base_dir / "tmp").mkdir()
        _run_checked(
            [
                _require_program("mariadb-install-db", "mariadb-server"),
                "--no-defaults",
                f"--datadir={self.data_dir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
                *self._user_args(),
            ],
            "mariadb-install-db",
            cwd=self.base_dir,
            env=self._env(),
        )

    def _command(self) -> list[str]:
        return [
            _require_program("mariadbd", "mariadb-server"),
            "--no-defaults",
            *self._user_args(),
            f"--datadir={self.data_dir}",
            f"--tmpdir={self.base_dir / 'tmp'}",
            f"--port={self.port}",
            f"--bind-address={self.host}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.base_dir / 'mariadbd.pid'}",
            f"--log-error={self.error_log}",
            "--skip-networking=0",
            "--skip-name-resolve",
            "--host-cache-size=0",
            "--max-connect-errors=1000000",
            "--max-connections=500",
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=32M",
            "--innodb-flush-log-at-trx-commit=2",
            "--innodb-doublewrite=0",
            "--performance-schema=OFF",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
            f"--log-bin={self.data_dir / 'binlog'}",
            "--binlog-format=ROW",
            "--binlog-row-image=FULL",
            "--binlog-row-metadata=FULL",
            "--server-id=1",
            "--sync-binlog=0",
            "--default-time-zone=+00:00",
            *self.extra_args,
        ]

    def _probe(self) -> None:
        # A server that accepts clients greets with a protocol-10 handshake packet.
        with socket.create_connection((self.host, self.port), timeout=2.0) as sock:
            header = _recv_exact(sock, 4)
            length = int.from_bytes(header[:3], "little")
            payload = _recv_exact(sock, length)
            if payload[:1] == b"\x0a":
                return
            if payload[:1] == b"\xff":
                raise ConnectionError(f"server said: {payload[3:].decode('utf-8', 'replace')}")
            raise ConnectionError(f"unexpected handshake {payload[:16]!r}")

    def sql(self, statements: str, *, database: str | None = None) -> str:
        """Run SQL as root through the ``mariadb`` client over the unix socket (batch output)."""
        cmd = [
            _require_program("mariadb", "mariadb-client"),
            "--no-defaults",
            f"--socket={self.socket_path}",
            "--user=root",
            "--batch",
            "--skip-column-names",
            "--connect-timeout=10",
        ]
        if database:
            cmd.append(f"--database={database}")
        return _run_checked(cmd, "mariadb client", input_text=statements, env=self._env(), timeout=60.0)

    def _bootstrap(self) -> None:
        user = self.user.replace("'", "''")
        password = self.password.replace("'", "''")
        lines = [f"CREATE DATABASE IF NOT EXISTS `{self.database}` CHARACTER SET utf8mb4;"]
        for host in ("127.0.0.1", "localhost", "%"):
            account = f"'{user}'@'{host}'"
            lines += [
                f"CREATE USER IF NOT EXISTS {account} IDENTIFIED BY '{password}';",
                f"GRANT ALL PRIVILEGES ON *.* TO {account} WITH GRANT OPTION;",
                f"GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO {account};",
            ]
        lines.append("FLUSH PRIVILEGES;")
        self.sql("\n".join(lines))
        # mariadb-install-db also creates password-less root@127.0.0.1/::1/<hostname>
        # (and possibly anonymous) accounts; keep root reachable via the socket only.
        extra_accounts = self.sql(
            "SELECT CONCAT(QUOTE(User), '@', QUOTE(Host)) FROM mysql.user "
            "WHERE (User = 'root' AND Host <> 'localhost') OR User = ''"
        ).split()
        if extra_accounts:
            self.sql(f"DROP USER {', '.join(extra_accounts)}; FLUSH PRIVILEGES;")


# ----------------------------------------------------------------------------- Redis


class _RespError(Exception):
    pass


def _resp_encode(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _resp_read(fh: Any) -> object:
    line: bytes = fh.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by server")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise _RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data: bytes = fh.read(n + 2)
        return data[:-2].decode("utf-8", "replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_resp_read(fh) for _ in range(n)]
    raise ConnectionError(f"unexpected RESP reply {line!r}")


def _redis_call(
    host: str, port: int, *args: str, password: str | None = None, timeout: float = 2.0
) -> object:
    with socket.create_connection((host, port), timeout=timeout) as sock, sock.makefile("rb") as fh:
        if password is not None:
            sock.sendall(_resp_encode("AUTH", password))
            _resp_read(fh)
        sock.sendall(_resp_encode(*args))
        return _resp_read(fh)


class RedisServer(ServerProcess):
    """A standalone redis-server (no persistence) with an optional password."""

    name = "redis"
    packages = ("redis-server",)
    stop_timeout = 10.0

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        cluster_enabled: bool = False,
        cluster_node_timeout_ms: int = 2000,
        extra_args: Iterable[str] = (),
        startup_timeout: float = 30.0,
        tmp_parent: str | os.PathLike[str] | None = None,
    ) -> None:
        auto_port = port is None
        if port is None and cluster_enabled:
            port = _pick_ports((0, 10000))  # the cluster bus listens on port + 10000
        super().__init__(port=port, startup_timeout=startup_timeout, tmp_parent=tmp_parent)
        self._auto_port = auto_port
        self.password = password
        self.cluster_enabled = cluster_enabled
        self.cluster_node_timeout_ms = cluster_node_timeout_ms
        self.extra_args = list(extra_args)

    @property
    def url(self) -> str:
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def redis_log(self) -> Path:
        return self.base_dir / "redis.log"

    @property
    def log_files(self) -> list[Path]:
        return [self.log_path, self.redis_log]

    def _command(self) -> list[str]:
        cmd = [
            _require_program("redis-server", "redis-server"),
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.base_dir),
            "--logfile", str(self.redis_log),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password:
            cmd += ["--requirepass", self.password, "--masterauth", self.password]
        if self.cluster_enabled:
            cmd += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.cluster_node_timeout_ms),
            ]  # fmt: skip
        return cmd + self.extra_args

    def _repick_ports(self) -> bool:
        if not self._auto_port:
            return False
        self._port = _pick_ports((0, 10000)) if self.cluster_enabled else free_port()
        return True

    def command(self, *args: str, timeout: float = 2.0) -> object:
        """Send one command with a tiny built-in RESP client (authenticates if needed)."""
        return _redis_call(self.host, self.port, *args, password=self.password, timeout=timeout)

    def _probe(self) -> None:
        reply = self.command("PING", timeout=1.0)
        if reply != "PONG":
            raise ConnectionError(f"PING answered {reply!r}")


class RedisCluster(StartStop):
    """A Redis Cluster of ``masters`` masters (no replicas), one :class:`RedisServer` each."""

    packages: ClassVar[tuple[str, ...]] = ("redis-server", "redis-tools")

    def __init__(
        self,
        masters: int = 3,
        *,
        password: str | None = None,
        node_timeout_ms: int = 2000,
        startup_timeout: float = 60.0,
        tmp_parent: str | os.PathLike[str] | None = None,
    ) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        self.password = password
        self.startup_timeout = startup_timeout
        self.nodes = [
            RedisServer(
                password=password,
                cluster_enabled=True,
                cluster_node_timeout_ms=node_timeout_ms,
                startup_timeout=startup_timeout,
                tmp_parent=tmp_parent,
            )
            for _ in range(masters)
        ]
        self._created = False

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def port(self) -> int:
        """Port of the first node."""
        return self.nodes[0].port

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(node.host, node.port) for node in self.nodes]

    @property
    def running(self) -> bool:
        return all(node.running for node in self.nodes)

    def __repr__(self) -> str:
        return f"<RedisCluster {self.startup_nodes} running={self.running}>"

    def start(self) -> Self:
        try:
            ensure_packages(*self.packages)
            for node in self.nodes:
                node.start()
            if not self._created:
                self._create()
                self._created = True
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self) -> None:
        cmd = [_require_program("redis-cli", "redis-tools")]
        if self.password:
            cmd += ["-a", self.password, "--no-auth-warning"]
        cmd += ["--cluster", "create", *(f"{h}:{p}" for h, p in self.startup_nodes)]
        cmd += ["--cluster-replicas", "0", "--cluster-yes"]
        _run_checked(cmd, "redis-cli --cluster create", timeout=self.startup_timeout)

    def cluster_info(self, node: RedisServer) -> dict[str, str]:
        reply = node.command("CLUSTER", "INFO")
        info: dict[str, str] = {}
        for line in str(reply).splitlines():
            key, sep, value = line.partition(":")
            if sep:
                info[key.strip()] = value.strip()
        return info

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every node reports ``cluster_state:ok`` and knows all nodes and slots."""
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        want_nodes = str(len(self.nodes))
        last: object = None
        while True:
            try:
                infos = [self.cluster_info(node) for node in self.nodes]
                if all(
                    i.get("cluster_state") == "ok"
                    and i.get("cluster_slots_ok") == "16384"
                    and i.get("cluster_known_nodes") == want_nodes
                    for i in infos
                ):
                    return
                last = infos
            except Exception as exc:
                last = exc
            if time.monotonic() >= deadline:
                logs = "".join(node._log_report() for node in self.nodes)
                raise ServerStartError(f"redis cluster not ready after {timeout:.0f}s: {last!r}{logs}")
            time.sleep(0.1)

    def restart(self) -> Self:
        """Restart every node (same ports, same nodes.conf) and wait for cluster_state:ok."""
        for node in self.nodes:
            node.restart()
        self.wait_ready()
        return self

    def stop(self) -> None:
        errors: list[BaseException] = []
        for node in self.nodes:
            try:
                node.stop()
            except Exception as exc:
                errors.append(exc)
        self._created = False
        if errors:
            raise errors[0]



# ------------------------------------------------------------------------ ClickHouse


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


class ClickHouseServer(ServerProcess):
    """ClickHouse (Debian's 18.16 package works; newer single-binary builds too).

    :attr:`port` is the native TCP protocol port (clickhouse-driver); the HTTP
    interface is on :attr:`http_port`.  Users: ``default`` (no password) and
    ``user`` with ``password``, both restricted to 127.0.0.1.
    """

    name = "clickhouse"
    packages = ("clickhouse-server",)
    stop_timeout = 30.0

    def __init__(
        self,
        *,
        port: int | None = None,
        http_port: int | None = None,
        user: str = "featuredao",
        password: str | None = None,
        database: str = "featuredao",
        startup_timeout: float = 60.0,
        tmp_parent: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(port=port, startup_timeout=startup_timeout, tmp_parent=tmp_parent)
        self._auto_http_port = http_port is None
        self.http_port = http_port if http_port is not None else free_port()
        self.user = user
        self.password = password if password is not None else secrets.token_hex(12)
        self.database = database

    @property
    def config_path(self) -> Path:
        return self.base_dir / "config.xml"

    @property
    def server_log(self) -> Path:
        return self.base_dir / "log" / "clickhouse-server.log"

    @property
    def error_log(self) -> Path:
        return self.base_dir / "log" / "clickhouse-server.err.log"

    @property
    def log_files(self) -> list[Path]:
        return [self.log_path, self.error_log, self.server_log]

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}/"

    def _binary(self) -> list[str]:
        server = _which("clickhouse-server")
        if server is not None:
            return [server]
        combined = _which("clickhouse")
        if combined is not None:
            return [combined, "server"]
        raise MissingPackageError("clickhouse-server not found; install Debian package 'clickhouse-server'")

    def _write_config(self) -> None:
        base = self.base_dir
        config = f"""<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>{self.server_log}</log>
        <errorlog>{self.error_log}</errorlog>
        <size>50M</size>
        <count>1</count>
    </logger>
    <listen_host>{self.host}</listen_host>
    <tcp_port>{self.port}</tcp_port>
    <http_port>{self.http_port}</http_port>
    <path>{base / "data"}/</path>
    <tmp_path>{base / "tmp"}/</tmp_path>
    <user_files_path>{base / "user_files"}/</user_files_path>
    <format_schema_path>{base / "format_schemas"}/</format_schema_path>
    <users_config>{base / "users.xml"}</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <max_connections>1024</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <mark_cache_size>67108864</mark_cache_size>
    <uncompressed_cache_size>67108864</uncompressed_cache_size>
    <mlock_executable>false</mlock_executable>
</yandex>
"""
        self.config_path.write_text(config)

    def _prepare(self) -> None:
        base = self.base_dir
        for sub in ("data", "tmp", "user_files", "format_schemas", "log"):
            (base / sub).mkdir()
        networks = f"<networks><ip>{self.host}</ip><ip>::1</ip></networks>"
        users = f"""<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>2000000000</max_memory_usage>
            <use_uncompressed_cache>0</use_uncompressed_cache>
            <load_balancing>random</load_balancing>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            {networks}
            <profile>default</profile>
            <quota>default</quota>
        </default>
        <{self.user}>
            <password>{_xml_escape(self.password)}</password>
            {networks}
            <profile>default</profile>
            <quota>default</quota>
        </{self.user}>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"""
        (base / "users.xml").write_text(users)

    def _repick_ports(self) -> bool:
        if not (self._auto_port or self._auto_http_port):
            return False
        if self._auto_port:
            self._port = free_port()
        if self._auto_http_port:
            self.http_port = free_port()
        return True

    def _command(self) -> list[str]:
        self._write_config()  # on every launch: ports may have been re-picked
        return [*self._binary(), f"--config-file={self.config_path}"]

    def http_query(
        self, sql: str, *, user: str = "default", password: str = "", timeout: float = 30.0
    ) -> str:
        """Run one statement through the HTTP interface and return the response body."""
        query = urllib.parse.urlencode({"user": user, "password": password})
        request = urllib.request.Request(f"{self.http_url}?{query}", data=sql.encode(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body: bytes = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:2000]
            raise ServerError(f"ClickHouse HTTP {exc.code} for {sql!r}: {detail}") from exc
        return body.decode("utf-8", "replace")

    def _probe(self) -> None:
        with urllib.request.urlopen(f"{self.http_url}ping", timeout=2.0) as response:
            body = response.read()
        if body.strip() != b"Ok.":
            raise ConnectionError(f"/ping answered {body!r}")
        with socket.create_connection((self.host, self.port), timeout=2.0):
            pass

    def _bootstrap(self) -> None:
        self.http_query(f"CREATE DATABASE IF NOT EXISTS `{self.database}`")
