"""Node prober: probes every node from this vantage; publishes hysteresis verdicts and load.

Load formats. ``json``: an object like ``{"active_connections": 12, "egress_mbps": 830.5,
"capacity_connections": 2000, "capacity_mbps": 10000}``; each key optional (null = absent, other
keys ignored) but one of the first two required; values numbers >= 0. ``prometheus``: text format,
gauges ``mirror_node_active_connections``, ``mirror_node_egress_bytes_per_second``,
``mirror_node_capacity_connections``, ``mirror_node_capacity_egress_bytes_per_second`` (bytes/s,
read as Mbit/s: x*8/1e6), each summed over labels; one of the first two required. Else an error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import NodeConfig, ProbeSpec, ProbingConfig
from gateway.state.live import NOT_YET_PROBED, LoadRecord, LoadSource, ProbeRecord
from gateway.state.netio import bounded_chunks, describe_error, stop_if_cancelled

USER_AGENT = "mirror-gateway-prober/0.1 (+https://github.com/mirror-gateway)"

ProbeFailure = Literal["timeout", "connect error", "status", "wrong size", "bad response"]

#: A GET probe without ``expect_bytes`` reads this much of the body to see it arrive, no more.
DISCARD_BODY_BYTES = 64 * 1024
#: Larger load documents are refused rather than read into memory.
MAX_LOAD_BODY_BYTES = 1024 * 1024
#: Shutdown must not hang on a store that does not answer; the lock's TTL frees it anyway.
LOCK_RELEASE_TIMEOUT_S = 1.0

_LOAD_ACCEPT = {
    "json": "application/json",
    # Without it, a prometheus_client exporter may answer in OpenMetrics, which we do not parse.
    "prometheus": "text/plain; version=0.0.4",
}

_log = logging.getLogger("gateway.probe")


# --------------------------------------------------------------------------- probe verdicts


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    """One probe's raw result, before hysteresis."""

    ok: bool
    #: Empty when ok; else e.g. "timeout", "connect error: Connection refused", "status 503",
    #: "wrong size 12 != 665".
    reason: str
    #: Time to response headers of a completed exchange; None on timeout or connect error.
    latency_ms: float | None
    #: The kind of failure, a bounded set (``reason`` carries free text) for metrics labels.
    failure: ProbeFailure | None = None


def _failed(failure: ProbeFailure, reason: str, latency_ms: float | None = None) -> ProbeOutcome:
    return ProbeOutcome(ok=False, reason=reason, latency_ms=latency_ms, failure=failure)


def judge(spec: ProbeSpec, status: int, body_size: int | None, latency_ms: float) -> ProbeOutcome:
    """Whether a completed exchange shows a working node.

    ``body_size`` is the number of body bytes read; a probe stops reading one byte past
    ``expect_bytes``, so anything larger means "too long". The size is only checked on 2xx
    answers: a redirect's body is not the file, and a node that redirects is alive.
    """
    if status not in spec.expect_status:
        return _failed("status", f"status {status}", latency_ms)
    expected = spec.expect_bytes
    if spec.method == "GET" and expected is not None and 200 <= status < 300:
        if body_size is None:
            return _failed("wrong size", f"wrong size unknown != {expected}", latency_ms)
        if body_size > expected:
            return _failed("wrong size", f"wrong size > {expected}", latency_ms)
        if body_size != expected:
            return _failed("wrong size", f"wrong size {body_size} != {expected}", latency_ms)
    return ProbeOutcome(ok=True, reason="", latency_ms=latency_ms)


@dataclass(frozen=True, slots=True)
class Health:
    """The prober's memory of one node at one vantage."""

    #: A node is not trusted until probed: it starts down, with reason "not yet probed".
    up: bool = False
    probed: bool = False
    #: Consecutive good and bad probes; one of the two is always zero.
    successes: int = 0
    failures: int = 0
    #: EWMA over successful probes.
    latency_ms: float | None = None
    #: Why the node is down; empty while up.
    reason: str = NOT_YET_PROBED
    last_ok_at: float | None = None
    #: The latest probe timed out or could not connect.
    transport_failing: bool = False


#: Failures where the node could not be talked to at all, as a download would fail too.
TRANSPORT_FAILURES: frozenset[ProbeFailure] = frozenset({"timeout", "connect error"})


def next_health(
    health: Health, outcome: ProbeOutcome, *, rise: int, fall: int, alpha: float, now: float
) -> Health:
    """Apply one probe: ``fall`` failures in a row take an up node down, ``rise`` successes in a
    row bring a down (or new) node up; anything less keeps the current verdict."""
    if not outcome.ok:
        failures = health.failures + 1
        up = health.up and failures < fall
        return Health(
            up=up,
            probed=True,
            successes=0,
            failures=failures,
            latency_ms=health.latency_ms,
            reason="" if up else outcome.reason,
            last_ok_at=health.last_ok_at,
            transport_failing=outcome.failure in TRANSPORT_FAILURES,
        )
    successes = health.successes + 1
    up = health.up or successes >= rise
    latency = outcome.latency_ms
    if latency is not None and health.latency_ms is not None:
        latency = alpha * latency + (1 - alpha) * health.latency_ms
    return Health(
        up=up,
        probed=True,
        successes=successes,
        failures=0,
        latency_ms=health.latency_ms if latency is None else latency,
        reason="" if up else f"coming up ({successes}/{rise} good probes)",
        last_ok_at=now,
    )


# --------------------------------------------------------------------------- load formats


class LoadFormatError(ValueError):
    """A node's load document that does not follow its format; the message says what is wrong."""


_JSON_KEYS = ("active_connections", "egress_mbps", "capacity_connections", "capacity_mbps")

#: Prometheus metric -> (LoadRecord field, factor to our unit).
_PROMETHEUS_METRICS: Mapping[str, tuple[str, float]] = {
    "mirror_node_active_connections": ("active_connections", 1.0),
    "mirror_node_egress_bytes_per_second": ("egress_mbps", 8 / 1e6),
    "mirror_node_capacity_connections": ("capacity_connections", 1.0),
    "mirror_node_capacity_egress_bytes_per_second": ("capacity_mbps", 8 / 1e6),
}


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _load_number(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LoadFormatError(f"{where} must be a number >= 0, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and number >= 0):
        raise LoadFormatError(f"{where} must be a finite number >= 0, got {_show(value)}")
    return number


def parse_status_json(node_id: str, body: bytes, now: float) -> LoadRecord:
    """Read a ``json`` load document (format in the module docstring)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise LoadFormatError("status JSON: body is not UTF-8") from None
    except ValueError as exc:
        raise LoadFormatError(f"status JSON: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LoadFormatError(f"status JSON: expected an object, got {type(data).__name__}")
    values = {
        key: _load_number(f"status JSON: {key}", data[key])
        for key in _JSON_KEYS
        if data.get(key) is not None
    }
    return _load_record(
        node_id,
        "status-json",
        values,
        now,
        "status JSON: needs active_connections or egress_mbps; "
        f"got keys: {', '.join(sorted(map(str, data))) or 'none'}",
    )


def parse_prometheus_load(node_id: str, text: str, now: float) -> LoadRecord:
    """Read a ``prometheus`` load document (format in the module docstring)."""
    try:
        samples = [
            sample
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name in _PROMETHEUS_METRICS
        ]
    # The parser reports most malformed lines as ValueError, some label syntax as IndexError.
    except (ValueError, IndexError) as exc:
        raise LoadFormatError(
            f"Prometheus load: not valid text exposition format ({exc})"
        ) from None
    totals: dict[str, float] = {}
    for sample in samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
        where = f"Prometheus load: {sample.name}" + (f"{{{labels}}}" if labels else "")
        totals[sample.name] = totals.get(sample.name, 0.0) + _load_number(where, sample.value)
    values: dict[str, float] = {}
    for name, total in totals.items():
        field, factor = _PROMETHEUS_METRICS[name]
        values[field] = _load_number(f"Prometheus load: sum of {name}", total) * factor
    return _load_record(
        node_id,
        "prometheus",
        values,
        now,
        "Prometheus load: needs mirror_node_active_connections or "
        "mirror_node_egress_bytes_per_second; found neither",
    )


def _load_record(
    node_id: str, source: LoadSource, values: Mapping[str, float], now: float, missing: str
) -> LoadRecord:
    """The record, once the document gave at least one measure of load (else ``missing``)."""
    if "active_connections" not in values and "egress_mbps" not in values:
        raise LoadFormatError(missing)
    return LoadRecord(
        node_id=node_id,
        source=source,
        active_connections=values.get("active_connections"),
        egress_mbps=values.get("egress_mbps"),
        capacity_connections=values.get("capacity_connections"),
        capacity_mbps=values.get("capacity_mbps"),
        measured_at=now,
    )


def _parse_load(node: NodeConfig, body: bytes, now: float) -> LoadRecord:
    if node.load_format == "json":
        return parse_status_json(node.id, body, now)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise LoadFormatError("Prometheus load: body is not UTF-8") from None
    return parse_prometheus_load(node.id, text, now)


# --------------------------------------------------------------------------- HTTP


def new_session(concurrency: int) -> aiohttp.ClientSession:
    """The prober's HTTP client; call from a coroutine and close it when done."""
    return aiohttp.ClientSession(
        # A fresh connection per probe: latency then includes the handshake, as a client's
        # download does, and a node that stops accepting connections is noticed at once.
        connector=aiohttp.TCPConnector(limit=concurrency, force_close=True),
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": USER_AGENT},
    )


def _timeout(config: ProbingConfig) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=config.timeout_s, sock_connect=config.connect_timeout_s)


async def probe_once(
    session: aiohttp.ClientSession, node: NodeConfig, spec: ProbeSpec, config: ProbingConfig
) -> ProbeOutcome:
    """Probe ``node.base_url + spec.path`` once; network trouble is an outcome, never raised."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with session.request(
            spec.method, node.base_url + spec.path, timeout=_timeout(config), allow_redirects=False
        ) as response:
            latency_ms = (loop.time() - started) * 1000
            body_size = None
            if spec.method == "GET":
                limit = DISCARD_BODY_BYTES if spec.expect_bytes is None else spec.expect_bytes + 1
                body_size = sum([len(c) async for c in bounded_chunks(response.content, limit)])
            status = response.status
    except TimeoutError:
        return _failed("timeout", "timeout")
    except OSError as exc:  # aiohttp.ClientConnectorError among them
        return _failed("connect error", f"connect error: {describe_error(exc)}")
    except aiohttp.ClientError as exc:
        return _failed("bad response", f"bad response: {describe_error(exc)}")
    return judge(spec, status, body_size, latency_ms)


async def fetch_load(
    session: aiohttp.ClientSession,
    node: NodeConfig,
    config: ProbingConfig,
    *,
    clock: Callable[[], float] = time.time,
) -> LoadRecord | None:
    """The node's published load, or None (logged with the reason) when it cannot be had."""
    if node.load_url is None:
        return None
    try:
        async with session.get(
            node.load_url,
            timeout=_timeout(config),
            allow_redirects=False,
            headers={"Accept": _LOAD_ACCEPT[node.load_format]},
        ) as response:
            if response.status != 200:
                problem = f"status {response.status}"
            else:
                body = b"".join(
                    [c async for c in bounded_chunks(response.content, MAX_LOAD_BODY_BYTES + 1)]
                )
                if len(body) <= MAX_LOAD_BODY_BYTES:
                    return _parse_load(node, body, clock())
                problem = f"body over {MAX_LOAD_BODY_BYTES} bytes"
    except TimeoutError:
        problem = "timeout"
    except OSError as exc:
        problem = f"connect error: {describe_error(exc)}"
    except aiohttp.ClientError as exc:
        problem = f"bad response: {describe_error(exc)}"
    except LoadFormatError as exc:
        problem = str(exc)
    _log.warning("node %s: no load from %s: %s", node.id, node.load_url, problem)
    return None


# --------------------------------------------------------------------------- prober


class ProbeSink(Protocol):
    """Where verdicts go: the state store, which shares them with every instance."""

    async def publish_probe(self, record: ProbeRecord) -> None: ...

    async def publish_load(self, record: LoadRecord) -> None: ...

    async def try_acquire_prober_lock(self, vantage: str, ttl_s: float) -> bool: ...

    async def release_prober_lock(self, vantage: str) -> None: ...


class Prober:
    """Probes the enabled nodes round by round and publishes a verdict for each, every round.

    Instances sharing a vantage share one lock, so only one of them probes at a time. An
    instance that gains the lock starts from the verdicts the previous prober shared (via
    ``shared_verdict``), so a handover never sends a healthy node back through ``rise``.
    """

    def __init__(
        self,
        nodes: Sequence[NodeConfig],
        config: ProbingConfig,
        sink: ProbeSink,
        *,
        shared_verdict: Callable[[str, str], ProbeRecord | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sink = sink
        self._shared_verdict = shared_verdict
        self._clock = clock
        self._config = config
        self._nodes: dict[str, NodeConfig] = {}
        self._health: dict[str, Health] = {}
        self.reconfigure(nodes, config)

    def reconfigure(self, nodes: Sequence[NodeConfig], config: ProbingConfig) -> None:
        """Adopt a reloaded config: surviving nodes keep their health, new ones start unprobed.

        A disabled node is forgotten like a removed one, so when it is enabled again it must
        earn its way up from fresh probes rather than from a verdict that may be long stale.
        """
        self._config = config
        self._nodes = {node.id: node for node in nodes if node.enabled}
        self._health = {node_id: self._health.get(node_id, Health()) for node_id in self._nodes}

    def health(self, node_id: str) -> Health | None:
        return self._health.get(node_id)

    def adopt_shared_verdicts(self, vantage: str) -> None:
        """Continue from what the previous prober of ``vantage`` published."""
        if self._shared_verdict is None:
            return
        for node_id in self._nodes:
            record = self._shared_verdict(node_id, vantage)
            if record is not None:
                self._health[node_id] = Health(
                    up=record.up,
                    probed=True,
                    latency_ms=record.latency_ms,
                    reason=record.reason,
                    last_ok_at=record.last_ok_at,
                )

    async def run_round(self, session: aiohttp.ClientSession) -> None:
        """Probe every enabled node once, at most ``concurrency`` at a time, and publish."""
        config = self._config
        slots = asyncio.Semaphore(config.concurrency)
        async with asyncio.TaskGroup() as group:
            for node in self._nodes.values():
                group.create_task(self._check(session, node, config, slots))

    async def _check(
        self,
        session: aiohttp.ClientSession,
        node: NodeConfig,
        config: ProbingConfig,
        slots: asyncio.Semaphore,
    ) -> None:
        async with slots:
            outcome = await probe_once(session, node, node.probe or config.probe, config)
            # A node that just failed its probe would most likely fail this too, after a timeout.
            load = (
                await fetch_load(session, node, config, clock=self._clock)
                if outcome.ok and node.load_url
                else None
            )
        now = self._clock()
        before = self._health.get(node.id)
        if before is None:  # removed by a reload while its probe was in flight
            return
        after = next_health(
            before,
            outcome,
            rise=config.rise,
            fall=config.fall,
            alpha=config.latency_ewma_alpha,
            now=now,
        )
        self._health[node.id] = after
        if after.up and not before.up:
            _log.info("node %s is up from %s", node.id, config.vantage)
        elif before.up and not after.up:
            _log.warning("node %s is down from %s: %s", node.id, config.vantage, after.reason)
        record = ProbeRecord(
            node_id=node.id,
            vantage=config.vantage,
            up=after.up,
            reason=after.reason,
            latency_ms=after.latency_ms,
            checked_at=now,
            last_ok_at=after.last_ok_at,
            transport_failing=after.transport_failing,
        )
        await self._publish(node.id, "probe", self._sink.publish_probe(record))
        if load is not None:
            await self._publish(node.id, "load", self._sink.publish_load(load))

    async def _publish(self, node_id: str, what: str, publishing: Awaitable[None]) -> None:
        try:
            await publishing
        # The sink is another component (Redis behind it) whose errors we cannot enumerate; one
        # failed publish must not cost the other nodes their verdicts, and the next round retries.
        except Exception:  # noqa: BLE001
            _log.warning("node %s: could not publish %s", node_id, what, exc_info=True)

    async def _acquire_lock(self, config: ProbingConfig) -> bool:
        try:
            return await self._sink.try_acquire_prober_lock(
                config.vantage, ttl_s=3 * config.interval_s
            )
        # Same pluggable sink as above. When the lock cannot be asked for, probing anyway is the
        # safe side: two instances probing one vantage is harmless, none probing is not.
        except Exception:  # noqa: BLE001
            _log.warning(
                "prober lock for %s unavailable; probing anyway", config.vantage, exc_info=True
            )
            return True

    async def _release_lock(self, vantage: str) -> None:
        try:
            async with asyncio.timeout(LOCK_RELEASE_TIMEOUT_S):
                await self._sink.release_prober_lock(vantage)
        # Best effort while shutting down, whatever the sink raises: the lock expires by its TTL.
        except Exception:  # noqa: BLE001
            _log.warning("could not release the prober lock for %s", vantage, exc_info=True)

    async def run(self) -> None:
        """Probe every ``interval_s`` while holding this vantage's lock, until cancelled."""
        loop = asyncio.get_running_loop()
        limit = self._config.concurrency
        session = new_session(limit)
        held: str | None = None
        try:
            next_round = loop.time()
            while True:
                # The round's lock calls go to Redis, whose sends may swallow a cancellation.
                stop_if_cancelled()
                config = self._config
                if config.concurrency != limit:
                    # A reload raised or lowered concurrency: with a smaller pool than the
                    # semaphore, probes would wait for connections and count it as timeouts.
                    await session.close()
                    limit = config.concurrency
                    session = new_session(limit)
                was_held = held
                held = config.vantage if await self._acquire_lock(config) else None
                if held is not None:
                    if was_held != held:
                        self.adopt_shared_verdicts(held)
                    await self.run_round(session)
                # Fixed cadence so slow rounds do not drift; after an overrun, start at once
                # but do not burst to catch up on missed rounds.
                next_round = max(next_round + config.interval_s, loop.time())
                await asyncio.sleep(next_round - loop.time())
        except asyncio.CancelledError:
            if held is not None:
                await self._release_lock(held)
            raise
        finally:
            await session.close()
