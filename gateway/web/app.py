"""The aiohttp application: routes, and the background work that lives as long as it does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.runtime import RUNTIME, Runtime
from gateway.web.admin import ADMIN_FAILURES, add_admin_routes, admin_failures
from gateway.web.handlers import (
    healthz,
    metrics_endpoint,
    observe,
    read_only,
    readyz,
    resolve,
)
from gateway.web.views import add_view_routes


async def _run_background(app: web.Application) -> AsyncIterator[None]:
    """Start shared state, the catalog and the periodic tasks with the app; stop them with it."""
    runtime = app[RUNTIME]
    await runtime.store.start()
    await runtime.catalog.start()
    await runtime.proxy.start()
    tasks = [
        asyncio.create_task(runtime.sync.run(), name="sync"),
        asyncio.create_task(runtime.rescore_on_changes(), name="rescore"),
    ]
    if runtime.prober is not None:
        tasks.append(asyncio.create_task(runtime.prober.run(), name="prober"))
    yield
    # Requests have finished by now; counts still held in memory would die with the worker.
    runtime.metrics.flush()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await runtime.proxy.close()
    await runtime.catalog.close()
    await runtime.store.close()


def create_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[observe])
    app[RUNTIME] = runtime
    app.cleanup_ctx.append(_run_background)
    metrics = runtime.router.config.metrics
    if metrics.enabled and metrics.port is None:
        app.router.add_route("*", "/metrics", read_only(metrics_endpoint))
    app.router.add_route("*", "/healthz", read_only(healthz))
    app.router.add_route("*", "/readyz", read_only(readyz))
    app[ADMIN_FAILURES] = admin_failures(runtime.router.config.admin)
    add_admin_routes(app, runtime.router.config.admin.token)
    add_view_routes(app)
    # [\s\S] rather than '.': a decoded %0A must still reach our handler and get a JSON 400.
    app.router.add_route("*", r"/{tail:[\s\S]*}", resolve)
    return app
