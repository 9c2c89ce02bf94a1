"""Admission: a node takes clients for a commit it newly lists only once the gateway has checked
every listed file's size and the sha256 of a sample weighted toward the largest files.

The gateway runs as a process in front of a local hub and real mirror nodes; the nodes' own
request logs and the gateway's redirects are the evidence.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from fake_hub import FakeHub, FakeRepo
from hf_nodes import HfMirrorNode
from tool_world import routed_to, tool_world

from gateway.config import CatalogConfig, NodeConfig, SyncConfig, UpstreamConfig
from gateway.hf.catalog import Catalog
from gateway.hf.paths import FileRef
from gateway.state.popularity import RequestCounts
from gateway.state.sync import Servable, SyncTracker, new_session, weighted_sample

TINY = ("model", "acme/tiny-model")
#: Large enough to be drawn first by size, small enough to hash at once.
BIG = random.Random("big").randbytes(1024 * 1024)
#: Polls of the gateway while the corrupt copy is listed; each a HEAD on loopback.
MAX_POLLS = 400


def test_weighted_sample_prefers_large_files_and_respects_bounds() -> None:
    files = {f"small-{i}": (10, "") for i in range(50)} | {"big": (10**6, ""), "huge": (10**9, "")}
    picks = [weighted_sample(files, 2, 10**8, random.Random(seed)) for seed in range(200)]
    assert all(len(p) == 2 == len(set(p)) for p in picks)
    assert all("huge" not in p for p in picks), "over max_bytes: checked by HEAD alone"
    assert sum("big" in p for p in picks) == 200
    assert weighted_sample(files, 5, 10**8, random.Random(1)) == weighted_sample(
        files, 5, 10**8, random.Random(1)
    )
    assert weighted_sample({}, 3, 10, random.Random(1)) == []


def test_weighted_sample_prefers_the_most_requested_of_equal_files() -> None:
    files = {f"shard-{i}": (1000, "") for i in range(20)}
    counts = RequestCounts()
    for _ in range(50):
        counts.count(FileRef("model", "org/m", "main", "shard-7"))
    picks = [
        weighted_sample(
            files, 1, 10**8, random.Random(seed), lambda path: counts.of("model", "org/m", path)
        )
        for seed in range(200)
    ]
    # Weight 51 against 19 files of weight 1: about 73% of single picks.
    assert sum(p == ["shard-7"] for p in picks) > 100
    assert counts.of("model", "org/other", "shard-7") == 0


def test_request_counts_keep_a_bounded_number_of_files() -> None:
    counts = RequestCounts(limit=3)
    for i in range(10):
        counts.count(FileRef("model", "org/m", "main", f"file-{i}"))
    counts.count(FileRef("model", "org/m", "main", "file-9"))
    assert [counts.of("model", "org/m", f"file-{i}") for i in range(10)] == [0] * 7 + [1, 1, 2]


def test_no_client_is_sent_to_a_corrupt_copy_of_a_new_commit(tmp_path: Path) -> None:
    with tool_world(
        tmp_path,
        ("bad", "good"),
        config={"sync": {"interval_s": 0.3, "verify_samples": 3}},
    ) as world:
        repo = world.hub.repo(TINY[1])
        new = repo.push({"big.bin": BIG}, lfs={"big.bin"}, title="add big.bin")
        paths = [f"/{TINY[1]}/resolve/{new.sha}/{p}" for p in ("big.bin", "config.json")]
        assert {routed_to(world, p) for p in paths} == {"upstream"}, "nobody lists it yet"
        world.nodes["bad"].corrupt("big.bin")
        for node in world.nodes.values():
            node.hold(TINY, new.sha)
        seen: list[str] = []
        started = time.monotonic()
        admitted_after = None
        for _ in range(MAX_POLLS):
            seen += [routed_to(world, p) for p in paths]
            if admitted_after is None and "good" in seen:
                admitted_after = time.monotonic() - started
            log = world.gateway.log.read_text()
            if admitted_after is not None and "node bad: excluded for commit" in log:
                break
            time.sleep(0.02)
        assert "bad" not in seen, "a client was sent to the corrupt copy"
        assert admitted_after is not None, f"the good copy never entered service: {seen[-4:]}"
        assert "sha256 mismatch for big.bin" in world.gateway.log.read_text()
        # The commits it already served stay in service.
        assert routed_to(world, f"/{TINY[1]}/resolve/{repo.refs['v1.0']}/config.json") in {
            "bad",
            "good",
        }
    print(f"new commit admitted on the good node {admitted_after:.2f} s after it was listed")


def test_admission_of_a_commit_of_1200_files_is_bounded(tmp_path: Path) -> None:
    files = {f"shard/{i:04d}.json": b'{"i": %d}\n' % i for i in range(1200)}
    repo = FakeRepo("model", "acme/many", [], {})
    repo.push({**files, "weights.bin": BIG}, lfs={"weights.bin"})
    started = time.monotonic()
    with (
        FakeHub([repo], page_size=1000) as hub,
        tool_world(
            tmp_path,
            hub=hub,
            config={"sync": {"interval_s": 0.5}},
            ready_path="/acme/many/resolve/main/weights.bin",
        ) as world,
    ):
        ready = time.monotonic() - started
        log = world.gateway.log.read_text()
        node_requests = [r for r in world.nodes["own"].seen if r.method == "HEAD"]
        assert len({r.path for r in node_requests}) >= 1201, "every file's size was checked"
        match = re.search(r"node own: 1 of 1 new commits admitted in ([0-9.]+) s", log)
        assert match is not None, log[-2000:]
        assert float(match.group(1)) < 30
    print(f"1,201 files admitted in {match.group(1)} s (gateway up and routing in {ready:.1f} s)")


@dataclass
class Tracked:
    """One node of the hub, holding v1.0 of acme/tiny-model, and a tracker of it alone."""

    node: HfMirrorNode
    config: NodeConfig
    tracker: SyncTracker
    session: aiohttp.ClientSession
    commit: str

    def servable(self, path: str = "config.json") -> Servable:
        commit = self.commit
        return self.tracker.servable(self.config, *TINY, commit, commit, path, time.time())


@asynccontextmanager
async def tracked(hub: FakeHub, sync: SyncConfig) -> AsyncIterator[Tracked]:
    commit = hub.repo(TINY[1]).refs["v1.0"]
    node = HfMirrorNode("n", hub, {TINY: [commit]})
    config = NodeConfig(id="n", base_url=node.url, manifest_url=node.manifest_url)
    catalog = Catalog(UpstreamConfig(url=hub.url), CatalogConfig())
    await catalog.start()
    try:
        async with new_session() as session:
            tracker = SyncTracker([config], sync, catalog, timeout_s=5.0)
            yield Tracked(node, config, tracker, session, commit)
    finally:
        await catalog.close()
        node.stop()


async def test_admission_is_bounded_in_time_and_resumes(
    fake_hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    """A node too slow to check within admission_timeout_s takes no clients for the commit;
    the next round, the node answering again, admits it."""
    sync = SyncConfig(admission_timeout_s=0.5, admission_concurrency=1)
    async with tracked(fake_hub, sync) as world:
        world.node.delay_s = 0.2  # each of the commit's files: 0.2 s, one at a time
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="gateway.sync"):
            await world.tracker.run_round(world.session)
        # The manifest, the admission's 0.5 s bound, then ongoing sampling (3 files, HEAD and
        # GET, at 0.2 s each); generous, for a loaded machine: the log line is the proof.
        assert time.monotonic() - started < 5.0
        assert "admission unfinished after" in caplog.text
        assert world.servable() == Servable(
            None, f"commit {world.commit[:7]} of acme/tiny-model awaits admission (sync)"
        )
        world.node.delay_s = 0.0
        await world.tracker.run_round(world.session)
        assert world.servable() == Servable(world.commit, "")


async def test_a_failed_admission_holds_until_the_bad_file_hashes_right(fake_hub: FakeHub) -> None:
    """The 3 MiB weights are over verify_max_bytes: only admission's hash sees the damage, and
    a HEAD alone (same size) must not clear it. No other sample admits the commit meanwhile."""
    async with tracked(fake_hub, SyncConfig(admission_samples=1)) as world:
        world.node.corrupt("model.safetensors")
        for _ in range(5):
            await world.tracker.run_round(world.session)
            assert world.servable().commit is None
            assert "sha256 mismatch for model.safetensors" in world.servable().reason
        world.node.heal()
        for _ in range(2):  # the retry clears the failure, then admission runs again
            await world.tracker.run_round(world.session)
        assert world.servable() == Servable(world.commit, "")
