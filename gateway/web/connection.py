"""The HTTP connection: JSON answers for requests the parser rejects, and the fast path's hook.

aiohttp answers unparsable requests (over-long lines, bad characters in the target) itself with
a text page and logs a traceback. A public front door sees such requests all day, so they get
the same JSON error body as everything else and a one-line debug log instead.

Plain redirects skip aiohttp's request machinery (``fastpath``): the connection hands each
parsed message to the fast path while it is idle, and writes the answer itself. That reads
connection internals aiohttp does not publish, so ``internals_mismatch`` checks every one of them
at start-up against the installed aiohttp (pinned to the minor it was written for); on any
mismatch the gateway serves through aiohttp's plain path and says why, once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import http_writer, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from gateway.web.answers import json_error

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
    if isinstance(exc, BadHttpMessage):
        first_line = str(exc.message).strip().splitlines()[0] if exc.message else ""
        return first_line.encode("ascii", "backslashreplace").decode("ascii")[:200]
    return "the server could not handle this request"


class GatewayRequestHandler(RequestHandler):
    """aiohttp's connection, answering parser-level errors with JSON and plain redirects
    through ``fast_answer`` without building a request."""

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


def make_runner(
    app: web.Application, fast_answer: FastAnswer | None, **handler_kwargs: Any
) -> web.AppRunner:
    """The runner for ``app``: ours when the installed aiohttp has what it reads, else
    aiohttp's own (no fast path, aiohttp's text pages for unparsable requests), said once."""
    mismatch = internals_mismatch()
    if mismatch is not None:
        log.warning("fast path and JSON parser errors off: %s", mismatch)
        return web.AppRunner(app, **handler_kwargs)
    return GatewayRunner(app, fast_answer=fast_answer, **handler_kwargs)
