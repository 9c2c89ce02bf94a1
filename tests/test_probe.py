"""The prober: pure verdict and load-format tables, then real mirror nodes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import get_args

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from gateway.config import LoadFormat, NodeConfig, ProbeSpec, ProbingConfig
from gateway.state.live import LoadRecord, ProbeRecord
from gateway.state.probe import (
    USER_AGENT,
    Health,
    LoadFormatError,
    ProbeFailure,
    ProbeOutcome,
    Prober,
    fetch_load,
    judge,
    new_session,
    next_health,
    parse_prometheus_load,
    parse_status_json,
    probe_once,
)

AiohttpServer = Callable[[web.Application], Awaitable[TestServer]]

FILE_BYTES = b"x" * 665
GOOD = ProbeOutcome(ok=True, reason="", latency_ms=10.0)
BAD = ProbeOutcome(ok=False, reason="status 503", latency_ms=3.0, failure="status")

# --------------------------------------------------------------------------- judge

SIZED = ProbeSpec(path="/config.json", expect_bytes=665)


@pytest.mark.parametrize(
    ("spec", "status", "body_size", "reason"),
    [
        (ProbeSpec(), 200, 10, ""),
        (ProbeSpec(), 204, 0, ""),
        (ProbeSpec(), 302, 0, ""),
        (ProbeSpec(), 503, 10, "status 503"),
        (ProbeSpec(), 404, 10, "status 404"),
        (ProbeSpec(expect_status=frozenset({200})), 302, 0, "status 302"),
        (SIZED, 200, 665, ""),
        (SIZED, 200, 12, "wrong size 12 != 665"),
        (SIZED, 200, 0, "wrong size 0 != 665"),
        (SIZED, 200, 666, "wrong size > 665"),
        (SIZED, 200, None, "wrong size unknown != 665"),
        (SIZED, 503, 665, "status 503"),
        # A redirect's body is not the file: a node that redirects is alive.
        (SIZED, 302, 0, ""),
        (replace(SIZED, method="HEAD"), 200, None, ""),
        (ProbeSpec(expect_bytes=0), 204, 0, ""),
    ],
)
def test_judge(spec: ProbeSpec, status: int, body_size: int | None, reason: str) -> None:
    outcome = judge(spec, status, body_size, 12.5)
    assert outcome.ok is (reason == "")
    assert outcome.reason == reason
    assert outcome.latency_ms == 12.5
    kinds = [kind for kind in get_args(ProbeFailure) if reason.startswith(kind)]
    assert outcome.failure == (kinds[0] if kinds else None)


# --------------------------------------------------------------------------- next_health


def run_sequence(
    probes: str, *, rise: int, fall: int, health: Health | None = None
) -> tuple[Health, str]:
    """Apply a probe string ("S" good, "F" bad, spaces ignored); return the last health and the
    up flags after each probe ("u" up, "d" down)."""
    health = health or Health()
    flags = ""
    for i, probe in enumerate(probes.replace(" ", "")):
        outcome = GOOD if probe == "S" else BAD
        health = next_health(health, outcome, rise=rise, fall=fall, alpha=0.5, now=float(i))
        flags += "u" if health.up else "d"
    return health, flags


@pytest.mark.parametrize(
    ("rise", "fall", "probes", "expected"),
    [
        # A new node needs `rise` good probes in a row.
        (2, 3, "S S", "d u"),
        (3, 3, "SSS", "ddu"),
        (1, 1, "S", "u"),
        (2, 3, "SFSS", "dddu"),
        (2, 3, "FFF SS", "ddd du"),
        # An up node goes down at exactly the `fall`-th failure in a row...
        (2, 3, "SS FFF", "du uud"),
        (2, 1, "SS F", "du d"),
        # ...and a good probe in between starts the count again.
        (2, 3, "SS FF S FF F", "du uu u uu d"),
        # Down again: `rise` good probes in a row, interrupted ones do not count.
        (2, 3, "SS FFF S F S S", "du uud d d d u"),
        (3, 2, "SSS FF SS F SSS", "ddu ud dd d ddu"),
    ],
)
def test_hysteresis(rise: int, fall: int, probes: str, expected: str) -> None:
    assert run_sequence(probes, rise=rise, fall=fall)[1] == expected.replace(" ", "")


@given(
    probes=st.text(alphabet="SF", max_size=40),
    rise=st.integers(1, 5),
    fall=st.integers(1, 5),
)
def test_hysteresis_never_flips_early(probes: str, rise: int, fall: int) -> None:
    """The verdict only changes after `rise` successes or `fall` failures in a row."""
    health, was_up = Health(), False
    run = ""
    for i, probe in enumerate(probes):
        run = run + probe if run.endswith(probe) else probe
        outcome = GOOD if probe == "S" else BAD
        health = next_health(health, outcome, rise=rise, fall=fall, alpha=0.5, now=float(i))
        if health.up and not was_up:
            assert run == "S" * len(run) and len(run) == rise
        if was_up and not health.up:
            assert run == "F" * len(run) and len(run) == fall
        assert (health.reason == "") is health.up
        was_up = health.up


@pytest.mark.parametrize(
    ("rise", "probes", "reason"),
    [
        (2, "", "not yet probed"),
        (2, "S", "coming up (1/2 good probes)"),
        (3, "FSS", "coming up (2/3 good probes)"),
        (2, "SF", "status 503"),
        (2, "SS", ""),
        (2, "SSFF", ""),  # still up, fall not reached
        (2, "SSFFF", "status 503"),
        (2, "SSFFFS", "coming up (1/2 good probes)"),
    ],
)
def test_health_reason(rise: int, probes: str, reason: str) -> None:
    health, _ = run_sequence(probes, rise=rise, fall=3)
    assert health.reason == reason
    assert health.probed is bool(probes)


def test_latency_is_an_ewma_over_successes() -> None:
    def probe(health: Health, outcome: ProbeOutcome, now: float) -> Health:
        return next_health(health, outcome, rise=1, fall=1, alpha=0.25, now=now)

    health = probe(Health(), replace(GOOD, latency_ms=100.0), 1.0)
    assert (health.latency_ms, health.last_ok_at) == (100.0, 1.0)
    health = probe(health, replace(GOOD, latency_ms=200.0), 2.0)
    assert (health.latency_ms, health.last_ok_at) == (125.0, 2.0)
    health = probe(health, ProbeOutcome(ok=False, reason="timeout", latency_ms=None), 3.0)
    assert (health.latency_ms, health.last_ok_at, health.up) == (125.0, 2.0, False)
    health = probe(health, replace(GOOD, latency_ms=25.0), 4.0)
    assert (health.latency_ms, health.last_ok_at, health.up) == (100.0, 4.0, True)
    assert (health.successes, health.failures) == (1, 0)


# --------------------------------------------------------------------------- load formats

#: active_connections, egress_mbps, capacity_connections, capacity_mbps
LoadFields = tuple[float | None, float | None, float | None, float | None]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"active_connections": 12, "egress_mbps": 830.5, "capacity_connections": 2000, '
            b'"capacity_mbps": 10000}',
            (12.0, 830.5, 2000.0, 10000.0),
        ),
        (b'{"active_connections": 0}', (0.0, None, None, None)),
        (b'{"egress_mbps": 1.5, "capacity_mbps": null}', (None, 1.5, None, None)),
        (b'{"active_connections": 3, "version": "1.2", "uptime": -5}', (3.0, None, None, None)),
    ],
)
def test_status_json(body: bytes, expected: LoadFields) -> None:
    record = parse_status_json("bj", body, 42.0)
    assert record == LoadRecord("bj", "status-json", *expected, measured_at=42.0)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "status JSON: not valid JSON (Expecting value: line 1 column 1 (char 0))"),
        (b'{"active_connections": 1', "status JSON: not valid JSON"),
        (b"\xff\xfe", "status JSON: body is not UTF-8"),
        (b"[1, 2]", "status JSON: expected an object, got list"),
        (b"12", "status JSON: expected an object, got int"),
        (b"{}", "status JSON: needs active_connections or egress_mbps; got keys: none"),
        (
            b'{"capacity_mbps": 10, "active": 3}',
            "status JSON: needs active_connections or egress_mbps; got keys: active, capacity_mbps",
        ),
        (b'{"active_connections": -1}', "status JSON: active_connections must be a finite"),
        (
            b'{"active_connections": "12"}',
            "status JSON: active_connections must be a number >= 0, got '12'",
        ),
        (b'{"egress_mbps": true}', "status JSON: egress_mbps must be a number >= 0, got True"),
        (b'{"egress_mbps": NaN}', "status JSON: egress_mbps must be a finite number >= 0, got nan"),
        (
            b'{"egress_mbps": 1e999}',
            "status JSON: egress_mbps must be a finite number >= 0, got inf",
        ),
        (b'{"egress_mbps": 1' + b"0" * 400 + b"}", "status JSON: egress_mbps must be a finite"),
        (
            b'{"egress_mbps": 1, "capacity_mbps": [1]}',
            "status JSON: capacity_mbps must be a number",
        ),
    ],
)
def test_status_json_rejects(body: bytes, message: str) -> None:
    with pytest.raises(LoadFormatError) as caught:
        parse_status_json("bj", body, 0.0)
    assert str(caught.value).startswith(message)


PROMETHEUS_TEXT = """\
# HELP mirror_node_active_connections Open client connections.
# TYPE mirror_node_active_connections gauge
mirror_node_active_connections{worker="1"} 7
mirror_node_active_connections{worker="2"} 5
# TYPE mirror_node_egress_bytes_per_second gauge
mirror_node_egress_bytes_per_second{interface="eth0"} 100000000
mirror_node_egress_bytes_per_second{interface="eth1"} 3812500
# TYPE mirror_node_capacity_connections gauge
mirror_node_capacity_connections 2000
# TYPE mirror_node_capacity_egress_bytes_per_second gauge
mirror_node_capacity_egress_bytes_per_second 1.25e9
# TYPE process_cpu_seconds counter
process_cpu_seconds_total 12.5
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PROMETHEUS_TEXT, (12.0, 830.5, 2000.0, 10000.0)),
        ("mirror_node_active_connections 3\n", (3.0, None, None, None)),
        ("mirror_node_egress_bytes_per_second 125000 1700000000000\n", (None, 1.0, None, None)),
    ],
)
def test_prometheus_load(text: str, expected: LoadFields) -> None:
    record = parse_prometheus_load("bj", text, 42.0)
    assert record == LoadRecord("bj", "prometheus", *expected, measured_at=42.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "Prometheus load: needs mirror_node_active_connections or"),
        ("mirror_node_capacity_connections 10\n", "Prometheus load: needs"),
        # A counter's samples end in _total: not the gauge asked for.
        (
            "# TYPE mirror_node_active_connections counter\nmirror_node_active_connections 3\n",
            "Prometheus load: needs",
        ),
        ("garbage", "Prometheus load: not valid text exposition format (could not convert"),
        ("mirror_node_active_connections{a=1} 3", "Prometheus load: not valid text exposition"),
        ('_{a="", , =#,,}', "Prometheus load: not valid text exposition"),
        (
            'mirror_node_active_connections{worker="2"} -1\n',
            'Prometheus load: mirror_node_active_connections{worker="2"} must be a finite '
            "number >= 0, got -1",
        ),
        (
            "mirror_node_egress_bytes_per_second NaN\n",
            "Prometheus load: mirror_node_egress_bytes_per_second must be a finite number",
        ),
        (
            'mirror_node_active_connections{a="1"} 1e308\n'
            'mirror_node_active_connections{a="2"} 1e308\n',
            "Prometheus load: sum of mirror_node_active_connections must be a finite number",
        ),
    ],
)
def test_prometheus_load_rejects(text: str, message: str) -> None:
    with pytest.raises(LoadFormatError) as caught:
        parse_prometheus_load("bj", text, 0.0)
    assert str(caught.value).startswith(message)


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_status_json_only_raises_load_format_error(body: bytes) -> None:
    with contextlib.suppress(LoadFormatError):
        parse_status_json("bj", body, 0.0)


PROMETHEUS_PIECES = st.sampled_from(
    ["mirror_node_active_connections", "{", "}", "a", "=", '"', ",", " ", "\n", "1", "-", "#",
     " TYPE ", "gauge", "\\", "e", "NaN", "\t"]
)  # fmt: skip


@given(st.lists(PROMETHEUS_PIECES, max_size=30).map("".join) | st.text(max_size=100))
def test_prometheus_load_only_raises_load_format_error(text: str) -> None:
    with contextlib.suppress(LoadFormatError):
        parse_prometheus_load("bj", text, 0.0)


# --------------------------------------------------------------------------- mirror nodes


class MirrorNode:
    """A mirror node on loopback whose behaviour a test switches between."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.delay_s = 0.0
        self.requests: list[tuple[str, str]] = []
        self.user_agents: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.load_body = b'{"active_connections": 12}'
        self.load_status = 200
        self.redirect_to = ""
        #: Set at teardown so handlers still waiting out a timeout end at once.
        self.release = asyncio.Event()
        self.server: TestServer | None = None
        self.app = web.Application()
        self.app.router.add_route("*", "/load", self.load)
        self.app.router.add_route("*", "/{tail:.*}", self.file)

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def file(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        self.user_agents.append(request.headers.get("User-Agent", ""))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), self.delay_s)
            return await self.answer(request)
        finally:
            self.in_flight -= 1

    async def answer(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "ok":
            return web.Response(body=FILE_BYTES)
        if self.mode == "wrong size":
            return web.Response(body=b"x" * 12)
        if self.mode == "503":
            return web.Response(status=503, text="overloaded")
        if self.mode == "redirect":
            raise web.HTTPFound(self.redirect_to)
        if self.mode == "endless":
            response = web.StreamResponse()
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):
                while not self.release.is_set():
                    await response.write(b"y" * 65536)
                    await asyncio.sleep(0)  # let the client run even if writes never block
            return response
        raise AssertionError(self.mode)

    async def load(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        self.user_agents.append(request.headers.get("User-Agent", ""))
        return web.Response(status=self.load_status, body=self.load_body)

    def node(
        self,
        node_id: str = "n1",
        *,
        enabled: bool = True,
        load_url: str | None = None,
        load_format: LoadFormat = "json",
    ) -> NodeConfig:
        return NodeConfig(
            id=node_id,
            base_url=self.base_url,
            enabled=enabled,
            load_url=load_url,
            load_format=load_format,
        )


@pytest.fixture
async def start_node(
    aiohttp_server: AiohttpServer,
) -> AsyncIterator[Callable[[], Awaitable[MirrorNode]]]:
    nodes: list[MirrorNode] = []

    async def start() -> MirrorNode:
        node = MirrorNode()
        node.server = await aiohttp_server(node.app)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.release.set()


@pytest.fixture
async def mirror(start_node: Callable[[], Awaitable[MirrorNode]]) -> MirrorNode:
    return await start_node()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with new_session(concurrency=8) as client:
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


FAST = ProbingConfig(interval_s=0.05, connect_timeout_s=0.2, timeout_s=0.5, rise=2, fall=3)
SIZED_FILE = ProbeSpec(path="/gpt2/resolve/main/config.json", expect_bytes=len(FILE_BYTES))


# --------------------------------------------------------------------------- probe_once


@pytest.mark.parametrize(
    ("mode", "spec", "reason"),
    [
        ("ok", SIZED_FILE, ""),
        ("ok", ProbeSpec(), ""),
        ("wrong size", SIZED_FILE, "wrong size 12 != 665"),
        ("wrong size", ProbeSpec(), ""),
        ("503", SIZED_FILE, "status 503"),
        # Read one byte past the expected size, then stop: no timeout on an endless body.
        ("endless", SIZED_FILE, "wrong size > 665"),
        ("endless", ProbeSpec(), ""),
    ],
)
async def test_probe_once(
    mirror: MirrorNode, session: aiohttp.ClientSession, mode: str, spec: ProbeSpec, reason: str
) -> None:
    mirror.mode = mode
    outcome = await probe_once(session, mirror.node(), spec, FAST)
    assert (outcome.ok, outcome.reason) == (reason == "", reason)
    assert outcome.latency_ms is not None and 0 < outcome.latency_ms < 300
    assert mirror.requests == [("GET", spec.path)]
    assert mirror.user_agents == [USER_AGENT]


async def test_probe_head_checks_no_size(
    mirror: MirrorNode, session: aiohttp.ClientSession
) -> None:
    mirror.mode = "wrong size"
    spec = replace(SIZED_FILE, method="HEAD")
    outcome = await probe_once(session, mirror.node(), spec, FAST)
    assert outcome.ok, outcome.reason
    assert mirror.requests == [("HEAD", spec.path)]


async def test_probe_does_not_follow_redirects(
    start_node: Callable[[], Awaitable[MirrorNode]], session: aiohttp.ClientSession
) -> None:
    mirror, elsewhere = await start_node(), await start_node()
    mirror.mode = "redirect"
    mirror.redirect_to = elsewhere.base_url + "/other/config.json"
    alive = await probe_once(session, mirror.node(), SIZED_FILE, FAST)
    strict = replace(SIZED_FILE, expect_status=frozenset({200}))
    refused = await probe_once(session, mirror.node(), strict, FAST)
    assert (alive.ok, alive.reason) == (True, "")
    assert (refused.ok, refused.reason, refused.failure) == (False, "status 302", "status")
    assert len(mirror.requests) == 2
    assert elsewhere.requests == []


async def test_probe_timeout(mirror: MirrorNode, session: aiohttp.ClientSession) -> None:
    mirror.delay_s = 5.0
    started = asyncio.get_running_loop().time()
    outcome = await probe_once(session, mirror.node(), SIZED_FILE, FAST)
    assert outcome == ProbeOutcome(ok=False, reason="timeout", latency_ms=None, failure="timeout")
    assert asyncio.get_running_loop().time() - started < 1.0


async def test_probe_connect_error(session: aiohttp.ClientSession) -> None:
    node = NodeConfig(id="gone", base_url=f"http://127.0.0.1:{free_port()}")
    outcome = await probe_once(session, node, ProbeSpec(), FAST)
    assert outcome == ProbeOutcome(
        ok=False,
        reason="connect error: Connection refused",
        latency_ms=None,
        failure="connect error",
    )


async def test_probe_bad_response(session: aiohttp.ClientSession) -> None:
    async def speak_nonsense(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 banana\r\n\r\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(speak_nonsense, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        node = NodeConfig(id="odd", base_url=f"http://127.0.0.1:{port}")
        outcome = await probe_once(session, node, ProbeSpec(), FAST)
    assert not outcome.ok
    assert outcome.failure == "bad response"
    assert outcome.reason.startswith("bad response: Bad status line: "), outcome.reason
    assert "\n" not in outcome.reason and "\\n" not in outcome.reason
    assert outcome.latency_ms is None


# --------------------------------------------------------------------------- load


def prometheus_exposition() -> bytes:
    registry = CollectorRegistry()
    active = Gauge(
        "mirror_node_active_connections", "Open connections.", ["worker"], registry=registry
    )
    active.labels("1").set(40)
    active.labels("2").set(2)
    egress = Gauge("mirror_node_egress_bytes_per_second", "Egress.", registry=registry)
    egress.set(250_000_000)
    return generate_latest(registry)


@pytest.mark.parametrize(
    ("load_format", "body", "expected"),
    [
        (
            "json",
            json.dumps({"active_connections": 12, "egress_mbps": 830.5}).encode(),
            (12.0, 830.5),
        ),
        ("prometheus", prometheus_exposition(), (42.0, 2000.0)),
    ],
)
async def test_fetch_load(
    mirror: MirrorNode,
    session: aiohttp.ClientSession,
    load_format: LoadFormat,
    body: bytes,
    expected: tuple[float, float],
) -> None:
    mirror.load_body = body
    node = mirror.node(load_url=mirror.base_url + "/load", load_format=load_format)
    record = await fetch_load(session, node, FAST, clock=lambda: 7.0)
    assert record is not None
    assert (record.active_connections, record.egress_mbps, record.measured_at) == (*expected, 7.0)
    assert record.source == ("status-json" if load_format == "json" else "prometheus")
    assert mirror.user_agents == [USER_AGENT]


@pytest.mark.parametrize(
    ("status", "body", "logged"),
    [
        (503, b'{"active_connections": 1}', "status 503"),
        (302, b"", "status 302"),
        (200, b"[]", "status JSON: expected an object, got list"),
        (200, b"{" + b" " * (1024 * 1024) + b"}", "body over 1048576 bytes"),
    ],
)
async def test_fetch_load_failures_give_none(
    mirror: MirrorNode,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    status: int,
    body: bytes,
    logged: str,
) -> None:
    mirror.load_status, mirror.load_body = status, body
    node = mirror.node(load_url=mirror.base_url + "/load")
    with caplog.at_level(logging.WARNING, logger="gateway.probe"):
        assert await fetch_load(session, node, FAST) is None
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.probe"] == [
        f"node n1: no load from {mirror.base_url}/load: {logged}"
    ]


async def test_fetch_load_network_error(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{free_port()}/load"
    node = NodeConfig(id="gone", base_url="http://127.0.0.1:1", load_url=url)
    with caplog.at_level(logging.WARNING, logger="gateway.probe"):
        assert await fetch_load(session, node, FAST) is None
    assert "connect error: Connection refused" in caplog.text


# --------------------------------------------------------------------------- Prober


class RecordingSink:
    """An in-memory ProbeSink (the Redis store has its own tests)."""

    def __init__(
        self, *, lock_granted: bool = True, broken_for: frozenset[str] = frozenset()
    ) -> None:
        self.lock_granted = lock_granted
        self.broken_for = broken_for
        self.probes: list[ProbeRecord] = []
        self.loads: list[LoadRecord] = []
        self.lock_requests: list[tuple[str, float, float]] = []
        self.released: list[str] = []

    async def publish_probe(self, record: ProbeRecord) -> None:
        if record.node_id in self.broken_for:
            raise ConnectionError("store unreachable")
        self.probes.append(record)

    async def publish_load(self, record: LoadRecord) -> None:
        self.loads.append(record)

    async def try_acquire_prober_lock(self, vantage: str, ttl_s: float) -> bool:
        self.lock_requests.append((vantage, ttl_s, asyncio.get_running_loop().time()))
        return self.lock_granted

    async def release_prober_lock(self, vantage: str) -> None:
        self.released.append(vantage)

    def verdicts(self, node_id: str) -> str:
        """Published up flags of one node, "u" up and "d" down, round by round."""
        return "".join("u" if r.up else "d" for r in self.probes if r.node_id == node_id)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


async def test_rounds_apply_hysteresis(mirror: MirrorNode, session: aiohttp.ClientSession) -> None:
    sink, clock = RecordingSink(), Clock()
    config = replace(FAST, probe=SIZED_FILE, vantage="eu")
    prober = Prober([mirror.node()], config, sink, clock=clock)
    assert prober.health("n1") == Health()
    for mode in ["ok", "ok", "503", "503", "503", "ok", "ok"]:
        mirror.mode = mode
        await prober.run_round(session)
    assert sink.verdicts("n1") == "duuuddu"
    assert [r.reason for r in sink.probes] == [
        "coming up (1/2 good probes)", "", "", "", "status 503", "coming up (1/2 good probes)", ""
    ]  # fmt: skip
    last = sink.probes[-1]
    assert (last.vantage, last.checked_at, last.last_ok_at) == ("eu", clock.now, clock.now)
    assert sink.probes[4].last_ok_at == sink.probes[1].checked_at
    assert last.latency_ms is not None and last.latency_ms > 0


async def test_round_isolates_nodes(
    mirror: MirrorNode, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    gone = NodeConfig(id="gone", base_url=f"http://127.0.0.1:{free_port()}")
    sink = RecordingSink(broken_for=frozenset({"n2"}))
    config = replace(FAST, rise=1)
    nodes = [gone, mirror.node("n1"), mirror.node("n2"), mirror.node("off", enabled=False)]
    prober = Prober(nodes, config, sink)
    with caplog.at_level(logging.WARNING, logger="gateway.probe"):
        await prober.run_round(session)
    assert {(r.node_id, r.up, r.reason) for r in sink.probes} == {
        ("gone", False, "connect error: Connection refused"),
        ("n1", True, ""),
    }
    assert "node n2: could not publish probe" in caplog.text
    remembered = prober.health("n2")
    assert remembered is not None and remembered.up, "an unpublished verdict is still remembered"
    assert prober.health("off") is None
    assert len(mirror.requests) == 2


async def test_round_fetches_and_publishes_load(
    mirror: MirrorNode, session: aiohttp.ClientSession
) -> None:
    sink = RecordingSink()
    node = mirror.node(load_url=mirror.base_url + "/load")
    prober = Prober([node], FAST, sink, clock=lambda: 5.0)
    await prober.run_round(session)
    assert sink.loads == [LoadRecord("n1", "status-json", active_connections=12.0, measured_at=5.0)]
    mirror.mode = "503"
    await prober.run_round(session)
    assert len(sink.loads) == 1, "a node that failed its probe is not asked for its load"
    assert ("GET", "/load") in mirror.requests


async def test_reconfigure_keeps_surviving_health(
    mirror: MirrorNode, session: aiohttp.ClientSession
) -> None:
    prober = Prober([mirror.node("a"), mirror.node("b")], FAST, RecordingSink())
    await prober.run_round(session)
    kept = prober.health("a")
    assert kept is not None and kept.probed
    prober.reconfigure([mirror.node("a"), mirror.node("c"), mirror.node("b", enabled=False)], FAST)
    assert prober.health("a") is kept
    assert prober.health("c") == Health()
    assert prober.health("b") is None
    prober.reconfigure([mirror.node("b")], FAST)
    assert prober.health("b") == Health()


async def test_concurrency_is_bounded(mirror: MirrorNode, session: aiohttp.ClientSession) -> None:
    mirror.delay_s = 0.05
    nodes = [NodeConfig(id=f"n{i}", base_url=f"{mirror.base_url}/n{i}") for i in range(6)]
    sink = RecordingSink()
    await Prober(nodes, replace(FAST, concurrency=2), sink).run_round(session)
    assert len(mirror.requests) == 6
    assert mirror.max_in_flight == 2
    assert sorted(r.node_id for r in sink.probes) == [f"n{i}" for i in range(6)]


# --------------------------------------------------------------------------- Prober.run


async def run_for(prober: Prober, seconds: float) -> None:
    task = asyncio.create_task(prober.run())
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_without_the_lock_probes_nothing(mirror: MirrorNode) -> None:
    sink = RecordingSink(lock_granted=False)
    prober = Prober([mirror.node()], FAST, sink)
    await run_for(prober, 0.3)
    assert mirror.requests == []
    assert sink.probes == []
    assert len(sink.lock_requests) >= 3
    assert sink.released == [], "a lock this instance never held is not released"
    assert prober.health("n1") == Health()


async def test_run_with_the_lock_probes_at_cadence(mirror: MirrorNode) -> None:
    sink = RecordingSink()
    prober = Prober([mirror.node()], replace(FAST, vantage="asia"), sink)
    await run_for(prober, 0.5)
    assert 3 <= len(mirror.requests) <= 12
    assert {vantage for vantage, _, _ in sink.lock_requests} == {"asia"}
    assert all(ttl == pytest.approx(0.15) for _, ttl, _ in sink.lock_requests), "3 intervals"
    assert sink.released == ["asia"]
    assert mirror.user_agents[0] == USER_AGENT


async def test_run_does_not_drift_with_slow_rounds(mirror: MirrorNode) -> None:
    mirror.delay_s = 0.03  # each round takes 30 ms of a 50 ms interval
    sink = RecordingSink()
    await run_for(Prober([mirror.node()], FAST, sink), 0.5)
    starts = [at for _, _, at in sink.lock_requests]
    assert len(starts) >= 3
    # Fixed cadence: round k starts at about k * 50 ms (sleeping 50 ms after each would be 80).
    assert (starts[-1] - starts[0]) / (len(starts) - 1) < 0.065


async def test_run_starts_at_once_after_an_overrun_without_a_burst(mirror: MirrorNode) -> None:
    sink = RecordingSink()
    prober = Prober([mirror.node()], FAST, sink)
    mirror.delay_s = 0.15  # three intervals
    task = asyncio.create_task(prober.run())
    while len(mirror.requests) < 1:
        await asyncio.sleep(0.01)
    mirror.delay_s = 0
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    starts = [at for _, _, at in sink.lock_requests]
    assert starts[1] - starts[0] == pytest.approx(0.15, abs=0.04), "next round at once"
    gaps = [b - a for a, b in itertools.pairwise(starts[1:])]
    assert gaps and min(gaps) > 0.035, "missed rounds are not made up in a burst"


async def test_run_release_is_bounded(mirror: MirrorNode, caplog: pytest.LogCaptureFixture) -> None:
    class HangingRelease(RecordingSink):
        async def release_prober_lock(self, vantage: str) -> None:
            await asyncio.sleep(30)

    prober = Prober([mirror.node()], FAST, HangingRelease())
    started = asyncio.get_running_loop().time()
    with caplog.at_level(logging.WARNING, logger="gateway.probe"):
        await run_for(prober, 0.1)
    assert asyncio.get_running_loop().time() - started < 1.5
    assert "could not release the prober lock for default" in caplog.text


async def test_run_follows_a_reload_that_raises_concurrency(mirror: MirrorNode) -> None:
    mirror.delay_s = 0.05
    nodes = [NodeConfig(id=f"n{i}", base_url=f"{mirror.base_url}/n{i}") for i in range(3)]
    prober = Prober(nodes, replace(FAST, concurrency=1, interval_s=0.2), RecordingSink())
    task = asyncio.create_task(prober.run())
    while len(mirror.requests) < 3:
        await asyncio.sleep(0.01)
    assert mirror.max_in_flight == 1
    prober.reconfigure(nodes, replace(FAST, concurrency=3, interval_s=0.2))
    while len(mirror.requests) < 6:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The old pool of one connection would have queued the probes (and timed them out).
    assert mirror.max_in_flight == 3


async def test_taking_over_the_lock_continues_from_the_shared_verdict(mirror: MirrorNode) -> None:
    shared = ProbeRecord("n1", "asia", True, "", 12.5, 999.0, 999.0)
    sink = RecordingSink()
    prober = Prober(
        [mirror.node()],
        replace(FAST, vantage="asia"),
        sink,
        shared_verdict=lambda node_id, vantage: (
            shared if (node_id, vantage) == ("n1", "asia") else None
        ),
    )
    await run_for(prober, 0.2)
    # Without the shared verdict the first published verdicts would be "coming up" (down).
    assert sink.verdicts("n1").startswith("u")
    assert set(sink.verdicts("n1")) == {"u"}


async def test_without_a_shared_verdict_a_new_prober_earns_trust(mirror: MirrorNode) -> None:
    sink = RecordingSink()
    prober = Prober(
        [mirror.node()], replace(FAST, vantage="asia"), sink, shared_verdict=lambda n, v: None
    )
    await run_for(prober, 0.2)
    assert sink.verdicts("n1").startswith("d")


@pytest.mark.parametrize(
    ("outcome", "transport_failing"),
    [
        (ProbeOutcome(False, "timeout", None, "timeout"), True),
        (ProbeOutcome(False, "connect error: refused", None, "connect error"), True),
        (ProbeOutcome(False, "status 503", 3.0, "status"), False),
        (ProbeOutcome(True, "", 3.0), False),
    ],
    ids=["timeout", "connect-error", "status", "ok"],
)
def test_transport_failure_is_flagged_while_still_up(
    outcome: ProbeOutcome, transport_failing: bool
) -> None:
    up = Health(up=True, probed=True, reason="")
    after = next_health(up, outcome, rise=2, fall=3, alpha=0.5, now=1.0)
    assert after.up
    assert after.transport_failing is transport_failing
