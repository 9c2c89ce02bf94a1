"""Pass-through to the upstream hub for what the gateway does not answer itself.

Metadata calls the clients make through ``HF_ENDPOINT`` (repo info, tree, paths-info, anything
else under ``/api``) and resolve requests for private or gated repositories go to upstream with
the client's ``Authorization`` (upstream is the only place a token may go). On the way back
every Xet signal is removed: ``X-Xet-*`` headers, ``rel="xet-auth"`` links and ``xetHash`` in
tree entries, because any of them makes the clients bypass every mirror. Pagination links point
back at the gateway, since clients follow them verbatim.

Request bodies are passed on as they arrive, up to ``upstream.max_request_bytes`` (413 past
it). Upstream unreachable is a 503, upstream silent for ``upstream.api_timeout_s`` a 504, as for
the resolve route; the whole relay, body included, must be over within
``upstream.relay_timeout_s``, so a trickling upstream cannot hold a connection for ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import UpstreamConfig

log = logging.getLogger("gateway.upstream")

USER_AGENT_SUFFIX = "mirror-gateway/0.1"

#: Request headers worth passing on; everything else (cookies, forwarding headers, the client's
#: Host) stays with us.
_FORWARDED_REQUEST_HEADERS = (
    "Authorization", "Accept", "Content-Type", "User-Agent", "Range", "If-None-Match",
    "If-Modified-Since", "X-HF-Download-Counter",
)  # fmt: skip
#: Per-hop headers (RFC 9110 7.6.1) and those we recompute for the body we send.
_DROPPED_RESPONSE_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Transfer-Encoding", "TE", "Trailer", "Upgrade",
        "Proxy-Authenticate", "Proxy-Authorization", "Set-Cookie", "Content-Encoding",
        "Content-Length", "Date", "Server",
    )
)  # fmt: skip
_XET_HEADER_PREFIX = "x-xet-"
_LINK_ITEM = re.compile(r"<([^>]*)>\s*((?:;[^,]*)?)")
_REL = re.compile(r"""rel\s*=\s*"?([^";,]+)"?""", re.IGNORECASE)

#: How the body of an answer is treated: passed through, or JSON tree entries cleaned.
Rewrite = Literal["stream", "entries"]

_MAX_JSON_BYTES = 64 * 1024 * 1024
_STREAM_CHUNK = 256 * 1024


class UpstreamError(Exception):
    """No answer to relay: the request was refused (413), upstream could not be reached
    (503), did not answer in time (504) or answered what cannot be rewritten (502).

    ``code`` is the ``error`` of the JSON answer.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _RequestBody:
    """The client's request body, passed on chunk by chunk as it arrives, cut past ``limit``.

    aiohttp's client reads ``chunks()`` while it sends the request; when it stops early,
    ``too_large`` says whether the limit stopped it.
    """

    def __init__(self, request: web.Request, limit: int) -> None:
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(limit)
        self._request = request
        self._limit = limit
        self.too_large = False

    async def chunks(self) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in self._request.content.iter_any():
            received += len(chunk)
            if received > self._limit:
                self.too_large = True
                raise _too_large(self._limit)
            yield chunk


def _too_large(limit: int) -> UpstreamError:
    return UpstreamError(
        413, "body_too_large", f"request body over {limit} bytes (upstream.max_request_bytes)"
    )


def strip_xet_entries(payload: Any) -> Any:
    """Tree and paths-info entries without ``xetHash`` (a list, or one object)."""
    if isinstance(payload, list):
        return [strip_xet_entries(item) for item in payload]
    if isinstance(payload, dict):
        return {k: v for k, v in payload.items() if k != "xetHash"}
    return payload


def rewrite_links(value: str, upstream_origin: str, public_origin: str) -> str | None:
    """A ``Link`` header without xet-auth links, upstream URLs moved to the gateway.

    Returns None when nothing is left.
    """
    kept = []
    for match in _LINK_ITEM.finditer(value):
        url, params = match.group(1), match.group(2)
        rels = {r.lower() for m in _REL.finditer(params) for r in m.group(1).split()}
        if "xet-auth" in rels:
            continue
        if url.startswith(upstream_origin + "/"):
            url = public_origin + url[len(upstream_origin) :]
        kept.append(f"<{url}>{params}")
    return ", ".join(kept) or None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def response_headers(
    upstream: CIMultiDictProxy[str], upstream_origin: str, public_origin: str
) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower in _DROPPED_RESPONSE_HEADERS or lower.startswith(_XET_HEADER_PREFIX):
            continue
        if lower == "link":
            rewritten = rewrite_links(value, upstream_origin, public_origin)
            if rewritten is not None:
                headers.add(name, rewritten)
            continue
        headers.add(name, value)
    return headers


class UpstreamProxy:
    def __init__(self, config: UpstreamConfig) -> None:
        self._config = config
        self._origin = _origin(config.url)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self._config.api_timeout_s,
                sock_read=self._config.api_timeout_s,
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def forward(
        self,
        request: web.Request,
        target: str,
        *,
        public_origin: str,
        rewrite: Rewrite = "stream",
        streamed_headers: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        """Send ``request`` to upstream at ``target`` (path and query, already validated).

        ``streamed_headers`` go on an answer streamed from here, whose headers are sent before
        this returns; other answers are returned unsent.
        """
        assert self._session is not None, "UpstreamProxy.start() not awaited"
        headers = {
            name: request.headers[name]
            for name in _FORWARDED_REQUEST_HEADERS
            if name in request.headers
        }
        agent = headers.get("User-Agent")
        headers["User-Agent"] = f"{agent}; {USER_AGENT_SUFFIX}" if agent else USER_AGENT_SUFFIX
        body: _RequestBody | None = None
        if request.can_read_body:
            body = _RequestBody(request, self._config.max_request_bytes)
            if request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
        deadline = asyncio.get_running_loop().time() + self._config.relay_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                upstream = await self._session.request(
                    request.method,
                    self._config.url + target,
                    headers=headers,
                    data=body.chunks() if body is not None else None,
                    allow_redirects=False,
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            if body is not None and body.too_large:
                raise _too_large(self._config.max_request_bytes) from None
            raise self._unavailable(exc) from None
        async with upstream:
            out_headers = response_headers(upstream.headers, self._origin, public_origin)
            if rewrite == "entries" and upstream.status == 200:
                try:
                    async with asyncio.timeout_at(deadline):
                        return await self._cleaned_json(upstream, out_headers)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise self._unavailable(exc) from None
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.update(out_headers)
            if streamed_headers:
                response.headers.update(streamed_headers)
            if upstream.content_length is not None and "Content-Encoding" not in upstream.headers:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if request.method != "HEAD":
                await self._stream_body(upstream, response, target, deadline)
            await response.write_eof()
            return response

    def _unavailable(self, exc: BaseException) -> UpstreamError:
        """503 for upstream out of reach, 504 for upstream too slow: as the resolve route."""
        if isinstance(exc, TimeoutError):
            return UpstreamError(
                504,
                "upstream_timeout",
                f"upstream did not answer in time ({type(exc).__name__}; upstream.api_timeout_s "
                f"is {self._config.api_timeout_s:g} s, upstream.relay_timeout_s "
                f"{self._config.relay_timeout_s:g} s)",
            )
        return UpstreamError(
            503, "upstream_unavailable", f"upstream unreachable: {type(exc).__name__}"
        )

    async def _stream_body(
        self,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
        target: str,
        deadline: float,
    ) -> None:
        path = target.split("?", maxsplit=1)[0]
        try:
            async with asyncio.timeout_at(deadline):
                async for chunk in upstream.content.iter_chunked(_STREAM_CHUNK):
                    await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are sent; all we can do is cut the connection so the client sees a
            # short body and retries, rather than keep a truncated file.
            if asyncio.get_running_loop().time() >= deadline:
                log.warning(
                    "relay of %s cut: not complete within upstream.relay_timeout_s (%g s)",
                    path,
                    self._config.relay_timeout_s,
                )
            else:
                log.warning("upstream body broke off for %s: %r", path, exc)
            raise ConnectionResetError("upstream body broke off") from None

    async def _cleaned_json(
        self, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str]
    ) -> web.Response:
        raw = await upstream.content.read(_MAX_JSON_BYTES + 1)
        if len(raw) > _MAX_JSON_BYTES:
            raise UpstreamError(502, "upstream_error", "upstream answer too large to rewrite")
        try:
            payload = json.loads(raw)
        except ValueError:
            raise UpstreamError(502, "upstream_error", "upstream answered malformed JSON") from None
        headers.popall("Content-Type", None)
        return web.Response(
            status=upstream.status,
            body=json.dumps(strip_xet_entries(payload), separators=(",", ":")).encode(),
            content_type="application/json",
            headers=headers,
        )
