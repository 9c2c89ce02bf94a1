"""Routing policy: which node serves a client, and why every other node does not.

Pure functions over plain data. ``filter_nodes`` splits the configured nodes into accepted
candidates and exclusions, each exclusion carrying a machine reason (bounded, usable as a metric
label) and a human detail. ``choose`` prefers the closest tier (same ASN, same country, same
continent, anywhere), then the score (distance, plus probe latency and load expressed as
distance), then shares among near-equals: by weight using the RNG it is given (deterministic in
tests), or for cache nodes by bounded-load rendezvous hashing on the file, so one file keeps
hitting one cache while no cache takes more than its bounded share. A node at capacity is held
in reserve and used only when no other node can serve. No node at all means upstream.

Requests take the same decision with ``decide_ranked``, from a ``Ranked`` per routing ``Cell``
(``rank_nodes`` over a ``NodeIndex`` built once per config) of which they walk only the front;
or, while the nodes it read are unchanged, with ``decide_prepared`` from that walk ``prepare``d
once under the live state, checking only which listed nodes hold the file.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
import random
from collections.abc import Callable, Collection, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from itertools import accumulate, chain
from typing import Literal, NamedTuple, TypeVar

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


class Candidate(NamedTuple):
    # A NamedTuple, not a frozen dataclass: requests build one per admitted node, and a frozen
    # dataclass pays an object.__setattr__ per field.
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


class Decision(NamedTuple):
    """A NamedTuple, as one is built per request (a frozen dataclass costs more)."""

    #: None sends the client upstream.
    node: NodeConfig | None
    reason: ChoiceReason
    #: Accepted nodes, best first (``decide_ranked``: only the best few, enough for the
    #: sources a redirect names besides the chosen node).
    candidates: tuple[Candidate, ...]
    #: Every excluded node (``decide``); empty from ``decide_ranked``, as redirects never show
    #: them.
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
    if _takes_clients(status, policy):
        return None
    if status.disabled:
        return Exclusion(node, "admin_disabled", "disabled by an operator")
    if not status.up:
        return Exclusion(node, "down", status.down_reason or "failing probes")
    if status.draining:
        return Exclusion(node, "draining", "draining: takes no new clients")
    return Exclusion(node, "transport_failing", "latest probe timed out or could not connect")


def _takes_clients(status: NodeStatus, policy: RoutingConfig) -> bool:
    """``_live_exclusion`` without building the exclusion, for the request path."""
    return (
        status.up
        and not status.disabled
        and not status.draining
        and not (status.transport_failing and policy.avoid_transport_failing)
    )


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


#: ``Tier(value)`` is an enum lookup; requests iterate this instead.
_TIERS = tuple(Tier)


class Cell(NamedTuple):
    """The part of a client's location its ranking depends on.

    The ASN only counts when some node is in or serves it (``NodeIndex.cell``), so clients of
    one city on different networks share one ranking.
    """

    country: str | None
    continent: str | None
    latitude: float | None
    longitude: float | None
    asn: int | None


#: A node's position in the configured nodes.
_Member = int
#: A node ready for ranking: (distance or 0 if unknown, its rank by weight and id, distance).
_Keyed = tuple[float, int, float | None]
#: Half-width in radians (about 320 km) of the first latitude band searched for a tier's front.
_FIRST_BAND = 0.05
_Key = TypeVar("_Key")
_T = TypeVar("_T")


def _group(
    nodes: Sequence[NodeConfig],
    members: Iterable[_Member],
    keys: Callable[[NodeConfig], Iterable[_Key]],
) -> dict[_Key, tuple[_Member, ...]]:
    groups: dict[_Key, list[_Member]] = {}
    for member in members:
        for key in keys(nodes[member]):
            groups.setdefault(key, []).append(member)
    return {key: tuple(group) for key, group in groups.items()}


def _in(groups: Mapping[_Key, tuple[_Member, ...]], key: _Key | None) -> tuple[_Member, ...]:
    return () if key is None else groups.get(key, ())


class NodeIndex:
    """The configured nodes arranged for ranking; built once per config.

    The enabled nodes are grouped by the countries, continents and ASNs that put them in a
    client's service area or tier, so ranking a location looks up a few groups rather than
    testing every node; each node's latitude in radians and its cosine, which every distance
    to it needs, are computed once.
    """

    __slots__ = (
        "_by_latitude",
        "_by_rank",
        "_in_asn",
        "_in_continent",
        "_in_country",
        "_latitudes",
        "_member_of",
        "_nodes",
        "_open",
        "_places",
        "_rank",
        "_serving_asn",
        "_serving_continent",
        "_serving_country",
        "_unplaced",
        "asns",
    )

    def __init__(self, nodes: Iterable[NodeConfig]) -> None:
        configured = self._nodes = tuple(nodes)
        # Node ids are unique (the config says so).
        self._member_of = {node.id: member for member, node in enumerate(configured)}
        enabled = [member for member, node in enumerate(configured) if node.enabled]
        self._open = tuple(member for member in enabled if configured[member].serves.everywhere)
        self._serving_country = _group(configured, enabled, lambda node: node.serves.countries)
        self._serving_continent = _group(configured, enabled, lambda node: node.serves.continents)
        self._serving_asn = _group(configured, enabled, lambda node: node.serves.asns)
        self._in_asn = _group(configured, enabled, lambda node: node.asns)
        self._in_country = _group(
            configured, enabled, lambda node: () if node.country is None else (node.country,)
        )
        self._in_continent = _group(
            configured, enabled, lambda node: () if node.continent is None else (node.continent,)
        )
        #: ASNs some enabled node is in or serves: no other ASN changes a ranking.
        self.asns = frozenset(self._in_asn) | frozenset(self._serving_asn)
        # Rank by the tie-break among equally distant nodes, heavier first, then by id: ranking
        # then compares (distance, rank) pairs instead of building a key per node.
        ordered = sorted(
            range(len(configured)), key=lambda m: (-configured[m].weight, configured[m].id)
        )
        self._by_rank = tuple(configured[member] for member in ordered)
        rank = [0] * len(configured)
        for position, member in enumerate(ordered):
            rank[member] = position
        self._rank = tuple(rank)
        self._places: tuple[tuple[float, float, float] | None, ...] = tuple(
            None
            if node.latitude is None or node.longitude is None
            else (
                math.radians(node.latitude),
                math.cos(math.radians(node.latitude)),
                node.longitude,
            )
            for node in configured
        )

        # Located nodes by latitude, for the band search of ``_nearest``.
        placed = sorted(
            (place[0], member) for member in enabled if (place := self._places[member]) is not None
        )
        self._latitudes = [phi for phi, _ in placed]
        self._by_latitude = tuple(member for _, member in placed)
        self._unplaced = tuple(member for member in enabled if self._places[member] is None)

    def cell(self, client: Location) -> Cell:
        asn = client.asn if client.asn in self.asns else None
        return Cell(client.country, client.continent, client.latitude, client.longitude, asn)

    def tiers(self, cell: Cell, max_tier: Tier) -> list[Collection[_Member]]:
        """Per tier, the nodes config allows in ``cell``, in no particular order."""
        allowed = set(self._open)
        allowed.update(_in(self._serving_country, cell.country))
        allowed.update(_in(self._serving_continent, cell.continent))
        allowed.update(_in(self._serving_asn, cell.asn))
        tiers: list[Collection[_Member]] = []
        groups = (
            _in(self._in_asn, cell.asn),
            _in(self._in_country, cell.country),
            _in(self._in_continent, cell.continent),
        )
        for tier, group in zip(_TIERS[: Tier.ANY], groups, strict=True):
            members = [member for member in group if member in allowed] if tier <= max_tier else []
            # A node belongs to its closest tier only.
            allowed.difference_update(members)
            tiers.append(members)
        tiers.append(allowed if max_tier is Tier.ANY else ())
        return tiers

    def rest(
        self,
        cell: Cell,
        max_tier: Tier,
        tier: Tier,
        seen: Iterable[NodeConfig],
        admissible: Callable[[NodeConfig], bool],
    ) -> list[tuple[NodeConfig, float | None]]:
        skip = {self._member_of[node.id] for node in seen}
        nodes = self._nodes
        members = [
            member
            for member in self.tiers(cell, max_tier)[tier]
            if member not in skip and admissible(nodes[member])
        ]
        by_rank = self._by_rank
        return [
            (by_rank[position], distance)
            for _, position, distance in sorted(self._keyed(members, cell))
        ]

    def ranked(
        self, members: Collection[_Member], cell: Cell, front: int | None
    ) -> tuple[tuple[NodeConfig, ...], tuple[float | None, ...], bool]:
        """``members`` nearest first (the first ``front`` of them, unless None), their
        distances, and whether any were left out."""
        truncated = front is not None and len(members) > front
        if front is None or not truncated:
            keyed = sorted(self._keyed(members, cell))
        elif cell.latitude is None or cell.longitude is None:
            keyed = heapq.nsmallest(front, self._keyed(members, cell))
        else:
            keyed = self._nearest(set(members), cell, cell.latitude, front)
        by_rank = self._by_rank
        nodes = tuple(by_rank[position] for _, position, _ in keyed)
        return nodes, tuple(distance for _, _, distance in keyed), truncated

    def _keyed(self, members: Iterable[_Member], cell: Cell) -> list[_Keyed]:
        rank = self._rank
        if cell.latitude is None or cell.longitude is None:
            return [(0.0, rank[member], None) for member in members]
        phi1 = math.radians(cell.latitude)
        cos1 = math.cos(phi1)
        lon1 = cell.longitude
        places = self._places
        # Names bound locally: this loop runs for thousands of nodes per cell.
        sin, asin, sqrt, radians = math.sin, math.asin, math.sqrt, math.radians
        diameter = 2 * EARTH_RADIUS_KM
        keyed: list[_Keyed] = []
        append = keyed.append
        for member in members:
            place = places[member]
            if place is None:
                append((0.0, rank[member], None))
                continue
            phi2, cos2, lon2 = place
            # distance_km term for term, so distances and the ties between them are exactly
            # those explain shows.
            a = sin((phi2 - phi1) / 2) ** 2 + cos1 * cos2 * sin(radians(lon2 - lon1) / 2) ** 2
            distance = diameter * asin(min(1.0, sqrt(a)))
            append((distance, rank[member], distance))
        return keyed

    def _nearest(
        self, members: Container[_Member], cell: Cell, latitude: float, front: int
    ) -> list[_Keyed]:
        """The first ``front`` of ``members``, found in a latitude band around the cell that
        widens until they are known: a node outside a band of half-width w radians is at least
        w times the earth's radius away, so once ``front`` nodes in the band are nearer than
        that, no node outside can precede them. Most nodes are then never measured."""
        phi = math.radians(latitude)
        latitudes, order = self._latitudes, self._by_latitude
        found = self._keyed((m for m in self._unplaced if m in members), cell)
        low = high = bisect.bisect_left(latitudes, phi)
        width = _FIRST_BAND
        while True:
            wider_low = bisect.bisect_left(latitudes, phi - width)
            wider_high = bisect.bisect_right(latitudes, phi + width)
            found += self._keyed((m for m in order[wider_low:low] if m in members), cell)
            found += self._keyed((m for m in order[high:wider_high] if m in members), cell)
            low, high = wider_low, wider_high
            if len(found) >= front:
                found = heapq.nsmallest(front, found)
                # The margin covers rounding in the distances, which are never below the bound
                # by more than a few ulps.
                if found[-1][0] < EARTH_RADIUS_KM * width * (1 - 1e-9):
                    return found
            if low == 0 and high == len(order):
                return heapq.nsmallest(front, found)
            width *= 2


@dataclass(frozen=True, slots=True)
class Ranked:
    """The nodes config allows in one routing cell, per tier by distance; no live state.

    Built once per cell (it depends on nothing else), so a request only walks the front of
    it. Each tier is ordered by (distance, or 0 if unknown; heavier first; id).
    """

    #: Indexed by ``Tier``: the tier's nodes, nearest first.
    nodes: tuple[tuple[NodeConfig, ...], ...]
    #: Parallel to ``nodes``: each node's distance from the cell, None if either is unplaced.
    distances: tuple[tuple[float | None, ...], ...]
    #: Indexed by ``Tier``: whether nodes past those listed were left out.
    truncated: tuple[bool, ...]


def rank_nodes(
    index: NodeIndex, cell: Cell, policy: RoutingConfig, fronts: Sequence[int | None]
) -> Ranked:
    """Per tier, its first ``fronts[tier]`` nodes (None: all), nearest first."""
    max_tier = Tier(TIER_ORDER.index(policy.max_tier))
    tiers = [
        index.ranked(members, cell, front)
        for members, front in zip(index.tiers(cell, max_tier), fronts, strict=True)
    ]
    return Ranked(
        tuple(nodes for nodes, _, _ in tiers),
        tuple(distances for _, distances, _ in tiers),
        tuple(truncated for _, _, truncated in tiers),
    )


def deepen(
    index: NodeIndex, ranked: Ranked, cell: Cell, policy: RoutingConfig, tier: Tier, front: int
) -> Ranked:
    """``ranked`` (of ``cell``) with the first ``front`` nodes of ``tier``; the other tiers
    as they were."""
    members = index.tiers(cell, Tier(TIER_ORDER.index(policy.max_tier)))[tier]
    nodes, distances, truncated = index.ranked(members, cell, front)
    return Ranked(
        _replaced(ranked.nodes, tier, nodes),
        _replaced(ranked.distances, tier, distances),
        _replaced(ranked.truncated, tier, truncated),
    )


def _replaced(items: tuple[_T, ...], position: int, item: _T) -> tuple[_T, ...]:
    return (*items[:position], item, *items[position + 1 :])


def rank_rest(
    index: NodeIndex,
    cell: Cell,
    policy: RoutingConfig,
    tier: Tier,
    seen: Iterable[NodeConfig],
    admissible: Callable[[NodeConfig], bool],
) -> list[tuple[NodeConfig, float | None]]:
    """The nodes of ``tier`` other than ``seen`` that ``admissible`` accepts, nearest first.

    For walks past a deep front, where most nodes are down or lack the revision: filtering
    before measuring spares the distance to every node of the tier.
    """
    return index.rest(cell, Tier(TIER_ORDER.index(policy.max_tier)), tier, seen, admissible)


#: ``decide_ranked``'s source for walks past the front of a tier: given the tier, how many of
#: its nodes the walk has seen and which nodes it could admit, the tier's later nodes nearest
#: first. It may leave out nodes ``admissible`` rejects, asking it of nodes the walk would not
#: have reached.
Deeper = Callable[
    [Tier, int, Callable[[NodeConfig], bool]], Iterable[tuple[NodeConfig, float | None]]
]


def _past_front(
    deeper: Deeper,
    tier: Tier,
    seen: int,
    statuses: NodeStatuses,
    policy: RoutingConfig,
    unavailable: Callable[[NodeConfig], str | None],
) -> Iterator[tuple[NodeConfig, float | None]]:
    # A generator, so ``deeper`` is asked only when a walk gets past the front.
    def admissible(node: NodeConfig) -> bool:
        status = statuses.get(node.id, NODE_ASSUMED_UP)
        return _takes_clients(status, policy) and unavailable(node) is None

    yield from deeper(tier, seen, admissible)


def _walk(
    ranked: Ranked,
    tier: Tier,
    need: int,
    pool: bool,
    statuses: NodeStatuses,
    policy: RoutingConfig,
    unavailable: Callable[[NodeConfig], str | None],
    deeper: Deeper,
    reserve: list[Candidate],
    visited: dict[str, tuple[Tier, float | None]] | None = None,
) -> tuple[list[Candidate], float]:
    """The tier's candidates, sorted, exact for the best ``need`` (and for the near-equal pool
    when ``pool``): a node farther than both bounds cannot score into either. Also that bound:
    every candidate scoring within it is listed. Nodes at capacity go to ``reserve``, every
    node looked at to ``visited`` (with its tier and distance)."""
    nodes = ranked.nodes[tier]
    members: Iterable[tuple[NodeConfig, float | None]] = zip(
        nodes, ranked.distances[tier], strict=True
    )
    if ranked.truncated[tier]:
        past = _past_front(deeper, tier, len(nodes), statuses, policy, unavailable)
        members = chain(members, past)
    accepted: list[Candidate] = []
    scores: list[float] = []
    # The bounds change only when a node is accepted, so they are computed then.
    limit = math.inf
    near_km, near_ratio = policy.near_equal_km, policy.near_equal_ratio
    for node, distance in members:
        if (distance or 0.0) > limit:
            break
        if visited is not None:
            visited[node.id] = (tier, distance)
        status = statuses.get(node.id, NODE_ASSUMED_UP)
        if not _takes_clients(status, policy) or unavailable(node) is not None:
            continue
        candidate = Candidate(node, tier, distance, score(distance, status, policy))
        if _at_capacity(status):
            reserve.append(candidate)
            continue
        accepted.append(candidate)
        bisect.insort(scores, candidate.score)
        best = scores[0]
        band = best + max(near_km, best * near_ratio)
        needed = scores[need - 1] if len(scores) >= need else math.inf
        limit = max(band if pool else -math.inf, needed)
    else:
        limit = math.inf  # the whole tier was seen
    if len(accepted) > 1:
        accepted.sort(key=_by_preference)
    return accepted, limit


def decide_ranked(
    ranked: Ranked,
    statuses: NodeStatuses,
    policy: RoutingConfig,
    rng: random.Random,
    *,
    unavailable: Callable[[NodeConfig], str | None],
    deeper: Deeper,
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
    asked only of visited nodes. A walk that gets past the front ``ranked`` holds of a tier
    goes on with the nodes ``deeper`` gives. The decision lists the best ``keep`` candidates
    (the chosen node may not be among them) and no exclusions: explain uses ``decide``.
    """
    reserve: list[Candidate] = []

    def walk(tier: Tier, need: int, pool: bool) -> list[Candidate]:
        accepted, _ = _walk(
            ranked, tier, need, pool, statuses, policy, unavailable, deeper, reserve
        )
        return accepted

    found = _first_pool(walk, ranked.nodes, policy, keep)
    if found is not None:
        return _choose_first(found, policy, rng, key=key, recent=recent, warm_caches=warm_caches)
    # No tier had an eligible node, so every node was visited: the reserve is complete.
    reserve.sort(key=_by_preference)
    last_resort = choose(reserve, policy, rng, key=key, recent=recent, warm_caches=warm_caches)
    if last_resort is not None:
        return Decision(last_resort.node, "at_capacity_last_resort", (), ())
    return Decision(None, "no_eligible_node", (), ())


#: Given a tier, how many of its best candidates must be exact and whether its near-equal
#: pool must be too: the tier's candidates, best first, or None when that cannot be told.
_Take = Callable[[Tier, int, bool], list[Candidate] | None]


class PoolDraw(NamedTuple):
    """A near-equal pool, split for drawing: done once per pool, as a settled pool is drawn
    from by every request of its cell."""

    pool: Sequence[Candidate]
    #: The pool's cache nodes when there are several: they compete as one group (``choose``),
    #: in which the file picks. A lone cache is a group of one, so it is one of ``singles``.
    caches: tuple[Candidate, ...]
    #: One per group of one, in pool order; a lone cache last, where the caches' group goes.
    singles: tuple[Candidate, ...]
    #: Running totals of the singles' weights, as ``random.choices`` adds them up.
    cumulative: tuple[float, ...]


def pool_draw(pool: Sequence[Candidate]) -> PoolDraw:
    caches = tuple(c for c in pool if c.node.kind == "cache")
    singles = [c for c in pool if c.node.kind != "cache"]
    if len(caches) == 1:
        singles += caches
        caches = ()
    return PoolDraw(pool, caches, tuple(singles), tuple(accumulate(c.node.weight for c in singles)))


def _drawn(cumulative: Sequence[float], rng: random.Random) -> int:
    """The index ``random.choices`` draws with these running weights (the same RNG call and
    the same result), without its per-call setup."""
    return bisect.bisect(cumulative, rng.random() * cumulative[-1], 0, len(cumulative) - 1)


def draw_by_weight(draw: PoolDraw, rng: random.Random) -> Candidate | None:
    """The draw in a pool without a caches' group: it depends on nothing but the RNG."""
    singles = draw.singles
    if len(singles) <= 1:
        return singles[0] if singles else None
    return singles[_drawn(draw.cumulative, rng)]


#: The near-equal pool of the best tier that has a candidate, and the candidates a decision
#: lists (``keep`` of them, from that tier and later ones).
FirstPool = tuple[PoolDraw, tuple[Candidate, ...]]


def _first_pool(
    take: _Take, tiers: Sequence[object], policy: RoutingConfig, keep: int
) -> FirstPool | None:
    """The pool to choose in (``tiers``: falsy where a tier has no node); None when no tier
    has a candidate or ``take`` could not tell."""
    for tier in _TIERS:
        if not tiers[tier]:
            continue
        accepted = take(tier, keep, True)
        if accepted is None:
            return None
        pool = near_equals(accepted, policy)
        if not pool:
            continue
        shown = accepted[:keep]
        for later in _TIERS[tier + 1 :]:
            if len(shown) >= keep:
                break
            if not tiers[later]:
                continue
            need = keep - len(shown)
            more = take(later, need, False)
            if more is None:
                return None
            shown += more[:need]
        return pool_draw(pool), tuple(shown)
    return None


def _choose_first(
    found: FirstPool,
    policy: RoutingConfig,
    rng: random.Random,
    *,
    key: str,
    recent: Mapping[str, int] | None,
    warm_caches: Container[str],
) -> Decision:
    """The draw in ``_first_pool``'s pool. Drawn only once the pool is known, so that a
    ``take`` that cannot tell (and the walk that then decides) leaves the RNG as it was."""
    draw, shown = found
    chosen = _choose_in_pool(draw, policy, rng, key=key, recent=recent, warm_caches=warm_caches)
    assert chosen is not None  # the pool is not empty
    return Decision(chosen.node, _TIER_REASON[chosen.tier], shown, ())


class PreparedTier(NamedTuple):
    """One tier of a cell under one live state, before any revision check."""

    #: The tier's nodes that take clients and are under capacity, best first: every one of
    #: them scoring at most ``exact_to`` is here.
    candidates: tuple[Candidate, ...]
    #: Parallel to ``candidates``: whether the node may lack a file, so must be asked per file.
    checked: tuple[bool, ...]
    exact_to: float
    #: With no node to check, what ``_admit`` answers is the same for every file: its answers
    #: by (need, pool), filled as asked (never mutated by readers). None if a node is checked.
    settled: dict[tuple[int, bool], list[Candidate] | None] | None


class Prepared(NamedTuple):
    """What ``decide_ranked`` would walk in a cell if every node held every file."""

    #: Indexed by ``Tier``; None where the cell has no node of the tier.
    tiers: tuple[PreparedTier | None, ...]
    #: Every node whose status was read, by id, with its tier and distance: a change to
    #: another node cannot alter this (nor can some changes to these: ``after_change``).
    looked_at: Mapping[str, tuple[Tier, float | None]]
    #: The ids of the nodes the tiers list.
    listed: frozenset[str]
    #: By ``keep``: ``_first_pool``'s answer when it read only settled tiers, so is the same
    #: for every file; filled by the first request that asks, never changed once filled.
    settled_pools: dict[int, FirstPool | None]


def _holds_everything(node: NodeConfig) -> None:
    return None


def _takes_anything(node: NodeConfig) -> bool:
    return True


def prepare(
    ranked: Ranked,
    statuses: NodeStatuses,
    policy: RoutingConfig,
    deeper: Deeper,
    may_lack: Callable[[NodeConfig], bool],
    depth: int,
) -> Prepared:
    """The walks of ``decide_ranked`` for files every node holds, for requests to take with
    ``decide_prepared``: they then check revisions of the nodes listed, and only of those
    ``may_lack`` names (the same for every file).

    Each tier is exact for its best ``depth`` candidates, and for its near-equal pool up to
    the first tier with a candidate that holds every file: requests choose there or before.
    Tiers after enough such candidates are not walked at all.
    """
    looked_at: dict[str, tuple[Tier, float | None]] = {}

    def unfiltered(
        tier: Tier, seen: int, admissible: Callable[[NodeConfig], bool]
    ) -> Iterable[tuple[NodeConfig, float | None]]:
        # Past the front of a tier, every node is looked at, admissible or not, so that
        # ``looked_at`` names every node whose change could matter.
        return deeper(tier, seen, _takes_anything)

    tiers: list[PreparedTier | None] = []
    # Candidates in the tiers so far that hold every file.
    sure = 0
    for tier in _TIERS:
        if not ranked.nodes[tier]:
            tiers.append(None)
            continue
        if sure >= depth:
            tiers.append(_UNWALKED)
            continue
        accepted, exact_to = _walk(
            ranked, tier, depth, sure == 0, statuses, policy, _holds_everything, unfiltered, [],
            looked_at,
        )  # fmt: skip
        listed = tuple(c for c in accepted if c.score <= exact_to)
        checked = tuple(may_lack(c.node) for c in listed)
        sure += checked.count(False)
        tiers.append(PreparedTier(listed, checked, exact_to, None if any(checked) else {}))
    named = frozenset(c.node.id for view in tiers if view is not None for c in view.candidates)
    return Prepared(tuple(tiers), looked_at, named, {})


def after_change(
    prepared: Prepared, changed: Mapping[str, NodeStatus], policy: RoutingConfig
) -> Prepared | None:
    """``prepared`` under the new statuses of ``changed``, nodes it looked at, or None when it
    must be prepared again.

    It holds as it is when no changed node was listed or would be now: each takes no clients,
    is at capacity, or scores past its tier's exact bound. The nodes scoring within each
    bound, and so what each tier lists, are then the same (a walk made now could stop
    elsewhere, past the bound, which only makes it exact further). Listed nodes that still
    take clients and score within the bound only move: their tiers are put in order again,
    once for all of them, unless a tier's near-equal band would then reach past its bound.
    """
    moved_scores: dict[str, float] = {}
    moved_tiers: set[Tier] = set()
    for node_id, status in changed.items():
        listed = node_id in prepared.listed
        if not (_takes_clients(status, policy) and not _at_capacity(status)):
            if listed:
                return None
            continue
        tier, distance = prepared.looked_at[node_id]
        view = prepared.tiers[tier]
        new_score = score(distance, status, policy)
        if view is None or new_score > view.exact_to:
            if listed:
                return None
            continue
        if not listed:
            return None
        moved_scores[node_id] = new_score
        moved_tiers.add(tier)
    if not moved_scores:
        return prepared
    tiers = list(prepared.tiers)
    for tier in moved_tiers:
        view = tiers[tier]
        assert view is not None  # it lists a moved node
        moved = [
            (c._replace(score=moved_scores[c.node.id]) if c.node.id in moved_scores else c, flag)
            for c, flag in zip(view.candidates, view.checked, strict=True)
        ]
        moved.sort(key=lambda pair: _by_preference(pair[0]))
        best = moved[0][0].score
        if best + max(policy.near_equal_km, best * policy.near_equal_ratio) > view.exact_to:
            return None
        checked = tuple(flag for _, flag in moved)
        tiers[tier] = PreparedTier(
            tuple(c for c, _ in moved), checked, view.exact_to, None if any(checked) else {}
        )
    return Prepared(tuple(tiers), prepared.looked_at, prepared.listed, {})


#: A tier no request should need (so exact for nothing): one that does falls back to its walk.
_UNWALKED = PreparedTier((), (), -math.inf, None)


def _admit(
    view: PreparedTier,
    need: int,
    pool: bool,
    policy: RoutingConfig,
    unavailable: Callable[[NodeConfig], str | None],
) -> list[Candidate] | None:
    """``_walk``'s answer from a prepared tier: its candidates that hold the file, exact for
    the best ``need`` (and the near-equal pool when ``pool``); None when that needs nodes
    past the ones the preparation lists."""
    accepted: list[Candidate] = []
    band = -math.inf
    limit = math.inf
    for candidate, checked in zip(view.candidates, view.checked, strict=True):
        if candidate.score > limit:
            return accepted
        if checked and unavailable(candidate.node) is not None:
            continue
        accepted.append(candidate)
        if pool and len(accepted) == 1:
            best = candidate.score
            band = best + max(policy.near_equal_km, best * policy.near_equal_ratio)
        needed = accepted[need - 1].score if len(accepted) >= need else math.inf
        limit = band if band > needed else needed
    return accepted if limit <= view.exact_to else None


def _prepared_pool(
    prepared: Prepared,
    policy: RoutingConfig,
    keep: int,
    unavailable: Callable[[NodeConfig], str | None] | None,
) -> tuple[FirstPool | None, bool]:
    """``_first_pool`` over the prepared tiers, and whether it is the same for every file (it
    read no tier with a node checked per file), as it is then remembered. With no
    ``unavailable``, a checked tier is not read: the answer is (None, False)."""
    pools = prepared.settled_pools
    if keep in pools:
        return pools[keep], True
    views = prepared.tiers
    read_checked = False

    def admit(tier: Tier, need: int, pool: bool) -> list[Candidate] | None:
        nonlocal read_checked
        view = views[tier]
        assert view is not None  # _first_pool asks only of tiers that have nodes
        settled = view.settled
        if settled is None:
            read_checked = True
            return None if unavailable is None else _admit(view, need, pool, policy, unavailable)
        key = (need, pool)
        if key not in settled:
            settled[key] = _admit(view, need, pool, policy, _holds_everything)
        return settled[key]

    found = _first_pool(admit, views, policy, keep)
    if not read_checked:
        pools[keep] = found
    return found, not read_checked


def decide_prepared(
    prepared: Prepared,
    policy: RoutingConfig,
    rng: random.Random,
    *,
    unavailable: Callable[[NodeConfig], str | None],
    key: str = "",
    recent: Mapping[str, int] | None = None,
    warm_caches: Container[str] = frozenset(),
    keep: int = 1,
) -> Decision | None:
    """``decide_ranked``'s decision, from a preparation under the same live state: None when
    it cannot tell (no tier has a node that takes clients and holds the file, or too many of
    the listed nodes lack it), for ``decide_ranked`` to take."""
    found, _ = _prepared_pool(prepared, policy, keep, unavailable)
    if found is None:
        return None
    return _choose_first(found, policy, rng, key=key, recent=recent, warm_caches=warm_caches)


def settled_decision(
    prepared: Prepared,
    policy: RoutingConfig,
    rng: random.Random,
    *,
    key: str,
    recent: Mapping[str, int] | None,
    warm_caches: Container[str],
    keep: int,
) -> Decision | None:
    """``decide_prepared``'s decision, when no node its pool is chosen from is checked per
    file: the pool is then the same for every file, made once and remembered. None otherwise,
    for ``decide_prepared`` to take, before it draws."""
    pools = prepared.settled_pools
    if keep in pools:
        found = pools[keep]
    else:
        found, same_for_every_file = _prepared_pool(prepared, policy, keep, None)
        if not same_for_every_file:
            return None
    if found is None:
        return None
    draw, shown = found
    if draw.caches:
        chosen = _choose_in_pool(
            draw, policy, rng, key=key, recent=recent, warm_caches=warm_caches
        )  # fmt: skip
    else:
        # The common case, without the calls around it: the same draw.
        chosen = draw_by_weight(draw, rng)
    assert chosen is not None  # the pool is not empty
    return Decision(chosen.node, _TIER_REASON[chosen.tier], shown, ())


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
    draw = pool_draw(near_equals(candidates, policy))
    return _choose_in_pool(draw, policy, rng, key=key, recent=recent, warm_caches=warm_caches)


def _choose_in_pool(
    draw: PoolDraw,
    policy: RoutingConfig,
    rng: random.Random,
    *,
    key: str,
    recent: Mapping[str, int] | None,
    warm_caches: Container[str],
) -> Candidate | None:
    if not draw.caches:
        return draw_by_weight(draw, rng)
    caches = tuple(c for c in draw.caches if c.node.id in warm_caches) or draw.caches
    singles = draw.singles
    if singles:
        cumulative = (*draw.cumulative, draw.cumulative[-1] + sum(c.node.weight for c in caches))
        drawn = _drawn(cumulative, rng)
        if drawn < len(singles):
            return singles[drawn]
    if len(caches) == 1:
        return caches[0]
    chosen = bounded_rendezvous(
        [c.node for c in caches], key, recent or {}, policy.cache_load_bound
    )
    return next(c for c in caches if c.node is chosen)


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
    last_resort = choose(
        filtered.reserve, policy, rng, key=key, recent=recent, warm_caches=warm_caches
    )
    if last_resort is not None:
        return Decision(last_resort.node, "at_capacity_last_resort", (), excluded)
    return Decision(None, "no_eligible_node", (), excluded)
