from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Container, Mapping, Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import Capacity, NodeConfig, RoutingConfig, ServiceArea
from gateway.geo.locator import UNKNOWN_LOCATION, Location
from gateway.routing.ranking import NodeIndex
from gateway.routing.router import WIDEN
from gateway.routing.rule import (
    LEVELS,
    Candidate,
    Cost,
    Decision,
    Exclusion,
    LevelCandidates,
    Tier,
    at_capacity,
    bounded_rendezvous,
    choose,
    configured_exclusion,
    cost,
    decide,
    distance_km,
    level_of,
    near_equal_bound,
    priced,
    rendezvous_order,
    score_level,
    shares,
    takes_clients,
)
from gateway.state.live import NO_LIVE_STATE, NodeStatus

CN_ONLY = ServiceArea(countries=frozenset({"CN"}))

BEIJING = NodeConfig(
    "bj", "https://bj.example", country="CN", continent="AS", latitude=39.9042,
    longitude=116.4074, asns=frozenset({4134}), serves=CN_ONLY,
)  # fmt: skip
SHANGHAI = NodeConfig(
    "sh", "https://sh.example", country="CN", continent="AS", latitude=31.2304,
    longitude=121.4737, asns=frozenset({4837}), serves=CN_ONLY,
)  # fmt: skip
GUANGZHOU = NodeConfig(
    "gz", "https://gz.example", kind="cache", country="CN", continent="AS", latitude=23.1291,
    longitude=113.2644, serves=CN_ONLY,
)  # fmt: skip
TOKYO = NodeConfig(
    "tokyo", "https://tk.example", country="JP", continent="AS", latitude=35.6762,
    longitude=139.6503, serves=ServiceArea(continents=frozenset({"AS"})),
)  # fmt: skip
FRANKFURT = NodeConfig(
    "fra", "https://fra.example", country="DE", continent="EU", latitude=50.1109, longitude=8.6821
)
SWITCHED_OFF = replace(FRANKFURT, id="off", enabled=False)
NODES = (BEIJING, SHANGHAI, GUANGZHOU, TOKYO, FRANKFURT, SWITCHED_OFF)

BEIJING_CLIENT = Location("CN", "AS", 39.9, 116.4, 4134)
SHANGHAI_CLIENT = Location("CN", "AS", 31.2, 121.5, 4837)
GUANGZHOU_CLIENT = Location("CN", "AS", 23.1, 113.3, 9808)
TOKYO_CLIENT = Location("JP", "AS", 35.7, 139.7, 2516)
HONG_KONG_CLIENT = Location("HK", "AS", 22.3, 114.2, 4760)
US_CLIENT = Location("US", "NA", 39.0, -77.5, 14618)
ANY = RoutingConfig()


def evaluate(
    nodes: Sequence[NodeConfig],
    client: Location,
    statuses: Mapping[str, NodeStatus],
    policy: RoutingConfig,
    rng: random.Random,
    *,
    key: str = "",
    recent: Mapping[str, int] | None = None,
    unavailable: Mapping[str, str] | None = None,
    warm_caches: Container[str] = frozenset(),
) -> Decision:
    """The explain decision over every node: every candidate and every exclusion."""
    levels, configured = NodeIndex(nodes).explained(client, policy)
    excluded = [*configured]
    scored = [
        score_level(level, members, client, statuses, policy, excluded=excluded)
        for level, members in zip(LEVELS, levels, strict=True)
    ]
    missing = unavailable or {}
    decision = decide(
        scored, policy, rng, unavailable=lambda node: missing.get(node.id), key=key,
        recent=recent, warm_caches=warm_caches, excluded=excluded,
    )  # fmt: skip
    assert decision is not None  # every level is whole
    return decision


def brute_force(
    nodes: Sequence[NodeConfig],
    client: Location,
    statuses: Mapping[str, NodeStatus],
    policy: RoutingConfig,
    unavailable: Mapping[str, str],
) -> tuple[list[Candidate], list[Candidate]]:
    """The rule's candidates and reserve, best first, by scoring every node: a reference for
    the rule's early-stopping read of the ranking."""
    accepted: list[Candidate] = []
    reserve: list[Candidate] = []
    for node in nodes:
        tier = configured_exclusion(node, client, policy)
        if isinstance(tier, Exclusion):
            continue
        status = statuses.get(node.id, NodeStatus())
        if not takes_clients(status, policy) or node.id in unavailable:
            continue
        distance = ranking_distance(node, client)
        terms = cost(node, distance, client, status, policy)
        candidate = priced(node, tier, terms, status.load, level_of(node, client, policy))
        (reserve if at_capacity(status) else accepted).append(candidate)
    order = lambda c: (c.level, c.score, -c.node.weight, c.node.id)  # noqa: E731
    return sorted(accepted, key=order), sorted(reserve, key=order)


def ranking_distance(node: NodeConfig, client: Location) -> float | None:
    if None in (client.latitude, client.longitude, node.latitude, node.longitude):
        return None
    return distance_km(client.latitude, client.longitude, node.latitude, node.longitude)  # type: ignore[arg-type]


CASES = [
    # (id, client, statuses, policy, expected node, expected reason)
    ("beijing-same-asn", BEIJING_CLIENT, {}, ANY, "bj", "same_asn"),
    ("shanghai-same-asn", SHANGHAI_CLIENT, {}, ANY, "sh", "same_asn"),
    ("guangzhou-nearest-in-country", GUANGZHOU_CLIENT, {}, ANY, "gz", "same_country"),
    ("tokyo-same-country", TOKYO_CLIENT, {}, ANY, "tokyo", "same_country"),
    ("hong-kong-is-not-mainland", HONG_KONG_CLIENT, {}, ANY, "tokyo", "same_continent"),
    ("us-nearest-anywhere", US_CLIENT, {}, ANY, "fra", "nearest"),
    (
        "us-max-tier-continent",
        US_CLIENT,
        {},
        RoutingConfig(max_tier="continent"),
        None,
        "no_eligible_node",
    ),
    ("unknown-client-open-node", UNKNOWN_LOCATION, {}, ANY, "fra", "nearest"),
    (
        "beijing-asn-node-down",
        BEIJING_CLIENT,
        {"bj": NodeStatus(up=False, down_reason="timeout")},
        ANY,
        "sh",
        "same_country",
    ),
    (
        "beijing-draining",
        BEIJING_CLIENT,
        {"bj": NodeStatus(draining=True)},
        ANY,
        "sh",
        "same_country",
    ),
    (
        "all-cn-nodes-out",
        BEIJING_CLIENT,
        {n: NodeStatus(up=False) for n in ("bj", "sh", "gz")},
        ANY,
        "tokyo",
        "same_continent",
    ),
    (
        "beijing-transport-failing",
        BEIJING_CLIENT,
        {"bj": NodeStatus(transport_failing=True)},
        ANY,
        "sh",
        "same_country",
    ),
    (
        "transport-failing-tolerated-by-config",
        BEIJING_CLIENT,
        {"bj": NodeStatus(transport_failing=True)},
        RoutingConfig(avoid_transport_failing=False),
        "bj",
        "same_asn",
    ),
    (
        "everything-out",
        US_CLIENT,
        {"fra": NodeStatus(disabled=True)},
        ANY,
        None,
        "no_eligible_node",
    ),
]


@pytest.mark.parametrize(
    ("client", "statuses", "policy", "node_id", "reason"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_decision_table(
    client: Location,
    statuses: dict[str, NodeStatus],
    policy: RoutingConfig,
    node_id: str | None,
    reason: str,
) -> None:
    decision = evaluate(NODES, client, statuses, policy, random.Random(7))
    assert (decision.node.id if decision.node else None) == node_id
    assert decision.reason == reason


EXCLUSION_CASES = [
    ("config-disabled", US_CLIENT, {}, ANY, "off", "disabled", "enabled: false"),
    ("outside-area", US_CLIENT, {}, ANY, "bj", "outside_service_area", "client in US"),
    (
        "unknown-location",
        UNKNOWN_LOCATION,
        {},
        ANY,
        "bj",
        "outside_service_area",
        "location unknown",
    ),
    (
        "down-with-reason",
        BEIJING_CLIENT,
        {"bj": NodeStatus(up=False, down_reason="status 503")},
        ANY,
        "bj",
        "down",
        "status 503",
    ),
    ("draining", BEIJING_CLIENT, {"bj": NodeStatus(draining=True)}, ANY, "bj", "draining", "new"),
    (
        "admin-disabled",
        BEIJING_CLIENT,
        {"sh": NodeStatus(disabled=True)},
        ANY,
        "sh",
        "admin_disabled",
        "operator",
    ),
    (
        "transport-failing",
        BEIJING_CLIENT,
        {"bj": NodeStatus(transport_failing=True)},
        ANY,
        "bj",
        "transport_failing",
        "timed out or could not connect",
    ),
    (
        "beyond-max-tier",
        US_CLIENT,
        {},
        RoutingConfig(max_tier="country"),
        "fra",
        "beyond_max_tier",
        "closest match is any, policy allows up to country",
    ),
]


@pytest.mark.parametrize(
    ("client", "statuses", "policy", "node_id", "reason", "detail"),
    [c[1:] for c in EXCLUSION_CASES],
    ids=[c[0] for c in EXCLUSION_CASES],
)
def test_every_exclusion_carries_a_reason(
    client: Location,
    statuses: dict[str, NodeStatus],
    policy: RoutingConfig,
    node_id: str,
    reason: str,
    detail: str,
) -> None:
    by_node = {
        e.node.id: e for e in evaluate(NODES, client, statuses, policy, random.Random(1)).excluded
    }
    assert by_node[node_id].reason == reason
    assert detail in by_node[node_id].detail


def test_candidates_sorted_by_cost() -> None:
    accepted = evaluate(NODES, GUANGZHOU_CLIENT, NO_LIVE_STATE, ANY, random.Random(1)).candidates
    assert [(c.node.id, c.tier) for c in accepted] == [
        ("gz", Tier.COUNTRY),
        ("sh", Tier.COUNTRY),
        ("bj", Tier.COUNTRY),
        ("tokyo", Tier.CONTINENT),
        ("fra", Tier.ANY),
    ]
    assert accepted[0].distance_km is not None and accepted[0].distance_km < 20


def test_weights_share_traffic_among_near_equals() -> None:
    heavy = replace(BEIJING, id="heavy", weight=3.0, asns=frozenset())
    light = replace(BEIJING, id="light", weight=1.0, asns=frozenset(), latitude=39.95)
    far = replace(SHANGHAI, id="far", asns=frozenset())
    accepted = evaluate(
        (heavy, light, far), BEIJING_CLIENT, NO_LIVE_STATE, ANY, random.Random(1)
    ).candidates
    rng = random.Random(42)
    picks: Counter[str] = Counter()
    for _ in range(4000):
        chosen, _ = choose(accepted, ANY, rng)
        assert chosen is not None
        picks[chosen.node.id] += 1
    assert picks["far"] == 0
    assert 0.71 < picks["heavy"] / 4000 < 0.79


def test_same_seed_same_choice() -> None:
    twins = [replace(FRANKFURT, id=f"fra{i}") for i in range(5)]
    first = [evaluate(twins, US_CLIENT, {}, ANY, random.Random(3)).node for _ in range(3)]
    assert len({n.id for n in first if n}) == 1


def test_distance_km_known_pairs() -> None:
    assert distance_km(0, 0, 0, 0) == 0
    assert distance_km(39.9042, 116.4074, 31.2304, 121.4737) == pytest.approx(1067, rel=0.01)
    assert distance_km(0, 0, 0, 180) == pytest.approx(20015, rel=0.001)


countries = st.sampled_from(["CN", "JP", "HK", "US", "DE", None])
locations = st.builds(
    Location,
    country=countries,
    continent=st.sampled_from(["AS", "NA", "EU", None]),
    latitude=st.one_of(st.none(), st.floats(-90, 90)),
    longitude=st.one_of(st.none(), st.floats(-180, 180)),
    asn=st.one_of(st.none(), st.sampled_from([4134, 4837, 9808, 2516, 1])),
)
statuses = st.dictionaries(
    st.sampled_from([n.id for n in NODES]),
    st.builds(NodeStatus, up=st.booleans(), draining=st.booleans(), disabled=st.booleans()),
)


@given(
    client=locations,
    live=statuses,
    max_tier=st.sampled_from(["asn", "country", "continent", "any"]),
    seed=st.integers(0, 2**32),
)
def test_decision_properties(
    client: Location, live: dict[str, NodeStatus], max_tier: str, seed: int
) -> None:
    policy = RoutingConfig(max_tier=max_tier)  # type: ignore[arg-type]
    decision = evaluate(NODES, client, live, policy, random.Random(seed))
    accounted = [c.node.id for c in decision.candidates] + [e.node.id for e in decision.excluded]
    assert sorted(accounted) == sorted(n.id for n in NODES)
    if decision.node is None:
        assert decision.candidates == ()
        return
    status = live.get(decision.node.id, NodeStatus())
    assert decision.node.enabled and status.up and not status.draining and not status.disabled
    assert decision.candidates[0].level == min(c.level for c in decision.candidates)
    chosen = next(c for c in decision.candidates if c.node == decision.node)
    assert chosen.level == decision.candidates[0].level
    assert chosen.score <= near_equal_bound(decision.candidates[0].score, policy)
    area = decision.node.serves
    assert (
        area.everywhere or client.country in area.countries or client.continent in area.continents
    )


MUMBAI_AWS = Location("IN", "AS", 19.08, 72.88, 16509)
VLADIVOSTOK = Location("RU", "EU", 43.12, 131.89, None)
YANJI = Location("CN", "AS", 42.9, 129.5, 4134)
VIRGINIA_AWS = NodeConfig(
    "iad", "https://iad.example", country="US", continent="NA", latitude=39.04,
    longitude=-77.49, asns=frozenset({16509}),
)  # fmt: skip
MUMBAI = NodeConfig(
    "bom", "https://bom.example", country="IN", continent="AS", latitude=19.07, longitude=72.87
)
MOSCOW = NodeConfig(
    "mow", "https://mow.example", country="RU", continent="EU", latitude=55.76, longitude=37.62
)
SEOUL = NodeConfig(
    "sel", "https://sel.example", country="KR", continent="AS", latitude=37.57, longitude=126.98
)
BEIJING_OPEN = replace(BEIJING, serves=ServiceArea())

COST_CASES = [
    # (id, node, client, status, policy, expected terms)
    ("distance-only", FRANKFURT, US_CLIENT, NodeStatus(), ANY,
     Cost(distance_km(39.0, -77.5, 50.1109, 8.6821))),
    ("no-coordinates", replace(FRANKFURT, latitude=None, longitude=None), US_CLIENT,
     NodeStatus(), ANY, Cost(None)),
    ("latency-in-km", FRANKFURT, US_CLIENT, NodeStatus(latency_ms=12.5), ANY,
     Cost(distance_km(39.0, -77.5, 50.1109, 8.6821), latency_km=125.0)),
    ("latency-rate-configured", FRANKFURT, US_CLIENT, NodeStatus(latency_ms=12.5),
     RoutingConfig(km_per_latency_ms=2.0),
     Cost(distance_km(39.0, -77.5, 50.1109, 8.6821), latency_km=25.0)),
    ("same-country", SHANGHAI, BEIJING_CLIENT, NodeStatus(), ANY,
     Cost(distance_km(39.9, 116.4, 31.2304, 121.4737), country_bonus_km=200.0)),
    ("same-asn-and-country", BEIJING, BEIJING_CLIENT, NodeStatus(), ANY,
     Cost(distance_km(39.9, 116.4, 39.9042, 116.4074), asn_bonus_km=100.0,
          country_bonus_km=200.0)),
    ("same-asn-abroad", VIRGINIA_AWS, MUMBAI_AWS, NodeStatus(),
     RoutingConfig(asn_bonus_km=150.0),
     Cost(distance_km(19.08, 72.88, 39.04, -77.49), asn_bonus_km=150.0)),
    ("load-is-no-cost", FRANKFURT, US_CLIENT, NodeStatus(load=0.95), ANY,
     Cost(distance_km(39.0, -77.5, 50.1109, 8.6821))),
]  # fmt: skip


@pytest.mark.parametrize(
    ("node", "client", "status", "policy", "expected"),
    [c[1:] for c in COST_CASES],
    ids=[c[0] for c in COST_CASES],
)
def test_every_cost_term(
    node: NodeConfig, client: Location, status: NodeStatus, policy: RoutingConfig, expected: Cost
) -> None:
    priced = cost(node, ranking_distance(node, client), client, status, policy)
    assert priced == expected
    assert priced.total == pytest.approx(
        (expected.distance_km or 0.0)
        + expected.latency_km
        - expected.asn_bonus_km
        - expected.country_bonus_km
    )


DOMESTIC = RoutingConfig(domestic_first=frozenset({"CN"}))

COST_DECISIONS = [
    # (id, nodes, client, statuses, policy, expected node, reason)
    # The ASN bonus is bounded: a node 12 km away beats one in the client's network 12,800 km.
    ("same-asn-far-loses", (VIRGINIA_AWS, MUMBAI), MUMBAI_AWS, {}, ANY, "bom", "same_country"),
    # ... but it decides between two nodes in the same country nearly as close.
    ("same-asn-close-wins",
     (replace(VIRGINIA_AWS, country="IN", latitude=19.3, longitude=72.9), MUMBAI),
     MUMBAI_AWS, {}, ANY, "iad", "same_asn"),
    # The country bonus is bounded: Seoul (~750 km) beats Moscow (~6,400 km) for Vladivostok.
    ("closer-abroad-beats-home", (MOSCOW, SEOUL), VLADIVOSTOK, {}, ANY, "sel", "nearest"),
    # Without domestic-first, a Yanji client goes to Seoul (~690 km), not Beijing (~1,080).
    ("no-domestic-first", (BEIJING_OPEN, SEOUL), YANJI, {}, ANY, "sel", "same_continent"),
    ("domestic-first-stays-home", (BEIJING_OPEN, SEOUL), YANJI, {}, DOMESTIC, "bj", "same_asn"),
    ("domestic-first-node-down", (BEIJING_OPEN, SEOUL), YANJI,
     {"bj": NodeStatus(up=False)}, DOMESTIC, "sel", "same_continent"),
    ("domestic-first-node-full", (BEIJING_OPEN, SEOUL), YANJI,
     {"bj": NodeStatus(load=1.0)}, DOMESTIC, "sel", "same_continent"),
    ("domestic-first-other-country", (MOSCOW, SEOUL), VLADIVOSTOK, {}, DOMESTIC, "sel",
     "nearest"),
    # Latency counts as distance: 150 ms (1,500 km) sends a Beijing client to Shanghai.
    ("latency-tips", (replace(BEIJING, asns=frozenset()), SHANGHAI), BEIJING_CLIENT,
     {"bj": NodeStatus(latency_ms=150), "sh": NodeStatus(latency_ms=5)}, ANY, "sh",
     "same_country"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("nodes", "client", "statuses", "policy", "node_id", "reason"),
    [c[1:] for c in COST_DECISIONS],
    ids=[c[0] for c in COST_DECISIONS],
)
def test_cost_decisions(
    nodes: Sequence[NodeConfig],
    client: Location,
    statuses: dict[str, NodeStatus],
    policy: RoutingConfig,
    node_id: str,
    reason: str,
) -> None:
    decision = evaluate(nodes, client, statuses, policy, random.Random(3))
    assert decision.node is not None and decision.node.id == node_id
    assert decision.reason == reason


def test_load_shapes_the_shares_not_the_cost() -> None:
    # Two Beijing nodes: a busy big one and an idle small one share by free connections.
    big = replace(BEIJING, id="big", asns=frozenset(), capacity=Capacity(connections=500))
    small = replace(big, id="small", latitude=39.95, capacity=Capacity(connections=100))
    state = {"big": NodeStatus(load=0.9), "small": NodeStatus(load=0.2)}
    decision = evaluate((big, small), BEIJING_CLIENT, state, ANY, random.Random(1))
    assert dict(decision.shares) == pytest.approx({"big": 50 / 130, "small": 80 / 130})
    costs = {c.node.id: c.score for c in decision.candidates}
    assert costs["big"] == pytest.approx(distance_km(39.9, 116.4, 39.9042, 116.4074) - 200)


SHARE_CASES = [
    # (id, (capacity, load, weight) per node, expected shares)
    ("free-connections", [(500, 0.9, 1.0), (100, 0.2, 1.0)], [50 / 130, 80 / 130]),
    ("times-weight", [(100, 0.5, 3.0), (100, 0.5, 1.0)], [0.75, 0.25]),
    ("no-reading-takes-the-prior", [(100, None, 1.0), (100, 0.0, 1.0)], [50 / 150, 100 / 150]),
    ("no-capacity-compares-fractions", [(None, 0.5, 1.0), (400, 0.75, 1.0)], [2 / 3, 1 / 3]),
    ("all-full-by-weight", [(100, 1.0, 2.0), (100, 1.2, 1.0)], [2 / 3, 1 / 3]),
]


@pytest.mark.parametrize(
    ("nodes", "expected"), [c[1:] for c in SHARE_CASES], ids=[c[0] for c in SHARE_CASES]
)
def test_shares(nodes: list[tuple[int | None, float | None, float]], expected: list[float]) -> None:
    pool = [
        priced(
            replace(FRANKFURT, id=f"n{i}", weight=weight, capacity=Capacity(connections=capacity)),
            Tier.ANY,
            Cost(100.0),
            load,
        )
        for i, (capacity, load, weight) in enumerate(nodes)
    ]
    assert shares(pool, ANY) == pytest.approx(expected)


def test_traffic_splits_by_free_capacity() -> None:
    big = replace(FRANKFURT, id="big", capacity=Capacity(connections=300))
    small = replace(FRANKFURT, id="small", latitude=50.2, capacity=Capacity(connections=100))
    state = {"big": NodeStatus(load=0.5), "small": NodeStatus(load=0.5)}
    picks = Counter(
        n.id
        for seed in range(2000)
        if (n := evaluate((big, small), US_CLIENT, state, ANY, random.Random(seed)).node)
    )
    assert 0.71 < picks["big"] / 2000 < 0.79  # 150 free against 50


def test_a_seeded_rng_repeats_every_decision() -> None:
    pool = [replace(FRANKFURT, id=f"fra{i}", capacity=Capacity(connections=100 * (i + 1)))
            for i in range(5)]  # fmt: skip
    state = {n.id: NodeStatus(load=0.1 * i) for i, n in enumerate(pool)}

    def run(seed: int) -> list[str | None]:
        rng = random.Random(seed)
        return [
            d.node.id if (d := evaluate(pool, US_CLIENT, state, ANY, rng)).node else None
            for _ in range(50)
        ]

    assert run(11) == run(11)
    assert len(set(run(11))) > 1


def test_node_at_capacity_only_as_last_resort() -> None:
    full = {"bj": NodeStatus(load=1.0)}
    decision = evaluate(NODES, BEIJING_CLIENT, full, ANY, random.Random(1))
    assert decision.node == SHANGHAI
    assert {e.node.id: e.reason for e in decision.excluded}["bj"] == "at_capacity"

    everything_full = {n.id: NodeStatus(load=1.5) for n in NODES}
    decision = evaluate(NODES, BEIJING_CLIENT, everything_full, ANY, random.Random(1))
    assert decision.node == BEIJING
    assert decision.reason == "at_capacity_last_resort"


CACHES = tuple(
    NodeConfig(f"cache{i}", f"https://c{i}.example", kind="cache", country="CN", latitude=31.2,
               longitude=121.5)
    for i in range(4)
)  # fmt: skip


def test_rendezvous_keeps_a_file_on_one_cache_while_loads_allow() -> None:
    client = SHANGHAI_CLIENT
    for n in range(50):
        key = f"org/model/resolve/main/shard-{n}.safetensors"
        chosen = {
            evaluate(CACHES, client, {}, ANY, random.Random(seed), key=key).node
            for seed in range(10)
        }
        assert len(chosen) == 1, key
    # Removing one cache only moves the files it held.
    before = {f"f{n}": rendezvous_order(CACHES, f"f{n}")[0].id for n in range(400)}
    after = {f"f{n}": rendezvous_order(CACHES[1:], f"f{n}")[0].id for n in range(400)}
    moved = {k for k in before if before[k] != after[k]}
    assert moved == {k for k in before if before[k] == "cache0"}
    assert 60 < len(moved) < 140  # about a quarter


def test_rendezvous_bound_holds_under_a_skewed_mix() -> None:
    rng = random.Random(5)
    files = [f"file-{i}" for i in range(30)]
    # Zipf-like: the first file gets half of all requests.
    weights = [1 / (i + 1) ** 1.5 for i in range(len(files))]
    recent: Counter[str] = Counter()
    bound = ANY.cache_load_bound
    for _ in range(2000):
        key = rng.choices(files, weights=weights)[0]
        node = evaluate(CACHES, SHANGHAI_CLIENT, {}, ANY, rng, key=key, recent=recent).node
        assert node is not None
        recent[node.id] += 1
        total = sum(recent.values())
        assert max(recent.values()) <= math.ceil(bound * total / len(CACHES))
    # The hottest file still mostly lands on its own cache.
    assert recent.most_common(1)[0][1] > 2000 / len(CACHES)


def test_bounded_rendezvous_respects_weights() -> None:
    heavy = replace(CACHES[0], weight=3.0)
    nodes = (heavy, *CACHES[1:3])
    recent: Counter[str] = Counter()
    for i in range(5000):
        recent[bounded_rendezvous(nodes, f"k{i}", recent, 1.25).id] += 1
    assert 0.5 < recent[heavy.id] / 5000 < 0.65  # weight 3 of 5


def test_a_cache_holding_the_file_wins_over_cold_caches() -> None:
    keys = [f"org/model/resolve/main/shard-{n}.bin" for n in range(40)]
    warm = frozenset({"cache3"})
    cold_choices, warm_choices = set(), set()
    for n, key in enumerate(keys):
        for chosen, seen in (
            (
                evaluate(CACHES, SHANGHAI_CLIENT, {}, ANY, random.Random(n), key=key).node,
                cold_choices,
            ),
            (
                evaluate(
                    CACHES, SHANGHAI_CLIENT, {}, ANY, random.Random(n), key=key, warm_caches=warm
                ).node,
                warm_choices,
            ),
        ):
            assert chosen is not None
            seen.add(chosen.id)
    assert len(cold_choices) == 4, "without a warm cache the files spread over all caches"
    assert warm_choices == {"cache3"}


many_nodes = st.lists(
    st.builds(
        NodeConfig,
        id=st.uuids().map(str),
        base_url=st.just("https://n.example"),
        kind=st.sampled_from(["mirror", "cache", "third_party"]),
        country=countries,
        continent=st.sampled_from(["AS", "NA", "EU", None]),
        latitude=st.one_of(st.none(), st.floats(-60, 60)),
        longitude=st.floats(-170, 170),
        asns=st.frozensets(st.sampled_from([4134, 4837, 2516]), max_size=1),
        weight=st.floats(0.5, 4),
        enabled=st.booleans(),
        serves=st.sampled_from([ServiceArea(), CN_ONLY, ServiceArea(continents=frozenset({"AS"}))]),
    ),
    max_size=25,
    unique_by=lambda n: n.id,
)
live_states = st.builds(
    NodeStatus,
    up=st.booleans(),
    draining=st.booleans(),
    latency_ms=st.one_of(st.none(), st.floats(0, 300)),
    load=st.one_of(st.none(), st.floats(0, 1.5)),
    transport_failing=st.booleans(),
)


@settings(max_examples=400)
@given(
    nodes=many_nodes,
    client=locations,
    states=st.lists(live_states, min_size=25, max_size=25),
    missing=st.sets(st.integers(0, 24)),
    near_km=st.sampled_from([0.0, 100.0, 2000.0]),
    max_tier=st.sampled_from(["asn", "country", "continent", "any"]),
    domestic_first=st.sampled_from([frozenset(), frozenset({"CN"}), frozenset({"CN", "JP"})]),
    front=st.sampled_from([1, 2, 3, 32]),
    seed=st.integers(0, 2**32),
)
def test_a_request_decides_as_scoring_every_node_would(
    nodes: list[NodeConfig],
    client: Location,
    states: list[NodeStatus],
    missing: set[int],
    near_km: float,
    max_tier: str,
    domestic_first: frozenset[str],
    front: int,
    seed: int,
) -> None:
    """A request prices the cheapest nodes of each level only and stops reading early; the
    decision is the one pricing every node gives: the same pool (so the same draw), and the
    best candidates in the same order."""
    policy = RoutingConfig(
        near_equal_km=near_km,
        max_tier=max_tier,  # type: ignore[arg-type]
        domestic_first=domestic_first,
    )
    statuses = {node.id: states[i] for i, node in enumerate(nodes)}
    unavailable = {node.id: "not synced" for i, node in enumerate(nodes) if i in missing}
    accepted, reserve = brute_force(nodes, client, statuses, policy, unavailable)
    index = NodeIndex(nodes)
    cell = index.cell(client)

    def scored(width: int) -> list[LevelCandidates]:
        kept = index.ranking(cell, policy, width)
        return [
            score_level(level, members, cell, statuses, policy, reach=reach)
            for level, members, reach in zip(LEVELS, kept.fronts, kept.reaches, strict=True)
        ]

    rng = random.Random(seed)
    decision = None
    width = front
    # The nearest nodes first; while they cannot tell, a wider front, as the router does.
    while decision is None:
        decision = decide(
            scored(width), policy, rng, unavailable=lambda node: unavailable.get(node.id),
            key="k", keep=3,
        )  # fmt: skip
        width *= WIDEN
    assert decision is not None
    expected, _ = choose(accepted or reserve, policy, random.Random(seed), key="k")
    assert decision.node == (expected.node if expected else None)
    assert decision.candidates == tuple(accepted[: len(decision.candidates)])
    assert len(decision.candidates) >= min(3, len(accepted))
    explained = evaluate(
        nodes, client, statuses, policy, random.Random(seed), key="k", unavailable=unavailable
    )
    assert explained.node == decision.node and explained.reason == decision.reason
    assert list(explained.candidates) == (accepted if explained.candidates else [])


def test_the_near_equal_bound_is_the_wider_of_km_and_ratio() -> None:
    assert near_equal_bound(100.0, ANY) == 200.0
    assert near_equal_bound(3000.0, ANY) == 3300.0
    # A cost below zero (bonuses past the distance) takes the km band alone.
    assert near_equal_bound(-250.0, ANY) == -150.0
