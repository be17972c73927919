"""The process machinery every throwaway server shares: :class:`ServerProcess` (temporary directory,
launch in its own process group, readiness polling, graceful stop / kill / freeze / thaw,
log tails in errors) and the small subprocess and socket helpers the servers use."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

from featuredao.testing._lifecycle import StartStop
from featuredao.testing.servers.cleanup import (
    _DIR_PREFIX,
    _register,
    _sweep_stale_dirs,
    _unregister,
    _write_owner,
)
from featuredao.testing.servers.errors import _LOG_TAIL_LINES, ServerError, ServerStartError
from featuredao.testing.servers.packages import _is_root, _which, ensure_packages
from featuredao.testing.servers.ports import LOCALHOST, free_port


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
        # Some servers' children leave the group (PostgreSQL's backends call setsid()): signal every
        # descendant too, so a frozen server is frozen whole.
        for pid in _descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

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


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (read from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out
