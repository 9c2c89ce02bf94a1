"""Serving: the aiohttp runner, JSON answers for requests the HTTP parser rejects, reloads.

aiohttp answers unparsable requests (over-long lines, bad characters in the target) itself with
a text page and logs a traceback. A public front door sees such requests all day, so they get
the same JSON error body as everything else and a one-line debug log instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from functools import partial
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from gateway.answers import json_error
from gateway.app import create_app
from gateway.catalog import Catalog
from gateway.collection import freeze_survivors
from gateway.config import ConfigError, GatewayConfig
from gateway.fastlane import answer_from_memory
from gateway.geo import GeoDataError, MaxMindLocator
from gateway.http import metrics_endpoint
from gateway.probe import Prober
from gateway.router import Router
from gateway.runtime import RUNTIME, Runtime
from gateway.state import LiveState, RedirectCounter
from gateway.store import InProcessStore, RedisStore, StateStore
from gateway.sync import SyncTracker
from gateway.upstream import UpstreamProxy
from gateway.workers import MULTIPROC_ENV_VAR

log = logging.getLogger("gateway.server")

#: How long requests in flight may take to finish after SIGTERM.
SHUTDOWN_GRACE_S = 20.0


def _parser_error_code(exc: BaseException | None) -> str:
    if isinstance(exc, LineTooLong):
        return "line_too_long"
    if isinstance(exc, BadHttpMethod):
        return "bad_method"
    if isinstance(exc, BadHttpMessage):
        return "bad_request"
    return "internal_error"


def _parser_error_message(exc: BaseException | None) -> str:
    if isinstance(exc, BadHttpMessage):
        first_line = str(exc.message).strip().splitlines()[0] if exc.message else ""
        return first_line.encode("ascii", "backslashreplace").decode("ascii")[:200]
    return "the server could not handle this request"


#: Answers a parsed request whole (status line to blank line), or None to leave it to aiohttp.
FastAnswer = Callable[[RawRequestMessage, "str | None"], "bytes | None"]


class GatewayRequestHandler(RequestHandler):
    """aiohttp's connection, answering parser-level errors with JSON and plain redirects
    through ``fast_answer`` (see ``fastlane``) without building a request."""

    def __init__(self, manager: Server, *, fast_answer: FastAnswer | None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._fast_answer = fast_answer
        self._peer: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # As aiohttp's ``request.remote``.
        peername = transport.get_extra_info("peername")
        if peername is not None:
            self._peer = str(peername[0] if isinstance(peername, list | tuple) else peername)

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if self._fast_answer is None or waiter is None or waiter.done() or self._messages:
            # A request is in aiohttp's hands: the ones behind it wait their turn there.
            super().data_received(data)
            return
        # The connection is idle. Parse without waking it, answer what can be answered here
        # in order, and wake it only for the first request that cannot.
        self._waiter = None
        try:
            super().data_received(data)
        finally:
            self._waiter = waiter
        # A full queue paused reading and left the rest of the read in the parser: a flood of
        # pipelined requests, which aiohttp's handler loop takes in, a queue's worth at a time.
        if not self._buffer_paused:
            answered = self._answer_queued()
            if answered:
                self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
                if self._manager is not None:
                    self._manager.requests_count += answered
        if self._messages and not waiter.done():
            waiter.set_result(None)

    def _answer_queued(self) -> int:
        assert self._fast_answer is not None
        messages = self._messages
        answered = 0
        while messages and self.transport is not None and self._parser is not None:
            if self.writing_paused:
                # The client is not reading its answers: leave the rest to aiohttp, whose
                # handlers wait for the buffer to drain and whose queue stops the reading.
                break
            message, payload = messages[0]
            if payload is not EMPTY_PAYLOAD or not isinstance(message, RawRequestMessage):
                break
            try:
                answer = self._fast_answer(message, self._peer)
            except Exception:  # aiohttp's path answers it again, and a fault there with JSON
                log.exception("fast path failed on %s %s", message.method, message.path[:100])
                answer = None
            if answer is None:
                break
            messages.popleft()
            self._parser.message_consumed()
            self.transport.write(answer)
            answered += 1
        return answered

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            # A real fault of ours: keep aiohttp's logging (with traceback) but not its body.
            super().handle_error(request, status, exc, message)
        else:
            log.debug("rejected malformed request from %s: %s", request.remote, exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error body")
        response = json_error(status, _parser_error_code(exc), _parser_error_message(exc))
        response.force_close()
        return response


class _GatewayServer(Server):
    def __init__(self, base: Server, fast_answer: FastAnswer | None, **handler_kwargs: Any) -> None:
        super().__init__(
            base.request_handler, request_factory=base.request_factory, **handler_kwargs
        )
        self._fast_answer = fast_answer
        self._handler_kwargs = {
            k: v for k, v in handler_kwargs.items() if k != "handler_cancellation"
        }

    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(
            self,
            fast_answer=self._fast_answer,
            loop=asyncio.get_running_loop(),
            **self._handler_kwargs,
        )


class GatewayRunner(web.AppRunner):
    """An ``AppRunner`` whose connections answer parser-level errors with JSON, and plain
    redirects through ``fast_answer`` when given."""

    def __init__(
        self,
        app: web.Application,
        *,
        shutdown_timeout: float = 60.0,
        fast_answer: FastAnswer | None = None,
        **handler_kwargs: Any,
    ) -> None:
        super().__init__(app, shutdown_timeout=shutdown_timeout, **handler_kwargs)
        self._fast_answer = fast_answer
        self._handler_kwargs = handler_kwargs

    async def _make_server(self) -> Server:
        base = await super()._make_server()
        return _GatewayServer(base, self._fast_answer, **self._handler_kwargs)


def fast_answer_for(runtime: Runtime) -> FastAnswer | None:
    """The fast path's answers for the connections, when ``server.fast_path`` is on."""
    if not runtime.router.config.server.fast_path:
        return None
    return partial(answer_from_memory, runtime)


def handler_limits(config: GatewayConfig) -> dict[str, int]:
    """Parser limits: generous enough that our own JSON 414 for long paths is reachable."""
    server = config.server
    return {
        "max_field_size": server.max_header_bytes,
        "max_line_size": max(server.max_header_bytes, 2 * server.max_path_bytes),
    }


def build_router(config: GatewayConfig) -> tuple[Router, tuple[str, ...]]:
    """A router for ``config`` and the warnings to log (GeoIP staleness, missing ASN data)."""
    locator = MaxMindLocator(config.geoip)
    return Router(config, locator), locator.warnings


def build_runtime(router: Router, *, metrics_dir: str | None = None) -> Runtime:
    """Live state in Redis when ``redis.url`` is set, else in this process; a prober if on.

    ``metrics_dir``: the shared metrics directory of a multi-worker server.
    """
    config = router.config
    live = LiveState(
        config.nodes,
        vantage=config.probing.vantage,
        probing=config.probing.enabled,
        load_deadband=config.state.load_deadband,
    )
    redirects = RedirectCounter()
    store: StateStore
    if config.redis.url:
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
    catalog = Catalog(
        config.upstream, config.catalog, redis_url=config.redis.url, redis_config=config.redis
    )
    sync = SyncTracker(config.nodes, config.sync, catalog, timeout_s=config.probing.timeout_s)
    return Runtime(
        router, store, prober, catalog, sync, UpstreamProxy(config.upstream), metrics_dir
    )


#: Settings read once at start; a reload that changes them only warns.
_RESTART_ONLY = ("server", "redis", "admin", "state")


def _reload(app: web.Application, load: Callable[[], GatewayConfig]) -> None:
    runtime = app[RUNTIME]
    try:
        config = load()
        router, warnings = build_router(config)
    except (ConfigError, GeoDataError) as exc:
        log.error("reload refused, keeping the running config: %s", exc)
        return
    for warning in warnings:
        log.warning("%s", warning)
    running = runtime.router.config
    for section in _RESTART_ONLY:
        if getattr(config, section) != getattr(running, section):
            log.warning("%s.* settings changed; they take effect after a restart", section)
    if config.probing.enabled != running.probing.enabled:
        log.warning("probing.enabled changed; it takes effect after a restart")
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
    On SIGTERM /readyz turns 503 at once, the listener closes and requests in flight finish
    (up to ``SHUTDOWN_GRACE_S``).
    """
    config = router.config
    metrics_dir = os.environ.get(MULTIPROC_ENV_VAR) if shared_port else None
    app = create_app(build_runtime(router, metrics_dir=metrics_dir))
    runner = GatewayRunner(
        app,
        fast_answer=fast_answer_for(app[RUNTIME]),
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        **handler_limits(config),
    )
    await runner.setup()
    thaw = freeze_survivors(asyncio.get_running_loop())
    site = web.TCPSite(runner, host, port, reuse_port=shared_port)
    await site.start()
    log.info("serving on %s:%d with %d nodes", host, port, len(config.nodes))
    metrics_runner = await _serve_metrics_apart(app, config, shared_port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, app, load_config)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        app[RUNTIME].stopping = True
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        thaw()
        app[RUNTIME].router.locator.close()
