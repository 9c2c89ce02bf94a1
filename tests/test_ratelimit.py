"""Wrong admin tokens are rate-limited per client, in bounded memory."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path

import pytest
from geoworld import GeoDBs
from processes import GatewayProcess

from gateway.ratelimit import FailureLimiter, client_key

TOKEN = "ratelimit-test-admin-token"
EXPLAIN = "/explain/acme/tiny-model/resolve/main/config.json"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_client_is_refused_after_max_failures_until_its_window_ends() -> None:
    clock = Clock()
    limiter = FailureLimiter(3, 60.0, clock=clock)
    for _ in range(3):
        assert limiter.retry_after("1.2.3.4") is None
        limiter.failed("1.2.3.4")
    assert limiter.retry_after("1.2.3.4") == 60
    assert limiter.retry_after("5.6.7.8") is None
    clock.now += 59.5
    assert limiter.retry_after("1.2.3.4") == 1
    clock.now += 0.5
    assert limiter.retry_after("1.2.3.4") is None
    limiter.failed("1.2.3.4")  # a new window, with one failure in it
    assert limiter.retry_after("1.2.3.4") is None


def test_memory_is_bounded_by_max_clients() -> None:
    limiter = FailureLimiter(1, 60.0, max_clients=100, clock=Clock())
    for i in range(10_000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100
    assert limiter.retry_after("10.0.39.15") == 60  # the newest is remembered
    assert limiter.retry_after("10.0.0.0") is None  # the oldest was evicted


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::9", "2001:db8:1:2::/64"),
        (None, "-"),
    ],
)
def test_ipv6_clients_are_keyed_by_their_64(ip: str | None, key: str) -> None:
    assert client_key(ipaddress.ip_address(ip) if ip else None) == key


def test_wrong_admin_tokens_get_429_with_retry_after(geo_dbs: GeoDBs, tmp_path: Path) -> None:
    gateway = GatewayProcess(
        {
            "upstream": {"url": "http://127.0.0.1:9"},
            "geoip": {"city_db": str(geo_dbs.city), "asn_db": str(geo_dbs.asn)},
            "probing": {"enabled": False},
            "admin": {"token": TOKEN, "max_failures": 3, "failure_window_s": 3},
        },
        tmp_path,
    )
    wrong = {"Authorization": "Bearer not-the-admin-token", "X-Forwarded-For": "192.0.2.7"}
    right = {"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "192.0.2.7"}
    other_client = {"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "192.0.2.8"}
    try:
        started = time.monotonic()
        assert [gateway.get("/admin/nodes", wrong)[0] for _ in range(3)] == [401] * 3
        status, headers, body = gateway.get("/admin/nodes", wrong)
        assert status == 429, body
        assert json.loads(body)["error"] == "too_many_failures"
        assert 1 <= int(headers["retry-after"]) <= 3
        assert headers["x-request-id"]
        assert TOKEN not in body.decode() and "not-the-admin-token" not in body.decode()
        # Refused whatever it sends, the right token included, until its window ends, on
        # every check of the admin token ...
        assert gateway.get("/admin/nodes", right)[0] == 429
        assert gateway.get(f"{EXPLAIN}?ip=192.0.2.1", right)[0] == 429
        # ... while other clients are not held up by it.
        assert gateway.get("/admin/nodes", other_client)[0] == 200
        time.sleep(max(0.0, started + 3.2 - time.monotonic()))
        assert gateway.get("/admin/nodes", right)[0] == 200
    finally:
        assert gateway.stop() == 0
