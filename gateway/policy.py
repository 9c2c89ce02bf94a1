"""Routing policy: which node serves a client, and why every other node does not.

Pure functions over plain data. ``filter_nodes`` splits the configured nodes into accepted
candidates and exclusions, each exclusion carrying a machine reason (bounded, usable as a metric
label) and a human detail. ``choose`` prefers the closest tier (same ASN, same country, same
continent, anywhere), then the score (distance, plus probe latency and load expressed as
distance), then shares among near-equals: by weight using the RNG it is given (deterministic in
tests), or for cache nodes by bounded-load rendezvous hashing on the file, so one file keeps
hitting one cache while no cache takes more than its bounded share. A node at capacity is held
in reserve and used only when no other node can serve. No node at all means upstream.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

from gateway.config import TIER_ORDER, NodeConfig, RoutingConfig
from gateway.geo import Location
from gateway.state import NODE_ASSUMED_UP, NodeStatus, NodeStatuses


class Tier(IntEnum):
    ASN = 0
    COUNTRY = 1
    CONTINENT = 2
    ANY = 3

    @property
    def config_name(self) -> str:
        return TIER_ORDER[self]


ExclusionReason = Literal[
    "disabled",
    "admin_disabled",
    "outside_service_area",
    "beyond_max_tier",
    "down",
    "draining",
    "missing_revision",
    "transport_failing",
    "at_capacity",
]
ChoiceReason = Literal[
    "same_asn",
    "same_country",
    "same_continent",
    "nearest",
    "at_capacity_last_resort",
    "no_eligible_node",
]

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
class Filtered:
    #: Eligible nodes, best first.
    accepted: list[Candidate]
    #: Eligible but at capacity: used only when ``accepted`` is empty. Also listed in
    #: ``excluded`` with reason ``at_capacity``.
    reserve: list[Candidate]
    excluded: list[Exclusion]


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


def distance_to(node: NodeConfig, client: Location) -> float | None:
    if (
        client.latitude is None
        or client.longitude is None
        or node.latitude is None
        or node.longitude is None
    ):
        return None
    return distance_km(client.latitude, client.longitude, node.latitude, node.longitude)


def score(distance: float | None, status: NodeStatus, policy: RoutingConfig) -> float:
    """Lower is better: km of distance, with latency and load converted to km."""
    value = distance or 0.0
    if status.latency_ms is not None:
        value += status.latency_ms * policy.km_per_latency_ms
    if status.load is not None:
        value += min(status.load, 1.0) * policy.load_penalty_km
    return value


def _by_preference(candidate: Candidate) -> tuple[Tier, float, float, str]:
    return candidate.tier, candidate.score, -candidate.node.weight, candidate.node.id


def filter_nodes(
    nodes: Iterable[NodeConfig],
    client: Location,
    statuses: NodeStatuses,
    policy: RoutingConfig,
    unavailable: Mapping[str, str] | None = None,
) -> Filtered:
    """Split nodes into candidates (sorted best first), a reserve, and exclusions with reasons.

    ``unavailable`` names the nodes that cannot serve the requested revision, with the reason.
    """
    unavailable = unavailable or {}
    max_tier = Tier(TIER_ORDER.index(policy.max_tier))
    accepted: list[Candidate] = []
    reserve: list[Candidate] = []
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
        if status.transport_failing and policy.avoid_transport_failing:
            excluded.append(
                Exclusion(node, "transport_failing", "latest probe timed out or could not connect")
            )
            continue
        missing = unavailable.get(node.id)
        if missing is not None:
            excluded.append(Exclusion(node, "missing_revision", missing))
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
        distance = distance_to(node, client)
        candidate = Candidate(node, tier, distance, score(distance, status, policy))
        if status.load is not None and status.load >= 1.0:
            excluded.append(
                Exclusion(node, "at_capacity", f"load {status.load:.0%} of capacity; last resort")
            )
            reserve.append(candidate)
            continue
        accepted.append(candidate)
    accepted.sort(key=_by_preference)
    reserve.sort(key=_by_preference)
    return Filtered(accepted, reserve, excluded)


def near_equals(candidates: Sequence[Candidate], policy: RoutingConfig) -> list[Candidate]:
    """The best tier's candidates whose score is within the policy's band of the best score."""
    if not candidates:
        return []
    best = candidates[0]
    limit = best.score + max(policy.near_equal_km, best.score * policy.near_equal_ratio)
    return [c for c in candidates if c.tier == best.tier and c.score <= limit]


def rendezvous_order(nodes: Sequence[NodeConfig], key: str) -> list[NodeConfig]:
    """Weighted rendezvous (highest random weight) order of ``nodes`` for ``key``.

    Stable per (node id, key), so adding or removing a node only moves the keys it wins or
    loses; weights scale each node's share.
    """

    def rank(node: NodeConfig) -> float:
        digest = hashlib.blake2b(f"{node.id}\0{key}".encode(), digest_size=8).digest()
        # Map to (0, 1) exclusive so the logarithm is finite and negative.
        unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)
        return -node.weight / math.log(unit)

    return sorted(nodes, key=rank, reverse=True)


def bounded_rendezvous(
    nodes: Sequence[NodeConfig], key: str, recent: Mapping[str, int], bound: float
) -> NodeConfig:
    """The first node in rendezvous order still under ``bound`` times its weighted share.

    ``recent`` counts the redirects each node took lately; counting this one too, a node may
    take at most ``ceil(bound * total * weight / total_weight)`` of them.
    """
    ordered = rendezvous_order(nodes, key)
    total = sum(recent.get(n.id, 0) for n in nodes) + 1
    total_weight = sum(n.weight for n in nodes)
    for node in ordered:
        if recent.get(node.id, 0) + 1 <= math.ceil(bound * total * node.weight / total_weight):
            return node
    return ordered[0]  # unreachable for bound >= 1: the shares add up to more than total


def choose(
    candidates: Sequence[Candidate],
    policy: RoutingConfig,
    rng: random.Random,
    *,
    key: str = "",
    recent: Mapping[str, int] | None = None,
    warm_caches: frozenset[str] = frozenset(),
) -> Candidate | None:
    """Pick among the near-equal best candidates (input sorted best first).

    Cache nodes in the pool compete as one group carrying their summed weight; within the group
    a cache already holding the file wins over cold ones (``warm_caches``), and the file
    ``key`` picks among them by bounded-load rendezvous over ``recent`` redirect counts.
    """
    pool = near_equals(candidates, policy)
    if len(pool) <= 1:
        return pool[0] if pool else None
    caches = [c for c in pool if c.node.kind == "cache"]
    warm = [c for c in caches if c.node.id in warm_caches]
    caches = warm or caches
    others = [c for c in pool if c.node.kind != "cache"]
    groups: list[list[Candidate]] = [[c] for c in others] + ([caches] if caches else [])
    weights = [sum(c.node.weight for c in group) for group in groups]
    group = groups[0] if len(groups) == 1 else rng.choices(groups, weights=weights)[0]
    if len(group) == 1:
        return group[0]
    chosen = bounded_rendezvous([c.node for c in group], key, recent or {}, policy.cache_load_bound)
    return next(c for c in group if c.node is chosen)


def decide(
    nodes: Iterable[NodeConfig],
    client: Location,
    statuses: NodeStatuses,
    policy: RoutingConfig,
    rng: random.Random,
    *,
    key: str = "",
    recent: Mapping[str, int] | None = None,
    unavailable: Mapping[str, str] | None = None,
    warm_caches: frozenset[str] = frozenset(),
) -> Decision:
    filtered = filter_nodes(nodes, client, statuses, policy, unavailable)
    excluded = tuple(filtered.excluded)
    chosen = choose(filtered.accepted, policy, rng, key=key, recent=recent, warm_caches=warm_caches)
    if chosen is not None:
        reason = _TIER_REASON[chosen.tier]
        return Decision(chosen.node, reason, tuple(filtered.accepted), excluded)
    last_resort = choose(filtered.reserve, policy, rng, key=key, recent=recent)
    if last_resort is not None:
        return Decision(last_resort.node, "at_capacity_last_resort", (), excluded)
    return Decision(None, "no_eligible_node", (), excluded)
