"""The routing simulator: the real routing rule, in process, against a world and a client sample.

A world (``docs/routing-world.yaml``) lists nodes as gateway ``nodes:`` entries plus what only the
simulation knows: the load each carries from other traffic (``background``) and whether it
publishes its load. Clients are drawn from the City mmdb in use (random public IPv4 addresses
the database places; a share in a chosen country) or read from a CSV of addresses and weights.
Each client arrives at a random time within ``arrival_s``, is routed by a real ``Router`` over a
real ``LiveState`` (the cache of scored candidates, its versions and the redirect counting of
the gateway included), and holds a download slot on the chosen node for ``hold_s``. Nodes that
publish their load are read every ``reading_s``; the others are estimated from redirect windows,
as the gateway's state store does.

The result is compared with the nearest eligible node (up, allowed by configuration, not full)
at each decision and with the capacity-aware optimum: a linear program that places every client
(all of them downloading at once) at least total great-circle distance with each node taking at
most its free capacity, under the same service areas and domestic-first rule. Method and
figures: docs/routing.md.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import ipaddress
import math
import random
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from gateway.config import (
    ConfigError,
    GatewayConfig,
    GeoIPConfig,
    NodeConfig,
    RoutingConfig,
    config_from_mapping,
    read_yaml,
)
from gateway.geo.clientip import ClientAddress
from gateway.geo.locator import IPAddress, Location, MaxMindLocator
from gateway.hf.paths import FileRef
from gateway.routing.router import Router
from gateway.routing.rule import Exclusion, configured_exclusion, distance_to, near_equal_bound
from gateway.state.live import (
    FADE_INTERVAL_S,
    LiveState,
    LoadRecord,
    RedirectCounter,
    SmoothedRedirects,
)
from gateway.state.store import redirect_load

REPO = Path(__file__).resolve().parent.parent.parent
DEFAULT_WORLD = REPO / "docs" / "routing-world.yaml"
DEFAULT_CONFIG = REPO / "config" / "gateway.yaml"
#: Keys of a world's node entries that only the simulation reads.
SIM_KEYS = ("background", "publishes_load")
#: Random addresses looked up at most per client wanted.
DRAWS_PER_CLIENT = 400
REF = FileRef("model", "org/model", "0" * 40, "model.safetensors")


class SimError(Exception):
    """A world, sample or option the simulator cannot use; the message says which and why."""


@dataclass(frozen=True, slots=True)
class SimNode:
    config: NodeConfig
    #: Share of capacity carried from other traffic.
    background: float
    publishes_load: bool

    @property
    def capacity(self) -> float:
        return float(self.config.capacity.connections or 0)

    @property
    def free(self) -> float:
        """Slots free for the gateway's clients at the start."""
        return self.capacity * (1.0 - self.background)


@dataclass(frozen=True, slots=True)
class World:
    config: GatewayConfig
    nodes: tuple[SimNode, ...]
    #: Per client country (``*``: any other), ASN -> share of its clients.
    networks: Mapping[str, Mapping[int, float]]


@dataclass(frozen=True, slots=True)
class SimClient:
    ip: IPAddress
    location: Location


@dataclass(frozen=True, slots=True)
class Options:
    arrival_s: float = 120.0
    hold_s: float = 600.0
    reading_s: float = 5.0
    seed: int = 1
    asn: bool = False


@dataclass(slots=True)
class Outcome:
    """One client's decision and what it is measured against."""

    client: SimClient
    node: NodeConfig | None
    km: float
    #: Nearest node that was up, allowed and not full at the time (in the client's country
    #: when domestic-first holds there and one was).
    nearest: NodeConfig | None
    nearest_km: float
    #: Whether a domestic node was allowed, up and not full (domestic-first countries only).
    domestic_free: bool


@dataclass(slots=True)
class Result:
    outcomes: list[Outcome] = field(default_factory=list)
    peak: Counter[str] = field(default_factory=Counter)
    optimum_km: float = math.nan
    nodes: tuple[SimNode, ...] = ()
    domestic: frozenset[str] = frozenset()


# --------------------------------------------------------------------------- inputs


def load_world(world_path: Path, config_path: Path | None) -> World:
    """The world's nodes under the routing section (and the rest) of ``config_path``."""
    try:
        raw = yaml.safe_load(world_path.read_text(encoding="utf-8"))
        data = read_yaml(config_path) if config_path is not None else {}
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        raise SimError(f"cannot read the world or config: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("nodes"), list):
        raise SimError(f"{world_path}: expected a mapping with a `nodes` list")
    if not isinstance(data, dict):
        raise SimError(f"{config_path}: expected a mapping")
    entries, extras = [], []
    for entry in raw["nodes"]:
        node = {k: v for k, v in entry.items() if k not in SIM_KEYS}
        if entry.get("publishes_load", True):
            node["load_url"] = f"{node['url']}/load"
        entries.append(node)
        extras.append(
            (float(entry.get("background", 0.0)), bool(entry.get("publishes_load", True)))
        )
    try:
        config = config_from_mapping({**data, "nodes": entries})
    except ConfigError as exc:
        raise SimError(f"{world_path}: {exc}") from None
    nodes = tuple(
        SimNode(node, background, publishes)
        for node, (background, publishes) in zip(config.nodes, extras, strict=True)
    )
    if any(not node.capacity for node in nodes):
        raise SimError(f"{world_path}: every node needs capacity.connections")
    networks = {
        str(country): {int(asn): float(share) for asn, share in shares.items()}
        for country, shares in (raw.get("networks") or {}).items()
    }
    return World(config, nodes, networks)


def sample_from_mmdb(
    locator: MaxMindLocator, count: int, country: str | None, share: float, rng: random.Random
) -> list[SimClient]:
    """``count`` clients at random public IPv4 addresses the database places, ``share`` of them
    in ``country``; one address per /24."""
    wanted_in = round(count * share) if country else 0
    inside: list[SimClient] = []
    outside: list[SimClient] = []
    seen: set[int] = set()
    for _ in range(count * DRAWS_PER_CLIENT):
        if len(inside) >= wanted_in and len(outside) >= count - wanted_in:
            break
        address = rng.getrandbits(32)
        if address >> 8 in seen:
            continue
        seen.add(address >> 8)
        ip = ipaddress.IPv4Address(address)
        location = locator.locate(ip)
        if location.country is None or location.latitude is None:
            continue
        bucket = inside if location.country == country else outside
        bucket.append(SimClient(ip, location))
    clients = inside[:wanted_in] + outside[: count - wanted_in]
    if len(clients) < count:
        raise SimError(f"the database placed only {len(clients)} of {count} clients")
    rng.shuffle(clients)
    return clients


def sample_from_csv(
    locator: MaxMindLocator, path: Path, count: int, rng: random.Random
) -> list[SimClient]:
    """``count`` clients drawn from a CSV of ``address,weight`` rows, by weight."""
    rows: list[tuple[SimClient, float]] = []
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            for number, row in enumerate(csv.reader(handle), 1):
                if not row or row[0].startswith("#"):
                    continue
                try:
                    ip = ipaddress.ip_address(row[0].strip())
                    weight = float(row[1]) if len(row) > 1 else 1.0
                except ValueError as exc:
                    raise SimError(f"{path} line {number}: {exc}") from None
                rows.append((SimClient(ip, locator.locate(ip)), weight))
    except OSError as exc:
        raise SimError(f"cannot read {path}: {exc.strerror}") from None
    if not rows:
        raise SimError(f"{path}: no addresses")
    return rng.choices([c for c, _ in rows], [w for _, w in rows], k=count)


def with_networks(
    clients: Sequence[SimClient], networks: Mapping[str, Mapping[int, float]], rng: random.Random
) -> list[SimClient]:
    """The clients with ASNs drawn from the world's ``networks`` (an ASN database's answer)."""
    placed = []
    for client in clients:
        shares = networks.get(client.location.country or "", networks.get("*", {}))
        pick, asn = rng.random(), None
        for candidate, share in shares.items():
            if pick < share:
                asn = candidate
                break
            pick -= share
        asn_org = None if asn is None else f"AS{asn}"
        placed.append(SimClient(client.ip, replace(client.location, asn=asn, asn_org=asn_org)))
    return placed


class _SampleLocator:
    """The gateway's ``GeoLocator`` over the sample's own answers."""

    def __init__(self, clients: Iterable[SimClient]) -> None:
        self._by_ip = {client.ip: client.location for client in clients}

    def locate(self, ip: IPAddress) -> Location:
        return self._by_ip.get(ip, Location())

    def close(self) -> None:
        return None


# --------------------------------------------------------------------------- simulation


def domestic_countries(config: GatewayConfig) -> frozenset[str]:
    return config.routing.domestic_first


def allowed(node: NodeConfig, location: Location, config: GatewayConfig) -> bool:
    return not isinstance(configured_exclusion(node, location, config.routing), Exclusion)


def node_km(node: NodeConfig, location: Location) -> float:
    distance = distance_to(node, location)
    return 0.0 if distance is None else distance


def nearest_eligible(
    world: World, location: Location, is_free: Callable[[SimNode], bool]
) -> tuple[SimNode | None, bool]:
    """The nearest node allowed for ``location`` and free (in its country when domestic-first
    holds there and one such is free), and whether one there was."""
    eligible = [n for n in world.nodes if allowed(n.config, location, world.config) and is_free(n)]
    home = [n for n in eligible if n.config.country == location.country]
    domestic_free = location.country in world.config.routing.domestic_first and bool(home)
    nearby = home if domestic_free else eligible
    return min(nearby, key=lambda n: node_km(n.config, location), default=None), domestic_free


class _Simulation:
    """One run: the gateway's router and live state, the nodes' true load, the outcomes."""

    def __init__(self, world: World, clients: Sequence[SimClient], options: Options) -> None:
        config = world.config
        self.world, self.options, self.config = world, options, config
        self.now = 0.0
        self.router = Router(config, _SampleLocator(clients), random.Random(options.seed))
        self.live = LiveState(
            config.nodes,
            vantage="sim",
            probing=False,
            load_deadband=config.state.load_deadband,
            load_prior=config.routing.load_prior,
            download_s=config.state.estimated_download_s,
            clock=lambda: self.now,
        )
        self.counter = RedirectCounter()
        self.smoothed = SmoothedRedirects(config.state.redirect_smoothing)
        #: Downloads under way per node, from the gateway's clients.
        self.active: Counter[str] = Counter()
        self.result = Result(nodes=world.nodes, domestic=config.routing.domestic_first)
        # (time, order, kind, payload); order keeps events at one time deterministic.
        rng = random.Random(options.seed)
        self.events: list[tuple[float, int, str, Any]] = [
            (rng.uniform(0.0, options.arrival_s), i, "arrive", client)
            for i, client in enumerate(clients, 1)
        ]
        self.order = len(clients)
        end = options.arrival_s + options.hold_s
        ticks = int(end / options.reading_s) + 1
        self.events += [(i * options.reading_s, -3, "read", None) for i in range(ticks)]
        fades = int(end / FADE_INTERVAL_S) + 1
        self.events += [(i * FADE_INTERVAL_S, -2, "fade", None) for i in range(fades)]
        window_s = config.state.redirect_window_s
        self.events += [(i * window_s, -1, "window", None) for i in range(1, int(end / window_s))]
        heapq.heapify(self.events)

    def run(self) -> Result:
        while self.events:
            self.now, _, kind, payload = heapq.heappop(self.events)
            if kind == "read":
                self.read_loads()
            elif kind == "fade":
                self.live.fade_loads()
            elif kind == "window":
                self.close_window()
            elif kind == "leave":
                self.active[payload] -= 1
            else:
                self.arrive(payload)
        return self.result

    def read_loads(self) -> None:
        """What nodes that publish their load report (their load pollers' readings)."""
        for node in self.world.nodes:
            if node.publishes_load:
                connections = node.background * node.capacity + self.active[node.config.id]
                self.live.apply_load(
                    LoadRecord(node.config.id, "status-json", connections, measured_at=self.now)
                )

    def close_window(self) -> None:
        """The estimates of nodes that publish no load, as the state store makes them."""
        counts = self.counter.rotate()
        for node in self.world.nodes:
            if not node.publishes_load:
                count = self.smoothed.add(node.config.id, counts.get(node.config.id, 0))
                self.live.apply_load(
                    redirect_load(node.config.id, count, self.config.state, self.now)
                )

    def is_free(self, node: SimNode) -> bool:
        return node.background * node.capacity + self.active[node.config.id] < node.capacity

    def arrive(self, client: SimClient) -> None:
        location = client.location
        placement = self.router.placement(ClientAddress(client.ip, "peer"))
        route = self.router.route(
            REF, placement, self.live.statuses, self.counter.current, version=self.live.version
        )
        node = route.decision.node
        nearest, domestic_free = nearest_eligible(self.world, location, self.is_free)
        if node is not None:
            # What the gateway does with a redirect (web.redirect.record_redirect).
            self.counter.count(node.id)
            self.live.count_redirect(node.id)
            self.active[node.id] += 1
            self.result.peak[node.id] = max(self.result.peak[node.id], self.active[node.id])
            self.order += 1
            leave = self.now + self.options.hold_s
            heapq.heappush(self.events, (leave, self.order, "leave", node.id))
        self.result.outcomes.append(
            Outcome(
                client,
                node,
                node_km(node, location) if node else math.nan,
                nearest.config if nearest else None,
                node_km(nearest.config, location) if nearest else math.nan,
                domestic_free,
            )
        )


def simulate(world: World, clients: Sequence[SimClient], options: Options) -> Result:
    result = _Simulation(world, clients, options).run()
    result.optimum_km = optimum_mean_km(world, clients)
    return result


def optimum_mean_km(world: World, clients: Sequence[SimClient]) -> float:
    """Mean distance of the capacity-aware optimum: every client placed at once, each node
    taking at most its free capacity, under the configured service areas and domestic-first
    countries (a linear program; clients at one place form one group)."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    config = world.config
    domestic = domestic_countries(config)
    groups: Counter[Location] = Counter(client.location for client in clients)
    columns: list[tuple[int, int, float]] = []  # (group, node, km)
    for g, location in enumerate(groups):
        allowed_nodes = [
            i for i, n in enumerate(world.nodes) if allowed(n.config, location, config)
        ]
        if location.country in domestic:
            home = [i for i in allowed_nodes if world.nodes[i].config.country == location.country]
            allowed_nodes = home or allowed_nodes
        columns += [(g, i, node_km(world.nodes[i].config, location)) for i in allowed_nodes]
    counts = list(groups.values())
    cost = [km for _, _, km in columns]
    variables = range(len(columns))
    demand = coo_matrix(
        ([1.0] * len(columns), ([g for g, _, _ in columns], list(variables))),
        shape=(len(groups), len(columns)),
    )
    supply = coo_matrix(
        ([1.0] * len(columns), ([i for _, i, _ in columns], list(variables))),
        shape=(len(world.nodes), len(columns)),
    )
    solved = linprog(
        cost,
        A_ub=supply,
        b_ub=[node.free for node in world.nodes],
        A_eq=demand,
        b_eq=counts,
        bounds=(0, None),
        method="highs",
    )
    if not solved.success:
        raise SimError(f"no capacity-aware assignment exists: {solved.message}")
    return float(solved.fun) / sum(counts)


# --------------------------------------------------------------------------- report


@dataclass(frozen=True, slots=True)
class Summary:
    mean_km: float
    p50_km: float
    p95_km: float
    nearest_mean_km: float
    optimum_mean_km: float
    #: Per node, peak concurrent clients from the gateway over its free capacity.
    over_share: Mapping[str, float]
    cross_border: int
    #: Sent abroad from a domestic-first country while a domestic node was up and free.
    domestic_violations: int
    upstream: int
    #: Same-ASN choices: the largest distance past the nearest eligible node ...
    same_asn_worst_km: float
    #: ... and how many went past it by more than the configured bound: the bonuses the node
    #: had plus the near-equal band at the nearest node's distance.
    same_asn_beyond_bound: int
    detours: tuple[tuple[float, Outcome], ...]

    @property
    def ratio(self) -> float:
        return self.mean_km / self.optimum_mean_km

    @property
    def worst_over_share(self) -> float:
        return max(self.over_share.values(), default=0.0)


def summarize(result: Result, policy: RoutingConfig, detours: int = 5) -> Summary:
    routed = [o for o in result.outcomes if o.node is not None]
    kms = sorted(o.km for o in routed)
    cross = [
        o for o in routed if o.node is not None and o.node.country != o.client.location.country
    ]
    same_asn = [
        o
        for o in routed
        if o.node is not None and o.client.location.asn in o.node.asns and o.nearest is not None
    ]

    def bound(o: Outcome) -> float:
        home = o.node is not None and o.node.country == o.client.location.country
        band = near_equal_bound(o.nearest_km, policy) - o.nearest_km
        return policy.asn_bonus_km + (policy.country_bonus_km if home else 0.0) + band

    ranked = sorted(
        ((o.km - o.nearest_km, o) for o in routed if o.nearest is not None),
        key=lambda pair: pair[0],
        reverse=True,
    )
    return Summary(
        mean_km=statistics.fmean(kms),
        p50_km=kms[len(kms) // 2],
        p95_km=kms[min(len(kms) - 1, math.ceil(len(kms) * 0.95) - 1)],
        nearest_mean_km=statistics.fmean(o.nearest_km for o in routed if o.nearest is not None),
        optimum_mean_km=result.optimum_km,
        over_share={
            n.config.id: result.peak[n.config.id] / n.free for n in result.nodes if n.free > 0
        },
        cross_border=len(cross),
        domestic_violations=sum(o.domestic_free for o in cross),
        upstream=len(result.outcomes) - len(routed),
        same_asn_worst_km=max((o.km - o.nearest_km for o in same_asn), default=0.0),
        same_asn_beyond_bound=sum(o.km - o.nearest_km > bound(o) for o in same_asn),
        detours=tuple(ranked[:detours]),
    )


def render(summary: Summary, label: str) -> str:
    lines = [
        f"== {label}",
        f"mean {summary.mean_km:.0f} km, p50 {summary.p50_km:.0f} km, p95 {summary.p95_km:.0f} km",
        f"nearest eligible: mean {summary.nearest_mean_km:.0f} km; capacity-aware optimum: "
        f"mean {summary.optimum_mean_km:.0f} km; gateway / optimum {summary.ratio:.3f}",
        f"worst over-share of free capacity {summary.worst_over_share:.2f}; cross-border "
        f"{summary.cross_border} (domestic-first violations {summary.domestic_violations}); "
        f"upstream {summary.upstream}; same-ASN choices past the nearest by at most "
        f"{summary.same_asn_worst_km:.0f} km, {summary.same_asn_beyond_bound} beyond the bound",
        "over-share per node (peak / free capacity), highest first:",
    ]
    shares = sorted(summary.over_share.items(), key=lambda item: -item[1])
    for start in range(0, len(shares), 5):
        lines.append(
            "  " + "  ".join(f"{node} {share:.2f}" for node, share in shares[start : start + 5])
        )
    lines.append("largest detours past the nearest eligible node:")
    for extra, o in summary.detours:
        where = o.client.location
        lines.append(
            f"  +{extra:.0f} km: {o.client.ip} ({where.country}, {where.latitude}, "
            f"{where.longitude}, AS{where.asn or '-'}) -> {o.node.id if o.node else 'upstream'} "
            f"{o.km:.0f} km; nearest {o.nearest.id if o.nearest else '-'} {o.nearest_km:.0f} km"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="simulate-routing", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--world", type=Path, default=DEFAULT_WORLD)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="gateway config whose routing and state sections apply")  # fmt: skip
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--country", default="CN", help="country of a share of the sample")
    parser.add_argument("--country-share", type=float, default=0.6)
    parser.add_argument("--csv", type=Path, help="CSV of address,weight rows to draw from")
    parser.add_argument("--city-db", type=Path, help="City mmdb (default: the bundled one)")
    parser.add_argument("--asn", action="store_true", help="give clients ASNs (world networks)")
    parser.add_argument("--arrival-s", type=float, default=defaults.arrival_s)
    parser.add_argument("--hold-s", type=float, default=defaults.hold_s)
    parser.add_argument("--reading-s", type=float, default=defaults.reading_s)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--live",
        action="store_true",
        help="also run the world for real (local node servers, a gateway with --workers, "
        "Redis) with the same clients at the same times, and compare",
    )
    parser.add_argument("--workers", type=int, default=2, help="gateway workers of --live")
    args = parser.parse_args(argv)
    options = Options(args.arrival_s, args.hold_s, args.reading_s, args.seed, args.asn)
    try:
        world = load_world(args.world, args.config)
        clients = draw_clients(world, args.clients, options, args.csv, args.city_db,
                               args.country, args.country_share)  # fmt: skip
        result = simulate(world, clients, options)
    except SimError as exc:
        print(f"simulate-routing: {exc}", file=sys.stderr)
        return 2
    label = f"{len(clients)} clients, {len(world.nodes)} nodes, " + (
        "with ASNs" if options.asn else "no ASN database"
    )
    simulated = summarize(result, world.config.routing)
    print(render(simulated, f"simulated: {label}"))
    if not args.live:
        return 0
    from bench_support.routing_live import run_live

    live_result, failures = run_live(
        world, args.world, args.config, clients, options,
        workers=args.workers, city_db=args.city_db,
    )  # fmt: skip
    live = summarize(live_result, world.config.routing)
    print(render(live, f"live, {args.workers} gateway workers: {label}"))
    print(agreement(simulated, live, len(clients) - len(live_result.outcomes), failures))
    return 0 if not failures else 1


def agreement(
    simulated: Summary, live: Summary, unanswered: int, failures: Mapping[str, int]
) -> str:
    """The simulated and the live run side by side, on the figures issue bounds hold."""
    rows = [
        ("gateway / optimum", f"{simulated.ratio:.3f}", f"{live.ratio:.3f}"),
        ("mean km", f"{simulated.mean_km:.0f}", f"{live.mean_km:.0f}"),
        ("worst over-share", f"{simulated.worst_over_share:.2f}", f"{live.worst_over_share:.2f}"),
        ("domestic-first violations", str(simulated.domestic_violations),
         str(live.domestic_violations)),
        ("same-ASN beyond bound", str(simulated.same_asn_beyond_bound),
         str(live.same_asn_beyond_bound)),
        ("upstream", str(simulated.upstream), str(live.upstream)),
    ]  # fmt: skip
    lines = ["== simulated vs live", f"{'':28}{'simulated':>12}{'live':>12}"]
    lines += [f"{name:28}{sim:>12}{real:>12}" for name, sim, real in rows]
    problems = ", ".join(f"{count} {what}" for what, count in failures.items())
    lines.append(
        f"clients without an answer: {unanswered}" + (f" ({problems})" if problems else "")
    )
    return "\n".join(lines)


def draw_clients(
    world: World,
    count: int,
    options: Options,
    csv_path: Path | None,
    city_db: Path | None,
    country: str | None,
    share: float,
) -> list[SimClient]:
    rng = random.Random(options.seed)
    locator = MaxMindLocator(GeoIPConfig(city_db=city_db, cache_size=0))
    try:
        if csv_path is not None:
            clients = sample_from_csv(locator, csv_path, count, rng)
        else:
            clients = sample_from_mmdb(locator, count, country, share, rng)
    finally:
        locator.close()
    return with_networks(clients, world.networks, rng) if options.asn else clients
