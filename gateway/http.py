"""HTTP front door: thin aiohttp handlers over the router.

Every path and method lands on a handler of ours, so every answer is either a redirect or a
JSON body saying what was wrong; aiohttp's own text error pages are never reached, and
malformed requests the HTTP parser rejects are rendered as JSON by ``server.py``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.answers import catalog_error, json_error, redirect_headers
from gateway.catalog import CatalogError
from gateway.clientip import ForwardingHeaders
from gateway.config import ClientIPConfig, ServerConfig
from gateway.hfpath import PathError, parse_resolve_path, resolve_path_for
from gateway.planner import UpstreamOnly, plan_route
from gateway.router import PRIVATE_CACHE_CONTROL
from gateway.runtime import RUNTIME, Runtime
from gateway.upstream import Rewrite, UpstreamError

ALLOWED_METHODS = "GET, HEAD"
API_PREFIX = "/api/"
#: Catalog answers that may change with the client's token.
_NEEDS_TOKEN = frozenset({"RepoNotFound", "GatedRepo"})
#: Upstream answers whose JSON entries may carry ``xetHash``.
_ENTRIES_API = re.compile(r"^/api/(?:models|datasets|spaces|kernels)/.+/(?:tree|paths-info)/")
UPSTREAM_NODE_NAME = "upstream"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _describe_path(raw_path: str) -> str:
    return repr(raw_path if len(raw_path) <= 100 else raw_path[:100] + "...")


def forwarding_headers(request: web.BaseRequest, config: ClientIPConfig) -> ForwardingHeaders:
    headers = request.headers
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


async def _to_upstream(request: web.Request, runtime: Runtime, target: str) -> web.StreamResponse:
    try:
        return await runtime.proxy.forward(
            request, target, public_origin=_public_origin(request, runtime.router.config.server)
        )
    except UpstreamError as exc:
        return json_error(exc.status, "upstream_error", exc.message, {"Retry-After": "5"})


async def resolve(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    router = runtime.router
    raw_path = request.rel_url.raw_path
    if raw_path.startswith(API_PREFIX):
        return await api(request)
    try:
        ref = parse_resolve_path(raw_path, router.config.server.max_path_bytes)
    except PathError as exc:
        return json_error(exc.status, exc.code, exc.message)
    if ref is None:
        return json_error(
            404,
            "not_found",
            f"no such endpoint: {_describe_path(raw_path)}; "
            "files are served at /{repo_id}/resolve/{revision}/{filename}",
        )
    if request.method not in ("GET", "HEAD"):
        return _method_not_allowed(request)
    client = router.resolver.resolve(
        request.remote, forwarding_headers(request, router.config.client_ip)
    )
    try:
        plan = await plan_route(runtime, ref, client)
    except UpstreamOnly:
        # Private and gated files need the client's token: only upstream may see it.
        return await _to_upstream(request, runtime, resolve_path_for(ref))
    except CatalogError as exc:
        if exc.error_code in _NEEDS_TOKEN and "Authorization" in request.headers:
            # Hidden from our tokenless catalog (private, or gated files), but maybe not from
            # this client's token: upstream decides.
            return await _to_upstream(request, runtime, resolve_path_for(ref))
        return catalog_error(exc)
    route, meta = plan.route, plan.meta
    node = route.decision.node
    store = runtime.store
    if node is not None:
        store.redirects.count(node.id)
    headers = redirect_headers(
        route.url,
        route.revision,
        meta,
        PRIVATE_CACHE_CONTROL,
        node.id if node else UPSTREAM_NODE_NAME,
    )
    if route.shared_cacheable:
        headers["Cache-Control"] = router.shared_cache_control
        # cdn-geo mode guarantees the header is configured (checked at config load).
        headers["Vary"] = router.config.client_ip.cdn_country_header or ""
    return web.Response(status=302, headers=headers)


async def api(request: web.Request) -> web.StreamResponse:
    """Metadata calls go to upstream; tree and paths-info come back without Xet hashes."""
    runtime = request.app[RUNTIME]
    raw_path = request.rel_url.raw_path
    if len(raw_path) > runtime.router.config.server.max_path_bytes:
        return json_error(414, "path_too_long", "request path too long")
    if any(part in ("..", ".") for part in raw_path.split("/")) or "%2e" in raw_path.lower():
        return json_error(400, "path_traversal", f"dot segments in {_describe_path(raw_path)}")
    rewrite: Rewrite = "entries" if _ENTRIES_API.match(raw_path) else "stream"
    try:
        return await runtime.proxy.forward(
            request,
            request.rel_url.raw_path_qs,
            public_origin=_public_origin(request, runtime.router.config.server),
            rewrite=rewrite,
        )
    except UpstreamError as exc:
        return json_error(exc.status, "upstream_error", exc.message, {"Retry-After": "5"})
