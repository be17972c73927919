"""A throwaway ClickHouse server (native TCP and HTTP ports, a password-authenticated user)."""

from __future__ import annotations

import os
import secrets
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from featuredao.testing.servers.errors import MissingPackageError, ServerError
from featuredao.testing.servers.packages import _which
from featuredao.testing.servers.ports import free_port
from featuredao.testing.servers.process import ServerProcess


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
