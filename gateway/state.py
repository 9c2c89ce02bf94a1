"""Live node state as the routing policy sees it: one immutable snapshot at a time.

Whatever keeps state current (static config, a prober, Redis) hands the policy a
``Mapping[str, NodeStatus]``; nodes missing from it are taken as up, which is what a gateway
without live state must assume.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class NodeStatus:
    up: bool = True
    #: Why the node is down (e.g. "timeout", "status 503"); empty while up.
    down_reason: str = ""
    #: Admin asked to stop sending new clients while existing downloads finish.
    draining: bool = False
    #: Admin switched the node off at run time (config ``enabled`` is the static switch).
    disabled: bool = False
    latency_ms: float | None = None
    #: Fraction of capacity in use (1.0 = at capacity); None when unknown.
    load: float | None = None


NODE_ASSUMED_UP = NodeStatus()

NodeStatuses = Mapping[str, NodeStatus]

NO_LIVE_STATE: NodeStatuses = MappingProxyType({})
