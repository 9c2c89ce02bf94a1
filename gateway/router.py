"""The routing pipeline without HTTP: client address -> location -> decision -> redirect URL.

Shared by the request handler and the ``explain`` CLI so both always agree. A ``Router`` is
built once per config (start or reload) and is immutable afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from gateway.clientip import ClientAddress, ClientIPResolver
from gateway.config import GatewayConfig, NodeConfig
from gateway.geo import UNKNOWN_LOCATION, GeoLocator, Location, country_location
from gateway.hfpath import FileRef
from gateway.policy import Decision, Ranked, decide, decide_ranked, rank_nodes
from gateway.state import NO_LIVE_STATE, NodeStatuses
from gateway.targets import node_url, upstream_url

PRIVATE_CACHE_CONTROL = "private, no-store"
#: Client locations whose node ranking is kept (GeoIP results repeat per city or network).
RANKED_LOCATIONS = 8192


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


@dataclass(frozen=True, slots=True)
class Route:
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
        self._ranked_by_location: dict[Location, Ranked] = {}

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

    def _ranked(self, location: Location) -> Ranked:
        ranked = self._ranked_by_location.get(location)
        if ranked is None:
            ranked = rank_nodes(self.config.nodes, location, self.config.routing)
            if len(self._ranked_by_location) >= RANKED_LOCATIONS:
                # Evict the oldest entry; a full rebuild per location is cheap compared to
                # tracking recency on every request.
                del self._ranked_by_location[next(iter(self._ranked_by_location))]
            self._ranked_by_location[location] = ranked
        return ranked

    def route(
        self,
        ref: FileRef,
        client: ClientAddress,
        statuses: NodeStatuses = NO_LIVE_STATE,
        recent: Mapping[str, int] | None = None,
        revisions: RevisionCheck = ALL_REVISIONS,
        *,
        full: bool = False,
    ) -> Route:
        """Route one request for ``ref`` (pinned to upstream's commit when known).

        ``recent`` counts redirects per node for cache balancing; ``revisions`` says which
        nodes can serve this revision, which serve another commit of it, which caches hold
        it. Requests walk only the nodes that can matter; ``full`` evaluates every node, with
        every exclusion, as explain shows them.
        """
        location, from_cdn_only = self.locate(client)
        key = f"{ref.repo_type}/{ref.repo_id}/{ref.revision}/{ref.filename}"
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
            decision = decide_ranked(
                self._ranked(location), statuses, routing, self._rng,
                unavailable=revisions.reason, key=key, recent=recent, warm_caches=revisions,
                keep=self.config.responses.duplicate_links + 1,
            )  # fmt: skip
        if decision.node is None:
            return Route(
                client, location, decision, upstream_url(self.config.upstream.url, ref),
                ref.revision, from_cdn_only,
            )  # fmt: skip
        revision = revisions.revision_for(decision.node.id) or ref.revision
        pinned = ref if revision == ref.revision else ref.with_revision(revision)
        url = node_url(decision.node, pinned)
        return Route(client, location, decision, url, revision, from_cdn_only)
