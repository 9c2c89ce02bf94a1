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

import bisect
import hashlib
import math
import random
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
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


def _static_exclusion(
    node: NodeConfig, client: Location, policy: RoutingConfig, max_tier: Tier
) -> Exclusion | Tier:
    """What config alone says of ``node`` for ``client``: an exclusion, or the node's tier."""
    if not node.enabled:
        return Exclusion(node, "disabled", "enabled: false in config")
    miss = _service_area_miss(node, client)
    if miss is not None:
        return Exclusion(node, "outside_service_area", miss)
    tier = tier_of(node, client)
    if tier > max_tier:
        return Exclusion(
            node,
            "beyond_max_tier",
            f"closest match is {tier.config_name}, policy allows up to {policy.max_tier}",
        )
    return tier


def _live_exclusion(
    node: NodeConfig, status: NodeStatus, policy: RoutingConfig
) -> Exclusion | None:
    """What the node's live state says: an exclusion, or None if it may take clients."""
    if status.disabled:
        return Exclusion(node, "admin_disabled", "disabled by an operator")
    if not status.up:
        return Exclusion(node, "down", status.down_reason or "failing probes")
    if status.draining:
        return Exclusion(node, "draining", "draining: takes no new clients")
    if status.transport_failing and policy.avoid_transport_failing:
        return Exclusion(node, "transport_failing", "latest probe timed out or could not connect")
    return None


def _at_capacity(status: NodeStatus) -> bool:
    return status.load is not None and status.load >= 1.0


def _capacity_exclusion(node: NodeConfig, status: NodeStatus) -> Exclusion:
    return Exclusion(node, "at_capacity", f"load {status.load:.0%} of capacity; last resort")


def filter_nodes(
    nodes: Iterable[NodeConfig],
    client: Location,
    statuses: NodeStatuses,
    policy: RoutingConfig,
    unavailable: Mapping[str, str] | None = None,
) -> Filtered:
    """Split nodes into candidates (sorted best first), a reserve, and exclusions with reasons.

    ``unavailable`` names the nodes that cannot serve the requested revision, with the reason.
    This looks at every node, as explain needs; requests use ``decide_ranked``.
    """
    unavailable = unavailable or {}
    max_tier = Tier(TIER_ORDER.index(policy.max_tier))
    accepted: list[Candidate] = []
    reserve: list[Candidate] = []
    excluded: list[Exclusion] = []
    for node in nodes:
        static = _static_exclusion(node, client, policy, max_tier)
        if isinstance(static, Exclusion):
            excluded.append(static)
            continue
        status = statuses.get(node.id, NODE_ASSUMED_UP)
        live = _live_exclusion(node, status, policy)
        if live is not None:
            excluded.append(live)
            continue
        missing = unavailable.get(node.id)
        if missing is not None:
            excluded.append(Exclusion(node, "missing_revision", missing))
            continue
        distance = distance_to(node, client)
        candidate = Candidate(node, static, distance, score(distance, status, policy))
        if _at_capacity(status):
            excluded.append(_capacity_exclusion(node, status))
            reserve.append(candidate)
            continue
        accepted.append(candidate)
    accepted.sort(key=_by_preference)
    reserve.sort(key=_by_preference)
    return Filtered(accepted, reserve, excluded)


@dataclass(frozen=True, slots=True)
class Ranked:
    """The nodes config allows for one client location, per tier by distance; no live state.

    Built once per location (it depends on nothing else), so a request only walks the front
    of it.
    """

    #: Indexed by ``Tier``: (node, distance) pairs, nearest first.
    tiers: tuple[tuple[tuple[NodeConfig, float | None], ...], ...]
    excluded: tuple[Exclusion, ...]


def rank_nodes(nodes: Iterable[NodeConfig], client: Location, policy: RoutingConfig) -> Ranked:
    max_tier = Tier(TIER_ORDER.index(policy.max_tier))
    tiers: list[list[tuple[NodeConfig, float | None]]] = [[] for _ in Tier]
    excluded: list[Exclusion] = []
    for node in nodes:
        static = _static_exclusion(node, client, policy, max_tier)
        if isinstance(static, Exclusion):
            excluded.append(static)
        else:
            tiers[static].append((node, distance_to(node, client)))
    for members in tiers:
        members.sort(key=lambda pair: (pair[1] or 0.0, -pair[0].weight, pair[0].id))
    return Ranked(tuple(tuple(m) for m in tiers), tuple(excluded))


def decide_ranked(
    ranked: Ranked,
    statuses: NodeStatuses,
    policy: RoutingConfig,
    rng: random.Random,
    *,
    unavailable: Callable[[NodeConfig], str | None],
    key: str = "",
    recent: Mapping[str, int] | None = None,
    warm_caches: Container[str] = frozenset(),
    keep: int = 1,
) -> Decision:
    """The same choice as ``decide``, looking only at the nodes that can matter.

    Tier by tier, nodes are visited nearest first. A node's score is at least its distance, so
    once the distance passes the best score plus the near-equal band, no later node of the tier
    can join the pool. Visiting goes on only until ``keep`` candidates are known (the next-best
    sources a redirect names besides the chosen one). ``unavailable`` (revision checks) is
    asked only of visited nodes. The decision lists the visited candidates, not every
    exclusion: explain uses ``decide``.
    """
    reserve: list[Candidate] = []

    def admit(node: NodeConfig, tier: Tier, distance: float | None) -> Candidate | None:
        status = statuses.get(node.id, NODE_ASSUMED_UP)
        if _live_exclusion(node, status, policy) is not None or unavailable(node) is not None:
            return None
        candidate = Candidate(node, tier, distance, score(distance, status, policy))
        if _at_capacity(status):
            reserve.append(candidate)
            return None
        return candidate

    def walk(
        tier: Tier, members: Sequence[tuple[NodeConfig, float | None]], need: int, pool: bool
    ) -> list[Candidate]:
        """The tier's candidates, sorted, exact for the best ``need`` (and for the near-equal
        pool when ``pool``): a node farther than both bounds cannot score into either."""
        accepted: list[Candidate] = []
        scores: list[float] = []
        for node, distance in members:
            if accepted:
                best = scores[0]
                bound = best + max(policy.near_equal_km, best * policy.near_equal_ratio)
                needed = scores[need - 1] if len(scores) >= need else math.inf
                if (distance or 0.0) > max(bound if pool else -math.inf, needed):
                    break
            candidate = admit(node, tier, distance)
            if candidate is not None:
                accepted.append(candidate)
                bisect.insort(scores, candidate.score)
        accepted.sort(key=_by_preference)
        return accepted

    tiers = [(Tier(value), members) for value, members in enumerate(ranked.tiers)]
    for position, (tier, members) in enumerate(tiers):
        accepted = walk(tier, members, keep, pool=True)
        chosen = choose(accepted, policy, rng, key=key, recent=recent, warm_caches=warm_caches)
        if chosen is None:
            continue
        shown = accepted[: max(keep, len(near_equals(accepted, policy)))]
        for later_tier, later_members in tiers[position + 1 :]:
            if len(shown) >= keep:
                break
            need = keep - len(shown)
            shown += walk(later_tier, later_members, need, pool=False)[:need]
        reason = _TIER_REASON[chosen.tier]
        return Decision(chosen.node, reason, tuple(shown), ranked.excluded)
    # No tier had an eligible node, so every node was visited: the reserve is complete.
    reserve.sort(key=_by_preference)
    last_resort = choose(reserve, policy, rng, key=key, recent=recent, warm_caches=warm_caches)
    if last_resort is not None:
        return Decision(last_resort.node, "at_capacity_last_resort", (), ranked.excluded)
    return Decision(None, "no_eligible_node", (), ranked.excluded)


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
    warm_caches: Container[str] = frozenset(),
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
    warm_caches: Container[str] = frozenset(),
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
