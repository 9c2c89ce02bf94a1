"""The catalog: pure parsers and records, then a real upstream on loopback and real Redis.

The upstream is a small aiohttp app serving the two Hugging Face API calls the catalog makes,
with a paginated tree (two entries per page, absolute ``Link`` URLs) and switches for failures.
Time that decides freshness comes from a fake clock; timeouts are real and kept short.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis_server import RedisServer, free_port

from gateway.config import CatalogConfig, RedisConfig, UpstreamConfig
from gateway.hf import catalog as catalog_module
from gateway.hf.catalog import (
    REDIS_RETRY_S,
    USER_AGENT,
    Catalog,
    CatalogError,
    FileMeta,
    MalformedData,
    RepoRevision,
    Resolution,
    classify_status,
    decode_files,
    decode_resolution,
    encode_files,
    encode_resolution,
    entry_for,
    parse_revision_info,
    parse_tree_page,
)
from gateway.hf.paths import RepoType

AiohttpServer = Callable[[web.Application], Awaitable[TestServer]]


def commit(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def git_file(path: str, content: bytes) -> dict[str, object]:
    return {"type": "file", "oid": blob_sha1(content), "size": len(content), "path": path}


def lfs_file(path: str, content: bytes) -> dict[str, object]:
    pointer = git_file(path, b"version https://git-lfs.github.com/spec/v1\n...")
    lfs = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
    return {**pointer, "lfs": lfs}


def directory(path: str) -> dict[str, object]:
    return {"type": "directory", "oid": commit(path), "size": 0, "path": path}


C1, C2, D1, BIG, GATED = commit("c1"), commit("c2"), commit("d1"), commit("big"), commit("gated")
WEIGHTS = b"\x00" * 1000
CONFIG_V1, CONFIG_V2 = b'{"v": 1}', b'{"v": 2, "more": true}'
BERT_C1 = [
    git_file(".gitattributes", b"*.safetensors filter=lfs\n"),
    git_file("config.json", CONFIG_V1),
    lfs_file("model.safetensors", WEIGHTS),
    directory("weights"),
    lfs_file("weights/part 1#.bin", b"part"),
]
BERT_C2 = [*BERT_C1[:1], git_file("config.json", CONFIG_V2), *BERT_C1[2:]]


@dataclass
class FakeRepo:
    refs: dict[str, str]
    trees: dict[str, list[dict[str, object]]]
    gated: bool | str = False
    #: Answers like upstream does to an anonymous request for a private repository.
    private: bool = False
    #: The tree is refused without a token (403 GatedRepo), the revision info is not.
    tree_needs_token: bool = False


def fake_repos() -> dict[tuple[str, str], FakeRepo]:
    return {
        ("models", "acme/bert"): FakeRepo(
            refs={"main": C1, "v1.0": C1, "refs/pr/1": C2}, trees={C1: BERT_C1, C2: BERT_C2}
        ),
        ("datasets", "acme/data"): FakeRepo(
            refs={"main": D1}, trees={D1: [git_file("data.csv", b"a,b\n")]}
        ),
        ("models", "acme/big"): FakeRepo(
            refs={"main": BIG},
            trees={BIG: [git_file(f"f{i}.txt", b"%d" % i) for i in range(7)]},
        ),
        ("models", "acme/gated"): FakeRepo(
            refs={"main": GATED}, trees={GATED: [git_file("a.txt", b"a")]}, gated="manual"
        ),
        ("models", "acme/secret"): FakeRepo(refs={"main": C1}, trees={}, private=True),
        ("models", "acme/hidden"): FakeRepo(
            refs={"main": GATED}, trees={GATED: []}, gated="auto", tree_needs_token=True
        ),
    }


_API = re.compile(r"/api/(models|datasets|spaces)/(.+?)/(revision|tree)/([^/]+)")


@dataclass
class FakeUpstream:
    """Hugging Face's revision and tree API for ``repos``, with switches and request counts."""

    repos: dict[tuple[str, str], FakeRepo] = field(default_factory=fake_repos)
    page_size: int = 2
    #: Every answer is this status (and no body) while set.
    fail_status: int | None = None
    #: Every answer is a 200 that is not JSON while set.
    garbage: bool = False
    #: Seconds every answer waits (``release`` ends the wait at teardown).
    delay_s: float = 0.0
    #: scheme://host:port put into tree ``Link`` headers instead of the request's own.
    link_origin: str | None = None
    #: Renamed repo id -> (origin, new id): answered with a redirect to the same call there.
    renamed: dict[str, tuple[str, str]] = field(default_factory=dict)
    revision_calls: Counter[str] = field(default_factory=Counter)
    tree_calls: Counter[str] = field(default_factory=Counter)
    raw_paths: list[str] = field(default_factory=list)
    user_agents: set[str] = field(default_factory=set)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.rel_url.raw_path
        self.raw_paths.append(raw_path)
        self.user_agents.add(request.headers.get("User-Agent", ""))
        if self.delay_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), self.delay_s)
        match = _API.fullmatch(raw_path)
        if match is None:
            return web.Response(status=404)
        kind, repo_id, call, raw_revision = match.groups()
        revision = unquote(raw_revision)
        calls = self.revision_calls if call == "revision" else self.tree_calls
        calls[f"{repo_id}@{revision}"] += 1
        if self.fail_status is not None:
            return web.Response(status=self.fail_status)
        if self.garbage:
            return web.Response(text="<html>maintenance</html>", content_type="text/html")
        if repo_id in self.renamed:
            origin, new_id = self.renamed[repo_id]
            raise web.HTTPTemporaryRedirect(origin + raw_path.replace(repo_id, new_id, 1))
        repo = self.repos.get((kind, repo_id))
        if repo is None:
            return _error(404, "RepoNotFound")
        if repo.private:
            return web.Response(status=401)
        sha = revision if revision in repo.trees else repo.refs.get(revision)
        if sha is None:
            return _error(404, "RevisionNotFound")
        if call == "tree" and repo.tree_needs_token:
            return _error(403, "GatedRepo")
        if call == "revision":
            return web.json_response(
                {"id": repo_id, "sha": sha, "private": False, "gated": repo.gated, "siblings": []}
            )
        return self._tree_page(request, repo.trees[sha])

    def _tree_page(self, request: web.Request, entries: list[dict[str, object]]) -> web.Response:
        start = int(request.query.get("cursor", "0"))
        end = start + self.page_size
        response = web.json_response(entries[start:end])
        if end < len(entries):
            origin = self.link_origin or f"{request.scheme}://{request.host}"
            query = f"recursive=true&expand=false&cursor={end}"
            response.headers["Link"] = f'<{origin}{request.rel_url.raw_path}?{query}>; rel="next"'
        return response


def _error(status: int, code: str) -> web.Response:
    return web.Response(status=status, headers={"X-Error-Code": code})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


MakeCatalog = Callable[..., Awaitable[Catalog]]


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.server = await aiohttp_server(fake.app())
    yield fake
    fake.release.set()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_catalog(upstream: FakeUpstream, clock: FakeClock) -> AsyncIterator[MakeCatalog]:
    """Started catalogs on ``upstream`` and ``clock`` (ref_ttl_s=60), closed at teardown."""
    catalogs: list[Catalog] = []

    async def make(
        config: CatalogConfig | None = None,
        *,
        api_timeout_s: float = 2.0,
        upstream_url: str | None = None,
        redis_url: str | None = None,
        redis_config: RedisConfig | None = None,
    ) -> Catalog:
        catalog = Catalog(
            UpstreamConfig(url=upstream_url or upstream.url, api_timeout_s=api_timeout_s),
            config or CatalogConfig(ref_ttl_s=60.0),
            redis_url=redis_url,
            redis_config=redis_config,
            clock=clock,
        )
        await catalog.start()
        catalogs.append(catalog)
        return catalog

    yield make
    for catalog in catalogs:
        await catalog.close()


async def eventually(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def settled(catalog: Catalog) -> None:
    """Wait until the catalog's background refreshes and Redis writes are done (white-box:
    nothing public signals it, and only the tests need to know)."""
    await eventually(lambda: not catalog._inflight and not catalog._writes)


async def catalog_error(awaitable: Awaitable[RepoRevision]) -> CatalogError:
    with pytest.raises(CatalogError) as info:
        await awaitable
    return info.value


# --------------------------------------------------------------------------- pure parts


def test_parse_tree_page_keeps_files_with_their_etags() -> None:
    metas = parse_tree_page(BERT_C1)
    by_path = {meta.path: meta for meta in metas}
    assert list(by_path) == [
        ".gitattributes",
        "config.json",
        "model.safetensors",
        "weights/part 1#.bin",
    ]
    assert by_path["config.json"] == FileMeta(
        "config.json", len(CONFIG_V1), blob_sha1(CONFIG_V1), False
    )
    assert by_path["model.safetensors"] == FileMeta(
        "model.safetensors", len(WEIGHTS), hashlib.sha256(WEIGHTS).hexdigest(), True
    )


GOOD_BLOB = "a" * 40
GOOD_SHA256 = "b" * 64


@pytest.mark.parametrize(
    "page",
    [
        {"not": "a list"},
        ["not an object"],
        [{"path": "no-type"}],
        [{"type": "file", "path": "", "oid": GOOD_BLOB, "size": 1}],
        [{"type": "file", "path": "a", "oid": GOOD_BLOB.upper(), "size": 1}],
        [{"type": "file", "path": "a", "oid": GOOD_SHA256, "size": 1}],
        [{"type": "file", "path": "a", "oid": GOOD_BLOB, "size": -1}],
        [{"type": "file", "path": "a", "oid": GOOD_BLOB, "size": True}],
        [{"type": "file", "path": "a", "oid": GOOD_BLOB, "size": "1"}],
        [{"type": "file", "path": "a", "oid": GOOD_BLOB, "size": 1, "lfs": "yes"}],
        [{"type": "file", "path": "a", "oid": GOOD_BLOB, "size": 1, "lfs": {"size": 1}}],
        [{"type": "file", "path": "a", "oid": GOOD_BLOB, "size": 1, "lfs": {"oid": GOOD_BLOB}}],
    ],
)
def test_parse_tree_page_refuses_malformed_pages(page: object) -> None:
    with pytest.raises(MalformedData):
        parse_tree_page(page)


def test_parse_tree_page_skips_non_files() -> None:
    assert parse_tree_page([directory("d"), {"type": "submodule", "path": "s"}]) == []


@pytest.mark.parametrize(
    ("data", "requested", "expected"),
    [
        ({"sha": C1, "private": False, "gated": False}, "main", Resolution(C1, False, False, 5.0)),
        ({"sha": C1, "private": True, "gated": "auto"}, "main", Resolution(C1, True, True, 5.0)),
        ({"sha": C1, "private": False, "gated": "manual"}, C1, Resolution(C1, False, True, 5.0)),
        ({"sha": C1, "private": False}, "main", Resolution(C1, False, False, 5.0)),
        # Unknown gating values keep files upstream-only rather than risk a mirror serving them.
        ({"sha": C1, "private": False, "gated": "new"}, "main", Resolution(C1, False, True, 5.0)),
        ({"sha": C1[:12], "private": False}, "main", None),
        ({"sha": C1.upper(), "private": False}, "main", None),
        ({"sha": C1, "private": "no"}, "main", None),
        ({"sha": C1}, "main", None),
        ({"sha": C2, "private": False}, C1, None),
        ([C1], "main", None),
    ],
)
def test_parse_revision_info(data: object, requested: str, expected: Resolution | None) -> None:
    if expected is None:
        with pytest.raises(MalformedData):
            parse_revision_info(data, requested, 5.0)
    else:
        assert parse_revision_info(data, requested, 5.0) == expected


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (404, "RepoNotFound", "RepoNotFound"),
        (401, None, "RepoNotFound"),
        (401, "RepoNotFound", "RepoNotFound"),
        (404, "RevisionNotFound", "RevisionNotFound"),
        (401, "RevisionNotFound", "RevisionNotFound"),
        (403, "GatedRepo", "GatedRepo"),
        (404, None, None),
        (403, None, None),
        (429, None, None),
        (400, "EntryNotFound", None),
        (500, "RepoNotFound", None),
        (503, None, None),
    ],
)
def test_classify_status(status: int, code: str | None, expected: str | None) -> None:
    assert classify_status(status, code) == expected


metas = st.builds(
    FileMeta,
    path=st.text(min_size=1, max_size=40),
    size=st.integers(min_value=0, max_value=2**53),
    etag=st.just(""),
    lfs=st.booleans(),
).map(lambda m: FileMeta(m.path, m.size, (GOOD_SHA256 if m.lfs else GOOD_BLOB), m.lfs))


@given(st.lists(metas, max_size=20), st.booleans(), st.booleans(), st.floats(0, 2e9))
def test_records_round_trip(
    files: list[FileMeta], private: bool, gated: bool, fetched_at: float
) -> None:
    by_path = {meta.path: meta for meta in files}
    assert decode_files(encode_files(C1, by_path), C1) == by_path
    resolution = Resolution(C1, private, gated, fetched_at)
    assert decode_resolution(encode_resolution(resolution)) == resolution


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b"[" * 100_000,
        b'{"c": "' + C2.encode() + b'", "f": []}',
        b'{"c": "' + C1.encode() + b'", "f": {}}',
        b'{"c": "' + C1.encode() + b'", "f": [["a", 1, "' + GOOD_SHA256.encode() + b'", false]]}',
        b'{"c": "' + C1.encode() + b'", "f": [["a", 1, "' + GOOD_BLOB.encode() + b'", 0]]}',
    ],
)
def test_decode_files_refuses_garbage(raw: bytes) -> None:
    with pytest.raises(MalformedData):
        decode_files(raw, C1)


@pytest.mark.parametrize(
    "raw",
    [
        b"nope",
        b'{"c": "abc", "p": false, "g": false, "t": 1}',
        b'{"c": "' + C1.encode() + b'", "p": 0, "g": false, "t": 1}',
        b'{"c": "' + C1.encode() + b'", "p": false, "g": false, "t": "1"}',
        b'{"c": "' + C1.encode() + b'", "p": false, "g": false, "t": NaN}',
    ],
)
def test_decode_resolution_refuses_garbage(raw: bytes) -> None:
    with pytest.raises(MalformedData):
        decode_resolution(raw)


def test_entry_for() -> None:
    files = {meta.path: meta for meta in parse_tree_page(BERT_C1)}
    revision = RepoRevision("model", "acme/bert", "main", C1, False, False, files, 0.0)
    assert entry_for(revision, "config.json") is files["config.json"]
    for missing in ("weights", "nope.bin", "CONFIG.JSON"):
        with pytest.raises(CatalogError) as info:
            entry_for(revision, missing)
        assert (info.value.status, info.value.error_code, info.value.commit) == (
            404,
            "EntryNotFound",
            C1,
        )
        assert repr(missing) in info.value.message


# --------------------------------------------------------------------------- upstream


async def test_resolves_a_ref_to_its_commit_and_file_metadata(
    upstream: FakeUpstream, make_catalog: MakeCatalog
) -> None:
    catalog = await make_catalog()
    revision = await catalog.get("model", "acme/bert", "main")

    assert (revision.requested, revision.commit, revision.private, revision.gated) == (
        "main",
        C1,
        False,
        False,
    )
    assert set(revision.files) == {
        ".gitattributes",
        "config.json",
        "model.safetensors",
        "weights/part 1#.bin",
    }
    config = entry_for(revision, "config.json")
    assert config.etag == blob_sha1(CONFIG_V1)
    assert (config.size, config.lfs) == (len(CONFIG_V1), False)
    weights = entry_for(revision, "model.safetensors")
    assert weights.etag == hashlib.sha256(WEIGHTS).hexdigest()
    assert (weights.size, weights.lfs) == (1000, True)
    # Five entries at two per page: three pages, each after the first from its Link.
    assert upstream.revision_calls == Counter({"acme/bert@main": 1})
    assert upstream.tree_calls == Counter({f"acme/bert@{C1}": 3})
    assert upstream.user_agents == {USER_AGENT}
    assert catalog.stats()["upstream_fetches"] == 4
    assert catalog.stats()["misses"] == 1


async def test_ref_is_fully_percent_encoded(
    upstream: FakeUpstream, make_catalog: MakeCatalog
) -> None:
    catalog = await make_catalog()
    revision = await catalog.get("model", "acme/bert", "refs/pr/1")
    assert revision.commit == C2
    assert entry_for(revision, "config.json").size == len(CONFIG_V2)
    assert upstream.raw_paths[0] == "/api/models/acme/bert/revision/refs%2Fpr%2F1"


async def test_datasets_use_their_own_api_path(
    upstream: FakeUpstream, make_catalog: MakeCatalog
) -> None:
    catalog = await make_catalog()
    revision = await catalog.get("dataset", "acme/data", "main")
    assert (revision.repo_type, revision.commit, list(revision.files)) == (
        "dataset",
        D1,
        ["data.csv"],
    )
    assert upstream.raw_paths[0] == "/api/datasets/acme/data/revision/main"
    missing = await catalog_error(catalog.get("model", "acme/data", "main"))
    assert missing.error_code == "RepoNotFound"


async def test_gated_flag(make_catalog: MakeCatalog) -> None:
    catalog = await make_catalog()
    revision = await catalog.get("model", "acme/gated", "main")
    assert revision.gated and revision.upstream_only


async def test_gated_repository_that_hides_its_files(
    upstream: FakeUpstream, make_catalog: MakeCatalog
) -> None:
    catalog = await make_catalog()
    for _ in range(3):
        error = await catalog_error(catalog.get("model", "acme/hidden", "main"))
        assert (error.status, error.error_code) == (403, "GatedRepo")
    assert sum(upstream.tree_calls.values()) == 1


async def test_next_link_to_another_host_is_refused(
    upstream: FakeUpstream, make_catalog: MakeCatalog
) -> None:
    assert upstream.server is not None
    # The same server under another name: following it would work, but is not allowed.
    upstream.link_origin = f"http://localhost:{upstream.server.port}"
    catalog = await make_catalog()
    error = await catalog_error(catalog.get("model", "acme/bert", "main"))
    assert (error.status, error.error_code) == (503, None)
    assert "upstream unavailable" in error.message
    assert f"localhost:{upstream.server.port}" in error.message
    assert sum(upstream.tree_calls.values()) == 1


async def test_page_limit(upstream: FakeUpstream, make_catalog: MakeCatalog) -> None:
    exact = await make_catalog(CatalogConfig(max_pages=3))
    assert len((await exact.get("model", "acme/bert", "main")).files) == 4

    catalog = await make_catalog(CatalogConfig(max_pages=3))
    error = await catalog_error(catalog.get("model", "acme/big", "main"))
    assert error.status == 503
    assert "more than 3 pages (catalog.max_pages)" in error.message
    assert upstream.tree_calls[f"acme/big@{BIG}"] == 3
    # Asking again would read the same pages and fail the same way: it is remembered.
    again = await catalog_error(catalog.get("model", "acme/big", "main"))
    assert again.message == error.message
    assert upstream.tree_calls[f"acme/big@{BIG}"] == 3


async def test_redirects_are_followed_on_the_upstream_origin_only(
    upstream: FakeUpstream, make_catalog: MakeCatalog
) -> None:
    assert upstream.server is not None
    upstream.renamed = {
        "acme/old-bert": ("", "acme/bert"),
        "acme/elsewhere": (f"http://localhost:{upstream.server.port}", "acme/bert"),
    }
    catalog = await make_catalog()
    assert (await catalog.get("model", "acme/old-bert", "main")).commit == C1
    error = await catalog_error(catalog.get("model", "acme/elsewhere", "main"))
    assert error.status == 503
    assert "not following" in error.message


async def test_commit_sha_revision(
    upstream: FakeUpstream, make_catalog: MakeCatalog, clock: FakeClock
) -> None:
    catalog = await make_catalog()
    # A sha asked for cold is still checked once: it must exist in this repository, and only
    # the revision call tells whether the repository is private or gated.
    by_sha = await catalog.get("model", "acme/bert", C1)
    assert (by_sha.requested, by_sha.commit) == (C1, C1)
    assert upstream.revision_calls == Counter({f"acme/bert@{C1}": 1})
    assert upstream.tree_calls == Counter({f"acme/bert@{C1}": 3})

    # A ref naming a known commit costs only the revision call.
    by_ref = await catalog.get("model", "acme/bert", "v1.0")
    assert by_ref.files is by_sha.files
    assert upstream.revision_calls["acme/bert@v1.0"] == 1
    assert sum(upstream.tree_calls.values()) == 3

    # A commit is fresh forever.
    clock.advance(365 * 86400)
    assert catalog.peek("model", "acme/bert", C1) is not None
    assert await catalog.get("model", "acme/bert", C1) is not None
    assert sum(upstream.revision_calls.values()) == 2

    missing = await catalog_error(catalog.get("model", "acme/bert", commit("nope")))
    assert (missing.status, missing.error_code) == (404, "RevisionNotFound")


async def test_peek_sees_fresh_entries_only(make_catalog: MakeCatalog, clock: FakeClock) -> None:
    catalog = await make_catalog()
    assert catalog.peek("model", "acme/bert", "main") is None
    revision = await catalog.get("model", "acme/bert", "main")
    assert catalog.peek("model", "acme/bert", "main") is revision
    # A ref resolution also makes its commit known.
    assert catalog.peek("model", "acme/bert", C1) is not None

    clock.advance(59.9)
    assert catalog.peek("model", "acme/bert", "main") is revision
    clock.advance(0.1)
    assert catalog.peek("model", "acme/bert", "main") is None
    assert catalog.peek("model", "acme/bert", C1) is not None
    assert catalog.peek("model", "acme/bert", "v1.0") is None
    assert catalog.peek("dataset", "acme/bert", "main") is None


async def test_memory_is_an_lru(upstream: FakeUpstream, make_catalog: MakeCatalog) -> None:
    catalog = await make_catalog(CatalogConfig(memory_entries=3))
    await catalog.get("model", "acme/bert", "main")  # main and its commit: two entries
    await catalog.get("dataset", "acme/data", "main")  # two more: the oldest goes
    assert catalog.peek("model", "acme/bert", C1) is None
    assert catalog.peek("model", "acme/bert", "main") is not None
    assert catalog.peek("dataset", "acme/data", "main") is not None
    # An evicted entry is simply loaded again.
    assert (await catalog.get("model", "acme/bert", C1)).commit == C1
    assert upstream.revision_calls[f"acme/bert@{C1}"] == 1


@pytest.mark.parametrize(
    ("repo_id", "revision", "code"),
    [
        ("acme/nothing", "main", "RepoNotFound"),
        ("acme/secret", "main", "RepoNotFound"),
        ("acme/bert", "no-such-branch", "RevisionNotFound"),
    ],
)
async def test_not_found_answers_are_remembered_briefly(
    upstream: FakeUpstream,
    make_catalog: MakeCatalog,
    clock: FakeClock,
    repo_id: str,
    revision: str,
    code: str,
) -> None:
    catalog = await make_catalog()
    error = await catalog_error(catalog.get("model", repo_id, revision))
    assert (error.status, error.error_code, error.retry_after_s) == (404, code, None)
    for _ in range(20):
        again = await catalog_error(catalog.get("model", repo_id, revision))
        assert (again.status, again.error_code) == (404, code)
    assert sum(upstream.revision_calls.values()) == 1
    assert catalog.stats()["negative_hits"] == 20
    assert catalog.stats()["upstream_errors"] == 0

    clock.advance(30)
    await catalog_error(catalog.get("model", repo_id, revision))
    assert sum(upstream.revision_calls.values()) == 2


async def test_unknown_repository_is_remembered_for_every_revision(
    upstream: FakeUpstream, make_catalog: MakeCatalog
) -> None:
    catalog = await make_catalog()
    await catalog_error(catalog.get("model", "acme/nothing", "main"))
    error = await catalog_error(catalog.get("model", "acme/nothing", "v2"))
    assert error.error_code == "RepoNotFound"
    assert sum(upstream.revision_calls.values()) == 1


async def test_concurrent_gets_share_one_fetch(
    upstream: FakeUpstream, make_catalog: MakeCatalog
) -> None:
    upstream.delay_s = 0.05
    catalog = await make_catalog()
    results = await asyncio.gather(*(catalog.get("model", "acme/bert", "main") for _ in range(50)))
    assert all(result is results[0] for result in results)
    assert upstream.revision_calls == Counter({"acme/bert@main": 1})
    assert upstream.tree_calls == Counter({f"acme/bert@{C1}": 3})
    assert catalog.stats()["misses"] == 50


async def test_concurrent_failures_are_shared_too(
    upstream: FakeUpstream, make_catalog: MakeCatalog
) -> None:
    upstream.delay_s = 0.05
    upstream.fail_status = 502
    catalog = await make_catalog()
    results = await asyncio.gather(
        *(catalog.get("model", "acme/bert", "main") for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(result, CatalogError) and result.status == 503 for result in results)
    # Each caller gets an exception object of its own.
    assert len({id(result) for result in results}) == 20
    assert sum(upstream.revision_calls.values()) == 1


async def test_a_stale_ref_is_served_at_once_and_refreshed_in_the_background(
    upstream: FakeUpstream, make_catalog: MakeCatalog, clock: FakeClock
) -> None:
    catalog = await make_catalog()
    old = await catalog.get("model", "acme/bert", "main")
    upstream.repos["models", "acme/bert"].refs["main"] = C2
    upstream.delay_s = 0.2
    clock.advance(60)

    started = time.monotonic()
    stale = [await catalog.get("model", "acme/bert", "main") for _ in range(10)]
    assert time.monotonic() - started < 0.1
    assert all(revision is old for revision in stale)
    assert catalog.stats()["stale_served"] == 10

    await eventually(lambda: catalog.peek("model", "acme/bert", "main") is not None)
    fresh = await catalog.get("model", "acme/bert", "main")
    assert fresh.commit == C2
    assert entry_for(fresh, "config.json").size == len(CONFIG_V2)
    # One refresh for all ten stale answers; unchanged files of the old commit stay known.
    assert upstream.revision_calls == Counter({"acme/bert@main": 2})
    assert catalog.peek("model", "acme/bert", C1) is not None


async def test_a_ref_deleted_upstream_is_dropped_after_its_refresh(
    upstream: FakeUpstream, make_catalog: MakeCatalog, clock: FakeClock
) -> None:
    catalog = await make_catalog()
    await catalog.get("model", "acme/bert", "v1.0")
    del upstream.repos["models", "acme/bert"].refs["v1.0"]
    clock.advance(60)
    assert (await catalog.get("model", "acme/bert", "v1.0")).commit == C1  # stale, refreshing
    await eventually(lambda: upstream.revision_calls["acme/bert@v1.0"] == 2)
    await asyncio.sleep(0.05)
    error = await catalog_error(catalog.get("model", "acme/bert", "v1.0"))
    assert error.error_code == "RevisionNotFound"


async def test_upstream_down_with_a_warm_cache_serves_stale(
    upstream: FakeUpstream,
    make_catalog: MakeCatalog,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    catalog = await make_catalog(CatalogConfig(ref_ttl_s=60.0, retry_after_s=5))
    await catalog.get("model", "acme/bert", "main")
    await catalog.get("model", "acme/bert", "v1.0")
    assert upstream.server is not None
    await upstream.server.close()
    clock.advance(61)

    caplog.set_level(logging.WARNING, logger="gateway.catalog")
    for _ in range(3):
        for ref in ("main", "v1.0"):
            assert (await catalog.get("model", "acme/bert", ref)).commit == C1
        await settled(catalog)
        clock.advance(5)  # past the refresh back-off: every round tries upstream again
    assert catalog.stats()["upstream_errors"] == 6
    stale_warnings = [r for r in caplog.records if "until upstream answers" in r.getMessage()]
    assert len(stale_warnings) == 2  # once per key for the whole outage
    outage_warnings = [r for r in caplog.records if "upstream unavailable" in r.getMessage()]
    assert len(outage_warnings) == 1
    # Stale entries stay stale for peek: the request path must not take them as fresh.
    assert catalog.peek("model", "acme/bert", "main") is None
    # A commit known before the outage still answers.
    assert (await catalog.get("model", "acme/bert", C1)).commit == C1


async def test_refresh_back_off_while_upstream_fails(
    upstream: FakeUpstream, make_catalog: MakeCatalog, clock: FakeClock
) -> None:
    catalog = await make_catalog(CatalogConfig(ref_ttl_s=60.0, retry_after_s=5))
    await catalog.get("model", "acme/bert", "main")
    upstream.fail_status = 500
    clock.advance(60)
    await catalog.get("model", "acme/bert", "main")
    await settled(catalog)
    for _ in range(10):
        await catalog.get("model", "acme/bert", "main")
    assert upstream.revision_calls["acme/bert@main"] == 2

    upstream.fail_status = None
    upstream.repos["models", "acme/bert"].refs["main"] = C2
    clock.advance(5)
    await catalog.get("model", "acme/bert", "main")
    await eventually(lambda: catalog.peek("model", "acme/bert", "main") is not None)
    assert (await catalog.get("model", "acme/bert", "main")).commit == C2


@pytest.mark.parametrize("failure", ["refused", "500", "429", "404 without code", "garbage"])
async def test_upstream_down_with_nothing_cached_is_503(
    upstream: FakeUpstream, make_catalog: MakeCatalog, failure: str
) -> None:
    url = None
    if failure == "refused":
        url = f"http://127.0.0.1:{free_port()}"
    elif failure == "garbage":
        upstream.garbage = True
    else:
        upstream.fail_status = int(failure.split(maxsplit=1)[0])
    catalog = await make_catalog(CatalogConfig(retry_after_s=7), upstream_url=url)
    error = await catalog_error(catalog.get("model", "acme/bert", "main"))
    assert (error.status, error.error_code, error.retry_after_s) == (503, None, 7)
    assert "upstream unavailable" in error.message
    assert catalog.stats()["upstream_errors"] == 1
    # Transient: not remembered, the next request asks again.
    await catalog_error(catalog.get("model", "acme/bert", "main"))
    assert catalog.stats()["upstream_errors"] == 2


async def test_a_bad_tree_page_is_503(upstream: FakeUpstream, make_catalog: MakeCatalog) -> None:
    upstream.repos["models", "acme/bert"].trees[C1] = [*BERT_C1, {"type": "file", "path": "x"}]
    catalog = await make_catalog()
    error = await catalog_error(catalog.get("model", "acme/bert", "main"))
    assert error.status == 503
    assert "tree page 3" in error.message


async def test_oversized_answers_are_refused(
    upstream: FakeUpstream, make_catalog: MakeCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog_module, "MAX_BODY_BYTES", 100)
    catalog = await make_catalog()
    error = await catalog_error(catalog.get("model", "acme/bert", "main"))
    assert error.status == 503
    assert "larger than 100 bytes" in error.message


async def test_close_cancels_loads_in_flight(
    upstream: FakeUpstream, make_catalog: MakeCatalog
) -> None:
    upstream.delay_s = 5.0
    catalog = await make_catalog()
    waiting = asyncio.create_task(catalog.get("model", "acme/bert", "main"))
    await eventually(lambda: bool(upstream.raw_paths))
    started = time.monotonic()
    await catalog.close()
    assert time.monotonic() - started < 0.5
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_slow_upstream_is_504_within_the_timeout(
    upstream: FakeUpstream, make_catalog: MakeCatalog
) -> None:
    upstream.delay_s = 5.0
    catalog = await make_catalog(CatalogConfig(retry_after_s=3), api_timeout_s=0.3)
    started = time.monotonic()
    error = await catalog_error(catalog.get("model", "acme/bert", "main"))
    assert time.monotonic() - started < 0.3 + 0.2
    assert (error.status, error.error_code, error.retry_after_s) == (504, None, 3)
    assert "0.3 s" in error.message


async def test_the_timeout_covers_all_pages_together(
    upstream: FakeUpstream, make_catalog: MakeCatalog
) -> None:
    # Four calls of 0.12 s each: every one is well within the timeout, all of them are not.
    upstream.delay_s = 0.12
    catalog = await make_catalog(api_timeout_s=0.4)
    started = time.monotonic()
    error = await catalog_error(catalog.get("model", "acme/bert", "main"))
    assert time.monotonic() - started < 0.4 + 0.2
    assert error.status == 504


# --------------------------------------------------------------------------- Redis


async def test_a_second_instance_gets_everything_from_redis(
    upstream: FakeUpstream, make_catalog: MakeCatalog, redis_url: str
) -> None:
    first = await make_catalog(redis_url=redis_url)
    await first.get("model", "acme/bert", "main")
    await first.close()  # waits for its Redis writes
    calls = sum(upstream.revision_calls.values()), sum(upstream.tree_calls.values())

    second = await make_catalog(redis_url=redis_url)
    revision = await second.get("model", "acme/bert", "main")
    assert revision.commit == C1
    assert entry_for(revision, "model.safetensors").etag == hashlib.sha256(WEIGHTS).hexdigest()
    assert (await second.get("model", "acme/bert", C1)).commit == C1
    assert (sum(upstream.revision_calls.values()), sum(upstream.tree_calls.values())) == calls
    # main's record and the files; the commit's entry was made in memory along with main's.
    assert second.stats()["redis_hits"] == 2

    # Another ref of the same commit: the revision call only; the files come from Redis.
    third = await make_catalog(redis_url=redis_url)
    assert (await third.get("model", "acme/bert", "v1.0")).commit == C1
    assert upstream.revision_calls["acme/bert@v1.0"] == 1
    assert sum(upstream.tree_calls.values()) == calls[1]

    client = Redis.from_url(redis_url)
    try:
        ttl_ms = await client.pttl("mg:catalog:rev:model:acme/bert:main")
        assert 0 < ttl_ms <= 60_000
        files_ttl_ms = await client.pttl(f"mg:catalog:files:model:acme/bert:{C1}")
        assert 60_000 < files_ttl_ms <= 7 * 86400 * 1000
    finally:
        await client.aclose()


async def test_a_stale_redis_record_is_not_taken_as_fresh(
    upstream: FakeUpstream, make_catalog: MakeCatalog, redis_url: str, clock: FakeClock
) -> None:
    first = await make_catalog(redis_url=redis_url)
    await first.get("model", "acme/bert", "main")
    await first.close()
    upstream.repos["models", "acme/bert"].refs["main"] = C2
    clock.advance(60)  # the record outlives its ref_ttl_s only by this instance's clock
    second = await make_catalog(redis_url=redis_url)
    assert (await second.get("model", "acme/bert", "main")).commit == C2


async def test_garbage_in_redis_is_ignored_and_replaced(
    upstream: FakeUpstream, make_catalog: MakeCatalog, redis_url: str
) -> None:
    client = Redis.from_url(redis_url)
    try:
        await client.set("mg:catalog:rev:model:acme/bert:main", b"\x00garbage")
        await client.set(f"mg:catalog:files:model:acme/bert:{C1}", b'{"c": "x", "f": []}')
        catalog = await make_catalog(redis_url=redis_url)
        revision = await catalog.get("model", "acme/bert", "main")
        assert revision.commit == C1
        assert len(revision.files) == 4
        assert upstream.tree_calls[f"acme/bert@{C1}"] == 3
        assert catalog.stats()["redis_errors"] == 2
        await catalog.close()
        stored = await client.get("mg:catalog:rev:model:acme/bert:main")
        assert isinstance(stored, bytes)
        assert decode_resolution(stored).commit == C1
        stored_files = await client.get(f"mg:catalog:files:model:acme/bert:{C1}")
        assert isinstance(stored_files, bytes)
        assert decode_files(stored_files, C1) == dict(revision.files)
    finally:
        await client.aclose()


async def test_a_dead_redis_costs_one_failure_per_retry_period(
    upstream: FakeUpstream,
    make_catalog: MakeCatalog,
    private_redis: RedisServer,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.catalog")
    catalog = await make_catalog(redis_url=private_redis.url)
    await catalog.get("model", "acme/bert", "main")
    await settled(catalog)
    private_redis.kill()

    started = time.monotonic()
    others: list[tuple[RepoType, str]] = [("dataset", "acme/data"), ("model", "acme/gated")]
    for repo_type, repo_id in others:
        assert (await catalog.get(repo_type, repo_id, "main")).files
    assert await catalog.get("model", "acme/bert", "refs/pr/1")
    assert time.monotonic() - started < 1.0
    assert catalog.stats()["redis_errors"] == 1

    private_redis.start()
    clock.advance(REDIS_RETRY_S)
    await catalog.get("model", "acme/big", "main")
    await catalog.close()
    client = Redis.from_url(private_redis.url)
    try:
        assert await client.exists("mg:catalog:rev:model:acme/big:main")
    finally:
        await client.aclose()
    assert catalog.stats()["redis_errors"] == 1
    messages = [(r.levelname, r.getMessage()) for r in caplog.records if "redis" in r.getMessage()]
    assert [level for level, _ in messages] == ["WARNING", "INFO"]
    assert "retrying every 5 s" in messages[0][1]


async def test_a_hung_redis_delays_one_request_only(
    make_catalog: MakeCatalog, private_redis: RedisServer
) -> None:
    catalog = await make_catalog(
        redis_url=private_redis.url, redis_config=RedisConfig(command_timeout_s=0.2)
    )
    await catalog.get("model", "acme/bert", "main")
    await settled(catalog)
    private_redis.pause()

    started = time.monotonic()
    await catalog.get("dataset", "acme/data", "main")
    first = time.monotonic() - started
    assert first < 0.2 + 0.2
    started = time.monotonic()
    await catalog.get("model", "acme/gated", "main")
    assert time.monotonic() - started < 0.1
    assert catalog.stats()["redis_errors"] == 1
