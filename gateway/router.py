"""The routing pipeline without HTTP: client address -> location -> decision -> redirect URL.

Shared by the request handler and the ``explain`` CLI so both always agree. A ``Router`` is
built once per config (start or reload) and is immutable afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, replace

from gateway.clientip import ClientAddress, ClientIPResolver
from gateway.config import GatewayConfig
from gateway.geo import UNKNOWN_LOCATION, GeoLocator, Location, country_location
from gateway.hfpath import FileRef
from gateway.policy import Decision, decide
from gateway.state import NO_LIVE_STATE, NodeStatuses
from gateway.targets import node_url, upstream_url

PRIVATE_CACHE_CONTROL = "private, no-store"


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

    def route(
        self,
        ref: FileRef,
        client: ClientAddress,
        statuses: NodeStatuses = NO_LIVE_STATE,
        recent: Mapping[str, int] | None = None,
        unavailable: Mapping[str, str] | None = None,
        node_revisions: Mapping[str, str] | None = None,
        warm_caches: frozenset[str] = frozenset(),
    ) -> Route:
        """Route one request for ``ref`` (pinned to upstream's commit when known).

        ``recent`` counts redirects per node for cache balancing; ``unavailable`` names nodes
        that cannot serve this revision and why; ``node_revisions`` names nodes that would
        serve another commit than ``ref.revision`` (bounded freshness); ``warm_caches`` names
        cache nodes that already hold the file.
        """
        location, from_cdn_only = self.locate(client)
        decision = decide(
            self.config.nodes,
            location,
            statuses,
            self.config.routing,
            self._rng,
            key=f"{ref.repo_type}/{ref.repo_id}/{ref.revision}/{ref.filename}",
            recent=recent,
            unavailable=unavailable,
            warm_caches=warm_caches,
        )
        if decision.node is None:
            return Route(
                client, location, decision, upstream_url(self.config.upstream.url, ref),
                ref.revision, from_cdn_only,
            )  # fmt: skip
        revision = (node_revisions or {}).get(decision.node.id, ref.revision)
        pinned = ref if revision == ref.revision else ref.with_revision(revision)
        url = node_url(decision.node, pinned)
        return Route(client, location, decision, url, revision, from_cdn_only)
