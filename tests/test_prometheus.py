"""The metrics as Prometheus sees them: a running gateway scraped by a real ``prometheus``.

``promtool`` lints a scrape and the alert rules; then a Prometheus server on loopback scrapes a
gateway that is driven into every alert's condition (a node stops answering, clients go
upstream, upstream fails, Redis dies, and the bundled July 2018 GeoIP data is in use), and every
expression of the Grafana dashboard and of the alert rules must return data.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_hub import FakeHub
from geoworld import GeoDBs
from mirror_node import MirrorNode
from processes import REPO, GatewayProcess, free_port, wait_until
from redis_server import RedisServer

DASHBOARD = REPO / "config" / "grafana" / "mirror-gateway.json"
ALERTS = REPO / "config" / "prometheus" / "alerts.yml"
JOB = "mirror-gateway"
#: In the bundled GeoLite2 City data of July 2018: Beijing, and the United States.
BEIJING_CLIENT = {"X-Forwarded-For": "202.106.0.20"}
US_CLIENT = {"X-Forwarded-For": "8.8.8.8"}
RESOLVE = "/acme/tiny-model/resolve/main/config.json"
#: What Grafana puts in place of its own variables, for a query over the test's few seconds.
GRAFANA_MACROS = {"$__rate_interval": "30s", "$__interval": "30s", "$__range": "5m"}

MISSING = (
    "prometheus and promtool are not installed (or not on PATH); these tests drive them. "
    "Install them with `apt-get install prometheus`, or run scripts/test, which does."
)


@pytest.fixture(autouse=True)
def _prometheus_installed() -> None:
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        pytest.fail(MISSING, pytrace=False)


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["promtool", *args], input=stdin, capture_output=True, timeout=30, check=False
    )


def dashboard_exprs() -> list[str]:
    """Every query of the dashboard, with its variables replaced as Grafana would."""
    dashboard = json.loads(DASHBOARD.read_text())
    substitutions = dict(GRAFANA_MACROS)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            substitutions[f"${variable['name']}"] = variable["allValue"]

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    exprs = []
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(substitutions, key=len, reverse=True):
                expr = expr.replace(name, substitutions[name])
            assert "$" not in expr, f"unsubstituted variable in {expr!r}"
            exprs.append(expr)
    return exprs


def alert_exprs() -> dict[str, str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


# --------------------------------------------------------------------------- static checks


def test_alert_rules_pass_promtool() -> None:
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert set(alert_exprs()) == {
        "MirrorGatewayNodeDown",
        "MirrorGatewayFallbackRatioHigh",
        "MirrorGatewayRedisDegraded",
        "MirrorGatewayCatalogErrors",
        "MirrorGatewayGeoIPStale",
    }
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["for"], rule["alert"]
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert {"summary", "description"} <= set(rule["annotations"])


def test_dashboard_queries_every_panel_from_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]
    assert len(dashboard_exprs()) >= 11


# --------------------------------------------------------------------------- live


class Prometheus:
    """A ``prometheus`` server on loopback scraping one target every second."""

    def __init__(self, target_port: int, directory: Path) -> None:
        self.port = free_port()
        directory.mkdir()
        config = directory / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    # Loaded by the real server too, so the rules must also load there.
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [
                        {
                            "job_name": JOB,
                            "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                        }
                    ],
                }
            )
        )
        self.log = directory / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["prometheus", f"--config.file={config}",
                 f"--storage.tsdb.path={directory / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_until(self._ready, 20, "prometheus to start")
        except AssertionError:
            self.stop()
            raise AssertionError(f"prometheus did not start:\n{self.log.read_text()}") from None

    def _ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as exc:
            answer = json.load(exc)
        return answer

    def has_data(self, expr: str) -> bool:
        answer = self.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        return bool(answer["data"]["result"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=15)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    """A hub of this test's own: the test takes it down."""
    with FakeHub() as own:
        yield own


@pytest.fixture
def nodes() -> Iterator[dict[str, MirrorNode]]:
    started = {"bj": MirrorNode("bj"), "sh": MirrorNode("sh")}
    for node in started.values():
        node.load = {"active_connections": 150, "capacity_connections": 1000}
    yield started
    for node in started.values():
        node.stop()


def gateway_config(
    hub: FakeHub, geo: GeoDBs, nodes: dict[str, MirrorNode], redis_url: str
) -> dict[str, Any]:
    coordinates = {"bj": (39.9042, 116.4074), "sh": (31.2304, 121.4737)}
    return {
        "upstream": {"url": hub.url},
        # No city_db: the bundled GeoLite2 City build of July 2018, which must raise
        # MirrorGatewayGeoIPStale. The test ASN data is current.
        "geoip": {"asn_db": str(geo.asn)},
        "probing": {
            "interval_s": 0.1,
            "fall": 2,
            "rise": 2,
            "timeout_s": 0.5,
            "connect_timeout_s": 0.2,
            "probe": {"path": "/health", "expect_status": [200]},
        },
        "state": {"resync_s": 0.5, "redirect_window_s": 1.0},
        "redis": {"url": redis_url, "command_timeout_s": 0.2, "connect_timeout_s": 0.2},
        "nodes": [
            {
                "id": node_id,
                "url": node.url,
                "country": "CN",
                "latitude": coordinates[node_id][0],
                "longitude": coordinates[node_id][1],
                "serves": {"countries": ["CN"]},
                "capacity": {"connections": 1000 if node_id == "bj" else 500},
                "load_url": f"{node.url}/load",
            }
            for node_id, node in nodes.items()
        ],
    }


def routed_to(gateway: GatewayProcess) -> str:
    status, headers, _ = gateway.get(RESOLVE, BEIJING_CLIENT)
    assert status == 302, status
    return headers["x-mirror-node"]


def drive(gateway: GatewayProcess, times: int, target: str, headers: dict[str, str]) -> set[int]:
    return {gateway.get(target, headers)[0] for _ in range(times)}


@pytest.fixture
def gateway(
    hub: FakeHub,
    geo_dbs: GeoDBs,
    nodes: dict[str, MirrorNode],
    private_redis: RedisServer,
    tmp_path: Path,
) -> Iterator[GatewayProcess]:
    started = GatewayProcess(gateway_config(hub, geo_dbs, nodes, private_redis.url), tmp_path)
    yield started
    started.stop()


@pytest.fixture
def prometheus(gateway: GatewayProcess, tmp_path: Path) -> Iterator[Prometheus]:
    server = Prometheus(gateway.port, tmp_path / "prometheus")
    # Target discovery reaches the scrape loop only after a few seconds: traffic before the
    # first scrape would make no difference to any rate.
    wait_until(lambda: server.has_data(f'up{{job="{JOB}"}} == 1'), 20, "the first scrape", 0.2)
    yield server
    server.stop()


def test_prometheus_scrapes_a_running_gateway_and_every_query_returns_data(
    gateway: GatewayProcess,
    prometheus: Prometheus,
    hub: FakeHub,
    nodes: dict[str, MirrorNode],
    private_redis: RedisServer,
) -> None:
    wait_until(lambda: routed_to(gateway) == "bj", 10, "the Beijing node to be trusted")

    # Healthy traffic: redirects, upstream clients, API pass-through, unknown files.
    assert drive(gateway, 20, RESOLVE, BEIJING_CLIENT) == {302}
    assert drive(gateway, 5, RESOLVE, US_CLIENT) == {302}
    assert drive(gateway, 3, "/api/models/acme/tiny-model", {}) == {200}
    assert drive(gateway, 2, "/acme/tiny-model/resolve/main/missing.bin", {}) == {404}
    assert gateway.get(RESOLVE, BEIJING_CLIENT, method="HEAD")[0] == 302
    assert gateway.get("/healthz")[0] == 200

    status, headers, body = gateway.get("/metrics")
    assert status == 200, body[:500]
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    linted = promtool("check", "metrics", stdin=body)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert not (linted.stdout + linted.stderr).strip()
    # rate() counts only what a series gains after its first sample: Prometheus must have seen
    # the healthy traffic before the bursts below.
    wait_until(
        lambda: prometheus.has_data('mirror_gateway_decisions_total{outcome="upstream"}'),
        10,
        "Prometheus to scrape the healthy traffic",
        0.2,
    )
    alerts = alert_exprs()
    # Healthy, each condition is false: no expression may return data regardless of state. The
    # bundled GeoIP data is stale from the start.
    healthy = {name: prometheus.has_data(expr) for name, expr in alerts.items()}
    assert healthy == {name: name == "MirrorGatewayGeoIPStale" for name in alerts}

    # Both nodes stop answering: MirrorGatewayNodeDown, and Beijing falls back upstream.
    for node in nodes.values():
        node.health_status = 503
    wait_until(lambda: routed_to(gateway) == "upstream", 10, "both nodes to be down")
    assert drive(gateway, 200, RESOLVE, BEIJING_CLIENT) == {302}

    # Upstream fails: revisions the catalog has not seen cannot be loaded.
    hub.failing = True
    for i in range(60):
        target = f"/acme/tiny-model/resolve/branch-{i}/config.json"
        assert gateway.get(target, BEIJING_CLIENT)[0] == 503

    # Redis dies.
    private_redis.kill()
    wait_until(lambda: b'"degraded"' in gateway.get("/readyz")[2], 10, "degraded readiness")

    def silent_alerts() -> list[str]:
        return [name for name, expr in alerts.items() if not prometheus.has_data(expr)]

    try:
        wait_until(lambda: not silent_alerts(), 20, "every alert's condition", interval=0.5)
    except AssertionError:
        raise AssertionError(f"alert expressions without data: {silent_alerts()}") from None
    empty = [expr for expr in dashboard_exprs() if not prometheus.has_data(expr)]
    assert not empty, "dashboard queries without data:\n" + "\n\n".join(empty)
