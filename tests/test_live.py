"""Live node state end to end: real nodes, gateway processes, a real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fake_hub import FakeHub
from geoworld import GeoDBs
from live_gateways import (
    TOKEN,
    admin,
    live_config,
    node_state,
    prober_lock_owner,
    readiness,
    routed_to,
    two_gateways,
)
from mirror_node import MirrorNode
from processes import REPO, GatewayProcess, wait_until

MakeConfig = Callable[..., dict[str, Any]]


@pytest.fixture
def make_config(geo_dbs: GeoDBs, fake_hub: FakeHub) -> MakeConfig:
    """Gateway configs for these nodes, with the test GeoIP data and the local upstream."""

    def make(
        nodes: dict[str, MirrorNode], redis_url: str | None = None, **extra: Any
    ) -> dict[str, Any]:
        return live_config(geo_dbs, fake_hub.url, nodes, redis_url, **extra)

    return make


def test_failing_node_is_routed_around_and_returns_after_rise_good_probes(
    make_config: MakeConfig, nodes: dict[str, MirrorNode], tmp_path: Path
) -> None:
    gateway = GatewayProcess(make_config(nodes), tmp_path)
    try:
        wait_until(lambda: routed_to(gateway) == "bj", 5, "the Beijing node to be trusted")
        assert len(nodes["bj"].probes()) >= 3  # trusted only after `rise` good probes

        nodes["bj"].health_status = 503
        failing_since = time.monotonic()
        wait_until(lambda: routed_to(gateway) == "sh", 3, "routing around the failing node")
        # fall=2 at 0.1 s intervals: well inside a second, with slack for a loaded machine.
        assert time.monotonic() - failing_since < 2.0
        state = node_state(gateway, "bj")
        assert not state["up"]
        assert "503" in state["down_reason"]

        probes_before_recovery = len(nodes["bj"].probes())
        nodes["bj"].health_status = 200
        wait_until(lambda: routed_to(gateway) == "bj", 5, "the recovered node to return")
        assert len(nodes["bj"].probes()) - probes_before_recovery >= 3
    finally:
        assert gateway.stop() == 0


def test_probes_identify_themselves_and_follow_no_redirects(
    make_config: MakeConfig, nodes: dict[str, MirrorNode], tmp_path: Path
) -> None:
    gateway = GatewayProcess(make_config(nodes), tmp_path)
    try:
        wait_until(lambda: len(nodes["sh"].probes()) >= 2, 5, "probes")
        user_agent = nodes["sh"].probes()[0].headers["User-Agent"]
        assert user_agent.startswith("mirror-gateway-prober/")
    finally:
        assert gateway.stop() == 0


def test_drain_on_one_instance_is_seen_by_the_other(
    make_config: MakeConfig, nodes: dict[str, MirrorNode], redis_url: str, tmp_path: Path
) -> None:
    a, b = two_gateways(make_config(nodes, redis_url), tmp_path)
    try:
        for gateway in (a, b):
            wait_until(lambda g=gateway: routed_to(g) == "bj", 5, "both instances to trust bj")
        status, report = admin(a, "/admin/nodes/bj/drain", "POST")
        assert (status, report["admin"]) == (200, "draining")
        drained_at = time.monotonic()
        wait_until(lambda: routed_to(b) == "sh", 2, "the other instance to see the drain")
        assert time.monotonic() - drained_at < 2.0
        assert node_state(b, "bj")["admin"] == "draining"

        assert admin(b, "/admin/nodes/bj/enable", "POST")[0] == 200
        wait_until(lambda: routed_to(a) == "bj", 2, "the enable to reach the first instance")
    finally:
        assert a.stop() == 0
        assert b.stop() == 0


def test_one_prober_per_vantage_and_handover_when_it_stops(
    make_config: MakeConfig, nodes: dict[str, MirrorNode], redis_url: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    a, b = two_gateways(make_config(nodes, redis_url), tmp_path)
    try:
        wait_until(lambda: prober_lock_owner(client) is not None, 5, "a prober to be elected")
        # Two instances, one prober: over a second, about one probe per interval, not two.
        wait_until(lambda: routed_to(a) == "bj" and routed_to(b) == "bj", 5, "bj trusted")
        before = len(nodes["bj"].probes())
        time.sleep(1.0)
        per_second = len(nodes["bj"].probes()) - before
        assert 5 <= per_second <= 14, per_second  # 10/s from one prober; 20/s would mean two

        owner = prober_lock_owner(client)
        assert owner is not None
        probing, other = (a, b) if str(a.process.pid) in owner else (b, a)
        assert str(other.process.pid) not in owner
        assert probing.stop() == 0
        wait_until(
            lambda: (o := prober_lock_owner(client)) is not None and str(other.process.pid) in o,
            3,
            "the other instance to take over probing",
        )
        count = len(nodes["bj"].probes())
        wait_until(lambda: len(nodes["bj"].probes()) >= count + 5, 3, "probing to continue")
        nodes["bj"].health_status = 500
        wait_until(lambda: routed_to(other) == "sh", 3, "the new prober to mark bj down")
    finally:
        for gateway in (a, b):
            gateway.stop()


def test_redis_outage_keeps_routing_and_converges_after_restart(
    make_config: MakeConfig, nodes: dict[str, MirrorNode], private_redis: Any, tmp_path: Path
) -> None:
    a, b = two_gateways(make_config(nodes, private_redis.url), tmp_path)
    try:
        for gateway in (a, b):
            wait_until(lambda g=gateway: routed_to(g) == "bj", 5, "bj trusted")
            assert readiness(gateway)["status"] == "ready"

        private_redis.kill()
        for gateway in (a, b):
            wait_until(
                lambda g=gateway: readiness(g)["status"] == "degraded", 5, "degraded readiness"
            )
            assert "redis" in readiness(gateway)["degraded"][0].lower()
        for _ in range(50):
            assert routed_to(a) == "bj"
            assert routed_to(b) == "bj"
        # Health keeps following the nodes during the outage: each instance probes for itself.
        nodes["bj"].health_status = 503
        wait_until(lambda: routed_to(a) == "sh" and routed_to(b) == "sh", 5, "bj marked down")
        nodes["bj"].health_status = 200
        wait_until(lambda: routed_to(a) == "bj" and routed_to(b) == "bj", 5, "bj back")
        # An admin change cannot be shared while Redis is down, and says so.
        status, body = admin(a, "/admin/nodes/sh/drain", "POST")
        assert status == 503
        assert body["error"] == "not_shared"
        assert admin(a, "/admin/nodes/sh/enable", "POST")[0] == 503

        private_redis.start()
        for gateway in (a, b):
            wait_until(lambda g=gateway: readiness(g)["status"] == "ready", 10, "recovery")
        assert admin(a, "/admin/nodes/bj/drain", "POST")[0] == 200
        wait_until(lambda: routed_to(b) == "sh", 3, "state to converge after the restart")
        assert a.log.read_text().count("Traceback") == 0
    finally:
        for gateway in (a, b):
            gateway.stop()


def command_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(entry["calls"]) for entry in stats.values())


def test_no_redis_command_per_request(
    make_config: MakeConfig, nodes: dict[str, MirrorNode], redis_url: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    gateway = GatewayProcess(make_config(nodes, redis_url), tmp_path)
    try:
        wait_until(lambda: routed_to(gateway) == "bj", 5, "bj trusted")
        requests = 1000
        idle_start = command_calls(client)
        started = time.monotonic()
        time.sleep(1.0)
        idle_rate = (command_calls(client) - idle_start) / (time.monotonic() - started)

        burst_start = command_calls(client)
        started = time.monotonic()
        for _ in range(requests):
            assert routed_to(gateway) == "bj"
        elapsed = time.monotonic() - started
        burst_calls = command_calls(client) - burst_start
        # Background work (probe writes, flushes, resyncs) continues at its own pace; requests
        # add nothing. Allow the idle rate over the burst's duration, doubled, plus slack.
        assert burst_calls <= 2 * idle_rate * elapsed + 20, (burst_calls, idle_rate, elapsed)
        # Even one command per request would show as ~1000 calls beyond the background.
        assert burst_calls - idle_rate * elapsed < requests / 20
    finally:
        assert gateway.stop() == 0


def test_sighup_adds_a_node_that_is_probed_before_it_is_trusted(
    make_config: MakeConfig, nodes: dict[str, MirrorNode], tmp_path: Path
) -> None:
    config = make_config({"sh": nodes["sh"]})
    gateway = GatewayProcess(config, tmp_path)
    try:
        wait_until(lambda: routed_to(gateway) == "sh", 5, "sh trusted")
        full = make_config(nodes)
        gateway.config_path.write_text(json.dumps(full))
        probes_before = len(nodes["bj"].probes())
        gateway.signal(signal.SIGHUP)
        gateway.wait_for_log("config reloaded: 2 nodes")
        wait_until(lambda: routed_to(gateway) == "bj", 5, "the new node to be trusted")
        assert len(nodes["bj"].probes()) - probes_before >= 3
    finally:
        assert gateway.stop() == 0


def test_node_publishing_full_load_is_used_only_as_last_resort(
    make_config: MakeConfig, nodes: dict[str, MirrorNode], tmp_path: Path
) -> None:
    config = make_config(nodes)
    for node in config["nodes"]:
        node["load_url"] = f"{nodes[node['id']].url}/load"
        node["capacity"] = {"connections": 100}
    nodes["bj"].load = {"active_connections": 10}
    nodes["sh"].load = {"active_connections": 10, "egress_mbps": 50, "capacity_mbps": 1000}
    gateway = GatewayProcess(config, tmp_path)
    try:
        wait_until(lambda: routed_to(gateway) == "bj", 5, "bj trusted")
        wait_until(lambda: node_state(gateway, "bj")["load"] == 0.1, 3, "bj's load to be read")
        assert node_state(gateway, "bj")["load_source"] == "status-json"

        nodes["bj"].load = {"active_connections": 100}
        wait_until(lambda: routed_to(gateway) == "sh", 3, "routing away from the full node")
        nodes["sh"].load = {"active_connections": 150}
        # Both full: the closer one is the last resort, rather than sending China upstream.
        wait_until(lambda: node_state(gateway, "sh")["load"] == 1.5, 3, "sh's load to be read")
        assert routed_to(gateway) == "bj"
    finally:
        assert gateway.stop() == 0


def test_redirects_fill_a_node_before_any_load_reading(
    make_config: MakeConfig, nodes: dict[str, MirrorNode], tmp_path: Path
) -> None:
    """A node publishing no load, starting empty (``load_prior: 0``): every redirect counts
    against its capacity at once, so it takes as many clients as it has slots, then no more."""
    config = make_config(nodes, routing={"load_prior": 0.0})
    config["state"]["redirect_window_s"] = 60.0  # no windowed estimate during the test
    for node in config["nodes"]:
        node["capacity"] = {"connections": 10 if node["id"] == "bj" else 1000}
    gateway = GatewayProcess(config, tmp_path)
    try:
        wait_until(lambda: routed_to(gateway) == "bj", 5, "bj trusted")
        routed = [routed_to(gateway) for _ in range(15)]
    finally:
        assert gateway.stop() == 0
    # One redirect went to bj while waiting; its 10 slots (less what faded meanwhile) fill up.
    assert 9 <= routed.count("bj") <= 10, routed
    assert routed[-4:] == ["sh"] * 4


def run_cli(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_GATEWAY_")}
    if token:
        env["MIRROR_GATEWAY_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=60, check=False,
    )  # fmt: skip


def test_nodes_command_lists_and_drains(
    make_config: MakeConfig, nodes: dict[str, MirrorNode], tmp_path: Path
) -> None:
    gateway = GatewayProcess(make_config(nodes), tmp_path)
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        wait_until(lambda: routed_to(gateway) == "bj", 5, "bj trusted")
        listing = run_cli("nodes", "list", "--gateway", url)
        assert listing.returncode == 0, listing.stderr
        lines = listing.stdout.splitlines()
        assert [line.split()[:3] for line in lines] == [
            ["bj", "up", "active"],
            ["sh", "up", "active"],
        ]

        drained = run_cli("nodes", "drain", "bj", "--gateway", url)
        assert drained.returncode == 0, drained.stderr
        assert drained.stdout.split()[:3] == ["bj", "up", "draining"]
        assert routed_to(gateway) == "sh"

        refused = run_cli("nodes", "list", "--gateway", url, token="wrong-token-0123456789")
        assert refused.returncode == 4
        assert "401" in refused.stderr
        unknown = run_cli("nodes", "disable", "nope", "--gateway", url)
        assert unknown.returncode == 4
        assert "no configured node 'nope'" in unknown.stderr
        assert TOKEN not in gateway.log.read_text()
    finally:
        assert gateway.stop() == 0


def test_admin_api_is_off_without_a_token(
    make_config: MakeConfig, nodes: dict[str, MirrorNode], tmp_path: Path
) -> None:
    config = make_config(nodes)
    del config["admin"]
    gateway = GatewayProcess(config, tmp_path)
    try:
        status, _, body = gateway.get("/admin/nodes", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 404
        assert json.loads(body)["error"] == "admin_disabled"
    finally:
        assert gateway.stop() == 0


def test_transport_failure_moves_clients_before_the_node_is_marked_down(
    make_config: MakeConfig, nodes: dict[str, MirrorNode], tmp_path: Path
) -> None:
    config = make_config(nodes)
    config["probing"]["fall"] = 5
    gateway = GatewayProcess(config, tmp_path)
    try:
        wait_until(lambda: routed_to(gateway) == "bj", 5, "bj trusted")
        nodes["bj"].health_delay_s = 2.0  # past probing.timeout_s: the probe times out
        wait_until(lambda: routed_to(gateway) == "sh", 3, "routing around the timing-out node")
        state = node_state(gateway, "bj")
        assert state["up"], "hysteresis has not marked it down yet"
        nodes["bj"].health_delay_s = 0.0
        wait_until(lambda: routed_to(gateway) == "bj", 5, "bj back after a good probe")
    finally:
        assert gateway.stop() == 0
