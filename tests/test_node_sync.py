"""``node sync`` and ``node verify`` against the local hub: verified, atomic, resumable."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fake_hub import VALID_TOKEN, FakeHub, sha256_hex
from processes import REPO, wait_until

from gateway.cli import main
from gateway.node.fetch import RateLimiter
from gateway.node.settings import NodeSettings, RepoSpec
from gateway.node.store import NodeTree
from gateway.node.sync import Syncer, SyncReport
from gateway.node.upstream import Upstream, new_session
from gateway.node.verify import Verifier

MIB = 1024 * 1024
TINY = RepoSpec("model", "acme/tiny-model", ("main",))
DATA = RepoSpec("dataset", "acme/data", ("main",))
GATED = RepoSpec("model", "acme/gated-model", ("main",))


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    # A hub of the test's own: tests push commits and switch on wrong bytes.
    with FakeHub() as hub:
        yield hub


def settings_for(hub: FakeHub, root: Path, *repos: RepoSpec, **extra: object) -> NodeSettings:
    base = NodeSettings(
        node_id="n1",
        root=root,
        upstream=hub.url,
        repos=repos,
        retries=2,
        piece_bytes=MIB,
        prune_after_s=0.0,
    )
    return replace(base, **extra)  # type: ignore[arg-type]


async def sync(settings: NodeSettings, clock: Callable[[], float] = time.time) -> SyncReport:
    async with new_session(settings.timeout_s) as session:
        upstream = Upstream(session, settings.upstream, settings.token)
        return await Syncer(settings, upstream, clock=clock).run()


def manifest(root: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((root / "manifest.json").read_text())
    return data


def listed(root: Path, repo_id: str) -> set[str]:
    repos = manifest(root)["repos"]
    assert isinstance(repos, list)
    return {c for r in repos if r["id"] == repo_id for c in r["commits"]}


def on_disk(root: Path, prefix: str, repo_id: str, commit: str) -> dict[str, str]:
    base = root / f"{prefix}{repo_id}" / "resolve" / commit
    return {
        p.relative_to(base).as_posix(): sha256_hex(p.read_bytes())
        for p in base.rglob("*")
        if p.is_file()
    }


def expected(hub: FakeHub, repo_id: str, revision: str = "main") -> dict[str, str]:
    commit = hub.repo(repo_id).resolve(revision)
    assert commit is not None
    return {path: sha256_hex(body) for path, body in commit.files.items()}


def file_gets(hub: FakeHub, name: str) -> list[str]:
    """Download attempts of a file by name: each starts with one resolve GET (an LFS file's
    is then redirected to the CDN)."""
    return [
        r.path
        for r in hub.seen
        if r.method == "GET" and "/resolve/" in r.path and r.path.endswith("/" + name)
    ]


async def test_sync_publishes_byte_identical_commits_sharing_blobs(
    hub: FakeHub, tmp_path: Path
) -> None:
    tiny = hub.repo("acme/tiny-model")
    spec = RepoSpec("model", "acme/tiny-model", ("main", "v1.0"))
    report = await sync(settings_for(hub, tmp_path, spec, DATA))
    assert report.failed == []
    main, v1 = tiny.refs["main"], tiny.refs["v1.0"]
    assert on_disk(tmp_path, "", "acme/tiny-model", main) == expected(hub, "acme/tiny-model")
    assert on_disk(tmp_path, "", "acme/tiny-model", v1) == expected(hub, "acme/tiny-model", "v1.0")
    data = hub.repo("acme/data", "dataset").refs["main"]
    assert on_disk(tmp_path, "datasets/", "acme/data", data) == expected(hub, "acme/data")
    assert listed(tmp_path, "acme/tiny-model") == {main, v1}
    # The unchanged 3 MiB weights came once and are one inode in both commits.
    weights = [
        (tmp_path / "acme/tiny-model/resolve" / c / "model.safetensors").stat() for c in (main, v1)
    ]
    assert weights[0].st_ino == weights[1].st_ino
    assert len(file_gets(hub, "model.safetensors")) == 1
    assert report.reused >= 3
    # No staging, partial files or temporary files are left behind.
    assert not (tmp_path / ".mirror-node" / "staging").exists()
    assert not (tmp_path / ".mirror-node" / "partial").exists()

    hub.clear_seen()
    again = await sync(settings_for(hub, tmp_path, spec, DATA))
    assert again.published == [] and again.downloaded == 0
    # A synced commit costs one revision call per ref, nothing else.
    assert {r.path.split("/")[5] for r in hub.seen} == {"revision"}


async def test_wrong_bytes_are_never_published_and_a_rerun_fetches_only_them(
    hub: FakeHub, tmp_path: Path
) -> None:
    tiny = hub.repo("acme/tiny-model")
    weights = tiny.head().files["model.safetensors"]
    hub.wrong_bytes.add(sha256_hex(weights))
    settings = settings_for(hub, tmp_path, TINY)
    report = await sync(settings)
    main = tiny.refs["main"]
    (failure,) = report.failed
    assert "model.safetensors: 2 attempts failed; last: sha256" in failure
    assert not (tmp_path / "acme/tiny-model/resolve" / main).exists()
    assert listed(tmp_path, "acme/tiny-model") == set()
    assert len(file_gets(hub, "model.safetensors")) == 2  # the retry

    # The upstream is fixed; the files verified before are not downloaded again.
    hub.wrong_bytes.clear()
    hub.clear_seen()
    report = await sync(settings)
    assert report.failed == []
    assert report.downloaded == 1
    assert on_disk(tmp_path, "", "acme/tiny-model", main) == expected(hub, "acme/tiny-model")
    assert len(file_gets(hub, "model.safetensors")) == 1
    assert file_gets(hub, "config.json") == []
    assert listed(tmp_path, "acme/tiny-model") == {main}


@pytest.mark.parametrize("good_prefix", [True, False])
async def test_an_interrupted_download_resumes_with_a_range(
    hub: FakeHub, tmp_path: Path, good_prefix: bool
) -> None:
    tiny = hub.repo("acme/tiny-model")
    main = tiny.refs["main"]
    weights = tiny.head().files["model.safetensors"]
    partial = NodeTree(tmp_path).partial_dir("model", "acme/tiny-model", main)
    partial.mkdir(parents=True)
    prefix = weights[:MIB] if good_prefix else bytes(MIB)
    (partial / "model.safetensors").write_bytes(prefix)

    report = await sync(settings_for(hub, tmp_path, TINY))
    assert report.failed == []
    digest = hashlib.sha256(weights).hexdigest()
    fetches = [r for r in hub.cdn_requests() if r.path.endswith(digest)]
    assert fetches[0].header("Range") == f"bytes={MIB}-"
    if good_prefix:
        assert len(fetches) == 1
    else:  # the resumed file fails its hash: thrown away and fetched whole
        assert [r.header("Range") for r in fetches] == [f"bytes={MIB}-", None]
    assert on_disk(tmp_path, "", "acme/tiny-model", main) == expected(hub, "acme/tiny-model")


async def test_gated_repo_needs_the_token_which_never_reaches_the_cdn(
    hub: FakeHub, tmp_path: Path
) -> None:
    report = await sync(settings_for(hub, tmp_path, GATED))
    (failure,) = report.failed
    assert "GatedRepo" in failure
    report = await sync(settings_for(hub, tmp_path, GATED, token=VALID_TOKEN))
    assert report.failed == []
    commit = hub.repo("acme/gated-model").refs["main"]
    assert on_disk(tmp_path, "", "acme/gated-model", commit) == expected(hub, "acme/gated-model")
    assert hub.cdn_requests()
    assert all(r.header("Authorization") is None for r in hub.cdn_requests())


async def test_moved_branch_retires_old_commits_then_removes_them(
    hub: FakeHub, tmp_path: Path
) -> None:
    now = [1000.0]
    settings = settings_for(hub, tmp_path, TINY, keep=1, prune_after_s=60.0)
    await sync(settings, lambda: now[0])
    tiny = hub.repo("acme/tiny-model")
    old = tiny.refs["main"]
    new = tiny.push({"config.json": b'{"hidden_size": 32}\n'}).sha
    now[0] = 2000.0
    report = await sync(settings, lambda: now[0])
    assert report.published == [f"acme/tiny-model@{new}"]
    assert report.retired == [f"acme/tiny-model@{old}"]
    # Out of the manifest at once, on disk for clients sent there before.
    assert listed(tmp_path, "acme/tiny-model") == {new}
    assert manifest(tmp_path)["repos"][0]["refs"] == {"main": new}  # type: ignore[index]
    assert (tmp_path / "acme/tiny-model/resolve" / old).is_dir()
    now[0] = 2060.0
    report = await sync(settings, lambda: now[0])
    assert report.removed == [f"acme/tiny-model@{old}"]
    assert not (tmp_path / "acme/tiny-model/resolve" / old).exists()
    # The blob it shared with the new commit lives on.
    assert on_disk(tmp_path, "", "acme/tiny-model", new) == expected(hub, "acme/tiny-model")


async def test_verify_quarantines_damage_and_sync_repairs_it(hub: FakeHub, tmp_path: Path) -> None:
    tiny = hub.repo("acme/tiny-model")
    spec = RepoSpec("model", "acme/tiny-model", ("main", "v1.0"))
    settings = settings_for(hub, tmp_path, spec)
    await sync(settings)
    main, v1 = tiny.refs["main"], tiny.refs["v1.0"]
    tree = NodeTree(tmp_path)
    assert Verifier(tree).run(1.0).damaged == []

    # Same size, other bytes, in the blob both commits share by hard link.
    weights = tmp_path / "acme/tiny-model/resolve" / main / "model.safetensors"
    with weights.open("r+b") as f:
        f.seek(MIB)
        f.write(b"\0" * 16)
    report = Verifier(tree).run(1.0)
    assert sorted(d.split("/model.safetensors")[0] for d in report.damaged) == sorted(
        [f"acme/tiny-model@{main}", f"acme/tiny-model@{v1}"]
    )
    assert len(report.quarantined) == 2
    assert all(
        p.is_relative_to(tmp_path / ".mirror-node" / "quarantine") for p in report.quarantined
    )
    assert not weights.exists()
    assert listed(tmp_path, "acme/tiny-model") == set()
    assert Verifier(tree).run(1.0).damaged == []  # broken commits are not checked again

    hub.clear_seen()
    report = await sync(settings)
    assert sorted(report.published) == sorted([f"acme/tiny-model@{main}", f"acme/tiny-model@{v1}"])
    assert report.downloaded == 1  # the weights, once; v1 links them again
    assert listed(tmp_path, "acme/tiny-model") == {main, v1}
    assert on_disk(tmp_path, "", "acme/tiny-model", main) == expected(hub, "acme/tiny-model")


def test_manifest_command_rebuilds_from_disk(hub: FakeHub, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(VALID_TOKEN + "\n")
    root = tmp_path / "node"
    args = ["node", "sync", "--root", str(root), "--upstream", hub.url, "--node-id", "n1"]
    assert main([*args, "--token-file", str(token), "acme/gated-model", "--once"]) == 0
    assert main([*args, "--repo-type", "dataset", "acme/data@main", "--once"]) == 0
    commit = hub.repo("acme/gated-model").refs["main"]
    assert listed(root, "acme/gated-model") == {commit}
    (root / "manifest.json").unlink()
    (root / "acme/gated-model/resolve" / commit / "config.json").unlink()
    assert main(["node", "manifest", "--root", str(root)]) == 0
    # A commit missing a file is left out of the rebuilt manifest.
    assert listed(root, "acme/gated-model") == set()
    assert listed(root, "acme/data") == {hub.repo("acme/data", "dataset").refs["main"]}
    assert oct(os.stat(root / "manifest.json").st_mode & 0o777) == "0o644"


def test_command_errors_exit_with_their_codes(tmp_path: Path) -> None:
    assert main(["node", "verify", "--root", str(tmp_path), "--share", "0"]) == 3
    assert main(["node", "manifest", "--root", str(tmp_path)]) == 5
    assert main(["node", "sync", "--root", str(tmp_path), "--once"]) == 2
    bad = tmp_path / "node.yaml"
    bad.write_text("root: /x\nrepos: [{id: a/b, revisons: [main]}]\n")
    assert main(["node", "sync", "--config", str(bad), "--once"]) == 2
    assert main(["node", "sync", "--root", str(tmp_path), "--every", "soon", "a/b"]) == 3


def test_a_killed_sync_resumes_without_downloading_verified_files_again(
    hub: FakeHub, tmp_path: Path
) -> None:
    root = tmp_path / "node"
    config = tmp_path / "node.yaml"
    config.write_text(
        f"node_id: n1\nroot: {root}\nupstream: {hub.url}\nconcurrency: 1\n"
        "repos: [{id: acme/tiny-model}]\n"
    )
    command = [sys.executable, "-m", "gateway", "node", "sync", "--config", str(config), "--once"]
    staging = NodeTree(root).staging_dir(
        "model", "acme/tiny-model", hub.repo("acme/tiny-model").refs["main"]
    )

    def staged() -> set[str]:
        if not staging.is_dir():
            return set()
        return {p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()}

    hub.delay_s = 0.3  # every request: time to stop the run between two files
    with subprocess.Popen(command, cwd=REPO, stderr=subprocess.DEVNULL) as run:
        try:
            wait_until(lambda: len(staged()) >= 2, 60, "two files staged")
        finally:
            run.kill()
    before = staged()
    assert 2 <= len(before) < 5
    assert not (root / "acme/tiny-model/resolve").exists()  # nothing half published

    hub.delay_s = 0.0
    hub.clear_seen()
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert all(file_gets(hub, name) == [] for name in before)
    main = hub.repo("acme/tiny-model").refs["main"]
    assert on_disk(root, "", "acme/tiny-model", main) == expected(hub, "acme/tiny-model")
    assert '"sync done' in done.stderr and f"{5 - len(before)} files downloaded" in done.stderr


async def test_bandwidth_limit_holds_downloads_to_the_rate() -> None:
    limiter = RateLimiter(1_000_000)
    started = time.monotonic()
    await limiter.take(1_000_000)  # a second's worth is allowed at once
    assert time.monotonic() - started < 2.0
    await limiter.take(500_000)
    assert time.monotonic() - started >= 0.45
    unlimited = RateLimiter(None)
    started = time.monotonic()
    await unlimited.take(10**12)
    assert time.monotonic() - started < 2.0


async def test_a_damaged_blob_is_not_shared_into_a_new_commit(hub: FakeHub, tmp_path: Path) -> None:
    settings = settings_for(hub, tmp_path, TINY)
    await sync(settings)
    tiny = hub.repo("acme/tiny-model")
    old = tmp_path / "acme/tiny-model/resolve" / tiny.refs["main"] / "model.safetensors"
    with old.open("r+b") as f:
        f.write(b"\0" * 8)
    new = tiny.push({"config.json": b"{}\n"}).sha
    report = await sync(settings)
    assert report.published == [f"acme/tiny-model@{new}"]
    assert report.downloaded == 2  # the changed config, and the weights the link failed for
    fresh = tmp_path / "acme/tiny-model/resolve" / new / "model.safetensors"
    assert fresh.stat().st_ino != old.stat().st_ino
    assert on_disk(tmp_path, "", "acme/tiny-model", new) == expected(hub, "acme/tiny-model")
