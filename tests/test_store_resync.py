"""How ``RedisStore`` reads shared state back: in bounded batches, skipping unchanged records.

Redis is the real test server; the only stand-ins are spies that count what the store does
(script calls, records decoded) and then do the real thing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import pytest
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.typing import EncodableT, KeyT
from store_fixtures import (
    PREFIX,
    STATE,
    FakeClock,
    as_hash,
    eventually,
    new_store,
    probe,
)

import gateway.state.store
from gateway.config import NodeConfig, ProbingConfig, StateConfig
from gateway.state.live import (
    AdminMode,
    AdminRecord,
    LoadRecord,
    ProbeRecord,
)
from gateway.state.probe import Prober
from gateway.state.store import SETTLE_S, Record, RecordKind, RedisStore, encode_record


def nodes_named(*names: str) -> tuple[NodeConfig, ...]:
    return tuple(NodeConfig(id=name, base_url=f"https://{name}.example") for name in names)


class MakeStore(Protocol):
    def __call__(
        self,
        url: str,
        nodes: Sequence[NodeConfig],
        *,
        clock: Callable[[], float] = ...,
        state: StateConfig = ...,
        name: str = ...,
    ) -> Awaitable[RedisStore]: ...


@pytest.fixture
async def make_store() -> AsyncIterator[MakeStore]:
    """Started ``RedisStore``s that are closed after the test."""
    made: list[RedisStore] = []

    async def make(
        url: str,
        nodes: Sequence[NodeConfig],
        *,
        clock: Callable[[], float] = time.time,
        state: StateConfig = STATE,
        name: str = "reader",
    ) -> RedisStore:
        store = new_store(url, nodes, name, clock=clock, state=state)
        made.append(store)
        await store.start()
        return store

    yield make
    for store in reversed(made):
        await store.close()


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, str]]:
    """How often the store decoded a record, per (kind, node id)."""
    counts: Counter[tuple[str, str]] = Counter()
    decode = gateway.state.store.decode_record

    def counting(kind: RecordKind, fields: Mapping[str, str]) -> Record:
        counts[kind, fields.get("node_id", "")] += 1
        return decode(kind, fields)

    monkeypatch.setattr(gateway.state.store, "decode_record", counting)
    return counts


@pytest.fixture
def script_calls(
    monkeypatch: pytest.MonkeyPatch, decoded: Counter[tuple[str, str]]
) -> list[tuple[int, int]]:
    """Per Lua script call: how many keys it was given, and how many records were decoded before
    it went out. The tests using it run no prober, so every call is a resync batch."""
    calls: list[tuple[int, int]] = []
    call = AsyncScript.__call__

    async def spying(
        script: AsyncScript,
        keys: Sequence[KeyT] | None = None,
        args: Iterable[EncodableT] | None = None,
        client: Any = None,
    ) -> Any:
        calls.append((len(keys or ()), decoded.total()))
        return await call(script, keys, args, client)

    monkeypatch.setattr(AsyncScript, "__call__", spying)
    return calls


async def write(direct: Redis, *records: Record) -> None:
    """Store records the way instances do, but without an event: only a resync finds them."""
    pipe = direct.pipeline(transaction=False)
    for record in records:
        if isinstance(record, ProbeRecord):
            pipe.sadd(f"{PREFIX}vantages", record.vantage)
            key = f"{PREFIX}probe:{record.vantage}:{record.node_id}"
        else:
            key = f"{PREFIX}{encode_record(record)[0]}:{record.node_id}"
        pipe.hset(key, mapping=as_hash(record))
    await pipe.execute()


async def announce(direct: Redis, record: Record) -> None:
    """An event from another instance, without the Redis write that normally goes with it."""
    kind, fields = encode_record(record)
    event = {"from": "elsewhere", "kind": kind, "fields": fields}
    await direct.publish(f"{PREFIX}events", json.dumps(event))


async def test_a_resync_reads_in_batches_and_applies_each_before_the_next(
    make_store: MakeStore,
    redis_url: str,
    direct: Redis,
    decoded: Counter[tuple[str, str]],
    script_calls: list[tuple[int, int]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.store")
    batch = 100
    monkeypatch.setattr(gateway.state.store, "RESYNC_BATCH", batch)
    nodes = nodes_named(*(f"n{i:04d}" for i in range(1200)))
    # Keys go out per node as probe, load, admin: 3,600 keys, 36 batches. Batch 18 holds the
    # keys of nodes 600 to 633, among them a wrong-type key and a malformed hash.
    wrong_type, malformed = "n0610", "n0620"
    probes = [probe(node.id, at=1000.0 + i) for i, node in enumerate(nodes)]
    loads = [LoadRecord(node.id, "status-json", active_connections=1.0) for node in nodes]
    admins = [AdminRecord(node.id, "draining", changed_at=1.0) for node in nodes]
    await write(direct, *probes, *loads, *admins)
    await direct.set(f"{PREFIX}load:{wrong_type}", "not a hash")
    await direct.hset(f"{PREFIX}probe:v1:{malformed}", "checked_at", "yesterday")
    await direct.config_resetstat()

    store = await make_store(redis_url, nodes)
    live = store.live

    assert store.degraded_reason is None
    assert [size for size, _ in script_calls] == [batch] * 36
    progress = [done for _, done in script_calls]
    assert progress == sorted(set(progress)), "each batch decoded before the next was sent"
    # Redis saw one command per batch, plus a NOSCRIPT answer if it had not cached the script.
    commands = await direct.info("commandstats")
    errors = await direct.info("errorstats")
    noscript = errors.get("errorstat_NOSCRIPT", {"count": 0})["count"]
    assert commands["cmdstat_evalsha"]["calls"] - noscript == 36
    assert "cmdstat_eval" not in commands
    assert decoded.total() == 3 * len(nodes) - 1, "all but the wrong-type key"
    for node, stored_probe, stored_load in zip(nodes, probes, loads, strict=True):
        expected_probe = () if node.id == malformed else (stored_probe,)
        assert live.probe_records(node.id) == expected_probe
        assert live.load_record(node.id) == (None if node.id == wrong_type else stored_load)
        assert live.admin_mode(node.id) == "draining"
    assert f"skipping stored load of {wrong_type}: not a hash" in caplog.text
    assert f"skipping stored probe of {malformed}: field 'checked_at'" in caplog.text


async def test_every_record_of_a_multi_batch_resync_lands_in_its_own_slot(
    make_store: MakeStore,
    redis_url: str,
    direct: Redis,
    script_calls: list[tuple[int, int]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.store")
    monkeypatch.setattr(gateway.state.store, "RESYNC_BATCH", 7)
    nodes = nodes_named(*(f"n{i:03d}" for i in range(250)))
    vantages = ("v1", "v2")
    # All records differ, so one applied to another node, kind or vantage than its key's shows.
    probes = {
        (node.id, vantage): probe(node.id, vantage, up=i % 2 == 0, at=1000.0 + i + v / 2)
        for i, node in enumerate(nodes)
        for v, vantage in enumerate(vantages)
    }
    loads = {
        node.id: LoadRecord(node.id, "prometheus", active_connections=float(i), measured_at=i)
        for i, node in enumerate(nodes)
        if i % 5  # every fifth node has no load key: an empty reply in its slot
    }
    modes: tuple[AdminMode, ...] = ("active", "draining", "disabled")
    admins = [AdminRecord(node.id, modes[i % 3], changed_at=i) for i, node in enumerate(nodes)]
    await write(direct, *probes.values(), *loads.values(), *admins)
    # Records under keys that are not theirs: another node's, another vantage's.
    misfiled = {("n100", "v2"): probes["n101", "v2"], ("n102", "v1"): probes["n102", "v2"]}
    for (node_id, vantage), record in misfiled.items():
        await direct.hset(f"{PREFIX}probe:{vantage}:{node_id}", mapping=as_hash(record))

    store = await make_store(redis_url, nodes)

    # Per node two probe keys, a load key and an admin key: 1,000 keys, the last batch short.
    assert [size for size, _ in script_calls] == [7] * 142 + [6]
    for node, admin in zip(nodes, admins, strict=True):
        for vantage in vantages:
            expected = None if (node.id, vantage) in misfiled else probes[node.id, vantage]
            assert store.live.probe_record(node.id, vantage) == expected
        assert store.live.load_record(node.id) == loads.get(node.id)
        assert store.live.admin_mode(node.id) == admin.mode
    assert caplog.text.count("names another node or vantage than its key") == len(misfiled)


async def test_a_resync_loads_its_script_again_when_redis_lost_it(
    make_store: MakeStore, redis_url: str, direct: Redis
) -> None:
    # As after a Redis restart: the script cache is empty and EVALSHA answers NOSCRIPT.
    nodes = nodes_named("a", "b")
    await write(direct, AdminRecord("a", "draining", 1.0))
    store = await make_store(redis_url, nodes)
    assert store.live.admin_mode("a") == "draining"

    await direct.script_flush()
    await direct.config_resetstat()
    await write(direct, AdminRecord("b", "disabled", 1.0))  # b's admin key is read last
    store.reconfigure(nodes)
    await eventually(lambda: store.live.admin_mode("b") == "disabled", "resync done")

    assert store.degraded_reason is None
    errors = await direct.info("errorstats")
    assert errors["errorstat_NOSCRIPT"]["count"] == 1


async def test_a_resync_decodes_only_what_changed(
    make_store: MakeStore, redis_url: str, direct: Redis, decoded: Counter[tuple[str, str]]
) -> None:
    nodes = nodes_named("a", "b", "c")
    await write(
        direct,
        *(probe(node.id) for node in nodes),
        *(LoadRecord(node.id, "prometheus", active_connections=1.0) for node in nodes),
        *(AdminRecord(node.id, "draining", changed_at=1.0) for node in nodes),
    )
    store = await make_store(redis_url, nodes)
    everything = {(kind, node.id): 1 for kind in ("probe", "load", "admin") for node in nodes}
    assert decoded == everything

    newer = probe("a", up=False, at=2000.0)
    # Node c's admin key is the last a resync reads: once it shows, the resync is through.
    await write(direct, newer, AdminRecord("c", "disabled", changed_at=2.0))
    store.reconfigure(nodes)  # asks for a resync now rather than after STATE.resync_s
    await eventually(lambda: store.live.admin_mode("c") == "disabled", "second resync done")

    assert store.live.probe_records("a") == (newer,)
    assert not store.live.statuses["a"].up
    assert decoded == {**everything, ("probe", "a"): 2, ("admin", "c"): 2}


async def test_a_resync_restores_what_an_event_changed_though_redis_did_not(
    make_store: MakeStore, redis_url: str, direct: Redis
) -> None:
    # An event and the stored hash with the same timestamp: the resync has the last word, as
    # it had before unchanged hashes were skipped, so every instance ends on Redis's record.
    nodes = nodes_named("a", "b")
    stored_probe, stored_admin = probe("a", at=1000.0), AdminRecord("a", "draining", 5.0)
    await write(direct, stored_probe, stored_admin)
    store = await make_store(redis_url, nodes)
    assert store.live.statuses["a"].draining

    await announce(direct, probe("a", up=False, at=1000.0))
    await announce(direct, AdminRecord("a", "disabled", 5.0))
    await eventually(lambda: store.live.statuses["a"].disabled, "events applied")
    assert not store.live.statuses["a"].up

    await write(direct, AdminRecord("b", "disabled", 1.0))  # b's admin key is read last
    store.reconfigure(nodes)
    await eventually(lambda: store.live.admin_mode("b") == "disabled", "resync done")

    assert store.live.probe_records("a") == (stored_probe,)
    assert store.live.admin_mode("a") == "draining"


async def test_a_node_dropped_and_added_again_gets_its_stored_records_back(
    make_store: MakeStore, redis_url: str, direct: Redis
) -> None:
    nodes = nodes_named("a", "c", "d")
    await write(direct, AdminRecord("c", "active", changed_at=10.0))
    store = await make_store(redis_url, nodes)

    store.reconfigure(nodes_named("a", "d"))
    await write(direct, AdminRecord("d", "draining", 1.0))  # d's admin key is read last
    store.reconfigure(nodes)
    await eventually(lambda: store.live.admin_mode("d") == "draining", "resync done")

    # Node c holds its stored admin record again (not merely the default "active" mode): an
    # older change arriving late is refused. Events are applied in order, so once the probe
    # sent after it shows, the late admin event has been handled.
    await announce(direct, AdminRecord("c", "disabled", changed_at=5.0))
    await announce(direct, probe("a", up=False))
    await eventually(lambda: not store.live.statuses["a"].up, "events applied")
    assert store.live.admin_mode("c") == "active"


async def test_redirect_totals_are_read_in_batches(
    make_store: MakeStore,
    redis_url: str,
    direct: Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.store")
    monkeypatch.setattr(gateway.state.store, "RESYNC_BATCH", 2)
    nodes = nodes_named("a", "b", "c", "d", "e")
    clock = FakeClock(1000.5)  # window 1000 of STATE's 1 s windows
    store = await make_store(redis_url, nodes, clock=clock)
    # The totals all instances pushed; c's, in the second MGET, is garbage.
    for i, node in enumerate(nodes):
        await direct.set(f"{PREFIX}redirects:1000:{node.id}", "many" if node.id == "c" else i)
    await direct.config_resetstat()

    clock.now = 1001.0 + SETTLE_S

    def estimate(node_id: str, total: int) -> LoadRecord:
        return LoadRecord(node_id, "redirects", active_connections=total * 10.0, measured_at=1001.0)

    await eventually(lambda: store.live.load_record("e") == estimate("e", 4), "last batch read")
    for node_id, total in {"a": 0, "b": 1, "d": 3}.items():
        assert store.live.load_record(node_id) == estimate(node_id, total)
    assert store.live.load_record("c") is None
    assert "skipping redirect count b'many' of c" in caplog.text
    stats = await direct.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 3


async def test_periodic_resyncs_read_again_only_after_a_write(
    make_store: MakeStore, redis_url: str, script_calls: list[tuple[int, int]]
) -> None:
    """Every record write counts itself, so a periodic resync that finds the count where the
    last complete one left it reads nothing; the first one after a write reads everything."""
    nodes = nodes_named("a", "b")
    writer = await make_store(redis_url, nodes, name="writer")
    await writer.publish_probe(probe("a", at=1.0))
    reader = await make_store(redis_url, nodes, state=StateConfig(resync_s=0.05))
    started = len(script_calls)  # one batch each: the resyncs every connection starts with

    await asyncio.sleep(0.5)
    assert len(script_calls) == started, "nothing written: no periodic resync read"

    await writer.publish_probe(probe("a", at=2.0))
    await eventually(lambda: len(script_calls) == started + 1, "a resync after the write")
    await asyncio.sleep(0.5)
    assert len(script_calls) == started + 1
    assert reader.live.probe_records("a") == (probe("a", at=2.0),)


ATTEMPTS = 40


async def test_close_in_the_middle_of_resyncs_always_stops_the_store(
    make_store: MakeStore, redis_url: str
) -> None:
    """Closing at any moment ends every task: on Python 3.11 redis-py's sends (through
    ``asyncio.wait_for``) can swallow a cancellation that arrives as a send completes, and the
    store must still see it. With resyncs back to back, closing after a random number of event
    loop turns lands anywhere in a batch's round trip, now and then in that gap."""
    nodes = nodes_named(*(f"n{i}" for i in range(400)))
    back_to_back = StateConfig(resync_s=0.0)
    rng = random.Random(6)
    for attempt in range(ATTEMPTS):
        store = await make_store(redis_url, nodes, state=back_to_back)
        supervisor = store._supervisor
        assert supervisor is not None
        for _ in range(rng.randrange(60)):
            await asyncio.sleep(0)
        await store.close()
        if not supervisor.done():
            # Left running, it would resync on and on: stop it for good before failing.
            while not supervisor.done():
                supervisor.cancel()
                await asyncio.sleep(0.01)
            pytest.fail(f"close {attempt} left the store's supervisor running")


async def test_cancelling_a_prober_at_any_moment_stops_it(
    make_store: MakeStore, redis_url: str
) -> None:
    """The prober's lock calls go through the same sends: a cancellation they swallow must
    still end its loop. With no node to probe and rounds back to back, a round is mostly its
    lock call; each run is cancelled after a random number of event loop turns."""
    back_to_back = ProbingConfig(interval_s=0.0001)
    store = await make_store(redis_url, ())
    rng = random.Random(7)
    for attempt in range(4 * ATTEMPTS):
        task = asyncio.create_task(Prober((), back_to_back, store).run())
        for _ in range(rng.randrange(40)):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2)
        if not done:
            while not task.done():
                task.cancel()
                await asyncio.sleep(0.01)
            pytest.fail(f"cancel {attempt} left the prober running")
