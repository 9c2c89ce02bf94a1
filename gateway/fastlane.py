"""The hot path: plain redirects answered from the parsed message, before aiohttp's request.

Nearly every request a download front door sees is a GET or HEAD of a resolve path whose
revision the catalog holds in memory. aiohttp's machinery around each request (a request
object, a task, the middleware chain, a response object and its preparation) costs about as
much as routing it, so the connection (``server.GatewayRequestHandler``) hands such a message
here and writes the answer itself: the same plan, metrics, load count, access log line and
headers as the ``resolve`` handler, in the bytes aiohttp would have written.

Anything else gets None and takes aiohttp's path: other endpoints, a percent-encoded first path
segment, methods other than GET and HEAD, HTTP/1.0 and ``Connection: close`` (aiohttp words the
closing), protocol upgrades, Metalink, a revision not in memory, private files, catalog errors,
and any header value aiohttp would refuse to write.
"""

from __future__ import annotations

import time

from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_parser import RawRequestMessage

from gateway.catalog import CatalogError
from gateway.hfpath import PARSED_PATHS, FileRef, PathError, parse_resolve_path_remembered
from gateway.http import (
    forwarding_headers,
    log_request,
    record_redirect,
    redirect_headers_for,
    route_label,
)
from gateway.logs import request_id
from gateway.memo import BoundedMemo
from gateway.metalink import METALINK_SUFFIX, wants_metalink
from gateway.planner import UpstreamOnly, plan_from_memory
from gateway.runtime import Runtime

#: What aiohttp's writer refuses in a header value (a value must not be able to add a header):
#: every control character but tab.
_CONTROL_BYTES = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
#: Paths answered here before, with the file they name.
_plain_files: BoundedMemo[tuple[str, int], FileRef] = BoundedMemo(PARSED_PATHS)
_STATUS_LINE = "HTTP/1.1 302 Found\r\n"
#: aiohttp writes no length for a HEAD answer without a body.
_EMPTY_BODY = {"GET": "Content-Length: 0\r\n", "HEAD": ""}


def _dispatched_to_resolve(raw_path: str) -> bool:
    """Whether aiohttp's router would hand this path to ``resolve``.

    The router matches the decoded path; the first segment alone picks the endpoint, so when it
    holds no escape the raw path is matched the same way.
    """
    end = raw_path.find("/", 1)
    first_segment = raw_path if end < 0 else raw_path[:end]
    return "%" not in first_segment and route_label(raw_path) == "resolve"


def _plain_file(raw_path: str, max_path_bytes: int) -> FileRef | None:
    """The file a path names when ``resolve`` would redirect to it, None for other paths."""
    key = (raw_path, max_path_bytes)
    ref = _plain_files.get(key)
    if ref is not None or not _dispatched_to_resolve(raw_path):
        return ref
    try:
        ref = parse_resolve_path_remembered(raw_path, max_path_bytes)
    except PathError:
        return None
    if ref is None or ref.filename.endswith(METALINK_SUFFIX):
        return None
    return _plain_files.put(key, ref)


def serialized_redirect(headers: dict[str, str], body: str) -> bytes | None:
    """A 302 with ``headers`` as aiohttp writes it (``body``: its length line, or none for
    HEAD); None when a value holds a control character other than tab, which aiohttp refuses."""
    lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
    encoded = "".join(
        [
            _STATUS_LINE,
            *lines,
            body,
            f"Date: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\n\r\n",
        ]
    ).encode()
    # The only control bytes must be the line ends: the status line's, each header's, the
    # body's length line's, the date's, the server's and the blank line's.
    line_ends = len(lines) + 4 + body.count("\n")
    if len(encoded) - len(encoded.translate(None, _CONTROL_BYTES)) != 2 * line_ends:
        return None
    return encoded


def answer_from_memory(
    runtime: Runtime, message: RawRequestMessage, peer: str | None
) -> bytes | None:
    """The whole answer to a plain redirect request, counted and logged; None for any request
    this path does not answer (nothing is counted then)."""
    started = time.perf_counter()
    body = _EMPTY_BODY.get(message.method)
    if body is None or message.version != HttpVersion11 or message.should_close or message.upgrade:
        return None
    raw_path = message.url.raw_path
    router = runtime.router
    ref = _plain_file(raw_path, router.config.server.max_path_bytes)
    headers = message.headers
    if ref is None or wants_metalink(headers.get("Accept")):
        return None
    client = router.resolver.resolve_remembered(
        peer, forwarding_headers(headers, router.config.client_ip)
    )
    try:
        plan = plan_from_memory(runtime, ref, client)
    except (CatalogError, UpstreamOnly):
        return None
    if plan is None:
        return None
    answer = redirect_headers_for(runtime, plan)
    answer["X-Request-ID"] = the_id = request_id(headers.get("X-Request-ID"))
    encoded = serialized_redirect(answer, body)
    if encoded is None:
        return None
    routing = record_redirect(runtime, plan)
    seconds = time.perf_counter() - started
    runtime.metrics.request_done("resolve", message.method, 302, seconds)
    if routing is not None:
        log_request(the_id, message.method, raw_path, 302, seconds, peer, routing)
    return encoded
