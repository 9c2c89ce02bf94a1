"""Node sync: manifest parsing and routing-rule tables, then real nodes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import Freshness, NodeConfig, SyncConfig
from gateway.hf.catalog import CatalogError, FileMeta, RepoRevision, is_commit_sha
from gateway.hf.paths import RepoType, parse_resolve_path
from gateway.state.manifest import (
    CommitHolding,
    CommitKey,
    ManifestError,
    NodeHoldings,
    RepoKey,
    parse_manifest,
)
from gateway.state.sync import (
    MANIFEST_NOT_READ,
    USER_AGENT,
    Servable,
    SyncTracker,
    fetch_manifest,
    holds_exactly,
    new_session,
    pick_samples,
    servable_commit,
    verify_sample,
)

AiohttpServer = Callable[[web.Application], Awaitable[TestServer]]
Doc = dict[str, Any]

NOW = 1_732_500_000.0
DAY = 86400.0
NEW = "1a2b3c4d" + "0" * 32
OLD = "9f8e7d6c" + "0" * 32
GONE = "c0ffee00" + "0" * 32
REPO: RepoKey = ("model", "acme/tiny-model")

CONFIG = b'{"model_type": "tiny", "hidden_size": 8}'
WEIGHTS = bytes(range(256)) * 40
UPSTREAM_FILES = {"config.json": CONFIG, "model.safetensors": WEIGHTS}
LFS_FILES = frozenset({"model.safetensors"})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def file_entry(path: str, data: bytes) -> Doc:
    return {"path": path, "size": len(data), "sha256": sha256(data)}


def manifest_doc(
    files: Mapping[str, bytes] = UPSTREAM_FILES, *, synced_at: float = NOW - 600
) -> Doc:
    """What node "bj" publishes when it holds ``files`` of acme/tiny-model at NEW."""
    return {
        "node": "bj",
        "generated_at": NOW - 60,
        "repos": [
            {
                "type": "model",
                "id": "acme/tiny-model",
                "refs": {"main": NEW},
                "commits": {
                    NEW: {
                        "synced_at": synced_at,
                        "files": [file_entry(path, data) for path, data in files.items()],
                    }
                },
            }
        ],
    }


def encode(doc: object) -> bytes:
    return json.dumps(doc).encode()


# --------------------------------------------------------------------------- parse_manifest


def test_parse_manifest() -> None:
    doc = manifest_doc()
    doc["repos"].append(
        {
            "type": "dataset",
            "id": "acme/data",
            "commits": {
                OLD: {"synced_at": NOW - 2 * DAY, "files": [file_entry("data/train.csv", b"a,b")]}
            },
        }
    )
    doc["repos"].append({"type": "space", "id": "demo", "refs": None, "commits": {}})
    holdings = parse_manifest("bj", encode(doc), NOW, 10_000)
    assert holdings == NodeHoldings(
        node_id="bj",
        commits={
            REPO: {
                NEW: CommitHolding(
                    NOW - 600,
                    {
                        "config.json": (len(CONFIG), sha256(CONFIG)),
                        "model.safetensors": (len(WEIGHTS), sha256(WEIGHTS)),
                    },
                )
            },
            ("dataset", "acme/data"): {
                OLD: CommitHolding(NOW - 2 * DAY, {"data/train.csv": (3, sha256(b"a,b"))})
            },
            ("space", "demo"): {},
        },
        refs={REPO: {"main": NEW}},
        fetched_at=NOW,
        generated_at=NOW - 60,
    )


def test_parse_manifest_ignores_unknown_keys() -> None:
    doc = manifest_doc()
    doc["version"] = 2
    doc["repos"][0]["mirror_of"] = "https://huggingface.co"
    doc["repos"][0]["commits"][NEW]["bytes_total"] = 1
    doc["repos"][0]["commits"][NEW]["files"][0]["mtime"] = 5
    doc["repos"][0]["commits"][NEW]["files"][0]["extra"] = {"x": [1, 1]}
    assert parse_manifest("bj", encode(doc), NOW, 10_000) == parse_manifest(
        "bj", encode(manifest_doc()), NOW, 10_000
    )


def broken(change: Callable[[Doc], object]) -> bytes:
    """The good manifest with one thing changed."""
    doc = copy.deepcopy(manifest_doc())
    change(doc)
    return encode(doc)


def repo0(doc: Doc) -> Doc:
    repo: Doc = doc["repos"][0]
    return repo


def files0(doc: Doc) -> list[Doc]:
    files: list[Doc] = repo0(doc)["commits"][NEW]["files"]
    return files


AT_COMMIT = f'$.repos[0].commits["{NEW}"]'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"{}" * 6000, "manifest: more than 10000 bytes", id="too-big"),
        pytest.param(b"\xff\xfe{}", "manifest: body is not UTF-8", id="not-utf8"),
        pytest.param(
            b"{",
            "manifest: not valid JSON (Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1))",
            id="not-json",
        ),
        pytest.param(
            b'{"node": "bj", "generated_at": NaN, "repos": []}',
            "manifest: not valid JSON (NaN is not valid JSON)",
            id="nan",
        ),
        pytest.param(b"[" * 5000, "manifest: not valid JSON (nested too deeply)", id="deep"),
        pytest.param(b"[]", "manifest $: expected an object, got array", id="top-array"),
        pytest.param(
            b'{"node": "bj", "node": "bj", "generated_at": 1, "repos": []}',
            "manifest $: key 'node' appears more than once",
            id="repeated-key",
        ),
        pytest.param(broken(lambda d: d.pop("node")), "manifest $.node: missing", id="no-node"),
        pytest.param(
            broken(lambda d: d.update(node=12)),
            "manifest $.node: expected a non-empty string, got 12",
            id="node-number",
        ),
        pytest.param(
            broken(lambda d: d.update(node="sh")),
            "manifest $.node: 'sh' is another node than 'bj'",
            id="other-node",
        ),
        pytest.param(
            broken(lambda d: d.update(generated_at="yesterday")),
            "manifest $.generated_at: expected a Unix time, got 'yesterday'",
            id="generated-at-string",
        ),
        pytest.param(
            broken(lambda d: d.update(generated_at=-1)),
            "manifest $.generated_at: expected a finite Unix time >= 0, got -1",
            id="generated-at-negative",
        ),
        pytest.param(
            broken(lambda d: d.update(repos={})),
            "manifest $.repos: expected an array, got object",
            id="repos-object",
        ),
        pytest.param(
            broken(lambda d: d["repos"].append("acme/x")),
            "manifest $.repos[1]: expected an object, got string",
            id="repo-string",
        ),
        pytest.param(
            broken(lambda d: repo0(d).update(type="modle")),
            "manifest $.repos[0].type: 'modle' is not allowed; allowed: model, dataset, space",
            id="repo-type",
        ),
        pytest.param(
            broken(lambda d: repo0(d).update(id="acme/../x")),
            "manifest $.repos[0].id: 'acme/../x' is not a valid repository id",
            id="repo-id-traversal",
        ),
        pytest.param(
            broken(lambda d: repo0(d).update(id="a/b/c")),
            "manifest $.repos[0].id: 'a/b/c' is not a valid repository id",
            id="repo-id-three-parts",
        ),
        pytest.param(
            broken(lambda d: repo0(d).update(id="acme/x%41")),
            "manifest $.repos[0].id: 'acme/x%41' is not a valid repository id",
            id="repo-id-escape",
        ),
        pytest.param(
            broken(lambda d: d["repos"].append(copy.deepcopy(repo0(d)))),
            "manifest $.repos[1]: acme/tiny-model is listed again (first at $.repos[0])",
            id="repo-twice",
        ),
        pytest.param(
            broken(lambda d: repo0(d).update(refs=["main"])),
            "manifest $.repos[0].refs: expected an object, got array",
            id="refs-array",
        ),
        pytest.param(
            broken(lambda d: repo0(d).update(refs={"main": "abc"})),
            "manifest $.repos[0].refs[\"main\"]: 'abc' is not a 40-hex lowercase commit",
            id="ref-short-sha",
        ),
        pytest.param(
            broken(lambda d: repo0(d).update(refs={"main": None})),
            'manifest $.repos[0].refs["main"]: expected a non-empty string, got None',
            id="ref-null",
        ),
        pytest.param(
            broken(lambda d: repo0(d).update(refs={"": NEW})),
            "manifest $.repos[0].refs[\"\"]: expected a non-empty string, got ''",
            id="ref-empty-name",
        ),
        pytest.param(
            encode(manifest_doc()).replace(
                f'"main": "{NEW}"'.encode(), f'"main": "{NEW}", "main": "{OLD}"'.encode()
            ),
            "manifest $.repos[0].refs: key 'main' appears more than once",
            id="ref-twice",
        ),
        pytest.param(
            broken(lambda d: repo0(d).pop("commits")),
            "manifest $.repos[0].commits: missing",
            id="no-commits",
        ),
        pytest.param(
            broken(lambda d: repo0(d).update(commits={NEW.upper(): {}})),
            f'manifest $.repos[0].commits["{NEW.upper()}"]: {NEW.upper()!r} is not a 40-hex '
            "lowercase commit",
            id="commit-uppercase",
        ),
        pytest.param(
            broken(lambda d: repo0(d)["commits"][NEW].pop("synced_at")),
            f"manifest {AT_COMMIT}.synced_at: missing",
            id="no-synced-at",
        ),
        pytest.param(
            broken(lambda d: repo0(d)["commits"][NEW].update(synced_at=True)),
            f"manifest {AT_COMMIT}.synced_at: expected a Unix time, got True",
            id="synced-at-bool",
        ),
        pytest.param(
            encode(manifest_doc()).replace(b"1732499400.0", b"1e999"),
            f"manifest {AT_COMMIT}.synced_at: expected a finite Unix time >= 0, got inf",
            id="synced-at-inf",
        ),
        pytest.param(
            broken(lambda d: repo0(d)["commits"][NEW].update(files="config.json")),
            f"manifest {AT_COMMIT}.files: expected an array, got string",
            id="files-string",
        ),
        pytest.param(
            broken(lambda d: files0(d)[1].pop("sha256")),
            f"manifest {AT_COMMIT}.files[1].sha256: missing",
            id="no-sha256",
        ),
        pytest.param(
            broken(lambda d: files0(d)[0].update(path="../secret")),
            f"manifest {AT_COMMIT}.files[0].path: '../secret' has a '.' or '..' segment",
            id="path-traversal",
        ),
        pytest.param(
            broken(lambda d: files0(d)[0].update(path="/etc/passwd")),
            f"manifest {AT_COMMIT}.files[0].path: '/etc/passwd' has an empty path segment",
            id="path-absolute",
        ),
        pytest.param(
            broken(lambda d: files0(d)[0].update(path="a\\b")),
            f"manifest {AT_COMMIT}.files[0].path: 'a\\\\b' contains a backslash",
            id="path-backslash",
        ),
        pytest.param(
            broken(lambda d: files0(d)[0].update(path="a\nb")),
            f"manifest {AT_COMMIT}.files[0].path: 'a\\nb' contains a control character",
            id="path-newline",
        ),
        pytest.param(
            broken(lambda d: files0(d)[1].update(path="config.json")),
            f"manifest {AT_COMMIT}.files[1].path: 'config.json' is listed again "
            "(first at files[0])",
            id="path-twice",
        ),
        pytest.param(
            broken(lambda d: files0(d)[0].update(size=-1)),
            f"manifest {AT_COMMIT}.files[0].size: expected an integer >= 0, got -1",
            id="size-negative",
        ),
        pytest.param(
            broken(lambda d: files0(d)[0].update(size=1.5)),
            f"manifest {AT_COMMIT}.files[0].size: expected an integer >= 0, got 1.5",
            id="size-float",
        ),
        pytest.param(
            broken(lambda d: files0(d)[0].update(sha256="abc")),
            f"manifest {AT_COMMIT}.files[0].sha256: expected 64 lowercase hex digits, got 'abc'",
            id="sha256-short",
        ),
        pytest.param(
            broken(lambda d: files0(d)[0].update(sha256="A" * 64)),
            f"manifest {AT_COMMIT}.files[0].sha256: expected 64 lowercase hex digits, "
            f"got '{'A' * 56}...",
            id="sha256-uppercase",
        ),
    ],
)
def test_parse_manifest_rejects(body: bytes, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest("bj", body, NOW, 10_000)
    assert str(caught.value) == message


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=20,
)


@given(st.binary(max_size=300) | JSON_VALUES.map(encode))
def test_parse_manifest_only_raises_manifest_error(body: bytes) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifest("bj", body, NOW, 10_000)


# --------------------------------------------------------------------------- servable_commit

MANIFEST_URL = "http://bj.example/manifest.json"
STRICT = NodeConfig(id="bj", base_url="http://bj.example", manifest_url=MANIFEST_URL)
BOUNDED = replace(STRICT, freshness="bounded", max_lag_s=DAY)
UNLISTED_MIRROR = NodeConfig(id="plain", base_url="http://plain.example")
CACHE = replace(STRICT, id="cache", kind="cache")
UNLISTED_CACHE = replace(UNLISTED_MIRROR, id="plain-cache", kind="cache")
THIRD_PARTY = replace(UNLISTED_MIRROR, id="tp", kind="third_party")
LISTED_THIRD_PARTY = replace(STRICT, id="tp-listed", kind="third_party")
FILES = ("config.json", "model.safetensors")


def holding(synced_at: float, *paths: str) -> CommitHolding:
    return CommitHolding(synced_at, dict.fromkeys(paths, (1, "0" * 64)))


def make_holdings(x_synced_at: float) -> NodeHoldings:
    """acme/x: only OLD (main, v1); acme/y: NEW (main) without weights; dataset acme/d: OLD."""
    return NodeHoldings(
        node_id="bj",
        commits={
            ("model", "acme/x"): {OLD: holding(x_synced_at, *FILES)},
            ("model", "acme/y"): {NEW: holding(NOW - 60, "config.json")},
            ("dataset", "acme/d"): {OLD: holding(NOW - 60, "data.csv")},
        },
        refs={("model", "acme/x"): {"main": OLD, "dev": GONE}, ("model", "acme/y"): {"main": NEW}},
        fetched_at=NOW,
        generated_at=NOW - 10,
    )


HELD = make_holdings(NOW - 3600)
STALE = make_holdings(NOW - 2 * DAY)
SHA_MISMATCH = "sha256 mismatch for config.json"
Request = tuple[RepoType, str, str, str, str]


def case(
    case_id: str,
    node: NodeConfig,
    holdings: NodeHoldings | None,
    request: Request,
    commit: str | None,
    reason: str = "",
    *,
    failed: Mapping[CommitKey, str] | None = None,
) -> Any:
    return pytest.param(node, holdings, failed or {}, request, Servable(commit, reason), id=case_id)


#: (type, repo, requested, upstream commit, path)
X_MAIN: Request = ("model", "acme/x", "main", NEW, "config.json")
Y_MAIN: Request = ("model", "acme/y", "main", NEW, "config.json")
LAGGING_X = "does not hold commit 1a2b3c4 of acme/x (holds 9f8e7d6)"
FAILED_NEW = f"failed verification of 1a2b3c4: {SHA_MISMATCH}"
FAILED_OLD = f"failed verification of 9f8e7d6: {SHA_MISMATCH}"


def failing(repo_id: str, *commits: str) -> dict[CommitKey, str]:
    return {("model", repo_id, commit): SHA_MISMATCH for commit in commits}


@pytest.mark.parametrize(
    ("node", "holdings", "failed", "request_", "expected"),
    [
        case("strict-exact", STRICT, HELD, Y_MAIN, NEW),
        case("strict-exact-pinned", STRICT, HELD, ("model", "acme/y", NEW, NEW, "config.json"),
             NEW),
        case("strict-old-commit-pinned", STRICT, HELD, ("model", "acme/x", OLD, OLD, "config.json"),
             OLD),
        case("strict-lagging", STRICT, HELD, X_MAIN, None, LAGGING_X),
        case("strict-missing-repo", STRICT, HELD, ("model", "acme/z", "main", NEW, "a"), None,
             "does not hold acme/z"),
        case("strict-missing-file", STRICT, HELD, ("model", "acme/y", "main", NEW, "w.bin"),
             None, "does not hold w.bin at commit 1a2b3c4 of acme/y"),
        case("strict-failed", STRICT, HELD, Y_MAIN, None, FAILED_NEW,
             failed=failing("acme/y", NEW)),
        case("strict-failed-elsewhere", STRICT, HELD, Y_MAIN, NEW,
             failed={**failing("acme/x", NEW), **failing("acme/y", OLD)}),
        case("strict-dataset", STRICT, HELD, ("dataset", "acme/d", "main", NEW, "data.csv"),
             None, "does not hold commit 1a2b3c4 of dataset acme/d (holds 9f8e7d6)"),
        case("strict-space-is-not-model", STRICT, HELD, ("space", "acme/y", "main", NEW, "a"),
             None, "does not hold space acme/y"),
        case("bounded-within-lag", BOUNDED, HELD, X_MAIN, OLD),
        case("bounded-at-max-lag", replace(BOUNDED, max_lag_s=3600), HELD, X_MAIN, OLD),
        case("bounded-just-over-max-lag", replace(BOUNDED, max_lag_s=3599), HELD, X_MAIN, None,
             f"{LAGGING_X}; latest synced main is 60 min old (max_lag_s 3599)"),
        case("bounded-over-max-lag", BOUNDED, STALE, X_MAIN, None,
             f"{LAGGING_X}; latest synced main is 2 d old (max_lag_s 86400)"),
        case("bounded-exact-wins", BOUNDED, HELD, Y_MAIN, NEW),
        case("bounded-pinned-commit", BOUNDED, HELD, ("model", "acme/x", NEW, NEW, "a"), None,
             LAGGING_X),
        case("bounded-own-failed", BOUNDED, HELD, X_MAIN, None, f"{LAGGING_X}; {FAILED_OLD}",
             failed=failing("acme/x", OLD)),
        case("bounded-own-missing-file", BOUNDED, HELD, ("model", "acme/x", "main", NEW, "t"),
             None, f"{LAGGING_X}; does not hold t at commit 9f8e7d6 of acme/x"),
        case("bounded-unknown-ref", BOUNDED, HELD, ("model", "acme/x", "v2", NEW, "a"), None,
             f"{LAGGING_X}; has no synced v2 of acme/x"),
        case("bounded-ref-not-held", BOUNDED, HELD, ("model", "acme/x", "dev", NEW, "a"), None,
             f"{LAGGING_X}; its latest synced dev c0ffee0 is not among its commits"),
        case("bounded-exact-failed-is-own", BOUNDED, HELD, Y_MAIN, None, FAILED_NEW,
             failed=failing("acme/y", NEW)),
        case("cache-listed-lagging", CACHE, HELD, X_MAIN, NEW),
        case("cache-manifest-not-read", CACHE, None, X_MAIN, NEW),
        case("cache-failed-copy", CACHE, HELD, X_MAIN, None, FAILED_NEW,
             failed=failing("acme/x", NEW)),
        case("cache-unlisted", UNLISTED_CACHE, None, X_MAIN, NEW),
        case("third-party-unlisted", THIRD_PARTY, None, X_MAIN, NEW),
        case("third-party-listed-lagging", LISTED_THIRD_PARTY, HELD, X_MAIN, None, LAGGING_X),
        case("mirror-unlisted", UNLISTED_MIRROR, None, X_MAIN, NEW),
        case("manifest-not-read", STRICT, None, Y_MAIN, None, MANIFEST_NOT_READ),
        case("bounded-manifest-not-read", BOUNDED, None, X_MAIN, None, MANIFEST_NOT_READ),
    ],
)  # fmt: skip
def test_servable_commit(
    node: NodeConfig,
    holdings: NodeHoldings | None,
    failed: Mapping[CommitKey, str],
    request_: tuple[RepoType, str, str, str, str],
    expected: Servable,
) -> None:
    repo_type, repo_id, requested, upstream_commit, path = request_
    result = servable_commit(
        node, holdings, failed, repo_type, repo_id, requested, upstream_commit, path, NOW
    )
    assert result == expected


COMMITS = (NEW, OLD, GONE)


@given(
    held=st.dictionaries(
        st.sampled_from(COMMITS),
        st.tuples(st.floats(NOW - 3 * DAY, NOW + 60), st.sets(st.sampled_from(FILES))),
    ),
    own=st.none() | st.sampled_from(COMMITS),
    failed_commits=st.sets(st.sampled_from(COMMITS)),
    freshness=st.sampled_from(["strict", "bounded"]),
    requested=st.sampled_from(["main", *COMMITS]),
    upstream=st.sampled_from(COMMITS),
    path=st.sampled_from(FILES),
)
def test_a_mirror_is_never_sent_a_commit_it_does_not_verifiably_hold(
    held: dict[str, tuple[float, set[str]]],
    own: str | None,
    failed_commits: set[str],
    freshness: Freshness,
    requested: str,
    upstream: str,
    path: str,
) -> None:
    if is_commit_sha(requested):
        upstream = requested  # a commit resolves to itself
    holdings = NodeHoldings(
        "bj",
        {REPO: {c: holding(at, *paths) for c, (at, paths) in held.items()}},
        {REPO: {"main": own}} if own else {},
        NOW,
        NOW,
    )
    failed = {(*REPO, c): SHA_MISMATCH for c in failed_commits}
    node = replace(STRICT, freshness=freshness)
    result = servable_commit(node, holdings, failed, *REPO, requested, upstream, path, NOW)
    assert (result.commit is None) == (result.reason != "")
    if result.commit is None:
        return
    assert holds_exactly(holdings, REPO, result.commit, path)
    assert result.commit not in failed_commits
    if result.commit != upstream:
        assert (freshness, requested, own) == ("bounded", "main", result.commit)
        assert held[result.commit][0] >= NOW - node.max_lag_s


@pytest.mark.parametrize(
    ("holdings", "key", "commit", "path", "expected"),
    [
        (HELD, ("model", "acme/x"), OLD, "config.json", True),
        (HELD, ("model", "acme/x"), OLD, "tokenizer.json", False),
        (HELD, ("model", "acme/x"), NEW, "config.json", False),
        (HELD, ("dataset", "acme/x"), OLD, "config.json", False),
        (HELD, ("model", "acme/z"), OLD, "config.json", False),
        (None, ("model", "acme/x"), OLD, "config.json", False),
    ],
    ids=["held", "other-file", "other-commit", "other-type", "other-repo", "not-read"],
)
def test_holds_exactly(
    holdings: NodeHoldings | None, key: RepoKey, commit: str, path: str, expected: bool
) -> None:
    assert holds_exactly(holdings, key, commit, path) is expected


# --------------------------------------------------------------------------- pick_samples

ALL_HELD_FILES = sorted(
    (*key, commit, path)
    for key, commits in HELD.commits.items()
    for commit, h in commits.items()
    for path in h.files
)


def test_pick_samples_is_deterministic() -> None:
    first = pick_samples(HELD, 2, random.Random(7))
    assert first == pick_samples(HELD, 2, random.Random(7))
    draws = {tuple(pick_samples(HELD, 2, random.Random(seed))) for seed in range(50)}
    assert len(draws) > 3, "different seeds draw different files"


@given(count=st.integers(0, 8), seed=st.integers(0, 2**32))
def test_pick_samples_draws_distinct_listed_files(count: int, seed: int) -> None:
    samples = pick_samples(HELD, count, random.Random(seed))
    assert len(samples) == min(count, len(ALL_HELD_FILES))
    assert len(set(samples)) == len(samples)
    assert set(samples) <= set(ALL_HELD_FILES)


def test_pick_samples_without_files() -> None:
    empty = NodeHoldings("bj", {REPO: {NEW: holding(NOW)}}, {}, NOW, NOW)
    assert pick_samples(empty, 3, random.Random(1)) == []


# --------------------------------------------------------------------------- loopback node


class MirrorNode:
    """Node "bj" on loopback: ``/manifest.json`` and acme/tiny-model at NEW, with faults."""

    def __init__(self) -> None:
        self.manifest: bytes = encode(manifest_doc())
        #: Manifests of further nodes, at ``/{name}.json``.
        self.other_manifests: dict[str, bytes] = {}
        self.manifest_status = 200
        self.delay_s = 0.0
        self.files = dict(UPSTREAM_FILES)
        #: (method, file) -> body sent instead of the file's bytes
        self.bodies: dict[tuple[str, str], bytes] = {}
        #: file -> status sent instead of 200
        self.statuses: dict[str, int] = {}
        #: Resolve requests are redirected to ``/storage/...``.
        self.redirect = False
        self.requests: list[tuple[str, str]] = []
        self.user_agents: list[str] = []
        self.manifest_times: list[float] = []
        #: Set at teardown so handlers still waiting out a delay end at once.
        self.release = asyncio.Event()
        self.server: TestServer | None = None
        self.app = web.Application()
        self.app.router.add_get("/{name}.json", self.serve_manifest)
        self.app.router.add_route("*", "/storage/{path:.*}", self.serve_storage)
        self.app.router.add_route("*", "/{tail:.*}", self.serve_resolve)

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def node(
        self, node_id: str = "bj", *, manifest: str = "manifest", **changes: Any
    ) -> NodeConfig:
        return NodeConfig(
            id=node_id,
            base_url=self.base_url,
            manifest_url=f"{self.base_url}/{manifest}.json",
            **changes,
        )

    def corrupt(self, path: str) -> None:
        """Serve ``path`` with its first byte flipped: same size, other content."""
        data = self.files[path]
        self.bodies["GET", path] = bytes([data[0] ^ 0xFF]) + data[1:]

    def hold_other_config(self) -> None:
        """Manifest and bytes agree with each other, but not with upstream's config.json."""
        self.files["config.json"] = CONFIG.replace(b"8", b"9")
        self.manifest = encode(manifest_doc(self.files))

    def seen(self, request: web.Request) -> None:
        self.requests.append((request.method, request.path))
        self.user_agents.append(request.headers.get("User-Agent", ""))

    async def serve_manifest(self, request: web.Request) -> web.Response:
        self.seen(request)
        self.manifest_times.append(asyncio.get_running_loop().time())
        if self.delay_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), self.delay_s)
        name = request.match_info["name"]
        if name != "manifest":
            return web.Response(body=self.other_manifests[name])
        return web.Response(status=self.manifest_status, body=self.manifest)

    async def serve_resolve(self, request: web.Request) -> web.Response:
        self.seen(request)
        ref = parse_resolve_path(request.raw_path)
        if ref is None or (ref.repo_type, ref.repo_id, ref.revision) != (*REPO, NEW):
            return web.Response(status=404)
        if self.redirect:
            raise web.HTTPFound(f"/storage/{ref.filename}")
        return self.answer(request.method, ref.filename)

    async def serve_storage(self, request: web.Request) -> web.Response:
        self.seen(request)
        return self.answer(request.method, request.match_info["path"])

    def answer(self, method: str, path: str) -> web.Response:
        if path in self.statuses:
            return web.Response(status=self.statuses[path])
        body = self.bodies.get((method, path), self.files.get(path))
        if body is None:
            return web.Response(status=404)
        # HEAD is answered with the body's Content-Length and no body.
        return web.Response(body=body)

    def file_requests(self) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[1] != "/manifest.json"]


@pytest.fixture
async def mirror(aiohttp_server: AiohttpServer) -> AsyncIterator[MirrorNode]:
    node = MirrorNode()
    node.server = await aiohttp_server(node.app)
    yield node
    node.release.set()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with new_session() as client:
        yield client


class FakeCatalog:
    """A CommitLookup over revisions built in the test (the real catalog has its own tests)."""

    def __init__(self, *revisions: RepoRevision) -> None:
        self.revisions = {(r.repo_type, r.repo_id, r.commit): r for r in revisions}
        self.unavailable = False
        self.calls: list[tuple[RepoType, str, str]] = []

    async def get(self, repo_type: RepoType, repo_id: str, revision: str) -> RepoRevision:
        self.calls.append((repo_type, repo_id, revision))
        if self.unavailable:
            raise CatalogError(503, None, "upstream unavailable", retry_after_s=5)
        found = self.revisions.get((repo_type, repo_id, revision))
        if found is None:
            raise CatalogError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return found


def upstream_revision(files: Mapping[str, bytes] = UPSTREAM_FILES) -> RepoRevision:
    metas = {
        path: FileMeta(
            path,
            len(data),
            sha256(data) if path in LFS_FILES else git_blob_sha1(data),
            path in LFS_FILES,
        )
        for path, data in files.items()
    }
    return RepoRevision(*REPO, NEW, NEW, False, False, metas, NOW)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


TIMEOUT_S = 2.0


# --------------------------------------------------------------------------- fetch_manifest


async def test_fetch_manifest(mirror: MirrorNode, session: aiohttp.ClientSession) -> None:
    holdings = await fetch_manifest(session, mirror.node(), TIMEOUT_S, 10_000, NOW)
    assert holdings == parse_manifest("bj", mirror.manifest, NOW, 10_000)
    assert mirror.requests == [("GET", "/manifest.json")]
    assert mirror.user_agents == [USER_AGENT]


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (503, b"busy", "manifest: status 503"),
        (302, b"", "manifest: status 302"),
        (200, b" " * 10_001, "manifest: more than 10000 bytes"),
        (200, b"<html>", "manifest: not valid JSON (Expecting value: line 1 column 1 (char 0))"),
        (200, broken(lambda d: d.update(node="sh")), "manifest $.node: 'sh' is another node"),
    ],
    ids=["503", "redirect-not-followed", "too-big", "html", "other-node"],
)
async def test_fetch_manifest_failures(
    mirror: MirrorNode, session: aiohttp.ClientSession, status: int, body: bytes, message: str
) -> None:
    mirror.manifest_status, mirror.manifest = status, body
    with pytest.raises(ManifestError) as caught:
        await fetch_manifest(session, mirror.node(), TIMEOUT_S, 10_000, NOW)
    assert str(caught.value).startswith(message)


async def test_fetch_manifest_network_failures(
    mirror: MirrorNode, session: aiohttp.ClientSession
) -> None:
    gone = NodeConfig(
        id="bj", base_url="http://127.0.0.1", manifest_url=f"http://127.0.0.1:{free_port()}/m"
    )
    with pytest.raises(ManifestError, match=r"^manifest: connect error: Connection refused$"):
        await fetch_manifest(session, gone, TIMEOUT_S, 10_000, NOW)
    mirror.delay_s = 5.0
    started = asyncio.get_running_loop().time()
    with pytest.raises(ManifestError, match=r"^manifest: timeout$"):
        await fetch_manifest(session, mirror.node(), 0.2, 10_000, NOW)
    assert asyncio.get_running_loop().time() - started < 1.0


# --------------------------------------------------------------------------- verify_sample


async def verify(
    mirror: MirrorNode,
    session: aiohttp.ClientSession,
    path: str,
    *,
    catalog: FakeCatalog | None = None,
    max_hash_bytes: int = 1_000_000,
) -> str | None:
    holdings = parse_manifest("bj", mirror.manifest, NOW, 10_000)
    return await verify_sample(
        session,
        mirror.node(),
        (*REPO, NEW, path),
        holdings,
        catalog or FakeCatalog(upstream_revision()),
        max_hash_bytes,
        TIMEOUT_S,
    )


def resolve(path: str) -> str:
    return f"/acme/tiny-model/resolve/{NEW}/{path}"


@pytest.mark.parametrize("path", FILES)
async def test_verify_good_node(
    mirror: MirrorNode, session: aiohttp.ClientSession, path: str
) -> None:
    assert await verify(mirror, session, path) is None
    assert mirror.file_requests() == [("HEAD", resolve(path)), ("GET", resolve(path))]


async def test_verify_large_file_by_head_only(
    mirror: MirrorNode, session: aiohttp.ClientSession
) -> None:
    mirror.corrupt("model.safetensors")  # not hashed, so not noticed
    assert (
        await verify(mirror, session, "model.safetensors", max_hash_bytes=len(WEIGHTS) - 1) is None
    )
    assert mirror.file_requests() == [("HEAD", resolve("model.safetensors"))]


async def test_verify_follows_the_node_to_its_storage(
    mirror: MirrorNode, session: aiohttp.ClientSession
) -> None:
    mirror.redirect = True
    assert await verify(mirror, session, "model.safetensors") is None
    assert mirror.file_requests() == [
        ("HEAD", resolve("model.safetensors")),  # the redirect itself is accepted
        ("GET", resolve("model.safetensors")),
        ("GET", "/storage/model.safetensors"),
    ]
    mirror.corrupt("model.safetensors")
    assert await verify(mirror, session, "model.safetensors") == (
        "sha256 mismatch for model.safetensors"
    )


@pytest.mark.parametrize(
    ("setup", "path", "reason"),
    [
        pytest.param(
            lambda n: n.corrupt("model.safetensors"),
            "model.safetensors",
            "sha256 mismatch for model.safetensors",
            id="corrupt-lfs-file",
        ),
        pytest.param(
            lambda n: n.corrupt("config.json"),
            "config.json",
            "sha256 mismatch for config.json",
            id="corrupt-git-file",
        ),
        pytest.param(
            lambda n: n.bodies.update({("HEAD", "model.safetensors"): b"x" * 12}),
            "model.safetensors",
            f"HEAD Content-Length 12 != size {len(WEIGHTS)} for model.safetensors",
            id="head-wrong-length",
        ),
        pytest.param(
            lambda n: n.statuses.update({"config.json": 404}),
            "config.json",
            "HEAD status 404 for config.json",
            id="head-404",
        ),
        pytest.param(
            lambda n: n.bodies.update({("GET", "config.json"): CONFIG + b"\n"}),
            "config.json",
            f"GET body over {len(CONFIG)} bytes for config.json",
            id="get-longer",
        ),
        pytest.param(
            lambda n: n.bodies.update({("GET", "config.json"): CONFIG[:5]}),
            "config.json",
            f"GET body 5 bytes != size {len(CONFIG)} for config.json",
            id="get-shorter",
        ),
        pytest.param(
            lambda n: n.hold_other_config(),
            "config.json",
            "git blob sha1 mismatch for config.json",
            id="git-file-not-upstreams",
        ),
    ],
)
async def test_verify_failures(
    mirror: MirrorNode,
    session: aiohttp.ClientSession,
    setup: Callable[[MirrorNode], object],
    path: str,
    reason: str,
) -> None:
    setup(mirror)
    assert await verify(mirror, session, path) == reason


@pytest.mark.parametrize(
    ("manifest_files", "path", "reason"),
    [
        pytest.param(
            {"config.json": CONFIG, "model.safetensors": WEIGHTS[::-1]},
            "model.safetensors",
            "manifest sha256 != upstream LFS etag for model.safetensors",
            id="lfs-etag",
        ),
        pytest.param(
            {"config.json": CONFIG + b" "},
            "config.json",
            f"manifest size {len(CONFIG) + 1} != upstream size {len(CONFIG)} for config.json",
            id="size",
        ),
        pytest.param(
            {"extra.bin": b"x"},
            "extra.bin",
            "extra.bin is not in upstream's file list",
            id="not-upstream",
        ),
    ],
)
async def test_verify_manifest_against_upstream(
    mirror: MirrorNode,
    session: aiohttp.ClientSession,
    manifest_files: dict[str, bytes],
    path: str,
    reason: str,
) -> None:
    mirror.manifest = encode(manifest_doc(manifest_files))
    assert await verify(mirror, session, path) == reason
    assert mirror.file_requests() == [], "upstream's metadata alone settles it"


@pytest.mark.parametrize(
    ("setup", "logged"),
    [
        pytest.param(
            lambda n, c: setattr(c, "unavailable", True),
            "catalog: upstream unavailable",
            id="catalog-unavailable",
        ),
        pytest.param(
            lambda n, c: n.statuses.update({"config.json": 503}),
            "HEAD status 503",
            id="node-503",
        ),
        pytest.param(
            lambda n, c: setattr(n.server, "port", free_port()),
            "connect error: Connection refused",
            id="node-unreachable",
        ),
    ],
)
async def test_verify_inconclusive_is_not_a_failure(
    mirror: MirrorNode,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    setup: Callable[[MirrorNode, FakeCatalog], object],
    logged: str,
) -> None:
    catalog = FakeCatalog(upstream_revision())
    setup(mirror, catalog)
    with caplog.at_level(logging.DEBUG, logger="gateway.sync"):
        assert await verify(mirror, session, "config.json", catalog=catalog) is None
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.sync"] == [
        f"node bj: could not verify config.json at 1a2b3c4 of acme/tiny-model: {logged}"
    ]


# --------------------------------------------------------------------------- SyncTracker

# Ongoing sampling alone: admission has tests of its own (tests/test_admission.py).
ALL_SAMPLES = SyncConfig(interval_s=0.05, verify_samples=10, admission=False)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def tracker_for(
    nodes: list[NodeConfig],
    catalog: FakeCatalog | None = None,
    config: SyncConfig = ALL_SAMPLES,
    clock: Clock | None = None,
) -> SyncTracker:
    return SyncTracker(
        nodes,
        config,
        catalog or FakeCatalog(upstream_revision()),
        timeout_s=TIMEOUT_S,
        rng=random.Random(3),
        clock=clock or Clock(),
    )


def servable_weights(tracker: SyncTracker, node: NodeConfig) -> Servable:
    return tracker.servable(node, *REPO, "main", NEW, "model.safetensors", NOW)


async def test_round_reads_manifest_and_verifies(
    mirror: MirrorNode, session: aiohttp.ClientSession
) -> None:
    node = mirror.node()
    tracker = tracker_for([node])
    assert servable_weights(tracker, node) == Servable(None, MANIFEST_NOT_READ)
    version = tracker.version
    await tracker.run_round(session)
    assert tracker.holdings["bj"] == parse_manifest("bj", mirror.manifest, NOW, 10_000)
    assert tracker.version > version
    assert tracker.failed_for("bj") == {}
    assert servable_weights(tracker, node) == Servable(NEW, "")
    assert sorted(mirror.file_requests()) == sorted(
        (method, resolve(path)) for path in FILES for method in ("HEAD", "GET")
    )
    version = tracker.version
    await tracker.run_round(session)
    assert tracker.version == version, "the same manifest again is no change"


async def test_round_records_and_clears_failures(
    mirror: MirrorNode, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    node = mirror.node()
    # One random sample a round: the failed file must still be re-checked to clear it.
    tracker = tracker_for([node], config=replace(ALL_SAMPLES, verify_samples=1))
    mirror.corrupt("model.safetensors")
    with caplog.at_level(logging.INFO, logger="gateway.sync"):
        for _ in range(20):
            await tracker.run_round(session)
            if tracker.failed_for("bj"):
                break
        reason = "sha256 mismatch for model.safetensors"
        assert tracker.failed_for("bj") == {(*REPO, NEW): reason}
        assert servable_weights(tracker, node) == Servable(
            None, f"failed verification of 1a2b3c4: {reason}"
        )
        # Other files of the commit are just as suspect: the exclusion is per commit.
        config_json = tracker.servable(node, *REPO, "main", NEW, "config.json", NOW)
        assert config_json.commit is None
        version = tracker.version

        mirror.bodies.clear()
        await tracker.run_round(session)
    assert tracker.failed_for("bj") == {}
    assert tracker.version > version
    assert servable_weights(tracker, node) == Servable(NEW, "")
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert f"node bj: excluded for commit 1a2b3c4 of acme/tiny-model: {reason}" in messages
    assert "node bj: model.safetensors at 1a2b3c4 of acme/tiny-model verifies again" in messages


async def test_a_good_other_file_does_not_clear_a_failure(
    mirror: MirrorNode, session: aiohttp.ClientSession
) -> None:
    tracker = tracker_for([mirror.node()])
    mirror.corrupt("config.json")
    await tracker.run_round(session)
    await tracker.run_round(session)
    assert tracker.failed_for("bj") == {(*REPO, NEW): "sha256 mismatch for config.json"}


async def test_failures_of_files_no_longer_listed_are_dropped(
    mirror: MirrorNode, session: aiohttp.ClientSession
) -> None:
    tracker = tracker_for([mirror.node()])
    mirror.corrupt("config.json")
    await tracker.run_round(session)
    assert tracker.failed_for("bj")
    mirror.manifest = encode(manifest_doc({"model.safetensors": WEIGHTS}))
    await tracker.run_round(session)
    assert tracker.failed_for("bj") == {}


async def test_round_catalog_unavailable_changes_nothing(
    mirror: MirrorNode, session: aiohttp.ClientSession
) -> None:
    catalog = FakeCatalog(upstream_revision())
    tracker = tracker_for([mirror.node()], catalog)
    mirror.corrupt("config.json")
    await tracker.run_round(session)
    failed = dict(tracker.failed_for("bj"))
    assert failed
    mirror.bodies.clear()
    catalog.unavailable = True
    asked = len(mirror.file_requests())
    await tracker.run_round(session)
    assert tracker.failed_for("bj") == failed, "an unchecked file is not cleared"
    assert len(mirror.file_requests()) == asked, "nothing asked of the node without upstream's word"


async def test_manifest_failure_keeps_the_previous_holdings(
    mirror: MirrorNode, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    node, clock = mirror.node(), Clock()
    tracker = tracker_for([node], clock=clock)
    await tracker.run_round(session)
    kept = tracker.holdings["bj"]
    version = tracker.version
    clock.now += 180
    mirror.manifest_status = 500
    with caplog.at_level(logging.WARNING, logger="gateway.sync"):
        await tracker.run_round(session)
    assert tracker.holdings["bj"] is kept
    assert tracker.version == version
    assert servable_weights(tracker, node) == Servable(NEW, "")
    assert [r.getMessage() for r in caplog.records] == [
        "node bj: manifest: status 500; routing on the manifest read 3 min ago"
    ]


async def test_round_skips_nodes_without_a_manifest(
    mirror: MirrorNode, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    unlisted = NodeConfig(id="plain", base_url=mirror.base_url)
    off = mirror.node("off", enabled=False)
    gone = NodeConfig(
        id="gone", base_url="http://127.0.0.1", manifest_url=f"http://127.0.0.1:{free_port()}/"
    )
    tracker = tracker_for([unlisted, off, gone, mirror.node()])
    with caplog.at_level(logging.WARNING, logger="gateway.sync"):
        await tracker.run_round(session)
    assert set(tracker.holdings) == {"bj"}
    assert mirror.requests.count(("GET", "/manifest.json")) == 1
    assert tracker.servable(unlisted, *REPO, "main", NEW, "config.json", NOW) == Servable(NEW, "")
    assert "node gone: manifest: connect error: Connection refused; it serves nothing until " in (
        caplog.text
    )


async def test_reconfigure(mirror: MirrorNode, session: aiohttp.ClientSession) -> None:
    bj, sh = mirror.node("bj"), mirror.node("sh")
    tracker = tracker_for([bj])
    mirror.corrupt("config.json")
    await tracker.run_round(session)
    assert "bj" in tracker.holdings and tracker.failed_for("bj")
    version = tracker.version
    tracker.reconfigure([bj, sh], ALL_SAMPLES)
    assert tracker.version > version
    assert "bj" in tracker.holdings and tracker.failed_for("bj"), "a surviving node keeps all"
    moved = mirror.node("bj", manifest="other")
    tracker.reconfigure([moved], ALL_SAMPLES)
    assert tracker.holdings == {}, "another manifest URL may describe another machine"
    assert tracker.failed_for("bj") == {}


async def test_run_rounds_at_cadence_until_cancelled(mirror: MirrorNode) -> None:
    tracker = tracker_for([mirror.node()], config=SyncConfig(interval_s=0.05, verify_samples=0))
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = asyncio.create_task(tracker.run())
    await asyncio.sleep(0.32)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    times = mirror.manifest_times
    assert times[0] - started < 0.04, "the first round starts at once"
    assert 5 <= len(times) <= 8
    assert set(mirror.user_agents) == {USER_AGENT}
    assert "bj" in tracker.holdings


async def test_run_is_cancelled_promptly_mid_round(mirror: MirrorNode) -> None:
    mirror.delay_s = 5.0
    tracker = tracker_for([mirror.node()])
    task = asyncio.create_task(tracker.run())
    async with asyncio.timeout(5):
        while not mirror.manifest_times:
            await asyncio.sleep(0.01)
    started = asyncio.get_running_loop().time()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert asyncio.get_running_loop().time() - started < 0.5


async def test_run_outlives_a_failing_node(
    mirror: MirrorNode, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenCatalog(FakeCatalog):
        async def get(self, repo_type: RepoType, repo_id: str, revision: str) -> RepoRevision:
            if repo_id == "acme/broken":
                raise RuntimeError("catalog bug")
            return await super().get(repo_type, repo_id, revision)

    broken_doc = {**manifest_doc(), "node": "broken"}
    repo0(broken_doc)["id"] = "acme/broken"
    mirror.other_manifests["broken"] = encode(broken_doc)
    broken_node = mirror.node("broken", manifest="broken")
    catalog = BrokenCatalog(upstream_revision())
    tracker = tracker_for([broken_node, mirror.node()], catalog)
    mirror.corrupt("config.json")
    with caplog.at_level(logging.ERROR, logger="gateway.sync"):
        await tracker.run_round(session)
    assert caplog.records[0].getMessage() == "node broken: sync round failed"
    assert caplog.records[0].exc_info is not None
    assert tracker.failed_for("bj"), "the other node's round went on"

    # And ``run`` keeps going, round after failing round, until cancelled.
    task = asyncio.create_task(tracker.run())
    async with asyncio.timeout(5):
        while len(caplog.records) < 3:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
