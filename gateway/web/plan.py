"""One request's plan: catalog lookup, which nodes hold the revision, the route, the file.

Shared by the redirect handler, the fast path, explain and Metalink, so all of them always
agree. Reads only memory on the common path; awaits the catalog only for a revision it does not
hold yet.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import NamedTuple

from gateway.config import CredentialedRoute
from gateway.hf.catalog import FileMeta, RepoRevision, entry_for
from gateway.hf.paths import FileRef
from gateway.routing.router import Placement, Route
from gateway.runtime import Runtime
from gateway.web.credentials import CredentialedRevisions


class UpstreamOnly(Exception):
    """Private or gated: only upstream, with the client's token, may serve the file."""


class Plan(NamedTuple):
    #: The file as requested (a ref or a commit).
    ref: FileRef
    #: What upstream says the requested revision is.
    revision: RepoRevision
    route: Route
    #: The file at the commit the route serves.
    meta: FileMeta
    #: Nodes that would serve another commit than upstream's (bounded freshness).
    node_revisions: Mapping[str, str]
    #: Time the routing decision itself took (filter, score, choose).
    decision_seconds: float


async def revision_of(runtime: Runtime, ref: FileRef) -> RepoRevision:
    """The catalog entry, from memory when it is there (no await on the common path)."""
    catalog = runtime.catalog
    known = catalog.peek(ref.repo_type, ref.repo_id, ref.revision)
    if known is not None:
        return known
    return await catalog.get(ref.repo_type, ref.repo_id, ref.revision)


def _routed(
    runtime: Runtime,
    ref: FileRef,
    revision: RepoRevision,
    placement: Placement,
    now: float | None,
    explain: bool,
    credentials: CredentialedRoute | None = None,
) -> tuple[Route, FileMeta, Mapping[str, str], float]:
    """The route for a revision in hand, the file's entry at the upstream commit, the nodes'
    other commits and the decision time. Raises ``UpstreamOnly`` and ``CatalogError``.

    ``credentials``: the request carries credentials, routed as this setting allows."""
    if revision.upstream_only:
        raise UpstreamOnly
    meta = entry_for(revision, ref.filename)
    pinned = ref.with_revision(revision.commit)
    revisions = runtime.sync.revision_check(
        pinned, ref.revision, time.time() if now is None else now
    )
    check = revisions if credentials is None else CredentialedRevisions(revisions, credentials)
    store = runtime.store
    started = time.perf_counter()
    live = store.live
    route = runtime.router.route(
        pinned, placement, live.statuses, store.redirects.current, check,
        version=live.version, explain=explain,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if not explain:
        runtime.sync.requests.count(ref)
    return route, meta, revisions.other_commits, seconds


async def plan_route(
    runtime: Runtime,
    ref: FileRef,
    placement: Placement,
    *,
    now: float | None = None,
    explain: bool = False,
    credentials: CredentialedRoute | None = None,
) -> Plan:
    """Raises ``CatalogError`` (unknown repo, revision or file; upstream unavailable) and
    ``UpstreamOnly``. ``explain``: weigh every node and keep every exclusion (explain,
    Metalink), not just the nodes a redirect needs. ``credentials``: the request carries
    credentials (``credentials.route`` says where they may go)."""
    revision = await revision_of(runtime, ref)
    route, meta, others, seconds = _routed(
        runtime, ref, revision, placement, now, explain, credentials
    )
    if route.revision != revision.commit:
        older = await revision_of(runtime, ref.with_revision(route.revision))
        meta = entry_for(older, ref.filename)
    return Plan(ref, revision, route, meta, others, seconds)


def plan_from_memory(runtime: Runtime, ref: FileRef, placement: Placement) -> Plan | None:
    """``plan_route`` for a redirect, when every revision it reads is in the catalog's memory;
    None when one is not (``plan_route`` then fetches it). Raises as ``plan_route`` does."""
    catalog = runtime.catalog
    revision = catalog.peek(ref.repo_type, ref.repo_id, ref.revision)
    if revision is None:
        return None
    route, meta, others, seconds = _routed(runtime, ref, revision, placement, None, False)
    if route.revision != revision.commit:
        older = catalog.peek(ref.repo_type, ref.repo_id, route.revision)
        if older is None:
            return None
        meta = entry_for(older, ref.filename)
    return Plan(ref, revision, route, meta, others, seconds)
