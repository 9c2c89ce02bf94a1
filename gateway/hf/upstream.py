"""Pass-through to the upstream hub for what the gateway does not answer itself.

Metadata calls the clients make through ``HF_ENDPOINT`` (repo info, tree, paths-info, anything
else under ``/api``) and resolve requests for private or gated repositories go to upstream with
the client's ``Authorization`` (upstream is the only place a token may go). On the way back
every Xet signal is removed: ``X-Xet-*`` headers, ``rel="xet-auth"`` links and ``xetHash`` in
tree entries, because any of them makes the clients bypass every mirror. Pagination links point
back at the gateway, since clients follow them verbatim.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
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
    """Upstream could not be reached or did not answer in time."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
        body = await self._read_body(request)
        try:
            upstream = await self._session.request(
                request.method,
                self._config.url + target,
                headers=headers,
                data=body,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(502, f"upstream unreachable: {type(exc).__name__}") from None
        async with upstream:
            out_headers = response_headers(upstream.headers, self._origin, public_origin)
            if rewrite == "entries" and upstream.status == 200:
                return await self._cleaned_json(upstream, out_headers)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.update(out_headers)
            if streamed_headers:
                response.headers.update(streamed_headers)
            if upstream.content_length is not None and "Content-Encoding" not in upstream.headers:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if request.method != "HEAD":
                try:
                    async for chunk in upstream.content.iter_chunked(_STREAM_CHUNK):
                        await response.write(chunk)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    # Headers are sent; all we can do is cut the connection so the client
                    # sees a short body and retries, rather than keep a truncated file.
                    log.warning(
                        "upstream body broke off for %s: %s", target.split("?", maxsplit=1)[0], exc
                    )
                    raise ConnectionResetError("upstream body broke off") from None
            await response.write_eof()
            return response

    async def _read_body(self, request: web.Request) -> bytes | None:
        if not request.can_read_body:
            return None
        limit = self._config.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            raise UpstreamError(413, f"request body over {limit} bytes")
        body = await request.content.read(limit + 1)
        if len(body) > limit:
            raise UpstreamError(413, f"request body over {limit} bytes")
        return body

    async def _cleaned_json(
        self, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str]
    ) -> web.Response:
        raw = await upstream.content.read(_MAX_JSON_BYTES + 1)
        if len(raw) > _MAX_JSON_BYTES:
            raise UpstreamError(502, "upstream answer too large to rewrite")
        try:
            payload = json.loads(raw)
        except ValueError:
            raise UpstreamError(502, "upstream answered malformed JSON") from None
        headers.popall("Content-Type", None)
        return web.Response(
            status=upstream.status,
            body=json.dumps(strip_xet_entries(payload), separators=(",", ":")).encode(),
            content_type="application/json",
            headers=headers,
        )
