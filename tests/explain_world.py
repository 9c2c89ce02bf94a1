"""The world of the explain and Metalink tests: a Beijing client in AS4134 and, in China, two
good mirrors (``bj`` in the client's network, ``sh`` in Shanghai), a mirror one commit behind
(``lag``), one serving corrupt bytes (``bad``), and a node excluded for each other reason the
policy has. ``routing.max_tier`` is ``country``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from fake_hub import FakeHub
from geoworld import BEIJING_IP
from hf_nodes import HfMirrorNode
from http_world import GatewayTestServer, gateway_config

from gateway.config import GatewayConfig, GeoIPConfig
from gateway.geo.locator import MaxMindLocator
from gateway.routing.router import Router
from gateway.runtime import RUNTIME, Runtime
from gateway.state.live import LoadRecord, ProbeRecord
from gateway.web.app import create_app
from gateway.web.server import build_runtime, handler_limits

ADMIN_TOKEN = "explain-test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FROM_BEIJING = {"X-Forwarded-For": BEIJING_IP}
TINY = ("model", "acme/tiny-model")
CONFIG_JSON = "/acme/tiny-model/resolve/main/config.json"
WEIGHTS = "/acme/tiny-model/resolve/main/model.safetensors"
#: Piece hashes of 256 KiB: the 3 MiB weights make 12 pieces.
PIECE_LENGTH = 256 * 1024
#: Mirrors that answer (the rest of the nodes are never contacted: probing is off).
MIRRORS = ("bj", "sh", "lag", "bad")

AiohttpClient = Callable[..., Any]
Client = TestClient[web.Request, web.Application]


def start_mirrors(hub: FakeHub) -> dict[str, HfMirrorNode]:
    tiny = hub.repo("acme/tiny-model")
    mirrors = {
        "bj": HfMirrorNode("bj", hub, piece_length=PIECE_LENGTH),
        "sh": HfMirrorNode("sh", hub, piece_length=PIECE_LENGTH),
        # Holds v1.0 only while main is at v2: it must get nothing of main.
        "lag": HfMirrorNode("lag", hub, {TINY: [tiny.refs["v1.0"]]}),
        "bad": HfMirrorNode("bad", hub, piece_length=PIECE_LENGTH),
    }
    # Its manifest stays truthful: only the gateway's verification can tell.
    mirrors["bad"].corrupt("config.json")
    return mirrors


def _mirror(
    node_id: str, node: HfMirrorNode, lat: float, lon: float, asns: list[int]
) -> dict[str, Any]:
    return {
        "id": node_id,
        "url": node.url,
        "country": "CN",
        "latitude": lat,
        "longitude": lon,
        "asns": asns,
        "manifest_url": node.manifest_url,
    }


def _elsewhere(node_id: str, **extra: Any) -> dict[str, Any]:
    """A node that is never contacted; Guangzhou unless said otherwise."""
    return {
        "id": node_id,
        "url": f"https://{node_id}.mirror.test",
        "country": "CN",
        "latitude": 23.13,
        "longitude": 113.26,
        **extra,
    }


def world_nodes(mirrors: dict[str, HfMirrorNode]) -> list[dict[str, Any]]:
    return [
        _mirror("bj", mirrors["bj"], 39.90, 116.41, [4134]),
        _mirror("sh", mirrors["sh"], 31.23, 121.47, [4837]),
        _mirror("lag", mirrors["lag"], 23.13, 113.26, []),
        _mirror("bad", mirrors["bad"], 23.13, 113.26, []),
        _elsewhere("off", enabled=False),
        _elsewhere("admin-off"),
        _elsewhere(
            "hk", country="HK", latitude=22.32, longitude=114.17, serves={"countries": ["HK"]}
        ),
        _elsewhere("jp", country="JP", latitude=35.68, longitude=139.65),
        _elsewhere("down"),
        _elsewhere("drain"),
        # A load URL of its own keeps the redirect-count estimate from replacing its load.
        _elsewhere("busy", capacity={"connections": 10}, load_url="https://busy.mirror.test/load"),
        _elsewhere("flaky"),
    ]


@dataclass
class World:
    client: Client
    runtime: Runtime
    hub: FakeHub
    mirrors: dict[str, HfMirrorNode]

    @property
    def main(self) -> str:
        return self.hub.repo("acme/tiny-model").refs["main"]

    async def get(self, path: str, method: str = "GET", **headers: str) -> ClientResponse:
        response = await self.client.request(method, path, headers=headers, allow_redirects=False)
        await response.read()
        return response

    async def explain(self, path: str, query: str = "", **headers: str) -> tuple[int, Any]:
        response = await self.get(f"/explain{path}{query}", **headers)
        return response.status, await response.json()


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def gateway_client(aiohttp_client: AiohttpClient, config: GatewayConfig) -> Client:
    """The real app in process, as tests/test_http.py runs it."""
    router = Router(config, MaxMindLocator(config.geoip), random.Random(1))
    server = GatewayTestServer(create_app(build_runtime(router)))
    client: Client = await aiohttp_client(server, server_kwargs=handler_limits(config))
    return client


async def open_world(
    aiohttp_client: AiohttpClient,
    geoip: GeoIPConfig,
    hub: FakeHub,
    mirrors: dict[str, HfMirrorNode],
    **sections: Any,
) -> World:
    """A gateway over the world, once it has read every manifest and caught ``bad``."""
    settings: dict[str, Any] = {
        "nodes": world_nodes(mirrors),
        "sync": {"interval_s": 0.2, "verify_samples": 100},
        "routing": {"max_tier": "country"},
        "admin": {"token": ADMIN_TOKEN},
        **sections,
    }
    client = await gateway_client(aiohttp_client, gateway_config(geoip, hub.url, **settings))
    world = World(client, client.app[RUNTIME], hub, mirrors)
    now = time.time()
    store = world.runtime.store
    await store.publish_probe(ProbeRecord("down", "default", False, "status 503", None, now, None))
    await store.publish_probe(
        ProbeRecord("flaky", "default", True, "", 12.0, now, now, transport_failing=True)
    )
    await store.publish_load(
        LoadRecord("busy", "status-json", active_connections=10, measured_at=now)
    )
    for node_id, action in (("admin-off", "disable"), ("drain", "drain")):
        response = await world.client.post(f"/admin/nodes/{node_id}/{action}", headers=ADMIN)
        assert response.status == 200, await response.text()
    sync = world.runtime.sync
    caught = (*TINY, world.main)
    await until(
        lambda: all(m in sync.holdings for m in MIRRORS) and caught in sync.failed_for("bad"),
        "manifests read and the corrupt node caught at main",
    )
    return world


@pytest.fixture(scope="module")
def mirrors(fake_hub: FakeHub) -> Iterator[dict[str, HfMirrorNode]]:
    started = start_mirrors(fake_hub)
    yield started
    for node in started.values():
        node.stop()


@pytest.fixture
async def world(
    aiohttp_client: AiohttpClient,
    geoip_config: GeoIPConfig,
    fake_hub: FakeHub,
    mirrors: dict[str, HfMirrorNode],
) -> World:
    return await open_world(aiohttp_client, geoip_config, fake_hub, mirrors)
