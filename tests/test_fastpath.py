"""The fast path answers exactly as aiohttp's handlers do, in order, and steps aside otherwise.

Two gateways share one config but for ``server.fast_path``; the same requests, over raw
keep-alive connections, must get the same bytes from both (but the date), while the fast one
really answered them from the connection (its ``fast_answer`` is counted).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import pytest
from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.test_utils import TestServer
from fake_hub import FakeHub
from http_world import BEIJING_IP, CONFIG_JSON, TOKYO_IP, US_IP, gateway_config

from gateway.config import GeoIPConfig
from gateway.geo.locator import MaxMindLocator
from gateway.routing.router import Router
from gateway.runtime import RUNTIME
from gateway.state.manifest import CommitHolding, NodeHoldings
from gateway.web import connection
from gateway.web.app import create_app
from gateway.web.connection import FastAnswer
from gateway.web.fastpath import fast_answer_for, serialize_redirect
from gateway.web.server import build_runtime

DATASET_FILE = "/datasets/acme/data/resolve/main/data/train-00000.parquet"


class Answer(NamedTuple):
    status: int
    head: list[str]
    body: bytes

    @property
    def headers(self) -> dict[str, str]:
        return dict(line.split(": ", 1) for line in self.head[1:])

    def comparable(self) -> list[str]:
        return ["Date: -" if line.startswith("Date: ") else line for line in self.head]


class Counted:
    """A connection's fast answers, counted; ``fail`` makes every call raise."""

    def __init__(self, answer: FastAnswer, fail: bool = False) -> None:
        self.answer, self.fail, self.answered = answer, fail, 0

    def __call__(self, message: RawRequestMessage, peer: str | None) -> bytes | None:
        if self.fail:
            raise RuntimeError("a fault in the fast path")
        answer = self.answer(message, peer)
        self.answered += answer is not None
        return answer


class Gateway(NamedTuple):
    server: TestServer
    counted: Counted | None

    @property
    def answered_fast(self) -> int:
        return self.counted.answered if self.counted else 0


class _Server(TestServer):
    def __init__(self, app: web.Application, fail: bool) -> None:
        super().__init__(app)
        fast = fast_answer_for(app[RUNTIME])
        self.counted = Counted(fast, fail) if fast is not None else None

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return connection.make_runner(self.app, connection.ConnectionRules(self.counted), **kwargs)


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(geoip_config: GeoIPConfig, fake_hub: FakeHub) -> AsyncIterator[MakeGateway]:
    servers: list[TestServer] = []

    async def make(
        fast: bool = True, fail: bool = False, keepalive_s: float = 75.0, **sections: Any
    ) -> Gateway:
        sections.setdefault("server", {})["fast_path"] = fast
        config = gateway_config(geoip_config, fake_hub.url, **sections)
        router = Router(config, MaxMindLocator(config.geoip), random.Random(1))
        server = _Server(create_app(build_runtime(router)), fail)
        await server.start_server(keepalive_timeout=keepalive_s)
        servers.append(server)
        return Gateway(server, server.counted)

    yield make
    for server in servers:
        await server.close()


def request(path: str, method: str = "GET", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def exchange(gateway: Gateway, raw: bytes, answers: int, head: bool = False) -> list[Answer]:
    """Send ``raw`` in one write on one connection; read ``answers`` answers off it."""
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    writer.write(raw)
    got = []
    try:
        for _ in range(answers):
            lines = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
            head_lines = lines.removesuffix("\r\n\r\n").split("\r\n")
            length = 0 if head else int(Answer(0, head_lines, b"").headers.get("Content-Length", 0))
            body = await reader.readexactly(length)
            got.append(Answer(int(head_lines[0].split()[1]), head_lines, body))
    finally:
        writer.close()
    return got


async def warm(gateway: Gateway) -> None:
    """The catalog's first sight of the file goes to upstream through aiohttp's path."""
    (answer,) = await exchange(gateway, request(CONFIG_JSON), 1)
    assert answer.status == 302


CASES = [
    ("node", {"X_Forwarded_For": BEIJING_IP}, {}, "GET"),
    ("node-head", {"X_Forwarded_For": TOKYO_IP}, {}, "HEAD"),
    ("upstream", {"X_Forwarded_For": US_IP}, {}, "GET"),
    ("request-id", {"X_Forwarded_For": BEIJING_IP, "X_Request_ID": "trace-7"}, {}, "GET"),
    (
        "cdn-geo",
        {"CF_IPCountry": "CN"},
        {
            "client_ip": {"cdn_country_header": "CF-IPCountry"},
            "responses": {"cache_mode": "cdn-geo", "max_age": 30},
        },
        "GET",
    ),
]


@pytest.mark.parametrize(
    ("headers", "sections", "method"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_fast_answers_are_the_bytes_aiohttp_writes(
    make_gateway: MakeGateway, headers: dict[str, str], sections: dict[str, Any], method: str
) -> None:
    fast, slow = await make_gateway(True, **sections), await make_gateway(False, **sections)
    answers = []
    for gateway in (fast, slow):
        await warm(gateway)
        (answer,) = await exchange(
            gateway, request(CONFIG_JSON, method, **headers), 1, method == "HEAD"
        )
        answers.append(answer)
    assert fast.answered_fast == 1
    fast_answer, slow_answer = answers
    assert fast_answer.status == 302
    if "X_Request_ID" not in headers:
        # Each gateway numbers its own requests.
        for answer in answers:
            answer.head[:] = [h for h in answer.head if not h.startswith("X-Request-ID: ")]
    assert fast_answer.comparable() == slow_answer.comparable()
    assert fast_answer.headers["Date"]


def near_beijing(count: int, **fields: Any) -> list[dict[str, Any]]:
    """Nodes a few km apart in Beijing, all near-equal for its clients; weights differ."""
    return [
        {
            "id": f"bj{i}",
            "url": f"https://bj{i}.mirror.test",
            "country": "CN",
            "latitude": 39.9 + i / 100,
            "longitude": 116.4,
            "weight": (0.5, 1.0, 2.0)[i % 3],
            **fields,
        }
        for i in range(count)
    ]


OWN_TEMPLATE = {"url_template": "{base}/hf/{repo}/{revision}/{path}"}
POOLS = [
    ("weighted-mirrors", near_beijing(5), 3),
    ("lone-cache", near_beijing(4) + near_beijing(5, kind="cache")[4:], 3),
    ("two-caches", near_beijing(3) + near_beijing(5, kind="cache")[3:], 3),
    ("own-template", near_beijing(1, **OWN_TEMPLATE) + near_beijing(4)[1:], 3),
    ("no-links", near_beijing(4), 0),
]
TINY_FILES = [
    CONFIG_JSON,
    "/acme/tiny-model/resolve/main/nested%20dir/with%20spaces/tokenizer.json",
]


async def exchange_each(gateway: Gateway, requests: list[bytes]) -> list[Answer]:
    """Each request on one keep-alive connection, sent once the answer before it is read."""
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    got = []
    try:
        for raw in requests:
            writer.write(raw)
            lines = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
            head = lines.removesuffix("\r\n\r\n").split("\r\n")
            await reader.readexactly(int(Answer(0, head, b"").headers.get("Content-Length", 0)))
            got.append(Answer(int(head[0].split()[1]), head, b""))
    finally:
        writer.close()
    return got


@pytest.mark.parametrize(("nodes", "links"), [p[1:] for p in POOLS], ids=[p[0] for p in POOLS])
async def test_draws_in_a_pool_of_near_equal_nodes_are_the_bytes_aiohttp_writes(
    make_gateway: MakeGateway, nodes: list[dict[str, Any]], links: int
) -> None:
    """Both gateways draw from one seed: the same requests, in the same order, must meet the
    same nodes and get the same bytes, whether the connection answers from a settled pool or
    from a plan (a caches' group, a named node's own URL template)."""
    sections = {"nodes": nodes, "responses": {"duplicate_links": links}}
    fast, slow = await make_gateway(True, **sections), await make_gateway(False, **sections)
    requests = [request(path, X_Forwarded_For=BEIJING_IP) for _ in range(20) for path in TINY_FILES]
    answers = []
    for gateway in (fast, slow):
        await warm(gateway)
        got = await exchange_each(gateway, requests)
        for answer in got:
            answer.head[:] = [h for h in answer.head if not h.startswith("X-Request-ID: ")]
        answers.append([answer.comparable() for answer in got])
    assert fast.answered_fast == len(requests)
    assert answers[0] == answers[1]
    met = {dict(line.split(": ", 1) for line in head[1:])["X-Mirror-Node"] for head in answers[0]}
    assert len(met) > 1, "the draws should meet several nodes"


def hold(gateway: Gateway, node_id: str, commit: str, path: str) -> None:
    """As if ``node_id``'s manifest listed ``path`` of the tiny model at ``commit``."""
    holding = CommitHolding(synced_at=0.0, files={path: (1, "0" * 64)})
    commits = {("model", "acme/tiny-model"): {commit: holding}}
    sync = gateway.server.app[RUNTIME].sync
    sync.holdings[node_id] = NodeHoldings(node_id, commits, {}, 0.0, 0.0)


async def test_a_caches_group_sends_a_file_to_the_cache_holding_it(
    make_gateway: MakeGateway,
) -> None:
    """Of two near-equal caches, the one whose manifest lists the file takes every redirect
    the caches' group gets, from a settled pool as from aiohttp's handler."""
    nodes = near_beijing(3) + near_beijing(5, kind="cache")[3:]
    requests = [request(CONFIG_JSON, X_Forwarded_For=BEIJING_IP)] * 60
    for fast_path in (True, False):
        gateway = await make_gateway(fast_path, nodes=nodes)
        (first,) = await exchange(gateway, request(CONFIG_JSON), 1)
        hold(gateway, "bj3", first.headers["X-Repo-Commit"], "config.json")
        met = Counter(a.headers["X-Mirror-Node"] for a in await exchange_each(gateway, requests))
        assert met["bj3"] > 0 and met["bj4"] == 0, met
        assert gateway.answered_fast == (len(requests) if fast_path else 0)


async def test_pipelined_requests_are_answered_in_order(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway()
    await warm(gateway)
    beijing = request(CONFIG_JSON, X_Forwarded_For=BEIJING_IP)
    # A request aiohttp answers between two the connection answers itself, and one after it.
    pipelined = beijing + request("/healthz") + beijing + request("/readyz") + beijing
    answers = await exchange(gateway, pipelined, 5)
    assert [a.status for a in answers] == [302, 200, 302, 200, 302]
    assert b'"ok"' in answers[1].body and b'"ready"' in answers[3].body
    assert all(answers[i].headers["X-Mirror-Node"] == "bj" for i in (0, 2, 4))
    # The first one only: the rest came in behind a request in aiohttp's hands.
    assert gateway.answered_fast == 1
    # An idle connection is the connection's own again.
    await exchange(gateway, beijing + beijing, 2)
    assert gateway.answered_fast == 3


async def test_requests_behind_one_in_aiohttp_hands_wait_for_it(
    make_gateway: MakeGateway, fake_hub: FakeHub
) -> None:
    gateway = await make_gateway()
    await warm(gateway)
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    fake_hub.delay_s = 0.3
    try:
        # Not in the catalog yet: aiohttp's handler awaits upstream for it...
        writer.write(request(DATASET_FILE, X_Forwarded_For=BEIJING_IP))
        await asyncio.sleep(0.1)
        # ...while this one, which the connection could answer at once, arrives.
        writer.write(request(CONFIG_JSON, X_Forwarded_For=BEIJING_IP))
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        fake_hub.delay_s = 0.0
        writer.close()
    assert b"/datasets/acme/data/resolve/" in first
    assert b"/acme/tiny-model/resolve/" in second
    assert gateway.answered_fast == 0


async def test_a_busy_connection_stays_open_and_an_idle_one_closes(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(keepalive_s=0.4)
    await warm(gateway)
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    beijing = request(CONFIG_JSON, X_Forwarded_For=BEIJING_IP)
    try:
        # Busy for three times the keep-alive time, answered by the connection alone...
        for _ in range(12):
            writer.write(beijing)
            assert b" 302 " in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            await asyncio.sleep(0.1)
        assert gateway.answered_fast == 12
        # ...then idle: closed once the keep-alive time has passed.
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


async def test_a_client_that_does_not_read_cannot_pile_up_answers(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway()
    await warm(gateway)
    count = 20_000  # about 26 MB of answers, past what socket buffers hold
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)

    async def send() -> None:
        # A few requests per write: each read leaves the queue short of full, so the
        # connection keeps answering them itself (a queue-filling read goes to aiohttp).
        batch = request(CONFIG_JSON, X_Forwarded_For=BEIJING_IP) * 8
        for _ in range(count // 8):
            writer.write(batch)
            await writer.drain()
            await asyncio.sleep(0)  # the gateway reads each batch on its own

    sending = asyncio.create_task(send())
    try:
        answered = -1
        while gateway.answered_fast != answered:
            answered = gateway.answered_fast
            await asyncio.sleep(0.3)
        # Stalled on the unread answers rather than buffering all of them.
        assert 0 < answered < count
        for _ in range(count):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 302 ") and b"X-Mirror-Node: bj\r\n" in head
        await sending
    finally:
        sending.cancel()
        writer.close()


STEP_ASIDE = [
    ("http-1.0", b"GET " + CONFIG_JSON.encode() + b" HTTP/1.0\r\n\r\n"),
    ("connection-close", request(CONFIG_JSON, Connection="close")),
    ("body", request(CONFIG_JSON, Content_Length="3") + b"abc"),
    ("metalink", request(CONFIG_JSON, Accept="application/metalink4+xml")),
    ("upgrade", request(CONFIG_JSON, Connection="Upgrade", Upgrade="websocket")),
    ("encoded-first-segment", request("/%61cme/tiny-model/resolve/main/config.json")),
]


@pytest.mark.parametrize("raw", [c[1] for c in STEP_ASIDE], ids=[c[0] for c in STEP_ASIDE])
async def test_other_requests_are_left_to_aiohttp(make_gateway: MakeGateway, raw: bytes) -> None:
    gateway = await make_gateway()
    await warm(gateway)
    (answer,) = await exchange(gateway, raw, 1)
    assert answer.status in (200, 302)
    assert gateway.answered_fast == 0


async def test_a_fault_in_the_fast_path_still_gets_an_answer(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await make_gateway(fail=True)
    await warm(gateway)
    with caplog.at_level(logging.ERROR, "gateway.server"):
        (answer,) = await exchange(gateway, request(CONFIG_JSON, X_Forwarded_For=BEIJING_IP), 1)
    assert answer.status == 302 and answer.headers["X-Mirror-Node"] == "bj"
    assert "fast path failed on GET /acme/tiny-model" in caplog.text


COUNTED = (
    "_decisions_total",
    "_redirects_total",
    "_client_requests_total",
    "_request_duration_seconds_count",
)


async def test_fast_answers_are_counted_and_logged_as_aiohttp_answers_are(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gateways = [await make_gateway(True), await make_gateway(False)]
    beijing = request(CONFIG_JSON, X_Forwarded_For=BEIJING_IP, X_Request_ID="trace-9")
    lines, metrics = [], []
    for gateway in gateways:
        await warm(gateway)
        caplog.clear()
        with caplog.at_level(logging.INFO, "gateway.access"):
            await exchange(gateway, beijing + beijing, 2)
        (*_, record) = [r for r in caplog.records if r.name == "gateway.access"]
        fields = dict(record.fields)  # type: ignore[attr-defined]
        assert fields.pop("duration_ms") >= 0
        lines.append(fields)
        (text,) = await exchange(gateway, request("/metrics"), 1)
        metrics.append(
            sorted(
                line
                for line in text.body.decode().splitlines()
                if any(name in line for name in COUNTED)
            )
        )
    assert gateways[0].answered_fast == 2
    assert lines[0] == lines[1]
    assert lines[0]["node"] == "bj" and lines[0]["status"] == 302
    assert metrics[0] == metrics[1]
    assert metrics[0]


VALUES = [
    ("plain", "https://bj.mirror.test/a/b", True),
    ("tab", "a\tb", True),
    ("non-ascii", "café", True),
    ("lf", "a\nX-Injected: 1", False),
    ("cr", "a\rb", False),
    ("nul", "a\x00b", False),
    ("escape", "a\x1bb", False),
    ("del", "a\x7fb", False),
]


@pytest.mark.parametrize(("value", "written"), [c[1:] for c in VALUES], ids=[c[0] for c in VALUES])
@pytest.mark.parametrize(
    ("method", "body"), [("GET", "Content-Length: 0\r\n"), ("HEAD", "")], ids=["get", "head"]
)
def test_a_value_aiohttp_would_refuse_is_never_written(
    value: str, written: bool, method: str, body: str
) -> None:
    encoded = serialize_redirect({"Location": "https://x.test/f", "ETag": value}, method)
    assert (encoded is not None) == written
    if encoded is not None:
        head = encoded.decode()
        assert head.startswith("HTTP/1.1 302 Found\r\nLocation: https://x.test/f\r\n")
        assert f"\r\nETag: {value}\r\n{body}Date: " in head and head.endswith("\r\n\r\n")


def test_the_installed_aiohttp_has_every_internal_the_fast_path_reads() -> None:
    assert connection.internals_mismatch() is None


async def test_a_mismatched_aiohttp_serves_through_the_plain_path(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(connection, "AIOHTTP_MINOR", "3.0")
    with caplog.at_level(logging.WARNING, "gateway.server"):
        gateway = await make_gateway()
    assert "fast path, JSON parser errors, connection caps and head/body timeouts off: aiohttp" in (
        caplog.text
    )
    assert "the fast path is for 3.0" in caplog.text
    await warm(gateway)
    (answer,) = await exchange(gateway, request(CONFIG_JSON, X_Forwarded_For=BEIJING_IP), 1)
    assert answer.status == 302 and answer.headers["X-Mirror-Node"] == "bj"
    assert gateway.answered_fast == 0
