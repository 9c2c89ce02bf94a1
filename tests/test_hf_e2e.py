"""Real Hugging Face clients, curl and wget through the gateway, end to end.

A local hub plays upstream (with Xet bait on every LFS answer and tree entry), and three nodes
play the mirrors: ``bj`` a full mirror in Beijing, ``sh`` a mirror in Shanghai one commit
behind on ``acme/tiny-model``, ``gz`` a pull-through cache in Guangzhou. Each node's own access
log says who served what.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from fake_hub import VALID_TOKEN, FakeHub
from geoworld import BEIJING_IP, GUANGZHOU_IP, SHANGHAI_IP, GeoDBs
from hf_clients import (
    ALL_CLIENTS,
    ENTRY_NOT_FOUND,
    Call,
    curl_download,
    error_type,
    expect_ok,
    run_calls,
    run_client,
    wget_download,
)
from hf_nodes import HfMirrorNode, node_entry
from processes import GatewayProcess, wait_until

TINY = ("model", "acme/tiny-model")
DATA = ("dataset", "acme/data")


class World:
    def __init__(self, hub: FakeHub, nodes: dict[str, HfMirrorNode], gateway: GatewayProcess):
        self.hub = hub
        self.nodes = nodes
        self.gateway = gateway
        self.endpoint = f"http://127.0.0.1:{gateway.port}"
        tiny = hub.repo("acme/tiny-model")
        self.main = tiny.refs["main"]
        self.v1 = tiny.refs["v1.0"]

    def expected(self, repo_id: str, revision: str) -> dict[str, str]:
        """sha256 of every file of ``repo_id`` at ``revision``, as upstream holds it."""
        repo = self.hub.repo(repo_id)
        commit = repo.resolve(revision)
        assert commit is not None
        return {path: hashlib.sha256(body).hexdigest() for path, body in commit.files.items()}

    def served(self, node: str, sha: str) -> set[str]:
        """Files a node sent to clients at commit ``sha`` (not the gateway's own checks)."""
        marker = f"/resolve/{sha}/"
        return {
            unquote(r.path.split(marker, 1)[1])
            for r in self.nodes[node].seen
            if r.method == "GET"
            and marker in r.path
            and not (r.header("User-Agent") or "").startswith("mirror-gateway")
        }

    def clear_logs(self) -> None:
        for node in self.nodes.values():
            node.seen.clear()


def gateway_config(
    hub: FakeHub, geo: GeoDBs, nodes: dict[str, HfMirrorNode], **node_extra: Any
) -> dict[str, Any]:
    return {
        "upstream": {"url": hub.url},
        "geoip": {"city_db": str(geo.city), "asn_db": str(geo.asn)},
        "probing": {
            "interval_s": 0.2,
            "rise": 1,
            "fall": 2,
            "probe": {"path": "/health", "expect_status": [200]},
        },
        "sync": {"interval_s": 0.3, "verify_samples": 100},
        # Deterministic choices for asserting node logs: distance alone, no near-equal sharing.
        "routing": {"near_equal_km": 1.0, "near_equal_ratio": 0.0, "km_per_latency_ms": 0.0},
        # The HF clients drop a token on the redirect to another host: their downloads with a
        # token may go to our own nodes (test_token_never_reaches_a_node checks they drop it).
        "credentials": {"route": "own_nodes"},
        "nodes": [
            node_entry("bj", nodes["bj"], 39.9042, 116.4074, [4134]),
            node_entry("sh", nodes["sh"], 31.2304, 121.4737, [4837], **node_extra),
            node_entry("gz", nodes["gz"], 23.1291, 113.2644, [], kind="cache"),
        ],
    }


def start_nodes(hub: FakeHub) -> dict[str, HfMirrorNode]:
    tiny = hub.repo("acme/tiny-model")
    data = hub.repo("acme/data", "dataset")
    return {
        "bj": HfMirrorNode("bj", hub),
        # One commit behind: v1 only, while main is at v2.
        "sh": HfMirrorNode("sh", hub, {TINY: [tiny.refs["v1.0"]], DATA: [data.refs["main"]]}),
        "gz": HfMirrorNode("gz", hub, mode="cache"),
    }


def routed(gateway: GatewayProcess, path: str, ip: str) -> str:
    status, headers, _ = gateway.get(path, {"X-Forwarded-For": ip}, method="HEAD")
    return headers.get("x-mirror-node", f"status {status}")


@pytest.fixture(scope="module")
def world(geo_dbs: GeoDBs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("hf-e2e")
    with FakeHub() as hub:
        nodes = start_nodes(hub)
        gateway = GatewayProcess(gateway_config(hub, geo_dbs, nodes), tmp)
        try:
            world = World(hub, nodes, gateway)
            config_json = "/acme/tiny-model/resolve/main/config.json"
            wait_until(
                lambda: routed(gateway, config_json, BEIJING_IP) == "bj",
                10,
                "manifests read and nodes probed",
            )
            world.clear_logs()
            yield world
            assert hub.xet_requests() == [], "a client took the Xet path"
            for name, node in nodes.items():
                assert not node.saw_authorization(), f"node {name} saw an Authorization header"
        finally:
            gateway.stop()
            for node in nodes.values():
                node.stop()


@pytest.mark.parametrize("client", ALL_CLIENTS)
def test_downloads_are_byte_identical_and_served_by_the_right_node(
    world: World, client: str, tmp_path: Path
) -> None:
    """Shanghai's own-network node lags a commit: it serves v1.0 but gets nothing of main."""
    world.clear_logs()
    main_files = ["config.json", "model.safetensors", "nested dir/with spaces/tokenizer.json"]
    calls = [
        Call("hf_hub_download", {"repo_id": "acme/tiny-model", "filename": path,
                                 "headers": {"X-Forwarded-For": SHANGHAI_IP}})
        for path in main_files
    ] + [
        Call("hf_hub_download", {"repo_id": "acme/tiny-model", "filename": "config.json",
                                 "revision": "v1.0", "headers": {"X-Forwarded-For": SHANGHAI_IP}}),
    ]  # fmt: skip
    results = run_calls(client, world.endpoint, calls, hf_home=tmp_path / "hf")
    expected_main = world.expected("acme/tiny-model", "main")
    for path, result in zip(main_files, results[:3], strict=True):
        expect_ok(result)
        assert result["files"] == {path: expected_main[path]}
    expect_ok(results[3])
    assert results[3]["files"] == {
        "config.json": world.expected("acme/tiny-model", "v1.0")["config.json"]
    }

    assert world.served("sh", world.main) == set(), "the lagging node got the newer commit"
    assert world.served("sh", world.v1) == {"config.json"}
    # Main went to the nearest node holding it: Guangzhou's cache is farther than Beijing.
    assert world.served("bj", world.main) == set(main_files)


@pytest.mark.parametrize("client", ALL_CLIENTS)
def test_snapshot_download_from_beijing(world: World, client: str, tmp_path: Path) -> None:
    world.clear_logs()
    result = expect_ok(
        run_client(
            client,
            world.endpoint,
            "snapshot_download",
            hf_home=tmp_path / "hf",
            repo_id="acme/tiny-model",
            headers={"X-Forwarded-For": BEIJING_IP},
        )
    )
    assert result["files"] == world.expected("acme/tiny-model", "main")
    assert world.served("bj", world.main) == set(world.expected("acme/tiny-model", "main"))
    assert world.served("sh", world.main) == world.served("gz", world.main) == set()


def test_guangzhou_goes_to_its_pull_through_cache(world: World, tmp_path: Path) -> None:
    world.clear_logs()
    data = world.hub.repo("acme/data", "dataset")
    result = expect_ok(
        run_client(
            "hf2",
            world.endpoint,
            "hf_hub_download",
            hf_home=tmp_path / "hf",
            repo_id="acme/data",
            repo_type="dataset",
            filename="data/train-00000.parquet",
            headers={"X-Forwarded-For": GUANGZHOU_IP},
        )
    )
    assert result["files"] == {
        "data/train-00000.parquet": world.expected("acme/data", "main")["data/train-00000.parquet"]
    }
    assert world.served("gz", data.refs["main"]) == {"data/train-00000.parquet"}


@pytest.mark.parametrize("client", ALL_CLIENTS)
def test_token_never_reaches_a_node(world: World, client: str, tmp_path: Path) -> None:
    expect_ok(
        run_client(
            client,
            world.endpoint,
            "hf_hub_download",
            hf_home=tmp_path / "hf",
            repo_id="acme/tiny-model",
            filename="model.safetensors",
            token=VALID_TOKEN,
            headers={"X-Forwarded-For": BEIJING_IP},
        )
    )
    assert any(r.path.endswith("model.safetensors") for r in world.nodes["bj"].downloads())
    assert not world.nodes["bj"].saw_authorization()
    assert VALID_TOKEN not in world.gateway.log.read_text()


@pytest.mark.parametrize("client", ALL_CLIENTS)
def test_gated_and_private_repos_go_to_upstream_with_the_token(
    world: World, client: str, tmp_path: Path
) -> None:
    world.clear_logs()
    beijing = {"X-Forwarded-For": BEIJING_IP}
    calls = [
        Call("hf_hub_download", {"repo_id": "acme/gated-model", "filename": "config.json",
                                 "headers": beijing}),
        Call("hf_hub_download", {"repo_id": "acme/gated-model", "filename": "model.safetensors",
                                 "headers": beijing, "token": VALID_TOKEN}),
        Call("hf_hub_download", {"repo_id": "acme/private-model", "filename": "config.json",
                                 "headers": beijing}),
        Call("hf_hub_download", {"repo_id": "acme/private-model", "filename": "model.safetensors",
                                 "headers": beijing, "token": VALID_TOKEN}),
    ]  # fmt: skip
    gated_anon, gated_token, private_anon, private_token = run_calls(
        client, world.endpoint, calls, hf_home=tmp_path / "hf"
    )
    assert error_type(gated_anon) == "GatedRepoError"
    assert gated_token["files"] == {
        "model.safetensors": world.expected("acme/gated-model", "main")["model.safetensors"]
    }, gated_token
    assert "RepositoryNotFoundError" in private_anon["error"]["mro"]
    assert private_token["files"] == {
        "model.safetensors": world.expected("acme/private-model", "main")["model.safetensors"]
    }, private_token
    for node in world.nodes.values():
        assert not [r for r in node.seen if "gated" in r.path or "private" in r.path]


@pytest.mark.parametrize("client", ALL_CLIENTS)
def test_errors_raise_the_clients_own_exceptions(world: World, client: str, tmp_path: Path) -> None:
    beijing = {"X-Forwarded-For": BEIJING_IP}
    calls = [
        Call("hf_hub_download", {"repo_id": "acme/no-such-model", "filename": "config.json",
                                 "headers": beijing}),
        Call("hf_hub_download", {"repo_id": "acme/tiny-model", "filename": "config.json",
                                 "revision": "no-such-branch", "headers": beijing}),
        Call("hf_hub_download", {"repo_id": "acme/tiny-model", "filename": "no-such-file.bin",
                                 "headers": beijing}),
    ]  # fmt: skip
    repo, revision, entry = run_calls(client, world.endpoint, calls, hf_home=tmp_path / "hf")
    assert "RepositoryNotFoundError" in repo["error"]["mro"]
    assert error_type(revision) == "RevisionNotFoundError"
    assert error_type(entry) == ENTRY_NOT_FOUND[client]


@pytest.mark.parametrize("client", ALL_CLIENTS)
def test_tree_listing_pages_through_the_gateway(world: World, client: str, tmp_path: Path) -> None:
    before = len(world.hub.requests_to("/api/models/acme/tiny-model/tree"))
    result = expect_ok(
        run_client(
            client,
            world.endpoint,
            "list_repo_tree",
            hf_home=tmp_path / "hf",
            repo_id="acme/tiny-model",
            recursive=True,
        )
    )
    paths = {e["path"] for e in result["entries"] if e.get("type", "file") == "file"}
    assert paths == set(world.expected("acme/tiny-model", "main"))
    # Page size 2: the client followed several next links, all of them through the gateway.
    assert len(world.hub.requests_to("/api/models/acme/tiny-model/tree")) - before >= 3


def test_tree_entries_lose_xet_hashes_and_links_point_at_the_gateway(world: World) -> None:
    status, headers, body = world.gateway.get(
        "/api/models/acme/tiny-model/tree/main?recursive=true"
    )
    assert status == 200
    entries = json.loads(body)
    assert entries and all("xetHash" not in e for e in entries)
    # The link names the gateway as the client addressed it (its Host header).
    assert headers["link"].startswith("<http://gateway.test/api/models/acme/tiny-model/tree/")
    assert 'rel="next"' in headers["link"]


def test_curl_and_wget_follow_to_the_node(world: World, tmp_path: Path) -> None:
    world.clear_logs()
    url = f"{world.endpoint}/acme/tiny-model/resolve/main/model.safetensors"
    expected = world.expected("acme/tiny-model", "main")["model.safetensors"]
    fetched = curl_download(url, tmp_path / "curl.bin", {"X-Forwarded-For": BEIJING_IP})
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.statuses == [302, 200]
    assert hashlib.sha256(fetched.body).hexdigest() == expected
    fetched = wget_download(url, tmp_path / "wget.bin", {"X-Forwarded-For": BEIJING_IP})
    assert fetched.returncode == 0, fetched.stderr
    assert hashlib.sha256(fetched.body).hexdigest() == expected
    client_fetches = [
        r
        for r in world.nodes["bj"].downloads()
        if r.method == "GET"
        and r.path.endswith("/model.safetensors")
        and not (r.header("User-Agent") or "").startswith("mirror-gateway")
    ]
    assert len(client_fetches) == 2


def test_redirect_carries_the_metadata_clients_need(world: World) -> None:
    tiny = world.hub.repo("acme/tiny-model")
    head = tiny.resolve("main")
    assert head is not None
    status, headers, _ = world.gateway.get(
        "/acme/tiny-model/resolve/main/model.safetensors", {"X-Forwarded-For": BEIJING_IP}, "HEAD"
    )
    assert status == 302
    assert headers["x-repo-commit"] == world.main
    assert headers["x-linked-etag"] == headers["etag"] == f'"{head.sha256("model.safetensors")}"'
    assert headers["x-linked-size"] == str(head.size("model.safetensors"))
    assert headers["location"] == (
        f"{world.nodes['bj'].url}/acme/tiny-model/resolve/{world.main}/model.safetensors"
    )
    assert not [h for h in headers if h.startswith("x-xet")]


def test_corrupt_copy_is_excluded_for_that_commit(
    world: World, geo_dbs: GeoDBs, tmp_path: Path
) -> None:
    """A node whose copy fails verification loses that commit, with the reason."""
    path = "/acme/tiny-model/resolve/main/config.json"
    world.nodes["bj"].corrupt("config.json")
    try:
        wait_until(lambda: routed(world.gateway, path, BEIJING_IP) != "bj", 10, "bj excluded")
    finally:
        world.nodes["bj"].heal()
    wait_until(lambda: routed(world.gateway, path, BEIJING_IP) == "bj", 10, "bj verified again")


def test_bounded_freshness_serves_the_nodes_own_commit(geo_dbs: GeoDBs, tmp_path: Path) -> None:
    with FakeHub() as hub:
        nodes = start_nodes(hub)
        gateway = GatewayProcess(
            gateway_config(hub, geo_dbs, nodes, freshness="bounded", max_lag_s=3600),
            tmp_path,
        )
        try:
            world = World(hub, nodes, gateway)
            path = "/acme/tiny-model/resolve/main/config.json"
            wait_until(lambda: routed(gateway, path, SHANGHAI_IP) == "sh", 10, "sh eligible")
            _, headers, _ = gateway.get(path, {"X-Forwarded-For": SHANGHAI_IP}, "HEAD")
            v1 = hub.repo("acme/tiny-model").resolve("v1.0")
            assert v1 is not None
            # The headers name the commit the node really serves, with that commit's file.
            assert headers["x-repo-commit"] == world.v1
            assert headers["x-linked-size"] == str(v1.size("config.json"))
            assert headers["location"].endswith(f"/resolve/{world.v1}/config.json")
            # An exact commit is never substituted.
            _, headers, _ = gateway.get(
                f"/acme/tiny-model/resolve/{world.main}/config.json",
                {"X-Forwarded-For": SHANGHAI_IP},
                "HEAD",
            )
            assert headers["x-mirror-node"] != "sh"
            assert headers["x-repo-commit"] == world.main
        finally:
            gateway.stop()
            for node in nodes.values():
                node.stop()
