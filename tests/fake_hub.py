"""A local Hugging Face Hub: the upstream the gateway and real HF clients talk to in tests.

``FakeHub`` is an aiohttp server in its own thread and event loop (like tests/mirror_node.py), so
it keeps answering while a synchronous test blocks on a client subprocess. It serves generated
repositories held in memory (``FakeRepo`` / ``Commit``) with the shapes huggingface.co uses and
that ``huggingface_hub`` 0.36, 1.33 and 2.4 read:

- ``GET /api/{models|datasets|spaces}/{repo_id}[/revision/{revision}]``: repo info.
- ``GET /api/{type}s/{repo_id}/tree/{revision}[/{path}]``: tree, paginated with an ABSOLUTE
  ``Link: <http://127.0.0.1:PORT/...&cursor=...>; rel="next"`` (a gateway must rewrite it).
- ``POST /api/{type}s/{repo_id}/paths-info/{revision}``: form or JSON ``paths`` / ``expand``.
- ``GET|HEAD /{prefix}{repo_id}/resolve/{revision}/{path}``: plain git files answer 200 with the
  bytes; LFS files answer 302 to ``{cdn_url}/_cdn/{sha256}`` with ``X-Linked-Etag`` and
  ``X-Linked-Size``, as huggingface.co redirects to its CDN.

The CDN is another host, as huggingface.co's is: it listens on a second port, and its URL
(``cdn_url``) names the host ``localhost`` while the hub's names ``127.0.0.1``. Clients follow a
HEAD redirect they take to stay "on the Hub" and read the file metadata from the final answer;
the CDN's has no ``X-Repo-Commit``, so the download would fail. 2.4 follows redirects within one
origin (scheme, host AND port); 1.33 follows redirects to the same host NAME whatever the port,
and keeps ``Authorization`` for them. Mirror nodes (hf_nodes.py) are named ``localhost`` for the
same reason, so ``HF_ENDPOINT`` must name the gateway (or the hub) ``127.0.0.1``.

Xet bait: with ``xet=True`` (the default) LFS resolve answers carry ``X-Xet-Hash`` and a
``Link: <...xet-read-token...>; rel="xet-auth"``, and tree / paths-info entries of LFS files carry
a 64-hex ``xetHash``. A client that sees them switches to Xet and asks the hub for a xet token;
the hub 404s that (it is under /api), the download fails, and ``xet_requests()`` shows it. The
gateway must strip all of it. Direct client tests (no gateway) use ``xet=False``.

Every request is recorded in ``seen``; ``delay_s`` and ``failing`` switch on slowness or an
outage from the test, ``wrong_bytes`` a hub that serves other content than it lists.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote, unquote, urlencode

from aiohttp import web
from threaded_server import ThreadedServer

RepoType = Literal["model", "dataset", "space"]
REPO_TYPES: tuple[RepoType, ...] = ("model", "dataset", "space")
#: URL prefix of each repo type in resolve URLs (models have none).
TYPE_PREFIX: dict[str, str] = {"model": "", "dataset": "datasets/", "space": "spaces/"}

VALID_TOKEN = "hf_fake_valid_token"
#: Base of the deterministic commit timestamps (2024-11-19T07:06:40Z).
BASE_TIME = 1732000000.0
MIB = 1024 * 1024
#: The host name of every "other host" (the CDN, mirror nodes): it resolves to 127.0.0.1, where
#: they listen, but clients compare host names, and the hub and the gateway are ``127.0.0.1``.
OTHER_HOST = "localhost"

_SHA1_RE = re.compile(r"[0-9a-f]{40}")


# --------------------------------------------------------------------------- hashing


# Cached: the same few MiB are hashed for every listing, manifest and CDN request otherwise
# (a bytes object caches its own hash, so the lookup itself is cheap).
@functools.lru_cache(maxsize=1024)
def git_blob_sha1(content: bytes) -> str:
    """Git's object id of a blob: what huggingface.co sends as the ETag of a plain file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@functools.lru_cache(maxsize=1024)
def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@functools.lru_cache(maxsize=1024)
def lfs_pointer(content: bytes) -> bytes:
    """The git-lfs pointer file git stores instead of an LFS file's content."""
    return (
        "version https://git-lfs.github.com/spec/v1\n"
        f"oid sha256:{sha256_hex(content)}\nsize {len(content)}\n"
    ).encode()


@functools.lru_cache(maxsize=1024)
def xet_hash(content: bytes) -> str:
    """A stand-in Xet content hash: 64 hex like the real one, but never equal to the sha256."""
    return hashlib.sha256(b"xet\0" + content).hexdigest()


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Commit:
    """One commit: every file's full content, and which of them are stored with LFS."""

    sha: str
    files: Mapping[str, bytes]
    lfs: frozenset[str] = frozenset()
    parent: str | None = None
    title: str = ""
    timestamp: float = BASE_TIME

    def is_lfs(self, path: str) -> bool:
        return path in self.lfs

    def size(self, path: str) -> int:
        return len(self.files[path])

    def sha256(self, path: str) -> str:
        return sha256_hex(self.files[path])

    def blob_id(self, path: str) -> str:
        """The git oid: of the pointer file for LFS files, of the content otherwise."""
        content = self.files[path]
        return git_blob_sha1(lfs_pointer(content) if path in self.lfs else content)

    def etag(self, path: str) -> str:
        """What clients key their cache on: sha256 for LFS files, the git blob sha1 otherwise."""
        return self.sha256(path) if path in self.lfs else self.blob_id(path)

    def xet_hash(self, path: str) -> str:
        return xet_hash(self.files[path])

    def directories(self) -> set[str]:
        dirs: set[str] = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return dirs

    def tree_oid(self, directory: str) -> str:
        """A deterministic stand-in for the git tree id of a directory."""
        inside = sorted(
            f"{p} {self.blob_id(p)}" for p in self.files if p.startswith(directory + "/")
        )
        return hashlib.sha1(f"tree {directory}\n{chr(10).join(inside)}".encode()).hexdigest()


def make_commit(
    repo_key: str,
    files: Mapping[str, bytes],
    *,
    lfs: Iterable[str] = (),
    parent: str | None = None,
    title: str = "",
    timestamp: float = BASE_TIME,
) -> Commit:
    """A commit whose sha is the sha1 of a string made of everything in it, so it is stable."""
    lfs_set = frozenset(lfs)
    unknown = lfs_set - set(files)
    if unknown:
        raise ValueError(f"LFS paths not in the commit: {sorted(unknown)}")
    lines = [f"repo {repo_key}", f"parent {parent or ''}", f"title {title}", f"time {timestamp}"]
    for path in sorted(files):
        kind = "lfs" if path in lfs_set else "git"
        lines.append(f"{kind} {git_blob_sha1(files[path])} {path}")
    sha = hashlib.sha1("\n".join(lines).encode()).hexdigest()
    return Commit(sha, dict(files), lfs_set, parent, title, timestamp)


@dataclass
class FakeRepo:
    """A repository: its commits (oldest first) and refs (branch, tag or PR name -> sha)."""

    repo_type: RepoType
    repo_id: str
    commits: list[Commit]
    refs: dict[str, str]
    private: bool = False
    gated: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.repo_type, self.repo_id)

    @property
    def prefix(self) -> str:
        """The resolve-URL prefix: ``""``, ``"datasets/"`` or ``"spaces/"``."""
        return TYPE_PREFIX[self.repo_type]

    def commit(self, sha: str) -> Commit:
        for commit in self.commits:
            if commit.sha == sha:
                return commit
        raise KeyError(f"{self.repo_id} has no commit {sha}")

    def head(self, ref: str = "main") -> Commit:
        return self.commit(self.refs[ref])

    def resolve(self, revision: str) -> Commit | None:
        """Branch, tag, ``refs/pr/N``, ``refs/heads/X``, ``refs/tags/X`` or a full sha."""
        for name in (
            revision,
            revision.removeprefix("refs/heads/"),
            revision.removeprefix("refs/tags/"),
        ):
            if name in self.refs:
                return self.commit(self.refs[name])
        if _SHA1_RE.fullmatch(revision):
            for commit in self.commits:
                if commit.sha == revision:
                    return commit
        return None

    def ancestors(self, commit: Commit) -> Iterator[Commit]:
        """The commit itself, then its parents, newest first."""
        current: Commit | None = commit
        while current is not None:
            yield current
            current = self.commit(current.parent) if current.parent else None

    def last_commit_touching(self, commit: Commit, path: str) -> Commit:
        """The oldest commit in ``commit``'s history since which ``path`` (a file or a directory)
        is unchanged: what huggingface.co reports as its ``lastCommit`` with ``expand``."""

        def state(c: Commit) -> object:
            if path in c.files:
                return c.files[path]
            return sorted((p, b) for p, b in c.files.items() if p.startswith(path + "/"))

        found, wanted = commit, state(commit)
        for older in self.ancestors(commit):
            if state(older) != wanted:
                break
            found = older
        return found

    def push(
        self,
        changes: Mapping[str, bytes | None],
        *,
        lfs: Iterable[str] = (),
        ref: str = "main",
        title: str = "update",
    ) -> Commit:
        """Commit ``changes`` (``None`` deletes a file) on top of ``ref`` and move ``ref`` to it."""
        base = self.resolve(ref) if ref in self.refs else None
        files = dict(base.files) if base else {}
        lfs_set = set(base.lfs) if base else set()
        for path, content in changes.items():
            if content is None:
                files.pop(path, None)
                lfs_set.discard(path)
            else:
                files[path] = content
        lfs_set = (lfs_set | set(lfs)) & set(files)
        timestamp = max((c.timestamp for c in self.commits), default=BASE_TIME) + 3600
        commit = make_commit(
            f"{self.repo_type}/{self.repo_id}",
            files,
            lfs=lfs_set,
            parent=base.sha if base else None,
            title=title,
            timestamp=timestamp,
        )
        self.commits.append(commit)
        self.refs[ref] = commit.sha
        return commit


def _seeded_bytes(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def _build_repo(
    repo_type: RepoType,
    repo_id: str,
    history: list[tuple[str, dict[str, bytes | None], set[str]]],
    *,
    private: bool = False,
    gated: bool = False,
) -> FakeRepo:
    repo = FakeRepo(repo_type, repo_id, [], {}, private=private, gated=gated)
    for title, changes, lfs in history:
        repo.push(changes, lfs=lfs, title=title)
    return repo


def standard_repos() -> list[FakeRepo]:
    """The repositories every HF test uses, generated deterministically (same shas every run).

    - ``acme/tiny-model`` (model), three commits:

      - v1 "initial": ``config.json`` (plain, 47 B), ``model.safetensors`` (LFS, 3 MiB of
        seeded random bytes, so downloads move real data), ``nested dir/with spaces/
        tokenizer.json`` (plain; spaces and a nested folder exercise URL encoding),
        ``README.md`` (plain).
      - v2 "v2": changes ``config.json`` (67 B) and adds ``generation_config.json``.
      - a PR commit on top of v2 that changes ``README.md`` and adds ``pr-notes.txt``.

      refs: ``main`` -> v2, tag ``v1.0`` -> v1, ``refs/pr/1`` -> the PR commit.
    - ``acme/data`` (dataset), one commit: ``data/train-00000.parquet`` (LFS, 200 KiB seeded
      random) and ``README.md``; ``main`` -> it.
    - ``acme/gated-model`` (model, ``gated``: metadata public, files need the token) and
      ``acme/private-model`` (model, ``private``: invisible without the token), one commit
      each: ``config.json`` (plain) and ``model.safetensors`` (LFS, 64 KiB); ``main`` -> it.

    The shas and sizes are stable: tests may print them, but should read them from the repo
    objects (``repo.head().sha``, ``repo.refs["v1.0"]``) rather than hard-code them.
    """
    weights = _seeded_bytes("acme/tiny-model/model.safetensors", 3 * MIB)
    tokenizer = _json_bytes({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}}})
    tiny = _build_repo(
        "model",
        "acme/tiny-model",
        [
            (
                "initial",
                {
                    "config.json": _json_bytes({"model_type": "tiny", "hidden_size": 8}),
                    "model.safetensors": weights,
                    "nested dir/with spaces/tokenizer.json": tokenizer,
                    "README.md": b"# tiny-model\n\nA tiny test model.\n",
                },
                {"model.safetensors"},
            ),
            (
                "v2",
                {
                    "config.json": _json_bytes(
                        {"model_type": "tiny", "hidden_size": 16, "num_layers": 2}
                    ),
                    "generation_config.json": _json_bytes({"max_new_tokens": 32}),
                },
                set(),
            ),
        ],
    )
    tiny.refs["v1.0"] = tiny.commits[0].sha
    tiny.refs["refs/pr/1"] = tiny.refs["main"]  # the PR branches off main
    tiny.push(
        {"README.md": b"# tiny-model\n\nProposed in PR #1.\n", "pr-notes.txt": b"pr 1\n"},
        ref="refs/pr/1",
        title="PR #1",
    )

    data = _build_repo(
        "dataset",
        "acme/data",
        [
            (
                "initial",
                {
                    "data/train-00000.parquet": _seeded_bytes("acme/data/train", 200 * 1024),
                    "README.md": b"# data\n\nA tiny test dataset.\n",
                },
                {"data/train-00000.parquet"},
            )
        ],
    )
    restricted = [
        _build_repo(
            "model",
            repo_id,
            [
                (
                    "initial",
                    {
                        "config.json": _json_bytes({"model_type": "tiny", "name": repo_id}),
                        "model.safetensors": _seeded_bytes(repo_id, 64 * 1024),
                    },
                    {"model.safetensors"},
                )
            ],
            gated=gated,
            private=not gated,
        )
        for repo_id, gated in (("acme/gated-model", True), ("acme/private-model", False))
    ]
    return [tiny, data, *restricted]


# --------------------------------------------------------------------------- HTTP helpers


@dataclass(frozen=True)
class SeenRequest:
    """One request as a server received it. ``path`` is the raw target, query included."""

    method: str
    path: str
    headers: dict[str, str]
    #: Which listener got it: ``"hub"`` or ``"cdn"`` (nodes use their name).
    site: str = "hub"

    def header(self, name: str) -> str | None:
        """A header's value, whatever the case the client spelled its name in."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), None)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range: bytes=...`` -> (first, last) inclusive, or None for the whole body.

    A header that is not a single byte range is ignored, as RFC 9110 allows. Raises
    ``web.HTTPRequestRangeNotSatisfiable`` for a range that starts past the end.
    """
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not match or not (match.group(1) or match.group(2)):
        return None
    first_s, last_s = match.groups()
    if not first_s:  # suffix range: the last N bytes
        count = int(last_s)
        if count == 0:
            raise _not_satisfiable(size)
        return max(0, size - count), size - 1
    first = int(first_s)
    last = min(int(last_s), size - 1) if last_s else size - 1
    if first >= size or first > last:
        raise _not_satisfiable(size)
    return first, last


def _not_satisfiable(size: int) -> web.HTTPRequestRangeNotSatisfiable:
    return web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})


def serve_bytes(
    request: web.Request, body: bytes, headers: Mapping[str, str] | None = None
) -> web.Response:
    """200 with the body, or 206 for a satisfiable ``Range``; HEAD gets the same headers."""
    out = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **(headers or {})}
    span = parse_range(request.headers.get("Range"), len(body))
    if span is None:
        return web.Response(body=body, headers=out)
    first, last = span
    out["Content-Range"] = f"bytes {first}-{last}/{len(body)}"
    return web.Response(status=206, body=body[first : last + 1], headers=out)


# --------------------------------------------------------------------------- the hub

_API_TYPES = "models|datasets|spaces"
_REPO_ID = r"[^/]+(?:/[^/]+)?"
_INFO_RE = re.compile(
    rf"/api/(?P<type>{_API_TYPES})/(?P<repo>{_REPO_ID})(?:/revision/(?P<rev>[^/]+))?"
)
_TREE_RE = re.compile(
    rf"/api/(?P<type>{_API_TYPES})/(?P<repo>{_REPO_ID})/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"
)
_PATHS_RE = re.compile(
    rf"/api/(?P<type>{_API_TYPES})/(?P<repo>{_REPO_ID})/paths-info/(?P<rev>[^/]+)"
)
_RESOLVE_RE = re.compile(
    rf"/(?:(?P<type>datasets|spaces)/)?(?P<repo>{_REPO_ID})/resolve/(?P<rev>[^/]+)/(?P<path>.+)"
)
_API_TYPE_NAMES: dict[str, RepoType] = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX_TYPE_NAMES: dict[str | None, RepoType] = {
    None: "model",
    "datasets": "dataset",
    "spaces": "space",
}


class HubError(Exception):
    """An error answer in huggingface.co's shape: ``X-Error-Code`` and ``X-Error-Message``."""

    def __init__(
        self, status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return web.json_response({"error": self.message}, status=self.status, headers=headers)


class FakeHub(ThreadedServer):
    """The local huggingface.co. See the module docstring for the endpoints.

    Switches (set them from the test at any time):

    - ``delay_s``: every request (hub and CDN) waits this long before it is answered.
    - ``failing``: every request fails: ``failure_mode="503"`` answers 503 (what a Hub outage
      looks like through its load balancer), ``"reset"`` drops the connection unanswered.
    - ``xet``: whether LFS answers carry the Xet bait (see the module docstring).
    - ``wrong_bytes``: sha256 digests of contents served with every byte flipped (same size),
      by resolve and by the CDN, while listings keep the true sizes and hashes.
    """

    thread_name = "fake-hub"

    def __init__(
        self,
        repos: Iterable[FakeRepo] | None = None,
        *,
        page_size: int = 2,
        xet: bool = True,
        valid_token: str = VALID_TOKEN,
    ) -> None:
        self.repos: list[FakeRepo] = list(standard_repos() if repos is None else repos)
        self.page_size = page_size
        self.xet = xet
        self.valid_token = valid_token
        self.delay_s = 0.0
        self.failing = False
        self.failure_mode: Literal["503", "reset"] = "503"
        self.wrong_bytes: set[str] = set()
        self.seen: list[SeenRequest] = []
        super().__init__()

    # ------------------------------------------------------------------ test-facing API

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['hub']}"

    @property
    def cdn_url(self) -> str:
        return f"http://{OTHER_HOST}:{self.ports['cdn']}"

    def repo(self, repo_id: str, repo_type: RepoType | None = None) -> FakeRepo:
        matches = [
            r for r in self.repos if r.repo_id == repo_id and repo_type in (None, r.repo_type)
        ]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} repos named {repo_id!r} (type {repo_type})")
        return matches[0]

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.valid_token}"}

    def requests_to(self, path_prefix: str, method: str | None = None) -> list[SeenRequest]:
        """Requests whose raw path starts with ``path_prefix`` (e.g. ``/api/models/acme``)."""
        return [
            r
            for r in list(self.seen)
            if r.path.startswith(path_prefix) and method in (None, r.method)
        ]

    def xet_requests(self) -> list[SeenRequest]:
        """Requests a client made because it believed a file was on Xet (must stay empty)."""
        return [r for r in list(self.seen) if "xet" in r.path.lower()]

    def cdn_requests(self) -> list[SeenRequest]:
        return [r for r in list(self.seen) if r.site == "cdn"]

    def clear_seen(self) -> None:
        self.seen.clear()

    def resolve_url(self, repo: FakeRepo, revision: str, path: str) -> str:
        """The URL a client builds, encoded as ``huggingface_hub.hf_hub_url`` does."""
        return (
            f"{self.url}/{repo.prefix}{repo.repo_id}/resolve/"
            f"{quote(revision, safe='')}/{quote(path)}"
        )

    # ------------------------------------------------------------------ server

    def _sites(self) -> dict[str, web.Application]:
        hub = web.Application()
        hub.router.add_route("*", "/{tail:.*}", self._handle_hub)
        cdn = web.Application()
        cdn.router.add_route("*", "/{tail:.*}", self._handle_cdn)
        return {"hub": hub, "cdn": cdn}

    async def _gate(self, request: web.Request, site: str) -> web.Response | None:
        """Record the request, then apply the delay and outage switches."""
        self.seen.append(SeenRequest(request.method, request.raw_path, dict(request.headers), site))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if not self.failing:
            return None
        if self.failure_mode == "reset" and request.transport is not None:
            request.transport.abort()
            raise asyncio.CancelledError  # nothing may be written to the aborted connection
        return web.json_response(
            {"error": "Service unavailable"},
            status=503,
            headers={"X-Error-Message": "Service unavailable"},
        )

    async def _handle_hub(self, request: web.Request) -> web.StreamResponse:
        failed = await self._gate(request, "hub")
        if failed is not None:
            return failed
        raw = request.rel_url.raw_path
        try:
            if raw.startswith("/api/"):
                return await self._api(request, raw)
            if match := _RESOLVE_RE.fullmatch(raw):
                return self._resolve(request, match)
        except HubError as error:
            return error.response()
        return web.Response(status=404, text="Not Found")

    async def _handle_cdn(self, request: web.Request) -> web.StreamResponse:
        failed = await self._gate(request, "cdn")
        if failed is not None:
            return failed
        match = re.fullmatch(r"/_cdn/([0-9a-f]{64})", request.rel_url.raw_path)
        body = self._blob_by_sha256(match.group(1)) if match else None
        if match is None or body is None:
            return web.Response(status=404, text="NoSuchKey")
        return serve_bytes(request, self._as_served(body), {"ETag": f'"{match.group(1)}"'})

    def _as_served(self, content: bytes) -> bytes:
        if sha256_hex(content) in self.wrong_bytes:
            return bytes(b ^ 0x5A for b in content)
        return content

    def _blob_by_sha256(self, digest: str) -> bytes | None:
        for repo in self.repos:
            for commit in repo.commits:
                for content in commit.files.values():
                    if sha256_hex(content) == digest:
                        return content
        return None

    # ------------------------------------------------------------------ access rules

    def _authorized(self, request: web.Request) -> bool:
        """Whether the request carries the valid token; a wrong token is an error of its own."""
        auth = request.headers.get("Authorization")
        if auth is None:
            return False
        if auth != f"Bearer {self.valid_token}":
            # huggingface.co's answer to a bad token, whatever the repo.
            raise HubError(401, None, "Invalid credentials in Authorization header")
        return True

    def _find(self, request: web.Request, repo_type: RepoType, repo_id: str) -> FakeRepo:
        authorized = self._authorized(request)
        for repo in self.repos:
            if repo.key == (repo_type, repo_id) and (authorized or not repo.private):
                return repo
        # Unknown and private-without-token look the same, as on huggingface.co.
        raise HubError(401, "RepoNotFound", "Repository not found")

    @staticmethod
    def _revision(repo: FakeRepo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    # ------------------------------------------------------------------ /api

    async def _api(self, request: web.Request, raw: str) -> web.Response:
        if request.method == "GET" and (match := _TREE_RE.fullmatch(raw)):
            return self._tree(request, match)
        if request.method == "POST" and (match := _PATHS_RE.fullmatch(raw)):
            return await self._paths_info(request, match)
        if request.method == "GET" and (match := _INFO_RE.fullmatch(raw)):
            return self._info(request, match)
        return web.json_response(
            {"error": "Sorry, we can't find the page you are looking for."}, status=404
        )

    def _repo_and_commit(
        self, request: web.Request, match: re.Match[str]
    ) -> tuple[FakeRepo, Commit]:
        repo = self._find(request, _API_TYPE_NAMES[match["type"]], unquote(match["repo"]))
        return repo, self._revision(repo, unquote(match["rev"] or "main"))

    def _info(self, request: web.Request, match: re.Match[str]) -> web.Response:
        repo, commit = self._repo_and_commit(request, match)
        blobs = request.query.get("blobs", "").lower() == "true"
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:  # huggingface.co adds these only when asked (files_metadata=True)
                sibling["size"] = commit.size(path)
                sibling["blobId"] = commit.blob_id(path)
                if commit.is_lfs(path):
                    sibling["lfs"] = {
                        "sha256": commit.sha256(path),
                        "size": commit.size(path),
                        "pointerSize": len(lfs_pointer(commit.files[path])),
                    }
            siblings.append(sibling)
        body: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.sha,
            "lastModified": iso_time(commit.timestamp),
            "createdAt": iso_time(repo.commits[0].timestamp),
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(c) for c in commit.files.values()),
        }
        if repo.repo_type == "model":
            body["modelId"] = repo.repo_id
        return web.json_response(body)

    def _entry(self, repo: FakeRepo, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
        if path not in commit.files:
            entry: dict[str, Any] = {
                "type": "directory",
                "oid": commit.tree_oid(path),
                "size": 0,
                "path": path,
            }
        else:
            entry = {
                "type": "file",
                "oid": commit.blob_id(path),
                "size": commit.size(path),
                "path": path,
            }
            if commit.is_lfs(path):
                entry["lfs"] = {
                    "oid": commit.sha256(path),
                    "size": commit.size(path),
                    "pointerSize": len(lfs_pointer(commit.files[path])),
                }
                if self.xet:
                    entry["xetHash"] = commit.xet_hash(path)
            if expand:
                entry["securityFileStatus"] = {
                    "status": "safe",
                    "avScan": {"virusFound": False},
                    "pickleImportScan": None,
                }
        if expand:
            last = repo.last_commit_touching(commit, path)
            entry["lastCommit"] = {
                "id": last.sha,
                "title": last.title,
                "date": iso_time(last.timestamp),
            }
        return entry

    def _tree(self, request: web.Request, match: re.Match[str]) -> web.Response:
        repo, commit = self._repo_and_commit(request, match)
        base = unquote(match["path"] or "").strip("/")
        if base and base not in commit.directories():
            raise HubError(
                404, "EntryNotFound", f"{base} does not exist on \"{commit.sha}\"",
                {"X-Repo-Commit": commit.sha},
            )  # fmt: skip
        recursive = request.query.get("recursive", "").lower() == "true"
        expand = request.query.get("expand", "").lower() == "true"
        inside = sorted(
            p for p in (*commit.directories(), *commit.files)
            if p.startswith(base + "/" if base else "")
            and (recursive or "/" not in p[len(base) + 1 if base else 0 :])
        )  # fmt: skip
        page_size = int(request.query.get("limit", self.page_size))
        offset = _decode_cursor(request.query.get("cursor"))
        page = inside[offset : offset + page_size]
        headers = {}
        if offset + page_size < len(inside):
            query = [(k, v) for k, v in request.query.items() if k != "cursor"]
            query.append(("cursor", _encode_cursor(offset + page_size)))
            next_url = f"{self.url}{request.rel_url.raw_path}?{urlencode(query)}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        entries = [self._entry(repo, commit, p, expand) for p in page]
        return web.json_response(entries, headers=headers)

    async def _paths_info(self, request: web.Request, match: re.Match[str]) -> web.Response:
        repo, commit = self._repo_and_commit(request, match)
        paths: list[str]
        if request.content_type == "application/json":
            payload = await request.json()
            paths = list(payload.get("paths", []))
            expand = str(payload.get("expand", "")).lower() == "true"
        else:
            form = await request.post()
            paths = [str(p) for p in form.getall("paths", [])]
            expand = str(form.get("expand", "")).lower() == "true"
        known = set(commit.files) | commit.directories()
        entries = [
            self._entry(repo, commit, p.strip("/"), expand) for p in paths if p.strip("/") in known
        ]
        return web.json_response(entries)

    # ------------------------------------------------------------------ /resolve

    def _resolve(self, request: web.Request, match: re.Match[str]) -> web.Response:
        repo = self._find(request, _PREFIX_TYPE_NAMES[match["type"]], unquote(match["repo"]))
        if repo.gated and not self._authorized(request):
            raise HubError(
                401,
                "GatedRepo",
                f"Access to {repo.repo_type} {repo.repo_id} is restricted. You must have access "
                "to it and be authenticated to access it. Please log in.",
            )
        commit = self._revision(repo, unquote(match["rev"]))
        path = unquote(match["path"])
        if path not in commit.files:
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if not commit.is_lfs(path):
            headers["ETag"] = f'"{commit.etag(path)}"'
            return serve_bytes(request, self._as_served(commit.files[path]), headers)
        location = f"{self.cdn_url}/_cdn/{commit.sha256(path)}"
        headers.update(
            {
                "Location": location,
                "ETag": f'"{commit.blob_id(path)}"',  # the pointer's: clients prefer X-Linked-Etag
                "X-Linked-Etag": f'"{commit.sha256(path)}"',
                "X-Linked-Size": str(commit.size(path)),
            }
        )
        if self.xet:
            token_url = (
                f"{self.url}/api/{repo.repo_type}s/{repo.repo_id}/xet-read-token/{commit.sha}"
            )
            headers["X-Xet-Hash"] = commit.xet_hash(path)
            headers["Link"] = (
                f'<{token_url}>; rel="xet-auth", '
                f"<{self.url}/_xet/reconstruction/{commit.xet_hash(path)}>; "
                'rel="xet-reconstruction-info"'
            )
        return web.Response(status=302, text=f"Found. Redirecting to {location}", headers=headers)


def _encode_cursor(offset: int) -> str:
    # Opaque like huggingface.co's cursors, so nothing outside the hub relies on its format.
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def _decode_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        return int(json.loads(base64.urlsafe_b64decode(cursor.encode()))["offset"])
    except (ValueError, KeyError, TypeError) as error:
        raise HubError(400, None, f"invalid cursor: {error}") from error


# Re-exported for tests that build their own repositories.
__all__ = [
    "VALID_TOKEN",
    "Commit",
    "FakeHub",
    "FakeRepo",
    "SeenRequest",
    "git_blob_sha1",
    "lfs_pointer",
    "make_commit",
    "parse_range",
    "serve_bytes",
    "sha256_hex",
    "standard_repos",
    "xet_hash",
]
