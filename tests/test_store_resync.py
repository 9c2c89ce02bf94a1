"""How ``RedisStore`` reads shared state back: in bounded batches, skipping unchanged records.

Redis is the real test server; the only stand-ins are spies that count what the store does
(pipelines sent, records decoded) and then do the real thing.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from test_store import (
    COMMAND_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    PREFIX,
    STATE,
    FakeClock,
    as_hash,
    eventually,
    probe,
)

import gateway.store
from gateway.config import NodeConfig, RedisConfig
from gateway.state import AdminRecord, LiveState, LoadRecord, ProbeRecord, RedirectCounter
from gateway.store import SETTLE_S, Record, RecordKind, RedisStore, encode_record


def nodes_named(*names: str) -> tuple[NodeConfig, ...]:
    return tuple(NodeConfig(id=name, base_url=f"https://{name}.example") for name in names)


class MakeStore(Protocol):
    def __call__(
        self, url: str, nodes: Sequence[NodeConfig], *, clock: Callable[[], float] = ...
    ) -> Awaitable[RedisStore]: ...


@pytest.fixture
async def make_store() -> AsyncIterator[MakeStore]:
    """Started ``RedisStore``s that are closed after the test."""
    made: list[RedisStore] = []

    async def make(
        url: str, nodes: Sequence[NodeConfig], *, clock: Callable[[], float] = time.time
    ) -> RedisStore:
        config = RedisConfig(
            url=url,
            key_prefix=PREFIX,
            connect_timeout_s=CONNECT_TIMEOUT_S,
            command_timeout_s=COMMAND_TIMEOUT_S,
        )
        live = LiveState(nodes, vantage="v1", probing=True)
        store = RedisStore(
            live, RedirectCounter(), config, STATE, nodes, instance_id="reader", clock=clock
        )
        made.append(store)
        await store.start()
        return store

    yield make
    for store in reversed(made):
        await store.close()


@pytest.fixture
async def direct(redis_url: str) -> AsyncIterator[Redis]:
    """A plain client on the shared test server, to write keys behind the store's back."""
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, str]]:
    """How often the store decoded a record, per (kind, node id)."""
    counts: Counter[tuple[str, str]] = Counter()
    decode = gateway.store.decode_record

    def counting(kind: RecordKind, fields: Mapping[str, str]) -> Record:
        counts[kind, fields.get("node_id", "")] += 1
        return decode(kind, fields)

    monkeypatch.setattr(gateway.store, "decode_record", counting)
    return counts


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
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.store")
    batch = 100
    monkeypatch.setattr(gateway.store, "RESYNC_BATCH", batch)
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

    sent: list[tuple[int, int]] = []
    execute = Pipeline.execute

    async def spying(pipe: Pipeline, raise_on_error: bool = True) -> list[Any]:
        # How many commands go out, and how many records were decoded before they did.
        sent.append((len(pipe), decoded.total()))
        return await execute(pipe, raise_on_error)

    monkeypatch.setattr(Pipeline, "execute", spying)
    store = await make_store(redis_url, nodes)
    live = store.live

    assert store.degraded_reason is None
    assert [size for size, _ in sent] == [batch] * 36
    progress = [done for _, done in sent]
    assert progress == sorted(set(progress)), "each batch decoded before the next was sent"
    assert decoded.total() == 3 * len(nodes) - 1, "all but the wrong-type key"
    for node, stored_probe, stored_load in zip(nodes, probes, loads, strict=True):
        expected_probe = () if node.id == malformed else (stored_probe,)
        assert live.probe_records(node.id) == expected_probe
        assert live.load_record(node.id) == (None if node.id == wrong_type else stored_load)
        assert live.admin_mode(node.id) == "draining"
    assert f"skipping stored load of {wrong_type}: not a hash" in caplog.text
    assert f"skipping stored probe of {malformed}: field 'checked_at'" in caplog.text


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
    monkeypatch.setattr(gateway.store, "RESYNC_BATCH", 2)
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
