"""HTTP front door: thin aiohttp handlers over the router.

Every path and method lands on a handler of ours, so every answer is either a redirect or a
JSON body saying what was wrong; aiohttp's own text error pages are never reached, and
malformed requests the HTTP parser rejects are rendered as JSON by ``connection``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from aiohttp import web
from multidict import MultiMapping

from gateway.config import ClientIPConfig, ServerConfig
from gateway.geo.clientip import ForwardingHeaders
from gateway.hf.catalog import CatalogError
from gateway.hf.git import parse_git_path
from gateway.hf.paths import FileRef, PathError, parse_resolve_path, resolve_path_for
from gateway.hf.upstream import Rewrite, UpstreamError
from gateway.logs import request_id
from gateway.metrics import RouteLabel
from gateway.runtime import RUNTIME, Runtime
from gateway.web.answers import catalog_error, json_error
from gateway.web.credentials import carries_credentials
from gateway.web.git import serve_git
from gateway.web.metalink import metalink_response, metalink_target
from gateway.web.plan import UpstreamOnly, plan_route
from gateway.web.redirect import finish_request, record_outcome, record_redirect, redirect_headers

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
        if exc.status == 413:
            refused = json_error(exc.status, exc.code, exc.message)
            # No further request on this connection: the rest of the refused body is in the way.
            refused.force_close()
            return refused
        runtime.metrics.upstream_call(kind, time.perf_counter() - started, None)
        retry = {"Retry-After": str(runtime.router.config.catalog.retry_after_s)}
        return json_error(exc.status, exc.code, exc.message, retry if exc.status >= 503 else None)
    runtime.metrics.upstream_call(kind, time.perf_counter() - started, response.status)
    return response


def _error_reason(exc: CatalogError) -> str:
    """``EntryNotFound`` -> ``entry_not_found``: the snake_case of the policy's own reasons."""
    if exc.error_code is None:
        return "upstream_timeout" if exc.status == 504 else "upstream_unavailable"
    return _CAMEL_BOUNDARY.sub("_", exc.error_code).lower()


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
        ref = parse_resolve_path(raw_path, max_bytes)
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
    try:
        git = parse_git_path(raw_path)
    except PathError as exc:
        return json_error(exc.status, exc.code, exc.message)
    if git is not None:
        placement = router.place(
            request.remote, forwarding_headers(request.headers, router.config.client_ip)
        )
        return await serve_git(request, runtime, git, placement, request[REQUEST_ID])
    ref = parsed_or_error(raw_path, router.config.server.max_path_bytes, _no_such_endpoint)
    if isinstance(ref, web.Response):
        return ref
    if request.method not in ("GET", "HEAD"):
        return _method_not_allowed(request)
    placement = router.place(
        request.remote, forwarding_headers(request.headers, router.config.client_ip)
    )
    location = placement.location
    credentials = router.config.credentials.route if carries_credentials(request.headers) else None
    try:
        target, as_metalink = await metalink_target(runtime, ref, request.headers.get("Accept"))
        plan = await plan_route(
            runtime, target, placement, explain=as_metalink, credentials=credentials
        )
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
    route = plan.route
    routing = record_redirect(runtime, route.decision, route.location, plan.decision_seconds)
    _remember(request, routing)
    return web.Response(status=302, headers=redirect_headers(runtime, plan, request[REQUEST_ID]))


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


def _not_a_path(request: web.Request) -> web.Response:
    """The answer to a target the catch-all route misses: one that is not a path (CONNECT's
    host:port, ``OPTIONS *``). The connection closes: a CONNECT client would tunnel next."""
    if request.method == "CONNECT":
        response = json_error(
            405, "method_not_allowed", "CONNECT: this is not a proxy", {"Allow": "GET, HEAD"}
        )
    else:
        response = json_error(400, "bad_target", "the request target must be a path")
    response.force_close()
    return response


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, duration metrics and the access log line, for every request."""
    started = time.perf_counter()
    request[REQUEST_ID] = request_id(request.headers.get("X-Request-ID"))
    response: web.StreamResponse
    try:
        if request.match_info.http_exception is not None:
            response = _not_a_path(request)
        else:
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
    finish_request(
        request.app[RUNTIME],
        route_label(request.path),
        request.method,
        request.rel_url.raw_path,
        response.status,
        seconds,
        request[REQUEST_ID],
        request.remote,
        request.get(ACCESS_FIELDS),
    )
    return response
