"""The routing pipeline without HTTP: client address -> location -> decision -> redirect URL.

Shared by the request handler and the ``explain`` CLI so both always agree. A ``Router`` is
built once per config (start or reload) and is immutable afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import NamedTuple, Protocol

from gateway.clientip import ClientAddress, ClientIPResolver, ForwardingHeaders, worth_remembering
from gateway.config import GatewayConfig, NodeConfig
from gateway.geo import UNKNOWN_LOCATION, GeoLocator, Location, country_location
from gateway.hfpath import FileRef
from gateway.memo import BoundedMemo
from gateway.policy import (
    Cell,
    Decision,
    NodeIndex,
    Prepared,
    Ranked,
    Tier,
    after_change,
    decide,
    decide_prepared,
    decide_ranked,
    deepen,
    prepare,
    rank_nodes,
    rank_rest,
    settled_decision,
)
from gateway.state import NO_LIVE_STATE, NODE_ASSUMED_UP, NodeStatus, NodeStatuses
from gateway.targets import node_url, upstream_url

PRIVATE_CACHE_CONTROL = "private, no-store"
#: Routing cells whose ranking is kept (GeoIP results repeat per city).
RANKED_CELLS = 8192
#: Nodes per tier a cell's ranking first keeps. A request's walk stops within a few nodes of
#: a tier (at the median 11, at the 90th percentile 22 in the benchmark's 10,000-node world)
#: unless the near-equal pool is larger or most of the nearest nodes are down or lack the
#: revision. Keeping a front rather than every node bounds the memory of a ranking whatever
#: the node count: about 5 KiB there, against 1.3 MiB for all of them.
FRONT = 32
FIRST_FRONTS: tuple[int | None, ...] = (FRONT,) * len(Tier)
#: Deepest a kept tier gets. A walk past a tier's front doubles it in the kept ranking, as a
#: cell whose near-equal pool is large needs that depth on every request. Past this, walks
#: rank the rest of the tier per request, measuring only the nodes they could admit: what a
#: tier so deep is walked for is mostly nodes without the revision.
MAX_FRONT = 256
#: Candidates per tier a preparation lists beyond those a redirect names: how many of the
#: best nodes may lack a file before a request walks the ranking itself.
PREPARED_SLACK = 8
#: Distinct (peer, forwarding headers) inputs whose placement is remembered: one per client
#: behind a proxy.
PLACEMENTS = 65_536
#: Changed nodes past which every preparation is dropped at once, rather than each one found
#: through the nodes it read and checked (``after_change``). Checking costs about a microsecond
#: per (node, reader), preparing again 0.1-0.3 ms per cell: a redirect window that changes a
#: few hundred of 10,000 nodes still keeps a third of the cells.
FORGET_ALL_AT = 2048


class LackCheck(Protocol):
    """Which nodes may lack some file: the same for every file."""

    @property
    def may_lack_version(self) -> int:
        """Changes whenever ``may_lack`` may answer differently."""

    def may_lack(self, node: NodeConfig) -> bool:
        """Whether a revision check may name a reason for ``node`` for some file: the same for
        every file, as long as ``may_lack_version`` stays the same."""


class RevisionCheck(LackCheck, Protocol):
    """Which nodes hold the requested revision; asked per node, only of nodes that matter."""

    def reason(self, node: NodeConfig) -> str | None:
        """Why ``node`` cannot serve the revision, or None if it can."""

    def revision_for(self, node_id: str) -> str | None:
        """Another commit ``node_id`` would serve (bounded freshness); asked after ``reason``."""

    def __contains__(self, node_id: object) -> bool:
        """Whether cache node ``node_id`` already holds the file."""


class _EveryRevision:
    """No revision knowledge: every node holds everything (the explain CLI, tests)."""

    may_lack_version = 0

    def may_lack(self, node: NodeConfig) -> bool:
        return False

    def reason(self, node: NodeConfig) -> str | None:
        return None

    def revision_for(self, node_id: str) -> str | None:
        return None

    def __contains__(self, node_id: object) -> bool:
        return False


ALL_REVISIONS: RevisionCheck = _EveryRevision()


class ChangeLog(Protocol):
    """Where a request's node statuses come from: which nodes changed since when."""

    @property
    def version(self) -> int:
        """Bumped by every status change."""

    def changed_since(self, version: int) -> Sequence[str] | None:
        """The nodes changed after ``version``; None when that is no longer known."""


class Placement(NamedTuple):
    """Who a request's client is, where, and the routing cell it falls in."""

    client: ClientAddress
    location: Location
    #: Whether the location came from the CDN country header alone (``Router.locate``).
    from_cdn_only: bool
    cell: Cell


class Route(NamedTuple):
    client: ClientAddress
    location: Location
    decision: Decision
    url: str
    #: The revision the redirect names: the commit the chosen node (or upstream) serves.
    revision: str
    #: True only when the answer depends on nothing but the path and the CDN country header.
    shared_cacheable: bool


class Router:
    def __init__(
        self, config: GatewayConfig, locator: GeoLocator, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.locator = locator
        self.resolver = ClientIPResolver(config.client_ip)
        self._rng = rng or random.Random()
        self._cdn_geo_mode = config.responses.cache_mode == "cdn-geo"
        self.shared_cache_control = f"public, max-age={config.responses.max_age}"
        self._index = NodeIndex(config.nodes)
        self._ranked_by_cell: dict[Cell, Ranked] = {}
        #: The chosen node and the duplicates a redirect names.
        self._sources_named = config.responses.duplicate_links + 1
        #: Per cell, the walks of the live state as of ``_prepared_version``; and per node,
        #: the cells whose preparation read its status.
        self._prepared: dict[Cell, Prepared] = {}
        self._readers: dict[str, set[Cell]] = {}
        self._prepared_version: int | None = None
        self._prepared_may_lack: int | None = None
        self._placements: BoundedMemo[tuple[str | None, ForwardingHeaders], Placement] = (
            BoundedMemo(PLACEMENTS)
        )

    def place(self, peer: str | None, headers: ForwardingHeaders) -> Placement:
        """The client behind the TCP ``peer`` (``ClientIPResolver.resolve``), located, with its
        cell; remembered, as a client downloading a repository sends the same inputs for every
        file, and under one router they always give the same answer."""
        key = (peer, headers)
        placed = self._placements.get(key)
        if placed is None:
            client = self.resolver.resolve(peer, headers)
            location, from_cdn_only = self.locate(client)
            placed = Placement(client, location, from_cdn_only, self._index.cell(location))
            if worth_remembering(headers):
                self._placements.put(key, placed)
        return placed

    def locate(self, client: ClientAddress) -> tuple[Location, bool]:
        """The client's location, and whether it came from the CDN country header alone."""
        if client.cdn_country is not None:
            from_cdn = country_location(client.cdn_country)
            if from_cdn.known:
                if self._cdn_geo_mode:
                    return from_cdn, True
                from_ip = self._locate_ip(client)
                if from_ip.country == from_cdn.country:
                    return from_ip, False
                # The CDN saw the client; an IP database can be wrong about the country.
                return replace(from_cdn, asn=from_ip.asn, asn_org=from_ip.asn_org), False
        return self._locate_ip(client), False

    def _locate_ip(self, client: ClientAddress) -> Location:
        return UNKNOWN_LOCATION if client.ip is None else self.locator.locate(client.ip)

    def _ranked(self, cell: Cell) -> Ranked:
        ranked = self._ranked_by_cell.get(cell)
        if ranked is None:
            ranked = rank_nodes(self._index, cell, self.config.routing, FIRST_FRONTS)
            _keep(self._ranked_by_cell, RANKED_CELLS, cell, ranked)
        return ranked

    def _rest_of_tier(
        self, cell: Cell, tier: Tier, seen: int, admissible: Callable[[NodeConfig], bool]
    ) -> Iterator[tuple[NodeConfig, float | None]]:
        """The nodes of ``tier`` after the first ``seen``, nearest first (``Deeper``): from the
        kept ranking, its tier deepened as needed up to ``MAX_FRONT``, then ranked per request
        among the nodes ``admissible`` accepts."""
        while True:
            kept = self._ranked(cell)
            nodes = kept.nodes[tier]
            yield from zip(nodes[seen:], kept.distances[tier][seen:], strict=True)
            if not kept.truncated[tier]:
                return
            seen = max(seen, len(nodes))
            if len(nodes) == seen >= MAX_FRONT:
                routing = self.config.routing
                yield from rank_rest(self._index, cell, routing, tier, nodes, admissible)
                return
            # At least as deep as the walk has seen, even if the kept ranking was rebuilt.
            front = max(seen, min(2 * seen, MAX_FRONT))
            deeper = deepen(self._index, kept, cell, self.config.routing, tier, front)
            _keep(self._ranked_by_cell, RANKED_CELLS, cell, deeper)

    def route(
        self,
        ref: FileRef,
        client: ClientAddress,
        statuses: NodeStatuses = NO_LIVE_STATE,
        recent: Mapping[str, int] | None = None,
        revisions: RevisionCheck = ALL_REVISIONS,
        *,
        changes: ChangeLog | None = None,
        full: bool = False,
    ) -> Route:
        """Route one request for ``ref`` (pinned to upstream's commit when known).

        ``recent`` counts redirects per node for cache balancing; ``revisions`` says which
        nodes can serve this revision, which serve another commit of it, which caches hold
        it. Requests walk only the nodes that can matter; ``full`` evaluates every node, with
        every exclusion, as explain shows them. ``changes`` (the source of ``statuses``) lets
        the walks of a cell be prepared once for as long as the nodes they read are unchanged.
        """
        location, from_cdn_only = self.locate(client)
        key = route_key(ref)
        routing = self.config.routing
        if full:
            unavailable = {
                node.id: reason
                for node in self.config.nodes
                if (reason := revisions.reason(node)) is not None
            }
            decision = decide(
                self.config.nodes, location, statuses, routing, self._rng,
                key=key, recent=recent, unavailable=unavailable, warm_caches=revisions,
            )  # fmt: skip
        else:
            cell = self._index.cell(location)
            decision = self._decide(cell, statuses, changes, revisions, key, recent)
        if decision.node is None:
            return Route(
                client, location, decision, upstream_url(self.config.upstream.url, ref),
                ref.revision, from_cdn_only,
            )  # fmt: skip
        revision = revisions.revision_for(decision.node.id) or ref.revision
        pinned = ref if revision == ref.revision else ref.with_revision(revision)
        url = node_url(decision.node, pinned)
        return Route(client, location, decision, url, revision, from_cdn_only)

    def _decide(
        self,
        cell: Cell,
        statuses: NodeStatuses,
        changes: ChangeLog | None,
        revisions: RevisionCheck,
        key: str,
        recent: Mapping[str, int] | None,
    ) -> Decision:
        routing = self.config.routing
        if changes is not None:
            prepared = self._prepared_for(cell, statuses, changes, revisions)
            decision = decide_prepared(
                prepared, routing, self._rng, unavailable=revisions.reason,
                key=key, recent=recent, warm_caches=revisions, keep=self._sources_named,
            )  # fmt: skip
            if decision is not None:
                return decision
        return decide_ranked(
            self._ranked(cell), statuses, routing, self._rng,
            unavailable=revisions.reason, deeper=partial(self._rest_of_tier, cell),
            key=key, recent=recent, warm_caches=revisions, keep=self._sources_named,
        )  # fmt: skip

    def settled(
        self,
        cell: Cell,
        statuses: NodeStatuses,
        changes: ChangeLog,
        lacks: LackCheck,
        *,
        key: str,
        recent: Mapping[str, int] | None,
        warm_caches: Container[str],
    ) -> Decision | None:
        """A redirect's decision for a client in ``cell`` when no node it is chosen among is
        checked per file (``settled_decision``): the same decision ``route`` takes then for the
        file of ``key`` (``route_key``), and the same draw. None when ``route`` must decide."""
        prepared = self._prepared_for(cell, statuses, changes, lacks)
        return settled_decision(
            prepared, self.config.routing, self._rng, key=key, recent=recent,
            warm_caches=warm_caches, keep=self._sources_named,
        )  # fmt: skip

    def _prepared_for(
        self, cell: Cell, statuses: NodeStatuses, changes: ChangeLog, lacks: LackCheck
    ) -> Prepared:
        self._forget_changed(changes, statuses)
        if lacks.may_lack_version != self._prepared_may_lack:
            # Which nodes are checked per file is part of every preparation.
            self._prepared_may_lack = lacks.may_lack_version
            self._forget_all()
        prepared = self._prepared.get(cell)
        if prepared is None:
            prepared = prepare(
                self._ranked(cell), statuses, self.config.routing,
                partial(self._rest_of_tier, cell), lacks.may_lack,
                self._sources_named + PREPARED_SLACK,
            )  # fmt: skip
            if len(self._prepared) >= RANKED_CELLS:
                self._forget(next(iter(self._prepared)))
            self._prepared[cell] = prepared
            for node_id in prepared.looked_at:
                self._readers.setdefault(node_id, set()).add(cell)
        return prepared

    def _forget_changed(self, changes: ChangeLog, statuses: NodeStatuses) -> None:
        """Drop the preparations that read a node changed since they were made, unless they
        hold under the new statuses, as they are or put in order again (``after_change``)."""
        version, seen = changes.version, self._prepared_version
        if version == seen:
            return
        changed = None if seen is None else changes.changed_since(seen)
        self._prepared_version = version
        nodes = set(changed) if changed is not None else None
        if nodes is None or len(nodes) > FORGET_ALL_AT:
            self._forget_all()
            return
        # Per cell, every change it read at once: a cell read by several changed nodes is
        # put in order once.
        changed_in: dict[Cell, dict[str, NodeStatus]] = {}
        for node_id in nodes:
            status = statuses.get(node_id, NODE_ASSUMED_UP)
            for cell in self._readers.get(node_id, ()):
                changed_in.setdefault(cell, {})[node_id] = status
        policy = self.config.routing
        for cell, read in changed_in.items():
            prepared = self._prepared[cell]
            again = after_change(prepared, read, policy)
            if again is None:
                self._forget(cell)
            elif again is not prepared:
                self._prepared[cell] = again  # it read the same nodes

    def _forget_all(self) -> None:
        self._prepared.clear()
        self._readers.clear()

    def _forget(self, cell: Cell) -> None:
        prepared = self._prepared.pop(cell, None)
        if prepared is None:
            return
        for node_id in prepared.looked_at:
            readers = self._readers.get(node_id)
            if readers is not None:
                readers.discard(cell)
                if not readers:
                    del self._readers[node_id]


def route_key(ref: FileRef) -> str:
    """What a caches' group picks its cache by (rendezvous): the file at the commit served."""
    return f"{ref.repo_type}/{ref.repo_id}/{ref.revision}/{ref.filename}"


def _keep(cache: dict[Cell, Ranked], size: int, cell: Cell, ranked: Ranked) -> None:
    if cell not in cache and len(cache) >= size:
        # Evict the oldest entry; a rebuild per cell is cheap compared to tracking recency on
        # every request.
        del cache[next(iter(cache))]
    cache[cell] = ranked
