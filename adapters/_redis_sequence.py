"""The Redis adapter's sequence views: one sorted set per key, scored by event time, members packed.

Layout: the key is the view's ``key_template`` (``{table}:{key}`` by default, so a Redis Cluster hashes
each user to one slot); each event is one member, a msgpack array of the event's fields in the order
``sequence.fields`` declares them, scored by its time (``time_field``, in ``time_unit``).

* **An array, not a map**: less than half the bytes of a map with field names, it unpacks straight into
  the tuple the core wants (no per-field lookup), and its order is the view's config. A field added at
  the end of ``fields`` later reads as null (its type's zero) in older members; a field dropped from the
  end is ignored; reordering or removing fields in the middle needs the keys rewritten.
* **Identical events are one member**: a sorted set holds a member once, so appending an event whose
  every field (time included) equals a stored one changes nothing. That makes appends idempotent, which
  a replayed sync pass or a retried write relies on; an event differs from another as soon as one field
  differs (a second click on the same item a second later is another member). A source whose genuinely
  repeated events must count twice needs a field telling them apart (an event id, a time in ms).
* **Reads**: per key ``ZREVRANGEBYSCORE key until since LIMIT 0 limit+1`` (``+inf`` without ``until``),
  all keys of a chunk in one pipeline: one round trip on a server; on a cluster, one pipeline per node,
  the nodes in parallel, and a node that fails fails only its keys (the table views' path,
  ``ClusterRouter.execute``). Event-type and threshold filters cannot be expressed in a score range, so
  ``sequence_filters`` is off: the core reads ``scan_len`` events per key and filters them.
* **Ties**: Redis orders members of one score by their bytes (reversed), not by the core's order (item,
  then the other fields, highest first): each key's events are sorted into that order after the read
  (in C, on nearly sorted data), and what the read must get right is which events of one time the limit
  keeps. The one event read beyond the limit shows where the limit
  cuts through events of one time: for those keys only, one more pipelined ``ZREVRANGEBYSCORE key t t``
  reads every event of that time, and the ones first in the core's order are kept, as on every store.
  Without such a cut (the usual case) a read is one round trip.
* **Writes**: per key one ``ZADD`` with all its events, then ``retain``: ``max_len`` with
  ``ZREMRANGEBYRANK key 0 -(max_len+1)`` (the newest N stay), ``max_age_s`` with ``ZREMRANGEBYSCORE`` of
  everything older than the newest time in the appended events minus ``max_age_s``. Relative to the
  events, not the clock: a backfill of old events, or a replay at a past ``request_time``, is not trimmed
  away on arrival; a late event already too old for a stored newer one stays until an append of newer
  events trims it.
  ``ttl_s`` expires a key that gets no event for that long. On a server the chunk is one ``MULTI``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import redis.exceptions as rexc

from featuredao.dao import BaseDao
from featuredao.sequence import Event, SequenceQuery, order_key
from featuredao.types import FeatureValue, Key

from ._redis_cluster import RedisClusterPaths, _Lost

log = logging.getLogger("featuredao")

_unpack = msgpack.unpackb
_pack = msgpack.packb
_BAD_MEMBER = (ValueError, TypeError, msgpack.UnpackException)
_STREAM_FROM = 32
"""Members of one key from which one streaming unpacker beats a call per member."""


class RedisSequences(RedisClusterPaths):
    """Sequence reads and appends of :class:`~.redis.RedisDao` (see the module's docstring)."""

    @functools.cached_property
    def _stored_fields(self) -> list[str]:
        """The fields of a member's array, in order: the view's ``sequence.fields``."""
        return list(self.view.sequence.fields) if self.view.sequence is not None else []

    @functools.cached_property
    def _order(self) -> Callable[[Event], Any]:
        """The core's sort key of stored events (highest first: the documented order)."""
        assert self.view.sequence is not None
        return order_key(self.view.sequence)

    # -- reads -----------------------------------------------------------------------------------------
    def _fetch_events(self, keys: list[Key], query: SequenceQuery,
                      timeout_s: float | None) -> Mapping[Key, Sequence[Event]]:
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        lost = self._reads.get(id(keys)) if self._server.is_cluster else None
        top = "+inf" if query.until is None else repr(float(query.until))
        bottom = "-inf" if query.since is None else repr(float(query.since))
        limit = query.limit
        # One event beyond the limit tells whether the limit cuts through events of one time.
        served, replies = self._ranges(keys, ("ZREVRANGEBYSCORE", top, bottom, "LIMIT", 0, limit + 1),
                                       deadline, lost)
        events = self._decode_events(served, replies)
        at = self._stored_fields.index(query.time_field)
        cut: dict[Key, Any] = {}
        for key, evs in events.items():
            if len(evs) > limit:
                t = evs[limit][at]
                if t == evs[limit - 1][at] and type(t) in (int, float):
                    cut[key] = t
                else:
                    del evs[limit:]
        if cut:
            self._settle_ties(events, cut, limit, at, deadline, lost)
        for evs in events.values():
            # Members of one score come in byte order: sorted, the answer is in the documented order
            # (values of foreign writers that do not compare stay in the store's order).
            with contextlib.suppress(TypeError):
                evs.sort(key=self._order, reverse=True)
        if query != self._stored_fields:  # the core asks for every field in the declared order
            pick = itemgetter(*map(self._stored_fields.index, query))
            return {k: [tuple(pick(e)) if len(query) > 1 else (pick(e),) for e in evs]
                    for k, evs in events.items()}
        return events

    def _settle_ties(self, events: dict[Key, list[Event]], cut: dict[Key, Any], limit: int, at: int,
                     deadline: float | None, lost: _Lost | None) -> None:
        """Where the limit cuts through events of one time, read every event of that time (one more round
        trip, for those keys only) and keep the ones first in the core's order, as every store does.

        Redis orders members of one score by their bytes, which is not the core's order."""
        keys = list(cut)
        served, replies = self._ranges(keys, ("ZREVRANGEBYSCORE",), deadline, lost,
                                       [(repr(float(t)), repr(float(t))) for t in cut.values()])
        tied = self._decode_events(served, replies)
        for key in keys:
            if key not in served:
                del events[key]  # its node failed this time: the key is in the read's lost keys
                continue
            evs = events[key]
            newer = [e for e in evs if e[at] != cut[key]]
            same = list(tied.get(key, ()))
            try:
                same.sort(key=self._order, reverse=True)
            except TypeError:  # values of foreign writers that do not compare: the store's order
                events[key] = evs[:limit]
                continue
            events[key] = (newer + same)[:limit]

    def _ranges(self, keys: list[Key], command: tuple[Any, ...], deadline: float | None, lost: _Lost | None,
                extra: list[tuple[Any, ...]] | None = None) -> tuple[list[Key], list[list[bytes]]]:
        """One read per key (``command`` with the key after its name, then ``extra`` of that key): a
        pipeline on a server; on a cluster one per node, keys of failed nodes going to ``lost`` (without
        one, failing the read). Returns the keys served and their replies."""
        name, *args = command
        rkeys = self._redis_keys(keys)
        if not self._server.is_cluster:
            client: Any = self._server.client()
            try:
                if len(rkeys) == 1:  # no pipeline object for a single key
                    return keys, [client.execute_command(name, rkeys[0], *(extra[0] if extra else ()), *args)]
                pipe = client.pipeline(transaction=False)
                for i, rk in enumerate(rkeys):
                    pipe.execute_command(name, rk, *(extra[i] if extra else ()), *args)
                return keys, pipe.execute()
            except rexc.ResponseError as exc:
                self._raise_wrongtype(exc)
                raise
        encoded = [rk.encode() for rk in rkeys]
        commands = [((name, rk, *(extra[i] if extra else ()), *args),) for i, rk in enumerate(encoded)]
        routed = self._server.router().execute(encoded, commands, deadline=deadline, read=True)
        served: list[Key] = []
        replies: list[Any] = []
        for key, reply in zip(keys, routed.replies, strict=True):
            if reply is not None:
                if isinstance(reply[0], rexc.ResponseError):
                    self._raise_wrongtype(reply[0])
                    raise reply[0]
                served.append(key)
                replies.append(reply[0])
        failures = self._failed_keys(routed, keys)
        if failures:
            self._lose(failures, lost)
        return served, replies

    def _decode_events(self, keys: list[Key], replies: list[list[bytes]]) -> dict[Key, list[Event]]:
        """Each key's members unpacked into event tuples of the stored fields (keys without events are
        left out)."""
        width = len(self._stored_fields)
        out: dict[Key, list[Event]] = {}
        for key, members in zip(keys, replies, strict=True):
            if not members:
                continue
            try:
                if len(members) >= _STREAM_FROM:
                    # One unpacker over the joined members makes the tuples in C, without a call per member.
                    unpacker = msgpack.Unpacker(use_list=False)
                    unpacker.feed(b"".join(members))
                    events: list[Event] = list(unpacker)
                    if len(events) != len(members):  # a member was not one msgpack value
                        raise ValueError("member boundaries")
                else:
                    events = list(map(tuple, map(_unpack, members)))
                # One C pass proves every member an array of the view's width (the common case).
                if len(set(map(len, events))) == 1 and len(events[0]) == width:
                    out[key] = events
                    continue
            except _BAD_MEMBER:
                pass
            out[key] = self._repair(key, members, width)
        return out

    def _repair(self, key: Key, members: list[bytes], width: int) -> list[Event]:
        """Members one by one: a shorter array (a field added since) is padded with nulls, a longer one cut;
        a member that is not a msgpack array is skipped, with a warning."""
        events: list[Event] = []
        bad = 0
        for member in members:
            try:
                value = _unpack(member)
            except _BAD_MEMBER:
                value = None
            if type(value) is not list:
                bad += 1
                continue
            events.append(tuple(value[:width]) + (None,) * (width - len(value)))
        if bad:
            log.warning("view %s key %r: %d stored event(s) are not msgpack arrays, skipped",
                        self.view.name, key, bad)
        return events

    def raw_sequence_reader(self) -> Callable[[list[Key], SequenceQuery], object] | None:
        """redis-py by hand (standalone): the same ZREVRANGEBYSCORE per key, pipelined (a direct call for
        one key), each member unpacked, one list per field, rows in key order (None: no events)."""
        if self._server.is_cluster:
            return None

        def read(keys: list[Key], query: SequenceQuery) -> object:
            fields = list(query)  # members hold every field of the view, in this order
            top = "+inf" if query.until is None else query.until
            bottom = "-inf" if query.since is None else query.since
            client = self._server.client()
            rkeys = self._redis_keys(keys)
            if len(rkeys) == 1:
                replies = [client.zrevrangebyscore(rkeys[0], top, bottom, start=0, num=query.limit)]
            else:
                pipe = client.pipeline(transaction=False)
                for rk in rkeys:
                    pipe.zrevrangebyscore(rk, top, bottom, start=0, num=query.limit)
                replies = pipe.execute()
            out: list[dict[str, list[Any]] | None] = []
            for members in replies:
                if not members:
                    out.append(None)
                    continue
                columns = zip(*[msgpack.unpackb(m) for m in members], strict=True)
                out.append(dict(zip(fields, map(list, columns), strict=True)))
            return out

        return read

    # -- writes ----------------------------------------------------------------------------------------
    def append(self, events: Iterable[tuple[Key, Mapping[str, FeatureValue]]]) -> int:
        """Like ``BaseDao.append``; on a cluster the keys of every node that answers are written, and
        :class:`~.redis.PartialWrite` lists the keys of the nodes that did not (after every chunk)."""
        if not self._server.is_cluster or self.view.sequence is None:
            return super().append(events)
        given = list(events)
        count, lost = self._collect_lost(lambda: BaseDao.append(self, given))
        if not lost.keys:
            return count
        failed = set(lost.keys)
        raise self._partial_write(lost, count, sum(1 for key, _ in given if self._norm(key) in failed))

    def _append_batch(self, events: list[tuple[Key, list[Event]]]) -> None:
        keys = [k for k, _ in events]
        rkeys = self._redis_keys(keys)
        commands = [self._event_commands(rk, added) for rk, (_, added) in zip(rkeys, events, strict=True)]
        if self._server.is_cluster:
            self._cluster_write(keys, rkeys, commands)  # WRONGTYPE and failed nodes handled there
            return
        # MULTI makes a chunk atomic on one server.
        pipe = self._server.client().pipeline(transaction=True)
        for key_commands in commands:
            for args in key_commands:
                pipe.execute_command(*args)
        try:
            pipe.execute()
        except rexc.ResponseError as exc:
            self._raise_wrongtype(exc)
            raise

    def _event_commands(self, rk: str, events: list[Event]) -> list[tuple[Any, ...]]:
        """ZADD of one key's events, then its trims and expiry (all of one key, so one slot)."""
        spec = self.view.sequence
        assert spec is not None
        at = self._stored_fields.index(spec.time_field)
        scored: list[Any] = []
        for event in events:
            scored.append(event[at])
            scored.append(_pack(event))
        commands: list[tuple[Any, ...]] = [("ZADD", rk, *scored)]
        retain = spec.retain
        if retain is not None and retain.max_age_s is not None:
            scale = 1000.0 if spec.time_unit == "ms" else 1.0
            cutoff = float(max(e[at] for e in events)) - retain.max_age_s * scale
            commands.append(("ZREMRANGEBYSCORE", rk, "-inf", f"({cutoff!r}"))
        if retain is not None and retain.max_len is not None:
            commands.append(("ZREMRANGEBYRANK", rk, 0, -(retain.max_len + 1)))
        if self.options.ttl_s:
            commands.append(("EXPIRE", rk, self.options.ttl_s))
        return commands

