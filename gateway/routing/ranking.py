"""Rankings: the nodes configuration allows in one place, per preference level, nearest first.

A ranking depends on the configuration and on the client's *cell* (the part of its location
the rule reads), never on live state, so the router keeps one per cell for as long as the
configuration holds. It orders each level's nodes by their cost before live state (distance
less the bonuses for sharing the client's network and country, ``rule.Cost``) and keeps the
first ``front`` of them and what the rest cost at least, which is all the rule needs as long
as the best costs stay within that reach (live state only adds to a cost);
where they do not (a dense place, most of the nearest nodes down or lacking the revision),
the router ranks the cell again with a wider front.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Collection, Container, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from gateway.config import NodeConfig, RoutingConfig
from gateway.geo.locator import Location
from gateway.routing.rule import (
    EARTH_RADIUS_KM,
    Exclusion,
    Tier,
    configured_exclusion,
    max_tier,
)

#: Nodes per level a ranking keeps at first. A request's read of a level stops within a few
#: nodes (at the median 11, at the 90th percentile 22 in the benchmark's 10,000-node world)
#: unless the near-equal pool is larger or most of the nearest nodes are down or lack the
#: revision. A front bounds a ranking's memory whatever the node count.
FRONT = 32
#: Half-width in radians (about 320 km) of the first latitude band searched for a level's front.
_FIRST_BAND = 0.05


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
#: A node ready for ranking: (its cost before live state, taking an unknown distance as 0; its
#: rank by weight and id; its distance).
_Keyed = tuple[float, int, float | None]
_Key = TypeVar("_Key")
#: Per node with any, its (network, country) bonuses for one cell.
_Bonuses = dict[_Member, tuple[float, float]]
_NO_BONUS = (0.0, 0.0)


def _group(
    nodes: tuple[NodeConfig, ...],
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


@dataclass(frozen=True, slots=True)
class Ranking:
    """One cell's nodes per level, cheapest first; ties go to the heavier node, then by id."""

    cell: Cell
    #: How many nodes of each level were kept at most.
    front: int
    #: Indexed by ``Level``: the level's first nodes with their distances.
    fronts: tuple[tuple[tuple[NodeConfig, float | None], ...], ...]
    #: Indexed by ``Level``: what every node past the front costs at least (``math.inf`` when
    #: the front is the whole level).
    reaches: tuple[float, ...]

    @property
    def size(self) -> int:
        """How many nodes the ranking keeps, in all levels."""
        return sum(map(len, self.fronts))


class NodeIndex:
    """The configured nodes arranged for ranking; built once per config.

    The enabled nodes are grouped by the countries, continents and ASNs that put them in a
    client's service area, tier or level, so ranking a location looks up a few groups rather than
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

    def ranking(self, cell: Cell, policy: RoutingConfig, front: int | None = None) -> Ranking:
        """The cell's ranking, keeping the first ``front`` (by default ``FRONT``) nodes of
        each level."""
        front = FRONT if front is None else front
        fronts = []
        reaches = []
        for members in self.levels(cell, policy):
            keyed = self._cheapest(members, cell, policy, front)
            fronts.append(self._listed(keyed))
            reaches.append(keyed[-1][0] if len(members) > len(keyed) else math.inf)
        return Ranking(cell, front, tuple(fronts), tuple(reaches))

    def explained(
        self, client: Location, policy: RoutingConfig
    ) -> tuple[list[list[tuple[NodeConfig, float | None]]], list[Exclusion]]:
        """Every level in full for ``client``, and the exclusions configuration makes: what
        explain shows. The levels are those a ranking of the client's cell gives."""
        cell = self.cell(client)
        levels = [
            list(self._listed(self._cheapest(members, cell, policy, None)))
            for members in self.levels(cell, policy)
        ]
        excluded = [
            found
            for node in self._nodes
            if isinstance(found := configured_exclusion(node, client, policy), Exclusion)
        ]
        return levels, excluded

    def levels(self, cell: Cell, policy: RoutingConfig) -> list[Collection[_Member]]:
        """Per level (``rule.Level``), the nodes configuration allows in ``cell``, in no
        particular order."""
        allowed = set(self._open)
        allowed.update(_in(self._serving_country, cell.country))
        allowed.update(_in(self._serving_continent, cell.continent))
        allowed.update(_in(self._serving_asn, cell.asn))
        widest = max_tier(policy)
        if widest is not Tier.ANY:
            groups = (
                _in(self._in_asn, cell.asn),
                _in(self._in_country, cell.country),
                _in(self._in_continent, cell.continent),
            )
            # max_tier: only nodes sharing the client's network, country or continent, as set.
            allowed.intersection_update(
                member for group in groups[: widest + 1] for member in group
            )
        domestic: Collection[_Member] = ()
        if cell.country is not None and cell.country in policy.domestic_first:
            domestic = [m for m in _in(self._in_country, cell.country) if m in allowed]
            allowed.difference_update(domestic)
        return [domestic, allowed]

    def _cheapest(
        self, members: Collection[_Member], cell: Cell, policy: RoutingConfig, front: int | None
    ) -> list[_Keyed]:
        """``members`` cheapest first: the first ``front`` of them, or all when None."""
        bonuses = self._bonuses(cell, policy)
        if front is None or len(members) <= front:
            return sorted(self._keyed(members, cell, bonuses))
        if cell.latitude is None or cell.longitude is None:
            return heapq.nsmallest(front, self._keyed(members, cell, bonuses))
        return self._nearest(set(members), cell, cell.latitude, front, bonuses)

    def _listed(self, keyed: list[_Keyed]) -> tuple[tuple[NodeConfig, float | None], ...]:
        by_rank = self._by_rank
        return tuple((by_rank[position], distance) for _, position, distance in keyed)

    def _bonuses(self, cell: Cell, policy: RoutingConfig) -> _Bonuses:
        """The nodes with a bonus for ``cell``'s clients: its network and country bonuses."""
        asn = frozenset(_in(self._in_asn, cell.asn))
        country = frozenset(_in(self._in_country, cell.country))
        return {
            member: (
                policy.asn_bonus_km if member in asn else 0.0,
                policy.country_bonus_km if member in country else 0.0,
            )
            for member in asn | country
        }

    def _keyed(self, members: Iterable[_Member], cell: Cell, bonuses: _Bonuses) -> list[_Keyed]:
        rank = self._rank
        keyed: list[_Keyed] = []
        append = keyed.append
        if cell.latitude is None or cell.longitude is None:
            for member in members:
                asn, country = bonuses.get(member, _NO_BONUS)
                append((0.0 - asn - country, rank[member], None))
            return keyed
        phi1 = math.radians(cell.latitude)
        cos1 = math.cos(phi1)
        lon1 = cell.longitude
        places = self._places
        # Names bound locally: this loop runs for thousands of nodes per cell.
        sin, asin, sqrt, radians = math.sin, math.asin, math.sqrt, math.radians
        diameter = 2 * EARTH_RADIUS_KM
        get = bonuses.get
        for member in members:
            place = places[member]
            asn, country = get(member, _NO_BONUS) if bonuses else _NO_BONUS
            if place is None:
                append((0.0 - asn - country, rank[member], None))
                continue
            phi2, cos2, lon2 = place
            # rule.distance_km term for term, and the bonuses subtracted as rule.Cost.total
            # does, so costs and the ties between them are exactly those explain shows.
            a = sin((phi2 - phi1) / 2) ** 2 + cos1 * cos2 * sin(radians(lon2 - lon1) / 2) ** 2
            distance = diameter * asin(min(1.0, sqrt(a)))
            append((distance - asn - country, rank[member], distance))
        return keyed

    def _nearest(
        self,
        members: Container[_Member],
        cell: Cell,
        latitude: float,
        front: int,
        bonuses: _Bonuses,
    ) -> list[_Keyed]:
        """The first ``front`` of ``members``, found in a latitude band around the cell that
        widens until they are known: a node outside a band of half-width w radians is at least
        w times the earth's radius away, and costs that less its bonuses, so once ``front``
        nodes in the band cost less than that, no node outside can precede them. Most nodes
        are then never measured."""
        phi = math.radians(latitude)
        latitudes, order = self._latitudes, self._by_latitude
        largest = max((asn + country for asn, country in bonuses.values()), default=0.0)
        found = self._keyed((m for m in self._unplaced if m in members), cell, bonuses)
        low = high = bisect.bisect_left(latitudes, phi)
        width = _FIRST_BAND
        while True:
            wider_low = bisect.bisect_left(latitudes, phi - width)
            wider_high = bisect.bisect_right(latitudes, phi + width)
            found += self._keyed((m for m in order[wider_low:low] if m in members), cell, bonuses)
            found += self._keyed((m for m in order[high:wider_high] if m in members), cell, bonuses)
            low, high = wider_low, wider_high
            if len(found) >= front:
                found = heapq.nsmallest(front, found)
                # The margin covers rounding in the distances, which are never below the bound
                # by more than a few ulps.
                if found[-1][0] < EARTH_RADIUS_KM * width * (1 - 1e-9) - largest:
                    return found
            if low == 0 and high == len(order):
                return heapq.nsmallest(front, found)
            width *= 2
