"""Admin HTTP API: list nodes with live state; drain, disable or enable a node.

Off unless ``admin.token`` (or MIRROR_GATEWAY_ADMIN_TOKEN) is set; then every call needs
``Authorization: Bearer <token>``, and a client that sent ``admin.max_failures`` wrong tokens
within ``admin.failure_window_s`` gets 429 until that window ends (``gateway.ratelimit``), here
and on explain's overrides.
Changes go through the state store, so with Redis every instance sees them within its pub/sub
latency. The token is never logged or echoed.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from aiohttp import web

from gateway.config import AdminConfig
from gateway.ratelimit import FailureLimiter, client_key
from gateway.runtime import RUNTIME, Runtime
from gateway.state.live import AdminMode, AdminRecord
from gateway.state.store import StoreUnavailable
from gateway.web.answers import json_error
from gateway.web.handlers import forwarding_headers

#: URL verb -> the admin mode it sets.
ACTIONS: dict[str, AdminMode] = {"drain": "draining", "disable": "disabled", "enable": "active"}


def authorized(request: web.Request, token: str) -> bool:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), token.encode()
    )


def node_report(runtime: Runtime, node_id: str) -> dict[str, Any]:
    """One node's config essentials and everything the live state knows about it."""
    store = runtime.store
    node = next(n for n in runtime.router.config.nodes if n.id == node_id)
    status = store.live.statuses[node_id]
    load = store.live.load_record(node_id)
    return {
        "id": node.id,
        "url": node.base_url,
        "kind": node.kind,
        "enabled": node.enabled,
        "admin": store.live.admin_mode(node_id),
        "up": status.up,
        "down_reason": status.down_reason,
        "latency_ms": status.latency_ms,
        "load": status.load,
        "load_source": load.source if load else None,
        "probes": [
            {
                "vantage": p.vantage,
                "up": p.up,
                "reason": p.reason,
                "latency_ms": p.latency_ms,
                "checked_at": p.checked_at,
                "last_ok_at": p.last_ok_at,
            }
            for p in store.live.probe_records(node_id)
        ],
    }


#: Wrong admin tokens per client, for every check of the token (admin API, explain overrides).
ADMIN_FAILURES = web.AppKey("admin_failures", FailureLimiter)


def admin_failures(config: AdminConfig) -> FailureLimiter:
    return FailureLimiter(config.max_failures, config.failure_window_s)


def _client_key(request: web.Request) -> str:
    router = request.app[RUNTIME].router
    client = router.resolver.resolve(
        request.remote, forwarding_headers(request.headers, router.config.client_ip)
    )
    return client_key(client.ip)


def too_many_failures(request: web.Request) -> web.Response | None:
    """The 429 for a client that sent too many wrong admin tokens lately, else None."""
    retry_after = request.app[ADMIN_FAILURES].retry_after(_client_key(request))
    if retry_after is None:
        return None
    return json_error(
        429,
        "too_many_failures",
        f"too many wrong admin tokens from this client; retry in {retry_after} s",
        {"Retry-After": str(retry_after)},
    )


def authorized_or_counted(request: web.Request, token: str) -> bool:
    """Whether the request carries the admin token; a wrong one counts against its client."""
    if authorized(request, token):
        return True
    if "Authorization" in request.headers:
        request.app[ADMIN_FAILURES].failed(_client_key(request))
    return False


def add_admin_routes(app: web.Application, token: str | None) -> None:
    async def guard(request: web.Request) -> web.Response | None:
        if token is None:
            return json_error(404, "admin_disabled", "the admin API is off (admin.token unset)")
        if (limited := too_many_failures(request)) is not None:
            return limited
        if not authorized_or_counted(request, token):
            return json_error(
                401,
                "unauthorized",
                "send Authorization: Bearer <admin token>",
                {"WWW-Authenticate": 'Bearer realm="mirror-gateway-admin"'},
            )
        return None

    async def list_nodes(request: web.Request) -> web.StreamResponse:
        if (refused := await guard(request)) is not None:
            return refused
        if request.method not in ("GET", "HEAD"):
            return json_error(405, "method_not_allowed", "use GET", {"Allow": "GET, HEAD"})
        runtime = request.app[RUNTIME]
        return web.json_response(
            {
                "vantage": runtime.store.live.vantage,
                "degraded": runtime.store.degraded_reason,
                "nodes": [node_report(runtime, n) for n in runtime.store.live.node_ids()],
            }
        )

    async def change_node(request: web.Request) -> web.StreamResponse:
        if (refused := await guard(request)) is not None:
            return refused
        if request.method != "POST":
            return json_error(405, "method_not_allowed", "use POST", {"Allow": "POST"})
        runtime = request.app[RUNTIME]
        node_id, action = request.match_info["node"], request.match_info["action"]
        mode = ACTIONS.get(action)
        if mode is None:
            return json_error(
                404,
                "unknown_action",
                f"{action!r} is not an action; allowed: drain, disable, enable",
            )
        if node_id not in runtime.store.live.statuses:
            return json_error(404, "unknown_node", f"no configured node {node_id!r}")
        try:
            await runtime.store.set_admin(AdminRecord(node_id, mode, time.time()))
        except StoreUnavailable as exc:
            return json_error(
                503,
                "not_shared",
                f"applied on this instance only; shared state is unavailable: {exc}",
                {"Retry-After": "5"},
            )
        return web.json_response(node_report(runtime, node_id))

    app.router.add_route("*", "/admin/nodes", list_nodes)
    app.router.add_route("*", "/admin/nodes/{node}/{action}", change_node)
