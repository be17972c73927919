"""The Redis adapter's key routing on a Redis Cluster, and its key-value tier (the shared L2 cache).

:class:`ClusterRouter` sends each key to the node serving its hash slot, with one pipeline per node (and
per ``batch_size`` keys), the nodes in parallel, each on its own few threads. Outcomes are per node: a
node that fails or does not answer in time fails only its own keys (see :class:`Routed`). Each node has
its own circuit breaker: an open node fails its keys fast (or hands them to its replicas, with
``read_from_replicas``), and is probed in the background, never by a request. The slot map is re-read
on a background thread after a connection error, a timeout, ``MOVED``/``ASK`` or ``CLUSTERDOWN``, and
every ``slot_refresh_interval_ms`` while a node's breaker is not closed, but never more often than that:
so keys reach a promoted replica as soon as the cluster has promoted it, and the breaker of a node whose
slots are now served elsewhere is dropped with it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from itertools import count
from typing import Any

import redis.exceptions as rexc
from redis.crc import key_slot

from featuredao.config import CircuitBreakerConfig
from featuredao.dao import Deadline, KeyValueStore
from featuredao.errors import BackendError, BackendTimeout, CircuitOpen, Closed, Overloaded
from featuredao.types import Key

from ._redis_codecs import _detail
from ._redis_exchange import exchange

log = logging.getLogger("featuredao")

HASH_SLOTS = 16384
_MARGIN_S = 0.001
"""A read stops waiting for late nodes this long before its deadline, so the rows of the others are
assembled and returned within it."""

_NODE_DOWN = (rexc.ConnectionError, rexc.TimeoutError, TimeoutError, OSError)
"""Call failures that say the node is not serving (MaxConnectionsError, our own pool, is excluded)."""
_REPLY_FAILURES = (rexc.ClusterDownError, rexc.TryAgainError, rexc.ReadOnlyError)
"""Error replies that fail a key without saying anything about the node's health (it answered)."""

Commands = Sequence[Sequence[tuple[Any, ...]]]
"""Per item (key): the commands that serve it, each one the arguments of ``execute_command``."""


class SlotMap:
    """Which master serves each hash slot, and the master's replicas, as one node of the cluster said."""

    __slots__ = ("owner", "replicas")

    def __init__(self, owner: list[str | None], replicas: dict[str, tuple[str, ...]]) -> None:
        self.owner = owner
        """Per slot: the ``host:port`` of its master (None: no node serves it)."""
        self.replicas = replicas
        """Per master: its replicas (the ones the cluster does not consider failed)."""

    @classmethod
    def parse(cls, reply: Any, default_host: str) -> SlotMap:
        """Build the map from one node's ``CLUSTER NODES`` view.

        ``CLUSTER NODES`` rather than ``CLUSTER SLOTS``: the latter leaves out a replica until the cluster
        has gossiped its replication offset (seconds after it linked), which is exactly when a young
        cluster may need it. Replicas flagged ``fail`` are left out; migrating slots stay with their
        owner (a key already moved answers ``ASK``).
        """
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        owner: list[str | None] = [None] * HASH_SLOTS
        address: dict[str, str] = {}
        replicas_of: dict[str, list[str]] = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 8:
                continue
            node_id, where, flags, master_id = parts[0], parts[1], set(parts[2].split(",")), parts[3]
            if "noaddr" in flags or "handshake" in flags:
                continue
            host, _, port = where.split("@", 1)[0].split(",", 1)[0].rpartition(":")
            if not port.isdigit() or port == "0":
                continue  # a node that does not know its own address yet
            addr = f"{host or default_host}:{int(port)}"
            address[node_id] = addr
            if "slave" in flags and "fail" not in flags and master_id != "-":
                replicas_of.setdefault(master_id, []).append(addr)
            if "master" in flags:
                for item in parts[8:]:
                    if item.startswith("["):
                        continue  # [slot->-node] / [slot-<-node]: migrating or importing
                    first, _, last = item.partition("-")
                    lo, hi = int(first), int(last or first)
                    owner[lo:hi + 1] = [addr] * (hi - lo + 1)
        replicas = {address[m]: tuple(sorted(reps)) for m, reps in replicas_of.items() if m in address}
        return cls(owner, replicas)

    @property
    def masters(self) -> set[str]:
        """Every node that serves slots."""
        return {a for a in self.owner if a is not None}

    def nodes(self) -> set[str]:
        """Every node the map names: masters and their replicas."""
        return self.masters | {r for reps in self.replicas.values() for r in reps}

    def slots_of(self, addr: str) -> int:
        """How many slots ``addr`` serves."""
        return self.owner.count(addr)


class Routed:
    """What one routed batch gave: per item its replies, or the node that failed it and why."""

    __slots__ = ("failures", "replies")

    def __init__(self, n: int) -> None:
        self.replies: list[list[Any] | None] = [None] * n
        """Per item: the replies of its commands (error replies other than redirects included), or None
        when it failed."""
        self.failures: dict[str, tuple[BaseException, list[int]]] = {}
        """Per node that failed items: the first error (a driver exception, or our own: ``CircuitOpen``
        for a node failing fast, ``BackendTimeout`` for one that did not answer in time, ``Overloaded``
        under ``"(none)"`` when no time was left to send anything, ``Closed``) and the items."""

    def fail(self, addr: str, error: BaseException, items: Iterable[int]) -> None:
        entry = self.failures.get(addr)
        if entry is None:
            entry = self.failures[addr] = (error, [])
        entry[1].extend(items)

    @property
    def failed(self) -> list[int]:
        """Every failed item."""
        return [i for _, items in self.failures.values() for i in items]


class NodeBreaker:
    """One cluster node's circuit breaker: opens after ``failure_threshold`` consecutive failures; while
    open, requests skip the node (its keys fail fast or go to a replica); once ``reset_timeout_s`` has
    passed, one background probe may go (:meth:`probe_due`), and any answer closes it again."""

    def __init__(self, name: str, config: CircuitBreakerConfig) -> None:
        self.name = name
        self.config = config
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def closed(self) -> bool:
        """May requests use the node?"""
        return self._opened_at is None or not self.config.enabled

    @property
    def state(self) -> str:
        """``closed``, ``open``, or ``half_open`` (open, and its reset timeout has passed)."""
        opened = self._opened_at
        if opened is None:
            return "closed"
        return "half_open" if time.monotonic() - opened >= self.config.reset_timeout_s else "open"

    def probe_due(self) -> bool:
        """True (once, until the probe's outcome is recorded) when an open node may be probed."""
        with self._lock:
            if self._opened_at is None or self._probing or \
                    time.monotonic() - self._opened_at < self.config.reset_timeout_s:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        """The node answered."""
        with self._lock:
            self._failures = 0
            self._probing = False
            if self._opened_at is not None:
                self._opened_at = None
                log.warning("%s: circuit closed again", self.name)

    def failure(self) -> None:
        """The node refused, dropped the connection, or did not answer in time."""
        with self._lock:
            self._failures += 1
            self._probing = False
            if self._opened_at is not None:
                self._opened_at = time.monotonic()  # a failed probe: wait another reset timeout
            elif self._failures >= self.config.failure_threshold and self.config.enabled:
                self._opened_at = time.monotonic()
                log.warning("%s: circuit opened after %d consecutive failures", self.name, self._failures)

    def release(self) -> None:
        """A call that told nothing about the node (cancelled, our own pool full)."""
        with self._lock:
            self._probing = False


class _Call:
    """One pipeline to one node. ``claim`` decides who records its outcome on the node's breaker: the
    call when it ends, or the reader that stopped waiting for it (whoever comes first)."""

    __slots__ = ("addr", "asking", "claim", "items", "readonly", "started")

    def __init__(self, addr: str, items: list[int], readonly: bool, asking: bool) -> None:
        self.addr = addr
        self.items = items
        self.readonly = readonly
        self.asking = asking
        self.started = False
        self.claim = threading.Lock()

    def take(self) -> bool:
        """True for the first caller only."""
        return self.claim.acquire(blocking=False)


class ClusterRouter:
    """Keys to nodes by slot, per-node pipelines, breakers and threads, and a slot map kept current."""

    def __init__(self, name: str, seeds: Sequence[str], connect: Callable[[str, int], Any], *,
                 pool_size: int, batch_size: int, breaker: CircuitBreakerConfig, refresh_interval_s: float,
                 read_from_replicas: bool) -> None:
        self.name = name
        self._seeds = list(seeds)
        self._connect = connect
        self._pool_size = pool_size
        self._batch_size = max(1, batch_size)
        self._breaker_config = breaker
        self._interval = refresh_interval_s
        self.read_from_replicas = read_from_replicas
        self._lock = threading.Lock()
        self._boot_lock = threading.Lock()
        self._map: SlotMap | None = None
        self._clients: dict[str, Any] = {}
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._breakers: dict[str, NodeBreaker] = {}
        self._closed = False
        self._wanted = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_refresh = 0.0
        self._turn = count()
        self.refreshes = 0
        """How many times the slot map was read (bootstrap included): tests and benchmarks look."""

    # -- nodes ------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"source {self.name!r} is closed")

    def client(self, addr: str) -> Any:
        """The node's own client and connection pool (``pool_size`` connections), made on first use."""
        found = self._clients.get(addr)
        if found is not None:
            return found
        with self._lock:
            self._check_open()
            found = self._clients.get(addr)
            if found is None:
                host, port = addr.rsplit(":", 1)
                found = self._clients[addr] = self._connect(host, int(port))
            return found

    def _executor(self, addr: str) -> ThreadPoolExecutor:
        """The node's own threads: a node that hangs holds its own, never the other nodes'."""
        found = self._executors.get(addr)
        if found is not None:
            return found
        with self._lock:
            self._check_open()
            found = self._executors.get(addr)
            if found is None:
                found = self._executors[addr] = ThreadPoolExecutor(
                    max_workers=self._pool_size, thread_name_prefix=f"featuredao-{self.name}-{addr}")
            return found

    def breaker(self, addr: str) -> NodeBreaker:
        """The node's circuit breaker (made closed on first use)."""
        found = self._breakers.get(addr)
        if found is not None:
            return found
        with self._lock:
            found = self._breakers.get(addr)
            if found is None:
                found = self._breakers[addr] = NodeBreaker(f"source {self.name}, cluster node {addr}",
                                                           self._breaker_config)
            return found

    def _usable(self, addr: str) -> bool:
        """May a request send keys to this node? Only while its breaker is closed: an open node is
        probed in the background, so no request waits on a node that just failed."""
        found = self._breakers.get(addr)
        return found is None or found.closed

    def breaker_states(self) -> dict[str, str]:
        """Every node breaker's state, by node."""
        with self._lock:
            breakers = dict(self._breakers)
        return {addr: b.state for addr, b in sorted(breakers.items())}

    # -- the slot map -----------------------------------------------------------------------------------
    def slot_map(self) -> SlotMap:
        """The current map; read from the seeds on first use (raises when no node answers)."""
        smap = self._map
        if smap is not None:
            return smap
        with self._boot_lock:
            self._check_open()
            if self._map is None:
                self._map = self._read_map()
                self._last_refresh = time.monotonic()
                self._start_refresher()
            return self._map

    def request_refresh(self) -> None:
        """Ask the background thread to re-read the slot map (at most once per interval)."""
        self._wanted = True
        self._wake.set()

    def _candidates(self) -> list[str]:
        """Nodes to ask for the map: healthy masters first, then replicas, the seeds, the rest."""
        smap = self._map
        known = sorted(smap.masters) + sorted(smap.nodes() - smap.masters) if smap is not None else []
        ordered = list(dict.fromkeys([*known, *self._seeds]))
        return sorted(ordered, key=lambda a: not self._usable(a))  # stable: closed breakers first

    def _read_map(self) -> SlotMap:
        """One node's view of the cluster: the first of the best three candidates to answer (asked at once,
        each on its own node's threads, so a frozen node cannot hold the refresh), else the others in turn."""
        self.refreshes += 1
        candidates = self._candidates()
        last: BaseException | None = None
        asked: dict[Future[SlotMap], str] = {}
        for addr in candidates[:3]:
            try:
                asked[self._executor(addr).submit(self._ask, addr)] = addr
            except RuntimeError as exc:  # shut down by close() meanwhile
                raise Closed(f"source {self.name!r} is closed") from exc
        pending = set(asked)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                if fut.cancelled():
                    continue
                if fut.exception() is None:
                    for other in pending:
                        other.cancel()
                    return fut.result()
                last = fut.exception()
        for addr in candidates[3:]:
            try:
                return self._ask(addr)
            except Closed:
                raise
            except Exception as exc:  # try the next node
                last = exc
        if isinstance(last, Closed):
            raise last
        why = _detail(last) if last is not None else "no node to ask"
        raise rexc.RedisClusterException(
            f"Redis Cluster cannot be connected: no node answered CLUSTER NODES ({why})") from last

    def _ask(self, addr: str) -> SlotMap:
        smap = SlotMap.parse(self.client(addr).execute_command("CLUSTER", "NODES"), addr.rsplit(":", 1)[0])
        if not smap.masters:
            raise rexc.ClusterError(f"node {addr} knows no master serving slots")
        return smap

    def _start_refresher(self) -> None:
        self._thread = threading.Thread(target=self._refresher, daemon=True,
                                        name=f"featuredao-slots-{self.name}")
        self._thread.start()

    def _troubled(self) -> bool:
        with self._lock:
            breakers = list(self._breakers.values())
        return not all(b.closed for b in breakers)

    def _refresher(self) -> None:
        """Re-read the map when asked and while a node's breaker is not closed; probe open nodes."""
        while not self._stop.is_set():
            self._wake.wait(self._interval if self._troubled() else None)
            self._wake.clear()
            pause = self._last_refresh + self._interval - time.monotonic()
            if pause > 0 and self._stop.wait(pause):
                return
            if self._stop.is_set():
                return
            if self._wanted or self._troubled():
                self._wanted = False
                self._last_refresh = time.monotonic()
                try:
                    self._apply(self._read_map())
                except Closed:
                    return
                except Exception as exc:
                    log.debug("source %s: slot map refresh failed: %s", self.name, _detail(exc))
                    self._wanted = True
            self._probe_due()

    def _apply(self, new: SlotMap) -> None:
        """Swap the map in; forget the breakers (and close the pools) of nodes it no longer names."""
        old, self._map = self._map, new
        if old is not None and old.owner != new.owner:
            moved: dict[str, int] = {}
            for before, now in zip(old.owner, new.owner, strict=True):
                if before != now and now is not None:
                    moved[now] = moved.get(now, 0) + 1
            log.warning("source %s: slot map changed: %s", self.name,
                        ", ".join(f"{n} slot(s) now on {a}" for a, n in sorted(moved.items())))
        named = new.nodes()
        with self._lock:
            gone = {a: self._breakers.pop(a) for a in list(self._breakers) if a not in named}
            dropped = [self._clients.pop(a) for a in list(self._clients) if a not in named and
                       a not in self._seeds]
        for addr, breaker in gone.items():
            # Its slots are served elsewhere now: nothing is routed to it any more, so nothing fails fast
            # on its account. If it comes back, it comes back with a closed breaker.
            if not breaker.closed:
                log.warning("source %s: node %s serves no slot any more; its breaker is closed", self.name,
                            addr)
        for client in dropped:
            # In-use connections too: a thread stuck on a frozen node's socket is let go.
            try:
                client.connection_pool.disconnect(inuse_connections=True)
            except Exception as exc:
                log.debug("source %s: disconnecting a dropped node: %s", self.name, _detail(exc))

    def _probe_due(self) -> None:
        """Let one PING through to each open node whose reset timeout has passed, off the request path."""
        with self._lock:
            breakers = list(self._breakers.items())
        for addr, breaker in breakers:
            if breaker.probe_due():
                probe = _Call(addr, [], False, False)
                try:
                    fut = self._executor(addr).submit(self._ping, probe)
                except (RuntimeError, Closed):
                    breaker.release()
                    return
                fut.add_done_callback(functools.partial(self._record, probe, breaker))

    def _ping(self, call: _Call) -> None:
        call.started = True
        self.client(call.addr).ping()

    # -- routed batches ---------------------------------------------------------------------------------
    def execute(self, keys: Sequence[bytes], commands: Commands, *, deadline: float | None,
                read: bool) -> Routed:
        """Run each key's commands on the node serving its slot; per-node outcomes (see :class:`Routed`).

        ``deadline`` (``time.perf_counter``): stop waiting then; keys of nodes that did not answer fail
        with ``BackendTimeout``. ``read``: the commands only read, so with ``read_from_replicas`` a
        replica may serve the keys of a master that failed or whose breaker is open.
        A key that is redirected (``MOVED``, ``ASK``) or whose master failed is sent once more.
        """
        out = Routed(len(keys))
        if not keys:
            return out
        until = None if deadline is None else deadline - _MARGIN_S
        if until is not None and until <= time.perf_counter():
            # No time to give any node: nothing is sent, and no node is blamed.
            out.fail("(none)", Overloaded("no time left when the batch could start"), range(len(keys)))
            return out
        smap = self.slot_map()
        tries = [0] * len(keys)
        active: dict[Future[list[Any]], _Call] = {}
        groups: dict[str, list[int]] = {}
        owner = smap.owner
        for i, key in enumerate(keys):
            addr = owner[key_slot(key)]
            if addr is None:
                out.fail("(no node)", rexc.SlotNotCoveredError("slot not covered by the cluster"), [i])
                self.request_refresh()
                continue
            groups.setdefault(addr, []).append(i)
        for addr, items in groups.items():
            self._dispatch(smap, addr, items, keys, commands, tries, active, out, read=read)
        while active:
            left = None if until is None else until - time.perf_counter()
            if left is not None and left <= 0:
                break
            done, _ = wait(active, timeout=left, return_when=FIRST_COMPLETED)
            for fut in done:
                call = active.pop(fut)
                self._collect(smap, call, fut, keys, commands, tries, active, out, read=read)
        for fut, call in active.items():
            # Late: the reader stops waiting; a call that was sent counts against its node.
            if call.take():
                breaker = self.breaker(call.addr)
                if call.started:
                    breaker.failure()
                    self.request_refresh()
                else:
                    breaker.release()  # still queued behind this node's other calls
            fut.cancel()
            out.fail(call.addr, BackendTimeout(f"cluster node {call.addr}: no answer within the time left"),
                     call.items)
        return out

    def _dispatch(self, smap: SlotMap, addr: str, items: list[int], keys: Sequence[bytes],
                  commands: Commands, tries: list[int], active: dict[Future[list[Any]], _Call],
                  out: Routed, *, read: bool, readonly: bool = False, asking: bool = False) -> None:
        """Send ``items`` to ``addr`` (in pipelines of ``batch_size``), or to a replica, or fail them fast."""
        if not self._usable(addr):
            self.request_refresh()
            replica = self._replica(smap, addr) if read and not readonly else None
            if replica is None:
                out.fail(addr, CircuitOpen(f"cluster node {addr}: circuit open, failing fast"), items)
                return
            addr, readonly = replica, True
        breaker = self.breaker(addr)
        for start in range(0, len(items), self._batch_size):
            call = _Call(addr, items[start:start + self._batch_size], readonly, asking)
            for i in call.items:
                tries[i] += 1
            try:
                fut = self._executor(addr).submit(self._run, call, keys, commands)
            except (RuntimeError, Closed):  # shut down by close() meanwhile
                out.fail(addr, Closed(f"source {self.name!r} is closed"), call.items)
                continue
            fut.add_done_callback(functools.partial(self._record, call, breaker))
            active[fut] = call

    def _replica(self, smap: SlotMap, master: str) -> str | None:
        """A replica of ``master`` whose breaker is closed (in turn, to spread the load), if allowed."""
        if not self.read_from_replicas:
            return None
        usable = [r for r in smap.replicas.get(master, ()) if self._usable(r)]
        return usable[next(self._turn) % len(usable)] if usable else None

    def _run(self, call: _Call, keys: Sequence[bytes], commands: Commands) -> list[Any]:
        """On the node's thread: one pipeline, error replies returned in place of their values."""
        call.started = True
        pipe = self.client(call.addr).pipeline(transaction=False)
        if call.readonly:
            pipe.execute_command("READONLY")  # a replica serves reads only to a READONLY connection
        for i in call.items:
            if call.asking:
                pipe.execute_command("ASKING")
            for args in commands[i]:
                pipe.execute_command(*args)
        replies: list[Any] = pipe.execute(raise_on_error=False)
        return replies[1:] if call.readonly else replies

    def _record(self, call: _Call, breaker: NodeBreaker, fut: Future[Any]) -> None:
        """Done callback: the call's outcome on its node's breaker, unless the reader recorded it already
        (it gave up at its deadline). An answer always counts: a node that was merely slow for one
        reader's deadline is alive, and closes its breaker again."""
        first = call.take()
        if fut.cancelled() or not call.started:
            if first:
                breaker.release()
            return
        exc = fut.exception()
        if exc is None:
            breaker.success()
        elif not first:
            return
        elif isinstance(exc, rexc.MaxConnectionsError):
            breaker.release()  # our own pool was full: load, not the node's failure
        elif isinstance(exc, _NODE_DOWN):
            breaker.failure()
            self.request_refresh()
        else:
            breaker.release()

    def _collect(self, smap: SlotMap, call: _Call, fut: Future[list[Any]], keys: Sequence[bytes],
                 commands: Commands, tries: list[int], active: dict[Future[list[Any]], _Call], out: Routed,
                 *, read: bool) -> None:
        """Take a finished call's replies; send redirected keys (and a failed master's) on once more."""
        if fut.cancelled():
            out.fail(call.addr, Closed(f"source {self.name!r} is closed"), call.items)
            return
        exc = fut.exception()
        if exc is not None:
            if isinstance(exc, _NODE_DOWN) and not isinstance(exc, rexc.MaxConnectionsError):
                self.request_refresh()
                again = [i for i in call.items if tries[i] < 2]
                replica = self._replica(smap, call.addr) if read and not call.readonly and again else None
                if replica is not None and not self._closed:
                    # The master dropped or refused the connection: its replica serves the keys now.
                    self._dispatch(smap, replica, again, keys, commands, tries, active, out, read=read,
                                   readonly=True)
                    resent = set(again)
                    lost = [i for i in call.items if i not in resent]
                    if lost:
                        out.fail(call.addr, exc, lost)
                    return
            out.fail(call.addr, exc, call.items)
            return
        replies = fut.result()
        step = 2 if call.asking else 1  # ASKING's own "OK" precedes each key's commands
        redirects: dict[tuple[str, bool], list[int]] = {}
        pos = 0
        for i in call.items:
            pos += step - 1
            n = len(commands[i])
            mine = replies[pos:pos + n]
            pos += n
            moved = next((r for r in mine if isinstance(r, rexc.AskError)), None)  # MovedError is one too
            if moved is not None:
                self.request_refresh()
                target = f"{moved.host}:{moved.port}"
                if tries[i] < 2:
                    redirects.setdefault((target, not isinstance(moved, rexc.MovedError)), []).append(i)
                else:
                    out.fail(call.addr, moved, [i])
                continue
            failure = next((r for r in mine if isinstance(r, _REPLY_FAILURES)), None)
            if failure is not None:
                self.request_refresh()
                out.fail(call.addr, failure, [i])
                continue
            out.replies[i] = mine
        for (target, asking), items in redirects.items():
            if self._closed:
                out.fail(call.addr, Closed(f"source {self.name!r} is closed"), items)
                continue
            # A redirect names the master that serves the slot now (a replica redirects to it too).
            self._dispatch(smap, target, items, keys, commands, tries, active, out, read=read, asking=asking)

    # -- the rest ---------------------------------------------------------------------------------------
    def ping(self) -> None:
        """PING every master of the map; raise naming the first one that does not answer."""
        smap = self.slot_map()
        for addr in sorted(smap.masters):
            try:
                self.client(addr).ping()
            except Closed:
                raise
            except Exception as exc:
                raise rexc.ClusterError(f"cluster node {addr} ({smap.slots_of(addr)} slots) does not "
                                        f"answer: {_detail(exc)}") from exc

    def close(self) -> None:
        """Stop the refresher, close every node's pool (connections in use too), drop the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            clients = list(self._clients.values())
            executors = list(self._executors.values())
            self._clients.clear()
            self._executors.clear()
        self._stop.set()
        self._wake.set()
        for client in clients:
            try:
                client.connection_pool.disconnect(inuse_connections=True)
                client.close()
            except Exception as exc:
                log.debug("source %s: closing a node's pool: %s", self.name, _detail(exc))
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)


class _Lost:
    """Keys a cluster read or upsert could not serve, and why: what ``read_partial`` and ``upsert`` report
    for the nodes that failed while the others answered."""

    __slots__ = ("_lock", "detail", "error", "keys")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the chunks of one read may report from several threads
        self.keys: list[Key] = []
        self.error: BackendError | None = None
        self.detail = ""
        """The first error's message without the source and view (they are said once)."""

    def add(self, keys: Iterable[Key], error: BackendError, detail: str) -> None:
        with self._lock:
            self.keys.extend(keys)
            if self.error is None:
                self.error, self.detail = error, detail


NodeFailures = Mapping[str, tuple[BaseException, list[Key]]]
"""Per cluster node (``host:port``): why it failed and the keys it failed."""

# L2 reads of a standalone server with a timeout run here: the caller waits at most its time left. The
# reply is read within it (``exchange``), but a frozen server still holds what comes before: a new
# connection's connect and AUTH (the socket timeouts), a checkout from a pool its stuck reads hold.
_l2_reads = ThreadPoolExecutor(max_workers=16, thread_name_prefix="featuredao-l2-read")


class RedisKeyValue(KeyValueStore):
    """The cache tier's operations on a Redis source's own pool, plus pub/sub for invalidation.

    On a cluster, reads, writes and deletes go through the source's :class:`ClusterRouter`: a node that
    is down costs its own keys only (they read as misses), never the whole batch.
    """

    def __init__(self, client: Callable[[], Any], cluster: bool,
                 router: Callable[[], ClusterRouter] | None = None) -> None:
        self._client = client
        self._cluster = cluster
        self._router = router

    def _pipeline(self) -> Any:
        # Without MULTI: in a cluster the pipeline is split per node, one round trip each.
        return self._client().pipeline(transaction=False)

    def _routed(self, keys: Sequence[str], commands: Commands, timeout_s: float | None,
                read: bool) -> Routed:
        assert self._router is not None
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        return self._router().execute([k.encode() for k in keys], commands, deadline=deadline, read=read)

    @staticmethod
    def _raise_failures(routed: Routed, what: str) -> None:
        if routed.failures:
            parts = "; ".join(f"{addr}: {_detail(exc)}" for addr, (exc, _) in routed.failures.items())
            first = next(iter(routed.failures.values()))[0]
            raise rexc.ClusterError(f"{what}: {len(routed.failed)} key(s) not reached ({parts})") from first

    def get_many(self, keys: Sequence[str], timeout_s: float | None = None) -> list[bytes | None]:
        if not keys:
            return []
        if self._router is not None:
            # Keys of a failed node read as misses: the view reads them from its source.
            routed = self._routed(keys, [(("GET", k),) for k in keys], timeout_s, read=True)
            return [r[0] if r is not None and not isinstance(r[0], Exception) else None
                    for r in routed.replies]
        if self._cluster:
            pipe = self._pipeline()
            for k in keys:
                pipe.get(k)
            return list(pipe.execute())
        if timeout_s is None:
            return list(self._client().mget(keys))
        deadline = Deadline.after(timeout_s)
        try:
            reading = _l2_reads.submit(self._mget, keys, deadline)
        except RuntimeError:  # the interpreter is shutting down
            return self._mget(keys, deadline)
        try:
            return reading.result(timeout=deadline.remaining())
        except FutureTimeout:
            reading.cancel()
            raise rexc.TimeoutError(f"L2 read: no answer within {timeout_s * 1000:.0f} ms") from None

    def _mget(self, keys: Sequence[str], deadline: Deadline) -> list[bytes | None]:
        """MGET on one pooled connection, its reply awaited no longer than the deadline."""
        if deadline.expired:  # queued here past its caller's deadline: nobody waits for it
            raise rexc.TimeoutError("L2 read: no time left when it could start")
        # A reply cut short drops its connection, so no later command reads this one's late reply; a
        # stale pooled socket (a restarted server) is retried once.
        return list(exchange(self._client(), [("MGET", *keys)], deadline.remaining(), 1)[0])

    def set_many(self, items: Sequence[tuple[str, bytes, float]]) -> None:
        if not items:
            return
        if self._router is not None:
            commands = [(("SET", k, v, "PX", max(1, int(ttl * 1000))),) for k, v, ttl in items]
            self._raise_failures(self._routed([k for k, _, _ in items], commands, None, read=False),
                                 "L2 write")
            return
        pipe = self._pipeline()
        for key, value, ttl_s in items:
            pipe.set(key, value, px=max(1, int(ttl_s * 1000)))
        pipe.execute()

    def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        if self._router is not None:
            self._raise_failures(self._routed(keys, [(("DEL", k),) for k in keys], None, read=False),
                                 "L2 delete")
            return
        pipe = self._pipeline()
        for key in keys:
            pipe.delete(key)
        pipe.execute()

    def publish(self, channel: str, message: bytes) -> None:
        self._client().publish(channel, message)

    def subscribe(self, channel: str, callback: Callable[[bytes], None]) -> Callable[[], None]:
        """Listen on a daemon thread that reconnects by itself, so a Redis that is down now is no error."""
        stop = threading.Event()
        ready = threading.Event()

        def listen() -> None:
            while not stop.is_set():
                pubsub = None
                try:
                    pubsub = self._client().pubsub(
                        ignore_subscribe_messages=True)
                    pubsub.subscribe(channel)
                    while not stop.is_set():
                        message = pubsub.get_message(timeout=0.2)
                        ready.set()
                        if message is not None and message.get("type") == "message":
                            callback(message["data"])
                except Exception as exc:
                    if stop.is_set():
                        break  # closing: the source's pool went away under us
                    log.warning("invalidation listener on %s: %s; reconnecting", channel,
                                _detail(exc))
                    stop.wait(1.0)
                finally:
                    if pubsub is not None:
                        pubsub.close()

        threading.Thread(target=listen, daemon=True, name=f"featuredao-sub-{channel}").start()
        ready.wait(1.0)  # usually subscribed by now; if Redis is down, go on and catch up later
        return stop.set
