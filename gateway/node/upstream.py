"""The node's upstream: an HF-compatible hub asked with the operator's token.

Metadata comes from the same API the gateway's catalog reads (and is parsed by the catalog's
own functions); files from resolve URLs, whose redirects are followed here so that the token
goes to the hub's origin only, never to a CDN on another host.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote

import aiohttp
from yarl import URL

from gateway.hf.catalog import (
    FileMeta,
    MalformedData,
    Resolution,
    classify_status,
    parse_revision_info,
    parse_tree_page,
)
from gateway.hf.paths import FileRef, RepoType
from gateway.hf.targets import upstream_url
from gateway.state.netio import bounded_chunks, describe_error

USER_AGENT = "mirror-gateway-node/0.1"
MAX_API_BYTES = 64 * 1024 * 1024
MAX_REDIRECTS = 5
MAX_TREE_PAGES = 10_000
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_PLURAL = {"model": "models", "dataset": "datasets", "space": "spaces"}


class UpstreamError(Exception):
    """Upstream could not give what was asked; ``permanent`` when asking again will not help
    (the repository or revision does not exist, or the token gives no access)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


def new_session(timeout_s: float) -> aiohttp.ClientSession:
    """The node's HTTP client; call from a coroutine and close it when done."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": USER_AGENT},
        # No total: a large file takes as long as it takes; a stalled read does not.
        timeout=aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s),
        auto_decompress=False,
    )


def _origin(url: URL) -> tuple[str, str | None, int | None]:
    return url.scheme, url.host, url.port


def _status_error(response: aiohttp.ClientResponse, what: str) -> UpstreamError:
    code = classify_status(response.status, response.headers.get("X-Error-Code"))
    detail = response.headers.get("X-Error-Message") or response.reason or ""
    text = f"{what}: status {response.status}" + (f" ({code}: {detail})" if code else "")
    return UpstreamError(text, permanent=code is not None)


class Upstream:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str | None) -> None:
        self._session = session
        self.base_url = base_url.rstrip("/")
        self._origin = _origin(URL(self.base_url))
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        #: Requests sent, by kind ("revision", "tree", "file"): what a resumed run saved.
        self.requests: dict[str, int] = {}

    def _headers(self, url: URL) -> dict[str, str]:
        return dict(self._auth) if _origin(url) == self._origin else {}

    def _count(self, kind: str) -> None:
        self.requests[kind] = self.requests.get(kind, 0) + 1

    async def _get_json(self, url: URL, what: str) -> tuple[object, URL | None]:
        self._count(what)
        try:
            async with self._session.get(
                url, headers={**self._headers(url), "Accept": "application/json"}
            ) as response:
                if response.status != 200:
                    raise _status_error(response, f"{what} {url.path}")
                chunks = [c async for c in bounded_chunks(response.content, MAX_API_BYTES + 1)]
                next_link = response.links.get("next")
                # aiohttp has made it absolute against the response URL.
                link = next_link.get("url") if next_link is not None else None
        except TimeoutError:
            raise UpstreamError(f"{what} {url.path}: timeout") from None
        except (OSError, aiohttp.ClientError) as exc:
            raise UpstreamError(f"{what} {url.path}: {describe_error(exc)}") from None
        body = b"".join(chunks)
        if len(body) > MAX_API_BYTES:
            raise UpstreamError(f"{what} {url.path}: answer over {MAX_API_BYTES} bytes")
        try:
            data = json.loads(body)
        except ValueError:
            raise UpstreamError(f"{what} {url.path}: not JSON") from None
        return data, link if isinstance(link, URL) else None

    def _api(self, repo_type: RepoType, repo_id: str, tail: str) -> URL:
        return URL(f"{self.base_url}/api/{_PLURAL[repo_type]}/{repo_id}/{tail}", encoded=True)

    async def resolve(self, repo_type: RepoType, repo_id: str, revision: str) -> Resolution:
        """The commit ``revision`` names now, and whether the repository is gated or private."""
        url = self._api(repo_type, repo_id, f"revision/{quote(revision, safe='')}")
        data, _ = await self._get_json(url, "revision")
        try:
            return parse_revision_info(data, revision, 0.0)
        except MalformedData as exc:
            raise UpstreamError(f"revision {url.path}: {exc}") from None

    async def files(self, repo_type: RepoType, repo_id: str, commit: str) -> list[FileMeta]:
        """Every file of ``commit`` with its size and etag, all tree pages read."""
        url: URL | None = self._api(
            repo_type, repo_id, f"tree/{commit}?recursive=true&expand=false"
        )
        metas: list[FileMeta] = []
        for _ in range(MAX_TREE_PAGES):
            if url is None:
                return metas
            if _origin(url) != self._origin:
                raise UpstreamError(f"tree: next page on another origin ({url.origin()})")
            data, url = await self._get_json(url, "tree")
            try:
                metas.extend(parse_tree_page(data))
            except MalformedData as exc:
                raise UpstreamError(f"tree of {repo_id}@{commit}: {exc}") from None
        raise UpstreamError(f"tree of {repo_id}@{commit}: more than {MAX_TREE_PAGES} pages")

    @asynccontextmanager
    async def open_file(self, ref: FileRef, start: int) -> AsyncIterator[aiohttp.ClientResponse]:
        """The answer to GET (from byte ``start``) of a resolve URL, redirects followed.

        Status 200 or 206 only; raises UpstreamError otherwise or on transport errors.
        """
        self._count("file")
        url = URL(upstream_url(self.base_url, ref), encoded=True)
        ranged = {"Range": f"bytes={start}-"} if start else {}
        identity = {"Accept-Encoding": "identity"}
        try:
            for _ in range(MAX_REDIRECTS + 1):
                response = await self._session.get(
                    url,
                    headers={**self._headers(url), **ranged, **identity},
                    allow_redirects=False,
                )
                if response.status in _REDIRECTS and "Location" in response.headers:
                    url = url.join(URL(response.headers["Location"], encoded=True))
                    response.release()
                    continue
                try:
                    if response.status not in (200, 206):
                        raise _status_error(response, f"file {ref.filename}")
                    yield response
                finally:
                    response.release()
                return
        except TimeoutError:
            raise UpstreamError(f"file {ref.filename}: timeout") from None
        except (OSError, aiohttp.ClientError) as exc:
            raise UpstreamError(f"file {ref.filename}: {describe_error(exc)}") from None
        raise UpstreamError(f"file {ref.filename}: more than {MAX_REDIRECTS} redirects")
