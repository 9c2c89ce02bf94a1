"""The fast path: plain redirects answered from the parsed message, before aiohttp's request.

Nearly every request a download front door sees is a GET or HEAD of a resolve path whose
revision the catalog holds in memory. aiohttp's machinery around each request (a request
object, a task, the middleware chain, a response object and its preparation) costs about as
much as routing it, so the connection (``connection.GatewayRequestHandler``) hands such a
message here. The answer is the ``resolve`` handler's: the same plan, the same headers
(``redirect.redirect_headers``), serialized by aiohttp's own header serializer with the headers
aiohttp's response preparation adds, and counted and logged by the same functions.

Anything else gets None and takes aiohttp's path: other endpoints, a percent-encoded first path
segment, methods other than GET and HEAD, HTTP/1.0 and ``Connection: close`` (aiohttp words the
closing), protocol upgrades, Metalink, a revision not in memory, private files, catalog errors,
and any header value aiohttp's serializer refuses. The application's middlewares do not run
here: ``app.create_app`` has only ``observe``, whose work ``finish_request`` does.
"""

from __future__ import annotations

import time
from functools import partial

from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_parser import RawRequestMessage
from aiohttp.http_writer import _serialize_headers
from multidict import CIMultiDict

from gateway.hf.catalog import CatalogError
from gateway.hf.paths import PathError, parse_resolve_path
from gateway.logs import request_id
from gateway.runtime import Runtime
from gateway.web.connection import FastAnswer
from gateway.web.credentials import carries_credentials
from gateway.web.handlers import forwarding_headers, route_label
from gateway.web.metalink import METALINK_SUFFIX, wants_metalink
from gateway.web.plan import UpstreamOnly, plan_from_memory
from gateway.web.redirect import finish_request, record_redirect, redirect_headers

_STATUS_LINE = "HTTP/1.1 302 Found"


def serialize_redirect(headers: dict[str, str], method: str) -> bytes | None:
    """The ``302`` with ``headers`` as aiohttp's response writes it to an HTTP/1.1 keep-alive
    request; None when aiohttp's serializer refuses a value (a control character)."""
    written = CIMultiDict(headers)
    # What aiohttp's response preparation adds to an empty answer, in its order: the body's
    # length (not for HEAD), the date and the server.
    if method != "HEAD":
        written["Content-Length"] = "0"
    written["Date"] = rfc822_formatted_time()
    written["Server"] = SERVER_SOFTWARE
    try:
        return _serialize_headers(_STATUS_LINE, written)
    except ValueError:
        return None


def _dispatched_to_resolve(raw_path: str) -> bool:
    """Whether aiohttp's router would hand this path to ``resolve``.

    The router matches the decoded path; the first segment alone picks the endpoint, so when it
    holds no escape the raw path is matched the same way.
    """
    end = raw_path.find("/", 1)
    first_segment = raw_path if end < 0 else raw_path[:end]
    return "%" not in first_segment and route_label(raw_path) == "resolve"


def answer(runtime: Runtime, message: RawRequestMessage, peer: str | None) -> bytes | None:
    """The whole answer to a plain redirect request, counted and logged; None for any request
    this path does not answer (nothing is counted then)."""
    started = time.perf_counter()
    method = message.method
    if (
        method not in ("GET", "HEAD")
        or message.version != HttpVersion11
        or message.should_close
        or message.upgrade
    ):
        return None
    raw_path = message.url.raw_path
    if not _dispatched_to_resolve(raw_path):
        return None
    router = runtime.router
    config = router.config
    try:
        ref = parse_resolve_path(raw_path, config.server.max_path_bytes)
    except PathError:
        return None
    headers = message.headers
    if (
        ref is None
        or ref.filename.endswith(METALINK_SUFFIX)
        or wants_metalink(headers.get("Accept"))
        # Their route depends on credentials.route: the handler's plan_route weighs it.
        or carries_credentials(headers)
    ):
        return None
    placement = router.place(peer, forwarding_headers(headers, config.client_ip))
    try:
        plan = plan_from_memory(runtime, ref, placement)
    except (CatalogError, UpstreamOnly):
        return None
    if plan is None:
        return None
    the_id = request_id(headers.get("X-Request-ID"))
    encoded = serialize_redirect(redirect_headers(runtime, plan, the_id), method)
    if encoded is None:
        return None
    route = plan.route
    routing = record_redirect(runtime, route.decision, route.location, plan.decision_seconds)
    seconds = time.perf_counter() - started
    finish_request(runtime, "resolve", method, raw_path, 302, seconds, the_id, peer, routing)
    return encoded


def fast_answer_for(runtime: Runtime) -> FastAnswer | None:
    """The fast path's answers for the connections, when ``server.fast_path`` is on."""
    if not runtime.router.config.server.fast_path:
        return None
    return partial(answer, runtime)
