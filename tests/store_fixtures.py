"""Shared-state store helpers: ``RedisStore``s on the test server's keys, records, a clock the
test moves by hand, and waiting for what other instances will see."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from redis.typing import EncodableT, FieldT

from gateway.config import NodeConfig, RedisConfig, StateConfig
from gateway.state.live import AdminRecord, LiveState, LoadRecord, ProbeRecord, RedirectCounter
from gateway.state.store import RedisStore, encode_record

PREFIX = "mgtest:"
CONNECT_TIMEOUT_S = 0.2
COMMAND_TIMEOUT_S = 0.2
STATE = StateConfig(resync_s=60.0, redirect_window_s=1.0, estimated_download_s=10.0)


def probe(
    node: str = "a", vantage: str = "v1", *, up: bool = True, at: float = 1000.0
) -> ProbeRecord:
    return ProbeRecord(
        node_id=node,
        vantage=vantage,
        up=up,
        reason="" if up else "timeout",
        latency_ms=12.5 if up else None,
        checked_at=at,
        last_ok_at=at if up else None,
    )


async def eventually(check: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


def as_hash(record: ProbeRecord | LoadRecord | AdminRecord) -> dict[FieldT, EncodableT]:
    """The record's fields as redis-py wants a mapping typed."""
    return dict(encode_record(record)[1].items())


class FakeClock:
    """Wall time the test moves by hand, so redirect windows close exactly when it says."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_store(
    url: str,
    nodes: Sequence[NodeConfig],
    name: str,
    *,
    clock: Callable[[], float] = time.time,
    state: StateConfig = STATE,
) -> RedisStore:
    """A ``RedisStore`` (instance id ``name``) on the test server's keys, not started."""
    config = RedisConfig(
        url=url,
        key_prefix=PREFIX,
        connect_timeout_s=CONNECT_TIMEOUT_S,
        command_timeout_s=COMMAND_TIMEOUT_S,
    )
    live = LiveState(nodes, vantage="v1", probing=True)
    return RedisStore(live, RedirectCounter(), config, state, nodes, instance_id=name, clock=clock)
