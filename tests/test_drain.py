"""SIGTERM opens a drain window: /readyz says 503 while everything else is still served.

A real gateway process (one worker, and a supervisor with two), polled over fresh connections.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from fake_hub import FakeHub
from geoworld import BEIJING_IP, GeoDBs
from processes import GatewayProcess, wait_until

RESOLVE = "/acme/tiny-model/resolve/main/config.json"
FROM_BEIJING = {"X-Forwarded-For": BEIJING_IP}


def config(geo: GeoDBs, upstream: str) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream},
        "geoip": {"city_db": str(geo.city), "asn_db": str(geo.asn)},
        "probing": {"enabled": False},
        "nodes": [
            {"id": "bj", "url": "https://bj.example", "country": "CN",
             "serves": {"countries": ["CN"]}},
        ],
    }  # fmt: skip


@pytest.mark.parametrize("workers", [1, 2])
def test_readyz_turns_503_while_the_listener_still_serves(
    geo_dbs: GeoDBs, fake_hub: FakeHub, tmp_path: Path, workers: int
) -> None:
    drain_s = 3.0
    gateway = GatewayProcess(
        config(geo_dbs, fake_hub.url), tmp_path, workers=workers, drain_s=drain_s
    )
    try:
        wait_until(
            lambda: gateway.log.read_text().count("serving on") == workers, 30, "every worker"
        )
        assert gateway.get("/readyz")[0] == 200
        assert gateway.get(RESOLVE, FROM_BEIJING)[0] == 302
        gateway.signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_until(lambda: gateway.get("/readyz")[0] == 503, 2, "/readyz to say 503")
        polls = 0
        # Well inside the window: new connections are still accepted and answered in full.
        while time.monotonic() - signalled < drain_s - 1.0:
            assert gateway.get("/readyz")[0] == 503
            status, headers, _ = gateway.get(RESOLVE, FROM_BEIJING)
            assert (status, headers["x-mirror-node"]) == (302, "bj")
            assert gateway.get("/healthz")[0] == 200
            polls += 1
            time.sleep(0.1)
        assert polls >= 5
        assert gateway.process.wait(30) == 0
        assert time.monotonic() - signalled >= drain_s
    finally:
        gateway.stop()
    assert "draining for 3 s" in gateway.log.read_text()


@pytest.mark.parametrize(
    ("drain_s", "sigterms"),
    [(60.0, 2), (0.0, 1)],
    ids=["a-second-sigterm-ends-the-drain", "drain-s-0-stops-at-once"],
)
def test_stopping_without_waiting_out_the_window(
    geo_dbs: GeoDBs, fake_hub: FakeHub, tmp_path: Path, drain_s: float, sigterms: int
) -> None:
    gateway = GatewayProcess(config(geo_dbs, fake_hub.url), tmp_path, drain_s=drain_s)
    try:
        gateway.signal(signal.SIGTERM)
        if sigterms == 2:
            wait_until(lambda: gateway.get("/readyz")[0] == 503, 5, "/readyz to say 503")
            gateway.signal(signal.SIGTERM)
        assert gateway.process.wait(15) == 0
    finally:
        gateway.stop()
    assert ("draining" in gateway.log.read_text()) == (drain_s > 0)
