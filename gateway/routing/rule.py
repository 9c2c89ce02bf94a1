"""The routing rule: which node serves a client, and why every other node does not.

Pure functions over plain data, in two steps. ``score_tier`` filters one tier's nodes (same
ASN, same country, same continent, anywhere; a closer tier always wins) by live state (down,
draining, disabled by an operator, failing transport: each excluded with a reason, a bounded
machine word usable as a metric label, plus a human detail) and scores the rest: distance in
km, plus measured latency and load converted to km. A node at capacity is held in reserve.
``decide`` then takes, per request, the candidates that hold the requested revision, and picks
among the best tier's *near-equals* (scores within a band of the best): by weight, drawn with
the ``random.Random`` the caller passes (deterministic in tests), except that cache nodes
compete as one group inside which the file picks the cache by bounded-load rendezvous hashing,
so one file keeps hitting one cache. The reserve serves only when no other node may; no node
at all sends the client upstream.

Scoring needs only the client's location and the live state, so its result can be cached per
location (``router``); a tier may be scored from its nearest nodes only (``ranking``), as a
node's score is at least its distance: ``decide`` says when that cannot tell.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal, NamedTuple

from gateway.config import TIER_ORDER, NodeConfig, RoutingConfig
from gateway.geo.locator import Location
from gateway.state.live import NODE_ASSUMED_UP, NodeStatus, NodeStatuses


class Tier(IntEnum):
    """How close a node is to a client, closest first; a closer tier always wins."""

    ASN = 0
    COUNTRY = 1
    CONTINENT = 2
    ANY = 3

    @property
    def config_name(self) -> str:
        return TIER_ORDER[self]


TIERS = tuple(Tier)

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

TIER_REASON: dict[Tier, ChoiceReason] = {
    Tier.ASN: "same_asn",
    Tier.COUNTRY: "same_country",
    Tier.CONTINENT: "same_continent",
    Tier.ANY: "nearest",
}

EARTH_RADIUS_KM = 6371.0


class Candidate(NamedTuple):
    """A node that may serve the client, with what it was ranked by."""

    node: NodeConfig
    tier: Tier
    distance_km: float | None
    #: Lower is better; comparable only within one tier.
    score: float
    #: The node's load, as a share of its capacity, when it publishes one.
    load: float | None = None


@dataclass(frozen=True, slots=True)
class Exclusion:
    node: NodeConfig
    reason: ExclusionReason
    detail: str


class Decision(NamedTuple):
    #: None sends the client upstream.
    node: NodeConfig | None
    reason: ChoiceReason
    #: Candidates best first: all of them with ``explain``, else the best ``keep`` (the
    #: sources a redirect names besides the chosen node).
    candidates: tuple[Candidate, ...]
    #: Every excluded node with ``explain``; empty otherwise.
    excluded: tuple[Exclusion, ...]


#: Why a node cannot serve the requested revision, or None when it can.
RevisionMiss = Callable[[NodeConfig], "str | None"]


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle (haversine) distance."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlmb = math.radians(lon2 - lon1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def distance_to(node: NodeConfig, client: Location) -> float | None:
    if (
        client.latitude is None
        or client.longitude is None
        or node.latitude is None
        or node.longitude is None
    ):
        return None
    return distance_km(client.latitude, client.longitude, node.latitude, node.longitude)


def tier_of(node: NodeConfig, client: Location) -> Tier:
    if client.asn is not None and client.asn in node.asns:
        return Tier.ASN
    if client.country is not None and client.country == node.country:
        return Tier.COUNTRY
    if client.continent is not None and client.continent == node.continent:
        return Tier.CONTINENT
    return Tier.ANY


def max_tier(policy: RoutingConfig) -> Tier:
    return Tier(TIER_ORDER.index(policy.max_tier))


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


def configured_exclusion(
    node: NodeConfig, client: Location, policy: RoutingConfig
) -> Exclusion | Tier:
    """What configuration alone says of ``node`` for ``client``: an exclusion, or its tier."""
    if not node.enabled:
        return Exclusion(node, "disabled", "enabled: false in config")
    miss = _service_area_miss(node, client)
    if miss is not None:
        return Exclusion(node, "outside_service_area", miss)
    tier = tier_of(node, client)
    if tier > max_tier(policy):
        return Exclusion(
            node,
            "beyond_max_tier",
            f"closest match is {tier.config_name}, policy allows up to {policy.max_tier}",
        )
    return tier


def takes_clients(status: NodeStatus, policy: RoutingConfig) -> bool:
    return (
        status.up
        and not status.disabled
        and not status.draining
        and not (status.transport_failing and policy.avoid_transport_failing)
    )


def _live_exclusion(node: NodeConfig, status: NodeStatus) -> Exclusion:
    """Why a node that does not take clients (``takes_clients``) does not."""
    if status.disabled:
        return Exclusion(node, "admin_disabled", "disabled by an operator")
    if not status.up:
        return Exclusion(node, "down", status.down_reason or "failing probes")
    if status.draining:
        return Exclusion(node, "draining", "draining: takes no new clients")
    return Exclusion(node, "transport_failing", "latest probe timed out or could not connect")


def at_capacity(status: NodeStatus) -> bool:
    return status.load is not None and status.load >= 1.0


def score(distance: float | None, status: NodeStatus, policy: RoutingConfig) -> float:
    """Lower is better: km of distance, with latency and load converted to km."""
    value = distance or 0.0
    if status.latency_ms is not None:
        value += status.latency_ms * policy.km_per_latency_ms
    if status.load is not None:
        value += min(status.load, 1.0) * policy.load_penalty_km
    return value


def near_equal_bound(best: float, policy: RoutingConfig) -> float:
    """The highest score that still counts as equally good as ``best``."""
    return best + max(policy.near_equal_km, best * policy.near_equal_ratio)


def _by_preference(candidate: Candidate) -> tuple[Tier, float, float, str]:
    return candidate.tier, candidate.score, -candidate.node.weight, candidate.node.id


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


def near_equals(candidates: Sequence[Candidate], policy: RoutingConfig) -> list[Candidate]:
    """The best tier's candidates whose score is within the near-equal band of the best."""
    if not candidates:
        return []
    best = candidates[0]
    bound = near_equal_bound(best.score, policy)
    return [c for c in candidates if c.tier == best.tier and c.score <= bound]


def choose(
    candidates: Sequence[Candidate],
    policy: RoutingConfig,
    rng: random.Random,
    *,
    key: str = "",
    recent: Mapping[str, int] | None = None,
    warm_caches: Container[str] = frozenset(),
) -> Candidate | None:
    """Pick among the near-equal best of ``candidates`` (sorted best first).

    Cache nodes in the pool compete as one group carrying their summed weight; within the group
    a cache already holding the file wins over cold ones (``warm_caches``), and the file
    ``key`` picks among them by bounded-load rendezvous over ``recent`` redirect counts.
    """
    pool = near_equals(candidates, policy)
    caches = [c for c in pool if c.node.kind == "cache"]
    if len(caches) < 2:
        if len(pool) <= 1:
            return pool[0] if pool else None
        return rng.choices(pool, [c.node.weight for c in pool])[0]
    singles: list[Candidate | None] = [c for c in pool if c.node.kind != "cache"]
    if singles:
        weights = [c.node.weight for c in pool if c.node.kind != "cache"]
        # None stands for the caches' group.
        drawn = rng.choices([*singles, None], [*weights, sum(c.node.weight for c in caches)])[0]
        if drawn is not None:
            return drawn
    warm = [c for c in caches if c.node.id in warm_caches] or caches
    if len(warm) == 1:
        return warm[0]
    chosen = bounded_rendezvous([c.node for c in warm], key, recent or {}, policy.cache_load_bound)
    return next(c for c in warm if c.node is chosen)


class TierCandidates(NamedTuple):
    """One tier's nodes that take clients, scored under one live state, best first."""

    accepted: tuple[Candidate, ...]
    #: At capacity: chosen only when no tier has an accepted node holding the file.
    reserve: tuple[Candidate, ...]
    #: Every node of the tier not listed is at least this far away (so scores at least this
    #: much); ``math.inf`` when the tier is listed whole.
    reach: float


#: Per tier (indexed by ``Tier``), its scored candidates.
Scored = Sequence[TierCandidates]


def score_tier(
    tier: Tier,
    nodes: Iterable[tuple[NodeConfig, float | None]],
    statuses: NodeStatuses,
    policy: RoutingConfig,
    *,
    reach: float = math.inf,
    excluded: list[Exclusion] | None = None,
) -> TierCandidates:
    """Filter ``nodes`` (one tier's, with their distances) by live state and score the rest.
    Nodes that take no clients are left out, with their reason in ``excluded`` when given."""
    accepted: list[Candidate] = []
    reserve: list[Candidate] = []
    for node, distance in nodes:
        status = statuses.get(node.id, NODE_ASSUMED_UP)
        if not takes_clients(status, policy):
            if excluded is not None:
                excluded.append(_live_exclusion(node, status))
            continue
        candidate = Candidate(node, tier, distance, score(distance, status, policy), status.load)
        (reserve if at_capacity(status) else accepted).append(candidate)
    accepted.sort(key=_by_preference)
    reserve.sort(key=_by_preference)
    return TierCandidates(tuple(accepted), tuple(reserve), reach)


def _holding(
    tier: TierCandidates,
    need: int,
    pool: bool,
    policy: RoutingConfig,
    unavailable: RevisionMiss,
    excluded: list[Exclusion] | None,
) -> list[Candidate] | None:
    """The tier's candidates that hold the file, best first: exact for the best ``need`` and,
    with ``pool``, for every near-equal of the best; None when the nodes past the tier's
    listed ones could be among them. With ``excluded`` every candidate is read and each one
    lacking the file recorded there."""
    holding: list[Candidate] = []
    bound = math.inf
    for candidate in tier.accepted:
        if excluded is None and candidate.score > bound:
            break
        missing = unavailable(candidate.node)
        if missing is not None:
            if excluded is not None:
                excluded.append(Exclusion(candidate.node, "missing_revision", missing))
            continue
        holding.append(candidate)
        needed = holding[need - 1].score if len(holding) >= need else math.inf
        bound = max(near_equal_bound(holding[0].score, policy) if pool else -math.inf, needed)
    return holding if bound < tier.reach or tier.reach == math.inf else None


def decide(
    scored: Scored,
    policy: RoutingConfig,
    rng: random.Random,
    *,
    unavailable: RevisionMiss = lambda node: None,
    key: str = "",
    recent: Mapping[str, int] | None = None,
    warm_caches: Container[str] = frozenset(),
    keep: int = 1,
    excluded: list[Exclusion] | None = None,
) -> Decision | None:
    """Choose the node for one request, or None when a tier's listed candidates cannot tell
    (the caller then scores that tier whole, ``score_tier``, and asks again).

    ``unavailable`` says why a node cannot serve the requested revision. ``key`` names the file
    (rendezvous among caches), ``recent`` counts redirects per node, ``warm_caches`` are the
    caches holding the file. The decision lists the best ``keep`` candidates from the chosen
    tier on. With ``excluded`` (explain: ``scored`` lists every node) every candidate is read,
    the decision lists them all, and every exclusion ends up in ``excluded``.
    """
    explain = excluded is not None
    listed: list[Candidate] = []
    pool: list[Candidate] = []
    for tier in scored:
        if not explain and pool and len(listed) >= keep:
            break
        need = max(keep - len(listed), 1)
        holding = _holding(tier, need, not pool, policy, unavailable, excluded)
        if holding is None:
            return None
        if not pool:
            pool = near_equals(holding, policy)
        listed += holding if explain else holding[:need]
    # Nodes at capacity hold the reserve: chosen only when no tier had a candidate holding
    # the file. Every candidate was then read, and each tier is listed whole (``_holding``
    # said so), so the reserve is complete. Explain reads it always, for its exclusions.
    reserve = (
        [c for tier in scored for c in tier.reserve if _reserve_holds(c, unavailable, excluded)]
        if explain or not pool
        else []
    )
    exclusions = tuple(excluded or ())
    if pool:
        chosen = choose(pool, policy, rng, key=key, recent=recent, warm_caches=warm_caches)
        assert chosen is not None  # the pool is not empty
        shown = tuple(listed) if explain else tuple(listed[:keep])
        return Decision(chosen.node, TIER_REASON[chosen.tier], shown, exclusions)
    reserve.sort(key=_by_preference)
    last_resort = choose(reserve, policy, rng, key=key, recent=recent, warm_caches=warm_caches)
    if last_resort is not None:
        return Decision(last_resort.node, "at_capacity_last_resort", (), exclusions)
    return Decision(None, "no_eligible_node", (), exclusions)


def _reserve_holds(
    candidate: Candidate, unavailable: RevisionMiss, excluded: list[Exclusion] | None
) -> bool:
    """Whether a node at capacity holds the file; why it is excluded, into ``excluded``."""
    missing = unavailable(candidate.node)
    if excluded is not None:
        if missing is not None:
            excluded.append(Exclusion(candidate.node, "missing_revision", missing))
        else:
            detail = f"load {candidate.load or 0:.0%} of capacity; last resort"
            excluded.append(Exclusion(candidate.node, "at_capacity", detail))
    return missing is None
