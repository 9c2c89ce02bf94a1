"""Connections, over real sockets against ``python -m gateway serve``: every phase of a
connection is timed out, caps hold, fd exhaustion is avoided, and the parser's answers are JSON,
in order and without anything the client sent.

Clients come from distinct loopback addresses (127.0.0.0/8 all reaches the gateway), and
loopback is not a trusted proxy here, so the per-address cap applies to them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_hub import FakeHub
from geoworld import GeoDBs
from processes import GatewayProcess, http, request, wait_until

from gateway.metrics import Refusal
from gateway.web import connection_limits
from gateway.web.connection_limits import ConnectionLimits, Refused
from gateway.web.redaction import redact

RESOLVE = "/acme/tiny-model/resolve/main/config.json"
TOKEN = "hf_" + "Q" * 34


def config(geo: GeoDBs, upstream: str, **server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "upstream": {"url": upstream},
        "geoip": {"city_db": str(geo.city), "asn_db": str(geo.asn)},
        "probing": {"enabled": False},
        "client_ip": {"trusted_proxies": ["192.0.2.0/24"]},
        "nodes": [
            {"id": "bj", "url": "https://bj.example", "country": "CN",
             "serves": {"countries": ["CN"]}},
        ],
    }  # fmt: skip


def connect(port: int, source: str, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout, (source, 0))


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the gateway closed ``sock`` (anything it sent is skipped), or None."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def exchange(sock: socket.socket, data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``data``; read answers (Content-Length framed) until the gateway closes."""
    sock.sendall(data)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    answers = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers.get("content-length", "0"))
        answers.append((int(lines[0].split()[1]), headers, rest[:length]))
        received = rest[length:]
    return answers


def metric(gateway: GatewayProcess, name: str, labels: str) -> float:
    text = gateway.get("/metrics")[2].decode()
    match = re.search(rf"^mirror_gateway_{name}_total\{{{labels}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def gateway(geo_dbs: GeoDBs, fake_hub: FakeHub, tmp_path: Path) -> Iterator[GatewayProcess]:
    process = GatewayProcess(
        config(
            geo_dbs,
            fake_hub.url,
            header_timeout_s=1,
            body_timeout_s=1,
            keepalive_timeout_s=1.5,
        ),
        tmp_path,
        log_level="DEBUG",
    )
    yield process
    process.stop()


# --------------------------------------------------------------------------- the rules alone


async def test_caps_count_per_address_and_in_total_and_exempt_trusted_proxies() -> None:
    refusals: list[Refusal] = []
    limits = ConnectionLimits(4, 2, [ipaddress.ip_network("10.0.0.0/8")], refusals.append)
    a = limits.admit("192.0.2.1")
    limits.admit("192.0.2.1")
    with pytest.raises(Refused):
        limits.admit("192.0.2.1")
    # One IPv6 /64 is one client; a trusted proxy is held to the total only.
    limits.admit("2001:db8::1")
    limits.admit("10.1.1.1")
    with pytest.raises(Refused):
        limits.admit("10.1.1.1")
    assert refusals == ["max_connections_per_ip", "max_connections"]
    limits.release(a)
    limits.admit("10.1.1.1")
    with pytest.raises(Refused):
        limits.admit("2001:db8::2")  # the total again, before the /64's count of 1 matters
    limits.release("2001:db8::/64")
    limits.release(None)
    limits.admit("2001:db8::ffff")


async def test_refusals_are_logged_once_per_interval_and_summed(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection_limits, "REPORT_INTERVAL_S", 0.2)
    limits = ConnectionLimits(0, 1, [], lambda reason: None)
    with caplog.at_level(logging.WARNING, "gateway.server"):
        for _ in range(50):
            with pytest.raises(Refused):
                limits.admit("192.0.2.7")
        assert len(caplog.records) == 1
        await asyncio.sleep(0.3)
    assert [r.getMessage() for r in caplog.records] == [
        "refused new connections: 1 by max_connections (last from 192.0.2.7)",
        "refused new connections: 49 by max_connections (last from 192.0.2.7)",
    ]


@pytest.mark.parametrize(
    "text",
    [
        f"Got more than 8190 bytes when reading: b'Authorization: Bearer {TOKEN}'.",
        f"Invalid HTTP header: 'Cookie: session={TOKEN}'",
        f"Invalid header value:\n\n  b'Bearer {TOKEN}'\n       ^",
        f"unexpected Proxy-Authorization: Basic {TOKEN[3:]}",
        f"bad token {TOKEN} here",
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
    ],
)
def test_redaction_leaves_no_credential(text: str) -> None:
    redacted = redact(text)
    assert redacted.split(maxsplit=1)[0] == text.split(maxsplit=1)[0]
    for secret in (TOKEN[3:15], "Bearer", "session=", "eyJ", "Basic"):
        assert secret not in redacted


# --------------------------------------------------------------------------- timeouts


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    gateway: GatewayProcess,
) -> None:
    with connect(gateway.port, "127.0.0.2") as sock:
        elapsed = closed_within(sock, 10)
    assert elapsed is not None and 0.8 <= elapsed < 5
    assert metric(gateway, "connections_timed_out", 'phase="header"') == 1


def test_a_head_sent_slowly_is_cut_however_steady_the_trickle(gateway: GatewayProcess) -> None:
    with connect(gateway.port, "127.0.0.2") as sock:
        time.sleep(0.6)  # idle at first: the head's time runs from its first byte
        sock.sendall(f"GET {RESOLVE} HTTP/1.1\r\n".encode())
        started = time.monotonic()
        sock.settimeout(0.2)
        closed = False
        while not closed and time.monotonic() - started < 10:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                closed = sock.recv(65536) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
    assert closed
    assert time.monotonic() - started < 5
    gateway.wait_for_log("request header too slow")


def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(
    gateway: GatewayProcess,
) -> None:
    with connect(gateway.port, "127.0.0.2") as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        elapsed = closed_within(sock, 10)
    assert elapsed is not None and 1.2 <= elapsed < 5


def test_a_body_sent_too_slowly_is_cut(gateway: GatewayProcess) -> None:
    with connect(gateway.port, "127.0.0.2") as sock:
        sock.sendall(
            b"POST /api/models/acme/tiny-model/paths-info/main HTTP/1.1\r\nHost: gateway.test\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n"
            b"paths=config.json"
        )
        elapsed = closed_within(sock, 10)
    assert elapsed is not None and 0.8 <= elapsed < 5
    assert metric(gateway, "connections_timed_out", 'phase="body"') == 1


# --------------------------------------------------------------------------- caps


def test_connections_over_the_per_address_cap_are_refused_and_others_served(
    geo_dbs: GeoDBs, fake_hub: FakeHub, tmp_path: Path
) -> None:
    gateway = GatewayProcess(
        config(geo_dbs, fake_hub.url, max_connections_per_ip=5), tmp_path, log_level="DEBUG"
    )
    held = [connect(gateway.port, "127.0.0.3") for _ in range(5)]
    try:
        for sock in held:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        with connect(gateway.port, "127.0.0.3") as refused:
            elapsed = closed_within(refused, 5)
        assert elapsed is not None and elapsed < 1
        with connect(gateway.port, "127.0.0.4") as other:
            assert exchange(other, request("GET", RESOLVE))[0][0] == 302
        # The held ones are served as soon as they finish their heads.
        for sock in held:
            assert exchange(sock, b"Host: gateway.test\r\nConnection: close\r\n\r\n")[0][0] == 200
        gateway.wait_for_log("refused new connections: 1 by max_connections_per_ip")
        assert metric(gateway, "connections_refused", 'reason="max_connections_per_ip"') == 1
    finally:
        for sock in held:
            sock.close()
        gateway.stop()
    assert "(last from 127.0.0.3)" in gateway.log.read_text()


class _Flood:
    """Idle and slowloris connections from several source addresses, driven from one thread.

    At most ``WAVE`` connect at once, so none waits in SYN retries behind a full listen queue
    (the gateway cannot close what the kernel has not let it accept). Every other connection
    sends a header line every ``interval_s`` until the gateway closes it.
    """

    WAVE = 64

    def __init__(self, port: int, count: int, sources: list[str], interval_s: float) -> None:
        self._port = port
        self._sources = sources
        self._interval_s = interval_s
        self._to_open = count
        self._connecting = 0
        self._begun: set[socket.socket] = set()
        self.selector = selectors.DefaultSelector()
        self.open: set[socket.socket] = set()
        self.established = 0

    def run(self, until: float) -> None:
        """Open, trickle and watch for closes until every connection is closed, or ``until``."""
        next_trickle = 0.0
        while (self.open or self._to_open) and time.monotonic() < until:
            while self._to_open and self._connecting < self.WAVE:
                self._connect()
            if time.monotonic() >= next_trickle:
                for key in list(self.selector.get_map().values()):
                    if key.data == "slow":
                        self._send(key.fileobj)  # type: ignore[arg-type]
                next_trickle = time.monotonic() + self._interval_s
            for key, _ in self.selector.select(0.05):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if key.events == selectors.EVENT_WRITE:
                    self._connected(sock)
                else:
                    self._read(sock)

    def _connect(self) -> None:
        self._to_open -= 1
        sock = socket.socket()
        sock.bind((self._sources[self._to_open % len(self._sources)], 0))
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", self._port))
        self._connecting += 1
        self.open.add(sock)
        self.selector.register(sock, selectors.EVENT_WRITE, "slow" if self._to_open % 2 else "idle")

    def _connected(self, sock: socket.socket) -> None:
        self._connecting -= 1
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            raise AssertionError("a flood connection could not connect")
        self.established += 1
        self.selector.modify(sock, selectors.EVENT_READ, self.selector.get_key(sock).data)

    def _send(self, sock: socket.socket) -> None:
        begun = sock in self._begun
        try:
            sock.send(b"X-Slow: 1\r\n" if begun else b"GET / HTTP/1.1\r\n")
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._closed(sock)
            return
        self._begun.add(sock)

    def _read(self, sock: socket.socket) -> None:
        try:
            if sock.recv(65536) == b"":
                self._closed(sock)
        except BlockingIOError:
            pass
        except OSError:
            self._closed(sock)

    def _closed(self, sock: socket.socket) -> None:
        if sock in self.open:
            self.selector.unregister(sock)
            self.open.discard(sock)
            sock.close()

    def close(self) -> None:
        for sock in list(self.open):
            self._closed(sock)
        self.selector.close()


def _served_meanwhile(port: int, stop: threading.Event, statuses: list[int]) -> None:
    """A client already connected before the flood: one keep-alive connection, request after
    request, each answer recorded (0 for a failure)."""
    with connect(port, "127.0.0.2", timeout=5) as sock:
        target = f"GET {RESOLVE} HTTP/1.1\r\nHost: gateway.test\r\n\r\n".encode()
        buffered = b""
        while not stop.is_set():
            try:
                sock.sendall(target)
                while b"\r\n\r\n" not in buffered:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionResetError("closed")
                    buffered += chunk
            except OSError:
                statuses.append(0)
                return
            head, _, buffered = buffered.partition(b"\r\n\r\n")
            statuses.append(int(head.split()[1]))
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
            buffered = buffered[length:]
            time.sleep(0.05)


def test_a_flood_of_idle_and_slow_connections_under_a_low_fd_limit(
    geo_dbs: GeoDBs, fake_hub: FakeHub, tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    gateway = GatewayProcess(
        config(geo_dbs, fake_hub.url, header_timeout_s=5, keepalive_timeout_s=10),
        tmp_path,
        open_files=1024,
    )
    stop = threading.Event()
    statuses: list[list[int]] = [[] for _ in range(4)]
    clients = [
        threading.Thread(target=_served_meanwhile, args=(gateway.port, stop, s)) for s in statuses
    ]
    flood: _Flood | None = None
    try:
        for client in clients:
            client.start()
        wait_until(lambda: all(statuses), 5, "the clients' first answers")
        started = time.monotonic()
        # 8 addresses x 250: under the per-address cap, far over what 1,024 fds hold.
        flood = _Flood(gateway.port, 2000, [f"127.0.1.{i}" for i in range(8)], 0.3)
        flood.run(until=started + 15)
        closed_after = time.monotonic() - started
        stop.set()
        for client in clients:
            client.join(5)
        assert flood.established == 2000
        assert not flood.open, f"{len(flood.open)} of 2000 connections still open after 15 s"
        # Answered all along, on connections the flood never closed.
        answered = [len(s) for s in statuses]
        assert all(status == 302 for s in statuses for status in s), statuses
        assert min(answered) >= 20, answered
        # And new clients are let in once the flood is gone.
        assert http(gateway.port, request("GET", RESOLVE))[0] == 302
        refused = metric(gateway, "connections_refused", 'reason="max_connections"')
        timed_out = metric(gateway, "connections_timed_out", 'phase="header"')
    finally:
        stop.set()
        if flood is not None:
            flood.close()
        gateway.stop()
    log = gateway.log.read_text()
    assert "server.max_connections lowered from 10000 to 768" in log
    assert "refused new connections:" in log
    # Every flood connection was refused at once or cut by the header timeout.
    assert refused > 0 and timed_out > 0 and refused + timed_out == 2000
    assert closed_after < 15
    assert '"level": "error"' not in log, log


# --------------------------------------------------------------------------- what the parser sees


def test_a_credential_in_an_over_long_header_is_not_echoed_nor_logged(
    gateway: GatewayProcess,
) -> None:
    for header in (f"Authorization: Bearer {TOKEN}", f"Cookie: session={TOKEN}"):
        padding = "a" * 9000
        raw = f"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\n{header}{padding}\r\n\r\n"
        with connect(gateway.port, "127.0.0.2") as sock:
            [(status, headers, body)] = exchange(sock, raw.encode())
        assert status == 400
        assert json.loads(body)["error"] == "line_too_long"
        assert headers["x-request-id"]
        assert TOKEN[:12] not in body.decode() and "Bearer" not in body.decode()
    wait_until(
        lambda: gateway.log.read_text().count("rejected malformed request") == 2, 5, "two lines"
    )
    assert TOKEN[:12] not in gateway.log.read_text()


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "aiohttp-path"])
@pytest.mark.parametrize(
    "malformed",
    [b"GET /x HTTP/1.1\r\nHo\x01st: x\r\n\r\n", b"BAD\x01 / HTTP/1.1\r\n\r\n"],
    ids=["bad-header", "bad-method"],
)
def test_the_requests_before_a_malformed_one_are_answered_first(
    geo_dbs: GeoDBs, fake_hub: FakeHub, tmp_path: Path, fast_path: bool, malformed: bytes
) -> None:
    gateway = GatewayProcess(config(geo_dbs, fake_hub.url, fast_path=fast_path), tmp_path)
    try:
        good = f"GET {RESOLVE} HTTP/1.1\r\nHost: gateway.test\r\n\r\n".encode()
        with connect(gateway.port, "127.0.0.2") as sock:
            answers = exchange(sock, good + good + malformed + good)
    finally:
        gateway.stop()
    assert [status for status, _, _ in answers] == [302, 302, 400]
    assert json.loads(answers[2][2])["error"] in {"bad_request", "bad_method"}


@pytest.mark.parametrize(
    ("raw", "status", "error"),
    [
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405,
         "method_not_allowed"),
        (b"OPTIONS * HTTP/1.1\r\nHost: gateway.test\r\n\r\n", 400, "bad_target"),
    ],
    ids=["connect", "options-asterisk"],
)  # fmt: skip
def test_targets_that_are_not_paths_get_json(
    gateway: GatewayProcess, raw: bytes, status: int, error: str
) -> None:
    with connect(gateway.port, "127.0.0.2") as sock:
        [(got, headers, body)] = exchange(sock, raw + request("GET", "/healthz"))
    assert (got, json.loads(body)["error"]) == (status, error)
    assert headers["content-type"].startswith("application/json")
    assert headers["x-request-id"]
    assert headers["connection"] == "close"
