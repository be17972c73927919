"""Throwaway Redis: a standalone :class:`RedisServer` and a :class:`RedisCluster` of such servers, plus the
tiny RESP client their readiness probes and cluster checks use."""

from __future__ import annotations

import os
import socket
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Self

from featuredao.testing._lifecycle import StartStop
from featuredao.testing.servers.errors import ServerStartError
from featuredao.testing.servers.packages import _require_program, ensure_packages
from featuredao.testing.servers.ports import LOCALHOST, _pick_ports, free_port
from featuredao.testing.servers.process import ServerProcess, _run_checked


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
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, one :class:`RedisServer` per
    node. ``require_full_coverage=False`` starts the nodes with ``cluster-require-full-coverage no``:
    the healthy masters keep serving while a failed master's slots wait for its replica."""

    packages: ClassVar[tuple[str, ...]] = ("redis-server", "redis-tools")

    def __init__(
        self,
        masters: int = 3,
        *,
        replicas: int = 0,
        password: str | None = None,
        node_timeout_ms: int = 2000,
        require_full_coverage: bool = True,
        startup_timeout: float = 60.0,
        tmp_parent: str | os.PathLike[str] | None = None,
    ) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        if replicas < 0:
            raise ValueError("replicas must be 0 or more")
        self.password = password
        self.replicas = replicas
        self.startup_timeout = startup_timeout
        extra = [] if require_full_coverage else ["--cluster-require-full-coverage", "no"]
        self.nodes = [
            RedisServer(
                password=password,
                cluster_enabled=True,
                cluster_node_timeout_ms=node_timeout_ms,
                extra_args=extra,
                startup_timeout=startup_timeout,
                tmp_parent=tmp_parent,
            )
            for _ in range(masters * (1 + replicas))
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
        cmd += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        _run_checked(cmd, "redis-cli --cluster create", timeout=self.startup_timeout)

    def cluster_info(self, node: RedisServer) -> dict[str, str]:
        return _fields(node.command("CLUSTER", "INFO"))

    def replication_info(self, node: RedisServer) -> dict[str, str]:
        """``INFO replication`` of one node (``role``, ``master_link_status``, ...)."""
        return _fields(node.command("INFO", "replication"))

    def node_at(self, port: int) -> RedisServer:
        """The node listening on ``port``."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(f"no node of this cluster listens on port {port}")

    def topology(self, via: RedisServer | None = None) -> dict[RedisServer, list[RedisServer]]:
        """Each master serving slots and its replicas, as ``via`` (default: the first running, unfrozen
        node) sees them in ``CLUSTER NODES``; failed nodes are left out."""
        if via is None:
            via = next(n for n in self.nodes if n.running and not n.frozen)
        masters: dict[str, RedisServer] = {}
        replica_of: list[tuple[RedisServer, str]] = []
        for line in str(via.command("CLUSTER", "NODES")).splitlines():
            parts = line.split()
            if len(parts) < 8:
                continue
            node_id, address, flags, master_id = parts[0], parts[1], parts[2].split(","), parts[3]
            if "fail" in flags or "noaddr" in flags:
                continue
            node = self.node_at(int(address.split("@", 1)[0].rsplit(":", 1)[1]))
            if "master" in flags and len(parts) > 8:
                masters[node_id] = node
            elif "slave" in flags:
                replica_of.append((node, master_id))
        out: dict[RedisServer, list[RedisServer]] = {m: [] for m in masters.values()}
        for node, master_id in replica_of:
            if master_id in masters:
                out[masters[master_id]].append(node)
        return out

    def slot_ranges(self, master: RedisServer) -> list[tuple[int, int]]:
        """The slot ranges ``master`` serves, as the cluster's ``CLUSTER SLOTS`` says."""
        via = next(n for n in self.nodes if n.running and not n.frozen)
        reply = via.command("CLUSTER", "SLOTS")
        assert isinstance(reply, list)
        return [(int(e[0]), int(e[1])) for e in reply if int(e[2][1]) == master.port]

    def wait_replicas_linked(self, timeout: float | None = None) -> None:
        """Wait until every replica reports ``master_link_status:up`` and its initial sync is done."""
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        want = len(self.nodes) // (1 + self.replicas) * self.replicas
        last: object = None
        while True:
            try:
                infos = [self.replication_info(n) for n in self.nodes if n.running and not n.frozen]
                linked = [i for i in infos if i.get("role") == "slave"
                          and i.get("master_link_status") == "up" and i.get("master_sync_in_progress") == "0"]
                if len(linked) >= want:
                    return
                last = [(i.get("role"), i.get("master_link_status")) for i in infos]
            except Exception as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise ServerStartError(f"redis cluster replicas not linked after {timeout:.0f}s: {last!r}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every node reports ``cluster_state:ok`` and knows all nodes and slots (and, with
        replicas, every replica's link to its master is up)."""
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
                    and i.get("cluster_slots_fail", "0") == "0"
                    and i.get("cluster_slots_pfail", "0") == "0"
                    for i in infos
                ):
                    break
                last = infos
            except Exception as exc:
                last = exc
            if time.monotonic() >= deadline:
                logs = "".join(node._log_report() for node in self.nodes)
                raise ServerStartError(f"redis cluster not ready after {timeout:.0f}s: {last!r}{logs}")
            time.sleep(0.1)
        if self.replicas:
            self.wait_replicas_linked(max(1.0, deadline - time.monotonic()))

    def heal(self, timeout: float | None = None) -> None:
        """After a fault: thaw frozen nodes, restart dead ones (a failed-over master rejoins as a replica
        of its successor) and wait until the cluster is whole: every slot served, every replica linked."""
        for node in self.nodes:
            if node.frozen:
                node.thaw()
            if not node.running:
                node.restart()
        self.wait_ready(timeout)

    def slots_ok(self, exclude: Iterable[RedisServer] = ()) -> bool:
        """True when every node but ``exclude`` reports ``cluster_state:ok`` with all 16384 slots served
        by masters that are not failing (``cluster_slots_ok``: a failed master's slots are not)."""
        skip = set(exclude)
        try:
            infos = [self.cluster_info(n) for n in self.nodes if n not in skip and n.running and not n.frozen]
        except Exception:
            return False
        return bool(infos) and all(
            i.get("cluster_state") == "ok" and i.get("cluster_slots_ok") == "16384"
            and i.get("cluster_slots_pfail") == "0" and i.get("cluster_slots_fail") == "0" for i in infos)

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
                if node.frozen:
                    node.thaw()
                node.stop()
            except Exception as exc:
                errors.append(exc)
        self._created = False
        if errors:
            raise errors[0]


def _fields(reply: object) -> dict[str, str]:
    """``key:value`` lines (CLUSTER INFO, INFO) as a dict."""
    info: dict[str, str] = {}
    for line in str(reply).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info
