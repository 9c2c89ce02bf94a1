"""The HTTP connection: JSON answers for requests the parser rejects, and the fast path's hook.

aiohttp answers unparsable requests (over-long lines, bad characters in the target) itself with
a text page and logs a traceback. A public front door sees such requests all day, so they get
the same JSON error body as everything else and a one-line debug log instead.

Plain redirects skip aiohttp's request machinery (``fastpath``): the connection hands each
parsed message to the fast path while it is idle, and writes the answer itself. That reads
connection internals aiohttp does not publish, so ``internals_mismatch`` checks every one of them
at start-up against the installed aiohttp (pinned to the minor it was written for); on any
mismatch the gateway serves through aiohttp's plain path and says why, once.

Every phase of a connection has a time limit: a request's head must arrive whole within
``header_timeout_s`` of its first byte (or of the connection opening), its body within
``body_timeout_s`` of the head; idle keep-alive connections are aiohttp's ``keepalive_timeout``.
New connections over a cap (``connection_limits``) are closed as soon as they are accepted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import http_writer, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from gateway.logs import request_id
from gateway.metrics import SlowPhase
from gateway.web.answers import json_error
from gateway.web.connection_limits import ConnectionLimits, Refused
from gateway.web.redaction import redact

log = logging.getLogger("gateway.server")

#: The aiohttp minor the fast path was written for (pyproject.toml pins it).
AIOHTTP_MINOR = "3.14"
#: The connection attributes the fast path reads or sets (slots of aiohttp's protocol classes).
_CONNECTION_SLOTS = (
    "_waiter",
    "_messages",
    "_manager",
    "_next_keepalive_close_time",
    "_keepalive_timeout",
    "_buffer_paused",
    "_parser",
    "_loop",
    "_request_count",
    "_request_in_progress",
    "_close",
    "_force_close",
)

#: Answers a parsed request whole (status line to blank line), or None to leave it to aiohttp.
FastAnswer = Callable[[RawRequestMessage, "str | None"], "bytes | None"]


def internals_mismatch() -> str | None:
    """What the installed aiohttp lacks of what the fast path reads, or None if it has it all."""
    if not aiohttp.__version__.startswith(AIOHTTP_MINOR + "."):
        return f"aiohttp {aiohttp.__version__} is installed; the fast path is for {AIOHTTP_MINOR}"
    slots = {
        name for cls in (RequestHandler, BaseProtocol) for name in getattr(cls, "__slots__", ())
    }
    missing = [name for name in _CONNECTION_SLOTS if name not in slots]
    for owner, name in (
        (web.AppRunner, "_make_server"),
        (http_writer, "_serialize_headers"),
        (RequestHandler, "writing_paused"),
    ):
        if not hasattr(owner, name):
            missing.append(name)
    # An instance attribute: the names the constructor assigns.
    if "requests_count" not in Server.__init__.__code__.co_names:
        missing.append("requests_count")
    if missing:
        return f"aiohttp {aiohttp.__version__} lacks {', '.join(missing)}"
    return None


def _parser_error_code(exc: BaseException | None) -> str:
    if isinstance(exc, LineTooLong):
        return "line_too_long"
    if isinstance(exc, BadHttpMethod):
        return "bad_method"
    if isinstance(exc, BadHttpMessage):
        return "bad_request"
    return "internal_error"


def _parser_error_message(exc: BaseException | None) -> str:
    """What was wrong, in words that quote nothing the client sent (it may be a credential)."""
    if isinstance(exc, LineTooLong):
        return f"a request line or header line is over {exc.args[1]} bytes"
    if isinstance(exc, BadHttpMessage):
        message = redact(str(exc.message)) if exc.message else "malformed request"
        return message.encode("ascii", "backslashreplace").decode("ascii")[:200]
    return "the server could not handle this request"


def _head_pieces(data: bytes) -> list[bytes]:
    """``data`` cut after each request head's blank line (a body may be cut too, harmlessly)."""
    pieces = []
    start = 0
    while (end := data.find(b"\r\n\r\n", start) + 4) > 3 and end < len(data):
        pieces.append(data[start:end])
        start = end
    pieces.append(data[start:] if start else data)
    return pieces


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    """How long a client may take to send a request's head and its body."""

    header_s: float
    body_s: float
    on_timed_out: Callable[[SlowPhase], None]


class GatewayRequestHandler(RequestHandler):
    """aiohttp's connection, answering parser-level errors with JSON and plain redirects
    through ``fast_answer`` without building a request."""

    def __init__(
        self,
        manager: Server,
        *,
        fast_answer: FastAnswer | None,
        limits: ConnectionLimits | None = None,
        timeouts: ClientTimeouts | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._fast_answer = fast_answer
        self._limits = limits
        self._timeouts = timeouts
        self._peer: str | None = None
        self._admitted = False
        self._limit_key: str | None = None
        self._phase_timer: asyncio.TimerHandle | None = None
        #: The body being received, while it is incomplete.
        self._body: StreamReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # As aiohttp's ``request.remote``.
        peername = transport.get_extra_info("peername")
        if peername is not None:
            self._peer = str(peername[0] if isinstance(peername, list | tuple) else peername)
        if self._limits is not None:
            try:
                self._limit_key = self._limits.admit(self._peer)
            except Refused:
                # Never handed to aiohttp: nothing to undo but the socket.
                transport.close()
                return
        self._admitted = True
        super().connection_made(transport)
        # The first request's head is due from now: a connection that sends nothing is cut.
        self._start_phase_timer("header")

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        if self._limits is not None:
            self._limits.release(self._limit_key)
        self._stop_phase_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        requests_before = self._request_count
        # Fed one head at a time: a parser error drops every message parsed in the same feed,
        # and the requests pipelined before a malformed one are still owed their answers.
        for piece in _head_pieces(data):
            self._received(piece)
            if self._messages and not isinstance(self._messages[-1][0], RawRequestMessage):
                break  # the parser's error: aiohttp answers it and closes
        self._track_phases(self._request_count > requests_before, bool(data))

    def _track_phases(self, new_request: bool, got_data: bool) -> None:
        """Arm the timer of the phase the connection is in: a head begun, a body under way."""
        if new_request:
            self._stop_phase_timer()
            payload = self._messages[-1][1] if self._messages else EMPTY_PAYLOAD
            if payload is not EMPTY_PAYLOAD and not payload.is_eof():
                self._body = payload
                self._start_phase_timer("body")
        elif self._body is not None:
            if self._body.is_eof():
                self._stop_phase_timer()
        elif got_data and self._phase_timer is None and not (self._close or self._force_close):
            # (A closing connection ignores what it reads: nothing to time.)
            self._start_phase_timer("header")

    def _start_phase_timer(self, phase: SlowPhase) -> None:
        if self._timeouts is None:
            return
        delay = self._timeouts.header_s if phase == "header" else self._timeouts.body_s
        self._phase_timer = self._loop.call_later(delay, self._phase_late, phase)

    def _stop_phase_timer(self) -> None:
        self._body = None
        if self._phase_timer is not None:
            self._phase_timer.cancel()
            self._phase_timer = None

    def _phase_late(self, phase: SlowPhase) -> None:
        self._phase_timer = None
        if phase == "header" and (self._request_in_progress or self._messages):
            # A head begun behind a request still being answered: its time runs from when
            # the connection is free.
            self._start_phase_timer(phase)
            return
        assert self._timeouts is not None
        log.debug("closed a connection from %s: request %s too slow", self._peer, phase)
        self._timeouts.on_timed_out(phase)
        self.force_close()

    def _received(self, data: bytes) -> None:
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
        explained = _parser_error_message(exc)
        if status >= 500:
            # A real fault of ours: keep aiohttp's logging (with traceback) but not its body.
            super().handle_error(request, status, exc, message)
        else:
            log.debug("rejected malformed request from %s: %s", request.remote, explained)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error body")
        # No id of the client's to repeat: the request could not be read.
        response = json_error(
            status, _parser_error_code(exc), explained, {"X-Request-ID": request_id(None)}
        )
        response.force_close()
        return response


@dataclass(frozen=True, slots=True)
class ConnectionRules:
    """What ``GatewayRequestHandler`` adds to aiohttp's connection (each one optional)."""

    fast_answer: FastAnswer | None = None
    limits: ConnectionLimits | None = None
    timeouts: ClientTimeouts | None = None


class _GatewayServer(Server):
    def __init__(self, base: Server, rules: ConnectionRules, **handler_kwargs: Any) -> None:
        super().__init__(
            base.request_handler, request_factory=base.request_factory, **handler_kwargs
        )
        self._rules = rules
        self._handler_kwargs = {
            k: v for k, v in handler_kwargs.items() if k != "handler_cancellation"
        }

    def __call__(self) -> RequestHandler:
        rules = self._rules
        return GatewayRequestHandler(
            self,
            fast_answer=rules.fast_answer,
            limits=rules.limits,
            timeouts=rules.timeouts,
            loop=asyncio.get_running_loop(),
            **self._handler_kwargs,
        )


class GatewayRunner(web.AppRunner):
    """An ``AppRunner`` whose connections answer parser-level errors with JSON, and follow
    ``rules``: plain redirects, connection caps, slow-client timeouts."""

    def __init__(
        self,
        app: web.Application,
        *,
        shutdown_timeout: float = 60.0,
        rules: ConnectionRules | None = None,
        **handler_kwargs: Any,
    ) -> None:
        super().__init__(app, shutdown_timeout=shutdown_timeout, **handler_kwargs)
        self._rules = rules or ConnectionRules()
        self._handler_kwargs = handler_kwargs

    async def _make_server(self) -> Server:
        base = await super()._make_server()
        return _GatewayServer(base, self._rules, **self._handler_kwargs)


def make_runner(
    app: web.Application, rules: ConnectionRules, **handler_kwargs: Any
) -> web.AppRunner:
    """The runner for ``app``: ours when the installed aiohttp has what it reads, else
    aiohttp's own (no fast path, caps or head and body timeouts, aiohttp's text pages for
    unparsable requests), said once."""
    mismatch = internals_mismatch()
    if mismatch is not None:
        log.warning(
            "fast path, JSON parser errors, connection caps and head/body timeouts off: %s",
            mismatch,
        )
        return web.AppRunner(app, **handler_kwargs)
    return GatewayRunner(app, rules=rules, **handler_kwargs)
