"""Metalink 4 (RFC 5854) answers and RFC 6249 links: every source a client may take a file from.

A resolve request gets a Metalink instead of a redirect when it asks for one: by appending
``.meta4`` to the file's path (when the repository has the file and no file of the suffixed
name), or by an ``Accept`` that weighs ``application/metalink4+xml`` above everything else it
names (aria2's default header only lists it beside ``*/*``, and gets the redirect). The
Metalink names the sources the client's route allows: the nodes the policy accepted for it, best
first, or upstream when no node may serve it (a client routed to nodes is never sent upstream
for pieces), with the file's size, sha256 and, when a node publishes them, piece hashes: a
client such as aria2 then takes pieces from several nodes and fetches a bad piece again from
another one. Redirects carry a few of the same sources as ``Link: rel=duplicate`` and point at
the Metalink with ``rel=describedby``. All of it comes from the one routing ``Plan``, so a node
the policy excluded (down, draining, lagging, failing verification...) is never named. Private
and gated files never get here: they are upstream's alone.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from typing import NamedTuple

from aiohttp import web

from gateway.config import NodeConfig
from gateway.hf.catalog import FileMeta
from gateway.hf.paths import FileRef, resolve_path_for
from gateway.hf.targets import node_url, upstream_url
from gateway.routing.router import PRIVATE_CACHE_CONTROL
from gateway.runtime import Runtime
from gateway.state.manifest import Pieces
from gateway.web.plan import Plan, revision_of

METALINK_TYPE = "application/metalink4+xml"
METALINK_SUFFIX = ".meta4"
#: Both Metalink versions' media types: neither competes with the other in ``Accept``.
_METALINK_TYPES = frozenset({METALINK_TYPE, "application/metalink+xml"})
NAMESPACE = "urn:ietf:params:xml:ns:metalink"


class Source(NamedTuple):
    """A tuple rather than a dataclass: redirects build several per request."""

    url: str
    #: 1 is best; the same number in the Metalink and in ``Link: pri``.
    priority: int
    #: Lower-case ISO 3166-1 alpha-2 code of the node's country; None for upstream.
    location: str | None
    #: None for upstream.
    node_id: str | None


# --------------------------------------------------------------------------- negotiation


def _media_ranges(accept: str) -> list[tuple[str, float]]:
    ranges = []
    for item in accept.split(","):
        media, *params = item.split(";")
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = math.nan
        # A malformed weight makes the range mean nothing rather than everything.
        if math.isfinite(quality):
            ranges.append((media.strip().lower(), min(max(quality, 0.0), 1.0)))
    return ranges


def _quality(ranges: Sequence[tuple[str, float]], offer: str) -> float:
    """The weight of the most specific range matching ``offer`` (RFC 9110 12.5.1)."""
    kind = offer.partition("/")[0]
    by_specificity = {offer: 3, f"{kind}/*": 2, "*/*": 1}
    best, quality = 0, 0.0
    for media, weight in ranges:
        specificity = by_specificity.get(media, 0)
        if specificity > best:
            best, quality = specificity, weight
    return quality


def preferred_type(accept: str | None, offers: Sequence[str]) -> str | None:
    """The offer ``accept`` weighs highest (the earlier offer on a tie), None if it takes none.

    No header accepts anything, so the first offer is the default.
    """
    if accept is None or not accept.strip():
        return offers[0]
    ranges = _media_ranges(accept)
    best, best_quality = None, 0.0
    for offer in offers:
        quality = _quality(ranges, offer)
        if quality > best_quality:
            best, best_quality = offer, quality
    return best


def wants_metalink(accept: str | None) -> bool:
    """Whether ``accept`` prefers the Metalink type to everything else it names.

    A tie is not a preference: aria2 sends ``*/*,application/metalink4+xml,...`` on every
    request, also when it cannot use a Metalink (``--follow-metalink=false``, ``-o NAME``), and
    would save the document under the file's name; so it gets the redirect. Metalink 3
    (``application/metalink+xml``) is neither served nor counted against version 4.
    """
    # The substring test spares the parse for nearly every request, which never mentions it.
    if accept is None or "metalink4" not in accept.lower():
        return False
    ranges = _media_ranges(accept)
    named = max((weight for media, weight in ranges if media == METALINK_TYPE), default=0.0)
    others = (w for media, w in ranges if media not in _METALINK_TYPES)
    return named > 0 and named > max(others, default=0.0)


async def metalink_target(
    runtime: Runtime, ref: FileRef, accept: str | None
) -> tuple[FileRef, bool]:
    """The file a resolve request is about, and whether it asks for the file's Metalink.

    Raises ``CatalogError`` as ``plan_route`` does; only a ``.meta4`` name needs the catalog.
    """
    if ref.filename.endswith(METALINK_SUFFIX):
        revision = await revision_of(runtime, ref)
        described = ref._replace(filename=ref.filename.removesuffix(METALINK_SUFFIX))
        # Private and gated files are upstream's alone (and their listing is not ours to read);
        # a repository's own ``.meta4`` file is served like any other file.
        if (
            not revision.upstream_only
            and ref.filename not in revision.files
            and described.filename in revision.files
        ):
            return described, True
    return ref, wants_metalink(accept)


# --------------------------------------------------------------------------- sources


def _listing(runtime: Runtime, plan: Plan, commit: str) -> Mapping[str, FileMeta] | None:
    """The catalog's files at ``commit`` when in memory (always so for the plan's commits)."""
    if commit == plan.revision.commit:
        return plan.revision.files
    known = runtime.catalog.peek(plan.ref.repo_type, plan.ref.repo_id, commit)
    return None if known is None else known.files


def _same_file(runtime: Runtime, plan: Plan, commit: str) -> bool:
    """Whether ``commit`` has the bytes the plan serves: with bounded freshness, nodes may serve
    other commits of a moving ref, and only those where the file is unchanged are its sources."""
    if commit == plan.route.revision:
        return True
    listing = _listing(runtime, plan, commit)
    return listing is not None and listing.get(plan.ref.filename) == plan.meta


#: RFC 5854's lowest priority: upstream is the source of last resort.
UPSTREAM_PRIORITY = 999999


def _node_sources(runtime: Runtime, plan: Plan, skip: str | None = None) -> Iterator[Source]:
    """The nodes the policy accepted, best first, each at the commit it serves, but the node
    ``skip`` (which keeps its priority); lazily, so a redirect naming a few builds only those."""
    ref = plan.ref
    # Per commit, the file there and its resolve path, which every node's URL extends.
    at_commit: dict[str, tuple[FileRef, str]] = {}
    priority = 0
    decision = plan.route.decision
    # A node taken as the last resort (every node at capacity) is the decision's only one.
    nodes = [c.node for c in decision.candidates] or [n for n in (decision.node,) if n]
    for node in nodes:
        commit = plan.node_revisions.get(node.id, plan.revision.commit)
        if not _same_file(runtime, plan, commit):
            continue
        priority += 1
        if node.id == skip:
            continue
        target = at_commit.get(commit)
        if target is None:
            pinned = ref.with_revision(commit)
            target = at_commit[commit] = (pinned, resolve_path_for(pinned))
        yield Source(node_url(node, *target), priority, _location(node), node.id)


def _location(node: NodeConfig) -> str | None:
    return node.country.lower() if node.country else None


def _upstream_source(runtime: Runtime, plan: Plan) -> Source:
    url = upstream_url(
        runtime.router.config.upstream.url, plan.ref.with_revision(plan.route.revision)
    )
    # Upstream always ranks last, whatever number of nodes a redirect had weighed.
    return Source(url, UPSTREAM_PRIORITY, None, None)


def sources(runtime: Runtime, plan: Plan) -> list[Source]:
    """Where the client's route allows it to fetch the file: the nodes the policy accepted,
    best first, each at the commit it serves; upstream only when no node may serve it."""
    if plan.route.decision.node is None:
        return [_upstream_source(runtime, plan)]
    return list(_node_sources(runtime, plan))


def _listed(runtime: Runtime, plan: Plan) -> Iterator[tuple[str, Pieces | None]]:
    """(sha256, pieces) of the file as node manifests list it at the plan's commit: nodes the
    policy accepted first, then nodes whose copy did not fail verification, then the rest.

    Entries that disagree with the catalog's size (or an LFS file's sha256) are skipped.
    """
    ref, meta, commit = plan.ref, plan.meta, plan.route.revision
    key = (ref.repo_type, ref.repo_id)
    tracker = runtime.sync
    ranked = [c.node.id for c in plan.route.decision.candidates]
    rest = sorted(
        tracker.holdings.keys() - set(ranked),
        key=lambda node_id: ((*key, commit) in tracker.failed_for(node_id), node_id),
    )
    for node_id in [*ranked, *rest]:
        holdings = tracker.holdings.get(node_id)
        holding = holdings.commits.get(key, {}).get(commit) if holdings is not None else None
        if holding is None or ref.filename not in holding.files:
            continue
        size, sha256 = holding.files[ref.filename]
        if size == meta.size and (sha256 == meta.etag or not meta.lfs):
            yield sha256, holding.pieces.get(ref.filename)


def published_hashes(runtime: Runtime, plan: Plan) -> tuple[str | None, Pieces | None]:
    """The file's sha256, and piece hashes whose pieces make up that sha256, if known.

    An LFS file's etag is its sha256; a plain git file's etag is a git blob sha1, so its sha256
    can only come from a node manifest. Bad piece hashes cannot slip a bad file past a client:
    it checks the whole file's sha256 as well.
    """
    listed = list(_listed(runtime, plan))
    sha256 = plan.meta.etag if plan.meta.lfs else next((sha for sha, _ in listed), None)
    pieces = next((p for sha, p in listed if sha == sha256 and p is not None), None)
    return sha256, pieces


# --------------------------------------------------------------------------- answers


def metalink_document(
    name: str,
    size: int,
    sha256: str | None,
    pieces: Pieces | None,
    file_sources: Sequence[Source],
) -> bytes:
    """A Metalink 4 document for one file; ``name`` is its path, the client's local name."""
    # The namespace as a plain attribute: ElementTree's default_namespace would want the
    # attributes (which take no namespace in Metalink) qualified too.
    root = ET.Element("metalink", xmlns=NAMESPACE)
    entry = ET.SubElement(root, "file", name=name)
    ET.SubElement(entry, "size").text = str(size)
    if sha256 is not None:
        ET.SubElement(entry, "hash", type="sha-256").text = sha256
    if pieces is not None:
        listing = ET.SubElement(entry, "pieces", length=str(pieces.length), type="sha-256")
        for piece in pieces.sha256:
            ET.SubElement(listing, "hash").text = piece
    for source in file_sources:
        attributes = {"priority": str(source.priority)}
        if source.location is not None:
            attributes["location"] = source.location
        ET.SubElement(entry, "url", attributes).text = source.url
    document: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return document


def metalink_response(runtime: Runtime, plan: Plan) -> web.Response:
    sha256, pieces = published_hashes(runtime, plan)
    body = metalink_document(
        plan.ref.filename, plan.meta.size, sha256, pieces, sources(runtime, plan)
    )
    # Which nodes it lists depends on the client's address, like a redirect.
    return web.Response(
        body=body, content_type=METALINK_TYPE, headers={"Cache-Control": PRIVATE_CACHE_CONTROL}
    )


def _describedby_link(pinned: FileRef) -> str:
    # A path-absolute reference: the gateway's own origin, whatever name the client used.
    return f'<{resolve_path_for(pinned)}{METALINK_SUFFIX}>; rel=describedby; type="{METALINK_TYPE}"'


def links_metalink(listing: Mapping[str, FileMeta] | None, filename: str) -> bool:
    """Whether a redirect links the file's Metalink: not when the repository's files at the
    routed commit are unknown, or hold a file of the Metalink's name (which it would hide)."""
    return listing is not None and filename + METALINK_SUFFIX not in listing


def link_header(runtime: Runtime, plan: Plan, limit: int) -> str | None:
    """RFC 6249 links for a redirect: up to ``limit`` other nodes the Metalink names (never
    upstream, which a client routed to a node is not sent to) and the Metalink, or None when
    there is nothing."""
    route, ref = plan.route, plan.ref
    links = []
    chosen = route.decision.node
    if chosen is not None and limit > 0:
        for source in islice(_node_sources(runtime, plan, skip=chosen.id), limit):
            links.append(_duplicate(source.url, source.priority, source.location))
    if links_metalink(_listing(runtime, plan, route.revision), ref.filename):
        links.append(_describedby_link(ref.with_revision(route.revision)))
    return ", ".join(links) or None


def _duplicate(url: str, priority: int, location: str | None) -> str:
    geo = f"; geo={location}" if location else ""
    return f"<{url}>; rel=duplicate; pri={priority}{geo}"
