"""What the gateway relays to upstream: request bodies whole and bounded, 503/504 when upstream
is down or slow, and an overall time limit on a relayed answer.

A real gateway process, a real local hub and raw sockets on loopback.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_hub import FakeHub
from geoworld import GeoDBs
from processes import GatewayProcess, free_port, http, http_in_pieces, request
from slow_upstream import TricklingUpstream

PATHS_INFO = "/api/models/acme/tiny-model/paths-info/main"
PRIVATE_FILE = "/acme/private-model/resolve/main/config.json"
MAX_REQUEST_BYTES = 400_000


def config(geo: GeoDBs, upstream: str, **upstream_keys: Any) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream, "max_request_bytes": MAX_REQUEST_BYTES, **upstream_keys},
        "geoip": {"city_db": str(geo.city), "asn_db": str(geo.asn)},
        "probing": {"enabled": False},
    }


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    """A hub of this module's own: tests here slow it down and break it."""
    with FakeHub() as hub:
        yield hub


@pytest.fixture(scope="module")
def gateway(
    geo_dbs: GeoDBs, hub: FakeHub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(
        config(geo_dbs, hub.url, api_timeout_s=1.0), tmp_path_factory.mktemp("relay")
    )
    yield gateway
    assert gateway.stop() == 0


def paths_form(size: int) -> bytes:
    """A paths-info form of exactly ``size`` bytes whose last path is the only one that exists."""
    last = b"paths=config.json"
    padding = []
    filled = len(last)
    i = 0
    while filled < size:
        # Long paths: the hub, as aiohttp, takes at most 1,000 form fields.
        item = f"paths=missing-{i:07d}-{'x' * 960}&".encode()
        padding.append(item)
        filled += len(item)
        i += 1
    body = b"".join(padding) + last
    # Trim the first padding path so the body is exactly ``size`` bytes.
    extra = len(body) - size
    return body[:6] + body[6 + extra :] if extra else body


def head(target: str, headers: dict[str, str]) -> bytes:
    return request("POST", target, headers)


def split(data: bytes, pieces: int) -> list[bytes]:
    step = -(-len(data) // pieces)
    return [data[i : i + step] for i in range(0, len(data), step)]


def chunked(pieces: list[bytes]) -> list[bytes]:
    return [f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces] + [b"0\r\n\r\n"]


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.mark.parametrize(("size", "pieces"), [(1_000, 8), (300_000, 30)])
def test_a_body_sent_in_pieces_reaches_upstream_whole(
    gateway: GatewayProcess, hub: FakeHub, size: int, pieces: int
) -> None:
    body = paths_form(size)
    assert len(body) == size
    hub.clear_seen()
    status, _, answer = http_in_pieces(
        gateway.port,
        [head(PATHS_INFO, {**FORM, "Content-Length": str(size)}), *split(body, pieces)],
        0.02,
    )
    assert status == 200, answer
    assert [entry["path"] for entry in json.loads(answer)] == ["config.json"]
    (seen,) = hub.requests_to(PATHS_INFO)
    assert seen.header("Content-Length") == str(size)


def test_a_chunked_body_reaches_upstream_whole(gateway: GatewayProcess) -> None:
    body = paths_form(200_000)
    status, _, answer = http_in_pieces(
        gateway.port,
        [head(PATHS_INFO, {**FORM, "Transfer-Encoding": "chunked"}), *chunked(split(body, 16))],
        0.02,
    )
    assert status == 200, answer
    assert [entry["path"] for entry in json.loads(answer)] == ["config.json"]


def assert_json_error(
    status: int, headers: dict[str, str], body: bytes, expected: int, code: str
) -> dict[str, Any]:
    assert status == expected, body
    assert headers["content-type"].startswith("application/json")
    assert headers["x-request-id"]
    payload: dict[str, Any] = json.loads(body)
    assert payload["error"] == code, payload
    return payload


def test_a_body_over_the_limit_gets_413(gateway: GatewayProcess, hub: FakeHub) -> None:
    too_long = paths_form(MAX_REQUEST_BYTES + 1)
    declared = head(PATHS_INFO, {**FORM, "Content-Length": str(len(too_long))})
    payload = assert_json_error(*http(gateway.port, declared + too_long), 413, "body_too_large")
    assert "upstream.max_request_bytes" in payload["message"]

    body = paths_form(MAX_REQUEST_BYTES + 50_000)
    hub.clear_seen()
    answer = http_in_pieces(
        gateway.port,
        [head(PATHS_INFO, {**FORM, "Transfer-Encoding": "chunked"}), *chunked(split(body, 20))],
        0.01,
    )
    assert_json_error(*answer, 413, "body_too_large")


def test_upstream_down_is_503_on_every_relayed_route(
    geo_dbs: GeoDBs, gateway: GatewayProcess, hub: FakeHub, tmp_path: Path
) -> None:
    nowhere = GatewayProcess(config(geo_dbs, f"http://127.0.0.1:{free_port()}"), tmp_path)
    try:
        answer = nowhere.get("/api/models/acme/tiny-model")
        assert_json_error(*answer, 503, "upstream_unavailable")
        assert answer[1]["retry-after"] == "5"
    finally:
        assert nowhere.stop() == 0

    # The catalog has learnt the repository is private; the token's download is relayed.
    assert gateway.get(PRIVATE_FILE, hub.auth_headers())[0] == 200
    hub.failure_mode, hub.failing = "reset", True
    try:
        assert_json_error(
            *gateway.get(PRIVATE_FILE, hub.auth_headers()), 503, "upstream_unavailable"
        )
        assert_json_error(*gateway.get("/api/models/acme/tiny-model"), 503, "upstream_unavailable")
    finally:
        hub.failing, hub.failure_mode = False, "503"


def test_upstream_slow_is_504_on_every_relayed_route(gateway: GatewayProcess, hub: FakeHub) -> None:
    assert gateway.get(PRIVATE_FILE, hub.auth_headers())[0] == 200
    hub.delay_s = 3.0  # api_timeout_s is 1
    try:
        for target, headers in (
            (PRIVATE_FILE, hub.auth_headers()),
            ("/api/models/acme/tiny-model", {}),
            (PATHS_INFO, {**FORM, "Content-Length": "17"}),
        ):
            raw = request("POST" if target == PATHS_INFO else "GET", target, headers)
            if target == PATHS_INFO:
                raw += b"paths=config.json"
            started = time.monotonic()
            assert_json_error(*http(gateway.port, raw), 504, "upstream_timeout")
            assert time.monotonic() - started < 2.9
    finally:
        hub.delay_s = 0.0


def read_until_closed(port: int, raw: bytes, timeout: float) -> bytes:
    """Everything the gateway sends before it closes the connection (or resets it)."""
    received = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        try:
            while chunk := sock.recv(65536):
                received.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(received)


def test_a_trickling_relay_is_cut_at_relay_timeout(geo_dbs: GeoDBs, tmp_path: Path) -> None:
    size = 40
    with TricklingUpstream(size=size, interval_s=0.25) as upstream:  # 10 s for the whole body
        gateway = GatewayProcess(
            config(geo_dbs, upstream.url, api_timeout_s=5.0, relay_timeout_s=2.0), tmp_path
        )
        try:
            started = time.monotonic()
            data = read_until_closed(
                gateway.port, request("GET", "/api/models/acme/tiny-model", {}), timeout=15
            )
            elapsed = time.monotonic() - started
            gateway.wait_for_log("not complete within upstream.relay_timeout_s (2 s)")
        finally:
            assert gateway.stop() == 0
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 200"), data
    assert f"content-length: {size}".encode() in head_bytes.lower()
    assert 0 < len(body) < size, body
    assert 1.9 < elapsed < 6, elapsed
