"""HTTP front door: thin aiohttp handlers over the router.

Every path and method lands on a handler of ours, so every answer is either a redirect or a
JSON body saying what was wrong; aiohttp's own text error pages are never reached, and
malformed requests the HTTP parser rejects are rendered as JSON by ``server.py``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from aiohttp import web
from multidict import MultiMapping

from gateway.answers import catalog_error, json_error, redirect_headers
from gateway.catalog import CatalogError
from gateway.clientip import ForwardingHeaders
from gateway.config import ClientIPConfig, ServerConfig
from gateway.geo import Location
from gateway.hfpath import FileRef, PathError, parse_resolve_path_remembered, resolve_path_for
from gateway.logs import log_access, request_id
from gateway.metalink import link_header, metalink_response, metalink_target
from gateway.metrics import Outcome, RouteLabel
from gateway.planner import Plan, UpstreamOnly, plan_route
from gateway.policy import Decision
from gateway.router import PRIVATE_CACHE_CONTROL
from gateway.runtime import RUNTIME, Runtime
from gateway.upstream import Rewrite, UpstreamError

ALLOWED_METHODS = "GET, HEAD"
#: Request storage: the request id, and the routing fields for the access log.
REQUEST_ID = web.RequestKey("request_id", str)
ACCESS_FIELDS = web.RequestKey("access_fields", dict[str, Any])
UpstreamKind = Literal["api", "resolve"]
API_PREFIX = "/api/"
#: Catalog answers that may change with the client's token.
_NEEDS_TOKEN = frozenset({"RepoNotFound", "GatedRepo"})
#: Upstream answers whose JSON entries may carry ``xetHash``.
_ENTRIES_API = re.compile(r"^/api/(?:models|datasets|spaces|kernels)/.+/(?:tree|paths-info)/")
UPSTREAM_NODE_NAME = "upstream"
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z])(?=[A-Z])")

log = logging.getLogger("gateway.http")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _describe_path(raw_path: str) -> str:
    return repr(raw_path if len(raw_path) <= 100 else raw_path[:100] + "...")


def forwarding_headers(headers: MultiMapping[str], config: ClientIPConfig) -> ForwardingHeaders:
    return ForwardingHeaders(
        forwarded=tuple(headers.getall(config.forwarded_header, ()))
        if config.forwarded_header != "none"
        else (),
        cdn_client_ip=headers.get(config.cdn_client_ip_header)
        if config.cdn_client_ip_header
        else None,
        cdn_country=headers.get(config.cdn_country_header) if config.cdn_country_header else None,
    )


def _method_not_allowed(request: web.Request) -> web.Response:
    return json_error(
        405,
        "method_not_allowed",
        f"{request.method} is not allowed here; allowed: {ALLOWED_METHODS}",
        {"Allow": ALLOWED_METHODS},
    )


def read_only(handler: Handler) -> Handler:
    """Answer methods other than GET and HEAD with a JSON 405."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _method_not_allowed(request)
        return await handler(request)

    return guarded


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    """Ready whenever serving: a degraded gateway still routes, from its last known state."""
    runtime = request.app[RUNTIME]
    if runtime.stopping:
        return json_error(503, "stopping", "the gateway is shutting down")
    degraded = [runtime.store.degraded_reason] if runtime.store.degraded_reason else []
    statuses = runtime.store.live.statuses
    return web.json_response(
        {
            "status": "degraded" if degraded else "ready",
            "degraded": degraded,
            "nodes": len(runtime.router.config.nodes),
            "nodes_up": sum(1 for s in statuses.values() if s.up),
        }
    )


def _public_origin(request: web.Request, config: ServerConfig) -> str:
    if config.public_url:
        return config.public_url
    return f"{request.scheme}://{request.host}"


async def _to_upstream(
    request: web.Request,
    runtime: Runtime,
    target: str,
    kind: UpstreamKind,
    rewrite: Rewrite = "stream",
) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        response = await runtime.proxy.forward(
            request,
            target,
            public_origin=_public_origin(request, runtime.router.config.server),
            rewrite=rewrite,
            streamed_headers={"X-Request-ID": request[REQUEST_ID]},
        )
    except UpstreamError as exc:
        runtime.metrics.upstream_call(kind, time.perf_counter() - started, None)
        return json_error(exc.status, "upstream_error", exc.message, {"Retry-After": "5"})
    runtime.metrics.upstream_call(kind, time.perf_counter() - started, response.status)
    return response


def _error_reason(exc: CatalogError) -> str:
    """``EntryNotFound`` -> ``entry_not_found``: the snake_case of the policy's own reasons."""
    if exc.error_code is None:
        return "upstream_timeout" if exc.status == 504 else "upstream_unavailable"
    return _CAMEL_BOUNDARY.sub("_", exc.error_code).lower()


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


def _remember(request: web.Request, routing: dict[str, Any] | None) -> None:
    """Keep a routing outcome's fields for the request's access log line (``observe``)."""
    if routing is not None:
        request[ACCESS_FIELDS] = routing


def parsed_or_error(
    raw_path: str, max_bytes: int, not_found: Callable[[str], str]
) -> FileRef | web.Response:
    """The file a resolve path names, or the JSON error to answer instead (``not_found``
    words it, from the path, when the path is not a resolve path)."""
    try:
        ref = parse_resolve_path_remembered(raw_path, max_bytes)
    except PathError as exc:
        return json_error(exc.status, exc.code, exc.message)
    if ref is None:
        return json_error(404, "not_found", not_found(raw_path))
    return ref


def _no_such_endpoint(raw_path: str) -> str:
    return (
        f"no such endpoint: {_describe_path(raw_path)}; "
        "files are served at /{repo_id}/resolve/{revision}/{filename}"
    )


async def resolve(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    router = runtime.router
    raw_path = request.rel_url.raw_path
    if raw_path.startswith(API_PREFIX):
        return await api(request)
    ref = parsed_or_error(raw_path, router.config.server.max_path_bytes, _no_such_endpoint)
    if isinstance(ref, web.Response):
        return ref
    if request.method not in ("GET", "HEAD"):
        return _method_not_allowed(request)
    placement = router.place(
        request.remote, forwarding_headers(request.headers, router.config.client_ip)
    )
    client, location = placement.client, placement.location
    try:
        target, as_metalink = await metalink_target(runtime, ref, request.headers.get("Accept"))
        plan = await plan_route(runtime, target, client, full=as_metalink)
    except UpstreamOnly:
        # Private and gated files need the client's token: only upstream may see it.
        _remember(
            request, record_outcome(runtime, "upstream", "private_or_gated", location=location)
        )
        return await _to_upstream(request, runtime, resolve_path_for(ref), "resolve")
    except CatalogError as exc:
        if exc.error_code in _NEEDS_TOKEN and "Authorization" in request.headers:
            # Hidden from our tokenless catalog (private, or gated files), but maybe not from
            # this client's token: upstream decides.
            _remember(
                request, record_outcome(runtime, "upstream", "token_holder", location=location)
            )
            return await _to_upstream(request, runtime, resolve_path_for(ref), "resolve")
        _remember(request, record_outcome(runtime, "error", _error_reason(exc), location=location))
        return catalog_error(exc)
    if as_metalink:
        route = plan.route
        # A Metalink lists every source: it is not a redirect to one node.
        routing = record_outcome(
            runtime,
            "node" if route.decision.node else "upstream",
            "metalink",
            location=route.location,
            decision_seconds=plan.decision_seconds,
        )
        _remember(request, routing)
        return metalink_response(runtime, plan)
    headers = redirect_headers_for(runtime, plan)
    route = plan.route
    routing = record_redirect(runtime, route.decision, route.location, plan.decision_seconds)
    _remember(request, routing)
    return web.Response(status=302, headers=headers)


def redirect_headers_for(runtime: Runtime, plan: Plan) -> dict[str, str]:
    """Every header of the redirect a plan makes, but the request id."""
    router, route = runtime.router, plan.route
    node = route.decision.node
    headers = redirect_headers(
        route.url,
        route.revision,
        plan.meta,
        PRIVATE_CACHE_CONTROL,
        node.id if node else UPSTREAM_NODE_NAME,
    )
    links = link_header(runtime, plan, router.config.responses.duplicate_links)
    if links is not None:
        headers["Link"] = links
    if route.shared_cacheable:
        headers["Cache-Control"] = router.shared_cache_control
        # cdn-geo mode guarantees the header is configured (checked at config load).
        headers["Vary"] = router.config.client_ip.cdn_country_header or ""
    return headers


def record_redirect(
    runtime: Runtime, decision: Decision, location: Location, decision_seconds: float
) -> dict[str, Any] | None:
    """Count a redirect (metrics, the node's load estimate); the access log's fields for it
    when that log is on."""
    node = decision.node
    if node is not None:
        runtime.store.redirects.count(node.id)
    return record_outcome(
        runtime,
        "node" if node else "upstream",
        decision.reason,
        node=node.id if node else None,
        location=location,
        decision_seconds=decision_seconds,
    )


async def api(request: web.Request) -> web.StreamResponse:
    """Metadata calls go to upstream; tree and paths-info come back without Xet hashes."""
    runtime = request.app[RUNTIME]
    raw_path = request.rel_url.raw_path
    if len(raw_path) > runtime.router.config.server.max_path_bytes:
        return json_error(414, "path_too_long", "request path too long")
    if any(part in ("..", ".") for part in raw_path.split("/")) or "%2e" in raw_path.lower():
        return json_error(400, "path_traversal", f"dot segments in {_describe_path(raw_path)}")
    rewrite: Rewrite = "entries" if _ENTRIES_API.match(raw_path) else "stream"
    return await _to_upstream(request, runtime, request.rel_url.raw_path_qs, "api", rewrite)


async def metrics_endpoint(request: web.Request) -> web.StreamResponse:
    body, content_type = request.app[RUNTIME].metrics.render(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})


def route_label(path: str) -> RouteLabel:
    if path.startswith(API_PREFIX):
        return "api"
    if path.startswith("/admin/"):
        return "admin"
    if path.startswith("/explain/"):
        return "explain"
    if path in ("/healthz", "/readyz"):
        return "health"
    if path == "/metrics":
        return "metrics"
    return "resolve"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, duration metrics and the access log line, for every request."""
    started = time.perf_counter()
    request[REQUEST_ID] = request_id(request.headers.get("X-Request-ID"))
    try:
        response = await handler(request)
    except (ConnectionError, web.HTTPException):
        raise
    except Exception:  # the last line of defence: a bug still answers JSON, never a traceback
        log.exception("unhandled error for request %s", request[REQUEST_ID])
        response = json_error(500, "internal_error", "internal error; see the gateway log")
    seconds = time.perf_counter() - started
    if not response.prepared:
        # Streamed answers carry it already (``_to_upstream``): their headers are sent.
        response.headers["X-Request-ID"] = request[REQUEST_ID]
    runtime = request.app[RUNTIME]
    runtime.metrics.request_done(
        route_label(request.path), request.method, response.status, seconds
    )
    if runtime.router.config.logging.access:
        log_request(
            request[REQUEST_ID],
            request.method,
            request.rel_url.raw_path,
            response.status,
            seconds,
            request.remote,
            request.get(ACCESS_FIELDS),
        )
    return response


def log_request(
    request_id: str,
    method: str,
    raw_path: str,
    status: int,
    seconds: float,
    peer: str | None,
    routing: dict[str, Any] | None,
) -> None:
    """The access log line of one answered request (``routing``: its outcome's fields)."""
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
