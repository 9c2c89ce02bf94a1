"""A route as plain data: why the chosen node won and why every other node did not.

``route_report`` serves both the ``explain`` CLI, which has neither live node state nor node sync
and so takes every node as up and holding everything, and the ``/explain/`` endpoint, which
plans the request exactly as a redirect (``explain_request``) and adds both, with the catalog's
file. ``render_html`` turns a report into a self-contained page.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping
from typing import Any

from gateway.config import NodeConfig, RoutingConfig
from gateway.geo.clientip import ClientAddress
from gateway.geo.locator import Location
from gateway.hf.paths import FileRef, resolve_path_for
from gateway.routing.router import Route
from gateway.routing.rule import (
    Candidate,
    ChoiceReason,
    Cost,
    Exclusion,
    cost,
    distance_to,
    level_of,
    tier_of,
)
from gateway.runtime import Runtime
from gateway.state.live import NO_LIVE_STATE, NODE_ASSUMED_UP, NodeStatus, NodeStatuses
from gateway.web.plan import Plan, UpstreamOnly, plan_route

UPSTREAM_ONLY = "upstream only (private or gated)"

_CHOICE_TEXT: dict[ChoiceReason, str] = {
    "same_asn": "a node of least cost, in the client's own network (ASN)",
    "same_country": "a node of least cost, in the client's country",
    "same_continent": "a node of least cost, on the client's continent",
    "nearest": "a node of least cost, on another continent",
    "at_capacity_last_resort": "every eligible node is at capacity; the last resort",
    "no_eligible_node": "no node may serve this client; upstream does",
}


def _candidate(
    candidate: Candidate, chosen_id: str | None, shares: Mapping[str, float]
) -> dict[str, Any]:
    return {
        "node": candidate.node.id,
        "chosen": candidate.node.id == chosen_id,
        "tier": candidate.tier.config_name,
        "level": candidate.level.name.lower(),
        "distance_km": _km(candidate.distance_km),
        "score": round(candidate.score, 3),
        "cost": _cost(candidate.cost),
        "weight": candidate.node.weight,
        "share": round(shares.get(candidate.node.id, 0.0), 4),
    }


def _cost(terms: Cost) -> dict[str, Any]:
    """Every term of a node's cost in km, and their sum (``rule.Cost``)."""
    return {
        "distance_km": _km(terms.distance_km),
        "latency_km": round(terms.latency_km, 1),
        "asn_bonus_km": terms.asn_bonus_km,
        "country_bonus_km": terms.country_bonus_km,
        "total_km": round(terms.total, 1),
    }


def _capacity(node: NodeConfig, status: NodeStatus, policy: RoutingConfig) -> dict[str, Any]:
    """The load the rule reads, and the free connections it shares traffic by."""
    connections = node.capacity.connections
    assumed = status.load is None and connections is not None
    load = policy.load_prior if assumed else status.load
    return {
        "capacity_connections": connections,
        "expected_load": None if load is None else round(load, 3),
        "load_assumed": assumed,
        "free_connections": None
        if load is None or connections is None
        else round(max(0.0, 1.0 - load) * connections, 1),
    }


def _exclusion(exclusion: Exclusion) -> dict[str, Any]:
    return {"node": exclusion.node.id, "reason": exclusion.reason, "detail": exclusion.detail}


def _km(distance: float | None) -> float | None:
    return None if distance is None else round(distance, 1)


def _client(client: ClientAddress, location: Location) -> dict[str, Any]:
    return {
        "ip": None if client.ip is None else str(client.ip),
        "ip_source": client.source,
        "cdn_country": client.cdn_country,
        "country": location.country,
        "continent": location.continent,
        "latitude": location.latitude,
        "longitude": location.longitude,
        "asn": location.asn,
        "asn_org": location.asn_org,
    }


def _live(status: NodeStatus) -> dict[str, Any]:
    return {
        "up": status.up,
        "down_reason": status.down_reason or None,
        "admin": "disabled" if status.disabled else "draining" if status.draining else "active",
        "latency_ms": None if status.latency_ms is None else round(status.latency_ms, 1),
        "load": None if status.load is None else round(status.load, 3),
        "transport_failing": status.transport_failing,
    }


def _node(
    node: NodeConfig,
    status: NodeStatus,
    *,
    outcome: str,
    reason: str,
    detail: str,
    tier: str,
    level: str,
    terms: Cost,
    score: float | None,
    share: float,
    policy: RoutingConfig,
    missing: str | None,
    other_commit: str | None,
) -> dict[str, Any]:
    return {
        "node": node.id,
        "kind": node.kind,
        "country": node.country,
        "url": node.base_url,
        "outcome": outcome,
        "reason": reason,
        "detail": detail,
        "state": _live(status),
        "tier": tier,
        "level": level,
        "distance_km": _km(terms.distance_km),
        "score": None if score is None else round(score, 3),
        "cost": _cost(terms),
        **_capacity(node, status, policy),
        "share": round(share, 4),
        "holds_revision": missing is None,
        "serves_commit": other_commit,
        "sync_detail": missing,
    }


def _nodes(
    route: Route,
    policy: RoutingConfig,
    statuses: NodeStatuses,
    unavailable: Mapping[str, str],
    node_revisions: Mapping[str, str],
) -> list[dict[str, Any]]:
    """Every configured node: the eligible ones best first, then the excluded ones.

    The policy puts each node in exactly one of the two, so together they are all of them.
    """
    decision = route.decision
    chosen_id = decision.node.id if decision.node else None
    eligible = len(decision.candidates)
    shares = dict(decision.shares)
    rows = []
    for rank, candidate in enumerate(decision.candidates, 1):
        node = candidate.node
        chosen = node.id == chosen_id
        rows.append(
            _node(
                node,
                statuses.get(node.id, NODE_ASSUMED_UP),
                policy=policy,
                outcome="chosen" if chosen else "eligible",
                reason=decision.reason if chosen else "eligible",
                detail=f"{_CHOICE_TEXT[decision.reason]}; rank {rank} of {eligible} eligible"
                if chosen
                else f"eligible, rank {rank} of {eligible}; not chosen",
                tier=candidate.tier.config_name,
                level=candidate.level.name.lower(),
                terms=candidate.cost,
                score=candidate.score,
                share=shares.get(node.id, 0.0),
                missing=unavailable.get(node.id),
                other_commit=node_revisions.get(node.id),
            )
        )
    for exclusion in decision.excluded:
        node = exclusion.node
        status = statuses.get(node.id, NODE_ASSUMED_UP)
        # The last resort is listed as excluded (at capacity) and yet chosen.
        chosen = node.id == chosen_id
        location = route.location
        rows.append(
            _node(
                node,
                status,
                policy=policy,
                outcome="chosen" if chosen else "excluded",
                reason=decision.reason if chosen else exclusion.reason,
                detail=exclusion.detail,
                # Not a candidate, but what it would cost still tells the operator something.
                tier=tier_of(node, location).config_name,
                level=level_of(node, location, policy).name.lower(),
                terms=cost(node, distance_to(node, location), location, status, policy),
                score=None,
                share=1.0 if chosen else 0.0,
                missing=unavailable.get(node.id),
                other_commit=node_revisions.get(node.id),
            )
        )
    return rows


def route_report(
    route: Route,
    policy: RoutingConfig,
    statuses: NodeStatuses = NO_LIVE_STATE,
    unavailable: Mapping[str, str] | None = None,
    node_revisions: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The decision as JSON-able data, with every term of every node's cost under ``policy``.

    ``statuses`` is the live node state (none: every node up), ``unavailable`` the nodes that
    cannot serve the revision and why (none: every node holds it), ``node_revisions`` the nodes
    serving another commit of a moving ref.
    """
    decision = route.decision
    chosen_id = decision.node.id if decision.node else None
    return {
        "client": _client(route.client, route.location),
        "decision": {
            "target": chosen_id or "upstream",
            "reason": decision.reason,
            "detail": _CHOICE_TEXT[decision.reason],
            "location": route.url,
            "revision": route.revision,
            "shared_cacheable": route.shared_cacheable,
        },
        "candidates": [
            _candidate(c, chosen_id, dict(decision.shares)) for c in decision.candidates
        ],
        "excluded": [_exclusion(e) for e in decision.excluded],
        "nodes": _nodes(route, policy, statuses, unavailable or {}, node_revisions or {}),
    }


def _request(ref: FileRef, plan: Plan | None, override: bool) -> dict[str, Any]:
    meta = plan.meta if plan else None
    return {
        "path": resolve_path_for(ref),
        "repo_type": ref.repo_type,
        "repo_id": ref.repo_id,
        "revision": ref.revision,
        "file": ref.filename,
        "commit": plan.revision.commit if plan else None,
        "size": meta.size if meta else None,
        "etag": meta.etag if meta else None,
        "lfs": meta.lfs if meta else None,
        "client_override": override,
    }


async def explain_request(
    runtime: Runtime, ref: FileRef, client: ClientAddress, *, override: bool = False
) -> dict[str, Any]:
    """Plan ``ref`` for ``client`` exactly as a redirect is planned, and report it.

    Counts no redirect and changes no state; never sends a token anywhere. ``override`` says an
    operator chose the client address. Raises ``CatalogError`` as ``plan_route`` does.
    """
    now = time.time()
    placement = runtime.router.placement(client)
    try:
        plan = await plan_route(runtime, ref, placement, now=now, explain=True)
    except UpstreamOnly:
        location = placement.location
        return {
            "request": _request(ref, None, override),
            "client": _client(client, location),
            "decision": {
                "target": "upstream",
                "reason": "upstream_only",
                "detail": UPSTREAM_ONLY,
                "location": None,
                "revision": None,
                "shared_cacheable": False,
            },
            "candidates": [],
            "excluded": [],
            "nodes": [],
        }
    # The plan does not keep which nodes lack the revision; asked again for the same moment,
    # node sync gives the same answer from memory.
    unavailable, _, _ = runtime.sync.availability(
        runtime.router.config.nodes, ref.with_revision(plan.revision.commit), ref.revision, now
    )
    report = route_report(
        plan.route,
        runtime.router.config.routing,
        runtime.store.live.statuses,
        unavailable,
        plan.node_revisions,
    )
    return {"request": _request(ref, plan, override), **report}


# --------------------------------------------------------------------------- HTML

_PAGE_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
tr.chosen td{background:#e5f6e5}
tr.excluded td{color:#777}
"""

_NODE_COLUMNS = (
    ("node", "node"),
    ("country", "country"),
    ("outcome", "outcome"),
    ("reason", "reason"),
    ("detail", "detail"),
    ("up", "state.up"),
    ("down reason", "state.down_reason"),
    ("admin", "state.admin"),
    ("latency ms", "state.latency_ms"),
    ("load", "state.load"),
    ("tier", "tier"),
    ("level", "level"),
    ("distance km", "cost.distance_km"),
    ("latency km", "cost.latency_km"),
    ("ASN bonus km", "cost.asn_bonus_km"),
    ("country bonus km", "cost.country_bonus_km"),
    ("cost km", "cost.total_km"),
    ("expected load", "expected_load"),
    ("free connections", "free_connections"),
    ("share", "share"),
    ("holds revision", "holds_revision"),
    ("serves commit", "serves_commit"),
    ("sync", "sync_detail"),
)


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return html.escape(str(value))


def _field(row: Mapping[str, Any], dotted: str) -> object:
    value: object = row
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _pairs(title: str, data: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_text(k)}</th><td>{_text(v)}</td></tr>" for k, v in data.items())
    return f"<h2>{_text(title)}</h2><table>{rows}</table>"


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained page (no scripts, no outside resources); every value is escaped."""
    head = "".join(f"<th>{_text(label)}</th>" for label, _ in _NODE_COLUMNS)
    rows = "".join(
        f'<tr class="{_text(node.get("outcome"))}">'
        + "".join(f"<td>{_text(_field(node, key))}</td>" for _, key in _NODE_COLUMNS)
        + "</tr>"
        for node in report.get("nodes", [])
    )
    request = report.get("request", {})
    title = f"explain {request.get('path', '')}".strip()
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_text(title)}</title><style>{_PAGE_STYLE}</style></head><body>"
        f"<h1>{_text(title)}</h1>"
        + (_pairs("Request", request) if request else "")
        + _pairs("Client", report["client"])
        + _pairs("Decision", report["decision"])
        + f"<h2>Nodes</h2><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
        + "</body></html>"
    )
