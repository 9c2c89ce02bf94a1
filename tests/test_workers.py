"""Several worker processes on one port: load spread, shared metrics, signals, replacement."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from fake_hub import FakeHub
from geoworld import BEIJING_IP, GeoDBs
from processes import GatewayProcess, wait_until, worker_pids
from prometheus_client.parser import text_string_to_metric_families

RESOLVE = "/acme/tiny-model/resolve/main/config.json"


def config(geo: GeoDBs, upstream: str, redis_url: str) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream},
        "geoip": {"city_db": str(geo.city), "asn_db": str(geo.asn)},
        "redis": {"url": redis_url},
        "probing": {"enabled": False},
        "nodes": [
            {"id": "bj", "url": "https://bj.example", "country": "CN",
             "serves": {"countries": ["CN"]}},
        ],
    }  # fmt: skip


def access_pids(log: Path) -> set[int]:
    pids = set()
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["logger"] == "gateway.access":
                pids.add(entry["pid"])
    return pids


def decisions_total(gateway: GatewayProcess) -> float:
    _, _, body = gateway.get("/metrics")
    for family in text_string_to_metric_families(body.decode()):
        if family.name == "mirror_gateway_decisions":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    return 0.0


def test_two_workers_share_the_port_and_the_metrics(
    geo_dbs: GeoDBs, fake_hub: FakeHub, redis_url: str, tmp_path: Path
) -> None:
    gateway = GatewayProcess(config(geo_dbs, fake_hub.url, redis_url), tmp_path, workers=2)
    try:
        wait_until(lambda: len(worker_pids(gateway)) == 2, 10, "two workers")
        workers = worker_pids(gateway)
        wait_until(lambda: gateway.log.read_text().count("serving on") == 2, 10, "both listening")
        for _ in range(200):
            status, headers, _ = gateway.get(RESOLVE, {"X-Forwarded-For": BEIJING_IP})
            assert (status, headers["x-mirror-node"]) == (302, "bj")
        # Any worker's /metrics adds up every worker's decisions (each worker adds its counts
        # to the shared files within a second) ...
        wait_until(lambda: decisions_total(gateway) == 200, 5, "every decision counted")
        # ... and the kernel spread the fresh connections over both workers.
        assert access_pids(gateway.log) == workers

        gateway.signal(signal.SIGHUP)
        wait_until(
            lambda: gateway.log.read_text().count("config reloaded") == 2, 10, "every worker"
        )

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: len(worker_pids(gateway)) == 2 and victim not in worker_pids(gateway),
            10,
            "a replacement worker",
        )
        wait_until(
            lambda: gateway.get(RESOLVE, {"X-Forwarded-For": BEIJING_IP})[0] == 302,
            5,
            "service after the replacement",
        )
    finally:
        assert gateway.stop() == 0


def test_sigterm_finishes_requests_in_flight(
    geo_dbs: GeoDBs, redis_url: str, tmp_path: Path
) -> None:
    with FakeHub() as hub:
        gateway = GatewayProcess(config(geo_dbs, hub.url, redis_url), tmp_path, workers=2)
        hub.delay_s = 2.0
        answers: list[int] = []
        slow = threading.Thread(
            target=lambda: answers.append(gateway.get("/api/models/acme/tiny-model")[0])
        )
        try:
            slow.start()
            time.sleep(0.5)  # the request is inside a worker, waiting on upstream
            gateway.signal(signal.SIGTERM)
            slow.join(10)
            assert answers == [200], "the request in flight was finished, not cut"
            assert gateway.process.wait(15) == 0
        finally:
            hub.delay_s = 0.0
            gateway.stop()
