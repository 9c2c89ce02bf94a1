"""Explain: every node with its live state and why it was chosen or excluded, as data and as a
page; client overrides need the admin token; explaining counts no redirect and changes nothing.

The world (tests/explain_world.py, shared with tests/test_metalink.py): a Beijing client in
AS4134 and, in China, two good mirrors (``bj`` in the client's network, ``sh`` in Shanghai), a
mirror one commit behind (``lag``), one serving corrupt bytes (``bad``), and a node excluded for
each other reason the policy has. ``routing.max_tier`` is ``country``.
"""

from __future__ import annotations

import json
import time
from html.parser import HTMLParser

import explain_world
import pytest
from explain_world import (
    ADMIN,
    CONFIG_JSON,
    FROM_BEIJING,
    WEIGHTS,
    AiohttpClient,
    World,
    gateway_client,
    open_world,
    world_nodes,
)
from fake_hub import FakeHub
from geoworld import ASHBURN_IP, BEIJING_IP, TOKYO_IP
from hf_nodes import HfMirrorNode
from http_world import BAD_PATHS, HF_ERRORS, gateway_config, raw_exchange

from gateway.config import GeoIPConfig
from gateway.explain import render_html
from gateway.state.live import LoadRecord

# tests/explain_world.py's fixtures, for this module's tests.
mirrors = explain_world.mirrors
world = explain_world.world


# --------------------------------------------------------------------------- the report

#: node -> (outcome, reason, a piece of the detail)
EXPECTED_NODES = {
    "bj": ("chosen", "same_asn", "rank 1 of 2 eligible"),
    "sh": ("eligible", "eligible", "rank 2 of 2"),
    "lag": ("excluded", "missing_revision", "does not hold commit"),
    "bad": ("excluded", "missing_revision", "failed verification of"),
    "off": ("excluded", "disabled", "enabled: false"),
    "admin-off": ("excluded", "admin_disabled", "operator"),
    "hk": ("excluded", "outside_service_area", "outside the node's service area"),
    "jp": ("excluded", "beyond_max_tier", "policy allows up to country"),
    "down": ("excluded", "down", "status 503"),
    "drain": ("excluded", "draining", "draining"),
    "busy": ("excluded", "at_capacity", "load 100%"),
    "flaky": ("excluded", "transport_failing", "timed out or could not connect"),
}


async def test_every_node_appears_with_its_reason(world: World) -> None:
    status, report = await world.explain(CONFIG_JSON, **FROM_BEIJING)
    assert status == 200
    nodes = {n["node"]: n for n in report["nodes"]}
    assert [n["node"] for n in report["nodes"]][:2] == ["bj", "sh"], "eligible nodes first"
    assert set(nodes) == set(EXPECTED_NODES)
    for node_id, (outcome, reason, detail) in EXPECTED_NODES.items():
        assert (nodes[node_id]["outcome"], nodes[node_id]["reason"]) == (outcome, reason), node_id
        assert detail in nodes[node_id]["detail"], (node_id, nodes[node_id]["detail"])
    assert report["decision"] | {"detail": None} == {
        "target": "bj",
        "reason": "same_asn",
        "detail": None,
        "location": f"{world.mirrors['bj'].url}/acme/tiny-model/resolve/{world.main}/config.json",
        "revision": world.main,
        "shared_cacheable": False,
    }
    # The CLI's keys are still there, from the same decision.
    assert [c["node"] for c in report["candidates"]] == ["bj", "sh"]
    assert {e["node"]: e["reason"] for e in report["excluded"]} == {
        k: v[1] for k, v in EXPECTED_NODES.items() if v[0] == "excluded"
    }


async def test_report_shows_client_file_and_live_state(world: World) -> None:
    _, report = await world.explain(WEIGHTS, **FROM_BEIJING)
    assert report["client"] == {
        "ip": BEIJING_IP,
        "ip_source": "x-forwarded-for",
        "cdn_country": None,
        "country": "CN",
        "continent": "AS",
        "latitude": 39.9042,
        "longitude": 116.4074,
        "asn": 4134,
        "asn_org": "CHINANET",
    }
    weights = world.hub.repo("acme/tiny-model").head()
    assert report["request"] == {
        "path": WEIGHTS,
        "repo_type": "model",
        "repo_id": "acme/tiny-model",
        "revision": "main",
        "file": "model.safetensors",
        "commit": world.main,
        "size": weights.size("model.safetensors"),
        "etag": weights.sha256("model.safetensors"),
        "lfs": True,
        "client_override": False,
    }
    nodes = {n["node"]: n for n in report["nodes"]}
    assert nodes["bj"]["tier"] == "asn" and nodes["bj"]["distance_km"] < 1
    assert nodes["sh"]["tier"] == "country" and 1000 < nodes["sh"]["distance_km"] < 1100
    assert nodes["sh"]["score"] is not None and nodes["down"]["score"] is None
    assert nodes["jp"]["tier"] == "continent"
    assert nodes["down"]["state"] == {
        "up": False,
        "down_reason": "status 503",
        "admin": "active",
        "latency_ms": None,
        "load": None,
        "transport_failing": False,
    }
    assert nodes["flaky"]["state"]["latency_ms"] == 12.0
    assert nodes["flaky"]["state"]["transport_failing"] is True
    assert nodes["drain"]["state"]["admin"] == "draining"
    assert nodes["admin-off"]["state"]["admin"] == "disabled"
    assert nodes["busy"]["state"]["load"] == 1.0
    # Every term of every node's cost, and each node's chance among the near-equals.
    assert nodes["bj"]["cost"]["asn_bonus_km"] == 100.0
    assert nodes["bj"]["cost"]["country_bonus_km"] == 200.0
    assert nodes["sh"]["cost"]["asn_bonus_km"] == 0.0
    assert nodes["sh"]["cost"]["total_km"] == pytest.approx(
        nodes["sh"]["distance_km"] - 200, abs=0.2
    )
    assert nodes["flaky"]["cost"]["latency_km"] == 120.0
    assert nodes["busy"]["expected_load"] == 1.0 and nodes["busy"]["share"] == 0.0
    assert sum(node["share"] for node in report["nodes"]) == pytest.approx(1.0)
    assert nodes["bj"]["holds_revision"] is True and nodes["bj"]["sync_detail"] is None
    assert nodes["lag"]["holds_revision"] is False
    assert "does not hold commit" in nodes["lag"]["sync_detail"]
    # Holding the revision is reported whatever else excluded the node.
    assert nodes["down"]["holds_revision"] is True


async def test_everything_at_capacity_chooses_the_last_resort(
    aiohttp_client: AiohttpClient,
    geoip_config: GeoIPConfig,
    fake_hub: FakeHub,
    mirrors: dict[str, HfMirrorNode],
) -> None:
    world = await open_world(aiohttp_client, geoip_config, fake_hub, mirrors)
    now = time.time()
    for node_id in ("bj", "sh"):
        await world.runtime.store.publish_load(
            LoadRecord(node_id, "status-json", 50, capacity_connections=50, measured_at=now)
        )
    _, report = await world.explain(CONFIG_JSON, **FROM_BEIJING)
    nodes = {n["node"]: n for n in report["nodes"]}
    assert report["decision"]["reason"] == "at_capacity_last_resort"
    assert nodes["bj"]["outcome"] == "chosen"
    assert nodes["bj"]["reason"] == "at_capacity_last_resort"
    assert nodes["sh"]["outcome"] == "excluded" and nodes["sh"]["reason"] == "at_capacity"


async def test_no_eligible_node_means_upstream(world: World) -> None:
    # No node is in the US, and max_tier is country.
    _, report = await world.explain(CONFIG_JSON, f"?ip={ASHBURN_IP}", **ADMIN)
    assert report["decision"]["target"] == "upstream"
    assert report["decision"]["reason"] == "no_eligible_node"
    assert report["decision"]["location"].startswith(world.hub.url)
    assert all(n["outcome"] == "excluded" for n in report["nodes"])


@pytest.mark.parametrize(
    ("path", "lagging"),
    [
        ("/datasets/acme/data/resolve/main/README.md", "does not hold dataset acme/data"),
        ("/acme/tiny-model/resolve/v1.0/config.json", None),
    ],
    ids=["dataset", "tag-the-lagging-node-holds"],
)
async def test_datasets_and_tags_are_explained(
    world: World, path: str, lagging: str | None
) -> None:
    status, report = await world.explain(path, **FROM_BEIJING)
    assert status == 200
    assert report["decision"]["target"] == "bj"
    lag = next(n for n in report["nodes"] if n["node"] == "lag")
    assert lag["sync_detail"] == lagging
    assert lag["outcome"] == ("eligible" if lagging is None else "excluded")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [c[1:4] for c in HF_ERRORS if c[0] != "gated-without-token"],
    ids=[c[0] for c in HF_ERRORS if c[0] != "gated-without-token"],
)
async def test_catalog_errors_as_for_resolve(
    world: World, path: str, status: int, code: str
) -> None:
    response = await world.get(f"/explain{path}", **FROM_BEIJING)
    assert (response.status, response.headers["X-Error-Code"]) == (status, code)
    assert response.content_type == "application/json"


@pytest.mark.parametrize(
    ("path", "status", "code"), [c[1:] for c in BAD_PATHS], ids=[c[0] for c in BAD_PATHS]
)
async def test_bad_paths_as_for_resolve(world: World, path: str, status: int, code: str) -> None:
    client = world.client
    # A raw socket: HTTP client libraries normalise '..' before sending.
    request = f"GET /explain{path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
    got, body, headers = await raw_exchange(client.host, client.port, request)
    assert (got, json.loads(body)["error"]) == (status, code)
    assert headers["content-type"].startswith("application/json")


async def test_upstream_down_is_retryable(
    aiohttp_client: AiohttpClient, geoip_config: GeoIPConfig
) -> None:
    with FakeHub() as hub:
        hub.failing = True
        client = await gateway_client(aiohttp_client, gateway_config(geoip_config, hub.url))
        response = await client.get(f"/explain{CONFIG_JSON}")
        assert response.status == 503 and "Retry-After" in response.headers


async def test_gated_repo_is_upstream_only_and_no_token_leaves(world: World) -> None:
    before = len(world.hub.seen)
    status, report = await world.explain(
        "/acme/gated-model/resolve/main/model.safetensors",
        **FROM_BEIJING,
        Authorization="Bearer hf_fake_valid_token",
    )
    assert status == 200
    assert report["decision"] == {
        "target": "upstream",
        "reason": "upstream_only",
        "detail": "upstream only (private or gated)",
        "location": None,
        "revision": None,
        "shared_cacheable": False,
    }
    assert report["client"]["country"] == "CN"
    asked = world.hub.seen[before:]
    assert all(r.header("Authorization") is None for r in asked), "a token reached upstream"
    assert not any("/resolve/" in r.path for r in asked), "explain fetched the file"


# --------------------------------------------------------------------------- overrides


async def test_override_needs_the_admin_token(world: World) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-token-of-16-chars"}):
        status, payload = await world.explain(CONFIG_JSON, f"?ip={TOKYO_IP}", **headers)
        assert status == 403
        assert "admin token" in payload["message"]
    status, payload = await world.explain(CONFIG_JSON, "?country=JP", **FROM_BEIJING)
    assert status == 403

    status, report = await world.explain(CONFIG_JSON, f"?ip={TOKYO_IP}", **ADMIN)
    assert status == 200
    assert report["client"]["ip"] == TOKYO_IP and report["client"]["country"] == "JP"
    assert report["request"]["client_override"] is True
    assert report["decision"]["target"] == "jp"


async def test_country_override_gives_the_cdn_view(world: World) -> None:
    status, report = await world.explain(CONFIG_JSON, f"?ip={TOKYO_IP}&country=cn", **ADMIN)
    assert status == 200
    assert report["client"]["cdn_country"] == "CN" and report["client"]["country"] == "CN"
    assert report["decision"]["target"] in {"bj", "sh"}


@pytest.mark.parametrize(
    ("query", "code"),
    [("?ip=1.2.3", "bad_ip"), ("?ip=", "bad_ip"), ("?ip=1.2.3.4&country=CHN", "bad_country")],
)
async def test_bad_override(world: World, query: str, code: str) -> None:
    status, payload = await world.explain(CONFIG_JSON, query, **ADMIN)
    assert (status, payload["error"]) == (400, code)


async def test_override_refused_while_the_admin_api_is_off(
    aiohttp_client: AiohttpClient,
    geoip_config: GeoIPConfig,
    fake_hub: FakeHub,
    mirrors: dict[str, HfMirrorNode],
) -> None:
    config = gateway_config(geoip_config, fake_hub.url, nodes=world_nodes(mirrors)[:2])
    client = await gateway_client(aiohttp_client, config)
    response = await client.get(f"/explain{CONFIG_JSON}?ip={TOKYO_IP}", headers=ADMIN)
    assert response.status == 403
    assert "admin.token unset" in (await response.json())["message"]


# --------------------------------------------------------------------------- no side effects


async def test_explain_counts_no_redirect_and_changes_no_state(world: World) -> None:
    store = world.runtime.store
    statuses = dict(store.live.statuses)
    for _ in range(3):
        assert (await world.explain(CONFIG_JSON, **FROM_BEIJING))[0] == 200
        assert (await world.explain(CONFIG_JSON, f"?ip={TOKYO_IP}", **ADMIN))[0] == 200
    assert store.redirects.current == {}
    assert store.live.statuses == statuses
    # The same request as a download is counted.
    assert (await world.get(CONFIG_JSON, **FROM_BEIJING)).status == 302
    assert store.redirects.current == {"bj": 1}


# --------------------------------------------------------------------------- HTML


class _Structure(HTMLParser):
    """Fails on tags closed out of order; records text and start tags."""

    VOID = frozenset({"meta", "br", "hr", "img", "input", "link"})

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.tags: list[str] = []
        self.attributes: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.update(name for name, _ in attrs)
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse_page(page: str) -> _Structure:
    parser = _Structure()
    parser.feed(page)
    parser.close()
    assert parser.open == [], f"unclosed: {parser.open}"
    return parser


@pytest.mark.parametrize(
    "headers",
    [
        {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"},
        {"Accept": "*/*"},
    ],
    ids=["browser", "format-param"],
)
async def test_html_page(world: World, headers: dict[str, str]) -> None:
    query = "" if "text/html" in headers["Accept"] else "?format=html"
    response = await world.get(f"/explain{CONFIG_JSON}{query}", **FROM_BEIJING, **headers)
    assert response.status == 200 and response.content_type == "text/html"
    assert response.headers["Cache-Control"] == "private, no-store"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    page = parse_page(await response.text())
    text = " ".join(page.text)
    for node_id, (outcome, reason, _) in EXPECTED_NODES.items():
        assert node_id in text and reason in text and outcome in text


async def test_json_is_the_default(world: World) -> None:
    for accept in ("*/*", "application/json", "text/html;q=0.5, application/json"):
        response = await world.get(f"/explain{CONFIG_JSON}", Accept=accept)
        assert response.content_type == "application/json", accept
    status, payload = await world.explain(CONFIG_JSON, "?format=xml")
    assert (status, payload["error"]) == (400, "bad_format")


def test_html_escapes_everything() -> None:
    hostile = "<script>alert('x')</script>"
    report = {
        "request": {"path": f"/a/b/resolve/main/{hostile}"},
        "client": {"ip": hostile, "country": '"><img src=x onerror=alert(1)>'},
        "decision": {"target": hostile, "reason": hostile},
        "nodes": [
            {
                "node": hostile,
                "outcome": f'chosen" onmouseover="{hostile}',
                "reason": hostile,
                "detail": "a & b < c",
                "state": {"up": True, "down_reason": hostile},
            }
        ],
    }
    page = render_html(report)
    parsed = parse_page(page)
    assert "script" not in parsed.tags and "img" not in parsed.tags
    assert parsed.attributes == {"lang", "charset", "class"}
    assert hostile in " ".join(parsed.text), "shown as text"
