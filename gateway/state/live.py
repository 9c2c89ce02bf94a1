"""Live node state: the records instances share, and the in-memory view the policy reads.

Three kinds of record describe a node: probe results (one per vantage point), load, and the
operator's admin state. Wherever they come from (this instance's prober, Redis, an admin call),
they are applied to a ``LiveState``, which keeps one ``NodeStatus`` per node current. Requests
only ever read ``LiveState.statuses``: no I/O on the request path. Nothing here expires by
time: when shared state is unreachable the gateway keeps routing on the last view it had.

A node's load is an *expected* load: its last reading plus the redirects this instance sent it
since, each counted as one connection that fades with the typical download duration
(``state.estimated_download_s``), so a node fills up between readings rather than taking every
client until the next one. A node with a capacity but no reading yet starts from a prior share
of it (``routing.load_prior``), not from empty.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from gateway.config import NodeConfig


@dataclass(frozen=True, slots=True)
class NodeStatus:
    up: bool = True
    #: Why the node is down (e.g. "timeout", "status 503", "not yet probed"); empty while up.
    down_reason: str = ""
    #: Admin asked to stop sending new clients while existing downloads finish.
    draining: bool = False
    #: Admin switched the node off at run time (config ``enabled`` is the static switch).
    disabled: bool = False
    latency_ms: float | None = None
    #: Expected fraction of capacity in use (1.0 = full); None when the node has no capacity.
    load: float | None = None
    #: Still up (hysteresis), but the latest probe could not connect or timed out.
    transport_failing: bool = False


NODE_ASSUMED_UP = NodeStatus()

NodeStatuses = Mapping[str, NodeStatus]

NO_LIVE_STATE: NodeStatuses = MappingProxyType({})

NOT_YET_PROBED = "not yet probed"
#: How often the state stores take up the redirects counted into the expected loads
#: (``LiveState.fade_loads``): how far behind a near-equal node's share may be.
FADE_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class ProbeRecord:
    """One vantage point's current verdict on one node (after hysteresis)."""

    node_id: str
    vantage: str
    up: bool
    #: Reason of the latest failed probe while down ("timeout", "connect error", "status 503",
    #: "wrong size 12 != 665"); empty while up.
    reason: str
    #: EWMA over successful probes; None before the first success.
    latency_ms: float | None
    #: Unix time of the latest probe and of the latest successful one.
    checked_at: float
    last_ok_at: float | None
    #: The latest probe timed out or could not connect (the verdict may still be up).
    transport_failing: bool = False


LoadSource = Literal["status-json", "prometheus", "redirects"]


@dataclass(frozen=True, slots=True)
class LoadRecord:
    node_id: str
    source: LoadSource
    active_connections: float | None = None
    egress_mbps: float | None = None
    #: What the node reports as its capacity; config ``capacity`` fills in what it does not.
    capacity_connections: float | None = None
    capacity_mbps: float | None = None
    measured_at: float = 0.0


AdminMode = Literal["active", "draining", "disabled"]


@dataclass(frozen=True, slots=True)
class AdminRecord:
    node_id: str
    mode: AdminMode
    changed_at: float = 0.0


def load_fraction(node: NodeConfig, record: LoadRecord | None, sent: float = 0.0) -> float | None:
    """The busier of connections and egress against capacity (reported, else configured).

    ``sent`` counts the connections the redirects since the record are expected to hold: on
    top of a reading, or at least that many where the record is itself an estimate from
    redirects (``source`` "redirects"), whose windows lag behind.
    """
    if record is None:
        return None
    fractions = []
    connections = record.capacity_connections or node.capacity.connections
    if connections and (record.active_connections is not None or sent):
        active = record.active_connections or 0.0
        active = max(active, sent) if record.source == "redirects" else active + sent
        fractions.append(active / connections)
    mbps = record.capacity_mbps or node.capacity.egress_mbps
    if record.egress_mbps is not None and mbps:
        fractions.append(record.egress_mbps / mbps)
    return max(fractions) if fractions else None


def within_deadband(current: float | None, new: float | None, deadband: float) -> bool:
    """Whether a load moving from ``current`` to ``new`` is noise to ignore: a move smaller than
    ``deadband`` that does not cross full capacity. Every status change re-ranks the routing
    cells that read the node, and load reports and redirect estimates wobble by a few percent
    from one reading to the next; a near-equal node's share then errs by at most ``deadband``
    of its capacity."""
    if current is None or new is None:
        return current is new
    return abs(new - current) < deadband and (new >= 1.0) == (current >= 1.0)


def preferred_probe(probes: Iterable[ProbeRecord], vantage: str) -> ProbeRecord | None:
    """This vantage's own verdict if it has one, else the most recent from anywhere."""
    best: ProbeRecord | None = None
    for record in probes:
        if record.vantage == vantage:
            return record
        if best is None or record.checked_at > best.checked_at:
            best = record
    return best


def node_status(
    node: NodeConfig,
    probe: ProbeRecord | None,
    load: LoadRecord | None,
    admin: AdminRecord | None,
    *,
    probing: bool,
    sent: float = 0.0,
    load_prior: float | None = None,
) -> NodeStatus:
    """A node's status from its records; ``sent``: connections expected from the redirects
    since its load record (``load_fraction``); ``load_prior``: the share of capacity assumed
    in use while it has no load record (None: unknown)."""
    if probe is None:
        up, reason, latency = not probing, NOT_YET_PROBED if probing else "", None
    else:
        up, reason, latency = probe.up, probe.reason, probe.latency_ms
    transport_failing = probe is not None and probe.up and probe.transport_failing
    mode = admin.mode if admin is not None else "active"
    return NodeStatus(
        up=up,
        down_reason="" if up else reason,
        draining=mode == "draining",
        disabled=mode == "disabled",
        latency_ms=latency,
        load=_expected_load(node, load, sent, load_prior),
        transport_failing=transport_failing,
    )


def _expected_load(
    node: NodeConfig, record: LoadRecord | None, sent: float, prior: float | None
) -> float | None:
    if record is not None or prior is None or not node.capacity.connections:
        return load_fraction(node, record, sent)
    return prior + sent / node.capacity.connections


def faded(count: float, since_s: float, download_s: float) -> float:
    """A count of downloads started ``since_s`` ago, less those expected to have finished
    (downloads lasting ``download_s`` on average, ending at a constant rate)."""
    return count * math.exp(-max(since_s, 0.0) / download_s)


@dataclass(slots=True)
class _NodeRecords:
    node: NodeConfig
    probes: dict[str, ProbeRecord] = field(default_factory=dict)
    load: LoadRecord | None = None
    admin: AdminRecord | None = None
    #: Redirects sent since the load record, faded as of ``sent_at`` (``faded``).
    sent: float = 0.0
    sent_at: float = 0.0


class LiveState:
    """The current view of every configured node, updated in place one node at a time.

    Single-threaded by design (the event loop): each apply replaces one immutable
    ``NodeStatus``, so a request always sees a consistent status per node.
    """

    def __init__(
        self,
        nodes: Sequence[NodeConfig],
        *,
        vantage: str,
        probing: bool,
        load_deadband: float = 0.0,
        load_prior: float | None = None,
        download_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.vantage = vantage
        self.probing = probing
        #: Load moves smaller than this (a fraction of capacity) keep the load in use, unless
        #: they cross full capacity (``state.load_deadband``).
        self.load_deadband = load_deadband
        #: Share of capacity a node without a load record is taken to carry
        #: (``routing.load_prior``); None: unknown.
        self.load_prior = load_prior
        #: Mean download duration: how fast redirects sent fade from the expected load
        #: (``state.estimated_download_s``).
        self.download_s = download_s
        self._clock = clock
        self._records: dict[str, _NodeRecords] = {}
        self.statuses: dict[str, NodeStatus] = {}
        #: Bumped on every change, so derived caches know when to rebuild.
        self.version = 0
        #: Set on every change, for the tasks that rebuild derived caches.
        self.changed = asyncio.Event()
        self.reconfigure(nodes)

    def reconfigure(self, nodes: Sequence[NodeConfig]) -> None:
        """Adopt a new node list (config reload), keeping what is known of surviving nodes."""
        old = self._records
        self._records = {}
        for node in nodes:
            kept = old.get(node.id)
            self._records[node.id] = (
                _NodeRecords(node, kept.probes, kept.load, kept.admin, kept.sent, kept.sent_at)
                if kept
                else _NodeRecords(node)
            )
        self.statuses = {node_id: self._status(r) for node_id, r in self._records.items()}
        self.version += 1
        self.changed.set()

    def _status(self, records: _NodeRecords) -> NodeStatus:
        probe = preferred_probe(records.probes.values(), self.vantage)
        sent = faded(records.sent, self._clock() - records.sent_at, self.download_s)
        return node_status(
            records.node, probe, records.load, records.admin, probing=self.probing,
            sent=sent, load_prior=self.load_prior,
        )  # fmt: skip

    def _refresh(self, node_id: str) -> None:
        records = self._records[node_id]
        status = self._status(records)
        current = self.statuses.get(node_id)
        if (
            current is not None
            and current.load != status.load
            and within_deadband(current.load, status.load, self.load_deadband)
        ):
            status = replace(status, load=current.load)
        if current != status:
            self.statuses[node_id] = status
            self.version += 1
            self.changed.set()

    def apply_probe(self, record: ProbeRecord) -> None:
        records = self._records.get(record.node_id)
        if records is None:
            return
        current = records.probes.get(record.vantage)
        if current is not None and current.checked_at > record.checked_at:
            return  # an older verdict arriving late must not undo a newer one
        records.probes[record.vantage] = record
        self._refresh(record.node_id)

    def apply_load(self, record: LoadRecord) -> None:
        records = self._records.get(record.node_id)
        if records is None:
            return
        if records.load is not None and records.load.measured_at > record.measured_at:
            return
        records.load = record
        if record.source != "redirects":
            # A reading counts the downloads of the redirects sent before it.
            records.sent = 0.0
        self._refresh(record.node_id)

    def count_redirect(self, node_id: str) -> None:
        """Count one redirect to ``node_id`` against its expected load. On the request path:
        a few arithmetic operations. The status changes at once only when the node turns
        full (the rule must stop sending to it); smaller moves are taken up by the next
        ``fade_loads``, because every status change makes the router score its cells again.
        """
        records = self._records.get(node_id)
        if records is None:
            return
        now = self._clock()
        records.sent = faded(records.sent, now - records.sent_at, self.download_s) + 1.0
        records.sent_at = now
        current = self.statuses.get(node_id)
        if current is None or current.load is None or current.load >= 1.0:
            return
        expected = _expected_load(records.node, records.load, records.sent, self.load_prior)
        if expected is not None and expected >= 1.0:
            self._refresh(node_id)

    def fade_loads(self) -> None:
        """Take up the redirects counted and how they have faded since, for every node (run
        every ``FADE_INTERVAL_S``, off the request path).

        A full node stays full until its next load record: the fading is a guess from a mean
        download duration, and downloads longer than that would fill it past capacity.
        """
        statuses = self.statuses
        for node_id in self._records:
            current = statuses.get(node_id)
            if current is None or current.load is None or current.load < 1.0:
                self._refresh(node_id)

    def apply_admin(self, record: AdminRecord) -> None:
        records = self._records.get(record.node_id)
        if records is None:
            return
        if records.admin is not None and records.admin.changed_at > record.changed_at:
            return
        records.admin = record
        self._refresh(record.node_id)

    def probe_records(self, node_id: str) -> tuple[ProbeRecord, ...]:
        records = self._records.get(node_id)
        return tuple(records.probes.values()) if records else ()

    def probe_record(self, node_id: str, vantage: str) -> ProbeRecord | None:
        records = self._records.get(node_id)
        return records.probes.get(vantage) if records else None

    def load_record(self, node_id: str) -> LoadRecord | None:
        records = self._records.get(node_id)
        return records.load if records else None

    def admin_mode(self, node_id: str) -> AdminMode:
        records = self._records.get(node_id)
        return records.admin.mode if records and records.admin else "active"

    def node_ids(self) -> tuple[str, ...]:
        return tuple(self._records)


def estimated_connections(redirects: float, window_s: float, download_s: float) -> float:
    """Concurrent downloads implied by a redirect count (Little's law: rate x duration)."""
    return redirects / window_s * download_s


class RedirectCounter:
    """Redirects this instance sent per node, for load estimates and cache balancing.

    ``count`` runs on every request, so it is a dict increment and nothing more; the window
    turns over from the periodic tasks, never from the request path.
    """

    def __init__(self) -> None:
        #: Redirects in the current window, per node.
        self.current: dict[str, int] = {}
        #: Counts not yet pushed to shared state.
        self._unflushed: dict[str, int] = {}

    def count(self, node_id: str) -> None:
        self.current[node_id] = self.current.get(node_id, 0) + 1
        self._unflushed[node_id] = self._unflushed.get(node_id, 0) + 1

    def take_unflushed(self) -> dict[str, int]:
        taken, self._unflushed = self._unflushed, {}
        return taken

    def restore_unflushed(self, counts: Mapping[str, int]) -> None:
        """Give back counts a failed flush could not push, so they go with the next one."""
        for node_id, n in counts.items():
            self._unflushed[node_id] = self._unflushed.get(node_id, 0) + n

    def rotate(self) -> dict[str, int]:
        """Close the current window and return its counts."""
        closed, self.current = self.current, {}
        return closed


class SmoothedRedirects:
    """Redirects per window and node, smoothed over windows (an exponentially weighted mean).

    A load estimated from one window alone swings: a node that looked idle draws every nearby
    client in the next window, then looks overloaded and is left idle in the one after, and
    each swing re-ranks every location near it. The smoothed count follows a node's sustained
    share of the traffic instead.
    """

    def __init__(self, newest_weight: float) -> None:
        #: The newest window's share of the estimate (1.0: that window alone).
        self.newest_weight = newest_weight
        self._smoothed: dict[str, float] = {}

    def add(self, node_id: str, redirects: int) -> float:
        """Take in one closed window's count; returns the smoothed count."""
        previous = self._smoothed.get(node_id)
        smoothed = (
            float(redirects)
            if previous is None
            else previous + self.newest_weight * (redirects - previous)
        )
        self._smoothed[node_id] = smoothed
        return smoothed

    def keep_only(self, node_ids: Iterable[str]) -> None:
        """Forget nodes no longer configured (a re-added node starts afresh)."""
        kept = set(node_ids)
        self._smoothed = {n: count for n, count in self._smoothed.items() if n in kept}
