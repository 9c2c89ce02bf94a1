"""A real mirror node end to end: ``node sync`` from the local hub, the shipped nginx site
serving the tree, the gateway reading its manifest, and Hugging Face clients downloading.

Each test builds its own world (hub, node directory, nginx, gateway), so none depends on what
another changed. The gateway samples no files itself (``verify_samples: 0``): whatever it stops
or starts routing to the node follows from the node's manifest alone.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import yaml
from fake_hub import VALID_TOKEN, FakeHub, sha256_hex
from geoworld import BEIJING_IP, GeoDBs
from hf_clients import ALL_CLIENTS, expect_ok, run_client
from nginx_node import NginxNode
from processes import REPO, GatewayProcess, wait_until

from gateway.state.probe import parse_status_json

BEIJING = {"X-Forwarded-For": BEIJING_IP}
MIB = 1024 * 1024


@dataclass
class World:
    hub: FakeHub
    root: Path
    config: Path
    nginx: NginxNode
    gateway: GatewayProcess

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    def node(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``mirror-gateway node ...`` as an operator (or a timer) does."""
        return subprocess.run(
            [sys.executable, "-m", "gateway", "node", *args],
            capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
        )  # fmt: skip

    def sync(self) -> None:
        done = self.node("sync", "--config", str(self.config), "--once")
        assert done.returncode == 0, done.stderr

    def routed(self, path: str) -> tuple[str, str]:
        """(the node the gateway picks for a Beijing client, the commit it names)."""
        status, headers, _ = self.gateway.get(path, BEIJING, method="HEAD")
        return headers.get("x-mirror-node", f"status {status}"), headers.get("x-repo-commit", "")

    def client_gets(self, marker: str = "") -> set[str]:
        """Files clients (not the gateway's prober or sync) fetched from nginx."""
        return {
            unquote(hit.uri.split("/resolve/", 1)[1].split("/", 1)[1])
            for hit in self.nginx.hits()
            if hit.method == "GET"
            and hit.status in (200, 206)
            and "/resolve/" in hit.uri
            and marker in hit.uri
            and not hit.user_agent.startswith("mirror-gateway")
        }

    def expected(self, repo_id: str, revision: str = "main") -> dict[str, str]:
        commit = self.hub.repo(repo_id).resolve(revision)
        assert commit is not None
        return {path: sha256_hex(body) for path, body in commit.files.items()}


def node_config(hub: FakeHub, root: Path, token_file: Path) -> dict[str, Any]:
    return {
        "node_id": "bj",
        "root": str(root),
        "upstream": hub.url,
        "token_file": str(token_file),
        "piece_bytes": MIB,
        "keep": 2,
        "prune_after_s": 0,
        "repos": [
            {"id": "acme/tiny-model"},
            {"id": "acme/data", "type": "dataset"},
            {"id": "acme/gated-model"},
        ],
    }


def gateway_config(hub: FakeHub, geo: GeoDBs, nginx: NginxNode) -> dict[str, Any]:
    return {
        "upstream": {"url": hub.url},
        "geoip": {"city_db": str(geo.city), "asn_db": str(geo.asn)},
        "catalog": {"ref_ttl_s": 0},
        "probing": {
            "interval_s": 0.2,
            "rise": 1,
            "fall": 2,
            "probe": {"path": "/health", "expect_status": [200]},
        },
        "sync": {"interval_s": 0.3, "verify_samples": 0},
        "nodes": [
            {
                "id": "bj",
                "url": nginx.url,
                "country": "CN",
                "latitude": 39.9042,
                "longitude": 116.4074,
                "serves": {"countries": ["CN"]},
                "manifest_url": f"{nginx.url}/manifest.json",
                "load_url": f"{nginx.url}/load",
                "load_format": "json",
            }
        ],
    }


@pytest.fixture
def world(geo_dbs: GeoDBs, tmp_path: Path) -> Iterator[World]:
    with FakeHub() as hub:
        root = tmp_path / "node"
        token_file = tmp_path / "token"
        token_file.write_text(VALID_TOKEN + "\n")
        config = tmp_path / "node.yaml"
        config.write_text(yaml.safe_dump(node_config(hub, root, token_file)))
        with NginxNode(root, tmp_path / "nginx") as nginx:
            gateway = GatewayProcess(gateway_config(hub, geo_dbs, nginx), tmp_path)
            try:
                world = World(hub, root, config, nginx, gateway)
                world.sync()
                main = hub.repo("acme/tiny-model").refs["main"]
                wait_until(
                    lambda: (
                        world.routed("/acme/tiny-model/resolve/main/config.json") == ("bj", main)
                    ),
                    20,
                    "the gateway to read the node's manifest",
                )
                yield world
            finally:
                gateway.stop()
        assert hub.xet_requests() == []


def test_clients_get_every_file_from_the_node_byte_identical(world: World, tmp_path: Path) -> None:
    hub = world.hub
    hub.clear_seen()
    for client in ALL_CLIENTS:
        result = expect_ok(
            run_client(
                client, world.endpoint, "snapshot_download", hf_home=tmp_path / client,
                repo_id="acme/tiny-model", headers=BEIJING,
            )
        )  # fmt: skip
        assert result["files"] == world.expected("acme/tiny-model"), client
    result = expect_ok(
        run_client(
            "hf2", world.endpoint, "snapshot_download", hf_home=tmp_path / "data",
            repo_id="acme/data", repo_type="dataset", headers=BEIJING,
        )
    )  # fmt: skip
    assert result["files"] == world.expected("acme/data")
    # Every byte came from nginx: the hub's CDN served nothing, its resolve URLs nothing.
    assert hub.cdn_requests() == []
    assert [r for r in hub.seen if "/resolve/" in r.path] == []
    tiny = hub.repo("acme/tiny-model").refs["main"]
    data = hub.repo("acme/data", "dataset").refs["main"]
    assert world.client_gets(tiny) == set(world.expected("acme/tiny-model"))
    assert world.client_gets(data) == set(world.expected("acme/data"))


def test_the_site_reports_its_load_in_the_probers_format(world: World) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{world.nginx.port}/load", timeout=10) as r:
        assert r.headers["Content-Type"] == "application/json"
        record = parse_status_json("bj", r.read(), 0.0)
    assert record.active_connections is not None and record.active_connections >= 1
    assert record.capacity_connections == 1024


def test_gated_repo_is_mirrored_but_clients_go_upstream(world: World, tmp_path: Path) -> None:
    gated = world.hub.repo("acme/gated-model")
    on_node = world.root / "acme/gated-model/resolve" / gated.refs["main"]
    assert {
        p.relative_to(on_node).as_posix(): sha256_hex(p.read_bytes()) for p in on_node.iterdir()
    } == world.expected("acme/gated-model")
    result = expect_ok(
        run_client(
            "hf2", world.endpoint, "snapshot_download", hf_home=tmp_path / "hf",
            repo_id="acme/gated-model", token=VALID_TOKEN, headers=BEIJING,
        )
    )  # fmt: skip
    assert result["files"] == world.expected("acme/gated-model")
    # The hub checked the client's own token; the node, which has no way to, served nothing.
    assert world.client_gets("gated-model") == set()


def test_a_moved_branch_is_followed_after_the_next_sync(world: World, tmp_path: Path) -> None:
    tiny = world.hub.repo("acme/tiny-model")
    old = tiny.refs["main"]
    new = tiny.push({"config.json": b'{"model_type": "tiny", "hidden_size": 64}\n'}).sha
    path = "/acme/tiny-model/resolve/main/config.json"
    # Until the node has it, the new commit goes upstream, never to the node's old copy.
    wait_until(lambda: world.routed(path) == ("upstream", new), 10, "the new commit upstream")
    world.sync()
    wait_until(lambda: world.routed(path) == ("bj", new), 10, "the gateway to follow the node")
    result = expect_ok(
        run_client(
            "hf2", world.endpoint, "hf_hub_download", hf_home=tmp_path / "hf",
            repo_id="acme/tiny-model", filename="config.json", headers=BEIJING,
        )
    )  # fmt: skip
    assert result["files"] == {"config.json": world.expected("acme/tiny-model")["config.json"]}
    assert world.client_gets(new) == {"config.json"}
    # Both commits are kept (keep: 2) and share the unchanged weights by hard link.
    weights = [world.root / "acme/tiny-model/resolve" / c / "model.safetensors" for c in (old, new)]
    assert weights[0].stat().st_ino == weights[1].stat().st_ino


def test_a_corrupt_file_is_quarantined_and_the_gateway_stops_routing_that_commit(
    world: World,
) -> None:
    data = world.hub.repo("acme/data", "dataset").refs["main"]
    path = "/datasets/acme/data/resolve/main/data/train-00000.parquet"
    assert world.routed(path) == ("bj", data)
    assert world.node("verify", "--root", str(world.root)).returncode == 0

    on_disk = world.root / "datasets/acme/data/resolve" / data / "data/train-00000.parquet"
    content = bytearray(on_disk.read_bytes())
    content[1000] ^= 0xFF
    on_disk.write_bytes(bytes(content))
    verify = world.node("verify", "--root", str(world.root))
    assert verify.returncode == 1, verify.stderr
    assert "data/train-00000.parquet: sha256" in verify.stderr
    assert not on_disk.exists()
    assert list((world.root / ".mirror-node" / "quarantine").rglob("train-00000.parquet"))
    wait_until(lambda: world.routed(path) == ("upstream", data), 10, "bj dropped for the commit")
    # The other repositories' commits are still the node's.
    assert world.routed("/acme/tiny-model/resolve/main/config.json")[0] == "bj"

    world.sync()  # downloads the quarantined file again and republishes the commit
    wait_until(lambda: world.routed(path) == ("bj", data), 10, "bj serving the commit again")
    expected = world.expected("acme/data")["data/train-00000.parquet"]
    assert sha256_hex(on_disk.read_bytes()) == expected


def test_a_file_upstream_serves_wrong_is_never_published(world: World) -> None:
    tiny = world.hub.repo("acme/tiny-model")
    weights = b"new weights " * 50_000
    new = tiny.push({"model.safetensors": weights}, lfs=["model.safetensors"]).sha
    world.hub.wrong_bytes.add(sha256_hex(weights))
    done = world.node("sync", "--config", str(world.config), "--once")
    assert done.returncode == 1
    assert f"commit {new} not published" in done.stderr
    assert not (world.root / "acme/tiny-model/resolve" / new).exists()
    # Its other files verified, but the gateway never sends anyone to the node for the commit.
    path = "/acme/tiny-model/resolve/main/config.json"
    wait_until(lambda: world.routed(path) == ("upstream", new), 10, "the new commit upstream")
    assert world.routed(f"/acme/tiny-model/resolve/{new}/model.safetensors") == ("upstream", new)

    world.hub.wrong_bytes.clear()
    world.sync()
    wait_until(lambda: world.routed(path) == ("bj", new), 10, "the gateway to follow the node")


def test_metalink_clients_check_the_nodes_piece_hashes(world: World, tmp_path: Path) -> None:
    tiny = world.hub.repo("acme/tiny-model")
    weights = tiny.head().files["model.safetensors"]
    path = "/acme/tiny-model/resolve/main/model.safetensors.meta4"
    status, _, body = world.gateway.get(path, BEIJING)
    assert status == 200
    metalink = body.decode()
    pieces = [hashlib.sha256(weights[i : i + MIB]).hexdigest() for i in range(0, len(weights), MIB)]
    assert f'<pieces length="{MIB}" type="sha-256">' in metalink
    assert all(f"<hash>{piece}</hash>" in metalink for piece in pieces)
    assert f"{world.nginx.url}/acme/tiny-model/resolve/{tiny.refs['main']}/" in metalink

    run = subprocess.run(
        ["aria2c", "--follow-metalink=mem", "--check-integrity=true", "--no-conf=true",
         f"--header=X-Forwarded-For: {BEIJING_IP}", f"--dir={tmp_path}",
         "--no-proxy=127.0.0.1,localhost", "--timeout=10", "--max-tries=3",
         "--uri-selector=inorder", "--console-log-level=warn", "--summary-interval=0",
         f"{world.endpoint}{path}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "model.safetensors").read_bytes() == weights
    assert any(
        hit.uri.endswith("/model.safetensors") and hit.user_agent.startswith("aria2")
        for hit in world.nginx.hits()
    )
