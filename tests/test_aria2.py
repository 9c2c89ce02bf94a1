"""aria2 downloads a repository through the gateway's Metalinks, from two mirrors at once, and
still gets every byte right when one mirror serves a corrupt file.

The gateway runs as operators run it (``python -m gateway serve``) in front of a local hub, with
two mirrors in China that hold the repository and publish piece hashes. A Beijing client is
eligible for both; aria2 splits the large file between them and checks each piece against the
Metalink's hashes, so a bad piece is fetched again from the other mirror.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from fake_hub import FakeHub
from geoworld import BEIJING_IP, GeoDBs
from hf_nodes import HfMirrorNode, node_entry
from processes import GatewayProcess, wait_until

FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "nested dir/with spaces/tokenizer.json",
)
WEIGHTS = "model.safetensors"
#: The 3 MiB weights make 12 pieces: aria2 can tell which mirror's half is bad.
PIECE_LENGTH = 256 * 1024
ARIA2_TIMEOUT_S = 60


@dataclass
class World:
    hub: FakeHub
    nodes: dict[str, HfMirrorNode]
    gateway: GatewayProcess

    def expected(self, path: str) -> bytes:
        return self.hub.repo("acme/tiny-model").head().files[path]

    def meta4_url(self, path: str) -> str:
        return (
            f"http://127.0.0.1:{self.gateway.port}/acme/tiny-model/resolve/main/{quote(path)}.meta4"
        )

    def aria2_requests(self, name: str) -> list[str]:
        """Paths aria2 asked a node for (``hub``: upstream and its CDN)."""
        server: FakeHub | HfMirrorNode = self.hub if name == "hub" else self.nodes[name]
        return [
            r.path for r in list(server.seen) if (r.header("User-Agent") or "").startswith("aria2")
        ]

    def clear_logs(self) -> None:
        self.hub.seen.clear()
        for node in self.nodes.values():
            node.seen.clear()


@pytest.fixture(scope="module")
def world(geo_dbs: GeoDBs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with FakeHub() as hub:
        nodes = {name: HfMirrorNode(name, hub, piece_length=PIECE_LENGTH) for name in ("bj", "sh")}
        config = {
            "upstream": {"url": hub.url},
            "geoip": {"city_db": str(geo_dbs.city), "asn_db": str(geo_dbs.asn)},
            "probing": {"interval_s": 0.2, "rise": 1, "probe": {"path": "/health"}},
            "sync": {"interval_s": 0.3},
            "nodes": [
                node_entry("bj", nodes["bj"], 39.9042, 116.4074, [4134]),
                node_entry("sh", nodes["sh"], 31.2304, 121.4737, [4837]),
            ],
        }
        gateway = GatewayProcess(config, tmp_path_factory.mktemp("aria2"))
        world = World(hub, nodes, gateway)
        try:
            # Both mirrors probed and their manifests read: a Metalink names them both.
            wait_until(
                lambda: all(n.url in metalink(world, BEIJING_IP) for n in nodes.values()),
                10,
                "both mirrors eligible",
            )
            yield world
        finally:
            gateway.stop()
            for node in nodes.values():
                node.stop()


def metalink(world: World, ip: str) -> str:
    _, _, body = world.gateway.get(
        f"/acme/tiny-model/resolve/main/{WEIGHTS}.meta4", {"X-Forwarded-For": ip}
    )
    return body.decode()


def aria2(world: World, directory: Path) -> subprocess.CompletedProcess[str]:
    """aria2c over the Metalinks of every file in one run, checking what it downloads."""
    args = [
        "aria2c",
        "--follow-metalink=mem",
        "--check-integrity=true",
        f"--header=X-Forwarded-For: {BEIJING_IP}",
        f"--dir={directory}",
        # Two connections for the large file: the first two sources, one per mirror. aria2
        # counts connections per host name, and both mirrors are "localhost".
        "--split=2",
        "--max-connection-per-server=2",
        "--min-split-size=1M",
        "--uri-selector=inorder",
        "--timeout=10",
        "--connect-timeout=5",
        "--max-tries=5",
        "--retry-wait=0",
        "--no-proxy=127.0.0.1,localhost",
        "--no-conf=true",
        "--console-log-level=notice",
        "--summary-interval=0",
        "--force-sequential=true",
        *(world.meta4_url(path) for path in FILES),
    ]
    return subprocess.run(
        args, capture_output=True, text=True, timeout=ARIA2_TIMEOUT_S, check=False
    )


def assert_complete(world: World, run: subprocess.CompletedProcess[str], directory: Path) -> None:
    report = f"aria2c exited {run.returncode}:\n{run.stdout}\n{run.stderr}"
    assert run.returncode == 0, report
    # aria2's own verdict, checked against the Metalink's hash: its results table has a line
    # per Metalink and per file. (It also logs "Checksum error" before each download: the
    # integrity check of a file that is not there yet.)
    table = re.findall(r"^[0-9a-f]{6}\|(\w+)\s*\|[^|]*\|(.*)$", run.stdout, re.MULTILINE)
    results = {path: status for status, path in table}
    assert {results.get(str(directory / path)) for path in FILES} == {"OK"}, report
    for path in FILES:
        got = (directory / path).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(world.expected(path)).digest(), path


def test_aria2_takes_a_repository_from_both_mirrors(world: World, tmp_path: Path) -> None:
    world.clear_logs()
    run = aria2(world, tmp_path)
    assert_complete(world, run, tmp_path)
    served = world.aria2_requests("bj") + world.aria2_requests("sh")
    for path in FILES:
        assert any(p.endswith(f"/{quote(path)}") for p in served), f"no node served {path}"
    for name in ("bj", "sh"):
        assert any(p.endswith(f"/{WEIGHTS}") for p in world.aria2_requests(name)), f"{name} idle"
    assert world.aria2_requests("hub") == [], "a download went upstream"


def test_aria2_recovers_from_a_corrupt_mirror(world: World, tmp_path: Path) -> None:
    world.clear_logs()
    # Same size, wrong bytes; the manifest stays truthful, and the file is too large for the
    # gateway's own full-hash check: only the piece hashes can tell.
    world.nodes["sh"].corrupt(WEIGHTS)
    try:
        run = aria2(world, tmp_path)
    finally:
        world.nodes["sh"].heal()
    assert_complete(world, run, tmp_path)
    assert any(p.endswith(f"/{WEIGHTS}") for p in world.aria2_requests("sh")), (
        "the corrupt mirror was never asked"
    )
    assert world.aria2_requests("hub") == [], "a download went upstream"
