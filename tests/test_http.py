from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fake_hub import FakeHub
from http_world import (
    BAD_PATHS,
    BEIJING_IP,
    CONFIG_JSON,
    DATA_MAIN,
    HF_ERRORS,
    HONG_KONG_IP,
    MAIN,
    PR_1,
    TOKYO_IP,
    US_IP,
    V1,
    GatewayTestServer,
    gateway_config,
    raw_exchange,
)

from gateway.config import GeoIPConfig
from gateway.geo.locator import MaxMindLocator
from gateway.routing.router import Router
from gateway.runtime import RUNTIME
from gateway.web.app import create_app
from gateway.web.server import build_runtime, handler_limits

MakeClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def make_client(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    geoip_config: GeoIPConfig,
    fake_hub: FakeHub,
) -> MakeClient:
    async def make(**sections: Any) -> TestClient[web.Request, web.Application]:
        config = gateway_config(geoip_config, fake_hub.url, **sections)
        router = Router(config, MaxMindLocator(config.geoip), random.Random(1))
        server = GatewayTestServer(create_app(build_runtime(router)))
        return await aiohttp_client(server, server_kwargs=handler_limits(config))

    return make


async def get(
    client: TestClient[web.Request, web.Application],
    path: str,
    method: str = "GET",
    **headers: str,
) -> tuple[int, Any, Any]:
    response = await client.request(method, path, headers=headers, allow_redirects=False)
    body = await response.read()
    payload = json.loads(body) if body and method != "HEAD" else None
    return response.status, response.headers, payload


async def test_beijing_client_behind_trusted_proxy_goes_to_domestic_node(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    status, headers, _ = await get(client, CONFIG_JSON, **{"X-Forwarded-For": BEIJING_IP})
    assert status == 302
    assert (
        headers["Location"] == f"https://bj.mirror.test/acme/tiny-model/resolve/{MAIN}/config.json"
    )
    assert headers["Cache-Control"] == "private, no-store"
    assert headers["X-Mirror-Node"] == "bj"
    assert "Vary" not in headers


async def test_redirects_count_requests_of_catalogued_files_only(make_client: MakeClient) -> None:
    client = await make_client()
    for _ in range(3):
        status, _, _ = await get(client, CONFIG_JSON, **{"X-Forwarded-For": BEIJING_IP})
        assert status == 302
    status, _, _ = await get(client, "/acme/tiny-model/resolve/main/absent.json")
    assert status == 404
    requests = client.server.app[RUNTIME].sync.requests
    assert requests.of("model", "acme/tiny-model", "config.json") == 3
    assert requests.of("model", "acme/tiny-model", "absent.json") == 0


async def test_us_client_goes_upstream(make_client: MakeClient, fake_hub: FakeHub) -> None:
    client = await make_client()
    for method in ("GET", "HEAD"):
        status, headers, _ = await get(client, CONFIG_JSON, method, **{"X-Forwarded-For": US_IP})
        assert status == 302
        assert headers["Location"] == f"{fake_hub.url}/acme/tiny-model/resolve/{MAIN}/config.json"
        assert headers["X-Mirror-Node"] == "upstream"


async def test_hong_kong_is_not_served_by_mainland_node(make_client: MakeClient) -> None:
    client = await make_client()
    _, headers, _ = await get(client, CONFIG_JSON, **{"X-Forwarded-For": HONG_KONG_IP})
    assert headers["X-Mirror-Node"] == "upstream"


async def test_untrusted_peer_cannot_spoof_its_location(make_client: MakeClient) -> None:
    client = await make_client(client_ip={"trusted_proxies": ["10.0.0.0/8"]})
    status, headers, _ = await get(client, CONFIG_JSON, **{"X-Forwarded-For": BEIJING_IP})
    assert status == 302
    assert headers["X-Mirror-Node"] == "upstream"


URL_CASES = [
    (
        "dataset",
        "/datasets/acme/data/resolve/main/data/train-00000.parquet",
        f"https://bj.mirror.test/datasets/acme/data/resolve/{DATA_MAIN}/data/train-00000.parquet",
    ),
    (
        "pr-ref-pinned-to-its-commit",
        "/acme/tiny-model/resolve/refs%2Fpr%2F1/pr-notes.txt",
        f"https://bj.mirror.test/acme/tiny-model/resolve/{PR_1}/pr-notes.txt",
    ),
    (
        "tag",
        "/acme/tiny-model/resolve/v1.0/config.json",
        f"https://bj.mirror.test/acme/tiny-model/resolve/{V1}/config.json",
    ),
    (
        "spaces-in-nested-path",
        "/acme/tiny-model/resolve/main/nested%20dir/with%20spaces/tokenizer.json",
        f"https://bj.mirror.test/acme/tiny-model/resolve/{MAIN}/nested%20dir/with%20spaces/tokenizer.json",
    ),
]


@pytest.mark.parametrize(
    ("path", "location"), [c[1:] for c in URL_CASES], ids=[c[0] for c in URL_CASES]
)
async def test_location_keeps_hf_encoding(
    make_client: MakeClient, path: str, location: str
) -> None:
    client = await make_client()
    status, headers, _ = await get(client, path, **{"X-Forwarded-For": BEIJING_IP})
    assert status == 302
    assert headers["Location"] == location


async def test_node_url_template(make_client: MakeClient) -> None:
    client = await make_client()
    _, headers, _ = await get(
        client, "/datasets/acme/data/resolve/main/README.md", **{"X-Forwarded-For": TOKYO_IP}
    )
    assert headers["Location"] == (
        f"http://tk.mirror.test:8080/base/hf/dataset/acme/data/{DATA_MAIN}/README.md"
    )


async def test_query_string_never_reaches_location(make_client: MakeClient) -> None:
    client = await make_client()
    _, headers, _ = await get(
        client, CONFIG_JSON + "?next=https://evil.test/", **{"X-Forwarded-For": BEIJING_IP}
    )
    assert (
        headers["Location"] == f"https://bj.mirror.test/acme/tiny-model/resolve/{MAIN}/config.json"
    )


@pytest.mark.parametrize(
    ("path", "status", "code"), [c[1:] for c in BAD_PATHS], ids=[c[0] for c in BAD_PATHS]
)
async def test_bad_paths_get_json_errors(
    make_client: MakeClient, path: str, status: int, code: str
) -> None:
    client = await make_client()
    # A raw socket: HTTP client libraries normalise '..' before sending.
    request = f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
    got_status, body, headers = await raw_exchange(client.host, client.port, request)
    assert got_status == status
    assert headers["content-type"].startswith("application/json")
    assert "location" not in headers
    payload = json.loads(body)
    assert payload["error"] == code
    assert payload["message"]


async def test_methods_other_than_get_and_head(make_client: MakeClient) -> None:
    client = await make_client()
    for path in (CONFIG_JSON, "/healthz", "/readyz"):
        status, headers, payload = await get(client, path, "POST")
        assert status == 405
        assert headers["Allow"] == "GET, HEAD"
        assert payload["error"] == "method_not_allowed"


async def test_health_and_readiness(make_client: MakeClient) -> None:
    client = await make_client()
    status, _, payload = await get(client, "/healthz")
    assert (status, payload) == (200, {"status": "ok"})
    status, _, payload = await get(client, "/readyz")
    assert status == 200
    assert payload["status"] == "ready"
    assert payload["nodes"] == 2


CDN = {"cdn_country_header": "cf-ipcountry", "cdn_client_ip_header": "cf-connecting-ip"}


async def test_cdn_geo_mode_makes_redirects_cacheable_per_country(make_client: MakeClient) -> None:
    client = await make_client(client_ip=CDN, responses={"cache_mode": "cdn-geo", "max_age": 30})
    _, headers, _ = await get(client, CONFIG_JSON, **{"CF-IPCountry": "CN"})
    assert headers["Location"].startswith("https://bj.mirror.test/")
    assert headers["Cache-Control"] == "public, max-age=30"
    assert headers["Vary"] == "cf-ipcountry"
    # Without the CDN's answer the route depends on the IP: never shared.
    _, headers, _ = await get(client, CONFIG_JSON, **{"X-Forwarded-For": BEIJING_IP})
    assert headers["Location"].startswith("https://bj.mirror.test/")
    assert headers["Cache-Control"] == "private, no-store"
    assert "Vary" not in headers


async def test_cdn_headers_in_private_mode(make_client: MakeClient) -> None:
    client = await make_client(client_ip=CDN)
    # The CDN's client IP wins over X-Forwarded-For from a trusted peer.
    _, headers, _ = await get(
        client, CONFIG_JSON, **{"CF-Connecting-IP": BEIJING_IP, "X-Forwarded-For": US_IP}
    )
    assert headers["X-Mirror-Node"] == "bj"
    # The CDN's country wins over the GeoIP country.
    _, headers, _ = await get(
        client, CONFIG_JSON, **{"X-Forwarded-For": US_IP, "CF-IPCountry": "jp"}
    )
    assert headers["X-Mirror-Node"] == "tk"
    assert headers["Cache-Control"] == "private, no-store"


PARSER_REJECTS = [
    (
        "huge-request-line",
        b"GET /a/b/resolve/main/" + b"x" * 20000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
    ),
    (
        "huge-header",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: " + b"1" * 20000 + b"\r\n\r\n",
    ),
    ("raw-utf8-target", "GET /a/b/resolve/main/é HTTP/1.1\r\nHost: t\r\n\r\n".encode()),
    ("bad-method", b"G(ET / HTTP/1.1\r\nHost: t\r\n\r\n"),
    ("header-without-colon", b"GET / HTTP/1.1\r\nHost: t\r\nbroken header\r\n\r\n"),
]


@pytest.mark.parametrize(
    "request_bytes", [c[1] for c in PARSER_REJECTS], ids=[c[0] for c in PARSER_REJECTS]
)
async def test_requests_the_parser_rejects_get_json(
    make_client: MakeClient, request_bytes: bytes
) -> None:
    client = await make_client()
    status, body, headers = await raw_exchange(client.host, client.port, request_bytes)
    assert 400 <= status < 500
    assert headers["content-type"].startswith("application/json")
    payload = json.loads(body)
    assert payload["error"] in {"line_too_long", "bad_request", "bad_method"}
    assert "Traceback" not in payload["message"]


async def test_upstream_down_gives_a_retryable_error_until_something_is_cached(
    make_client: MakeClient,
) -> None:
    with FakeHub() as hub:
        hub.failing = True
        client = await make_client(upstream={"url": hub.url}, catalog={"retry_after_s": 7})
        status, headers, payload = await get(client, CONFIG_JSON, **{"X-Forwarded-For": BEIJING_IP})
        assert status == 503
        assert headers["Retry-After"] == "7"
        assert "X-Error-Code" not in headers, "no error code: clients treat it as transient"
        assert payload["error"] == "upstream_unavailable"

        hub.failing = False
        status, _, _ = await get(client, CONFIG_JSON, **{"X-Forwarded-For": BEIJING_IP})
        assert status == 302
        hub.failing = True
        status, headers, _ = await get(client, CONFIG_JSON, **{"X-Forwarded-For": BEIJING_IP})
        assert status == 302, "served from the catalog while upstream is down"
        assert headers["X-Repo-Commit"] == MAIN


@pytest.mark.parametrize(
    ("path", "status", "code", "commit"), [c[1:] for c in HF_ERRORS], ids=[c[0] for c in HF_ERRORS]
)
async def test_hf_errors_carry_the_error_code(
    make_client: MakeClient, path: str, status: int, code: str, commit: str | None
) -> None:
    client = await make_client()
    got, headers, _ = await get(client, path, "HEAD", **{"X-Forwarded-For": BEIJING_IP})
    assert (got, headers["X-Error-Code"]) == (status, code)
    assert headers.get("X-Repo-Commit") == commit
    assert "Location" not in headers
