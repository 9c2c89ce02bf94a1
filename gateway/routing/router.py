"""The router: client address -> location -> the rule's decision -> redirect URL.

Shared by the redirect handlers, explain and Metalink, so all of them always agree. A
``Router`` is built once per config (start or reload) and never changes afterwards; it caches
what the rule reads and does not depend on live state: each client address's location, and
each location cell's ranking (``ranking``). Live state is read per request, so no cached
decision can go stale.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import replace
from typing import NamedTuple, Protocol

from gateway.config import GatewayConfig, NodeConfig
from gateway.geo.clientip import ClientAddress, ClientIPResolver, ForwardingHeaders
from gateway.geo.locator import UNKNOWN_LOCATION, GeoLocator, Location, country_location
from gateway.hf.paths import FileRef
from gateway.hf.targets import node_url, upstream_url
from gateway.lru import LRUCache
from gateway.routing.ranking import Cell, NodeIndex, Ranking
from gateway.routing.rule import Decision, decide
from gateway.state.live import NO_LIVE_STATE, NodeStatuses

PRIVATE_CACHE_CONTROL = "private, no-store"
#: Location cells whose ranking is kept: GeoIP answers repeat per city, and a ranking holds at
#: most ``ranking.FRONT`` nodes per tier (about 5 KiB at 10,000 nodes, so 40 MiB at most).
RANKED_CELLS = 8192
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
        self._rankings: LRUCache[Cell, Ranking] = LRUCache(RANKED_CELLS)
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

    def _ranking(self, cell: Cell) -> Ranking:
        ranking = self._rankings.get(cell)
        if ranking is None:
            ranking = self._rankings.put(cell, self._index.ranking(cell, self.config.routing))
        return ranking

    def route(
        self,
        ref: FileRef,
        placement: Placement,
        statuses: NodeStatuses = NO_LIVE_STATE,
        recent: Mapping[str, int] | None = None,
        revisions: RevisionCheck = ALL_REVISIONS,
        *,
        explain: bool = False,
    ) -> Route:
        """Route one request for ``ref`` (pinned to upstream's commit when known).

        ``recent`` counts redirects per node for cache balancing; ``revisions`` says which
        nodes can serve this revision, which serve another commit of it, which caches hold
        it. ``explain`` reads every node and lists every exclusion, as explain shows them.
        """
        routing = self.config.routing
        if explain:
            tiers, configured = self._index.explained(placement.location, routing)
        else:
            tiers, configured = self._ranking(placement.cell).tiers(), []
        decision = decide(
            tiers, statuses, routing, self._rng,
            unavailable=revisions.reason, key=route_key(ref), recent=recent,
            warm_caches=revisions, keep=self._sources_named, explain=explain,
            configured=configured,
        )  # fmt: skip
        client, location = placement.client, placement.location
        if decision.node is None:
            url = upstream_url(self.config.upstream.url, ref)
            return Route(client, location, decision, url, ref.revision, placement.from_cdn_only)
        revision = revisions.revision_for(decision.node.id) or ref.revision
        pinned = ref if revision == ref.revision else ref.with_revision(revision)
        url = node_url(decision.node, pinned)
        return Route(client, location, decision, url, revision, placement.from_cdn_only)
