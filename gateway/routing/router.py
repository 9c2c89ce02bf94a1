"""The router: client address -> location -> the rule's decision -> redirect URL.

Shared by the redirect handlers, explain and Metalink, so all of them always agree. A
``Router`` is built once per config (start or reload). It caches what the rule reads, keyed by
validated values and bounded in entries: each client address's location, and per location cell
its ranking (``ranking``, configuration only) and its priced candidates under one version of
the live state (``rule.score_level``). An entry scored under an older version is never used: a
request that finds one scores the cell itself, and ``rescore_stale`` (run by a background task
whenever the live state changes) scores the cells in use again, most recently used first, so
that requests rarely have to. The decision itself (which node, for which file) is made per
request and never cached.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from typing import NamedTuple, Protocol

from gateway.config import GatewayConfig, NodeConfig
from gateway.geo.clientip import ClientAddress, ClientIPResolver, ForwardingHeaders
from gateway.geo.locator import UNKNOWN_LOCATION, GeoLocator, Location, country_location
from gateway.hf.paths import FileRef
from gateway.hf.targets import node_url, upstream_url
from gateway.lru import LRUCache
from gateway.routing.ranking import Cell, NodeIndex, Ranking
from gateway.routing.rule import LEVELS, Decision, Scored, decide, score_level
from gateway.state.live import NO_LIVE_STATE, NodeStatuses

PRIVATE_CACHE_CONTROL = "private, no-store"
#: Nodes the rankings and scored candidates of all cached location cells hold together (GeoIP
#: answers repeat per city, so cells do too). A cell holds at most ``ranking.FRONT`` nodes per
#: level at first, more once its ranking was widened; each node kept costs about 200 bytes,
#: so the cache stays near 100 MiB at most whatever the node count.
RANKED_NODES = 500_000
#: How much wider a cell's ranking gets each time the rule could not decide from it.
WIDEN = 4
#: Client addresses whose location is kept (about 400 bytes each, so 26 MiB at most).
LOCATED_CLIENTS = 65_536


class RevisionCheck(Protocol):
    """Which nodes hold the requested revision; asked per node, only of nodes that matter."""

    def reason(self, node: NodeConfig) -> str | None:
        """Why ``node`` cannot serve the revision, or None if it can."""

    def revision_for(self, node_id: str) -> str | None:
        """Another commit ``node_id`` would serve (bounded freshness); asked after ``reason``."""

    def __contains__(self, node_id: object) -> bool:
        """Whether cache node ``node_id`` already holds the file."""


class _EveryRevision:
    """No revision knowledge: every node holds everything (the explain CLI, tests)."""

    def reason(self, node: NodeConfig) -> str | None:
        return None

    def revision_for(self, node_id: str) -> str | None:
        return None

    def __contains__(self, node_id: object) -> bool:
        return False


ALL_REVISIONS: RevisionCheck = _EveryRevision()


class Placement(NamedTuple):
    """Who a request's client is, where, and the routing cell it falls in."""

    client: ClientAddress
    location: Location
    #: Whether the location came from the CDN country header alone (``Router.locate``).
    from_cdn_only: bool
    cell: Cell


class _CellEntry:
    """A cell's ranking, and its candidates scored under live-state version ``version``."""

    __slots__ = ("ranking", "scored", "version")

    def __init__(self, ranking: Ranking) -> None:
        self.ranking = ranking
        self.version = -1
        self.scored: Scored = ()

    def size(self) -> int:
        """Its weight in the cells' cache: the nodes it keeps."""
        return self.ranking.size


class Route(NamedTuple):
    client: ClientAddress
    location: Location
    decision: Decision
    url: str
    #: The revision the redirect names: the commit the chosen node (or upstream) serves.
    revision: str
    #: True only when the answer depends on nothing but the path and the CDN country header.
    shared_cacheable: bool


def route_key(ref: FileRef) -> str:
    """What a caches' group picks its cache by (rendezvous): the file at the commit served."""
    return f"{ref.repo_type}/{ref.repo_id}/{ref.revision}/{ref.filename}"


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
        #: The chosen node and the duplicates a redirect names.
        self._sources_named = config.responses.duplicate_links + 1
        self._cells: LRUCache[Cell, _CellEntry] = LRUCache(RANKED_NODES, _CellEntry.size)
        self._placements: LRUCache[ClientAddress, Placement] = LRUCache(LOCATED_CLIENTS)

    def place(self, peer: str | None, headers: ForwardingHeaders) -> Placement:
        """The client behind the TCP ``peer`` (``ClientIPResolver.resolve``), located, with its
        routing cell."""
        return self.placement(self.resolver.resolve(peer, headers))

    def placement(self, client: ClientAddress) -> Placement:
        placed = self._placements.get(client)
        if placed is None:
            location, from_cdn_only = self.locate(client)
            placed = Placement(client, location, from_cdn_only, self._index.cell(location))
            self._placements.put(client, placed)
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

    def _cell(self, cell: Cell) -> _CellEntry:
        entry = self._cells.get(cell)
        if entry is None:
            ranking = self._index.ranking(cell, self.config.routing)
            entry = self._cells.put(cell, _CellEntry(ranking))
        return entry

    def _score(self, entry: _CellEntry, statuses: NodeStatuses, version: int) -> Scored:
        ranking, policy = entry.ranking, self.config.routing
        scored = tuple(
            score_level(level, front, ranking.cell, statuses, policy, reach=reach)
            for level, front, reach in zip(LEVELS, ranking.fronts, ranking.reaches, strict=True)
        )
        entry.scored, entry.version = scored, version
        return scored

    def scored(self, cell: Cell, statuses: NodeStatuses, version: int | None) -> Scored:
        """The cell's candidates under ``statuses``, from the cache when they were scored under
        live-state ``version`` (None: statuses that have no version; nothing is kept)."""
        entry = self._cell(cell)
        if version is not None and entry.version == version:
            return entry.scored
        return self._score(entry, statuses, -1 if version is None else version)

    def stale_cells(self, version: int) -> list[Cell]:
        """The cached cells not scored under ``version``, most recently used first."""
        return [cell for cell, entry in self._cells.newest_first() if entry.version != version]

    def rescore(self, cell: Cell, statuses: NodeStatuses, version: int) -> None:
        """Score a cached cell again under live-state ``version`` (a cell no longer cached is
        left alone)."""
        entry = self._cells.peek(cell)
        if entry is not None and entry.version != version:
            self._score(entry, statuses, version)

    def route(
        self,
        ref: FileRef,
        placement: Placement,
        statuses: NodeStatuses = NO_LIVE_STATE,
        recent: Mapping[str, int] | None = None,
        revisions: RevisionCheck = ALL_REVISIONS,
        *,
        version: int | None = None,
        explain: bool = False,
    ) -> Route:
        """Route one request for ``ref`` (pinned to upstream's commit when known).

        ``statuses`` is the live state, ``version`` its version (``LiveState.version``) when it
        has one; ``recent`` counts redirects per node for cache balancing; ``revisions`` says
        which nodes can serve this revision, which serve another commit of it, which caches
        hold it. ``explain`` scores every node and lists every exclusion, as explain shows.
        """
        routing = self.config.routing
        choice = partial(
            decide, policy=routing, rng=self._rng, unavailable=revisions.reason,
            key=route_key(ref), recent=recent, warm_caches=revisions, keep=self._sources_named,
        )  # fmt: skip
        decision: Decision | None
        if explain:
            levels, configured = self._index.explained(placement.location, routing)
            excluded = [*configured]
            decision = choice(
                [
                    score_level(level, nodes, placement.location, statuses, routing,
                                excluded=excluded)
                    for level, nodes in zip(LEVELS, levels, strict=True)
                ],
                excluded=excluded,
            )  # fmt: skip
            assert decision is not None  # levels listed whole always tell
        else:
            decision = choice(self.scored(placement.cell, statuses, version))
            while decision is None:
                decision = choice(self._widen(placement.cell, statuses, version))
        client, location = placement.client, placement.location
        if decision.node is None:
            url = upstream_url(self.config.upstream.url, ref)
            return Route(client, location, decision, url, ref.revision, placement.from_cdn_only)
        revision = revisions.revision_for(decision.node.id) or ref.revision
        pinned = ref if revision == ref.revision else ref.with_revision(revision)
        url = node_url(decision.node, pinned)
        return Route(client, location, decision, url, revision, placement.from_cdn_only)

    def _widen(self, cell: Cell, statuses: NodeStatuses, version: int | None) -> Scored:
        """The cell ranked again with a wider front and scored: for a request ``decide`` could
        not tell from the current one. Once the front holds every node of every level it always
        tells, so a request widens a few times at most, and the cell stays wide."""
        ranking = self._cell(cell).ranking
        wider = self._index.ranking(cell, self.config.routing, ranking.front * WIDEN)
        entry = self._cells.put(cell, _CellEntry(wider))
        return self._score(entry, statuses, -1 if version is None else version)
