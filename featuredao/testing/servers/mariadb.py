"""A throwaway MariaDB server with row-based binary logging (for CDC) and a password-authenticated user."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterable
from pathlib import Path

from featuredao.testing.servers.packages import _is_root, _require_program
from featuredao.testing.servers.process import ServerProcess, _recv_exact, _run_checked


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
