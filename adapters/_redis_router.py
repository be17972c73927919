"""The Redis adapter's key routing on a Redis Cluster.

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
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from itertools import count
from typing import Any

import redis.exceptions as rexc
from redis.crc import key_slot

from featuredao.config import CircuitBreakerConfig
from featuredao.errors import BackendTimeout, CircuitOpen, Closed, Overloaded

from ._redis_codecs import _detail
from ._redis_slots import NodeBreaker, Routed, SlotMap

log = logging.getLogger("featuredao")

_MARGIN_S = 0.001
"""A read stops waiting for late nodes this long before its deadline, so the rows of the others are
assembled and returned within it."""

_NODE_DOWN = (rexc.ConnectionError, rexc.TimeoutError, TimeoutError, OSError)
"""Call failures that say the node is not serving (MaxConnectionsError, our own pool, is excluded)."""
_REPLY_FAILURES = (rexc.ClusterDownError, rexc.TryAgainError, rexc.ReadOnlyError)
"""Error replies that fail a key without saying anything about the node's health (it answered)."""

Commands = Sequence[Sequence[tuple[Any, ...]]]
"""Per item (key): the commands that serve it, each one the arguments of ``execute_command``."""


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


