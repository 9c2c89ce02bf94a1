"""Prometheus metrics: request counters and histograms, and live state read at scrape time.

The request-path calls (``request_done``, ``decision``, ``upstream_call``) cost a few dict
lookups: label children are resolved once and cached. Every label value is bounded (countries
from the country table, continents from a fixed set, reasons capped, methods normalised), so
no client can grow the number of series. Node, catalog, Redis and GeoIP state comes from one
``GatewaySample`` taken when Prometheus scrapes, so it costs nothing per request.

Several worker processes (behind ``SO_REUSEPORT``)
---------------------------------------------------
Counters and histograms are shared through prometheus_client's multiprocess mode: each worker
writes its values to files in one directory, and a scrape of any worker sums all the files and
adds that worker's live state. prometheus_client decides between in-memory and file-backed
values when it is first imported, from ``PROMETHEUS_MULTIPROC_DIR``, and names the files from
the same variable when metrics are created. So the server must:

1. in the parent, before any worker starts: call ``prepare_multiprocess_dir(path)`` (files left
   by an earlier run would be added to the new counts) and set
   ``os.environ["PROMETHEUS_MULTIPROC_DIR"] = path``;
2. start each worker with that environment before it imports prometheus_client (a fresh
   interpreter; or a fork of a parent that imported it only after setting the variable), and
   create ``GatewayMetrics(sample, multiprocess_dir=path)`` there. ``GatewayMetrics`` raises
   ``ValueError`` if the variable came too late or names another directory;
3. call ``worker_exited(pid)`` in the parent when a worker exits.

The request counts and the catalog counts are plain numbers inside each worker (a
prometheus_client ``inc`` takes a lock, and a file write in multiprocess mode); they are added
to the metrics at every scrape and, in multiprocess mode, by a timer at most a second after
they were counted (a scrape connection kept alive always reaches the same worker, so waiting
for scrapes would leave the other workers' counts behind) and when the worker stops
(``flush``). A scrape may therefore miss the last second of another worker's counts.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from gateway.geo.countries import CONTINENTS, country_table

PREFIX = "mirror_gateway"
MULTIPROC_ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"

Outcome = Literal["node", "upstream", "error"]
RouteLabel = Literal["resolve", "api", "admin", "explain", "health", "metrics", "other"]
UpstreamKind = Literal["api", "resolve"]
AdminMode = Literal["active", "draining", "disabled"]
#: Why a new client connection was closed at once (``web.connection_limits``).
Refusal = Literal["max_connections", "max_connections_per_ip"]
#: The phase of a request a client took too long to send (``server.*_timeout_s``).
SlowPhase = Literal["header", "body"]

#: A routing decision takes microseconds; anything past 10 ms is a fault worth seeing as +Inf.
DECISION_BUCKETS = (2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01)
#: Redirects answer in well under a millisecond; API pass-through takes upstream's time.
REQUEST_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30
)  # fmt: skip
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

UNKNOWN = "unknown"
OTHER = "other"
MAX_REASON_LENGTH = 40
_REASON = re.compile(r"[a-z_]+")
_ROUTES: frozenset[str] = frozenset(get_args(RouteLabel))
_METHODS = {"GET": "GET", "HEAD": "HEAD", "POST": "POST"}
_CODE_CLASSES = {status: f"{status // 100}xx" for status in range(100, 600)}
ADMIN_MODES: tuple[AdminMode, ...] = get_args(AdminMode)
#: ``Catalog.stats()`` names of the lookup outcomes -> ``result`` label.
_LOOKUP_RESULTS = {
    "hits": "hit",
    "misses": "miss",
    "stale_served": "stale",
    "negative_hits": "negative",
}
#: Other ``Catalog.stats()`` counts -> metric name (without ``_total``) and help.
_CATALOG_COUNTS = {
    "upstream_fetches": (
        f"{PREFIX}_catalog_upstream_fetches",
        "HTTP requests the catalog sent upstream (every page and redirect).",
    ),
    "upstream_errors": (
        f"{PREFIX}_catalog_upstream_errors",
        "Catalog loads that ended with upstream unavailable or timed out.",
    ),
    "redis_hits": (f"{PREFIX}_catalog_redis_hits", "Catalog records loaded from Redis."),
    "redis_errors": (
        f"{PREFIX}_catalog_redis_errors",
        "Failed catalog Redis calls and unusable Redis records.",
    ),
}
#: Seconds between copies of a worker's request and catalog counts into the multiprocess files.
FLUSH_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class NodeSample:
    node_id: str
    up: bool
    admin_mode: str
    #: Vantage -> EWMA probe latency in seconds.
    probe_latency_s: Mapping[str, float]
    #: Vantage -> unix time of the last successful probe.
    last_ok_at: Mapping[str, float]
    #: Fraction of capacity in use.
    load_ratio: float | None
    #: The node's configured capacity over the sum over nodes; None if unset.
    capacity_share: float | None
    #: Now minus the newest ``synced_at`` in the node's manifest; None without a manifest.
    sync_lag_s: float | None


@dataclass(frozen=True, slots=True)
class GatewaySample:
    nodes: Sequence[NodeSample]
    #: ``Catalog.stats()``: monotonic counts since the catalog started.
    catalog: Mapping[str, int]
    redis_configured: bool
    redis_connected: bool
    degraded: bool
    #: Role ("city" / "asn") -> unix build time of the GeoIP database.
    geoip_build_time: Mapping[str, float]


def reason_label(reason: str) -> str:
    """``reason`` if it looks like a machine reason, else "other": labels stay bounded."""
    if len(reason) <= MAX_REASON_LENGTH and _REASON.fullmatch(reason):
        return reason
    return OTHER


def prepare_multiprocess_dir(path: str | os.PathLike[str]) -> None:
    """Create ``path``, or empty it of an earlier run's metric files; call before any worker.

    Only the ``*.db`` files prometheus_client writes are removed, so a directory shared by
    mistake with something else loses nothing else.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()


def worker_exited(pid: int) -> None:
    """Call in the parent when worker ``pid`` exits (``PROMETHEUS_MULTIPROC_DIR`` must be set).

    Drops the exited worker's live-gauge files so they stop being reported; its counters and
    histograms stay, since the totals they contributed to must not go down.
    """
    path = os.environ.get(MULTIPROC_ENV_VAR)
    if not path:
        raise ValueError(f"worker_exited needs {MULTIPROC_ENV_VAR}, as set for the workers")
    mark_process_dead(pid, path)  # type: ignore[no-untyped-call]  # unannotated


def _check_multiprocess_dir(path: str) -> None:
    if values.ValueClass is values.MutexValue:
        raise ValueError(
            f"multiprocess_dir is set, but prometheus_client was imported without "
            f"{MULTIPROC_ENV_VAR} in the environment, so the counts would stay in this process: "
            f"set {MULTIPROC_ENV_VAR}={path} before the worker starts"
        )
    configured = os.environ.get(MULTIPROC_ENV_VAR, "")
    if not (os.path.isdir(path) and configured and os.path.samefile(path, configured)):
        raise ValueError(
            f"multiprocess_dir {path!r} must be an existing directory and the one "
            f"{MULTIPROC_ENV_VAR} names ({configured!r})"
        )


class _CatalogCounters:
    """The catalog's monotonic counts as counters, so that multiprocess mode can sum them.

    ``flush`` adds what the catalog counted since the previous flush. A count lower than last
    time comes from a new catalog counting from zero: all of it is new.
    """

    def __init__(self) -> None:
        lookups = Counter(
            f"{PREFIX}_catalog_lookups",
            "Catalog lookups by result: fresh from memory (hit), loaded (miss), stale served "
            "while refreshing, or a remembered not-found (negative).",
            ["result"],
            registry=None,
        )
        self._counters: dict[str, Counter] = {
            stat: lookups.labels(result) for stat, result in _LOOKUP_RESULTS.items()
        }
        others = {
            stat: Counter(name, doc, registry=None) for stat, (name, doc) in _CATALOG_COUNTS.items()
        }
        self._counters.update(others)
        self.metrics: tuple[Counter, ...] = (lookups, *others.values())
        self._flushed: dict[str, int] = {}

    def flush(self, stats: Mapping[str, int]) -> None:
        for stat, counter in self._counters.items():
            value = stats.get(stat)
            if value is None:
                continue
            before = self._flushed.get(stat, 0)
            added = value - before if value >= before else value
            if added:
                counter.inc(added)
            self._flushed[stat] = value


class _LiveStateCollector:
    """Turns one ``GatewaySample`` per scrape into gauges (and the catalog counters)."""

    def __init__(
        self,
        sample: Callable[[], GatewaySample],
        catalog: _CatalogCounters,
        *,
        report_catalog: bool,
        clock: Callable[[], float],
    ) -> None:
        self._sample = sample
        self._catalog = catalog
        self._report_catalog = report_catalog
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        sample = self._sample()
        self._catalog.flush(sample.catalog)
        if self._report_catalog:
            for counter in self._catalog.metrics:
                yield from counter.collect()
        yield from _node_metrics(sample.nodes)
        yield from _health_metrics(sample)
        yield from _geoip_metrics(sample.geoip_build_time, self._clock())


def _gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=labels)


def _node_metrics(nodes: Sequence[NodeSample]) -> Iterator[Metric]:
    up = _gauge("node_up", "1 if the node passes its probes, else 0.", ["node"])
    admin = _gauge(
        "node_admin_state", "1 for the node's admin mode, 0 for the others.", ["node", "state"]
    )
    latency = _gauge(
        "node_probe_latency_seconds",
        "Moving average of the node's successful probe latency, per probing vantage.",
        ["node", "vantage"],
    )
    last_ok = _gauge(
        "node_last_probe_success_timestamp_seconds",
        "Unix time of the node's last successful probe, per probing vantage.",
        ["node", "vantage"],
    )
    load = _gauge("node_load_ratio", "Fraction of the node's capacity in use.", ["node"])
    share = _gauge(
        "node_capacity_share_ratio",
        "The node's configured capacity over the sum of all nodes' capacities.",
        ["node"],
    )
    lag = _gauge(
        "node_sync_lag_seconds",
        "Seconds since the newest commit in the node's sync manifest was synced.",
        ["node"],
    )
    for node in nodes:
        node_id = node.node_id
        up.add_metric([node_id], 1.0 if node.up else 0.0)
        for mode in ADMIN_MODES:
            admin.add_metric([node_id, mode], 1.0 if node.admin_mode == mode else 0.0)
        for vantage, seconds in node.probe_latency_s.items():
            latency.add_metric([node_id, vantage], seconds)
        for vantage, timestamp in node.last_ok_at.items():
            last_ok.add_metric([node_id, vantage], timestamp)
        if node.load_ratio is not None:
            load.add_metric([node_id], node.load_ratio)
        if node.capacity_share is not None:
            share.add_metric([node_id], node.capacity_share)
        if node.sync_lag_s is not None:
            lag.add_metric([node_id], node.sync_lag_s)
    yield from (up, admin, latency, last_ok, load, share, lag)


def _health_metrics(sample: GatewaySample) -> Iterator[Metric]:
    if sample.redis_configured:
        connected = _gauge("redis_connected", "1 if the configured Redis is reachable, else 0.")
        connected.add_metric([], 1.0 if sample.redis_connected else 0.0)
        yield connected
    degraded = _gauge(
        "degraded", "1 while the gateway routes from its last known state (see /readyz), else 0."
    )
    degraded.add_metric([], 1.0 if sample.degraded else 0.0)
    yield degraded


def _geoip_metrics(build_times: Mapping[str, float], now: float) -> Iterator[Metric]:
    built = _gauge(
        "geoip_database_build_timestamp_seconds",
        "Unix build time of the GeoIP database in use, per role (city, asn).",
        ["role"],
    )
    age = _gauge(
        "geoip_database_age_seconds",
        "Seconds since the GeoIP database in use was built, per role (city, asn).",
        ["role"],
    )
    for role, timestamp in build_times.items():
        built.add_metric([role], timestamp)
        age.add_metric([role], now - timestamp)
    yield from (built, age)


class _Tally:
    """Request-path counts kept as plain numbers and added to the Prometheus children in bulk.

    Every prometheus_client ``inc`` takes a lock, and in multiprocess mode writes a file-backed
    value; a request makes seven of them. Counting into dicts and flushing before every
    collection (and, with several workers, at least once a second) gives the same totals.
    """

    def __init__(self) -> None:
        self._counts: dict[Counter, int] = {}
        #: Histogram child -> [sum, count in bucket 0, count in bucket 1, ...].
        self._observed: dict[Histogram, list[float]] = {}
        self._bounds: dict[Histogram, Sequence[float]] = {}

    def count(self, child: Counter) -> None:
        counts = self._counts
        counts[child] = counts.get(child, 0) + 1

    def observe(self, child: Histogram, value: float) -> None:
        pending = self._observed.get(child)
        if pending is None:
            bounds = self._bounds[child] = child._upper_bounds
            pending = self._observed[child] = [0.0] * (len(bounds) + 1)
        pending[0] += value
        # The first bucket whose upper bound is >= value, as Histogram.observe picks it.
        pending[bisect.bisect_left(self._bounds[child], value) + 1] += 1

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for counter, added in counts.items():
            counter.inc(added)
        observed, self._observed = self._observed, {}
        for histogram, pending in observed.items():
            histogram._sum.inc(pending[0])
            for bucket, observations in zip(histogram._buckets, pending[1:], strict=True):
                if observations:
                    bucket.inc(observations)

    def collect(self) -> Iterator[Metric]:
        """Registered first, so a scrape sees every count made before it; yields nothing."""
        self.flush()
        return iter(())


class GatewayMetrics:
    """The gateway's metrics; ``render`` answers a scrape.

    ``registry`` (default: a new one) receives everything ``render`` exposes. With
    ``multiprocess_dir`` (see the module docstring) that is every worker's counters and
    histograms, summed, plus this worker's live state.
    """

    def __init__(
        self,
        sample: Callable[[], GatewaySample],
        registry: CollectorRegistry | None = None,
        *,
        multiprocess_dir: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        if multiprocess_dir is not None:
            _check_multiprocess_dir(multiprocess_dir)
        self._tally = _Tally()
        self.registry.register(self._tally)
        # In multiprocess mode these live in files that MultiProcessCollector sums; registering
        # them as well would count this worker twice.
        own = self.registry if multiprocess_dir is None else None
        self._decisions = Counter(
            f"{PREFIX}_decisions",
            "Routing decisions for resolve requests, by outcome (node, upstream, error) and "
            "reason.",
            ["outcome", "reason"],
            registry=own,
        )
        self._redirects = Counter(
            f"{PREFIX}_redirects", "Redirects to each mirror node.", ["node"], registry=own
        )
        self._client_requests = Counter(
            f"{PREFIX}_client_requests",
            "Resolve requests by the client's country and continent (unknown if not located).",
            ["country", "continent"],
            registry=own,
        )
        self._decision_seconds = Histogram(
            f"{PREFIX}_decision_duration_seconds",
            "Time to choose a node (filter, score, choose), without catalog lookups.",
            buckets=DECISION_BUCKETS,
            registry=own,
        )
        self._request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time to answer a request, by route, method and status class.",
            ["route", "method", "code_class"],
            buckets=REQUEST_BUCKETS,
            registry=own,
        )
        upstream_seconds = Histogram(
            f"{PREFIX}_upstream_request_duration_seconds",
            "Time of calls passed through to upstream (API and resolve), failed ones included.",
            ["kind"],
            buckets=UPSTREAM_BUCKETS,
            registry=own,
        )
        upstream_errors = Counter(
            f"{PREFIX}_upstream_errors",
            "Calls passed through to upstream that failed in transport or answered 5xx.",
            ["kind"],
            registry=own,
        )
        refused = Counter(
            f"{PREFIX}_connections_refused",
            "New client connections closed at once: a connection cap was reached.",
            ["reason"],
            registry=own,
        )
        self._refused = {reason: refused.labels(reason) for reason in get_args(Refusal)}
        timed_out = Counter(
            f"{PREFIX}_connections_timed_out",
            "Client connections closed because a request's head or body came too slowly.",
            ["phase"],
            registry=own,
        )
        self._timed_out = {phase: timed_out.labels(phase) for phase in get_args(SlowPhase)}
        kinds: tuple[UpstreamKind, ...] = get_args(UpstreamKind)
        # Both kinds up front: error rates then start from an explicit zero.
        self._upstream_seconds = {kind: upstream_seconds.labels(kind) for kind in kinds}
        self._upstream_errors = {kind: upstream_errors.labels(kind) for kind in kinds}
        self._decision_children: dict[tuple[str, str], Counter] = {}
        self._redirect_children: dict[str, Counter] = {}
        self._client_children: dict[tuple[str, str], Counter] = {}
        self._request_children: dict[tuple[str, str, str], Histogram] = {}
        self._countries = country_table()
        self._sample = sample
        self._catalog = _CatalogCounters()
        self.registry.register(
            _LiveStateCollector(
                sample, self._catalog, report_catalog=multiprocess_dir is None, clock=clock
            )
        )
        self._multiprocess = multiprocess_dir is not None
        self._flush_pending = False
        if multiprocess_dir is not None:
            # Registered after the live-state collector, which flushes this worker's catalog
            # counts into the files this one then reads.
            MultiProcessCollector(  # type: ignore[no-untyped-call]  # unannotated
                self.registry, path=multiprocess_dir
            )

    def request_done(self, route: RouteLabel, method: str, status: int, seconds: float) -> None:
        """Every answered request; ``seconds`` from the handler's start to its response."""
        key = (route, _METHODS.get(method, OTHER), _CODE_CLASSES.get(status, OTHER))
        child = self._request_children.get(key)
        if child is None:
            route_label = route if route in _ROUTES else OTHER
            child = self._request_seconds.labels(route_label, key[1], key[2])
            self._request_children[key] = child
        self._tally.observe(child, seconds)
        self._flush_soon()

    def decision(
        self,
        outcome: Outcome,
        reason: str,
        *,
        node_id: str | None,
        country: str | None,
        continent: str | None,
        decision_seconds: float | None,
    ) -> None:
        """One answer to a resolve request. ``node_id`` counts a redirect when the outcome is
        ``node``; ``decision_seconds`` is None when the policy did not run (catalog errors,
        private files)."""
        decided = self._decision_children.get((outcome, reason))
        if decided is None:
            label = reason_label(reason)
            decided = self._decisions.labels(outcome, label)
            if label == reason:
                # Only valid reasons are cached: garbage ones would grow the cache unbounded.
                self._decision_children[(outcome, reason)] = decided
        tally = self._tally
        tally.count(decided)
        if outcome == "node" and node_id is not None:
            redirect = self._redirect_children.get(node_id)
            if redirect is None:
                redirect = self._redirect_children[node_id] = self._redirects.labels(node_id)
            tally.count(redirect)
        location = (
            country if country in self._countries else UNKNOWN,
            continent if continent in CONTINENTS else UNKNOWN,
        )
        client = self._client_children.get(location)
        if client is None:
            client = self._client_children[location] = self._client_requests.labels(*location)
        tally.count(client)
        if decision_seconds is not None:
            tally.observe(self._decision_seconds, decision_seconds)

    def upstream_call(self, kind: UpstreamKind, seconds: float, status: int | None) -> None:
        """``status`` None: the call failed in transport (connect, reset, timeout)."""
        self._upstream_seconds[kind].observe(seconds)
        if status is None or status >= 500:
            self._upstream_errors[kind].inc()

    def connection_refused(self, reason: Refusal) -> None:
        self._tally.count(self._refused[reason])
        self._flush_soon()

    def connection_timed_out(self, phase: SlowPhase) -> None:
        self._tally.count(self._timed_out[phase])
        self._flush_soon()

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for a scrape with this ``Accept`` header, and its content type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type

    def flush(self) -> None:
        """Add every count made so far to the metrics (a stopping worker's last counts)."""
        self._tally.flush()
        self._catalog.flush(self._sample().catalog)

    def _flush_soon(self) -> None:
        if self._multiprocess and not self._flush_pending:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        # A timer rather than the next request: an idle worker's counts must reach the files
        # too. Without an event loop (scripts, tests) counts wait for ``flush`` or a scrape.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flush_pending = True
        loop.call_later(FLUSH_INTERVAL_S, self._timed_flush)

    def _timed_flush(self) -> None:
        self._flush_pending = False
        self.flush()
