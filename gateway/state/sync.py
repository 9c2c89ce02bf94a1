"""Node sync tracking: which commits each mirror node holds, checked against upstream.

A mirror that lags one commit behind must never be sent a request for the newer commit. Each
node with a ``manifest_url`` publishes there what it holds; the gateway reads it every
``sync.interval_s``, checks a few sampled files against the catalog (upstream's own metadata)
and against the node's actual bytes, and routes a request to a node only for a commit it holds
and that has not failed verification.

The manifest's format and its parsing: ``manifest``.

Admission (``sync.admission``): a commit a node newly lists takes no clients until every listed
file's size has been confirmed by a HEAD at the node (and against upstream's listing), and the
sha256 of a sample of its files, drawn with weights by size and by how often clients asked for
each file (a broken copy of a large or popular file is the costliest), matches. Only admitted
commits are published in ``holdings``, the data routing reads; until then, or when admission
fails, the commit's clients go elsewhere.
Ongoing sampling continues after admission.

Routing rules (``servable_commit``): a node without a manifest is taken to hold everything, and
a cache node pulls through what it lacks; a node with a manifest serves a commit it holds with
the file, unless that commit failed verification; a ``bounded`` node asked for a moving ref may
instead serve its own latest synced commit of that ref if synced less than ``max_lag_s`` ago.

State is per gateway instance, not shared through Redis: a manifest is read once a minute or so
per node, and a verification is a handful of small requests, so every instance recomputing
them costs the nodes little, while sharing would add a Redis schema and a failure mode for
data each instance can get for itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Protocol

import aiohttp

from gateway.config import NodeConfig, SyncConfig
from gateway.hf.catalog import CatalogError, RepoRevision, is_commit_sha
from gateway.hf.paths import FileRef, RepoType
from gateway.hf.targets import node_url
from gateway.state.manifest import (
    MAX_MANIFEST_BYTES,
    CommitHolding,
    CommitKey,
    ManifestError,
    NodeHoldings,
    RepoKey,
    parse_manifest,
    repo_label,
)
from gateway.state.netio import bounded_chunks, describe_error
from gateway.state.popularity import RequestCounts

USER_AGENT = "mirror-gateway-sync/0.1"

#: ``Servable.reason`` of a node with a manifest URL whose manifest has not been read yet.
MANIFEST_NOT_READ = "manifest not read yet"

#: (type, repository id, commit, file path)
Sample = tuple[RepoType, str, str, str]

_SHORT_SHA = 7
# Compressed answers would change both the HEAD size and the bytes hashed; huggingface_hub asks
# for identity too, so this checks what clients get.
_IDENTITY = {"Accept-Encoding": "identity"}

_log = logging.getLogger("gateway.sync")

_NO_COMMITS: Mapping[str, CommitHolding] = MappingProxyType({})
_NO_REFS: Mapping[str, str] = MappingProxyType({})
_NO_FAILURES: Mapping[CommitKey, str] = MappingProxyType({})


# --------------------------------------------------------------------------- routing rules


@dataclass(frozen=True, slots=True)
class Servable:
    #: The commit this node would serve, None if it can serve none.
    commit: str | None
    #: Why not, for exclusions and explain; empty when servable.
    reason: str


def _short(commit: str) -> str:
    return commit[:_SHORT_SHA]


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def _failed_reason(commit: str, reason: str) -> str:
    return f"failed verification of {_short(commit)}: {reason}"


def _holding_problem(
    holding: CommitHolding, failure: str | None, key: RepoKey, commit: str, path: str
) -> str | None:
    if failure is not None:
        return _failed_reason(commit, failure)
    if path not in holding.files:
        return f"does not hold {path} at commit {_short(commit)} of {repo_label(key)}"
    return None


def _not_held(
    commits: Mapping[str, CommitHolding], own: str | None, key: RepoKey, commit: str
) -> str:
    if not commits:
        return f"does not hold {repo_label(key)}"
    # Its commit of the ref asked for says most; else the one it synced last.
    held = (
        own
        if own is not None and own in commits
        else max(commits, key=lambda c: commits[c].synced_at)
    )
    return f"does not hold commit {_short(commit)} of {repo_label(key)} (holds {_short(held)})"


def _own_problem(
    node: NodeConfig,
    commits: Mapping[str, CommitHolding],
    failed: Mapping[CommitKey, str],
    key: RepoKey,
    ref: str,
    own: str | None,
    path: str,
    now: float,
) -> str | None:
    """Why a bounded node may not serve its own latest synced commit ``own`` of ``ref``."""
    if own is None:
        return f"has no synced {ref} of {repo_label(key)}"
    holding = commits.get(own)
    if holding is None:
        return f"its latest synced {ref} {_short(own)} is not among its commits"
    age = now - holding.synced_at
    if age > node.max_lag_s:
        return f"latest synced {ref} is {_age(age)} old (max_lag_s {node.max_lag_s:g})"
    return _holding_problem(holding, failed.get((*key, own)), key, own, path)


def servable_commit(
    node: NodeConfig,
    holdings: NodeHoldings | None,
    failed: Mapping[CommitKey, str],
    repo_type: RepoType,
    repo_id: str,
    requested: str,
    upstream_commit: str,
    path: str,
    now: float,
) -> Servable:
    """The commit ``node`` would serve for ``path`` at ``requested``, or why it serves none.

    ``upstream_commit`` is what ``requested`` resolves to upstream; ``failed`` holds this node's
    commits that failed verification, with the reason.
    """
    if node.kind == "cache":
        # A cache pulls through what it lacks; only a copy known to be corrupt rules it out.
        failure = failed.get((repo_type, repo_id, upstream_commit))
        if failure is not None:
            return Servable(None, _failed_reason(upstream_commit, failure))
        return Servable(upstream_commit, "")
    if node.manifest_url is None:
        return Servable(upstream_commit, "")
    if holdings is None:
        return Servable(None, MANIFEST_NOT_READ)
    key = (repo_type, repo_id)
    commits = holdings.commits.get(key, _NO_COMMITS)
    moving = not is_commit_sha(requested)
    own = holdings.refs.get(key, _NO_REFS).get(requested) if moving else None
    holding = commits.get(upstream_commit)
    if holding is None:
        reason = _not_held(commits, own, key, upstream_commit)
    else:
        problem = _holding_problem(
            holding, failed.get((repo_type, repo_id, upstream_commit)), key, upstream_commit, path
        )
        if problem is None:
            return Servable(upstream_commit, "")
        reason = problem
    if node.freshness == "strict" or not moving or own == upstream_commit:
        return Servable(None, reason)
    problem = _own_problem(node, commits, failed, key, requested, own, path, now)
    if problem is None:
        return Servable(own, "")
    return Servable(None, f"{reason}; {problem}")


def holds_exactly(holdings: NodeHoldings | None, key: RepoKey, commit: str, path: str) -> bool:
    """Whether the node's manifest lists ``path`` at ``commit``: a cache that does is preferred."""
    if holdings is None:
        return False
    holding = holdings.commits.get(key, _NO_COMMITS).get(commit)
    return holding is not None and path in holding.files


def pick_samples(holdings: NodeHoldings, count: int, rng: random.Random) -> list[Sample]:
    """Up to ``count`` distinct files, uniformly over every (commit, file) the node lists.

    Deterministic given ``rng`` and the manifest's order; costs O(commits + files of the commits
    hit), so a large manifest is not copied to draw three files.
    """
    entries = [
        (key, commit, holding)
        for key, by_commit in holdings.commits.items()
        for commit, holding in by_commit.items()
    ]
    total = sum(len(holding.files) for _, _, holding in entries)
    chosen = sorted(rng.sample(range(total), min(count, total)))
    samples: list[Sample] = []
    start = 0
    for (repo_type, repo_id), commit, holding in entries:
        end = start + len(holding.files)
        indices = [i - start for i in chosen if start <= i < end]
        if indices:
            paths = list(holding.files)
            samples.extend((repo_type, repo_id, commit, paths[i]) for i in indices)
        start = end
    return samples


def weighted_sample(
    files: Mapping[str, tuple[int, str]],
    count: int,
    max_bytes: int,
    rng: random.Random,
    requests: Callable[[str], int] = lambda path: 0,
) -> list[str]:
    """Up to ``count`` distinct paths among ``files`` (path -> (size, sha256)) of at most
    ``max_bytes``, each drawn with a weight of its size times one plus its ``requests``
    (Efraimidis-Spirakis keys), so the largest and most requested files are the likeliest
    picks. Deterministic given ``rng`` and the files' order."""
    keyed = [
        (rng.random() ** (1.0 / ((size + 1) * (1 + requests(path)))), path)
        for path, (size, _) in files.items()
        if size <= max_bytes
    ]
    keyed.sort(reverse=True)
    return [path for _, path in keyed[:count]]


def admitted_view(manifest: NodeHoldings, admitted: AbstractSet[CommitKey]) -> NodeHoldings:
    """``manifest`` with only the commits that passed admission: what routing may read."""
    commits: dict[RepoKey, Mapping[str, CommitHolding]] = {}
    for key, by_commit in manifest.commits.items():
        kept = {c: h for c, h in by_commit.items() if (*key, c) in admitted}
        if kept:
            commits[key] = kept
    return replace(manifest, commits=commits)


# --------------------------------------------------------------------------- HTTP


class CommitLookup(Protocol):
    """Upstream's metadata of a revision: the catalog."""

    async def get(self, repo_type: RepoType, repo_id: str, revision: str) -> RepoRevision:
        """Raises catalog.CatalogError."""
        ...


class _Inconclusive(Exception):
    """A check that says nothing about the node's data: upstream or the transport failed."""


def new_session() -> aiohttp.ClientSession:
    """The sync HTTP client; call from a coroutine and close it when done."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(), headers={"User-Agent": USER_AGENT}
    )


async def fetch_manifest(
    session: aiohttp.ClientSession, node: NodeConfig, timeout_s: float, max_bytes: int, now: float
) -> NodeHoldings:
    """Read and parse ``node.manifest_url``; any failure, network or format, is a ManifestError."""
    if node.manifest_url is None:
        raise ValueError(f"node {node.id} has no manifest_url")
    try:
        async with session.get(
            node.manifest_url,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            # Like the prober: the configured URL is the one that counts.
            allow_redirects=False,
            headers={"Accept": "application/json"},
        ) as response:
            if response.status != 200:
                raise ManifestError(f"manifest: status {response.status}")
            body = b"".join([c async for c in bounded_chunks(response.content, max_bytes + 1)])
    except TimeoutError:
        raise ManifestError("manifest: timeout") from None
    except OSError as exc:  # aiohttp.ClientConnectorError among them
        raise ManifestError(f"manifest: connect error: {describe_error(exc)}") from None
    except aiohttp.ClientError as exc:
        raise ManifestError(f"manifest: bad response: {describe_error(exc)}") from None
    # Tens of megabytes of JSON take a while to parse: not in the event loop serving redirects.
    return await asyncio.to_thread(parse_manifest, node.id, body, now, max_bytes)


async def _check_sample(
    session: aiohttp.ClientSession,
    node: NodeConfig,
    sample: Sample,
    holdings: NodeHoldings,
    catalog: CommitLookup,
    max_hash_bytes: int,
    timeout_s: float,
) -> str | None:
    """None if the sample checks out, else why not; raises _Inconclusive when it cannot tell."""
    repo_type, repo_id, commit, path = sample
    size, sha256 = holdings.commits[(repo_type, repo_id)][commit].files[path]
    try:
        revision = await catalog.get(repo_type, repo_id, commit)
    except CatalogError as exc:
        raise _Inconclusive(f"catalog: {exc.message}") from None
    meta = revision.files.get(path)
    if meta is None:
        return f"{path} is not in upstream's file list"
    if meta.size != size:
        return f"manifest size {size} != upstream size {meta.size} for {path}"
    # An LFS etag is the sha256 of the content; a plain git file's is its blob sha1.
    if meta.lfs and meta.etag != sha256:
        return f"manifest sha256 != upstream LFS etag for {path}"

    url = node_url(node, FileRef(repo_type, repo_id, commit, path))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with session.head(
            url, allow_redirects=False, timeout=timeout, headers=_IDENTITY
        ) as response:
            status, length = response.status, response.content_length
        if status >= 500:
            raise _Inconclusive(f"HEAD status {status}")
        if 200 <= status < 300:
            if length is None:
                return f"HEAD without Content-Length for {path}"
            if length != size:
                return f"HEAD Content-Length {length} != size {size} for {path}"
        # A redirect to the node's storage is fine; the GET below follows it.
        elif not 300 <= status < 400:
            return f"HEAD status {status} for {path}"
        if size > max_hash_bytes:
            return None

        content = hashlib.sha256()
        blob = None if meta.lfs else hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
        read = 0
        async with session.get(url, timeout=timeout, headers=_IDENTITY) as response:
            if response.status >= 500:
                raise _Inconclusive(f"GET status {response.status}")
            if response.status != 200:
                return f"GET status {response.status} for {path}"
            async for chunk in bounded_chunks(response.content, size + 1):
                read += len(chunk)
                content.update(chunk)
                if blob is not None:
                    blob.update(chunk)
    except TimeoutError:
        raise _Inconclusive("timeout") from None
    except OSError as exc:
        raise _Inconclusive(f"connect error: {describe_error(exc)}") from None
    except aiohttp.ClientError as exc:
        raise _Inconclusive(f"bad response: {describe_error(exc)}") from None
    if read > size:
        return f"GET body over {size} bytes for {path}"
    if read < size:
        return f"GET body {read} bytes != size {size} for {path}"
    if content.hexdigest() != sha256:
        return f"sha256 mismatch for {path}"
    # The manifest's sha256 of a git file cannot be checked against upstream; its blob sha1 can.
    if blob is not None and blob.hexdigest() != meta.etag:
        return f"git blob sha1 mismatch for {path}"
    return None


async def admission_failures(
    session: aiohttp.ClientSession,
    node: NodeConfig,
    commit_key: CommitKey,
    holdings: NodeHoldings,
    catalog: CommitLookup,
    config: SyncConfig,
    timeout_s: float,
    rng: random.Random,
    requests: RequestCounts,
) -> list[tuple[Sample, str]]:
    """The files of a newly listed commit that fail admission, with why (empty: admitted).

    Every listed file is checked against upstream's listing and by a HEAD; the weighted sample
    (by size and by how often clients asked for the file) is also hashed. Raises _Inconclusive
    when upstream or the node's transport cannot tell.
    """
    repo_type, repo_id, commit = commit_key
    files = holdings.commits[(repo_type, repo_id)][commit].files
    hashed = set(
        weighted_sample(
            files, config.admission_samples, config.admission_max_bytes, rng,
            lambda path: requests.of(repo_type, repo_id, path),
        )
    )  # fmt: skip
    gate = asyncio.Semaphore(config.admission_concurrency)

    async def check(path: str) -> tuple[Sample, str | None]:
        sample: Sample = (*commit_key, path)
        # A negative hash limit makes the check stop after the HEAD.
        limit = config.admission_max_bytes if path in hashed else -1
        async with gate:
            return sample, await _check_sample(
                session, node, sample, holdings, catalog, limit, timeout_s
            )

    results = await asyncio.gather(*(check(p) for p in files), return_exceptions=True)
    failures = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        sample, reason = result
        if reason is not None:
            failures.append((sample, reason))
    return failures


def _commitrepo_label(commit_key: CommitKey) -> str:
    repo_type, repo_id, commit = commit_key
    return f"commit {_short(commit)} of {repo_label((repo_type, repo_id))}"


def _describe(sample: Sample) -> str:
    repo_type, repo_id, commit, path = sample
    return f"{path} at {_short(commit)} of {repo_label((repo_type, repo_id))}"


async def verify_sample(
    session: aiohttp.ClientSession,
    node: NodeConfig,
    sample: Sample,
    holdings: NodeHoldings,
    catalog: CommitLookup,
    max_hash_bytes: int,
    timeout_s: float,
) -> str | None:
    """None if ``sample`` (taken from ``holdings``) checks out, else the failure reason.

    Upstream's metadata must agree with the manifest, the node's HEAD with the size and, for
    files up to ``max_hash_bytes``, the node's bytes with the sha256 (and a git file's with
    upstream's blob sha1). When upstream, or the node's transport, fails, nothing is learned
    about the node's data: that is None too, and the next round tries again.
    """
    try:
        return await _check_sample(
            session, node, sample, holdings, catalog, max_hash_bytes, timeout_s
        )
    except _Inconclusive as exc:
        _log.debug("node %s: could not verify %s: %s", node.id, _describe(sample), exc)
        return None


# --------------------------------------------------------------------------- tracker


class FileHolders:
    """The nodes whose manifest lists one file at one commit (``holds_exactly``): the warm
    ones of a caches' group. Each question reads the tracker's holdings as they are then."""

    def __init__(self, tracker: SyncTracker, pinned: FileRef) -> None:
        self._tracker = tracker
        self._pinned = pinned

    def __contains__(self, node_id: object) -> bool:
        if not isinstance(node_id, str):
            return False
        pinned = self._pinned
        holdings = self._tracker.holdings.get(node_id)
        key = (pinned.repo_type, pinned.repo_id)
        return holds_exactly(holdings, key, pinned.revision, pinned.filename)


class FileRevisions(FileHolders):
    """What the nodes hold of one file, worked out per node on demand (``RevisionCheck``).

    A request asks only about the nodes its routing walk reaches, so the cost does not grow
    with the number of nodes.
    """

    def __init__(self, tracker: SyncTracker, pinned: FileRef, requested: str, now: float) -> None:
        super().__init__(tracker, pinned)
        self._requested = requested
        self._now = now
        #: Nodes found to serve another commit than the pinned one.
        self.other_commits: dict[str, str] = {}

    @property
    def may_lack_version(self) -> int:
        return self._tracker.version

    def may_lack(self, node: NodeConfig) -> bool:
        return self._tracker.may_lack(node)

    def reason(self, node: NodeConfig) -> str | None:
        if not self._tracker.may_lack(node):
            return None
        pinned = self._pinned
        servable = self._tracker.servable(
            node,
            pinned.repo_type,
            pinned.repo_id,
            self._requested,
            pinned.revision,
            pinned.filename,
            self._now,
        )
        if servable.commit is None:
            return servable.reason
        if servable.commit != pinned.revision:
            self.other_commits[node.id] = servable.commit
        return None

    def revision_for(self, node_id: str) -> str | None:
        return self.other_commits.get(node_id)


class SyncTracker:
    """Reads every node's manifest and verifies samples of it, round by round.

    ``holdings`` and ``failed`` are read on the request path (through ``servable``) and replaced
    one node at a time by the rounds; ``version`` is bumped whenever a node's failures are
    published or the node set changes.

    A commit fails verification with the file that failed; it is cleared when that same file
    verifies again (a good check of another file says nothing about the broken one). Failed
    files are re-checked first each round, at most ``verify_samples`` of them.
    """

    def __init__(
        self,
        nodes: Sequence[NodeConfig],
        config: SyncConfig,
        catalog: CommitLookup,
        *,
        timeout_s: float,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        max_manifest_bytes: int = MAX_MANIFEST_BYTES,
    ) -> None:
        self._catalog = catalog
        self._timeout_s = timeout_s
        self._rng = rng or random.Random()
        self._clock = clock
        self._max_manifest_bytes = max_manifest_bytes
        self._config = config
        self._nodes: dict[str, NodeConfig] = {}
        #: node id -> latest good manifest, its commits that passed admission only: what
        #: routing reads.
        self.holdings: dict[str, NodeHoldings] = {}
        #: How often clients were routed to each catalogued file: admission hashes the most
        #: requested files of a new commit first.
        self.requests = RequestCounts()
        #: node id -> latest good manifest, as read.
        self._manifests: dict[str, NodeHoldings] = {}
        #: node id -> commits that passed admission (and are still listed).
        self._admitted: dict[str, set[CommitKey]] = {}
        #: node id -> (type, repo, commit) -> why it failed verification
        self.failed: dict[str, dict[CommitKey, str]] = {}
        # node id -> (type, repo, commit) -> path -> reason: what must verify again to clear.
        self._failed_files: dict[str, dict[CommitKey, dict[str, str]]] = {}
        self.version = 0
        self.reconfigure(nodes, config)

    def reconfigure(self, nodes: Sequence[NodeConfig], config: SyncConfig) -> None:
        """Adopt a reloaded config; a node keeps what is known of it while its manifest URL
        stays the same (a new URL may describe another machine)."""
        old = self._nodes
        self._config = config
        self._nodes = {n.id: n for n in nodes if n.enabled and n.manifest_url is not None}
        kept = {
            node_id
            for node_id, node in self._nodes.items()
            if node_id in old and old[node_id].manifest_url == node.manifest_url
        }
        self.holdings = {k: v for k, v in self.holdings.items() if k in kept}
        self._manifests = {k: v for k, v in self._manifests.items() if k in kept}
        self._admitted = {k: v for k, v in self._admitted.items() if k in kept}
        self.failed = {k: v for k, v in self.failed.items() if k in kept}
        self._failed_files = {k: v for k, v in self._failed_files.items() if k in kept}
        self.version += 1

    def failed_for(self, node_id: str) -> Mapping[CommitKey, str]:
        return self.failed.get(node_id, _NO_FAILURES)

    @property
    def may_lack_version(self) -> int:
        return self.version

    def may_lack(self, node: NodeConfig) -> bool:
        """Whether ``node`` may lack some file (the same for every file until ``version``
        changes)."""
        # Most nodes need no manifest lookup: a node without a manifest is trusted to hold
        # everything, and a cache whatever it has not been caught corrupting (``servable_commit``).
        if node.kind == "cache":
            return bool(self.failed_for(node.id))
        return node.manifest_url is not None

    def servable(
        self,
        node: NodeConfig,
        repo_type: RepoType,
        repo_id: str,
        requested: str,
        upstream_commit: str,
        path: str,
        now: float,
    ) -> Servable:
        servable = servable_commit(
            node,
            self.holdings.get(node.id),
            self.failed_for(node.id),
            repo_type,
            repo_id,
            requested,
            upstream_commit,
            path,
            now,
        )
        if servable.commit is None:
            held_back = self._held_back(node.id, (repo_type, repo_id, upstream_commit))
            if held_back is not None:
                return Servable(None, held_back)
        return servable

    def _held_back(self, node_id: str, commit_key: CommitKey) -> str | None:
        """Why a commit the node lists is kept from routing (admission pending or failed), or
        None when it is not listed or was admitted."""
        manifest = self._manifests.get(node_id)
        repo_type, repo_id, commit = commit_key
        if manifest is None or commit not in manifest.commits.get((repo_type, repo_id), {}):
            return None
        if commit_key in self._admitted.get(node_id, set()):
            return None
        failure = self.failed_for(node_id).get(commit_key)
        if failure is not None:
            return _failed_reason(commit, failure)
        return f"{_commitrepo_label(commit_key)} awaits admission (sync)"

    def revision_check(self, pinned: FileRef, requested: str, now: float) -> FileRevisions:
        """Revision checks for one request's file (pinned to upstream's commit)."""
        return FileRevisions(self, pinned, requested, now)

    def availability(
        self, nodes: Sequence[NodeConfig], pinned: FileRef, requested: str, now: float
    ) -> tuple[dict[str, str], dict[str, str], frozenset[str]]:
        """For every node: which cannot serve the file (with why), which would serve another
        commit of the requested ref (bounded freshness), and which caches already hold it.
        """
        check = self.revision_check(pinned, requested, now)
        unavailable = {node.id: reason for node in nodes if (reason := check.reason(node))}
        warm = frozenset(node.id for node in nodes if node.kind == "cache" and node.id in check)
        return unavailable, dict(check.other_commits), warm

    async def run_round(self, session: aiohttp.ClientSession) -> None:
        """Read every manifest and verify samples of each, nodes concurrently."""
        config = self._config
        nodes = list(self._nodes.values())
        # One node's unforeseen error (a bug, a catalog error outside its contract) must cost
        # neither the other nodes their round nor ``run`` its loop, so errors come back as
        # results and are logged here. (A TaskGroup would cancel the siblings, and on 3.11 a
        # failing child can swallow the cancellation of the round itself.)
        results = await asyncio.gather(
            *(self._sync_node(session, node, config) for node in nodes), return_exceptions=True
        )
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, BaseException):
                _log.error("node %s: sync round failed", node.id, exc_info=result)

    async def run(self) -> None:
        """A round every ``interval_s``, the first at once, until cancelled."""
        loop = asyncio.get_running_loop()
        async with new_session() as session:
            next_round = loop.time()
            while True:
                config = self._config
                await self.run_round(session)
                # Fixed cadence so slow rounds do not drift; after an overrun, start at once
                # but do not burst to catch up on missed rounds.
                next_round = max(next_round + config.interval_s, loop.time())
                await asyncio.sleep(next_round - loop.time())

    def _current(self, node: NodeConfig) -> bool:
        """Whether ``node`` is still configured as it was (a reload may land mid-round)."""
        return self._nodes.get(node.id) is node

    async def _sync_node(
        self, session: aiohttp.ClientSession, node: NodeConfig, config: SyncConfig
    ) -> None:
        try:
            holdings = await fetch_manifest(
                session, node, self._timeout_s, self._max_manifest_bytes, self._clock()
            )
        except ManifestError as exc:
            previous = self.holdings.get(node.id)
            if previous is None:
                _log.warning("node %s: %s; it serves nothing until one is read", node.id, exc)
            else:
                _log.warning(
                    "node %s: %s; routing on the manifest read %s ago",
                    node.id,
                    exc,
                    _age(self._clock() - previous.fetched_at),
                )
            return
        if not self._current(node):
            return
        self._adopt(holdings)
        if config.admission:
            await self._admit_new_commits(session, node, holdings, config)
            if not self._current(node) or self._manifests.get(node.id) is not holdings:
                return

        retries = self._retry_samples(node.id, config.verify_samples)
        fresh = pick_samples(holdings, config.verify_samples, self._rng)
        # A file that failed is hashed again as admission would hash it: a HEAD alone must not
        # clear a sha256 mismatch found at admission.
        retry_limit = max(
            config.verify_max_bytes, config.admission_max_bytes if config.admission else 0
        )
        for sample in [*retries, *(s for s in fresh if s not in retries)]:
            try:
                reason = await _check_sample(
                    session,
                    node,
                    sample,
                    holdings,
                    self._catalog,
                    retry_limit if sample in retries else config.verify_max_bytes,
                    self._timeout_s,
                )
            except _Inconclusive as exc:
                _log.debug("node %s: could not verify %s: %s", node.id, _describe(sample), exc)
                continue
            # A newer manifest may have arrived meanwhile (a reload, then another round).
            if not self._current(node) or self._manifests.get(node.id) is not holdings:
                return
            if reason is None:
                self._clear(node.id, sample)
            else:
                self._record(node.id, sample, reason)

    async def _admit_new_commits(
        self,
        session: aiohttp.ClientSession,
        node: NodeConfig,
        manifest: NodeHoldings,
        config: SyncConfig,
    ) -> None:
        """Admit the commits ``manifest`` lists that are not admitted yet, one at a time, all
        within ``admission_timeout_s``; what does not finish waits for the next round."""
        admitted = self._admitted.setdefault(node.id, set())
        failed = self.failed_for(node.id)
        # A commit with a failed file waits until retries clear it (``_sync_node``) rather than
        # be admitted afresh every round on a sample that may miss the bad file.
        pending: list[CommitKey] = [
            (*key, commit)
            for key, by_commit in manifest.commits.items()
            for commit in by_commit
            if (*key, commit) not in admitted and (*key, commit) not in failed
        ]
        started = time.monotonic()
        try:
            async with asyncio.timeout(config.admission_timeout_s):
                for commit_key in pending:
                    try:
                        failures = await admission_failures(
                            session, node, commit_key, manifest, self._catalog, config,
                            self._timeout_s, self._rng, self.requests,
                        )  # fmt: skip
                    except _Inconclusive as exc:
                        _log.info(
                            "node %s: admission of %s undecided: %s",
                            node.id, _commitrepo_label(commit_key), exc,
                        )  # fmt: skip
                        continue
                    if not self._current(node) or self._manifests.get(node.id) is not manifest:
                        return
                    for sample, reason in failures:
                        self._record(node.id, sample, reason)
                    if not failures:
                        admitted.add(commit_key)
                        if node.id in self.holdings:
                            self._publish_holdings(node.id)
        except TimeoutError:
            _log.warning(
                "node %s: admission unfinished after %.0f s; the rest waits for the next round",
                node.id,
                config.admission_timeout_s,
            )
        # The first pass over a node publishes once it ends: until then the node serves nothing,
        # rather than whichever of its commits happened to be checked first.
        self._publish_holdings(node.id)
        if pending:
            _log.info(
                "node %s: %d of %d new commits admitted in %.2f s",
                node.id,
                sum(1 for c in pending if c in admitted),
                len(pending),
                time.monotonic() - started,
            )

    def _publish_holdings(self, node_id: str) -> None:
        """Publish what routing may read of the node's manifest: its admitted commits."""
        manifest = self._manifests[node_id]
        view = (
            admitted_view(manifest, self._admitted.get(node_id, set()))
            if self._config.admission
            else manifest
        )
        previous = self.holdings.get(node_id)
        self.holdings[node_id] = view
        if previous is None or previous.commits != view.commits or previous.refs != view.refs:
            self.version += 1

    def _adopt(self, holdings: NodeHoldings) -> None:
        node_id = holdings.node_id
        previous = self._manifests.get(node_id)
        self._manifests[node_id] = holdings
        # A commit the node stops listing must pass admission again if it comes back.
        admitted = self._admitted.get(node_id)
        if admitted is not None:
            admitted.intersection_update(
                (*key, commit)
                for key, by_commit in holdings.commits.items()
                for commit in by_commit
            )
        if node_id in self.holdings or not self._config.admission:
            self._publish_holdings(node_id)
        changed = (
            previous is None
            or previous.commits != holdings.commits
            or previous.refs != holdings.refs
        )
        if changed:
            _log.info(
                "node %s: manifest lists %d commits of %d repositories",
                node_id,
                sum(len(c) for c in holdings.commits.values()),
                len(holdings.commits),
            )
        # Failures of files the node no longer lists are moot: requests for them cannot go there.
        failures = self._failed_files.get(node_id, {})
        for commit_key, paths in list(failures.items()):
            listed = holdings.commits.get(commit_key[:2], _NO_COMMITS).get(commit_key[2])
            for path in [p for p in paths if listed is None or p not in listed.files]:
                del paths[path]
                changed = True
            if not paths:
                del failures[commit_key]
        if changed:
            self._publish_failures(node_id)

    def _retry_samples(self, node_id: str, count: int) -> list[Sample]:
        failing = sorted(
            (*commit_key, path)
            for commit_key, paths in self._failed_files.get(node_id, {}).items()
            for path in paths
        )
        return self._rng.sample(failing, min(count, len(failing)))

    def _record(self, node_id: str, sample: Sample, reason: str) -> None:
        commit_key: CommitKey = sample[:3]
        paths = self._failed_files.setdefault(node_id, {}).setdefault(commit_key, {})
        if paths.get(sample[3]) == reason:
            return
        repo_type, repo_id, commit, _ = sample
        _log.warning(
            "node %s: excluded for commit %s of %s: %s",
            node_id,
            _short(commit),
            repo_label((repo_type, repo_id)),
            reason,
        )
        paths[sample[3]] = reason
        self._publish_failures(node_id)

    def _clear(self, node_id: str, sample: Sample) -> None:
        commit_key: CommitKey = sample[:3]
        paths = self._failed_files.get(node_id, {}).get(commit_key)
        if paths is None or sample[3] not in paths:
            return
        del paths[sample[3]]
        if not paths:
            del self._failed_files[node_id][commit_key]
        _log.info("node %s: %s verifies again", node_id, _describe(sample))
        self._publish_failures(node_id)

    def _publish_failures(self, node_id: str) -> None:
        """Rebuild the node's ``failed`` view (a new dict: readers never see it half-built)."""
        failed: dict[CommitKey, str] = {}
        for commit_key, paths in self._failed_files.get(node_id, {}).items():
            first = next(iter(paths.values()))
            more = len(paths) - 1
            failed[commit_key] = first + (f" (and {more} more files)" if more else "")
        self.failed[node_id] = failed
        self.version += 1
