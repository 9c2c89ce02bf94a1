"""Shared node state: how probe, load and admin records reach every gateway instance.

Requests only read ``LiveState``; a store keeps it current. ``InProcessStore`` serves a single
instance without Redis. ``RedisStore`` shares records between instances through Redis and never
lets Redis decide whether a request succeeds: every write is applied to the local ``LiveState``
first, Redis is only talked to from publish calls and background tasks, and when Redis is down
or slow the instance keeps routing on the view it has (``degraded_reason`` says why).

Redis layout (``{p}`` is ``redis.key_prefix``, default ``mg:``; node ids and vantages contain no
``:``, config validation guarantees it):

``{p}probe:{vantage}:{node}``
    hash, a ``ProbeRecord`` (fields as in ``encode_record``); expires after ``record_ttl_s``
    (default 300 s), so the verdict of a vantage whose probers all stopped fades out.
``{p}vantages``
    set of every vantage that published a probe record; resync reads the probe keys of each
    vantage for each configured node, so it needs no SCAN over a possibly shared keyspace.
``{p}load:{node}``
    hash, a ``LoadRecord`` published by a load poller; expires after ``record_ttl_s``.
``{p}admin:{node}``
    hash, an ``AdminRecord``; never expires (an operator's decision stands until changed).
``{p}redirects:{window}:{node}``
    integer, redirects all instances sent to the node in window
    ``floor(unix_time / state.redirect_window_s)``; expires after three windows.
``{p}lock:prober:{vantage}``
    string, the instance id of the one instance probing for that vantage (``SET NX PX``);
    renewed and released only by its owner (Lua scripts compare the value).
``{p}writes``
    integer, incremented by every record write above (in the same MULTI); a periodic resync
    is skipped while it reads what it read at the last complete one.
``{p}events``
    pub/sub channel; every record written above is also published as compact JSON
    ``{"from": instance_id, "kind": "probe"|"load"|"admin", "fields": {...}}`` inside the same
    MULTI, so receivers apply it without a round trip. Instances skip their own messages.

Records carry their own timestamps and ``LiveState`` ignores older ones, so a record arriving
twice, late, or from both a message and a resync is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Literal, Protocol, get_args

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError, ResponseError

from gateway.config import NodeConfig, RedisConfig, StateConfig
from gateway.redis_client import open_redis
from gateway.state.live import (
    FADE_INTERVAL_S,
    AdminMode,
    AdminRecord,
    LiveState,
    LoadRecord,
    LoadSource,
    ProbeRecord,
    RedirectCounter,
    SmoothedRedirects,
    estimated_connections,
)
from gateway.state.netio import stop_if_cancelled

logger = logging.getLogger("gateway.store")

Clock = Callable[[], float]
Record = ProbeRecord | LoadRecord | AdminRecord
RecordKind = Literal["probe", "load", "admin"]

#: How long shared probe and load records outlive their last write: about three generous probe
#: or load-poll intervals. Pass ``record_ttl_s`` when intervals are configured longer.
DEFAULT_RECORD_TTL_S = 300.0
#: Redirect counts are pushed this often, and Redis is pinged this often when otherwise idle;
#: each push also takes up the expected loads (``LiveState.fade_loads``), as often as the
#: memory store does that alone.
FLUSH_INTERVAL_S = FADE_INTERVAL_S
#: A closed window's shared total is read this long after the window ends: every instance
#: pushes its counts at its next flush (at most ``FLUSH_INTERVAL_S`` later) plus command time.
SETTLE_S = 2.0 * FLUSH_INTERVAL_S
REDIRECT_KEY_WINDOWS = 3
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
CLOSE_FLUSH_S = 1.0
#: Longest wait for a background task or a connection to stop at shutdown.
CLOSE_TASK_S = 2.0
#: Seconds of idleness after which redis-py PINGs a connection before using it.
HEALTH_CHECK_INTERVAL_S = 5
#: Keys per resync script call, and per redirect-count MGET. Each batch is one round trip under
#: its own timeout and is applied before the next one is sent, so the event loop serves requests
#: in between. The script blocks Redis while it runs, about 3 us a key: measured with 10,000
#: nodes (30,000 keys) on a local redis-server 7.0, 200 keys take 0.65 ms (1 ms at p99) and a
#: repeat resync costs about 150 ms of CPU here; 100 keys halve the block but cost 15% more CPU,
#: 50 keys 45% more. The 150 round trips per resync are nothing against ``state.resync_s``.
RESYNC_BATCH = 200

#: What a Redis call raises when Redis is unreachable, slow (``TimeoutError`` is an ``OSError``)
#: or refuses the command.
_REDIS_FAILURES = (RedisError, OSError)

_LOAD_SOURCES: dict[str, LoadSource] = {name: name for name in get_args(LoadSource)}
_ADMIN_MODES: dict[str, AdminMode] = {name: name for name in get_args(AdminMode)}

# KEYS[1] lock key; ARGV[1] owner id, ARGV[2] ttl in ms. The owner renews, anyone else may only
# take a free lock: one round trip, no window between the check and the write.
_ACQUIRE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
return 0
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS: the hashes to read. One reply per key, its HGETALL array; a key of another type gets
# its error reply in its slot (redis.pcall returns it where redis.call would abort the script),
# which redis-py hands over as a ResponseError, so one bad key does not cost the whole batch.
# KEYS: redirect count keys; ARGV[1] their ttl in ms, ARGV[i + 1] what to add to KEYS[i]. Atomic,
# like the MULTI it replaces; as a pipeline of INCRBY and PEXPIRE, redis-py's packing of each
# command cost a worker routing to 10,000 nodes about 2% of its time.
_ADD_COUNTS = """
for i, key in ipairs(KEYS) do
    redis.call('INCRBY', key, ARGV[i + 1])
    redis.call('PEXPIRE', key, ARGV[1])
end
return #KEYS
"""

_READ_HASHES = """
local replies = {}
for i, key in ipairs(KEYS) do
    replies[i] = redis.pcall('HGETALL', key)
end
return replies
"""


class StoreUnavailable(Exception):
    """A change could not be stored in shared state; it holds on this instance only."""


class StateStore(Protocol):
    live: LiveState
    redirects: RedirectCounter

    @property
    def degraded_reason(self) -> str | None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish_probe(self, record: ProbeRecord) -> None: ...

    async def publish_load(self, record: LoadRecord) -> None: ...

    async def set_admin(self, record: AdminRecord) -> None: ...

    async def try_acquire_prober_lock(self, vantage: str, ttl_s: float) -> bool: ...

    async def release_prober_lock(self, vantage: str) -> None: ...

    def reconfigure(self, nodes: Sequence[NodeConfig]) -> None: ...


# --------------------------------------------------------------------------- record encoding


class BadRecord(ValueError):
    """Stored or received fields that do not make a record (stale schema, garbage)."""


def _number(value: float) -> str:
    return repr(float(value))


def _optional_number(value: float | None) -> str:
    return "" if value is None else _number(value)


def encode_record(record: Record) -> tuple[RecordKind, dict[str, str]]:
    """The record as flat string fields: a Redis hash and the ``fields`` of an event message."""
    if isinstance(record, ProbeRecord):
        return "probe", {
            "node_id": record.node_id,
            "vantage": record.vantage,
            "up": "1" if record.up else "0",
            "reason": record.reason,
            "latency_ms": _optional_number(record.latency_ms),
            "checked_at": _number(record.checked_at),
            "last_ok_at": _optional_number(record.last_ok_at),
            "transport_failing": "1" if record.transport_failing else "0",
        }
    if isinstance(record, LoadRecord):
        return "load", {
            "node_id": record.node_id,
            "source": record.source,
            "active_connections": _optional_number(record.active_connections),
            "egress_mbps": _optional_number(record.egress_mbps),
            "capacity_connections": _optional_number(record.capacity_connections),
            "capacity_mbps": _optional_number(record.capacity_mbps),
            "measured_at": _number(record.measured_at),
        }
    return "admin", {
        "node_id": record.node_id,
        "mode": record.mode,
        "changed_at": _number(record.changed_at),
    }


class _Fields:
    """Typed reads from a field mapping; anything missing or malformed raises ``BadRecord``."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        self._fields = fields

    def text(self, name: str) -> str:
        try:
            return self._fields[name]
        except KeyError:
            raise BadRecord(f"missing field {name!r}") from None

    def name(self, name: str) -> str:
        value = self.text(name)
        if not value:
            raise BadRecord(f"empty field {name!r}")
        return value

    def number(self, name: str) -> float:
        text = self.text(name)
        try:
            value = float(text)
        except ValueError:
            raise BadRecord(f"field {name!r}: {text[:40]!r} is not a number") from None
        if not math.isfinite(value):
            raise BadRecord(f"field {name!r}: {text[:40]!r} is not finite")
        return value

    def optional_number(self, name: str) -> float | None:
        return None if self.text(name) == "" else self.number(name)

    def flag(self, name: str) -> bool:
        text = self.text(name)
        if text not in ("0", "1"):
            raise BadRecord(f"field {name!r}: {text[:40]!r} is not 0 or 1")
        return text == "1"

    def choice(self, name: str, allowed: Mapping[str, str]) -> str:
        text = self.text(name)
        if text not in allowed:
            raise BadRecord(f"field {name!r}: {text[:40]!r} is not one of {', '.join(allowed)}")
        return text


def decode_record(kind: RecordKind, fields: Mapping[str, str]) -> Record:
    """Inverse of ``encode_record``; raises ``BadRecord`` for anything else."""
    f = _Fields(fields)
    if kind == "probe":
        return ProbeRecord(
            node_id=f.name("node_id"),
            vantage=f.name("vantage"),
            up=f.flag("up"),
            reason=f.text("reason"),
            latency_ms=f.optional_number("latency_ms"),
            checked_at=f.number("checked_at"),
            last_ok_at=f.optional_number("last_ok_at"),
            # Absent in records written before the field existed.
            transport_failing=fields.get("transport_failing") == "1",
        )
    if kind == "load":
        return LoadRecord(
            node_id=f.name("node_id"),
            source=_LOAD_SOURCES[f.choice("source", _LOAD_SOURCES)],
            active_connections=f.optional_number("active_connections"),
            egress_mbps=f.optional_number("egress_mbps"),
            capacity_connections=f.optional_number("capacity_connections"),
            capacity_mbps=f.optional_number("capacity_mbps"),
            measured_at=f.number("measured_at"),
        )
    return AdminRecord(
        node_id=f.name("node_id"),
        mode=_ADMIN_MODES[f.choice("mode", _ADMIN_MODES)],
        changed_at=f.number("changed_at"),
    )


def _apply(live: LiveState, record: Record) -> None:
    if isinstance(record, ProbeRecord):
        live.apply_probe(record)
    elif isinstance(record, LoadRecord):
        live.apply_load(record)
    else:
        live.apply_admin(record)


def _holds(live: LiveState, record: Record) -> bool:
    """Whether ``live`` already has ``record`` in its slot, so applying it would change nothing."""
    if isinstance(record, ProbeRecord):
        return live.probe_record(record.node_id, record.vantage) == record
    if isinstance(record, LoadRecord):
        return live.load_record(record.node_id) == record
    # LiveState shows only the mode of its admin record. The mode is enough: once ``record`` was
    # applied (or refused as older) the slot only ever takes newer records, which applying
    # ``record`` again would not undo, and one with the same mode and time is ``record`` itself.
    # A node dropped from the config loses its records and its resync entries together.
    return live.admin_mode(record.node_id) == record.mode


def redirect_load(node_id: str, redirects: float, state: StateConfig, at: float) -> LoadRecord:
    """The load a node without a load URL is assumed to carry, from its redirects per window
    (``SmoothedRedirects``)."""
    return LoadRecord(
        node_id=node_id,
        source="redirects",
        active_connections=estimated_connections(
            redirects, state.redirect_window_s, state.estimated_download_s
        ),
        measured_at=at,
    )


async def _every(interval_s: float, step: Callable[[], Awaitable[None]], what: str) -> None:
    while True:
        stop_if_cancelled()
        await asyncio.sleep(interval_s)
        try:
            await step()
        except Exception:  # task boundary: one failed step must not end the periodic work
            logger.exception("state store: %s failed", what)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    # Shutdown must finish even if a connection hangs while closing.
    _, pending = await asyncio.wait([task], timeout=CLOSE_TASK_S)
    if pending:
        logger.warning(
            "state store: task %s did not stop within %g s", task.get_name(), CLOSE_TASK_S
        )


async def _close_quietly(pubsub: PubSub, client: Redis) -> None:
    """Close a connection pair without ever hanging on a server that stopped answering."""
    try:
        async with asyncio.timeout(CLOSE_TASK_S):
            await pubsub.aclose()
            await client.aclose()
    except (TimeoutError, *_REDIS_FAILURES) as exc:
        logger.debug("state store: closing a connection failed: %s", _describe(exc))


# --------------------------------------------------------------------------- in-process


class InProcessStore:
    """State for a single instance: records go straight to ``live``; nothing is shared."""

    def __init__(
        self,
        live: LiveState,
        redirects: RedirectCounter,
        state: StateConfig,
        nodes: Sequence[NodeConfig],
        *,
        clock: Clock = time.time,
    ) -> None:
        self.live = live
        self.redirects = redirects
        self._state = state
        self._smoothed = SmoothedRedirects(state.redirect_smoothing)
        self._nodes = tuple(nodes)
        self._clock = clock
        self._windows: asyncio.Task[None] | None = None
        self._fading: asyncio.Task[None] | None = None

    @property
    def degraded_reason(self) -> str | None:
        return None

    async def start(self) -> None:
        self._windows = asyncio.create_task(
            _every(self._state.redirect_window_s, self._close_window, "redirect window"),
            name="state-store-redirect-windows",
        )
        self._fading = asyncio.create_task(
            _every(FADE_INTERVAL_S, self._fade, "load fading"), name="state-store-fading"
        )

    async def close(self) -> None:
        await _cancel(self._windows)
        await _cancel(self._fading)
        self._windows = self._fading = None

    async def _fade(self) -> None:
        self.live.fade_loads()

    async def publish_probe(self, record: ProbeRecord) -> None:
        self.live.apply_probe(record)

    async def publish_load(self, record: LoadRecord) -> None:
        self.live.apply_load(record)

    async def set_admin(self, record: AdminRecord) -> None:
        """Apply and share an admin change; ``StoreUnavailable`` if Redis did not confirm it.

        After a timeout the change may still land once a slow Redis catches up; retrying the
        same change is harmless.
        """
        self.live.apply_admin(record)

    async def try_acquire_prober_lock(self, vantage: str, ttl_s: float) -> bool:
        return True

    async def release_prober_lock(self, vantage: str) -> None:
        return None

    def reconfigure(self, nodes: Sequence[NodeConfig]) -> None:
        self.live.reconfigure(nodes)
        self._nodes = tuple(nodes)
        self._smoothed.keep_only(node.id for node in nodes)

    async def _close_window(self) -> None:
        self.live.fade_loads()
        counts = self.redirects.rotate()
        now = self._clock()
        for node in self._nodes:
            if node.load_url is None:
                count = self._smoothed.add(node.id, counts.get(node.id, 0))
                self.live.apply_load(redirect_load(node.id, count, self._state, now))


# --------------------------------------------------------------------------- Redis


class _Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.vantages = f"{prefix}vantages"
        self.events = f"{prefix}events"
        self.writes = f"{prefix}writes"

    def probe(self, vantage: str, node_id: str) -> str:
        return f"{self.prefix}probe:{vantage}:{node_id}"

    def load(self, node_id: str) -> str:
        return f"{self.prefix}load:{node_id}"

    def admin(self, node_id: str) -> str:
        return f"{self.prefix}admin:{node_id}"

    def redirects(self, window: int, node_id: str) -> str:
        return f"{self.prefix}redirects:{window}:{node_id}"

    def prober_lock(self, vantage: str) -> str:
        return f"{self.prefix}lock:prober:{vantage}"


class _Reconnect(Exception):
    """A write or flush already marked the store degraded; the connection is rebuilt."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _stored_hash(reply: list[bytes] | ResponseError) -> dict[bytes, bytes] | ResponseError:
    """One key's reply from ``_READ_HASHES``: its hash, or the error Redis gave for the key."""
    if isinstance(reply, ResponseError):
        return reply
    fields_and_values = iter(reply)
    return dict(zip(fields_and_values, fields_and_values, strict=True))


def _decode_hash(raw: Mapping[bytes, bytes]) -> dict[str, str]:
    try:
        return {key.decode(): value.decode() for key, value in raw.items()}
    except UnicodeDecodeError:
        raise BadRecord("fields are not UTF-8") from None


class RedisStore:
    """State shared between instances through Redis, with a local snapshot for every request.

    A supervisor task connects, subscribes to ``{p}events``, reads everything back (resync) and
    then applies events as they come, resyncing every ``state.resync_s`` as well. A second task
    pushes redirect counts every second and turns closed windows into load estimates.

    On any Redis failure the store turns degraded: writes apply locally and skip Redis (no
    request or prober waits on a dead server), and the supervisor reconnects with jittered
    exponential backoff, resubscribes and resyncs, since events sent meanwhile are lost.
    """

    def __init__(
        self,
        live: LiveState,
        redirects: RedirectCounter,
        redis: RedisConfig,
        state: StateConfig,
        nodes: Sequence[NodeConfig],
        *,
        instance_id: str | None = None,
        clock: Clock = time.time,
        record_ttl_s: float = DEFAULT_RECORD_TTL_S,
    ) -> None:
        if not redis.enabled:
            raise ValueError(
                "neither redis.url nor redis.sentinel is set; use InProcessStore without Redis"
            )
        # Checked here because the supervisor would otherwise retry a URL that can never work.
        if redis.url is not None:
            try:
                parse_url(redis.url)
            except ValueError as exc:
                raise ValueError(f"redis.url: {exc}") from None
        self.live = live
        self.redirects = redirects
        self.instance_id = instance_id or (
            f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        )
        self._redis = redis
        self._state = state
        self._smoothed = SmoothedRedirects(state.redirect_smoothing)
        self._nodes = tuple(nodes)
        self._clock = clock
        self._record_ttl_ms = round(record_ttl_s * 1000)
        self._keys = _Keys(redis.key_prefix)
        #: Longest one Redis round trip may take: it may have to connect, health-check PING and
        #: then run its command, each bounded by the client's own timeouts.
        self._bound = redis.connect_timeout_s + 2 * redis.command_timeout_s
        self._client: Redis | None = None
        self._degraded_reason: str | None = "redis not connected yet"
        self._outage_since: float | None = None
        self._first_attempt = asyncio.Event()
        self._resync_requested = asyncio.Event()
        #: ``{p}writes`` as read before the last complete resync on the current connection.
        self._resynced_writes: bytes | str | None = None
        self._window = self._window_index(clock())
        self._closed_windows: list[int] = []
        #: Per Redis key, the hash a resync last decoded there and the record it made of it. A
        #: resync skips a key whose hash is unchanged while ``live`` still holds that record:
        #: applying it again would change nothing. Comparing with ``live`` rather than trusting
        #: these entries alone keeps that true whatever was applied meanwhile (events, local
        #: writes, estimates), so they survive reconnects. Only configured nodes' keys are kept.
        self._applied: dict[str, tuple[dict[bytes, bytes], Record]] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ public API

    @property
    def degraded_reason(self) -> str | None:
        return self._degraded_reason

    async def start(self) -> None:
        """Start syncing; waits for the first connection attempt, but only a round trip or two.

        An instance that reaches Redis starts on the shared view; one that cannot starts on
        its own and keeps reconnecting in the background.
        """
        self._supervisor = asyncio.create_task(self._supervise(), name="state-store-redis")
        self._ticker = asyncio.create_task(
            _every(FLUSH_INTERVAL_S, self._tick, "redirect flush"), name="state-store-redirects"
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._bound + self._redis.command_timeout_s):
                await self._first_attempt.wait()

    async def close(self) -> None:
        await _cancel(self._ticker)
        self._ticker = None
        client = self._healthy_client()
        counts = self.redirects.take_unflushed()
        if client is not None and counts:
            try:
                async with asyncio.timeout(CLOSE_FLUSH_S):
                    await self._push_counts(client, self._window, counts)
            except _REDIS_FAILURES as exc:
                logger.debug("state store: final redirect flush lost: %s", _describe(exc))
        await _cancel(self._supervisor)
        self._supervisor = None
        self._degraded_reason = "store closed"

    async def publish_probe(self, record: ProbeRecord) -> None:
        self.live.apply_probe(record)
        await self._share(record, self._keys.probe(record.vantage, record.node_id))

    async def publish_load(self, record: LoadRecord) -> None:
        self.live.apply_load(record)
        await self._share(record, self._keys.load(record.node_id))

    async def set_admin(self, record: AdminRecord) -> None:
        """Apply and share an admin change; ``StoreUnavailable`` if Redis did not confirm it.

        After a timeout the change may still land once a slow Redis catches up; retrying the
        same change is harmless.
        """
        self.live.apply_admin(record)
        if not await self._share(record, self._keys.admin(record.node_id)):
            raise StoreUnavailable(
                f"admin mode {record.mode!r} for node {record.node_id!r} holds on this instance "
                f"only, not stored in Redis: {self._degraded_reason}"
            )

    async def try_acquire_prober_lock(self, vantage: str, ttl_s: float) -> bool:
        """Take or renew the vantage's prober lock.

        While Redis is unreachable every instance probes for itself: no instance can tell who
        holds the lock, and an unprobed node would keep its last verdict for the whole outage.
        """
        client = self._healthy_client()
        if client is None:
            return True
        script = client.register_script(_ACQUIRE_LOCK)
        try:
            async with asyncio.timeout(self._bound):
                granted = await script(
                    keys=[self._keys.prober_lock(vantage)],
                    args=[self.instance_id, max(1, round(ttl_s * 1000))],
                )
        except _REDIS_FAILURES as exc:
            self._command_failed(client, exc)
            return True
        return bool(granted)

    async def release_prober_lock(self, vantage: str) -> None:
        client = self._healthy_client()
        if client is None:
            return
        script = client.register_script(_RELEASE_LOCK)
        try:
            async with asyncio.timeout(self._bound):
                await script(keys=[self._keys.prober_lock(vantage)], args=[self.instance_id])
        except _REDIS_FAILURES as exc:
            # The lock then lapses after its ttl, which is what release would have hastened.
            self._command_failed(client, exc)

    def reconfigure(self, nodes: Sequence[NodeConfig]) -> None:
        self.live.reconfigure(nodes)
        self._nodes = tuple(nodes)
        kept = {node.id for node in nodes}
        self._smoothed.keep_only(kept)
        self._applied = {
            key: applied for key, applied in self._applied.items() if applied[1].node_id in kept
        }
        # New nodes would otherwise wait a whole resync period for their shared state.
        self._resync_requested.set()

    # ------------------------------------------------------------------ health

    def _healthy_client(self) -> Redis | None:
        return self._client if self._degraded_reason is None else None

    def _fail(self, exc: BaseException) -> None:
        if self._outage_since is not None:
            logger.debug("state store: redis still unreachable: %s", _describe(exc))
            return
        self._outage_since = self._clock()
        since = time.strftime("%H:%M:%S", time.gmtime(self._outage_since))
        detail = _describe(exc)
        if isinstance(exc, TimeoutError) and not str(exc):  # from our own asyncio.timeout
            detail = f"TimeoutError: no answer within {self._bound:g} s"
        self._degraded_reason = f"redis unreachable since {since} UTC ({detail})"
        logger.warning(
            "state store: %s; routing on local state until it is back", self._degraded_reason
        )

    def _command_failed(self, client: Redis, exc: BaseException) -> None:
        # A command that failed on a connection the supervisor has already replaced says
        # nothing about the new one.
        if client is self._client:
            self._fail(exc)

    def _recovered(self, client: Redis) -> None:
        self._client = client
        self._degraded_reason = None
        if self._outage_since is None:
            logger.info("state store: connected to redis")
        else:
            logger.info(
                "state store: redis reachable again after %.1f s; shared state resynced",
                self._clock() - self._outage_since,
            )
        self._outage_since = None

    # ------------------------------------------------------------------ supervisor

    async def _supervise(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            stop_if_cancelled()
            # A new client each time: through Sentinel it asks where the primary is now.
            client = open_redis(self._redis, health_check_interval=HEALTH_CHECK_INTERVAL_S)
            pubsub = client.pubsub()
            try:
                await self._connect(client, pubsub)
                backoff = BACKOFF_MIN_S
                self._recovered(client)
                self._first_attempt.set()
                await self._listen(client, pubsub)
            except _Reconnect:
                pass
            except _REDIS_FAILURES as exc:
                self._fail(exc)
            except Exception as exc:  # task boundary: a bug must not end syncing for good
                logger.exception("state store: unexpected error; reconnecting")
                self._fail(exc)
            finally:
                if self._client is client:
                    self._client = None
                await _close_quietly(pubsub, client)
            self._first_attempt.set()
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _connect(self, client: Redis, pubsub: PubSub) -> None:
        async with asyncio.timeout(self._bound):
            await pubsub.subscribe(self._keys.events)
            # Only once Redis confirms the subscription is every later event sure to reach us,
            # so the resync below cannot miss a change made between its reads and the events.
            while True:
                message = await pubsub.get_message(timeout=self._redis.command_timeout_s)
                if message is not None and message["type"] == "subscribe":
                    break
        await self._resync(client)

    async def _listen(self, client: Redis, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + self._state.resync_s
        next_ping = loop.time() + FLUSH_INTERVAL_S
        while True:
            stop_if_cancelled()
            if self._degraded_reason is not None:
                raise _Reconnect
            now = loop.time()
            if self._resync_requested.is_set() or now >= next_resync:
                requested = self._resync_requested.is_set()
                self._resync_requested.clear()
                await self._resync(client, unless_unwritten=not requested)
                next_resync = now + self._state.resync_s
                next_ping = now + FLUSH_INTERVAL_S
            elif now >= next_ping:
                # A hung server keeps the subscription open but silent; the PING notices.
                async with asyncio.timeout(self._bound):
                    await client.ping()
                next_ping = now + FLUSH_INTERVAL_S
            wait = max(0.0, min(next_ping, next_resync) - loop.time())
            async with asyncio.timeout(wait + self._bound):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            if message is not None and message["type"] == "message":
                self._on_event(message["data"])

    def _on_event(self, data: bytes) -> None:
        try:
            event = json.loads(data)
            sender, kind, fields = event["from"], event["kind"], event["fields"]
            if sender == self.instance_id:
                return
            if kind not in ("probe", "load", "admin") or not isinstance(fields, dict):
                raise BadRecord(f"unknown kind {kind!r} or fields not an object")
            if not all(isinstance(value, str) for value in fields.values()):
                raise BadRecord("field values must be strings")
            record = decode_record(kind, fields)
        except (ValueError, KeyError, TypeError) as exc:
            # json.JSONDecodeError and BadRecord are ValueErrors; KeyError/TypeError: wrong shape.
            logger.debug("state store: ignoring malformed event %.200r: %s", data, exc)
            return
        _apply(self.live, record)

    async def _resync(self, client: Redis, *, unless_unwritten: bool = False) -> None:
        """Read every configured node's records back, ``RESYNC_BATCH`` keys per round trip.

        ``unless_unwritten``: not if no record was written since the last complete resync on
        this connection. Every write is also an event, so what a resync finds then is what the
        events already brought; the periodic resync guards against events lost in between.
        """
        nodes = [node.id for node in self._nodes]
        async with asyncio.timeout(self._bound):
            writes = await client.get(self._keys.writes)
        # None: no instance counts its writes here, so nothing tells whether one was made.
        if unless_unwritten and writes is not None and writes == self._resynced_writes:
            return
        self._resynced_writes = None
        async with asyncio.timeout(self._bound):
            members = await client.smembers(self._keys.vantages)
        vantages = sorted(
            member.decode(errors="replace") if isinstance(member, bytes) else member
            for member in members
        )
        # One script call per batch: as a pipeline of HGETALLs, redis-py's packing and reply
        # handling of each command took two thirds of a resync's CPU.
        read_hashes = client.register_script(_READ_HASHES)
        # Listed lazily: building all keys up front would itself hold the loop for a while.
        stored = self._stored_keys(nodes, vantages)
        while batch := list(itertools.islice(stored, RESYNC_BATCH)):
            stop_if_cancelled()
            async with asyncio.timeout(self._bound):
                replies = await read_hashes(keys=[key for key, *_ in batch], client=client)
            for (key, kind, node_id, vantage), reply in zip(batch, replies, strict=True):
                self._apply_stored(key, kind, node_id, vantage, _stored_hash(reply))
        # Read before the keys: a write during this resync makes the next one complete again.
        self._resynced_writes = writes

    def _stored_keys(
        self, nodes: Sequence[str], vantages: Sequence[str]
    ) -> Iterator[tuple[str, RecordKind, str, str]]:
        """Every Redis key of a resync, with the kind, node and vantage of its record."""
        for node_id in nodes:
            for vantage in vantages:
                yield self._keys.probe(vantage, node_id), "probe", node_id, vantage
            yield self._keys.load(node_id), "load", node_id, ""
            yield self._keys.admin(node_id), "admin", node_id, ""

    def _apply_stored(
        self,
        key: str,
        kind: RecordKind,
        node_id: str,
        vantage: str,
        raw: dict[bytes, bytes] | ResponseError,
    ) -> None:
        if not raw:
            self._applied.pop(key, None)  # expired or deleted: nothing left to compare with
            return
        applied = self._applied.get(key)
        if applied is not None and applied[0] == raw and _holds(self.live, applied[1]):
            return
        try:
            if not isinstance(raw, dict):
                raise BadRecord(f"not a hash ({raw!r})")
            record = decode_record(kind, _decode_hash(raw))
            if record.node_id != node_id or (
                isinstance(record, ProbeRecord) and record.vantage != vantage
            ):
                raise BadRecord("record names another node or vantage than its key")
        except BadRecord as exc:
            logger.debug("state store: skipping stored %s of %s: %s", kind, node_id, exc)
            return
        _apply(self.live, record)
        # A reconfigure between two batches may have dropped the node after it was listed.
        if node_id in self.live.statuses:
            self._applied[key] = (raw, record)

    # ------------------------------------------------------------------ writes

    async def _share(self, record: Record, key: str) -> bool:
        """Store and announce a record; False (and degraded) when Redis did not take it."""
        client = self._healthy_client()
        if client is None:
            return False
        kind, fields = encode_record(record)
        event = json.dumps(
            {"from": self.instance_id, "kind": kind, "fields": fields}, separators=(",", ":")
        )
        pipe = client.pipeline(transaction=True)
        pipe.hset(key, items=[part for pair in fields.items() for part in pair])
        if isinstance(record, ProbeRecord):
            pipe.sadd(self._keys.vantages, record.vantage)
        if not isinstance(record, AdminRecord):
            pipe.pexpire(key, self._record_ttl_ms)
        pipe.incr(self._keys.writes)
        pipe.publish(self._keys.events, event)
        try:
            async with asyncio.timeout(self._bound):
                await pipe.execute()
        except _REDIS_FAILURES as exc:
            self._command_failed(client, exc)
            return False
        return True

    # ------------------------------------------------------------------ redirect windows

    def _window_index(self, now: float) -> int:
        return math.floor(now / self._state.redirect_window_s)

    async def _tick(self) -> None:
        self.live.fade_loads()
        now = self._clock()
        current = self._window_index(now)
        counting = self._window
        counts = self.redirects.take_unflushed()
        client = self._healthy_client()
        pushed = False
        if counts and client is not None:
            try:
                async with asyncio.timeout(self._bound):
                    await self._push_counts(client, counting, counts)
                pushed = True
            except _REDIS_FAILURES as exc:
                self._command_failed(client, exc)
        # Counts of a window that has closed are dropped when they cannot be pushed: pushed
        # later they would all land in one window and inflate its load estimate.
        if counts and not pushed and current == counting:
            self.redirects.restore_unflushed(counts)
        if current != counting:
            self.redirects.rotate()
            self._window = current
            self._closed_windows.append(counting)
        await self._estimate_settled_window(now)

    async def _push_counts(self, client: Redis, window: int, counts: Mapping[str, int]) -> None:
        ttl_ms = round(REDIRECT_KEY_WINDOWS * self._state.redirect_window_s * 1000)
        # One call, so all the counts land or none do (those then go with the next push).
        add_counts = client.register_script(_ADD_COUNTS)
        keys = [self._keys.redirects(window, node_id) for node_id in counts]
        await add_counts(keys=keys, args=[ttl_ms, *counts.values()], client=client)

    async def _estimate_settled_window(self, now: float) -> None:
        window_s = self._state.redirect_window_s
        settled = [w for w in self._closed_windows if (w + 1) * window_s + SETTLE_S <= now]
        if not settled:
            return
        # Only the newest settled window matters: an older estimate would be superseded at once.
        window = max(settled)
        self._closed_windows = [w for w in self._closed_windows if w > window]
        client = self._healthy_client()
        nodes = [node.id for node in self._nodes if node.load_url is None]
        if client is None or not nodes:
            # During an outage this instance's own counts are only a fraction of the load;
            # the last shared estimate is the better guess.
            return
        # Every instance reads the same totals and stamps the window's end, so instances that
        # have seen the same windows apply the same record; one that joined later converges
        # as the smoothing forgets the windows it missed.
        end = (window + 1) * window_s
        for start in range(0, len(nodes), RESYNC_BATCH):
            batch = nodes[start : start + RESYNC_BATCH]
            try:
                async with asyncio.timeout(self._bound):
                    values = await client.mget([self._keys.redirects(window, n) for n in batch])
            except _REDIS_FAILURES as exc:
                self._command_failed(client, exc)
                return
            for node_id, value in zip(batch, values, strict=True):
                try:
                    total = 0 if value is None else int(value)
                except ValueError:
                    total = -1
                if total < 0:
                    logger.debug("state store: skipping redirect count %r of %s", value, node_id)
                    continue
                smoothed = self._smoothed.add(node_id, total)
                self.live.apply_load(redirect_load(node_id, smoothed, self._state, end))
