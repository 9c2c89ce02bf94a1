"""The hot path: plain redirects answered from the parsed message, before aiohttp's request.

Nearly every request a download front door sees is a GET or HEAD of a resolve path whose
revision the catalog holds in memory. aiohttp's machinery around each request (a request
object, a task, the middleware chain, a response object and its preparation) costs about as
much as routing it, so the connection (``server.GatewayRequestHandler``) hands such a message
here and writes the answer itself: the same decision, metrics, load count, access log line
and headers as the ``resolve`` handler, in the bytes aiohttp would have written.

Most clients sit in a cell whose near-equal pool is settled (``Router.settled``: no node in it
is checked per file): their answer is a draw from the pool (a caches' group picking by the file)
and text made once per file and once per pool and node. The others get the answer of the
request's plan (``plan_from_memory``), as the handler would.

Anything else gets None and takes aiohttp's path: other endpoints, a percent-encoded first path
segment, methods other than GET and HEAD, HTTP/1.0 and ``Connection: close`` (aiohttp words the
closing), protocol upgrades, Metalink, a revision not in memory, private files, catalog errors,
and any header value aiohttp would refuse to write.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_parser import RawRequestMessage
from multidict import CIMultiDictProxy

from gateway.answers import redirect_headers
from gateway.catalog import CatalogError, FileMeta, RepoRevision, entry_for
from gateway.clientip import ClientAddress
from gateway.config import DEFAULT_URL_TEMPLATE, NodeConfig
from gateway.geo import Location
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
from gateway.metalink import METALINK_SUFFIX, link_layout, links_metalink, wants_metalink
from gateway.planner import Plan, UpstreamOnly, plan_from_memory
from gateway.policy import Decision
from gateway.router import PRIVATE_CACHE_CONTROL, Placement, Route, route_key
from gateway.runtime import Runtime
from gateway.sync import FileHolders, SyncTracker
from gateway.targets import default_path, node_url

#: What aiohttp's writer refuses in a header value (a value must not be able to add a header):
#: every control character but tab.
_CONTROL_BYTES = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
#: Paths answered here before, with the file they name.
_plain_files: BoundedMemo[tuple[str, int], FileRef] = BoundedMemo(PARSED_PATHS)
_STATUS_LINE = "HTTP/1.1 302 Found\r\n"
#: aiohttp writes no length for a HEAD answer without a body.
_EMPTY_BODY = {"GET": "Content-Length: 0\r\n", "HEAD": ""}
#: Stands for the node's parts while a file's text is made: no header value holds it.
_NODE_MARK = "\x00"
_NODE_END = "\r\n"


class _FileText(NamedTuple):
    """A redirect's text for one file, around the chosen node's parts: made once per catalog
    entry, as every client of every node asks for the same files."""

    #: The catalog entry it was made from: a newer one makes it anew.
    revision: RepoRevision
    pinned: FileRef
    meta: FileMeta
    #: What the default URL template puts after a base URL (``Link`` goes around it too).
    path: str
    #: The status line and headers up to the ``Location`` URL's base.
    before: str
    #: From the end of that URL to the node's id.
    between: str
    #: Whether the ``Link`` header names the file's Metalink.
    described: bool
    #: What a caches' group picks by (``route_key``), and its caches holding the file. The
    #: holders read the sync tracker of the runtime whose catalog made ``revision``.
    key: str
    holders: FileHolders


#: Files redirected to from a settled pool, by the file as requested.
_file_texts: BoundedMemo[FileRef, _FileText] = BoundedMemo(PARSED_PATHS)


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


def _header_lines(headers: dict[str, str]) -> str:
    return "".join([f"{name}: {value}\r\n" for name, value in headers.items()])


def _only_line_ends(encoded: bytes, line_ends: int) -> bool:
    """Whether the only control bytes in ``encoded`` are its ``line_ends`` CRLFs: a value
    holding any other control character but tab is refused, as aiohttp's writer refuses it."""
    return len(encoded) - len(encoded.translate(None, _CONTROL_BYTES)) == 2 * line_ends


def _date_and_server() -> str:
    return f"Date: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\n\r\n"


def serialized_redirect(headers: dict[str, str], body: str) -> bytes | None:
    """A 302 with ``headers`` as aiohttp writes it (``body``: its length line, or none for
    HEAD); None when a value holds a control character other than tab, which aiohttp refuses."""
    encoded = "".join([_STATUS_LINE, _header_lines(headers), body, _date_and_server()]).encode()
    # The status line's, each header's, the body's length line's, the date's, the server's and
    # the blank line's.
    line_ends = len(headers) + 4 + body.count("\n")
    return encoded if _only_line_ends(encoded, line_ends) else None


def _file_text(revision: RepoRevision, ref: FileRef, sync: SyncTracker) -> _FileText | None:
    """None when the file is not in the entry, or a value upstream gave is not fit for a
    header (the planned path then finds the same)."""
    try:
        meta = entry_for(revision, ref.filename)
        pinned = ref.with_revision(revision.commit)
    except (CatalogError, PathError):
        return None
    headers = redirect_headers(_NODE_MARK, revision.commit, meta, PRIVATE_CACHE_CONTROL, _NODE_MARK)
    text = _STATUS_LINE + _header_lines(headers)
    # Each mark is a control character too.
    if not _only_line_ends(text.encode(), len(headers) + 2):
        return None
    before, between, after = text.split(_NODE_MARK)
    # The node's id ends the headers the file's text is made of (``_NODE_END`` follows it).
    assert after == _NODE_END
    return _FileText(
        revision,
        pinned,
        meta,
        default_path(pinned),
        before,
        between,
        links_metalink(revision.files, ref.filename),
        route_key(pinned),
        FileHolders(sync, pinned),
    )


class _Answer(NamedTuple):
    encoded: bytes
    request_id: str
    decision: Decision
    #: The client's.
    location: Location
    decision_seconds: float


def _settled_answer(
    runtime: Runtime, ref: FileRef, placement: Placement, headers: CIMultiDictProxy[str], body: str
) -> _Answer | None:
    """The answer when the client's pool is settled (``Router.settled``): the one the planned
    path gives, from text made once per file and per set of named nodes."""
    revision = runtime.catalog.peek(ref.repo_type, ref.repo_id, ref.revision)
    if revision is None or revision.upstream_only:
        return None
    if placement.from_cdn_only:
        return None  # a shared answer, with its own caching headers
    file = _file_texts.get(ref)
    if file is None or file.revision is not revision:
        file = _file_text(revision, ref, runtime.sync)
        if file is None:
            return None
        _file_texts.put(ref, file)
    store = runtime.store
    live = store.live
    started = time.perf_counter()
    decision = runtime.router.settled(
        placement.cell, live.statuses, live, runtime.sync,
        key=file.key, recent=store.redirects.current, warm_caches=file.holders,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if decision is None:
        return None
    node = decision.node
    assert node is not None  # a settled decision names a node
    node_text = _node_text(runtime, decision, node, file.described)
    if node_text is None:
        # The chosen or a named node's own URL template: the plan this decision makes.
        url = node_url(node, file.pinned)
        route = Route(placement.client, placement.location, decision, url, revision.commit, False)
        plan = Plan(ref, revision, route, file.meta, {}, seconds)
        return _answer_for(runtime, plan, headers, body)
    the_id = request_id(headers.get("X-Request-ID"))
    # Nothing here to check for control characters: the file's text was checked, the node's
    # comes from the config (which refuses them in URLs) and the request id is a token.
    text = "".join(
        [
            file.before,
            node.base_url,
            file.path,
            file.between,
            file.path.join(node_text),
            f"X-Request-ID: {the_id}\r\n",
            body,
            _date_and_server(),
        ]
    )
    return _Answer(text.encode(), the_id, decision, placement.location, seconds)


def _node_text(
    runtime: Runtime, decision: Decision, node: NodeConfig, described: bool
) -> tuple[str, ...] | None:
    """The text from the chosen node's id to the end of the ``Link`` header, split where the
    file's path goes; None when the chosen or a named node has its own URL template."""
    named = decision.candidates
    key = (id(named), node.id, described)
    known = runtime.node_texts.get(key)
    if known is not None and known[0] is named:
        return known[1]
    if node.url_template != DEFAULT_URL_TEMPLATE:
        return None
    limit = runtime.router.config.responses.duplicate_links
    layout = link_layout(runtime, decision, limit, described)
    if not layout:
        return None
    ended = f"{node.id}{_NODE_END}"
    if layout == ("",):  # nothing to link
        return runtime.node_texts.put(key, (named, (ended,)))[1]
    text = [*layout]
    text[0] = f"{ended}Link: {text[0]}"
    text[-1] += "\r\n"
    return runtime.node_texts.put(key, (named, tuple(text)))[1]


def _answer_for(
    runtime: Runtime, plan: Plan, headers: CIMultiDictProxy[str], body: str
) -> _Answer | None:
    answer = redirect_headers_for(runtime, plan)
    answer["X-Request-ID"] = the_id = request_id(headers.get("X-Request-ID"))
    encoded = serialized_redirect(answer, body)
    if encoded is None:
        return None
    route = plan.route
    return _Answer(encoded, the_id, route.decision, route.location, plan.decision_seconds)


def _planned_answer(
    runtime: Runtime, ref: FileRef, client: ClientAddress, headers: CIMultiDictProxy[str], body: str
) -> _Answer | None:
    """The answer from the request's plan, when every revision it reads is in memory."""
    try:
        plan = plan_from_memory(runtime, ref, client)
    except (CatalogError, UpstreamOnly):
        return None
    return None if plan is None else _answer_for(runtime, plan, headers, body)


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
    placement = router.place(peer, forwarding_headers(headers, router.config.client_ip))
    answer = _settled_answer(runtime, ref, placement, headers, body) or _planned_answer(
        runtime, ref, placement.client, headers, body
    )
    if answer is None:
        return None
    routing = record_redirect(runtime, answer.decision, answer.location, answer.decision_seconds)
    seconds = time.perf_counter() - started
    runtime.metrics.request_done("resolve", message.method, 302, seconds)
    if routing is not None:
        log_request(answer.request_id, message.method, raw_path, 302, seconds, peer, routing)
    return answer.encoded
