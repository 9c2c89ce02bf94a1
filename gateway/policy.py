"""Routing policy: which node serves a client, and why every other node does not.

Pure functions over plain data. ``filter_nodes`` splits the configured nodes into accepted
candidates and exclusions, each exclusion carrying a machine reason (bounded, usable as a metric
label) and a human detail; ``choose`` prefers the closest tier (same ASN, same country, same
continent, anywhere), then distance, then weight among near-equals using the RNG it is given, so
tests can make it deterministic. No candidate means upstream.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

from gateway.config import TIER_ORDER, NodeConfig, RoutingConfig
from gateway.geo import Location
from gateway.state import NODE_ASSUMED_UP, NodeStatuses


class Tier(IntEnum):
    ASN = 0
    COUNTRY = 1
    CONTINENT = 2
    ANY = 3

    @property
    def config_name(self) -> str:
        return TIER_ORDER[self]


ExclusionReason = Literal[
    "disabled", "admin_disabled", "outside_service_area", "beyond_max_tier", "down", "draining"
]
ChoiceReason = Literal["same_asn", "same_country", "same_continent", "nearest", "no_eligible_node"]

_TIER_REASON: dict[Tier, ChoiceReason] = {
    Tier.ASN: "same_asn",
    Tier.COUNTRY: "same_country",
    Tier.CONTINENT: "same_continent",
    Tier.ANY: "nearest",
}

EARTH_RADIUS_KM = 6371.0


@dataclass(frozen=True, slots=True)
class Candidate:
    node: NodeConfig
    tier: Tier
    distance_km: float | None
    #: Lower is better; comparable only within one tier.
    score: float


@dataclass(frozen=True, slots=True)
class Exclusion:
    node: NodeConfig
    reason: ExclusionReason
    detail: str


@dataclass(frozen=True, slots=True)
class Decision:
    #: None sends the client upstream.
    node: NodeConfig | None
    reason: ChoiceReason
    #: Accepted nodes, best first.
    candidates: tuple[Candidate, ...]
    excluded: tuple[Exclusion, ...]


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle (haversine) distance."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlmb = math.radians(lon2 - lon1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def tier_of(node: NodeConfig, client: Location) -> Tier:
    if client.asn is not None and client.asn in node.asns:
        return Tier.ASN
    if client.country is not None and client.country == node.country:
        return Tier.COUNTRY
    if client.continent is not None and client.continent == node.continent:
        return Tier.CONTINENT
    return Tier.ANY


def _service_area_miss(node: NodeConfig, client: Location) -> str | None:
    """Why ``node`` does not serve ``client``, or None if it does."""
    area = node.serves
    if area.everywhere:
        return None
    if client.country in area.countries or client.continent in area.continents:
        return None
    if client.asn is not None and client.asn in area.asns:
        return None
    if not client.known and client.asn is None:
        return "client location unknown and node serves only listed areas"
    where = client.country or "unknown country"
    return f"client in {where} (AS{client.asn or '?'}) is outside the node's service area"


def _distance(node: NodeConfig, client: Location) -> float | None:
    if (
        client.latitude is None
        or client.longitude is None
        or node.latitude is None
        or node.longitude is None
    ):
        return None
    return distance_km(client.latitude, client.longitude, node.latitude, node.longitude)


def filter_nodes(
    nodes: Iterable[NodeConfig],
    client: Location,
    statuses: NodeStatuses,
    policy: RoutingConfig,
) -> tuple[list[Candidate], list[Exclusion]]:
    """Split nodes into candidates (sorted best first) and exclusions with reasons."""
    max_tier = Tier(TIER_ORDER.index(policy.max_tier))
    accepted: list[Candidate] = []
    excluded: list[Exclusion] = []
    for node in nodes:
        status = statuses.get(node.id, NODE_ASSUMED_UP)
        if not node.enabled:
            excluded.append(Exclusion(node, "disabled", "enabled: false in config"))
            continue
        if status.disabled:
            excluded.append(Exclusion(node, "admin_disabled", "disabled by an operator"))
            continue
        if not status.up:
            excluded.append(Exclusion(node, "down", status.down_reason or "failing probes"))
            continue
        if status.draining:
            excluded.append(Exclusion(node, "draining", "draining: takes no new clients"))
            continue
        miss = _service_area_miss(node, client)
        if miss is not None:
            excluded.append(Exclusion(node, "outside_service_area", miss))
            continue
        tier = tier_of(node, client)
        if tier > max_tier:
            excluded.append(
                Exclusion(
                    node,
                    "beyond_max_tier",
                    f"closest match is {tier.config_name}, policy allows up to {policy.max_tier}",
                )
            )
            continue
        distance = _distance(node, client)
        accepted.append(Candidate(node, tier, distance, distance or 0.0))
    accepted.sort(key=lambda c: (c.tier, c.score, -c.node.weight, c.node.id))
    return accepted, excluded


def near_equals(candidates: Sequence[Candidate], policy: RoutingConfig) -> list[Candidate]:
    """The best tier's candidates whose score is within the policy's band of the best score."""
    if not candidates:
        return []
    best = candidates[0]
    limit = best.score + max(policy.near_equal_km, best.score * policy.near_equal_ratio)
    return [c for c in candidates if c.tier == best.tier and c.score <= limit]


def choose(
    candidates: Sequence[Candidate], policy: RoutingConfig, rng: random.Random
) -> Candidate | None:
    """Weighted random pick among the near-equal best candidates (input sorted best first)."""
    pool = near_equals(candidates, policy)
    if not pool:
        return None
    if len(pool) == 1:
        return pool[0]
    return rng.choices(pool, weights=[c.node.weight for c in pool])[0]


def decide(
    nodes: Iterable[NodeConfig],
    client: Location,
    statuses: NodeStatuses,
    policy: RoutingConfig,
    rng: random.Random,
) -> Decision:
    accepted, excluded = filter_nodes(nodes, client, statuses, policy)
    chosen = choose(accepted, policy, rng)
    if chosen is None:
        return Decision(None, "no_eligible_node", tuple(accepted), tuple(excluded))
    return Decision(chosen.node, _TIER_REASON[chosen.tier], tuple(accepted), tuple(excluded))
