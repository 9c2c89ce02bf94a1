"""The world the gateway routes in the benchmark: clients, their networks, nodes, live state.

Everything derives from a seed, so two runs route the same clients to the same nodes.

- Clients: public IPv4 addresses sampled at random and kept when the bundled GeoLite2 City
  database places them (one address per /24, at most ``PER_COUNTRY`` per country, more in CN,
  the country the shipped config serves). They are "real-looking" because they are real.
- Networks: the bundled data has no ASN database, so one is built (with tests/geoworld.py's
  writer) that puts each client /24 in one of a few ASNs of its country; some nodes sit in the
  same ASNs, so the same-network tier and the second database lookup are on the path.
- Nodes: spread over the country table (half where the clients are, half anywhere), a few in
  CN, with coordinates, ASNs, kinds, weights, capacities and service areas.
- Live state: what a prober would have published in Redis, written through the gateway's own
  ``RedisStore``: latency for every node, a few down or failing, loads, a few drained or
  disabled by an operator. The nodes are not real servers, so the gateway itself does not probe.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_support.procs import BenchError
from gateway.config import GeoIPConfig, NodeConfig, RedisConfig, StateConfig, config_from_mapping
from gateway.geo.countries import country_table
from gateway.geo.locator import MaxMindLocator
from gateway.state.live import (
    AdminMode,
    AdminRecord,
    LiveState,
    LoadRecord,
    ProbeRecord,
    RedirectCounter,
)
from gateway.state.store import RedisStore

REPO = Path(__file__).resolve().parents[2]
VANTAGE = "default"
#: Random addresses looked up to find clients: about 85% are placed by the database.
DRAWS = 40_000
PER_COUNTRY = 30
CN_CLIENTS = 400
ASNS_PER_COUNTRY = 3
#: Seeded records outlive any benchmark run (a prober would refresh them every few seconds).
SEED_TTL_S = 86_400.0


@dataclass(frozen=True, slots=True)
class Client:
    ip: str
    country: str
    asn: int


def country_asns(country: str) -> tuple[int, ...]:
    """A few made-up but plausible AS numbers per country, stable across runs."""
    index = sorted(country_table()).index(country)
    return tuple(20_000 + index * 10 + k for k in range(ASNS_PER_COUNTRY))


def sample_clients(seed: int) -> list[Client]:
    rng = random.Random(seed)
    locator = MaxMindLocator(GeoIPConfig(cache_size=0))
    by_country: dict[str, list[str]] = defaultdict(list)
    seen_prefixes: set[int] = set()
    try:
        for _ in range(DRAWS):
            address = rng.getrandbits(32)
            if address >> 8 in seen_prefixes:
                continue
            seen_prefixes.add(address >> 8)
            location = locator.locate(ipaddress.IPv4Address(address))
            if location.country is not None and location.country in country_table():
                by_country[location.country].append(str(ipaddress.IPv4Address(address)))
    finally:
        locator.close()
    clients = []
    for country in sorted(by_country):
        cap = CN_CLIENTS if country == "CN" else PER_COUNTRY
        for ip in by_country[country][:cap]:
            clients.append(Client(ip, country, rng.choice(country_asns(country))))
    rng.shuffle(clients)
    return clients


def build_asn_db(path: Path, clients: Sequence[Client]) -> None:
    """A GeoLite2-ASN mmdb placing each client's /24 in its ASN."""
    # tests/geoworld.py holds the suite's mmdb writer; it needs only mmdb-writer and netaddr
    # (the test extras), not pytest.
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from geoworld import WorldRecord
        from geoworld import build_asn_db as write_asn_db
    except ImportError as exc:
        raise BenchError(
            f"cannot build the ASN database ({exc}): install the test extras "
            "(.venv/bin/pip install -e '.[test]', as scripts/test does)"
        ) from None
    finally:
        sys.path.remove(str(REPO / "tests"))
    records = [
        WorldRecord(
            f"{client.ip.rsplit('.', 1)[0]}.0/24", client.country, "", None, 0.0, 0.0,
            client.asn, f"BENCH-NET-{client.asn}",
        )
        for client in clients
    ]  # fmt: skip
    write_asn_db(path, records)


def make_nodes(count: int, clients: Sequence[Client], seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed * 7919 + count)
    table = country_table()
    everywhere = sorted(c for c in table if c != "AQ")
    demand = [client.country for client in clients]
    nodes: list[dict[str, Any]] = []
    for i in range(count):
        if i < 3:
            country = "CN"  # the shipped config's raison d'être: domestic mirrors
        elif i % 2:
            country = rng.choice(demand)
        else:
            country = rng.choice(everywhere)
        centre = table[country]
        kind = rng.choices(["mirror", "cache", "third_party"], weights=[7, 2, 1])[0]
        node: dict[str, Any] = {
            "id": f"node-{i:05d}-{country.lower()}",
            "url": f"https://n{i}.{country.lower()}.mirror.example",
            "kind": kind,
            "country": country,
            "latitude": round(max(-89.0, min(89.0, centre.latitude + rng.uniform(-2, 2))), 4),
            "longitude": round(max(-179.0, min(179.0, centre.longitude + rng.uniform(-2, 2))), 4),
            "weight": rng.choice([0.5, 1.0, 1.0, 2.0]),
            "capacity": {"connections": rng.choice([500, 1000, 2000, 5000])},
        }
        if rng.random() < 0.5:
            node["asns"] = [rng.choice(country_asns(country))]
        area = rng.random()
        if country == "CN" or area < 0.4:
            node["serves"] = {"countries": [country]}
        elif area < 0.6:
            node["serves"] = {"continents": [centre.continent]}
        if kind != "third_party":
            # Nodes that publish their load; third-party mirrors do not, and get a load
            # estimated from the redirects the gateway sends them.
            node["load_url"] = node["url"] + "/status.json"
        nodes.append(node)
    return nodes


def live_records(
    nodes: Sequence[NodeConfig], seed: int
) -> tuple[list[ProbeRecord | LoadRecord | AdminRecord], int]:
    """What a prober and operators would have published, and how many nodes are up."""
    rng = random.Random(seed + len(nodes))
    now = time.time()
    records: list[ProbeRecord | LoadRecord | AdminRecord] = []
    up_count = 0
    for node in nodes:
        roll = rng.random()
        domestic = node.country == "CN"
        up = domestic or roll >= 0.03
        up_count += up
        latency = round(rng.lognormvariate(3.5, 0.8), 2)  # median ~33 ms
        records.append(
            ProbeRecord(
                node_id=node.id,
                vantage=VANTAGE,
                up=up,
                reason="" if up else "timeout",
                latency_ms=latency,
                checked_at=now,
                last_ok_at=now if up else now - 60,
                transport_failing=up and not domestic and roll < 0.05,
            )
        )
        if node.load_url is not None and node.capacity.connections:
            records.append(
                LoadRecord(
                    node_id=node.id,
                    source="status-json",
                    active_connections=round(node.capacity.connections * rng.uniform(0, 1.05)),
                    measured_at=now,
                )
            )
        if not domestic and rng.random() < 0.02:
            modes: tuple[AdminMode, ...] = ("draining", "disabled")
            mode = rng.choice(modes)
            records.append(AdminRecord(node_id=node.id, mode=mode, changed_at=now))
    return records, up_count


async def _publish(redis_url: str, nodes: Sequence[NodeConfig], records: Sequence[Any]) -> None:
    store = RedisStore(
        LiveState(nodes, vantage=VANTAGE, probing=True),
        RedirectCounter(),
        RedisConfig(url=redis_url),
        StateConfig(),
        nodes,
        instance_id="bench-seeder",
        record_ttl_s=SEED_TTL_S,
    )
    await store.start()
    try:
        if store.degraded_reason is not None:
            raise BenchError(f"seeding live state: {store.degraded_reason}")
        limit = asyncio.Semaphore(64)

        async def publish(record: ProbeRecord | LoadRecord | AdminRecord) -> None:
            async with limit:
                if isinstance(record, ProbeRecord):
                    await store.publish_probe(record)
                elif isinstance(record, LoadRecord):
                    await store.publish_load(record)
                else:
                    await store.set_admin(record)

        await asyncio.gather(*(publish(r) for r in records))
        if store.degraded_reason is not None:
            raise BenchError(f"seeding live state: {store.degraded_reason}")
    finally:
        await store.close()


def seed_live_state(redis_url: str, config: dict[str, Any], seed: int) -> int:
    """Publish the nodes' live state in Redis; returns how many nodes are up."""
    nodes = config_from_mapping(config).nodes
    records, up_count = live_records(nodes, seed)
    asyncio.run(_publish(redis_url, nodes, records))
    return up_count


def gateway_config(
    *,
    nodes: list[dict[str, Any]],
    upstream_url: str,
    redis_url: str,
    asn_db: Path,
    access_log: bool,
) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1"},
        # wrk connects from loopback: a trusted proxy, whose X-Forwarded-For names the client.
        "client_ip": {
            "trusted_proxies": ["127.0.0.0/8", "::1/128"],
            "forwarded_header": "x-forwarded-for",
        },
        # City: the bundled GeoLite2 (its staleness warning is expected); ASN: built above.
        "geoip": {"asn_db": str(asn_db)},
        "upstream": {"url": upstream_url},
        "redis": {"url": redis_url},
        # The nodes are not servers: their state comes from the records seeded in Redis.
        "probing": {"enabled": False},
        # wrk sends thousands of redirects a second, each no download at all: counted as
        # downloads of the default minute, they would fill every node within a second and
        # only the overload path (every node full, last resort) would be measured.
        "state": {"estimated_download_s": 0.1},
        "logging": {"format": "json", "access": access_log},
        "metrics": {"enabled": True},
        "nodes": nodes,
    }
