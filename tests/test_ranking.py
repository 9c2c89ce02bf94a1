"""Cached rankings: only the front of each tier is kept, keyed by what the ranking depends on.

The ranked request path must decide exactly as the full evaluation (``decide``) even when its
walks get past the kept front, as they do when most nearby nodes are down or lack the revision;
clients that differ only in a network no node cares about share one ranking; and a kept
ranking holds as many nodes whatever the number configured.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.clientip import ClientAddress, ForwardingHeaders
from gateway.config import GatewayConfig, NodeConfig, RoutingConfig, ServiceArea
from gateway.geo import DatabaseInfo, IPAddress, Location
from gateway.hfpath import FileRef
from gateway.policy import (
    Decision,
    NodeIndex,
    Ranked,
    Tier,
    deepen,
    distance_to,
    filter_nodes,
    prepare,
    rank_nodes,
)
from gateway.router import FRONT, MAX_FRONT, Router, route_key
from gateway.state import AdminRecord, LiveState, LoadRecord, NodeStatus, ProbeRecord

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


@settings(max_examples=300)
@given(nodes=nodes, client=clients, max_tier=tiers, front=st.integers(1, 5))
def test_a_front_is_the_start_of_the_full_ranking(
    nodes: list[NodeConfig], client: Location, max_tier: str, front: int
) -> None:
    policy = RoutingConfig(max_tier=max_tier)  # type: ignore[arg-type]
    index = NodeIndex(nodes)
    cell = index.cell(client)
    complete = rank_nodes(index, cell, policy, [None] * len(Tier))
    ranked = rank_nodes(index, cell, policy, [front] * len(Tier))
    for tier in Tier:
        assert ranked.nodes[tier] == complete.nodes[tier][:front]
        assert ranked.distances[tier] == complete.distances[tier][:front]
        assert ranked.truncated[tier] == (len(complete.nodes[tier]) > front)
        deeper = [front] * len(Tier)
        deeper[tier] = 2 * front
        assert deepen(index, ranked, cell, policy, tier, 2 * front) == rank_nodes(
            index, cell, policy, deeper
        )
    # The complete ranking is the order ``decide`` gives, distances included to the last bit.
    accepted = filter_nodes(nodes, client, {}, policy).accepted
    assert [(c.node, c.tier) for c in accepted] == [
        (node, tier) for tier in Tier for node in complete.nodes[tier]
    ]
    assert [c.distance_km for c in accepted] == [
        d for tier in Tier for d in complete.distances[tier]
    ]
    assert all(
        d == distance_to(node, client)
        for tier in Tier
        for node, d in zip(complete.nodes[tier], complete.distances[tier], strict=True)
    )


live = st.builds(
    NodeStatus,
    up=st.booleans() | st.just(False),
    latency_ms=st.one_of(st.none(), st.floats(0, 300)),
    load=st.one_of(st.none(), st.floats(0, 1.5)),
)


def twin_routers(
    nodes: list[NodeConfig], client: Location, near_km: float, max_tier: str, seed: int
) -> tuple[Router, Router]:
    """Two routers of one config with the same RNG seed: one for requests, one for reference."""
    policy = RoutingConfig(near_equal_km=near_km, max_tier=max_tier)  # type: ignore[arg-type]
    config = GatewayConfig(routing=policy, nodes=tuple(nodes))
    locator = FixedLocator({ip(1): client})
    requests, reference = (Router(config, locator, random.Random(seed)) for _ in range(2))
    return requests, reference


def assert_decides_as_full(fast: Decision, full: Decision) -> None:
    """The request path's decision is the full evaluation's, naming the same best candidates
    (at least as many as a redirect names)."""
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
    seed=st.integers(0, 2**32),
)
def test_walks_past_a_tiny_front_decide_as_the_full_evaluation(
    nodes: list[NodeConfig],
    client: Location,
    states: list[NodeStatus],
    missing: set[int],
    warm: set[int],
    near_km: float,
    max_tier: str,
    seed: int,
) -> None:
    """Most nodes down or without the revision: walks run past fronts of 2 nodes. The
    router's deepening of its kept rankings, and past a cap of 8 its per-request ranking of
    the admissible rest, must not change a decision, nor which caches hold the file."""
    statuses = {node.id: states[i] for i, node in enumerate(nodes)}
    revisions = Lacking(
        {node.id for i, node in enumerate(nodes) if i in missing},
        warm=frozenset(node.id for i, node in enumerate(nodes) if i in warm),
    )
    router, reference = twin_routers(nodes, client, near_km, max_tier, seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("gateway.router.FIRST_FRONTS", (2,) * len(Tier))
        patch.setattr("gateway.router.MAX_FRONT", 8)
        for _ in range(2):  # first with the fronts, then with the rankings the first deepened
            fast = router.route(REF, address(1), statuses, revisions=revisions).decision
            full = reference.route(REF, address(1), statuses, revisions=revisions, full=True)
            assert_decides_as_full(fast, full.decision)
    assert all(
        len(tier) <= 8 for ranked in router._ranked_by_cell.values() for tier in ranked.nodes
    )


class Lacking:
    """A revision check: the nodes named lack the revision. ``may_lack`` (by default, those
    same nodes) are the nodes checked per file, of which ``lacking`` lack this one; the caches
    in ``warm`` already hold the file."""

    may_lack_version = 0

    def __init__(
        self,
        lacking: set[str],
        may_lack: set[str] | None = None,
        warm: frozenset[str] = frozenset(),
    ) -> None:
        self.lacking = lacking
        self.checked = may_lack
        self.warm = warm

    def may_lack(self, node: NodeConfig) -> bool:
        return node.id in (self.lacking if self.checked is None else self.checked)

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


def stored_pairs(ranked: Ranked) -> int:
    return sum(len(tier) for tier in ranked.nodes) + sum(len(tier) for tier in ranked.distances)


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
    decisions = [router.route(REF, address(n)).decision for n in (1, 2, 3, 4)]
    # AS4134 (listed by n00000) and AS9808 (served by "mobile") each get their own ranking;
    # AS4808 is no different from no ASN at all.
    assert len(router._ranked_by_cell) == 3
    assert decisions[0].reason == "same_asn"
    assert decisions[1] == decisions[2]


def test_a_kept_ranking_does_not_grow_with_the_node_count() -> None:
    sizes = []
    for count in (FRONT + 1, 20 * FRONT):
        router = Router(GatewayConfig(nodes=world(count)), FixedLocator({ip(1): BEIJING}))
        router.route(REF, address(1))
        (ranked,) = router._ranked_by_cell.values()
        sizes.append(stored_pairs(ranked))
    # n00000 is alone in the ASN tier; the rest share the country tier, of which FRONT are kept.
    assert sizes == [2 * (1 + FRONT)] * 2


def test_a_large_near_equal_pool_deepens_the_kept_ranking_up_to_a_cap() -> None:
    # Every node within the near-equal band of the country tier: the decision needs them all.
    policy = RoutingConfig(near_equal_km=5000.0)
    client = replace(BEIJING, asn=None)
    for count, deepest in ((3 * FRONT, 3 * FRONT), (2 * MAX_FRONT, MAX_FRONT)):
        nodes = world(count)
        config = GatewayConfig(routing=policy, nodes=nodes)
        router = Router(config, FixedLocator({ip(1): client}), random.Random(7))
        reference = Router(config, FixedLocator({ip(1): client}), random.Random(7))
        for _ in range(3):
            fast = router.route(REF, address(1)).decision
            full = reference.route(REF, address(1), full=True).decision
            assert (fast.node, fast.reason) == (full.node, full.reason)
        (ranked,) = router._ranked_by_cell.values()
        # Doubled from FRONT until the walk fits: all of a tier of 3 * FRONT, or the cap (past
        # which walks rank the rest per request).
        assert len(ranked.nodes[Tier.COUNTRY]) == deepest


#: A status change: node index, probe verdict and latency, admin mode, load (of capacity).
status_changes = st.tuples(
    st.integers(0, 59),
    st.booleans() | st.just(True),
    st.one_of(st.none(), st.floats(0, 300)),
    st.sampled_from(["active", "active", "draining", "disabled"]),
    st.one_of(st.none(), st.floats(0, 1.5)),
)


def apply_change(live: LiveState, node: NodeConfig, change: tuple, at: float) -> None:
    _, up, latency, mode, load = change
    live.apply_probe(ProbeRecord(node.id, "here", up, "" if up else "timeout", latency, at, None))
    live.apply_admin(AdminRecord(node.id, mode, at))
    connections = None if load is None else load * 100
    live.apply_load(LoadRecord(node.id, "status-json", connections, None, 100, None, at))


@settings(max_examples=300)
@given(
    nodes=nodes,
    client=clients,
    changes=st.lists(status_changes, min_size=1, max_size=12),
    missing=st.sets(st.integers(0, 59), min_size=20),
    near_km=st.sampled_from([0.0, 100.0, 5000.0]),
    max_tier=tiers,
    slack=st.integers(0, 3),
    forget_all_at=st.sampled_from([0, 256]),
    seed=st.integers(0, 2**32),
)
def test_prepared_walks_follow_every_status_change(
    nodes: list[NodeConfig],
    client: Location,
    changes: list[tuple],
    missing: set[int],
    near_km: float,
    max_tier: str,
    slack: int,
    forget_all_at: int,
    seed: int,
) -> None:
    """Requests take a cell's prepared walks while the nodes they read are unchanged, and must
    still decide as the full evaluation after every change to any node, with little slack for
    nodes lacking the file (so that requests also fall back to walking the ranking). Requests
    alternate between that file and one that the same nodes may lack but hold."""
    live = LiveState(nodes, vantage="here", probing=True)
    lacking = {node.id for i, node in enumerate(nodes) if i in missing}
    files = (Lacking(lacking), Lacking(set(), may_lack=lacking))
    router, reference = twin_routers(nodes, client, near_km, max_tier, seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("gateway.router.FIRST_FRONTS", (2,) * len(Tier))
        patch.setattr("gateway.router.MAX_FRONT", 8)
        patch.setattr("gateway.router.PREPARED_SLACK", slack)
        patch.setattr("gateway.router.FORGET_ALL_AT", forget_all_at)
        for step, change in enumerate(changes, start=1):
            if nodes:
                apply_change(live, nodes[change[0] % len(nodes)], change, float(step))
            # Later requests take what the first prepared.
            for revisions in files + files:
                fast = router.route(
                    REF, address(1), live.statuses, revisions=revisions, changes=live
                ).decision
                full = reference.route(
                    REF, address(1), live.statuses, revisions=revisions, full=True
                ).decision
                assert_decides_as_full(fast, full)


@settings(max_examples=300)
@given(
    nodes=nodes,
    client=clients,
    latencies=st.lists(st.floats(0, 300), min_size=60, max_size=60),
    changes=st.lists(st.lists(status_changes, min_size=1, max_size=4), min_size=1, max_size=12),
    warm=st.sets(st.integers(0, 59)),
    near_km=st.sampled_from([0.0, 100.0, 5000.0]),
    max_tier=tiers,
    seed=st.integers(0, 2**32),
)
def test_a_settled_pool_is_drawn_from_as_route_draws(
    nodes: list[NodeConfig],
    client: Location,
    latencies: list[float],
    changes: list[list[tuple]],
    warm: set[int],
    near_km: float,
    max_tier: str,
    seed: int,
) -> None:
    """With nodes that hold every file, a cell's pool is settled, the same for every file.
    ``Router.settled`` then decides as ``route`` does (a caches' group by the file and the
    caches holding it), drawing the same number from the RNG. Every node is
    up at first, then nodes change, a few at a time: preparations kept through changes
    (``after_change``) must still decide as the full evaluation."""
    live = LiveState(nodes, vantage="here", probing=True)
    for node, latency in zip(nodes, latencies, strict=False):
        up(live, node.id, latency, 0.0)
    revisions = Lacking(set(), warm=frozenset(n.id for i, n in enumerate(nodes) if i in warm))
    router, reference = twin_routers(nodes, client, near_km, max_tier, seed)
    for step, batch in enumerate(changes, start=1):
        for change in batch if nodes else ():
            apply_change(live, nodes[change[0] % len(nodes)], change, float(step))
        for _ in range(2):
            settled = settled_draw(router, live, revisions)
            routed = router.route(
                REF, address(1), live.statuses, revisions=revisions, changes=live
            ).decision
            full = reference.route(REF, address(1), live.statuses, revisions=revisions, full=True)
            assert_decides_as_full(routed, full.decision)
            # Only a client with no node taking clients is left to ``route``.
            left = routed.reason in {"no_eligible_node", "at_capacity_last_resort"}
            assert (settled is None) == left
            if settled is not None:
                assert settled == (routed, router._rng.getstate())


def settled_draw(
    router: Router, live: LiveState, revisions: Lacking
) -> tuple[Decision, object] | None:
    """``Router.settled``'s decision for ``address(1)`` and the RNG's state after it, with the
    RNG then put back, so that ``route`` draws next as if ``settled`` had not been asked."""
    cell = router.place(str(ip(1)), ForwardingHeaders()).cell
    before = router._rng.getstate()
    decision = router.settled(
        cell, live.statuses, live, revisions, key=route_key(REF), recent=None, warm_caches=revisions
    )
    after = router._rng.getstate()
    router._rng.setstate(before)
    return None if decision is None else (decision, after)


def up(live: LiveState, node_id: str, latency_ms: float, at: float) -> None:
    live.apply_probe(ProbeRecord(node_id, "here", True, "", latency_ms, at, at))


def test_a_preparation_is_dropped_only_when_a_node_it_read_changes() -> None:
    nodes = world(4 * FRONT)
    live = LiveState(nodes, vantage="here", probing=True)
    for node in nodes:
        up(live, node.id, 10.0, 1.0)
    router = Router(GatewayConfig(nodes=nodes), FixedLocator({ip(1): BEIJING}))

    def prepared() -> object:
        router.route(REF, address(1), live.statuses, changes=live)
        (preparation,) = router._prepared.values()
        return preparation

    first = prepared()
    read = set(first.looked_at)  # type: ignore[attr-defined]
    unread = [node.id for node in nodes if node.id not in read]
    assert read and unread, "the cell's walks read some of the nodes, not all"
    up(live, unread[0], 20.0, 2.0)
    assert prepared() is first
    up(live, sorted(read)[0], 20.0, 3.0)
    second = prepared()
    assert second is not first
    # Every node read by the kept preparation knows its cell, and no other node does.
    assert set(router._readers) == set(second.looked_at)  # type: ignore[attr-defined]


def test_a_listed_node_whose_score_moves_is_put_in_order_not_prepared_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Load moves a listed node's score within its tier's exact bound: the preparation is
    kept with the node in its new place (``after_change``), and decides as the full evaluation."""
    client = replace(BEIJING, asn=None, asn_org=None)
    nodes = world(20)
    live = LiveState(nodes, vantage="here", probing=True)
    for node in nodes:
        up(live, node.id, 10.0, 1.0)
    config = GatewayConfig(nodes=nodes, routing=RoutingConfig(near_equal_km=0))
    router, reference = (
        Router(config, FixedLocator({ip(1): client}), random.Random(1)) for _ in "ab"
    )
    first = router.route(REF, address(1), live.statuses, changes=live).decision
    reference.route(REF, address(1), live.statuses, full=True)
    (cell,) = router._prepared
    prepared = router._prepared[cell]
    best, _, third = first.candidates[:3]
    view = prepared.tiers[best.tier]
    assert view is not None and third.score < view.exact_to
    # Just behind the third: a load that adds the gap, as a fraction of capacity.
    load = (third.score - best.score + 1.0) / config.routing.load_penalty_km
    prepares = []
    monkeypatch.setattr("gateway.router.prepare", lambda *a: prepares.append(a) or prepare(*a))
    live.apply_load(LoadRecord(best.node.id, "status-json", load * 100, None, 100, None, 2.0))
    moved = router.route(REF, address(1), live.statuses, changes=live).decision
    full = reference.route(REF, address(1), live.statuses, full=True).decision
    assert not prepares and router._prepared[cell] is not prepared
    assert_decides_as_full(moved, full)
    assert moved.candidates[0].node != best.node
    assert best.node in [c.node for c in moved.candidates]


def test_a_read_node_that_comes_up_within_the_bound_is_prepared_again() -> None:
    """The nearest node was down when its cell was prepared (read, not listed). Up again, it
    scores within the tier's exact bound, so the preparation is made again and lists it."""
    client = replace(BEIJING, asn=None, asn_org=None)
    nodes = world(20)
    nearest = min(nodes, key=lambda node: distance_to(node, client) or 0.0)
    live = LiveState(nodes, vantage="here", probing=True)
    for node in nodes:
        if node is not nearest:
            up(live, node.id, 10.0, 1.0)
    config = GatewayConfig(nodes=nodes)
    router, reference = (
        Router(config, FixedLocator({ip(1): client}), random.Random(1)) for _ in "ab"
    )
    first = router.route(REF, address(1), live.statuses, changes=live).decision
    reference.route(REF, address(1), live.statuses, full=True)
    (prepared,) = router._prepared.values()
    assert nearest.id in prepared.looked_at and nearest.id not in prepared.listed
    up(live, nearest.id, 10.0, 2.0)
    later = router.route(REF, address(1), live.statuses, changes=live).decision
    full = reference.route(REF, address(1), live.statuses, full=True).decision
    assert_decides_as_full(later, full)
    assert nearest not in [c.node for c in first.candidates]
    assert later.candidates[0].node is nearest


def test_evicted_preparations_leave_no_readers_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.router.RANKED_CELLS", 2)
    places = {ip(n): Location("CN", "AS", 30.0 + n, 110.0 + n, None, None) for n in range(1, 6)}
    nodes = world(10)
    live = LiveState(nodes, vantage="here", probing=True)
    router = Router(GatewayConfig(nodes=nodes), FixedLocator(places))
    for n in places:
        router.route(REF, ClientAddress(n, "peer"), live.statuses, changes=live)
    assert len(router._prepared) == 2
    readers = {cell for cells in router._readers.values() for cell in cells}
    assert readers == set(router._prepared)


def test_requests_walk_the_ranking_when_prepared_nodes_lack_the_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gateway.router.PREPARED_SLACK", 0)
    client = replace(BEIJING, asn=None, asn_org=None)
    nodes = world(20)
    live = LiveState(nodes, vantage="here", probing=True)
    for node in nodes:
        up(live, node.id, 10.0, 1.0)
    nearest = sorted(nodes, key=lambda node: distance_to(node, client) or 0.0)
    # The preparation lists the 4 best (3 duplicates and the chosen node), of which 3 lack it.
    revisions = Lacking({node.id for node in nearest[:3]})
    router = Router(GatewayConfig(nodes=nodes), FixedLocator({ip(1): client}))
    for _ in range(2):
        decision = router.route(
            REF, address(1), live.statuses, revisions=revisions, changes=live
        ).decision
        assert [c.node for c in decision.candidates] == nearest[3:7]
        assert decision.reason == "same_country"


def test_preparations_follow_what_may_be_lacking() -> None:
    """A node that starts to lack files (say, a cache caught corrupting one) is checked from
    the next request on, though the preparation was made when it could lack nothing."""
    client = replace(BEIJING, asn=None, asn_org=None)
    nodes = world(6)
    live = LiveState(nodes, vantage="here", probing=True)
    for node in nodes:
        up(live, node.id, 10.0, 1.0)
    router = Router(
        GatewayConfig(nodes=nodes, routing=RoutingConfig(near_equal_km=0)),
        FixedLocator({ip(1): client}),
    )
    revisions = Lacking(set())
    first = router.route(REF, address(1), live.statuses, revisions=revisions, changes=live)
    assert first.decision.node is not None
    revisions.lacking = {first.decision.node.id}
    revisions.may_lack_version = 1
    for _ in range(20):
        later = router.route(REF, address(1), live.statuses, revisions=revisions, changes=live)
        assert later.decision.node is not None
        assert first.decision.node.id not in [c.node.id for c in later.decision.candidates]


def test_at_capacity_a_cache_holding_the_file_is_the_last_resort_on_every_path() -> None:
    """With every node full, the last resort among near-equal caches is one that holds the
    file, whether a redirect or explain (the full evaluation) decides."""
    client = replace(BEIJING, asn=None, asn_org=None)
    caches = tuple(
        NodeConfig(f"cache{i}", f"https://c{i}.example", kind="cache", country="CN",
                   latitude=39.9, longitude=116.4)
        for i in range(4)
    )  # fmt: skip
    full = {cache.id: NodeStatus(load=1.5) for cache in caches}
    revisions = Lacking(set(), warm=frozenset({"cache2"}))
    for seed in range(20):
        router, reference = twin_routers(list(caches), client, 100.0, "any", seed)
        ref = REF._replace(filename=f"shard-{seed}.bin")
        fast = router.route(ref, address(1), full, revisions=revisions).decision
        explained = reference.route(ref, address(1), full, revisions=revisions, full=True)
        assert fast.reason == explained.decision.reason == "at_capacity_last_resort"
        assert fast.node == explained.decision.node == caches[2]


def test_a_settled_caches_group_sends_each_file_to_a_cache_holding_it() -> None:
    """A pool of near-equal caches is settled like any other: ``Router.settled`` picks by the
    file, the cache holding it first, as ``route`` does."""
    client = replace(BEIJING, asn=None, asn_org=None)
    caches = [
        NodeConfig(f"cache{i}", f"https://c{i}.example", kind="cache", country="CN",
                   latitude=39.9, longitude=116.4)
        for i in range(4)
    ]  # fmt: skip
    live = LiveState(caches, vantage="here", probing=True)
    for cache in caches:
        up(live, cache.id, 20.0, 0.0)
    router, reference = twin_routers(caches, client, 100.0, "any", 7)
    cell = router.place(str(ip(1)), ForwardingHeaders()).cell
    picked = set()
    for n in range(20):
        ref = REF._replace(filename=f"shard-{n}.bin")
        warm = Lacking(set(), warm=frozenset({f"cache{n % 4}"}))
        settled = router.settled(
            cell, live.statuses, live, warm, key=route_key(ref), recent=None, warm_caches=warm
        )
        routed = reference.route(ref, address(1), live.statuses, revisions=warm, changes=live)
        assert settled is not None and settled.node == routed.decision.node == caches[n % 4]
        cold = Lacking(set())
        settled = router.settled(
            cell, live.statuses, live, cold, key=route_key(ref), recent=None, warm_caches=cold
        )
        routed = reference.route(ref, address(1), live.statuses, revisions=cold, changes=live)
        assert settled is not None and settled.node == routed.decision.node
        picked.add(settled.node.id)
    assert len(picked) > 1, "cold files should spread over the caches"
