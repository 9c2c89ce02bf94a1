"""What upstream says a repository holds at a revision: its commit and every file's metadata.

Hugging Face clients accept a redirect only with the commit, the file's etag and size, and the
etag names the blob in their cache, so these facts must be right.

``Catalog`` learns them from the upstream API without any client's token: its answers are shared
by all clients, so to it a private repository does not exist. It keeps them in three layers.

Memory
    An LRU of ``catalog.memory_entries`` ``RepoRevision``s keyed by what was asked for,
    ``(type, repo, revision)``; resolving a ref adds two, the ref's and its commit's, which share
    one files mapping. A commit sha never changes meaning, so its entry is always fresh; its
    private and gated flags are those of the last revision call that named the commit. A moving
    ref (branch, tag, ``refs/pr/N``) is taken to point at the commit last seen for
    ``catalog.ref_ttl_s``, after which it is served stale while one refresh runs.
Redis (optional; shared between instances; never needed to answer)
    ``{p}catalog:rev:{type}:{repo_id}:{revision}``
        string, compact JSON ``{"c": commit, "p": private, "g": gated, "t": fetched_at}``;
        expires after ``ref_ttl_s``. Written for the revision asked for and for its commit sha,
        since the private and gated flags can change and only the revision call reports them.
    ``{p}catalog:files:{type}:{repo_id}:{commit}``
        string, compact JSON ``{"c": commit, "f": [[path, size, etag, lfs], ...]}``; expires
        after ``commit_ttl_s``.
    ``{p}`` is ``redis.key_prefix``. Repo ids contain no ``:``, so the last field may.
Upstream
    ``GET /api/{type}s/{repo}/revision/{revision}`` for the commit and the flags, then the pages
    of ``GET /api/{type}s/{repo}/tree/{commit}?recursive=true&expand=false``, only for a commit
    whose files are in neither memory nor Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError
from yarl import URL

from gateway.config import CatalogConfig, RedisConfig, UpstreamConfig
from gateway.hf.paths import RepoType
from gateway.redis_client import open_redis


@dataclass(frozen=True, slots=True)
class FileMeta:
    path: str
    size: int
    #: LFS files: the sha256 of the content (64 hex); plain git files: the blob sha1 (40 hex).
    etag: str
    lfs: bool


@dataclass(frozen=True, slots=True)
class RepoRevision:
    repo_type: RepoType
    repo_id: str
    #: The revision as asked for: a branch, tag, ``refs/pr/N`` or a commit sha.
    requested: str
    #: The 40-hex commit it resolves to.
    commit: str
    private: bool
    gated: bool
    files: Mapping[str, FileMeta]
    #: Unix time upstream was asked.
    fetched_at: float

    @property
    def upstream_only(self) -> bool:
        """Private and gated files need the client's token, which only upstream may see."""
        return self.private or self.gated


class CatalogError(Exception):
    """A repository, revision or file that cannot be served, in Hugging Face's own terms."""

    def __init__(
        self,
        status: int,
        error_code: str | None,
        message: str,
        *,
        commit: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        #: Value for ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo);
        #: None for errors the clients should treat as transient.
        self.error_code = error_code
        self.message = message
        #: Known commit, sent as ``X-Repo-Commit`` (EntryNotFound needs it).
        self.commit = commit
        self.retry_after_s = retry_after_s


def is_commit_sha(revision: str) -> bool:
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


# --------------------------------------------------------------------------- constants

USER_AGENT = "mirror-gateway-catalog/0.1"
#: Larger upstream answers (one tree page, one revision info) are refused, not read.
MAX_BODY_BYTES = 64 * 1024 * 1024
#: Same-origin redirects followed per call: upstream answers a renamed repository with one.
MAX_REDIRECTS = 5
#: Upper bound on how long "repository / revision not found" is remembered (memory only): long
#: enough to absorb a flood of bad URLs, short enough that a new repository is seen soon.
NEGATIVE_TTL_MAX_S = 30.0
#: After a failed Redis call, Redis is left alone this long, so that an outage does not add a
#: timeout to every miss.
REDIS_RETRY_S = 5.0

STAT_NAMES = (
    "hits",
    "misses",
    "stale_served",
    "negative_hits",
    "upstream_fetches",
    "upstream_errors",
    "redis_hits",
    "redis_errors",
)

NotFoundCode = Literal["RepoNotFound", "RevisionNotFound", "GatedRepo"]
_Key = tuple[RepoType, str, str]
_T = TypeVar("_T")

_PLURAL: dict[RepoType, str] = {"model": "models", "dataset": "datasets", "space": "spaces"}
_SHA1 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NOT_FOUND_STATUS: dict[NotFoundCode, int] = {
    "RepoNotFound": 404,
    "RevisionNotFound": 404,
    "GatedRepo": 403,
}
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_HEADERS = {"User-Agent": USER_AGENT, "Accept": "application/json"}
_READ_CHUNK_BYTES = 256 * 1024
#: What a Redis call raises when Redis is unreachable, slow (``TimeoutError`` is an ``OSError``)
#: or refuses the command.
_REDIS_FAILURES = (RedisError, OSError)

logger = logging.getLogger("gateway.catalog")


# --------------------------------------------------------------------------- upstream answers


def entry_for(revision: RepoRevision, path: str) -> FileMeta:
    """The file at ``path``; ``CatalogError`` EntryNotFound (with the commit) if there is none."""
    meta = revision.files.get(path)
    if meta is None:
        raise CatalogError(
            404,
            "EntryNotFound",
            f"{_show(path)} does not exist in {revision.repo_type} {revision.repo_id!r} "
            f"at commit {revision.commit}",
            commit=revision.commit,
        )
    return meta


class MalformedData(ValueError):
    """Upstream JSON or a Redis record without the expected shape; the message says what."""


@dataclass(frozen=True, slots=True)
class Resolution:
    """What the revision call says: the commit a revision names, and the repository's flags."""

    commit: str
    private: bool
    gated: bool
    fetched_at: float


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _size(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedData(f"{what} is {_show(value)}, not a size in bytes")
    return value


def _file_meta(path: object, size: object, etag: object, lfs: bool) -> FileMeta:
    if not isinstance(path, str) or not path:
        raise MalformedData(f"file path is {_show(path)}")
    pattern, kind = (_SHA256, "sha256") if lfs else (_SHA1, "git blob sha1")
    # The etag names the blob in client caches: anything but exact lowercase hex is refused.
    if not isinstance(etag, str) or not pattern.fullmatch(etag):
        raise MalformedData(f"{_show(path)}: etag {_show(etag)} is not a {kind}")
    return FileMeta(path=path, size=_size(size, f"{_show(path)}: size"), etag=etag, lfs=lfs)


def parse_revision_info(data: object, requested: str, fetched_at: float) -> Resolution:
    """Read ``/api/{type}s/{repo}/revision/{revision}`` JSON; raises ``MalformedData``."""
    if not isinstance(data, dict):
        raise MalformedData(f"revision info is {type(data).__name__}, not an object")
    sha = data.get("sha")
    if not isinstance(sha, str) or not is_commit_sha(sha):
        raise MalformedData(f"'sha' is {_show(sha)}, not a 40-hex commit")
    if is_commit_sha(requested) and sha != requested:
        raise MalformedData(f"asked for commit {requested}, upstream answered with {sha}")
    private = data.get("private")
    if not isinstance(private, bool):
        raise MalformedData(f"'private' is {_show(private)}, not true or false")
    gated = data.get("gated", False)
    # Upstream sends false, "auto" or "manual"; anything else is taken as gated, which only ever
    # sends more requests to upstream, never a gated file to a mirror.
    return Resolution(sha, private, gated is not False and gated is not None, fetched_at)


def parse_tree_page(data: object) -> list[FileMeta]:
    """Read one page of ``/api/{type}s/{repo}/tree/{commit}`` JSON; raises ``MalformedData``.

    Only files are kept: directories (and any other kind upstream may add) have no content.
    """
    if not isinstance(data, list):
        raise MalformedData(f"tree page is {type(data).__name__}, not a list")
    metas: list[FileMeta] = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise MalformedData(f"tree entry {_show(item)} is not an object with a 'type'")
        if item["type"] != "file":
            continue
        lfs = item.get("lfs")
        if lfs is None:
            metas.append(_file_meta(item.get("path"), item.get("size"), item.get("oid"), False))
        elif isinstance(lfs, dict):
            metas.append(_file_meta(item.get("path"), lfs.get("size"), lfs.get("oid"), True))
        else:
            raise MalformedData(f"{_show(item.get('path'))}: 'lfs' is {_show(lfs)}")
    return metas


def classify_status(status: int, error_code: str | None) -> NotFoundCode | None:
    """Which definite answer an upstream error is, like ``huggingface_hub`` reads it; None for
    anything transient (other 4xx, every 5xx).

    401 means "not found" because the catalog never sends a token: upstream answers that way
    for private repositories and for ones that do not exist.
    """
    if not 400 <= status < 500:
        return None
    if error_code == "RepoNotFound":
        return "RepoNotFound"
    if error_code == "RevisionNotFound":
        return "RevisionNotFound"
    if error_code == "GatedRepo":
        return "GatedRepo"
    return "RepoNotFound" if status == 401 else None


# --------------------------------------------------------------------------- Redis records


def _dumps(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise MalformedData("not JSON") from None
    if not isinstance(data, dict):
        raise MalformedData(f"{type(data).__name__}, not an object")
    return data


def encode_resolution(resolution: Resolution) -> bytes:
    return _dumps(
        {
            "c": resolution.commit,
            "p": resolution.private,
            "g": resolution.gated,
            "t": resolution.fetched_at,
        }
    )


def decode_resolution(raw: bytes) -> Resolution:
    """Inverse of ``encode_resolution``; raises ``MalformedData`` for anything else."""
    data = _json_object(raw)
    commit, private, gated, fetched_at = data.get("c"), data.get("p"), data.get("g"), data.get("t")
    if not isinstance(commit, str) or not is_commit_sha(commit):
        raise MalformedData(f"commit {_show(commit)}")
    if not isinstance(private, bool) or not isinstance(gated, bool):
        raise MalformedData(f"flags {_show(private)}, {_show(gated)}")
    if isinstance(fetched_at, bool) or not isinstance(fetched_at, int | float):
        raise MalformedData(f"fetched_at {_show(fetched_at)}")
    if not math.isfinite(fetched_at):
        raise MalformedData(f"fetched_at {_show(fetched_at)}")
    return Resolution(commit, private, gated, float(fetched_at))


def encode_files(commit: str, files: Mapping[str, FileMeta]) -> bytes:
    return _dumps({"c": commit, "f": [[m.path, m.size, m.etag, m.lfs] for m in files.values()]})


def decode_files(raw: bytes, commit: str) -> dict[str, FileMeta]:
    """Inverse of ``encode_files`` for ``commit``; raises ``MalformedData`` for anything else."""
    data = _json_object(raw)
    if data.get("c") != commit:
        raise MalformedData(f"record is for commit {_show(data.get('c'))}, not {commit}")
    entries = data.get("f")
    if not isinstance(entries, list):
        raise MalformedData(f"files are {_show(entries)}")
    files: dict[str, FileMeta] = {}
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 4 or not isinstance(entry[3], bool):
            raise MalformedData(f"file entry {_show(entry)}")
        meta = _file_meta(entry[0], entry[1], entry[2], entry[3])
        files[meta.path] = meta
    return files


# --------------------------------------------------------------------------- the catalog


class _TreeTooLarge(CatalogError):
    """A tree with more than ``catalog.max_pages`` pages: remembered like a not-found answer,
    since asking again would fetch every page again and fail the same way."""


def _describe(key: _Key) -> str:
    repo_type, repo_id, revision = key
    return f"{repo_type} {repo_id}@{revision}"


def _describe_exception(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _origin(url: URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host or "", url.port


def _copy(error: CatalogError) -> CatalogError:
    # Every caller gets an exception of its own: one object raised in many tasks would collect
    # all their tracebacks.
    return CatalogError(
        error.status,
        error.error_code,
        error.message,
        commit=error.commit,
        retry_after_s=error.retry_after_s,
    )


def _next_link(response: aiohttp.ClientResponse) -> URL | None:
    link = response.links.get("next")
    if link is None:
        return None
    url = link.get("url")  # aiohttp has already made it absolute against the response URL
    return url if isinstance(url, URL) else None


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or None once it exceeds ``limit`` bytes (the rest is never read)."""
    if response.content_length is not None and response.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_READ_CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class Catalog:
    """Commit and file metadata per ``(type, repo, revision)``, from memory, Redis or upstream.

    ``peek`` is the request path's synchronous look at memory. ``get`` also goes to Redis and
    upstream: concurrent calls for one key share one load, a ref past its TTL is served stale
    while one background refresh runs, and when upstream fails a stale entry keeps being served.
    "Repository / revision not found" answers are remembered briefly (memory only). Redis is an
    optimisation: its failures are counted, logged once per outage, and then Redis is skipped
    for ``REDIS_RETRY_S``.
    """

    def __init__(
        self,
        upstream: UpstreamConfig,
        config: CatalogConfig,
        *,
        redis_url: str | None = None,
        redis_config: RedisConfig | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._upstream = upstream
        self._config = config
        redis_config = redis_config or RedisConfig()
        if redis_url is not None:
            redis_config = replace(redis_config, url=redis_url, sentinel=None)
        self._redis_config = redis_config
        self._redis_prefix = f"{redis_config.key_prefix}catalog:"
        self._session = session
        self._owns_session = session is None
        self._clock = clock
        self._base = str(URL(upstream.url)).rstrip("/")
        self._origin = _origin(URL(upstream.url))
        self._timeout = aiohttp.ClientTimeout(total=upstream.api_timeout_s)
        self._negative_ttl_s = min(config.ref_ttl_s, NEGATIVE_TTL_MAX_S)
        self._memory: OrderedDict[_Key, RepoRevision] = OrderedDict()
        #: (type, repo, revision) -> (expiry, error); revision None: the whole repository.
        self._negative: OrderedDict[
            tuple[RepoType, str, str | None], tuple[float, CatalogError]
        ] = OrderedDict()
        self._inflight: dict[_Key, asyncio.Task[RepoRevision]] = {}
        self._writes: set[asyncio.Task[None]] = set()
        #: Keys served stale because their refresh failed -> earliest next refresh. A key is in
        #: it from its first failed refresh until one succeeds: that is one outage for the log.
        self._outage: dict[_Key, float] = {}
        self._upstream_failing = False
        self._redis: Redis | None = None
        self._redis_failing = False
        self._redis_retry_at = 0.0
        self._stats = dict.fromkeys(STAT_NAMES, 0)

    # ------------------------------------------------------------------ public API

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        if self._redis_config.enabled and self._redis is None:
            # A failed command reaches us at once (no retries) and opens the circuit; through
            # Sentinel, the next connection after a failover goes to the new primary.
            self._redis = open_redis(self._redis_config)

    async def close(self) -> None:
        loads = list(self._inflight.values())
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        if self._writes:
            # Waiting lets what was fetched just before shutdown reach the other instances. The
            # writes run side by side, each bounded by the Redis timeout; twice that is margin.
            _, pending = await asyncio.wait(
                list(self._writes), timeout=2 * self._redis_config.command_timeout_s
            )
            for write in pending:
                write.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._redis is not None:
            try:
                async with asyncio.timeout(self._redis_config.command_timeout_s):
                    await self._redis.aclose()
            except (TimeoutError, *_REDIS_FAILURES) as exc:
                logger.debug("catalog: closing redis failed: %s", _describe_exception(exc))
            self._redis = None
        if self._session is not None and self._owns_session:
            await self._session.close()
            self._session = None

    def peek(self, repo_type: RepoType, repo_id: str, revision: str) -> RepoRevision | None:
        """A fresh entry from memory, or None. Synchronous and O(1): it runs on every request."""
        key = (repo_type, repo_id, revision)
        entry = self._memory.get(key)
        if entry is None or not self._fresh(entry, self._clock()):
            return None
        self._memory.move_to_end(key)
        self._stats["hits"] += 1
        return entry

    async def get(self, repo_type: RepoType, repo_id: str, revision: str) -> RepoRevision:
        """The revision's commit and files; raises ``CatalogError``.

        404 RepoNotFound / RevisionNotFound, 403 GatedRepo (upstream refused to list the files
        without a token), 503 when upstream is unreachable or answers nonsense and nothing is
        cached, 504 when it takes longer than ``upstream.api_timeout_s``.
        """
        key = (repo_type, repo_id, revision)
        now = self._clock()
        entry = self._memory.get(key)
        if entry is not None:
            self._memory.move_to_end(key)
            if self._fresh(entry, now):
                self._stats["hits"] += 1
                return entry
            self._stats["stale_served"] += 1
            if key not in self._inflight and self._outage.get(key, 0.0) <= now:
                self._start_load(key)
            return entry
        self._raise_if_known_missing(key, now)
        self._stats["misses"] += 1
        task = self._inflight.get(key) or self._start_load(key)
        try:
            # Shielded: a caller that goes away (client disconnect) must not cancel the load
            # the other callers wait for.
            return await asyncio.shield(task)
        except CatalogError as error:
            raise _copy(error) from None

    def stats(self) -> dict[str, int]:
        """Counters since start, named in ``STAT_NAMES``.

        hits: fresh answers from memory (``peek`` or ``get``); misses: ``get`` calls that had to
        load; stale_served: stale refs answered while refreshing; negative_hits: remembered
        not-found answers; upstream_fetches: HTTP requests sent upstream (every page and
        redirect); upstream_errors: loads that ended unavailable or timed out; redis_hits:
        records used from Redis; redis_errors: failed Redis calls and unusable records.
        """
        return dict(self._stats)

    # ------------------------------------------------------------------ memory

    def _fresh(self, entry: RepoRevision, now: float) -> bool:
        return entry.requested == entry.commit or now - entry.fetched_at < self._config.ref_ttl_s

    def _remember(self, entry: RepoRevision) -> None:
        key = (entry.repo_type, entry.repo_id, entry.requested)
        self._memory[key] = entry
        self._memory.move_to_end(key)
        while len(self._memory) > self._config.memory_entries:
            evicted, _ = self._memory.popitem(last=False)
            self._outage.pop(evicted, None)

    def _files_in_memory(self, key: _Key, commit_key: _Key) -> Mapping[str, FileMeta] | None:
        for known in (self._memory.get(commit_key), self._memory.get(key)):
            if known is not None and known.commit == commit_key[2]:
                return known.files
        return None

    def _raise_if_known_missing(self, key: _Key, now: float) -> None:
        repo_type, repo_id, _ = key
        for negative_key in ((repo_type, repo_id, None), key):
            found = self._negative.get(negative_key)
            if found is None:
                continue
            expires, error = found
            if now < expires:
                self._stats["negative_hits"] += 1
                raise _copy(error)
            del self._negative[negative_key]

    def _remember_missing(self, key: _Key, error: CatalogError) -> None:
        repo_type, repo_id, _ = key
        negative_key = (repo_type, repo_id, None) if error.error_code == "RepoNotFound" else key
        # A copy: the raised one holds its traceback, and with it every frame it passed.
        self._negative[negative_key] = (self._clock() + self._negative_ttl_s, _copy(error))
        self._negative.move_to_end(negative_key)
        # Bounded: a flood of distinct bad URLs must not grow memory without limit.
        while len(self._negative) > self._config.memory_entries:
            self._negative.popitem(last=False)
        self._outage.pop(key, None)
        if self._memory.pop(key, None) is not None and self._redis is not None:
            # A ref deleted upstream: without this, the next miss would revive it from Redis.
            self._spawn_write(self._redis_delete(self._rev_key(key)))

    # ------------------------------------------------------------------ loading

    def _start_load(self, key: _Key) -> asyncio.Task[RepoRevision]:
        task = asyncio.get_running_loop().create_task(
            self._load(key), name=f"catalog-load {_describe(key)}"
        )
        self._inflight[key] = task
        task.add_done_callback(lambda done: self._load_done(key, done))
        return task

    def _load_done(self, key: _Key, task: asyncio.Task[RepoRevision]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if task.cancelled():
            return
        # Retrieved here because a background refresh has no caller to retrieve it.
        exc = task.exception()
        if exc is not None and not isinstance(exc, CatalogError):
            logger.error("catalog: loading %s failed", _describe(key), exc_info=exc)

    async def _load(self, key: _Key) -> RepoRevision:
        try:
            async with asyncio.timeout(self._upstream.api_timeout_s):
                entry = await self._resolve(key)
        except TimeoutError:
            error = CatalogError(
                504,
                None,
                f"upstream {self._upstream.url} did not answer for {_describe(key)} within "
                f"{self._upstream.api_timeout_s:g} s (upstream.api_timeout_s)",
                retry_after_s=self._config.retry_after_s,
            )
            self._upstream_failed(key, error)
            raise error from None
        except _TreeTooLarge as error:
            logger.warning("catalog: %s", error.message)
            self._remember_missing(key, error)
            raise
        except CatalogError as error:
            if error.error_code is None:
                self._upstream_failed(key, error)
            else:
                self._remember_missing(key, error)
            raise
        self._outage.pop(key, None)
        return entry

    async def _resolve(self, key: _Key) -> RepoRevision:
        repo_type, repo_id, revision = key
        resolution = await self._stored_resolution(key)
        from_upstream = resolution is None
        if resolution is None:
            resolution = await self._fetch_resolution(key)
        commit_key = (repo_type, repo_id, resolution.commit)
        files = self._files_in_memory(key, commit_key)
        fetched_tree = False
        if files is None:
            files = await self._stored_files(commit_key)
        if files is None:
            files = await self._fetch_tree(commit_key)
            fetched_tree = True
        entry = RepoRevision(
            repo_type=repo_type,
            repo_id=repo_id,
            requested=revision,
            commit=resolution.commit,
            private=resolution.private,
            gated=resolution.gated,
            files=files,
            fetched_at=resolution.fetched_at,
        )
        if commit_key != key:
            # Also refreshes the commit entry's flags, which a sha request would otherwise keep
            # from whenever that commit was first seen.
            self._remember(replace(entry, requested=resolution.commit))
        self._remember(entry)
        if self._redis is not None and (from_upstream or fetched_tree):
            self._spawn_write(
                self._store(
                    key,
                    resolution.commit,
                    resolution if from_upstream else None,
                    files if fetched_tree else None,
                )
            )
        return entry

    async def _fetch_resolution(self, key: _Key) -> Resolution:
        repo_type, repo_id, revision = key
        url = self._api_url(repo_type, repo_id, f"revision/{quote(revision, safe='')}")
        fetched_at = self._clock()
        data, _ = await self._get_json(key, url, f"revision info of {_describe(key)}")
        try:
            return parse_revision_info(data, revision, fetched_at)
        except MalformedData as exc:
            raise self._unavailable(f"unusable revision info for {_describe(key)}: {exc}") from None

    async def _fetch_tree(self, commit_key: _Key) -> Mapping[str, FileMeta]:
        repo_type, repo_id, commit = commit_key
        url: URL | None = self._api_url(
            repo_type, repo_id, f"tree/{commit}", query="recursive=true&expand=false"
        )
        files: dict[str, FileMeta] = {}
        pages = 0
        while url is not None:
            if pages == self._config.max_pages:
                raise _TreeTooLarge(
                    503,
                    None,
                    f"the file list of {_describe(commit_key)} has more than "
                    f"{self._config.max_pages} pages (catalog.max_pages); not served from mirrors",
                    retry_after_s=self._config.retry_after_s,
                )
            pages += 1
            what = f"tree page {pages} of {_describe(commit_key)}"
            data, url = await self._get_json(commit_key, url, what)
            try:
                metas = parse_tree_page(data)
            except MalformedData as exc:
                raise self._unavailable(f"unusable {what}: {exc}") from None
            files.update((meta.path, meta) for meta in metas)
        return MappingProxyType(files)

    def _api_url(self, repo_type: RepoType, repo_id: str, tail: str, query: str = "") -> URL:
        path = f"/api/{_PLURAL[repo_type]}/{quote(repo_id, safe='/')}/{tail}"
        # encoded=True: the revision's %2F must reach upstream as sent, as huggingface_hub does.
        return URL(f"{self._base}{path}{'?' if query else ''}{query}", encoded=True)

    async def _get_json(self, key: _Key, url: URL, what: str) -> tuple[object, URL | None]:
        """GET upstream JSON and its ``rel="next"`` link; follows only same-origin redirects."""
        session = self._session
        if session is None:
            raise RuntimeError("Catalog.start() has not been awaited")
        for _ in range(MAX_REDIRECTS + 1):
            if _origin(url) != self._origin:
                raise self._unavailable(
                    f"{what}: upstream pointed to {url.scheme}://{url.host}:{url.port}, which is "
                    f"not the configured upstream {self._upstream.url}; not following"
                )
            self._stats["upstream_fetches"] += 1
            try:
                async with session.get(
                    url, headers=_HEADERS, timeout=self._timeout, allow_redirects=False
                ) as response:
                    if response.status in _REDIRECT_STATUSES:
                        url = self._redirect_target(response, what)
                        continue
                    if response.status != 200:
                        raise self._status_error(key, response.status, response.headers, what)
                    body = await _read_bounded(response, MAX_BODY_BYTES)
                    next_url = _next_link(response)
            except TimeoutError:
                raise  # an OSError, but a timeout: _load answers it with a 504
            except (aiohttp.ClientError, OSError) as exc:
                raise self._unavailable(f"{what}: {_describe_exception(exc)}") from None
            if body is None:
                raise self._unavailable(f"{what}: answer larger than {MAX_BODY_BYTES} bytes")
            try:
                data = json.loads(body)
            except (ValueError, RecursionError):
                raise self._unavailable(f"{what}: answer is not JSON") from None
            self._upstream_answers()
            return data, next_url
        raise self._unavailable(f"{what}: more than {MAX_REDIRECTS} redirects")

    def _redirect_target(self, response: aiohttp.ClientResponse, what: str) -> URL:
        location = response.headers.get("Location")
        try:
            if location is None:
                raise ValueError("no Location")
            return response.url.join(URL(location))
        except ValueError:
            raise self._unavailable(
                f"{what}: redirect {response.status} to {_show(location)}"
            ) from None

    def _status_error(
        self, key: _Key, status: int, headers: Mapping[str, str], what: str
    ) -> CatalogError:
        code = classify_status(status, headers.get("X-Error-Code"))
        if code is None:
            return self._unavailable(f"{what}: HTTP {status}")
        self._upstream_answers()
        repo_type, repo_id, revision = key
        messages: dict[NotFoundCode, str] = {
            "RepoNotFound": f"repository {repo_id!r} ({repo_type}) is not on upstream, or private",
            "RevisionNotFound": f"{repo_type} repository {repo_id!r} has no revision {revision!r}",
            "GatedRepo": f"{repo_type} repository {repo_id!r} is gated: upstream lists its "
            "files only with a token",
        }
        return CatalogError(_NOT_FOUND_STATUS[code], code, messages[code])

    def _unavailable(self, detail: str) -> CatalogError:
        return CatalogError(
            503, None, f"upstream unavailable: {detail}", retry_after_s=self._config.retry_after_s
        )

    def _upstream_answers(self) -> None:
        if self._upstream_failing:
            self._upstream_failing = False
            logger.info("catalog: upstream %s answers again", self._upstream.url)

    def _upstream_failed(self, key: _Key, error: CatalogError) -> None:
        self._stats["upstream_errors"] += 1
        if self._upstream_failing:
            logger.debug("catalog: %s", error.message)
        else:
            self._upstream_failing = True
            logger.warning("catalog: %s", error.message)
        stale = self._memory.get(key)
        if stale is None:
            return
        if key not in self._outage:
            logger.warning(
                "catalog: serving %s at commit %s, fetched %.0f s ago, until upstream answers",
                _describe(key),
                stale.commit,
                self._clock() - stale.fetched_at,
            )
        # One refresh per retry_after_s while upstream fails, not one per request.
        self._outage[key] = self._clock() + self._config.retry_after_s

    # ------------------------------------------------------------------ Redis

    def _rev_key(self, key: _Key) -> str:
        repo_type, repo_id, revision = key
        return f"{self._redis_prefix}rev:{repo_type}:{repo_id}:{revision}"

    def _files_key(self, commit_key: _Key) -> str:
        repo_type, repo_id, commit = commit_key
        return f"{self._redis_prefix}files:{repo_type}:{repo_id}:{commit}"

    async def _redis_call(self, command: Callable[[Redis], Awaitable[_T]]) -> _T | None:
        """The command's result; None when Redis is off, resting after a failure, or fails."""
        client = self._redis
        if client is None or self._clock() < self._redis_retry_at:
            return None
        try:
            async with asyncio.timeout(self._redis_config.command_timeout_s):
                result = await command(client)
        except _REDIS_FAILURES as exc:
            self._stats["redis_errors"] += 1
            self._redis_retry_at = self._clock() + REDIS_RETRY_S
            if self._redis_failing:
                logger.debug("catalog: redis still failing: %s", _describe_exception(exc))
            else:
                self._redis_failing = True
                detail = _describe_exception(exc)
                if isinstance(exc, TimeoutError) and not str(exc):  # from our asyncio.timeout
                    detail = f"no answer within {self._redis_config.command_timeout_s:g} s"
                logger.warning(
                    "catalog: redis failed (%s); using memory and upstream only, retrying "
                    "every %g s",
                    detail,
                    REDIS_RETRY_S,
                )
            return None
        if self._redis_failing:
            self._redis_failing = False
            logger.info("catalog: redis answers again")
        return result

    async def _redis_get(self, name: str) -> bytes | None:
        async def command(client: Redis) -> object:
            return await client.get(name)

        raw = await self._redis_call(command)
        return raw if isinstance(raw, bytes) else None

    def _malformed_record(self, name: str, exc: MalformedData) -> None:
        # Counted with the failures: either way Redis gave nothing usable. The upstream answer
        # that follows overwrites the record.
        self._stats["redis_errors"] += 1
        logger.debug("catalog: ignoring redis record %s: %s", name, exc)

    async def _stored_resolution(self, key: _Key) -> Resolution | None:
        name = self._rev_key(key)
        raw = await self._redis_get(name)
        if raw is None:
            return None
        try:
            resolution = decode_resolution(raw)
            if is_commit_sha(key[2]) and resolution.commit != key[2]:
                raise MalformedData(f"names commit {resolution.commit}")
        except MalformedData as exc:
            self._malformed_record(name, exc)
            return None
        # By this instance's clock it may already be due for a refresh (clocks differ).
        if self._clock() - resolution.fetched_at >= self._config.ref_ttl_s:
            return None
        self._stats["redis_hits"] += 1
        return resolution

    async def _stored_files(self, commit_key: _Key) -> Mapping[str, FileMeta] | None:
        name = self._files_key(commit_key)
        raw = await self._redis_get(name)
        if raw is None:
            return None
        try:
            files = decode_files(raw, commit_key[2])
        except MalformedData as exc:
            self._malformed_record(name, exc)
            return None
        self._stats["redis_hits"] += 1
        return MappingProxyType(files)

    def _spawn_write(self, write: Coroutine[Any, Any, None]) -> None:
        """Run a Redis write in the background: no answer waits for it."""
        task = asyncio.get_running_loop().create_task(write, name="catalog-redis-write")
        self._writes.add(task)
        task.add_done_callback(self._write_done)

    def _write_done(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        # Redis failures are handled inside; anything else here is a bug worth a traceback.
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("catalog: redis write failed", exc_info=exc)

    async def _store(
        self,
        key: _Key,
        commit: str,
        resolution: Resolution | None,
        files: Mapping[str, FileMeta] | None,
    ) -> None:
        repo_type, repo_id, _ = key
        commit_key = (repo_type, repo_id, commit)
        writes: list[tuple[str, bytes, int]] = []
        if resolution is not None:
            ttl_ms = max(1, round(self._config.ref_ttl_s * 1000))
            encoded = encode_resolution(resolution)
            # dict.fromkeys: one record when the revision asked for is the commit itself.
            writes.extend(
                (self._rev_key(k), encoded, ttl_ms) for k in dict.fromkeys((key, commit_key))
            )
        if files is not None:
            ttl_ms = max(1, round(self._config.commit_ttl_s * 1000))
            writes.append((self._files_key(commit_key), encode_files(commit, files), ttl_ms))

        async def command(client: Redis) -> object:
            pipe = client.pipeline(transaction=False)
            for name, value, px in writes:
                pipe.set(name, value, px=px)
            return await pipe.execute()

        await self._redis_call(command)

    async def _redis_delete(self, name: str) -> None:
        async def command(client: Redis) -> object:
            return await client.delete(name)

        await self._redis_call(command)
