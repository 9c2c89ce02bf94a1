"""Serving: one worker's listener, its runtime, config reloads and the graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import replace

from aiohttp import web

from gateway.config import ConfigError, GatewayConfig
from gateway.geo.locator import GeoDataError, MaxMindLocator
from gateway.hf.catalog import Catalog
from gateway.hf.upstream import UpstreamProxy
from gateway.preflight import listen_error
from gateway.routing.router import Router
from gateway.runtime import RUNTIME, Runtime
from gateway.state.live import LiveState, RedirectCounter
from gateway.state.probe import Prober
from gateway.state.store import InProcessStore, RedisStore, StateStore
from gateway.state.sync import SyncTracker
from gateway.web.app import create_app
from gateway.web.connection import ClientTimeouts, ConnectionRules, make_runner
from gateway.web.connection_limits import ConnectionLimits
from gateway.web.fastpath import fast_answer_for
from gateway.web.handlers import metrics_endpoint
from gateway.workers import MULTIPROC_ENV_VAR

log = logging.getLogger("gateway.server")

#: Connections the kernel holds for the worker to accept (capped by net.core.somaxconn).
#: aiohttp's 128 overflows in a burst of new connections: the kernel then drops their SYNs
#: and clients wait out a retransmission (1 s, then 3 s, ...) before they are even accepted.
LISTEN_BACKLOG = 1024

#: How long requests in flight may take to finish after SIGTERM.
SHUTDOWN_GRACE_S = 20.0


def handler_limits(config: GatewayConfig) -> dict[str, int]:
    """Parser limits: generous enough that our own JSON 414 for long paths is reachable."""
    server = config.server
    return {
        "max_field_size": server.max_header_bytes,
        "max_line_size": max(server.max_header_bytes, 2 * server.max_path_bytes),
    }


def connection_rules(config: GatewayConfig, runtime: Runtime) -> ConnectionRules:
    """The fast path (when on), the connection caps and the head and body timeouts."""
    server = config.server
    metrics = runtime.metrics
    return ConnectionRules(
        fast_answer=fast_answer_for(runtime),
        limits=ConnectionLimits.for_server(
            server, config.client_ip.trusted_proxies, metrics.connection_refused
        ),
        timeouts=ClientTimeouts(
            server.header_timeout_s, server.body_timeout_s, metrics.connection_timed_out
        ),
    )


def build_router(config: GatewayConfig) -> tuple[Router, tuple[str, ...]]:
    """A router for ``config`` and the warnings to log (GeoIP staleness, missing ASN data)."""
    locator = MaxMindLocator(config.geoip)
    return Router(config, locator), locator.warnings


def build_runtime(router: Router, *, metrics_dir: str | None = None) -> Runtime:
    """Live state in Redis when ``redis.url`` or ``redis.sentinel`` is set, else in this process;
    a prober if on.

    ``metrics_dir``: the shared metrics directory of a multi-worker server.
    """
    config = router.config
    live = LiveState(
        config.nodes,
        vantage=config.probing.vantage,
        probing=config.probing.enabled,
        load_deadband=config.state.load_deadband,
        load_prior=config.routing.load_prior,
        download_s=config.state.estimated_download_s,
    )
    redirects = RedirectCounter()
    store: StateStore
    if config.redis.enabled:
        store = RedisStore(
            live,
            redirects,
            config.redis,
            config.state,
            config.nodes,
            # Shared verdicts outlive a few missed rounds, so a prober handover stays seamless.
            record_ttl_s=max(300.0, 10 * config.probing.interval_s),
        )
    else:
        store = InProcessStore(live, redirects, config.state, config.nodes)
    prober = (
        Prober(config.nodes, config.probing, store, shared_verdict=live.probe_record)
        if config.probing.enabled
        else None
    )
    catalog = Catalog(config.upstream, config.catalog, redis_config=config.redis)
    sync = SyncTracker(config.nodes, config.sync, catalog, timeout_s=config.probing.timeout_s)
    return Runtime(
        router, store, prober, catalog, sync, UpstreamProxy(config.upstream), metrics_dir
    )


#: Sections read once at start. A reload that changes one warns and keeps the running values
#: in force, so no part of the gateway works from the new values while another keeps the old
#: (the catalog fetching from one upstream while redirects name another).
_RESTART_ONLY = ("redis", "admin", "state", "upstream", "catalog", "metrics")


#: ``server`` keys the listener reads when it opens; the rest of ``server`` applies at once.
_LISTENER_KEYS = (
    "host", "port", "max_header_bytes", "drain_s", "header_timeout_s", "body_timeout_s",
    "keepalive_timeout_s", "max_connections", "max_connections_per_ip",
)  # fmt: skip


def _restart_only_changes(config: GatewayConfig, running: GatewayConfig) -> list[str]:
    """The settings ``config`` changes that only a restart applies, by key or section."""
    changed = [f"{s}.*" for s in _RESTART_ONLY if getattr(config, s) != getattr(running, s)]
    changed += [
        f"server.{key}"
        for key in _LISTENER_KEYS
        if getattr(config.server, key) != getattr(running.server, key)
    ]
    for key, before, after in (
        ("probing.enabled", running.probing.enabled, config.probing.enabled),
        ("logging.format", running.logging.format, config.logging.format),
    ):
        if before != after:
            changed.append(key)
    return changed


def _reload(app: web.Application, load: Callable[[], GatewayConfig]) -> None:
    runtime = app[RUNTIME]
    running = runtime.router.config
    try:
        config = load()
        restart_only = _restart_only_changes(config, running)
        config = replace(config, **{s: getattr(running, s) for s in _RESTART_ONLY})
        router, warnings = build_router(config)
    except (ConfigError, GeoDataError) as exc:
        log.error("reload refused, keeping the running config: %s", exc)
        return
    for setting in restart_only:
        log.warning("%s changed; it takes effect after a restart", setting)
    for warning in warnings:
        log.warning("%s", warning)
    old = runtime.router
    runtime.adopt(router)
    old.locator.close()
    log.info("config reloaded: %d nodes", len(config.nodes))


async def _serve_metrics_apart(
    app: web.Application, config: GatewayConfig, shared_port: bool
) -> web.AppRunner | None:
    """/metrics on its own listener when ``metrics.port`` is set (kept off the public port)."""
    metrics = config.metrics
    if not metrics.enabled or metrics.port is None:
        return None
    metrics_app = web.Application()
    metrics_app[RUNTIME] = app[RUNTIME]
    metrics_app.router.add_get("/metrics", metrics_endpoint)
    runner = web.AppRunner(metrics_app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, metrics.host, metrics.port, reuse_port=shared_port).start()
    log.info("metrics on %s:%d", metrics.host, metrics.port)
    return runner


async def _drain(runtime: Runtime, drain_s: float, hurry: asyncio.Event) -> None:
    """Answer /readyz with 503 for ``drain_s`` while serving everything else, so load
    balancers stop sending new connections before the listener closes."""
    runtime.stopping = True
    if drain_s <= 0 or hurry.is_set():
        return
    log.info("draining for %g s: /readyz answers 503, everything else is served", drain_s)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hurry.wait(), drain_s)


async def serve(
    router: Router,
    load_config: Callable[[], GatewayConfig],
    *,
    host: str,
    port: int,
    shared_port: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads the config.

    ``shared_port``: one of several workers on the port (SO_REUSEPORT, shared-file metrics).
    On SIGTERM /readyz turns 503 at once and everything else is served as usual for
    ``server.drain_s`` (a second SIGTERM, or SIGINT, skips that); then the listener closes and
    requests in flight finish (up to ``SHUTDOWN_GRACE_S``).
    """
    config = router.config
    metrics_dir = os.environ.get(MULTIPROC_ENV_VAR) if shared_port else None
    app = create_app(build_runtime(router, metrics_dir=metrics_dir))
    runner = make_runner(
        app,
        connection_rules(config, app[RUNTIME]),
        access_log=None,
        keepalive_timeout=config.server.keepalive_timeout_s,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        **handler_limits(config),
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG, reuse_port=shared_port)
    try:
        await site.start()
    except OSError as exc:  # taken since the preflight check, or a worker's reused port
        await runner.cleanup()
        raise listen_error("server", host, port, exc) from None
    log.info("serving on %s:%d with %d nodes", host, port, len(config.nodes))
    metrics_runner = await _serve_metrics_apart(app, config, shared_port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_sigterm() -> None:
        if stop.is_set():
            hurry.set()
        stop.set()

    def on_sigint() -> None:
        hurry.set()
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGHUP, _reload, app, load_config)
    try:
        await stop.wait()
        await _drain(app[RUNTIME], config.server.drain_s, hurry)
    finally:
        log.info("shutting down")
        app[RUNTIME].stopping = True
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        app[RUNTIME].router.locator.close()
