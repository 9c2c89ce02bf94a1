"""Cached rankings: only the front of each level is kept, keyed by what the ranking depends on.

A request must decide exactly as explain's reading of every node even when it reads past the
kept front, as it does when most nearby nodes are down or lack the revision; clients that
differ only in a network no node cares about share one ranking; and a kept ranking holds as
many nodes whatever the number configured.
"""

from __future__ import annotations

import ipaddress
import math
import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import GatewayConfig, NodeConfig, RoutingConfig, ServiceArea
from gateway.geo.clientip import ClientAddress
from gateway.geo.locator import DatabaseInfo, IPAddress, Location
from gateway.hf.paths import FileRef
from gateway.routing import ranking
from gateway.routing.ranking import FRONT, NodeIndex
from gateway.routing.router import WIDEN, Router
from gateway.routing.rule import LEVELS, Decision, Level, cost, distance_to
from gateway.state.live import NodeStatus

# Few distinct places, so that equal distances (and the weight/id tie-break) are common.
PLACES = [(39.9, 116.4), (31.2, 121.5), (35.7, 139.7), (50.1, 8.7), (-33.9, 151.2), (0.0, 0.0),
          (89.5, 10.0), (-89.5, -170.0), (1.3, 179.9), (1.3, -179.9)]  # fmt: skip
places = st.one_of(st.sampled_from(PLACES), st.tuples(st.floats(-90, 90), st.floats(-180, 180)))
nodes = st.lists(
    st.builds(
        lambda node_id, place, located, **fields: NodeConfig(
            node_id,
            "https://n.example",
            latitude=place[0] if located else None,
            longitude=place[1] if located else None,
            **fields,
        ),
        node_id=st.uuids().map(str),
        place=places,
        located=st.booleans() | st.just(True),
        kind=st.sampled_from(["mirror", "cache"]),
        country=st.sampled_from(["CN", "JP", "DE", None]),
        continent=st.sampled_from(["AS", "EU", None]),
        asns=st.frozensets(st.sampled_from([4134, 2516]), max_size=1),
        weight=st.sampled_from([0.5, 1.0, 2.0]),
        enabled=st.booleans() | st.just(True),
        serves=st.sampled_from(
            [
                ServiceArea(),
                ServiceArea(countries=frozenset({"CN"})),
                ServiceArea(asns=frozenset({2516})),
            ]
        ),
    ),
    max_size=60,
    unique_by=lambda node: node.id,
)
clients = st.builds(
    Location,
    country=st.sampled_from(["CN", "JP", "DE", None]),
    continent=st.sampled_from(["AS", "EU", None]),
    latitude=st.one_of(st.none(), st.sampled_from([p[0] for p in PLACES]), st.floats(-90, 90)),
    longitude=st.one_of(st.none(), st.sampled_from([p[1] for p in PLACES]), st.floats(-180, 180)),
    asn=st.sampled_from([None, 4134, 2516, 64512]),
)
tiers = st.sampled_from(["asn", "country", "continent", "any"])
domestic = st.sampled_from([frozenset(), frozenset({"CN"}), frozenset({"CN", "JP"})])


@settings(max_examples=300)
@given(
    nodes=nodes, client=clients, max_tier=tiers, domestic_first=domestic, front=st.integers(1, 5)
)
def test_a_front_is_the_start_of_the_full_ranking(
    nodes: list[NodeConfig],
    client: Location,
    max_tier: str,
    domestic_first: frozenset[str],
    front: int,
) -> None:
    policy = RoutingConfig(max_tier=max_tier, domestic_first=domestic_first)  # type: ignore[arg-type]
    index = NodeIndex(nodes)
    complete, _ = index.explained(client, policy)
    kept = index.ranking(index.cell(client), policy, front)
    whole = index.ranking(index.cell(client), policy, len(nodes))
    for level in LEVELS:
        full = list(complete[level])
        assert list(kept.fronts[level]) == full[:front]
        assert list(whole.fronts[level]) == full
        assert all(d == distance_to(node, client) for node, d in full)
        # Every node past the front costs at least the front's reach.
        if len(full) > front:
            costs = [cost(node, d, client, NodeStatus(), policy).total for node, d in full]
            assert costs == sorted(costs)
            assert all(c >= kept.reaches[level] for c in costs[front:])
        else:
            assert kept.reaches[level] == math.inf
    # Domestic-first clients see their country's nodes, and only those, first.
    home = client.country in domestic_first
    assert all(home and node.country == client.country for node, _ in complete[Level.DOMESTIC])


live = st.builds(
    NodeStatus,
    up=st.booleans() | st.just(False),
    latency_ms=st.one_of(st.none(), st.floats(0, 300)),
    load=st.one_of(st.none(), st.floats(0, 1.5)),
)


def assert_decides_as_explained(fast: Decision, full: Decision) -> None:
    """A request's decision is explain's, naming the same best candidates (at least as many
    as a redirect names)."""
    assert (fast.node, fast.reason) == (full.node, full.reason)
    assert fast.candidates == full.candidates[: len(fast.candidates)]
    assert len(fast.candidates) >= min(4, len(full.candidates))


@settings(max_examples=300)
@given(
    nodes=nodes,
    client=clients,
    states=st.lists(live, min_size=60, max_size=60),
    missing=st.sets(st.integers(0, 59), min_size=20),
    warm=st.sets(st.integers(0, 59)),
    near_km=st.sampled_from([0.0, 100.0, 5000.0]),
    max_tier=tiers,
    domestic_first=domestic,
    asn_bonus_km=st.sampled_from([0.0, 100.0, 3000.0]),
    seed=st.integers(0, 2**32),
)
def test_reads_past_a_tiny_front_decide_as_explain(
    nodes: list[NodeConfig],
    client: Location,
    states: list[NodeStatus],
    missing: set[int],
    warm: set[int],
    near_km: float,
    max_tier: str,
    domestic_first: frozenset[str],
    asn_bonus_km: float,
    seed: int,
) -> None:
    """Most nodes down or without the revision: requests read past fronts of 2 nodes. That
    must not change a decision, nor which caches hold the file; neither may the cache of
    priced candidates, as the live state moves on (a new version)."""
    statuses = {node.id: states[i] for i, node in enumerate(nodes)}
    revisions = Lacking(
        {node.id for i, node in enumerate(nodes) if i in missing},
        warm=frozenset(node.id for i, node in enumerate(nodes) if i in warm),
    )
    policy = RoutingConfig(
        near_equal_km=near_km,
        max_tier=max_tier,  # type: ignore[arg-type]
        domestic_first=domestic_first,
        asn_bonus_km=asn_bonus_km,
    )
    config = GatewayConfig(routing=policy, nodes=tuple(nodes))
    # The next version of the live state: every load moved, latencies gone.
    later = {
        node_id: replace(status, load=None if status.load is None else 1.2 - status.load)
        for node_id, status in statuses.items()
    }
    locator = FixedLocator({ip(1): client})
    router, reference = (Router(config, locator, random.Random(seed)) for _ in range(2))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ranking, "FRONT", 2)
        # First scoring the cell, then from the cached candidates, then after a change.
        for version, state in ((1, statuses), (1, statuses), (2, later), (2, later)):
            placed = router.placement(address(1))
            fast = router.route(REF, placed, state, revisions=revisions, version=version)
            full = reference.route(REF, placed, state, revisions=revisions, explain=True)
            assert_decides_as_explained(fast.decision, full.decision)


class Lacking:
    """A revision check: the nodes named lack the revision. ``may_lack`` (by default, those
    same nodes) are the nodes checked per file, of which ``lacking`` lack this one; the caches
    in ``warm`` already hold the file."""

    def __init__(
        self,
        lacking: set[str],
        may_lack: set[str] | None = None,
        warm: frozenset[str] = frozenset(),
    ) -> None:
        self.lacking = lacking
        self.checked = may_lack
        self.warm = warm

    def reason(self, node: NodeConfig) -> str | None:
        return "not synced" if node.id in self.lacking else None

    def revision_for(self, node_id: str) -> str | None:
        return None

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.warm


class FixedLocator:
    """Addresses placed where the test says."""

    databases: tuple[DatabaseInfo, ...] = ()

    def __init__(self, places: dict[IPAddress, Location]) -> None:
        self.places = places

    def locate(self, ip: IPAddress) -> Location:
        return self.places[ip]

    def close(self) -> None:
        pass


REF = FileRef("model", "org/model", "0" * 40, "config.json")
BEIJING = Location("CN", "AS", 39.9, 116.4, 4134, "CHINANET")


def ip(n: int) -> IPAddress:
    return ipaddress.ip_address(f"192.0.2.{n}")


def address(n: int) -> ClientAddress:
    return ClientAddress(ip(n), "peer")


def world(count: int, *, near: Location = BEIJING) -> tuple[NodeConfig, ...]:
    """``count`` open nodes around ``near``, one of them in AS4134, spread over a few degrees."""
    assert near.latitude is not None and near.longitude is not None
    rng = random.Random(count)
    return tuple(
        NodeConfig(
            f"n{i:05d}",
            f"https://n{i}.example",
            country=near.country,
            continent=near.continent,
            latitude=near.latitude + rng.uniform(-5, 5),
            longitude=near.longitude + rng.uniform(-5, 5),
            asns=frozenset({4134}) if i == 0 else frozenset(),
        )
        for i in range(count)
    )


def test_clients_differing_only_in_an_unreferenced_asn_share_a_ranking() -> None:
    clients = {
        ip(1): BEIJING,
        ip(2): replace(BEIJING, asn=4808, asn_org="UNICOM"),  # no node lists AS4808
        ip(3): replace(BEIJING, asn=None, asn_org=None),
        ip(4): replace(BEIJING, asn=9808, asn_org="MOBILE"),  # a node serves AS9808
    }
    nodes = (
        *world(3),
        replace(world(1)[0], id="mobile", serves=ServiceArea(asns=frozenset({9808}))),
    )
    router = Router(GatewayConfig(nodes=nodes), FixedLocator(clients), random.Random(1))
    decisions = [router.route(REF, router.placement(address(n))).decision for n in (1, 2, 3, 4)]
    # AS4134 (listed by n00000) and AS9808 (served by "mobile") each get their own ranking;
    # AS4808 is no different from no ASN at all.
    assert len(router._cells) == 3
    explained = router.route(REF, router.placement(address(1)), explain=True).decision
    bonuses = {c.node.id: c.cost.asn_bonus_km for c in explained.candidates}
    assert bonuses["n00000"] == RoutingConfig().asn_bonus_km
    assert decisions[1] == decisions[2]


def test_a_kept_ranking_does_not_grow_with_the_node_count() -> None:
    sizes = []
    # 640 nodes within 5 degrees put FRONT of them within ~120 km: a near-equal band that
    # wide could not be told from a front, and the cell would be widened.
    narrow = RoutingConfig(near_equal_km=20.0)
    for count in (FRONT + 1, 20 * FRONT):
        config = GatewayConfig(routing=narrow, nodes=world(count))
        router = Router(config, FixedLocator({ip(1): BEIJING}))
        router.route(REF, router.placement(address(1)))
        ((_, entry),) = router._cells.newest_first()
        sizes.append(entry.ranking.size)
    # All in one level, of which FRONT are kept.
    assert sizes == [FRONT] * 2


def test_a_cell_whose_nearest_nodes_cannot_tell_is_widened_and_stays_wide() -> None:
    nodes = world(20 * FRONT)
    locator = FixedLocator({ip(1): BEIJING})
    # Seeded alike, so that both draw the same node among near-equals.
    router = Router(GatewayConfig(nodes=nodes), locator, random.Random(1))
    reference = Router(GatewayConfig(nodes=nodes), locator, random.Random(1))
    placed = router.placement(address(1))
    nearest = router._index.ranking(placed.cell, router.config.routing).fronts[Level.OPEN]
    # Every node a first ranking keeps lacks the revision: only a wider front can tell.
    revisions = Lacking({node.id for node, _ in nearest})
    route = router.route(REF, placed, revisions=revisions, version=1)
    explained = reference.route(REF, placed, revisions=revisions, explain=True)
    assert route.decision.node is not None and route.decision.node == explained.decision.node
    ((_, entry),) = router._cells.newest_first()
    assert entry.ranking.front == FRONT * WIDEN
    assert router._cells.weight == entry.ranking.size > FRONT
    router.route(REF, placed, revisions=revisions, version=1)
    ((_, again),) = router._cells.newest_first()
    assert again is entry  # decided from the wide ranking, not widened again
