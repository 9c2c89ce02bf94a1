"""HTTP front door: thin aiohttp handlers over the router.

Every path and method lands on a handler of ours, so every answer is either a redirect or a
JSON body saying what was wrong; aiohttp's own text error pages are never reached, and
malformed requests the HTTP parser rejects are rendered as JSON by ``server.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.answers import json_error
from gateway.clientip import ForwardingHeaders
from gateway.config import ClientIPConfig
from gateway.hfpath import PathError, parse_resolve_path
from gateway.probe import Prober
from gateway.router import PRIVATE_CACHE_CONTROL, Router
from gateway.store import StateStore

ALLOWED_METHODS = "GET, HEAD"
NODE_HEADER = "X-Mirror-Node"
UPSTREAM_NODE_NAME = "upstream"


class Runtime:
    """What requests read: the router in force and the live node state.

    A config reload swaps the router in one assignment; the store and prober live as long as
    the process.
    """

    def __init__(self, router: Router, store: StateStore, prober: Prober | None) -> None:
        self.router = router
        self.store = store
        self.prober = prober

    def adopt(self, router: Router) -> None:
        self.router = router
        self.store.reconfigure(router.config.nodes)
        if self.prober is not None:
            self.prober.reconfigure(router.config.nodes, router.config.probing)


RUNTIME = web.AppKey("runtime", Runtime)

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


async def resolve(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    router = runtime.router
    raw_path = request.rel_url.raw_path
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
    store = runtime.store
    route = router.route(ref, client, store.live.statuses, store.redirects.current)
    node = route.decision.node
    if node is not None:
        store.redirects.count(node.id)
    headers = {"Location": route.url, NODE_HEADER: node.id if node else UPSTREAM_NODE_NAME}
    if route.shared_cacheable:
        headers["Cache-Control"] = router.shared_cache_control
        # cdn-geo mode guarantees the header is configured (checked at config load).
        headers["Vary"] = router.config.client_ip.cdn_country_header or ""
    else:
        headers["Cache-Control"] = PRIVATE_CACHE_CONTROL
    return web.Response(status=302, headers=headers)
