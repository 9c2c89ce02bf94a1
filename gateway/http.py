"""HTTP front door: thin aiohttp handlers over the router.

Every path and method lands on a handler of ours, so every answer is either a redirect or a
JSON body saying what was wrong; aiohttp's own text error pages are never reached, and
malformed requests the HTTP parser rejects are rendered as JSON by ``server.py``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from gateway.clientip import ForwardingHeaders
from gateway.config import ClientIPConfig
from gateway.hfpath import PathError, parse_resolve_path
from gateway.router import PRIVATE_CACHE_CONTROL, Router

JSON_CONTENT_TYPE = "application/json"
ALLOWED_METHODS = "GET, HEAD"
NODE_HEADER = "X-Mirror-Node"
UPSTREAM_NODE_NAME = "upstream"


class RouterCell:
    """The router in force; a config reload swaps it in one assignment."""

    def __init__(self, router: Router) -> None:
        self.router = router


ROUTER = web.AppKey("router", RouterCell)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"error": code, "message": message}),
        content_type=JSON_CONTENT_TYPE,
        headers=headers,
    )


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
    router = request.app[ROUTER].router
    return web.json_response(
        {
            "status": "ready",
            "degraded": [],
            "nodes": len(router.config.nodes),
        }
    )


async def resolve(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER].router
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
    route = router.route(ref, client)
    headers = {
        "Location": route.url,
        NODE_HEADER: route.decision.node.id if route.decision.node else UPSTREAM_NODE_NAME,
    }
    if route.shared_cacheable:
        headers["Cache-Control"] = router.shared_cache_control
        # cdn-geo mode guarantees the header is configured (checked at config load).
        headers["Vary"] = router.config.client_ip.cdn_country_header or ""
    else:
        headers["Cache-Control"] = PRIVATE_CACHE_CONTROL
    return web.Response(status=302, headers=headers)


def create_app(router: Router) -> web.Application:
    app = web.Application()
    app[ROUTER] = RouterCell(router)
    app.router.add_route("*", "/healthz", read_only(healthz))
    app.router.add_route("*", "/readyz", read_only(readyz))
    # [\s\S] rather than '.': a decoded %0A must still reach our handler and get a JSON 400.
    app.router.add_route("*", r"/{tail:[\s\S]*}", resolve)
    return app
