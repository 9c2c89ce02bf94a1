"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fake_hub import FakeHub
from geoworld import GeoDBs, build_asn_db, build_city_db
from mirror_node import MirrorNode
from redis.asyncio import Redis
from redis_server import RedisServer, free_port

from gateway.config import GeoIPConfig

# --------------------------------------------------------------------------- GeoIP


@pytest.fixture(scope="session")
def geo_dbs(tmp_path_factory: pytest.TempPathFactory) -> GeoDBs:
    """The tests/geoworld.py world as GeoLite2-City and GeoLite2-ASN files, built once."""
    directory = tmp_path_factory.mktemp("geoip")
    dbs = GeoDBs(city=directory / "GeoLite2-City.mmdb", asn=directory / "GeoLite2-ASN.mmdb")
    build_city_db(dbs.city)
    build_asn_db(dbs.asn)
    return dbs


@pytest.fixture
def geoip_config(geo_dbs: GeoDBs) -> GeoIPConfig:
    return GeoIPConfig(city_db=geo_dbs.city, asn_db=geo_dbs.asn)


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole session; tests get it through ``redis_url``."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied before the test."""
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that stop, kill or pause it."""
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nodes() -> Iterator[dict[str, MirrorNode]]:
    """Two live mirror nodes, ``bj`` and ``sh`` (see ``live_gateways.live_config``)."""
    started = {"bj": MirrorNode("bj"), "sh": MirrorNode("sh")}
    yield started
    for node in started.values():
        node.stop()


# --------------------------------------------------------------------------- upstream hub


@pytest.fixture(scope="session")
def fake_hub() -> Iterator[FakeHub]:
    """A local Hugging Face upstream with the standard repos, Xet bait included."""
    with FakeHub() as hub:
        yield hub


@pytest.fixture
async def direct(redis_url: str) -> AsyncIterator[Redis]:
    """A plain client on the shared test server, to look at and write keys behind a store."""
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()
