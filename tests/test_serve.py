"""The gateway as operators run it: ``mirror-gateway serve`` in its own process, on loopback."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_hub import FakeHub
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from processes import REPO, GatewayProcess, http, request, wait_until

EXAMPLE_CONFIG = REPO / "config" / "gateway.yaml"
# In the bundled GeoLite2 City build: Beijing (China Unicom) and a US address.
BUNDLED_BEIJING_IP = "202.106.0.20"
BUNDLED_US_IP = "8.8.8.8"
MAIN = "853a9daf2c349f8a4b3e618a2961885a5d4f0429"
CONFIG_JSON = "/acme/tiny-model/resolve/main/config.json"
PINNED_CONFIG_JSON = f"/acme/tiny-model/resolve/{MAIN}/config.json"


def example_config(upstream: str) -> dict[str, Any]:
    """The shipped example, with upstream moved to the local hub (this machine is offline)."""
    config: dict[str, Any] = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    config["upstream"]["url"] = upstream
    return config


@pytest.fixture(scope="module")
def example_gateway(
    tmp_path_factory: pytest.TempPathFactory, fake_hub: FakeHub
) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(example_config(fake_hub.url), tmp_path_factory.mktemp("serve"))
    yield gateway
    assert gateway.stop() == 0


def test_readme_demo_beijing_to_domestic_node_us_to_upstream(
    example_gateway: GatewayProcess, fake_hub: FakeHub
) -> None:
    status, headers, _ = http(
        example_gateway.port,
        request("HEAD", CONFIG_JSON, {"X-Forwarded-For": BUNDLED_BEIJING_IP}),
    )
    assert status == 302
    assert headers["location"] == f"https://bj.hf-mirror.example.cn{PINNED_CONFIG_JSON}"
    assert headers["x-repo-commit"] == MAIN
    status, headers, _ = http(
        example_gateway.port,
        request("HEAD", CONFIG_JSON, {"X-Forwarded-For": BUNDLED_US_IP}),
    )
    assert status == 302
    assert headers["location"] == f"{fake_hub.url}{PINNED_CONFIG_JSON}"


def test_startup_warns_that_bundled_geoip_data_is_stale(example_gateway: GatewayProcess) -> None:
    example_gateway.wait_for_log("2018")
    assert "geoip.city_db" in example_gateway.log.read_text()


LINK_URL = re.compile(r"<([^>]*)>")


def test_sighup_reload_applies_good_config_and_refuses_bad(
    tmp_path: Path, fake_hub: FakeHub
) -> None:
    config_file = tmp_path / "gateway.yaml"
    config = example_config(fake_hub.url)
    config_file.write_text(yaml.safe_dump(config))
    gateway = GatewayProcess(config_file, tmp_path)
    beijing = request("GET", CONFIG_JSON, {"X-Forwarded-For": BUNDLED_BEIJING_IP})
    try:
        config_file.write_text("routing: {max_tier: galaxy}\n")
        gateway.signal(signal.SIGHUP)
        gateway.wait_for_log("reload refused")
        assert "routing.max_tier" in gateway.log.read_text()
        assert http(gateway.port, beijing)[1]["x-mirror-node"] == "cn-beijing"

        config["nodes"] = [n for n in config["nodes"] if n["id"] != "cn-beijing"]
        config_file.write_text(yaml.safe_dump(config))
        gateway.signal(signal.SIGHUP)
        gateway.wait_for_log("config reloaded: 2 nodes")
        assert http(gateway.port, beijing)[1]["x-mirror-node"] == "cn-shanghai"

        # Answers worked out under the old config (Location, Link) must not outlive it.
        moved = {n["id"]: n["url"].replace("https://", "https://moved-") for n in config["nodes"]}
        for node in config["nodes"]:
            node["url"] = moved[node["id"]]
        config_file.write_text(yaml.safe_dump(config))
        gateway.signal(signal.SIGHUP)
        wait_until(
            lambda: gateway.log.read_text().count("config reloaded: 2 nodes") == 2, 10, "reload"
        )
        headers = http(gateway.port, beijing)[1]
        assert headers["location"].startswith(moved["cn-shanghai"] + "/")
        duplicates = [url for url in LINK_URL.findall(headers["link"]) if "://" in url]
        assert duplicates and all(
            url.startswith((*moved.values(), fake_hub.url)) for url in duplicates
        ), headers["link"]

        # Settings read once at start stay in force until a restart, and a reload says so:
        # redirects keep naming the upstream the catalog fetches from.
        config["state"] = {"load_deadband": 0.2}
        config["upstream"] = {"url": "https://hub.example.org"}
        config["server"] = {"header_timeout_s": 3}
        config_file.write_text(yaml.safe_dump(config))
        gateway.signal(signal.SIGHUP)
        for setting in ("state.*", "upstream.*", "server.header_timeout_s"):
            gateway.wait_for_log(f"{setting} changed; it takes effect after a restart")
        us = request("GET", CONFIG_JSON, {"X-Forwarded-For": BUNDLED_US_IP})
        assert http(gateway.port, us)[1]["location"].startswith(fake_hub.url + "/")
    finally:
        assert gateway.stop() == 0


def test_bad_config_refused_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [{id: x, url: 'https://x', kind: proxy}]\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(bad), "--port", "0"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "nodes[0].kind" in result.stderr
    assert "mirror, cache, third_party" in result.stderr
    assert "Traceback" not in result.stderr


def test_explain_command_names_every_node() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "explain", "--config", str(EXAMPLE_CONFIG),
         "--ip", BUNDLED_US_IP, "https://gw.example/gpt2/resolve/main/config.json"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=True,
    )  # fmt: skip
    report = json.loads(result.stdout)
    assert report["decision"]["target"] == "upstream"
    assert report["decision"]["reason"] == "no_eligible_node"
    assert report["client"]["country"] == "US"
    assert {e["node"]: e["reason"] for e in report["excluded"]} == {
        "cn-beijing": "outside_service_area",
        "cn-shanghai": "outside_service_area",
        "cn-guangzhou-cache": "outside_service_area",
    }


NODE_BASES = (
    "https://bj.hf-mirror.example.cn/",
    "https://sh.hf-mirror.example.cn/",
    "https://gz.hf-cache.example.cn/",
)
path_pieces = st.sampled_from(
    ["/", "a", "gpt2", "org", "resolve", "main", "datasets", "spaces", "..", ".", "%2F",
     "%2e%2e", "%00", "%0D%0A", "%E4%B8%AD", "%C3", "%ZZ", "%", "?", "#", "~", "\\", "//",
     "refs%2Fpr%2F1", "x" * 300]
)  # fmt: skip
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60
)
header_names = st.sampled_from(
    ["X-Forwarded-For", "Forwarded", "CF-IPCountry", "CF-Connecting-IP", "X-Real-IP", "Host2"]
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    pieces=st.lists(path_pieces, max_size=12),
    headers=st.dictionaries(header_names, header_text, max_size=4),
    method=st.sampled_from(["GET", "HEAD", "POST", "DELETE"]),
)
def test_any_request_gets_a_redirect_to_a_configured_base_or_a_json_4xx(
    example_gateway: GatewayProcess,
    fake_hub: FakeHub,
    pieces: list[str],
    headers: dict[str, str],
    method: str,
) -> None:
    target = "/" + "/".join(pieces)
    status, response_headers, body = http(example_gateway.port, request(method, target, headers))
    if status == 302:
        assert response_headers["location"].startswith((*NODE_BASES, fake_hub.url + "/"))
    else:
        assert 400 <= status < 500, (target, status, body)
        assert "location" not in response_headers
        if method != "HEAD":
            assert json.loads(body)["error"]
