"""A throwaway PostgreSQL 15 server (Debian layout) with logical decoding (wal2json) enabled."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import struct
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from featuredao.testing.servers.packages import PG_BINDIR, _is_root
from featuredao.testing.servers.process import ServerProcess, _recv_exact, _run_checked, _system_user


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), uid, gid)



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
