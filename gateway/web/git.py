"""git clone and git-lfs through the gateway.

Git's smart HTTP (``info/refs``, ``git-upload-pack``) is passed to upstream and streamed back,
bounded in request size, answer size and time (``git.*``). The git-lfs batch API is answered
from the catalog: each object's download ``href`` is the URL the routing rule picks for this
client and that file, so LFS content comes from the mirror, exactly as a resolve request would.
Whatever the catalog cannot answer (private or gated repositories, objects not in the ref's
listing, an unknown ref) is passed to upstream, which answers it with its own hrefs.
"""

from __future__ import annotations

import logging
import time

import aiohttp
from aiohttp import web

from gateway.config import GitConfig
from gateway.hf.catalog import CatalogError, RepoRevision
from gateway.hf.git import (
    LFS_MEDIA_TYPE,
    GitPath,
    LfsBatch,
    LfsError,
    batch_answer,
    file_ref,
    lfs_paths,
    parse_batch,
)
from gateway.hf.paths import PathError
from gateway.routing.router import Placement
from gateway.runtime import Runtime
from gateway.web.answers import json_error
from gateway.web.credentials import carries_credentials
from gateway.web.plan import UpstreamOnly, plan_route
from gateway.web.redirect import record_redirect

log = logging.getLogger("gateway.git")

#: Request headers git and git-lfs need upstream to see. ``Authorization`` goes to upstream,
#: the one place a token may go; cookies stay here.
_REQUEST_HEADERS = (
    "Accept", "Content-Type", "Content-Encoding", "Git-Protocol", "User-Agent", "Authorization",
)  # fmt: skip
#: Answer headers passed back; the rest (hop-by-hop, cookies, the upstream's server) stay.
_ANSWER_HEADERS = (
    "Content-Type", "Content-Encoding", "Cache-Control", "Expires", "Pragma", "WWW-Authenticate",
    "X-Error-Code", "X-Error-Message",
)  # fmt: skip
_CHUNK = 256 * 1024
_METHODS = {"info_refs": ("GET", "HEAD"), "upload_pack": ("POST",), "lfs_batch": ("POST",)}


class _TooLarge(Exception):
    pass


async def serve_git(
    request: web.Request, runtime: Runtime, git: GitPath, placement: Placement, request_id: str
) -> web.StreamResponse:
    """Answer one git or git-lfs request (``request_id`` goes on a streamed answer)."""
    config = runtime.router.config.git
    if not config.enabled:
        return json_error(404, "git_disabled", "git access is off on this gateway (git.enabled)")
    if git.endpoint == "receive_pack" or request.query.get("service") == "git-receive-pack":
        return json_error(403, "read_only", "the gateway is read-only: push to upstream")
    allowed = _METHODS[git.endpoint]
    if request.method not in allowed:
        return json_error(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed here; allowed: {', '.join(allowed)}",
            {"Allow": ", ".join(allowed)},
        )
    if git.endpoint == "info_refs" and request.query.get("service") != "git-upload-pack":
        return json_error(
            403, "smart_http_only", "only git's smart HTTP is served: ?service=git-upload-pack"
        )
    try:
        body = await _read_body(request, config)
    except _TooLarge:
        return json_error(
            413, "request_too_large", f"request body over {config.max_request_bytes} bytes"
        )
    if git.endpoint == "lfs_batch":
        try:
            batch = parse_batch(body or b"")
            answer = await _lfs_batch(runtime, git, placement, batch, request)
        except LfsError as exc:
            return json_error(exc.status, "bad_lfs_batch", exc.message)
        except PathError as exc:
            return json_error(exc.status, exc.code, exc.message)
        if answer is not None:
            return web.json_response(answer, content_type=LFS_MEDIA_TYPE)
    # Rebuilt rather than passed on: the one query git's smart HTTP has, checked above.
    query = "?service=git-upload-pack" if git.endpoint == "info_refs" else ""
    return await _relay(request, runtime, git.upstream_path() + query, body, request_id)


async def _read_body(request: web.Request, config: GitConfig) -> bytes | None:
    if not request.can_read_body:
        return None
    limit = config.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _TooLarge
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise _TooLarge
    return body


async def _lfs_batch(
    runtime: Runtime, git: GitPath, placement: Placement, batch: LfsBatch, request: web.Request
) -> dict[str, object] | None:
    """The batch answer from the catalog, each href routed for this client; None when upstream
    must answer (see the module docstring)."""
    if batch.operation != "download":
        raise LfsError(403, "the gateway is read-only: upload LFS objects to upstream")
    revision = await _revision(runtime, git, batch.ref or "main")
    if revision is None or revision.upstream_only:
        return None
    paths = lfs_paths(revision.files)
    if not all(obj in paths for obj in batch.objects):
        return None
    credentials = (
        runtime.router.config.credentials.route if carries_credentials(request.headers) else None
    )
    hrefs = []
    for obj in batch.objects:
        ref = file_ref(git, revision.commit, paths[obj])
        try:
            plan = await plan_route(runtime, ref, placement, credentials=credentials)
        except (UpstreamOnly, CatalogError):
            return None
        route = plan.route
        # Each href is a download the rule sent to that node, as a redirect is.
        record_redirect(runtime, route.decision, route.location, plan.decision_seconds)
        hrefs.append((obj, route.url))
    return batch_answer(hrefs)


async def _revision(runtime: Runtime, git: GitPath, name: str) -> RepoRevision | None:
    """The catalog's listing of ``name``; None when the catalog cannot say (upstream can).
    Raises PathError for a malformed ref name."""
    ref = file_ref(git, "main", "-").with_revision(name)
    catalog = runtime.catalog
    known = catalog.peek(ref.repo_type, ref.repo_id, ref.revision)
    if known is not None:
        return known
    try:
        return await catalog.get(ref.repo_type, ref.repo_id, ref.revision)
    except CatalogError:
        return None


async def _relay(
    request: web.Request, runtime: Runtime, target: str, body: bytes | None, request_id: str
) -> web.StreamResponse:
    """Pass the request to upstream at ``target`` and stream the answer back, within bounds.

    Clones are rare and long: each gets a session of its own, apart from the API's pool, with
    the whole exchange bounded by ``git.timeout_s``.
    """
    config = runtime.router.config
    headers = {name: request.headers[name] for name in _REQUEST_HEADERS if name in request.headers}
    timeout = aiohttp.ClientTimeout(
        total=config.git.timeout_s, sock_connect=config.upstream.api_timeout_s
    )
    started = time.perf_counter()
    async with aiohttp.ClientSession(
        timeout=timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        try:
            upstream = await session.request(
                request.method, config.upstream.url + target, headers=headers, data=body,
                allow_redirects=False,
            )  # fmt: skip
        except (aiohttp.ClientError, TimeoutError) as exc:
            runtime.metrics.upstream_call("api", time.perf_counter() - started, None)
            return json_error(
                502, "upstream_error", f"upstream unreachable: {type(exc).__name__}",
                {"Retry-After": "5"},
            )  # fmt: skip
        async with upstream:
            runtime.metrics.upstream_call("api", time.perf_counter() - started, upstream.status)
            limit = config.git.max_response_bytes
            if upstream.content_length is not None and upstream.content_length > limit:
                return json_error(502, "answer_too_large", f"upstream answer over {limit} bytes")
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name in _ANSWER_HEADERS:
                if name in upstream.headers:
                    response.headers[name] = upstream.headers[name]
            response.headers["X-Request-ID"] = request_id
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            await _stream(upstream, response, limit, target)
            await response.write_eof()
            return response


async def _stream(
    upstream: aiohttp.ClientResponse, response: web.StreamResponse, limit: int, target: str
) -> None:
    sent = 0
    try:
        async for chunk in upstream.content.iter_chunked(_CHUNK):
            sent += len(chunk)
            if sent > limit:
                log.warning("git answer for %s cut off past %d bytes", target, limit)
                raise ConnectionResetError("git answer over git.max_response_bytes")
            await response.write(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Headers are sent: cutting the connection is the only way left to tell git.
        log.warning("git answer for %s broke off: %s", target, type(exc).__name__)
        raise ConnectionResetError("upstream git answer broke off") from None
