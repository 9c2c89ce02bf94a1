"""A redirect: the one answer a routing plan makes, and the one place requests are counted.

A redirect to a mirror host is not followed by the clients' metadata request, so it must itself
carry the commit, the etag (which names the blob in the client's cache) and the size. The
``resolve`` handler and the fast path both build their redirect with ``redirect_headers`` and
both go through aiohttp's header serializer, so their bytes are the same by construction; both
count it with ``record_redirect`` and ``finish_request``.
"""

from __future__ import annotations

from typing import Any

from gateway.geo.locator import Location
from gateway.logs import log_access
from gateway.metrics import Outcome, RouteLabel
from gateway.routing.router import PRIVATE_CACHE_CONTROL
from gateway.routing.rule import Decision
from gateway.runtime import Runtime
from gateway.web.metalink import link_header
from gateway.web.plan import Plan

UPSTREAM_NODE_NAME = "upstream"


def redirect_headers(runtime: Runtime, plan: Plan, request_id: str) -> dict[str, str]:
    """Every header of the ``302`` a plan makes, in the order they are written."""
    router, route, meta = runtime.router, plan.route, plan.meta
    node = route.decision.node
    etag = f'"{meta.etag}"'
    headers = {
        "Location": route.url,
        "X-Repo-Commit": route.revision,
        "ETag": etag,
        "X-Linked-Etag": etag,
        "X-Linked-Size": str(meta.size),
        "Cache-Control": PRIVATE_CACHE_CONTROL,
        "X-Mirror-Node": node.id if node else UPSTREAM_NODE_NAME,
    }
    links = link_header(runtime, plan, router.config.responses.duplicate_links)
    if links is not None:
        headers["Link"] = links
    if route.shared_cacheable:
        headers["Cache-Control"] = router.shared_cache_control
        # cdn-geo mode guarantees the header is configured (checked at config load).
        headers["Vary"] = router.config.client_ip.cdn_country_header or ""
    headers["X-Request-ID"] = request_id
    return headers


def record_outcome(
    runtime: Runtime,
    outcome: Outcome,
    reason: str,
    *,
    node: str | None = None,
    location: Location | None = None,
    decision_seconds: float | None = None,
) -> dict[str, Any] | None:
    """Count one routing outcome; its fields for the access log line when that log is on."""
    country = location.country if location else None
    continent = location.continent if location else None
    runtime.metrics.decision(
        outcome,
        reason,
        node_id=node,
        country=country,
        continent=continent,
        decision_seconds=decision_seconds,
    )
    if not runtime.router.config.logging.access:
        return None
    return {
        "outcome": outcome,
        "reason": reason,
        "node": node or (UPSTREAM_NODE_NAME if outcome == "upstream" else None),
        "country": country,
    }


def record_redirect(
    runtime: Runtime, decision: Decision, location: Location, decision_seconds: float
) -> dict[str, Any] | None:
    """Count a redirect (metrics, the node's load estimate); the access log's fields for it
    when that log is on."""
    node = decision.node
    if node is not None:
        runtime.store.redirects.count(node.id)
        runtime.store.live.count_redirect(node.id)
    return record_outcome(
        runtime,
        "node" if node else "upstream",
        decision.reason,
        node=node.id if node else None,
        location=location,
        decision_seconds=decision_seconds,
    )


def finish_request(
    runtime: Runtime,
    label: RouteLabel,
    method: str,
    raw_path: str,
    status: int,
    seconds: float,
    request_id: str,
    peer: str | None,
    routing: dict[str, Any] | None,
) -> None:
    """Count one answered request and write its access log line (``routing``: the fields of
    its routing outcome)."""
    runtime.metrics.request_done(label, method, status, seconds)
    if not runtime.router.config.logging.access:
        return
    fields: dict[str, Any] = {
        "request_id": request_id,
        "method": method,
        "path": raw_path[:300],
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
        "peer": peer,
    }
    if routing:
        fields.update(routing)
    log_access(fields)
