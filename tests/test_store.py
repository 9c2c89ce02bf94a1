"""The shared-state stores, with Redis always a real redis-server on loopback.

Two ``RedisStore`` instances with separate ``LiveState``s in one process stand for two gateway
instances. Outages are real: the ``private_redis`` server is stopped, paused or restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis_server import RedisServer
from store_fixtures import (
    COMMAND_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    PREFIX,
    STATE,
    FakeClock,
    as_hash,
    eventually,
    new_store,
    probe,
)

from gateway.config import Capacity, NodeConfig, RedisConfig, StateConfig
from gateway.state.live import AdminRecord, LiveState, LoadRecord, ProbeRecord, RedirectCounter
from gateway.state.store import (
    SETTLE_S,
    BadRecord,
    InProcessStore,
    RecordKind,
    RedisStore,
    StoreUnavailable,
    decode_record,
    encode_record,
)

#: The longest a store call may take against a dead or hung Redis, with scheduling margin.
CALL_BOUND_S = CONNECT_TIMEOUT_S + 2 * COMMAND_TIMEOUT_S + 0.3
NODES = (
    NodeConfig(id="a", base_url="https://a.example", capacity=Capacity(connections=100)),
    NodeConfig(id="b", base_url="https://b.example", load_url="https://b.example/load"),
)
NODE_C = NodeConfig(id="c", base_url="https://c.example")


class MakeStore(Protocol):
    def __call__(
        self,
        url: str,
        name: str,
        *,
        nodes: Sequence[NodeConfig] = NODES,
        clock: Callable[[], float] = time.time,
    ) -> Awaitable[RedisStore]: ...


@pytest.fixture
async def make_store() -> AsyncIterator[MakeStore]:
    """Started ``RedisStore``s (instance id = name) that are closed after the test."""
    made: list[RedisStore] = []

    async def make(
        url: str,
        name: str,
        *,
        nodes: Sequence[NodeConfig] = NODES,
        clock: Callable[[], float] = time.time,
    ) -> RedisStore:
        store = new_store(url, nodes, name, clock=clock)
        made.append(store)
        await store.start()
        return store

    yield make
    for store in reversed(made):
        await store.close()


# --------------------------------------------------------------------------- records


FINITE = st.floats(allow_nan=False, allow_infinity=False)
NAMES = st.text(st.characters(codec="utf-8"), min_size=1)
RECORDS = st.one_of(
    st.builds(
        ProbeRecord,
        node_id=NAMES,
        vantage=NAMES,
        up=st.booleans(),
        reason=st.text(st.characters(codec="utf-8")),
        latency_ms=st.none() | FINITE,
        checked_at=FINITE,
        last_ok_at=st.none() | FINITE,
    ),
    st.builds(
        LoadRecord,
        node_id=NAMES,
        source=st.sampled_from(["status-json", "prometheus", "redirects"]),
        active_connections=st.none() | FINITE,
        egress_mbps=st.none() | FINITE,
        capacity_connections=st.none() | FINITE,
        capacity_mbps=st.none() | FINITE,
        measured_at=FINITE,
    ),
    st.builds(
        AdminRecord,
        node_id=NAMES,
        mode=st.sampled_from(["active", "draining", "disabled"]),
        changed_at=FINITE,
    ),
)


@given(RECORDS)
def test_records_survive_encoding(record: ProbeRecord | LoadRecord | AdminRecord) -> None:
    kind, fields = encode_record(record)
    assert decode_record(kind, fields) == record


@given(st.sampled_from(["probe", "load", "admin"]), st.dictionaries(st.text(), st.text()))
def test_decoding_garbage_raises_only_bad_record(kind: RecordKind, fields: dict[str, str]) -> None:
    with contextlib.suppress(BadRecord):
        decode_record(kind, fields)


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("probe", {"checked_at": "yesterday"}, "not a number"),
        ("probe", {"latency_ms": "nan"}, "not finite"),
        ("probe", {"up": "true"}, "not 0 or 1"),
        ("probe", {"node_id": ""}, "empty field"),
        ("load", {"source": "guess"}, "not one of"),
        ("admin", {"mode": "off"}, "not one of"),
        ("admin", {"changed_at": None}, "missing field 'changed_at'"),
    ],
)
def test_bad_fields_are_named(
    kind: RecordKind, change: dict[str, str | None], message: str
) -> None:
    records: dict[str, ProbeRecord | LoadRecord | AdminRecord] = {
        "probe": probe(),
        "load": LoadRecord("a", "status-json", active_connections=3.0),
        "admin": AdminRecord("a", "draining"),
    }
    _, fields = encode_record(records[kind])
    for name, value in change.items():
        if value is None:
            del fields[name]
        else:
            fields[name] = value
    with pytest.raises(BadRecord, match=message):
        decode_record(kind, fields)


# --------------------------------------------------------------------------- sharing


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (None, "neither redis.url nor redis.sentinel is set; use InProcessStore"),
        ("redis://127.0.0.1:notaport", "redis.url: Port could not be cast"),
    ],
)
def test_unusable_redis_urls_are_refused_at_once(url: str | None, message: str) -> None:
    live = LiveState(NODES, vantage="v1", probing=True)
    with pytest.raises(ValueError, match=message):
        RedisStore(live, RedirectCounter(), RedisConfig(url=url), STATE, NODES)


async def test_records_reach_redis_and_the_other_instance(
    make_store: MakeStore, redis_url: str, direct: Redis
) -> None:
    a = await make_store(redis_url, "a")
    b = await make_store(redis_url, "b")
    assert a.degraded_reason is None
    assert b.degraded_reason is None

    down = probe(up=False)
    await a.publish_probe(down)
    assert not a.live.statuses["a"].up, "applied locally before anything is shared"
    load = LoadRecord("b", "status-json", active_connections=40.0, capacity_connections=80.0)
    await a.publish_load(load)
    admin = AdminRecord("a", "draining", changed_at=1000.0)
    await a.set_admin(admin)

    await eventually(lambda: b.live.probe_records("a") == (down,), "probe record on b")
    await eventually(lambda: b.live.load_record("b") == load, "load record on b")
    await eventually(lambda: b.live.admin_mode("a") == "draining", "admin mode on b")
    assert b.live.statuses["b"].load == 0.5

    assert await direct.hgetall(f"{PREFIX}probe:v1:a") == encode_record(down)[1]
    assert await direct.hgetall(f"{PREFIX}load:b") == encode_record(load)[1]
    assert await direct.hgetall(f"{PREFIX}admin:a") == encode_record(admin)[1]
    assert 0 < await direct.ttl(f"{PREFIX}probe:v1:a") <= 300
    assert 0 < await direct.ttl(f"{PREFIX}load:b") <= 300
    assert await direct.ttl(f"{PREFIX}admin:a") == -1, "admin decisions do not expire"


async def test_an_instance_started_later_starts_on_the_shared_view(
    make_store: MakeStore, redis_url: str
) -> None:
    a = await make_store(redis_url, "a")
    records = [probe(up=False), probe("b", "v2", at=900.0)]
    for record in records:
        await a.publish_probe(record)
    await a.publish_load(LoadRecord("a", "prometheus", active_connections=25.0))
    await a.set_admin(AdminRecord("b", "disabled", changed_at=5.0))

    late = await make_store(redis_url, "late")

    assert late.live.probe_records("a") == (records[0],)
    assert late.live.probe_records("b") == (records[1],)
    assert late.live.statuses["a"].load == 0.25
    assert late.live.statuses["b"].disabled


async def test_reconfigure_fetches_the_shared_state_of_new_nodes(
    make_store: MakeStore, redis_url: str
) -> None:
    writer = await make_store(redis_url, "writer", nodes=(*NODES, NODE_C))
    reader = await make_store(redis_url, "reader")
    await writer.set_admin(AdminRecord("c", "draining", changed_at=1.0))
    # Events arrive in order: once a later one for node a is applied, the one for c reached
    # the reader too, which had no node c to apply it to.
    await writer.set_admin(AdminRecord("a", "draining", changed_at=2.0))
    await eventually(lambda: reader.live.admin_mode("a") == "draining", "the later event on reader")
    assert "c" not in reader.live.statuses

    reader.reconfigure((*NODES, NODE_C))

    await eventually(lambda: reader.live.admin_mode("c") == "draining", "node c resynced", 2.0)


async def test_a_dropped_subscription_is_made_good_by_a_resync(
    make_store: MakeStore, redis_url: str, direct: Redis
) -> None:
    a = await make_store(redis_url, "a")
    missed = probe(up=False, at=2000.0)
    # Written behind the store's back (no event): only a resync can bring it.
    await direct.hset(f"{PREFIX}probe:v1:a", mapping=as_hash(missed))
    await direct.sadd(f"{PREFIX}vantages", "v1")

    await direct.client_kill_filter(_type="pubsub")

    await eventually(lambda: a.live.probe_records("a") == (missed,), "resync after reconnect")
    await eventually(lambda: a.degraded_reason is None, "healthy again")


async def test_garbage_in_redis_is_skipped(
    make_store: MakeStore, redis_url: str, direct: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.store")
    good_admin = AdminRecord("b", "draining", changed_at=3.0)
    await direct.sadd(f"{PREFIX}vantages", "v1", "v9")
    await direct.hset(f"{PREFIX}probe:v1:a", mapping={"node_id": "a", "up": "1"})
    await direct.hset(f"{PREFIX}probe:v9:a", mapping=as_hash(probe()))  # wrong key
    await direct.set(f"{PREFIX}load:a", "not a hash")
    await direct.hset(
        f"{PREFIX}admin:a", mapping={"node_id": "a", "mode": "off", "changed_at": "1"}
    )
    await direct.hset(f"{PREFIX}admin:b", mapping=as_hash(good_admin))
    await direct.hset(f"{PREFIX}load:b", mapping={b"node_id": b"\xff\xfe"})  # not UTF-8

    a = await make_store(redis_url, "a")

    assert a.degraded_reason is None
    assert a.live.probe_records("a") == ()
    assert a.live.load_record("a") is None
    assert a.live.load_record("b") is None
    assert a.live.admin_mode("a") == "active"
    assert a.live.admin_mode("b") == "draining"
    assert "skipping stored probe of a: missing field" in caplog.text
    assert "record names another node or vantage" in caplog.text
    assert "skipping stored load of a: not a hash" in caplog.text
    assert "skipping stored load of b: fields are not UTF-8" in caplog.text

    good = probe(up=False, at=3000.0)
    for event in (
        b"not json",
        b'{"from": "x", "kind": "probe"}',
        b'{"from": "x", "kind": "gossip", "fields": {}}',
        b'{"from": "x", "kind": "probe", "fields": {"node_id": 7}}',
        b'{"from": "x", "kind": "probe", "fields": {"node_id": "a"}}',
        b"[]",
    ):
        await direct.publish(f"{PREFIX}events", event)
    good_event = {"from": "x", "kind": "probe", "fields": encode_record(good)[1]}
    await direct.publish(f"{PREFIX}events", json.dumps(good_event))

    await eventually(lambda: a.live.probe_records("a") == (good,), "the good event after garbage")
    assert a.degraded_reason is None


# --------------------------------------------------------------------------- prober lock


async def test_prober_lock_has_one_owner(make_store: MakeStore, redis_url: str) -> None:
    a = await make_store(redis_url, "a")
    b = await make_store(redis_url, "b")

    assert await a.try_acquire_prober_lock("v1", 5.0)
    assert not await b.try_acquire_prober_lock("v1", 5.0)
    assert await b.try_acquire_prober_lock("v2", 5.0), "one lock per vantage"
    assert await a.try_acquire_prober_lock("v1", 5.0), "the owner renews"

    await b.release_prober_lock("v1")
    assert not await b.try_acquire_prober_lock("v1", 5.0), "only the owner releases"
    await a.release_prober_lock("v1")
    assert await b.try_acquire_prober_lock("v1", 5.0)
    assert not await a.try_acquire_prober_lock("v1", 5.0)


async def test_prober_lock_lapses_unless_renewed(make_store: MakeStore, redis_url: str) -> None:
    a = await make_store(redis_url, "a")
    b = await make_store(redis_url, "b")

    assert await a.try_acquire_prober_lock("v1", 0.3)
    for _ in range(4):  # 0.6 s in all, twice the ttl
        await asyncio.sleep(0.15)
        assert await a.try_acquire_prober_lock("v1", 0.3)
        assert not await b.try_acquire_prober_lock("v1", 0.3)

    await asyncio.sleep(0.4)  # a stopped renewing: gone, as if a had died
    assert await b.try_acquire_prober_lock("v1", 0.3)
    assert not await a.try_acquire_prober_lock("v1", 0.3)


# --------------------------------------------------------------------------- redirect load


async def test_redirects_of_all_instances_make_one_load_estimate(
    make_store: MakeStore, redis_url: str, direct: Redis
) -> None:
    clock = FakeClock(1000.2)  # window 1000 of STATE's 1 s windows
    a = await make_store(redis_url, "a", clock=clock)
    b = await make_store(redis_url, "b", clock=clock)
    for _ in range(3):
        a.redirects.count("a")
    for _ in range(2):
        b.redirects.count("a")
    b.redirects.count("b")

    async def total(node: str) -> int:
        return int(await direct.get(f"{PREFIX}redirects:1000:{node}") or 0)

    deadline = time.monotonic() + 3.0
    while await total("a") != 5:
        assert time.monotonic() < deadline, "both instances pushed their counts"
        await asyncio.sleep(0.05)
    assert await total("b") == 1
    assert 0 < await direct.pttl(f"{PREFIX}redirects:1000:a") <= 3000

    clock.now = 1001.0 + SETTLE_S  # window 1000 closed, and every instance has pushed its part

    expected = LoadRecord("a", "redirects", active_connections=5 / 1.0 * 10.0, measured_at=1001.0)
    await eventually(lambda: a.live.load_record("a") == expected, "estimate on a")
    await eventually(lambda: b.live.load_record("a") == expected, "estimate on b")
    assert a.live.statuses["a"].load == 0.5
    assert a.live.load_record("b") is None, "a node that publishes its load gets no estimate"
    assert b.live.load_record("b") is None
    assert a.redirects.current == {}, "the local window turned over too"

    # A later window's total enters smoothed: 5 + 0.3 * (15 - 5) redirects, on both instances.
    window = int(clock.now)  # where the clock stands now, past window 1000 and its settling
    for _ in range(15):
        a.redirects.count("a")
    deadline = time.monotonic() + 3.0
    while int(await direct.get(f"{PREFIX}redirects:{window}:a") or 0) != 15:
        assert time.monotonic() < deadline, "a pushed its counts of the current window"
        await asyncio.sleep(0.05)
    clock.now = window + 1.0 + SETTLE_S
    smoothed = LoadRecord(
        "a", "redirects", active_connections=pytest.approx(80.0), measured_at=window + 1.0
    )
    await eventually(lambda: a.live.load_record("a") == smoothed, "smoothed estimate on a")
    await eventually(lambda: b.live.load_record("a") == smoothed, "smoothed estimate on b")


async def test_close_pushes_the_last_counts(
    make_store: MakeStore, redis_url: str, direct: Redis
) -> None:
    a = await make_store(redis_url, "a", clock=FakeClock(500.5))
    a.redirects.count("a")
    await a.close()
    assert await direct.get(f"{PREFIX}redirects:500:a") == "1"


# --------------------------------------------------------------------------- outages


async def test_redis_outage_degrades_and_recovers(
    private_redis: RedisServer, make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.store")
    a = await make_store(private_redis.url, "a")
    b = await make_store(private_redis.url, "b")

    await asyncio.to_thread(private_redis.stop)

    await eventually(lambda: a.degraded_reason is not None, "a notices")
    assert a.degraded_reason is not None
    assert a.degraded_reason.startswith("redis unreachable since ")
    started = time.monotonic()
    await a.publish_probe(probe(up=False, at=1100.0))
    assert time.monotonic() - started < CALL_BOUND_S
    assert not a.live.statuses["a"].up
    with pytest.raises(StoreUnavailable, match="holds on this instance only"):
        await a.set_admin(AdminRecord("a", "disabled", changed_at=1100.0))
    assert a.live.statuses["a"].disabled
    assert await a.try_acquire_prober_lock("v1", 5.0), "during an outage everyone probes"
    assert await b.try_acquire_prober_lock("v1", 5.0)
    await asyncio.sleep(0.5)  # a few failed reconnects, which must not log again

    await asyncio.to_thread(private_redis.start)

    await eventually(lambda: a.degraded_reason is None, "a recovers", 6.0)
    await eventually(lambda: b.degraded_reason is None, "b recovers", 6.0)
    fresh = probe("b", "v2", at=1200.0)
    await b.publish_probe(fresh)
    await eventually(lambda: a.live.probe_records("b") == (fresh,), "b's record reaches a")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, "one warning per instance and outage"
    recoveries = [r for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(recoveries) == 2


async def test_a_hung_redis_costs_one_command_timeout(
    private_redis: RedisServer, make_store: MakeStore
) -> None:
    a = await make_store(private_redis.url, "a")

    private_redis.pause()
    started = time.monotonic()
    await a.publish_probe(probe(up=False, at=1100.0))
    assert time.monotonic() - started < CALL_BOUND_S
    assert a.degraded_reason is not None
    assert "Timeout" in a.degraded_reason
    started = time.monotonic()
    await a.publish_load(LoadRecord("a", "status-json", active_connections=1.0))
    assert time.monotonic() - started < 0.05, "once degraded, writes skip Redis"
    assert not a.live.statuses["a"].up

    private_redis.resume()
    await eventually(lambda: a.degraded_reason is None, "a recovers", 6.0)


async def test_start_with_redis_down_returns_at_once_and_recovers(
    private_redis: RedisServer, make_store: MakeStore
) -> None:
    await asyncio.to_thread(private_redis.stop)

    started = time.monotonic()
    a = await make_store(private_redis.url, "a")
    assert time.monotonic() - started < CALL_BOUND_S
    assert a.degraded_reason is not None
    assert "ConnectionError" in a.degraded_reason
    await a.publish_probe(probe(up=False))
    assert not a.live.statuses["a"].up

    await asyncio.to_thread(private_redis.start)
    await eventually(lambda: a.degraded_reason is None, "a connects", 6.0)
    await a.set_admin(AdminRecord("a", "draining"))


# --------------------------------------------------------------------------- in process


async def test_in_process_store_applies_locally_and_estimates_load() -> None:
    live = LiveState(NODES, vantage="v1", probing=True)
    redirects = RedirectCounter()
    state = StateConfig(redirect_window_s=0.2, estimated_download_s=10.0)
    store = InProcessStore(live, redirects, state, NODES, clock=FakeClock(7000.0))
    await store.start()
    try:
        assert store.degraded_reason is None
        await store.publish_probe(probe(up=False))
        await store.set_admin(AdminRecord("b", "draining"))
        assert not live.statuses["a"].up
        assert live.statuses["b"].draining
        assert await store.try_acquire_prober_lock("v1", 1.0)
        assert await store.try_acquire_prober_lock("v1", 1.0)
        await store.release_prober_lock("v1")
        for _ in range(3):
            redirects.count("a")
        redirects.count("b")

        expected = LoadRecord(
            "a", "redirects", active_connections=3 / 0.2 * 10.0, measured_at=7000.0
        )
        await eventually(lambda: live.load_record("a") == expected, "estimate for a", 1.0)
        assert live.load_record("b") is None
        assert redirects.current == {}

        store.reconfigure((*NODES, NODE_C))
        await eventually(lambda: live.load_record("c") is not None, "estimate for new node c", 1.0)
    finally:
        await store.close()
