"""gateway.metrics: each call and the scrape-time collector, asserted on a fresh registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from processes import REPO
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway.geo.countries import CONTINENTS, country_table
from gateway.metrics import (
    MULTIPROC_ENV_VAR,
    REQUEST_BUCKETS,
    GatewayMetrics,
    GatewaySample,
    NodeSample,
    Outcome,
    RouteLabel,
    UpstreamKind,
    prepare_multiprocess_dir,
    reason_label,
    worker_exited,
)

OPENMETRICS = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"
BUILT_2018 = 1530662400.0  # 2018-07-04: the bundled GeoLite2 build
NOW = 1732500000.0

BJ = NodeSample(
    node_id="bj",
    up=True,
    admin_mode="active",
    probe_latency_s={"default": 0.012, "eu": 0.2},
    last_ok_at={"default": NOW - 1, "eu": NOW - 3},
    load_ratio=0.25,
    capacity_share=2 / 3,
    sync_lag_s=120.0,
)
SH = NodeSample(
    node_id="sh",
    up=False,
    admin_mode="draining",
    probe_latency_s={},
    last_ok_at={},
    load_ratio=None,
    capacity_share=None,
    sync_lag_s=None,
)
CATALOG = {
    "hits": 10,
    "misses": 3,
    "stale_served": 2,
    "negative_hits": 1,
    "upstream_fetches": 7,
    "upstream_errors": 1,
    "redis_hits": 4,
    "redis_errors": 5,
}


SAMPLE = GatewaySample(
    nodes=(BJ, SH),
    catalog=CATALOG,
    redis_configured=True,
    redis_connected=True,
    degraded=False,
    geoip_build_time={"city": BUILT_2018, "asn": NOW - 86400},
)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def metrics_for(
    registry: CollectorRegistry, sample: GatewaySample | Callable[[], GatewaySample] | None = None
) -> GatewayMetrics:
    sampler = sample if callable(sample) else (lambda: sample or SAMPLE)
    return GatewayMetrics(sampler, registry, clock=lambda: NOW)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(f"mirror_gateway_{name}", labels)


# --------------------------------------------------------------------------- request path


def test_request_done_observes_by_route_method_and_code_class(registry: CollectorRegistry) -> None:
    metrics = metrics_for(registry)
    metrics.request_done("resolve", "GET", 302, 0.0004)
    metrics.request_done("resolve", "GET", 302, 0.002)
    metrics.request_done("api", "HEAD", 404, 0.3)
    metrics.request_done("admin", "POST", 503, 0.01)

    resolve = {"route": "resolve", "method": "GET", "code_class": "3xx"}
    assert value(registry, "request_duration_seconds_count", **resolve) == 2
    assert value(registry, "request_duration_seconds_sum", **resolve) == pytest.approx(0.0024)
    assert value(registry, "request_duration_seconds_bucket", **resolve, le="0.0005") == 1
    assert value(registry, "request_duration_seconds_bucket", **resolve, le="0.0025") == 2
    api = {"route": "api", "method": "HEAD", "code_class": "4xx"}
    assert value(registry, "request_duration_seconds_count", **api) == 1
    admin = {"route": "admin", "method": "POST", "code_class": "5xx"}
    assert value(registry, "request_duration_seconds_count", **admin) == 1


@pytest.mark.parametrize(
    ("method", "status", "labels"),
    [
        ("PROPFIND", 200, ("other", "2xx")),
        ("get", 200, ("other", "2xx")),  # methods are case-sensitive: "get" is not GET
        ("DELETE" * 1000, 405, ("other", "4xx")),
        ("HEAD", 101, ("HEAD", "1xx")),
        ("GET", 99, ("GET", "other")),
        ("GET", 600, ("GET", "other")),
    ],
)
def test_request_labels_are_bounded(
    registry: CollectorRegistry, method: str, status: int, labels: tuple[str, str]
) -> None:
    metrics_for(registry).request_done("resolve", method, status, 0.001)
    bounded = {"route": "resolve", "method": labels[0], "code_class": labels[1]}
    assert value(registry, "request_duration_seconds_count", **bounded) == 1


def test_decision_to_a_node_counts_decision_redirect_client_and_duration(
    registry: CollectorRegistry,
) -> None:
    metrics = metrics_for(registry)
    for _ in range(3):
        metrics.decision(
            "node",
            "same_country",
            node_id="bj",
            country="CN",
            continent="AS",
            decision_seconds=1.5e-5,
        )

    assert value(registry, "decisions_total", outcome="node", reason="same_country") == 3
    assert value(registry, "redirects_total", node="bj") == 3
    assert value(registry, "client_requests_total", country="CN", continent="AS") == 3
    assert value(registry, "decision_duration_seconds_count") == 3
    assert value(registry, "decision_duration_seconds_bucket", le="1e-05") == 0
    assert value(registry, "decision_duration_seconds_bucket", le="2.5e-05") == 3


def test_decision_upstream_or_error_sends_no_redirect(registry: CollectorRegistry) -> None:
    metrics = metrics_for(registry)
    metrics.decision(
        "upstream",
        "no_eligible_node",
        node_id=None,
        country="US",
        continent="NA",
        decision_seconds=2e-6,
    )
    metrics.decision(
        "error",
        "upstream_unavailable",
        node_id=None,
        country=None,
        continent=None,
        decision_seconds=None,
    )

    assert value(registry, "decisions_total", outcome="upstream", reason="no_eligible_node") == 1
    assert value(registry, "decisions_total", outcome="error", reason="upstream_unavailable") == 1
    assert value(registry, "client_requests_total", country="US", continent="NA") == 1
    assert value(registry, "client_requests_total", country="unknown", continent="unknown") == 1
    assert value(registry, "decision_duration_seconds_count") == 1  # None is not observed
    assert registry.get_sample_value("mirror_gateway_redirects_total", {"node": "bj"}) is None


@pytest.mark.parametrize(
    ("country", "continent", "expected"),
    [
        ("CN", "AS", ("CN", "AS")),
        ("ZZ", "AS", ("unknown", "AS")),  # not a country
        ("cn", "as", ("unknown", "unknown")),  # the geo layer hands out upper case
        ("CN\n", "AS ", ("unknown", "unknown")),
        ("<script>" * 100, "Atlantis", ("unknown", "unknown")),
        ("", "", ("unknown", "unknown")),
        (None, None, ("unknown", "unknown")),
    ],
)
def test_client_location_labels_are_bounded(
    registry: CollectorRegistry,
    country: str | None,
    continent: str | None,
    expected: tuple[str, str],
) -> None:
    metrics_for(registry).decision(
        "upstream",
        "no_eligible_node",
        node_id=None,
        country=country,
        continent=continent,
        decision_seconds=None,
    )
    labels = {"country": expected[0], "continent": expected[1]}
    assert value(registry, "client_requests_total", **labels) == 1


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("same_asn", "same_asn"),
        ("a" * 40, "a" * 40),
        ("a" * 41, "other"),
        ("RepoNotFound", "other"),
        ("status 503", "other"),
        ("down: timeout after 5 s", "other"),
        ("", "other"),
    ],
)
def test_reason_label_is_capped(reason: str, label: str) -> None:
    assert reason_label(reason) == label


def test_garbage_reasons_share_one_series(registry: CollectorRegistry) -> None:
    metrics = metrics_for(registry)
    for i in range(50):
        metrics.decision(
            "error",
            f"failed because of request {i}: " + "x" * 50,
            node_id=None,
            country=None,
            continent=None,
            decision_seconds=None,
        )
    assert value(registry, "decisions_total", outcome="error", reason="other") == 50
    families = {f.name: f for f in registry.collect()}
    totals = [s for s in families["mirror_gateway_decisions"].samples if s.name.endswith("_total")]
    assert len(totals) == 1


@pytest.mark.parametrize(
    ("status", "errors"), [(200, 0), (302, 0), (404, 0), (429, 0), (500, 1), (503, 1), (None, 1)]
)
def test_upstream_call_counts_transport_failures_and_5xx_as_errors(
    registry: CollectorRegistry, status: int | None, errors: int
) -> None:
    metrics = metrics_for(registry)
    metrics.upstream_call("api", 0.2, status)

    assert value(registry, "upstream_request_duration_seconds_count", kind="api") == 1
    assert value(registry, "upstream_request_duration_seconds_sum", kind="api") == 0.2
    assert value(registry, "upstream_errors_total", kind="api") == errors
    # Both kinds exist from the start, so an error rate starts from an explicit zero.
    assert value(registry, "upstream_errors_total", kind="resolve") == 0
    assert value(registry, "upstream_request_duration_seconds_count", kind="resolve") == 0


# --------------------------------------------------------------------------- scrape time


def test_collector_maps_the_sample_to_gauges(registry: CollectorRegistry) -> None:
    metrics_for(registry)

    assert value(registry, "node_up", node="bj") == 1
    assert value(registry, "node_up", node="sh") == 0
    assert value(registry, "node_admin_state", node="bj", state="active") == 1
    assert value(registry, "node_admin_state", node="bj", state="draining") == 0
    assert value(registry, "node_admin_state", node="sh", state="draining") == 1
    assert value(registry, "node_admin_state", node="sh", state="disabled") == 0
    assert value(registry, "node_probe_latency_seconds", node="bj", vantage="default") == 0.012
    assert value(registry, "node_probe_latency_seconds", node="bj", vantage="eu") == 0.2
    stamp = "node_last_probe_success_timestamp_seconds"
    assert value(registry, stamp, node="bj", vantage="eu") == NOW - 3
    assert value(registry, "node_load_ratio", node="bj") == 0.25
    assert value(registry, "node_capacity_share_ratio", node="bj") == pytest.approx(2 / 3)
    assert value(registry, "node_sync_lag_seconds", node="bj") == 120
    assert value(registry, "redis_connected") == 1
    assert value(registry, "degraded") == 0
    assert value(registry, "geoip_database_build_timestamp_seconds", role="city") == BUILT_2018
    assert value(registry, "geoip_database_age_seconds", role="city") == NOW - BUILT_2018
    assert value(registry, "geoip_database_age_seconds", role="asn") == 86400


def test_unknown_node_state_is_absent_not_zero(registry: CollectorRegistry) -> None:
    metrics_for(registry)
    for name in ("node_load_ratio", "node_capacity_share_ratio", "node_sync_lag_seconds"):
        assert value(registry, name, node="sh") is None
    assert value(registry, "node_probe_latency_seconds", node="sh", vantage="default") is None


def test_redis_connected_is_absent_without_redis(registry: CollectorRegistry) -> None:
    metrics_for(registry, replace(SAMPLE, redis_configured=False, redis_connected=False))
    assert value(registry, "redis_connected") is None
    assert value(registry, "degraded") == 0


def test_redis_down_reads_disconnected_and_degraded(registry: CollectorRegistry) -> None:
    metrics_for(registry, replace(SAMPLE, redis_connected=False, degraded=True))
    assert value(registry, "redis_connected") == 0
    assert value(registry, "degraded") == 1


def test_catalog_counts_become_counters(registry: CollectorRegistry) -> None:
    metrics_for(registry)
    assert value(registry, "catalog_lookups_total", result="hit") == 10
    assert value(registry, "catalog_lookups_total", result="miss") == 3
    assert value(registry, "catalog_lookups_total", result="stale") == 2
    assert value(registry, "catalog_lookups_total", result="negative") == 1
    assert value(registry, "catalog_upstream_fetches_total") == 7
    assert value(registry, "catalog_upstream_errors_total") == 1
    assert value(registry, "catalog_redis_hits_total") == 4
    assert value(registry, "catalog_redis_errors_total") == 5


def test_catalog_counters_never_go_down_when_the_catalog_starts_over(
    registry: CollectorRegistry,
) -> None:
    stats = {"hits": 10}
    metrics_for(registry, lambda: replace(SAMPLE, catalog=dict(stats)))
    assert value(registry, "catalog_lookups_total", result="hit") == 10
    stats["hits"] = 12
    assert value(registry, "catalog_lookups_total", result="hit") == 12
    stats["hits"] = 12
    assert value(registry, "catalog_lookups_total", result="hit") == 12
    stats["hits"] = 3  # a new catalog, counting from zero
    assert value(registry, "catalog_lookups_total", result="hit") == 15


def test_the_sample_is_taken_at_scrape_time_only(registry: CollectorRegistry) -> None:
    taken: list[GatewaySample] = []

    def sample() -> GatewaySample:
        taken.append(SAMPLE)
        return SAMPLE

    metrics = metrics_for(registry, sample)
    metrics.request_done("resolve", "GET", 302, 0.001)
    metrics.decision(
        "node", "nearest", node_id="bj", country="CN", continent="AS", decision_seconds=1e-5
    )
    metrics.upstream_call("resolve", 0.1, 200)
    assert taken == []
    metrics.render(None)
    assert len(taken) == 1


# --------------------------------------------------------------------------- rendering


def test_render_negotiates_the_format(registry: CollectorRegistry) -> None:
    metrics = metrics_for(registry)

    body, content_type = metrics.render(None)
    assert content_type.startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {"mirror_gateway_decisions", "mirror_gateway_node_up"} <= names

    body, content_type = metrics.render(OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    names = {family.name for family in openmetrics_families(body.decode())}
    assert {"mirror_gateway_decisions", "mirror_gateway_node_up"} <= names


label_text = st.text(max_size=30)
durations = st.floats(min_value=0, max_value=1e6)
gauge_values = st.floats(allow_nan=True, allow_infinity=True)
node_samples = st.builds(
    NodeSample,
    node_id=label_text,
    up=st.booleans(),
    admin_mode=st.sampled_from(["active", "draining", "disabled", "weird"]),
    probe_latency_s=st.dictionaries(label_text, gauge_values, max_size=3),
    last_ok_at=st.dictionaries(label_text, gauge_values, max_size=3),
    load_ratio=st.none() | gauge_values,
    capacity_share=st.none() | gauge_values,
    sync_lag_s=st.none() | gauge_values,
)
gateway_samples = st.builds(
    GatewaySample,
    nodes=st.lists(node_samples, max_size=4, unique_by=lambda n: n.node_id),
    catalog=st.dictionaries(
        st.sampled_from(sorted(CATALOG)), st.integers(min_value=0, max_value=2**53)
    ),
    redis_configured=st.booleans(),
    redis_connected=st.booleans(),
    degraded=st.booleans(),
    geoip_build_time=st.dictionaries(st.sampled_from(["city", "asn"]), gauge_values),
)
decisions = st.tuples(
    st.sampled_from(get_args(Outcome)),
    st.text(max_size=60) | st.sampled_from(["same_asn", "nearest", "no_eligible_node"]),
    st.none() | label_text,
    st.none() | st.text(max_size=4) | st.sampled_from(["CN", "US", "DE"]),
    st.none() | st.text(max_size=3) | st.sampled_from(sorted(CONTINENTS)),
    st.none() | durations,
)
requests = st.tuples(
    st.sampled_from(get_args(RouteLabel)),
    st.text(max_size=10) | st.sampled_from(["GET", "HEAD", "POST"]),
    st.integers(min_value=0, max_value=1000),
    durations,
)


@settings(max_examples=60, deadline=None)
@given(
    sample=gateway_samples,
    decided=st.lists(decisions, max_size=5),
    answered=st.lists(requests, max_size=5),
    upstream=st.lists(
        st.tuples(
            st.sampled_from(get_args(UpstreamKind)), durations, st.none() | st.integers(100, 599)
        ),
        max_size=3,
    ),
)
def test_render_always_parses_and_labels_stay_bounded(
    sample: GatewaySample,
    decided: list[tuple[Outcome, str, str | None, str | None, str | None, float | None]],
    answered: list[tuple[RouteLabel, str, int, float]],
    upstream: list[tuple[UpstreamKind, float, int | None]],
) -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(lambda: sample, registry)
    for outcome, reason, node_id, country, continent, seconds in decided:
        metrics.decision(
            outcome,
            reason,
            node_id=node_id,
            country=country,
            continent=continent,
            decision_seconds=seconds,
        )
    for route, method, status, seconds in answered:
        metrics.request_done(route, method, status, seconds)
    for kind, seconds, answer in upstream:
        metrics.upstream_call(kind, seconds, answer)

    text, _ = metrics.render(None)
    families = list(text_string_to_metric_families(text.decode()))
    openmetrics, _ = metrics.render(OPENMETRICS)
    assert list(openmetrics_families(openmetrics.decode()))

    countries = set(country_table()) | {"unknown"}
    continents = CONTINENTS | {"unknown"}
    for family in families:
        for s in family.samples:
            assert s.labels.get("country", "CN") in countries
            assert s.labels.get("continent", "AS") in continents
            assert reason_label(s.labels.get("reason", "nearest")) == s.labels.get(
                "reason", "nearest"
            )
            assert s.labels.get("method", "GET") in {"GET", "HEAD", "POST", "other"}


# --------------------------------------------------------------------------- multiprocess


def test_multiprocess_dir_needs_the_variable_before_import(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    # This test process imported prometheus_client without PROMETHEUS_MULTIPROC_DIR.
    with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR"):
        GatewayMetrics(lambda: SAMPLE, registry, multiprocess_dir=str(tmp_path))


def test_prepare_multiprocess_dir_creates_or_empties_only_metric_files(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    prepare_multiprocess_dir(directory)
    assert directory.is_dir()
    (directory / "counter_123.db").write_bytes(b"old")
    (directory / "histogram_123.db").write_bytes(b"old")
    (directory / "notes.txt").write_text("not ours")
    prepare_multiprocess_dir(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["notes.txt"]


def test_worker_exited_drops_its_live_gauges_and_keeps_its_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("gauge_livesum_123.db", "counter_123.db", "gauge_livesum_456.db"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv(MULTIPROC_ENV_VAR, str(tmp_path))
    worker_exited(123)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_123.db", "gauge_livesum_456.db"]


def test_worker_exited_needs_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV_VAR, raising=False)
    with pytest.raises(ValueError, match=MULTIPROC_ENV_VAR):
        worker_exited(123)


_WORKER = textwrap.dedent(
    """
    import json, sys
    from gateway.metrics import GatewayMetrics, GatewaySample, NodeSample

    role, directory, decisions, hits = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    node = NodeSample("bj", role == "renderer", "active", {}, {}, None, None, None)
    sample = GatewaySample([node], {"hits": hits}, False, False, False, {})
    metrics = GatewayMetrics(lambda: sample, multiprocess_dir=directory)
    for _ in range(decisions):
        metrics.decision(
            "node", "nearest", node_id="bj", country="CN", continent="AS", decision_seconds=1e-5
        )
    metrics.request_done("resolve", "GET", 302, 0.001)
    if role == "renderer":
        sys.stdout.write(metrics.render(None)[0].decode())
    else:
        metrics.flush()  # as a stopping worker does
    """
)


def _run_worker(directory: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-W", "error", "-c", _WORKER, args[0], str(directory), *args[1:]],
        cwd=REPO,
        env={**os.environ, MULTIPROC_ENV_VAR: str(directory)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    return out


def test_multiprocess_render_sums_every_worker(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    prepare_multiprocess_dir(directory)
    writers = [
        _run_worker(directory, "writer", "3", "10"),
        _run_worker(directory, "writer", "4", "5"),
    ]
    for writer in writers:
        _finish(writer)
    text = _finish(_run_worker(directory, "renderer", "1", "2"))

    samples = {
        (s.name, json.dumps(s.labels, sort_keys=True)): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def summed(name: str, **labels: str) -> float:
        return samples[(f"mirror_gateway_{name}", json.dumps(labels, sort_keys=True))]

    assert summed("decisions_total", outcome="node", reason="nearest") == 8
    assert summed("redirects_total", node="bj") == 8
    assert summed("client_requests_total", country="CN", continent="AS") == 8
    assert summed("decision_duration_seconds_count") == 8
    code = {"route": "resolve", "method": "GET", "code_class": "3xx"}
    assert summed("request_duration_seconds_count", **code) == 3
    # Each worker's own catalog counts, flushed when it stops, summed by the scrape.
    assert summed("catalog_lookups_total", result="hit") == 17
    # Live state is the rendering worker's own, reported once.
    assert summed("node_up", node="bj") == 1
    assert [n for (n, _) in samples if n == "mirror_gateway_node_up"] == ["mirror_gateway_node_up"]


@settings(max_examples=100, deadline=None)
@given(
    observations=st.lists(
        st.one_of(
            st.sampled_from(REQUEST_BUCKETS),  # exactly on a bucket bound
            st.floats(min_value=0.0, max_value=100.0, allow_nan=False),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_counts_held_in_memory_expose_what_direct_observation_does(
    observations: list[float],
) -> None:
    """The tally uses prometheus_client's histogram internals: this pins them down."""
    tallied = GatewayMetrics(lambda: SAMPLE, CollectorRegistry())
    registry = CollectorRegistry()
    direct = Histogram("h", "h", buckets=REQUEST_BUCKETS, registry=registry)
    for seconds in observations:
        tallied.request_done("resolve", "GET", 302, seconds)
        direct.observe(seconds)

    def buckets(registry: CollectorRegistry, name: str) -> dict[str, float]:
        return {
            f"{s.name.rsplit('_', 1)[-1]}:{s.labels.get('le')}": s.value
            for family in registry.collect()
            if family.name == name
            for s in family.samples
            if not s.name.endswith("_created")
        }

    expected = buckets(registry, "h")
    got = buckets(tallied.registry, "mirror_gateway_request_duration_seconds")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
