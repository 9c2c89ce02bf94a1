"""The routing rule: which node serves a client, and why every other node does not.

Pure functions over plain data, in two steps. ``score_level`` filters the nodes of one
preference level by live state (down, draining, disabled by an operator, failing transport:
each excluded with a reason, a bounded machine word usable as a metric label, plus a human
detail) and prices the rest. A node's *cost* for a client is the great-circle distance in km,
plus the probe latency converted to km, minus bounded bonuses for sharing the client's network
(ASN) and country (``Cost``). Levels are hard: for a client in a ``domestic_first`` country, its
country's nodes form the first level and every other node the second; for anyone else all nodes
form one. A node whose expected load reaches its capacity is full and held in reserve.

``decide`` then takes, per request, the candidates that hold the requested revision and picks
among the best level's *near-equals* (costs within a band of the best, ``near_equal_bound``):
drawn with the ``random.Random`` the caller passes (deterministic in tests), each in proportion
to its free capacity times its weight (``shares``), so a busier node gets less before it is
full. Cache nodes compete as one group inside which the file picks the cache by bounded-load
rendezvous hashing, so one file keeps hitting one cache. The reserve serves only when no other
node may; no node at all sends the client upstream.

Scoring needs only the client's routing cell and the live state, so its result can be cached per
cell (``router``); a level may be scored from its cheapest nodes before live state only
(``ranking``), as live state only adds to a cost: ``decide`` says when that cannot tell.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal, NamedTuple, Protocol

from gateway.config import TIER_ORDER, NodeConfig, RoutingConfig
from gateway.geo.locator import Location
from gateway.state.live import NODE_ASSUMED_UP, NodeStatus, NodeStatuses


class Tier(IntEnum):
    """How close a node is to a client: the closest of sharing its network, its country, its
    continent. It decides the bonuses and the reason a choice is reported with, and which nodes
    ``routing.max_tier`` allows; it does not rank nodes."""

    ASN = 0
    COUNTRY = 1
    CONTINENT = 2
    ANY = 3

    @property
    def config_name(self) -> str:
        return TIER_ORDER[self]


class Level(IntEnum):
    """Preference levels: a node of a lower level always wins over one of a higher level."""

    #: The client's own country, when it is one of ``routing.domestic_first``.
    DOMESTIC = 0
    #: Every other node configuration allows.
    OPEN = 1


LEVELS = tuple(Level)

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


class Client(Protocol):
    """What the rule reads of a client's location (a ``Location`` or a routing cell)."""

    @property
    def country(self) -> str | None: ...

    @property
    def continent(self) -> str | None: ...

    @property
    def asn(self) -> int | None: ...


class Cost(NamedTuple):
    """A node's cost for a client, term by term, in km; lower is better."""

    #: Great-circle distance; None when the client or the node has no coordinates (taken as 0).
    distance_km: float | None
    #: Probe latency times ``routing.km_per_latency_ms``; 0 when none was measured.
    latency_km: float = 0.0
    #: ``routing.asn_bonus_km`` when the node is in the client's network, else 0.
    asn_bonus_km: float = 0.0
    #: ``routing.country_bonus_km`` when the node is in the client's country, else 0.
    country_bonus_km: float = 0.0

    @property
    def total(self) -> float:
        distance = self.distance_km or 0.0
        return distance + self.latency_km - self.asn_bonus_km - self.country_bonus_km


class Candidate(NamedTuple):
    """A node that may serve the client, with what it was ranked by."""

    node: NodeConfig
    tier: Tier
    cost: Cost
    #: ``cost.total``, kept: requests compare it many times (build with ``priced``).
    score: float
    #: The node's expected load, as a share of its capacity, when it has a capacity.
    load: float | None = None
    level: Level = Level.OPEN

    @property
    def distance_km(self) -> float | None:
        return self.cost.distance_km


def priced(
    node: NodeConfig, tier: Tier, cost: Cost, load: float | None = None, level: Level = Level.OPEN
) -> Candidate:
    """A candidate priced at ``cost``."""
    return Candidate(node, tier, cost, cost.total, load, level)


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
    #: The near-equal nodes the choice was drawn among, with each one's chance.
    shares: tuple[tuple[str, float], ...] = ()


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


def tier_of(node: NodeConfig, client: Client) -> Tier:
    if client.asn is not None and client.asn in node.asns:
        return Tier.ASN
    if client.country is not None and client.country == node.country:
        return Tier.COUNTRY
    if client.continent is not None and client.continent == node.continent:
        return Tier.CONTINENT
    return Tier.ANY


def max_tier(policy: RoutingConfig) -> Tier:
    return Tier(TIER_ORDER.index(policy.max_tier))


def level_of(node: NodeConfig, client: Client, policy: RoutingConfig) -> Level:
    domestic = client.country is not None and client.country in policy.domestic_first
    return Level.DOMESTIC if domestic and node.country == client.country else Level.OPEN


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
    """Full: the node's expected load reached its capacity."""
    return status.load is not None and status.load >= 1.0


def cost(
    node: NodeConfig,
    distance: float | None,
    client: Client,
    status: NodeStatus,
    policy: RoutingConfig,
) -> Cost:
    """``node``'s cost for ``client`` at ``distance`` under ``status``, term by term."""
    latency = 0.0 if status.latency_ms is None else status.latency_ms * policy.km_per_latency_ms
    same_asn = client.asn is not None and client.asn in node.asns
    same_country = client.country is not None and client.country == node.country
    return Cost(
        distance,
        latency,
        policy.asn_bonus_km if same_asn else 0.0,
        policy.country_bonus_km if same_country else 0.0,
    )


def near_equal_bound(best: float, policy: RoutingConfig) -> float:
    """The highest cost that still counts as equally good as ``best``."""
    return best + max(policy.near_equal_km, max(best, 0.0) * policy.near_equal_ratio)


def _by_preference(candidate: Candidate) -> tuple[Level, float, float, str]:
    return candidate.level, candidate.score, -candidate.node.weight, candidate.node.id


def free_capacity(candidate: Candidate, policy: RoutingConfig, *, absolute: bool) -> float:
    """The candidate's free capacity: in connections when ``absolute`` (it has a connection
    capacity), else as a share of its capacity. A node with no load known yet is taken to
    carry ``routing.load_prior``."""
    load = policy.load_prior if candidate.load is None else candidate.load
    free = max(0.0, 1.0 - load)
    return free * (candidate.node.capacity.connections or 1) if absolute else free


def shares(pool: Sequence[Candidate], policy: RoutingConfig) -> list[float]:
    """Each near-equal candidate's chance: its free capacity times its weight, normalised.

    Free capacity counts in connections when every candidate has a connection capacity, else
    as a share of capacity (a node without one could not be compared). Should every one be
    full to the last slot, they share by weight alone.
    """
    absolute = all(c.node.capacity.connections for c in pool)
    raw = [c.node.weight * free_capacity(c, policy, absolute=absolute) for c in pool]
    total = sum(raw)
    if total <= 0.0:
        raw = [c.node.weight for c in pool]
        total = sum(raw)
    return [value / total for value in raw]


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
    """The best level's candidates whose cost is within the near-equal band of the best."""
    if not candidates:
        return []
    best = candidates[0]
    bound = near_equal_bound(best.score, policy)
    return [c for c in candidates if c.level == best.level and c.score <= bound]


def choose(
    candidates: Sequence[Candidate],
    policy: RoutingConfig,
    rng: random.Random,
    *,
    key: str = "",
    recent: Mapping[str, int] | None = None,
    warm_caches: Container[str] = frozenset(),
) -> tuple[Candidate | None, list[tuple[Candidate, float]]]:
    """Pick among the near-equal best of ``candidates`` (sorted best first), each by its
    ``shares``; returns the pick and the pool with each member's chance.

    Cache nodes in the pool compete as one group carrying their summed share; within the group
    a cache already holding the file wins over cold ones (``warm_caches``), and the file
    ``key`` picks among them by bounded-load rendezvous over ``recent`` redirect counts.
    """
    pool = near_equals(candidates, policy)
    if len(pool) <= 1:
        return (pool[0] if pool else None), [(c, 1.0) for c in pool]
    chances = shares(pool, policy)
    shared = list(zip(pool, chances, strict=True))
    caches = [c for c in pool if c.node.kind == "cache"]
    if len(caches) < 2:
        return rng.choices(pool, chances)[0], shared
    singles = [(c, chance) for c, chance in shared if c.node.kind != "cache"]
    if singles:
        group = sum(chance for c, chance in shared if c.node.kind == "cache")
        # None stands for the caches' group.
        options: list[Candidate | None] = [c for c, _ in singles]
        drawn = rng.choices([*options, None], [*(w for _, w in singles), group])[0]
        if drawn is not None:
            return drawn, shared
    warm = [c for c in caches if c.node.id in warm_caches] or caches
    if len(warm) == 1:
        return warm[0], shared
    chosen = bounded_rendezvous([c.node for c in warm], key, recent or {}, policy.cache_load_bound)
    return next(c for c in warm if c.node is chosen), shared


class LevelCandidates(NamedTuple):
    """One level's nodes that take clients, priced under one live state, best first."""

    accepted: tuple[Candidate, ...]
    #: Full: chosen only when no level has an accepted node holding the file.
    reserve: tuple[Candidate, ...]
    #: Every node of the level not listed costs at least this much (the ranking's reach: live
    #: state only adds to a cost); ``math.inf`` when the level is listed whole.
    reach: float


#: Per level (indexed by ``Level``), its priced candidates.
Scored = Sequence[LevelCandidates]


def score_level(
    level: Level,
    nodes: Iterable[tuple[NodeConfig, float | None]],
    client: Client,
    statuses: NodeStatuses,
    policy: RoutingConfig,
    *,
    reach: float = math.inf,
    excluded: list[Exclusion] | None = None,
) -> LevelCandidates:
    """Filter ``nodes`` (one level's, with their distances; every node of the level not
    listed costs at least ``reach``) by live state and price the rest for ``client``. Nodes
    that take no clients are left out, with their reason in ``excluded`` when given."""
    accepted: list[Candidate] = []
    reserve: list[Candidate] = []
    for node, distance in nodes:
        status = statuses.get(node.id, NODE_ASSUMED_UP)
        if not takes_clients(status, policy):
            if excluded is not None:
                excluded.append(_live_exclusion(node, status))
            continue
        terms = cost(node, distance, client, status, policy)
        found = priced(node, tier_of(node, client), terms, status.load, level)
        (reserve if at_capacity(status) else accepted).append(found)
    accepted.sort(key=_by_preference)
    reserve.sort(key=_by_preference)
    return LevelCandidates(tuple(accepted), tuple(reserve), reach)


def _holding(
    level: LevelCandidates,
    need: int,
    pool: bool,
    policy: RoutingConfig,
    unavailable: RevisionMiss,
    excluded: list[Exclusion] | None,
) -> list[Candidate] | None:
    """The level's candidates that hold the file, best first: exact for the best ``need`` and,
    with ``pool``, for every near-equal of the best; None when the nodes past the level's
    listed ones could be among them. With ``excluded`` every candidate is read and each one
    lacking the file recorded there."""
    holding: list[Candidate] = []
    bound = math.inf
    for candidate in level.accepted:
        if excluded is None and candidate.score > bound:
            break
        missing = unavailable(candidate.node)
        if missing is not None:
            if excluded is not None:
                excluded.append(Exclusion(candidate.node, "missing_revision", missing))
            continue
        holding.append(candidate)
        # Read on past the ``need``-th only while the near-equals of the best may go on.
        if len(holding) == need:
            near = near_equal_bound(holding[0].score, policy) if pool else -math.inf
            bound = max(near, candidate.score)
    return holding if bound < level.reach or level.reach == math.inf else None


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
    """Choose the node for one request, or None when a level's listed candidates cannot tell
    (the caller then scores that level whole, ``score_level``, and asks again).

    ``unavailable`` says why a node cannot serve the requested revision. ``key`` names the file
    (rendezvous among caches), ``recent`` counts redirects per node, ``warm_caches`` are the
    caches holding the file. The decision lists the best ``keep`` candidates from the chosen
    level on. With ``excluded`` (explain: ``scored`` lists every node) every candidate is read,
    the decision lists them all, and every exclusion ends up in ``excluded``.
    """
    explain = excluded is not None
    listed: list[Candidate] = []
    pool: list[Candidate] = []
    for level in scored:
        if not explain and pool and len(listed) >= keep:
            break
        need = max(keep - len(listed), 1)
        holding = _holding(level, need, not pool, policy, unavailable, excluded)
        if holding is None:
            return None
        if not pool:
            pool = near_equals(holding, policy)
        listed += holding if explain else holding[:need]
    # Full nodes hold the reserve: chosen only when no level had a candidate holding the
    # file. Every candidate was then read, and each level is listed whole (``_holding`` said
    # so), so the reserve is complete. Explain reads it always, for its exclusions.
    reserve = (
        [c for level in scored for c in level.reserve if _reserve_holds(c, unavailable, excluded)]
        if explain or not pool
        else []
    )
    exclusions = tuple(excluded or ())
    if pool:
        chosen, shared = choose(pool, policy, rng, key=key, recent=recent, warm_caches=warm_caches)
        assert chosen is not None  # the pool is not empty
        shown = tuple(listed) if explain else tuple(listed[:keep])
        chances = tuple((c.node.id, chance) for c, chance in shared) if explain else ()
        return Decision(chosen.node, TIER_REASON[chosen.tier], shown, exclusions, chances)
    reserve.sort(key=_by_preference)
    last_resort, _ = choose(reserve, policy, rng, key=key, recent=recent, warm_caches=warm_caches)
    if last_resort is not None:
        return Decision(last_resort.node, "at_capacity_last_resort", (), exclusions)
    return Decision(None, "no_eligible_node", (), exclusions)


def _reserve_holds(
    candidate: Candidate, unavailable: RevisionMiss, excluded: list[Exclusion] | None
) -> bool:
    """Whether a full node holds the file; why it is excluded, into ``excluded``."""
    missing = unavailable(candidate.node)
    if excluded is not None:
        if missing is not None:
            excluded.append(Exclusion(candidate.node, "missing_revision", missing))
        else:
            detail = f"expected load {candidate.load or 0:.0%} of capacity: full; last resort"
            excluded.append(Exclusion(candidate.node, "at_capacity", detail))
    return missing is None
