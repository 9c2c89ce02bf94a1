"""Gateway processes over live mirror nodes: their config and what tests ask of them.

Shared by the tests that run several real gateway instances on real Redis (``test_live.py``,
``test_sentinel.py``).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import redis
from geoworld import BEIJING_IP, GeoDBs
from mirror_node import MirrorNode
from processes import GatewayProcess

TOKEN = "test-admin-token-0123456789"
RESOLVE = "/acme/tiny-model/resolve/main/config.json"
FROM_BEIJING = {"X-Forwarded-For": BEIJING_IP}


def live_config(
    geo: GeoDBs,
    upstream: str,
    nodes: dict[str, MirrorNode],
    redis_url: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    coordinates = {"bj": (39.9042, 116.4074), "sh": (31.2304, 121.4737)}
    return {
        "upstream": {"url": upstream},
        "geoip": {"city_db": str(geo.city), "asn_db": str(geo.asn)},
        "probing": {
            "interval_s": 0.1,
            "fall": 2,
            "rise": 3,
            "timeout_s": 0.5,
            "connect_timeout_s": 0.2,
            "probe": {"path": "/health", "expect_status": [200]},
        },
        "state": {"resync_s": 1.0, "redirect_window_s": 1.0},
        "redis": {"url": redis_url, "command_timeout_s": 0.2, "connect_timeout_s": 0.2}
        if redis_url
        else {},
        "admin": {"token": TOKEN},
        "nodes": [
            {
                "id": node_id,
                "url": node.url,
                "country": "CN",
                "latitude": coordinates[node_id][0],
                "longitude": coordinates[node_id][1],
                "serves": {"countries": ["CN"]},
            }
            for node_id, node in nodes.items()
        ],
        **extra,
    }


def routed_to(gateway: GatewayProcess) -> str:
    status, headers, _ = gateway.get(RESOLVE, FROM_BEIJING)
    assert status == 302
    return headers["x-mirror-node"]


def admin(gateway: GatewayProcess, path: str, method: str = "GET") -> tuple[int, Any]:
    call = urllib.request.Request(
        f"http://127.0.0.1:{gateway.port}{path}",
        method=method,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    try:
        with urllib.request.urlopen(call, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def readiness(gateway: GatewayProcess) -> dict[str, Any]:
    status, _, body = gateway.get("/readyz")
    assert status == 200
    result: dict[str, Any] = json.loads(body)
    return result


def node_state(gateway: GatewayProcess, node_id: str) -> dict[str, Any]:
    _, listing = admin(gateway, "/admin/nodes")
    return next(n for n in listing["nodes"] if n["id"] == node_id)


def two_gateways(
    config: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None
) -> tuple[GatewayProcess, GatewayProcess]:
    first = GatewayProcess(config, tmp_path, env=env)
    try:
        second = GatewayProcess(config, tmp_path, env=env)
    except AssertionError:
        first.stop()
        raise
    return first, second


def prober_lock_owner(client: redis.Redis) -> str | None:
    owners = [client.get(key) for key in client.scan_iter("mg:*lock*")]
    assert len(owners) <= 1
    return owners[0].decode() if owners and owners[0] else None
