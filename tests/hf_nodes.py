"""Hugging Face mirror nodes on loopback: what the gateway redirects clients to.

An ``HfMirrorNode`` is a plain file server for the resolve URLs of the commits it holds, in its
own thread and event loop (see ``threaded_server.ThreadedServer``). It takes the bytes from a
``FakeHub``'s in-process data model, so it needs no network to "sync":

- ``mode="mirror"``: serves exactly the commits it holds (``holds``; by default every commit of
  every public repo the hub has when the node starts) and 404s anything else.
- ``mode="cache"``: pull-through: serves any commit of a public repo, recording a cache miss
  the first time it serves a file, which it then holds. Private and gated repos are never
  fetched (a cache has no token), so they 404 unless held explicitly.

A node's ``url`` names the host ``localhost`` (it listens on 127.0.0.1): huggingface_hub 1.33
follows a HEAD redirect to the same host name whatever the port, and would then read the file
metadata from the node's answer instead of the gateway's redirect, and send the token along.

Nodes publish what they hold at ``GET /manifest.json`` in the format the gateway's sync module
parses (see ``manifest()``), answer ``/health`` (and ``/``, the default probe path), and record
every request in ``seen``. ``corrupt(path)`` makes a node serve wrong bytes of the same size,
so the gateway's verification (and a Metalink client's piece check) has something to catch.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from aiohttp import web
from fake_hub import (
    OTHER_HOST,
    TYPE_PREFIX,
    Commit,
    FakeHub,
    FakeRepo,
    SeenRequest,
    serve_bytes,
)
from threaded_server import ThreadedServer

RepoKey = tuple[str, str]  # (repo_type, repo_id)
NodeMode = Literal["mirror", "cache"]

_NOT_HERE = "not on this node"
_SERVICE_PATHS = ("/", "/health", "/load", "/manifest.json")


def _is_sha(revision: str) -> bool:
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


class HfMirrorNode(ThreadedServer):
    """A mirror or pull-through cache node for HF resolve URLs.

    Args:
        name: the node's name (in its manifest and its thread's name).
        hub: where the bytes come from.
        holds: ``{(repo_type, repo_id): [sha, ...]}`` held from the start (whole commits). None:
            a mirror holds every commit of every public repo of the hub; a cache holds nothing.
        mode: ``"mirror"`` or ``"cache"`` (see the module docstring).
        synced_at: when each held commit was synced (unix time), for the manifest: one time for
            all, ``{sha: time}``, or None for "when the node took it".
        refs: ``{(repo_type, repo_id): {ref: sha}}`` the node publishes; None: for each branch
            and tag of the hub, the newest held commit in that ref's history.
        generated_at: the manifest's ``generated_at``; None: the time of each request.
        piece_length: publish the sha256 of every piece of this many bytes of each file (the
            manifest's optional ``pieces``); None: no piece hashes.
    """

    thread_name = "hf-node"

    def __init__(
        self,
        name: str,
        hub: FakeHub,
        holds: Mapping[RepoKey, Iterable[str]] | None = None,
        *,
        mode: NodeMode = "mirror",
        synced_at: float | Mapping[str, float] | None = None,
        refs: Mapping[RepoKey, Mapping[str, str]] | None = None,
        generated_at: float | None = None,
        piece_length: int | None = None,
    ) -> None:
        self.name = name
        self.piece_length = piece_length
        self.hub = hub
        self.mode = mode
        self.refs_override = {k: dict(v) for k, v in refs.items()} if refs is not None else None
        self.generated_at = generated_at
        self._synced_default = synced_at
        #: key -> sha -> (paths held, synced_at). Tests change it while the server thread
        #: reads it (a gateway polling the manifest): every access holds the lock.
        self._held: dict[RepoKey, dict[str, tuple[set[str], float]]] = {}
        self._lock = threading.RLock()
        self._corrupt: set[str] = set()
        self.seen: list[SeenRequest] = []
        #: (repo_type, repo_id, sha, path) of each file a cache node fetched, in order.
        self.cache_misses: list[tuple[str, str, str, str]] = []
        self.health_status = 200
        self.delay_s = 0.0
        self.failing = False
        self.publish_manifest = True
        self.load: dict[str, Any] | None = None
        if holds is None:
            holds = (
                {r.key: [c.sha for c in r.commits] for r in hub.repos if not (r.private or r.gated)}
                if mode == "mirror"
                else {}
            )
        for key, shas in holds.items():
            self._held.setdefault(key, {})  # tracked, even while no commit is held
            for sha in shas:
                self.hold(key, sha)
        self.thread_name = f"hf-node-{name}"
        super().__init__()

    # ------------------------------------------------------------------ test-facing API

    @property
    def url(self) -> str:
        """The node's base URL, on host ``localhost``: see ``fake_hub.OTHER_HOST`` for why a
        node must not share the gateway's host name ``127.0.0.1``."""
        return f"http://{OTHER_HOST}:{self.ports['node']}"

    @property
    def ip_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['node']}"

    @property
    def manifest_url(self) -> str:
        return f"{self.url}/manifest.json"

    def hold(
        self, key: RepoKey, sha: str, *, paths: Iterable[str] | None = None, at: float | None = None
    ) -> None:
        """Take (part of) a commit, as if the node had synced it; ``at`` is its ``synced_at``."""
        commit = self._repo(key).commit(sha)  # KeyError for a commit the hub does not have
        wanted = set(commit.files if paths is None else paths)
        unknown = wanted - set(commit.files)
        if unknown:
            raise KeyError(f"{sorted(unknown)} not in {key[1]}@{sha}")
        with self._lock:
            previous = self._held.setdefault(key, {}).get(sha)
            if at is None and previous is not None:
                at = previous[1]  # more files of a commit already held: synced back then
            if at is None:
                default = self._synced_default
                at = default.get(sha) if isinstance(default, Mapping) else default
            held_paths = previous[0] if previous is not None else set()
            self._held[key][sha] = (held_paths | wanted, at if at is not None else time.time())

    def drop(self, key: RepoKey, sha: str) -> None:
        """Forget a commit, as if the node had pruned it."""
        with self._lock:
            self._held.get(key, {}).pop(sha, None)

    def held(self, key: RepoKey) -> dict[str, set[str]]:
        with self._lock:
            return {sha: set(paths) for sha, (paths, _) in self._held.get(key, {}).items()}

    def corrupt(self, path: str) -> None:
        """Serve wrong bytes (same size) for ``path`` in every repo and commit from now on."""
        self._corrupt.add(path)

    def heal(self, path: str | None = None) -> None:
        if path is None:
            self._corrupt.clear()
        else:
            self._corrupt.discard(path)

    def downloads(self) -> list[SeenRequest]:
        """Requests for files (not health, load or manifest)."""
        return [r for r in list(self.seen) if r.path.split("?")[0] not in _SERVICE_PATHS]

    def saw_authorization(self) -> bool:
        """Whether any request carried an ``Authorization`` header: a token left the gateway."""
        return any(r.header("Authorization") is not None for r in list(self.seen))

    def manifest(self) -> dict[str, Any]:
        """What ``GET /manifest.json`` answers: the format the gateway's sync module parses.

        ``{"node": name, "generated_at": t, "repos": [{"type": "model", "id": "acme/x",
        "refs": {"main": sha}, "commits": {sha: {"synced_at": t, "files": [{"path": p,
        "size": n, "sha256": hex}]}}}]}``, files with ``"pieces": {"length": n, "sha256": [hex,
        ...]}`` when the node has a ``piece_length``. Sizes and hashes are of the TRUE content,
        also for a corrupted file: the node does not know it serves bad bytes.
        """
        with self._lock:
            return self._manifest()

    def _manifest(self) -> dict[str, Any]:
        repos = []
        for key in sorted(self._held):
            repo = self._repo(key)
            commits = {}
            for sha, (paths, synced_at) in sorted(self._held[key].items()):
                commit = repo.commit(sha)
                files = [self._file_entry(commit, p) for p in sorted(paths)]
                commits[sha] = {"synced_at": synced_at, "files": files}
            repos.append(
                {"type": key[0], "id": key[1], "refs": self._refs(repo), "commits": commits}
            )
        generated_at = self.generated_at if self.generated_at is not None else time.time()
        return {"node": self.name, "generated_at": generated_at, "repos": repos}

    # ------------------------------------------------------------------ internals

    def _file_entry(self, commit: Commit, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "path": path,
            "size": commit.size(path),
            "sha256": commit.sha256(path),
        }
        length = self.piece_length
        if length is not None:
            body = commit.files[path]
            hashes = [
                hashlib.sha256(body[i : i + length]).hexdigest()
                for i in range(0, len(body), length)
            ]
            entry["pieces"] = {"length": length, "sha256": hashes}
        return entry

    def _repo(self, key: RepoKey) -> FakeRepo:
        for repo in self.hub.repos:
            if repo.key == key:
                return repo
        raise KeyError(f"the hub has no {key[0]} {key[1]}")

    def _refs(self, repo: FakeRepo) -> dict[str, str]:
        if self.refs_override is not None:
            return dict(self.refs_override.get(repo.key, {}))
        with self._lock:
            held = set(self._held.get(repo.key, {}))
        refs = {}
        for ref, sha in sorted(repo.refs.items()):
            if ref.startswith("refs/pr/"):
                continue  # mirrors sync branches and tags, not pull requests
            for commit in repo.ancestors(repo.commit(sha)):
                if commit.sha in held:
                    refs[ref] = commit.sha
                    break
        return refs

    def _sites(self) -> dict[str, web.Application]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return {"node": app}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            SeenRequest(request.method, request.raw_path, dict(request.headers), self.name)
        )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        path = request.rel_url.raw_path
        if path in ("/", "/health"):
            return web.Response(status=self.health_status, text="ok")
        if self.failing:
            return web.Response(status=503, text="node failing")
        if path == "/load":
            return web.json_response(self.load) if self.load is not None else _not_found()
        if path == "/manifest.json":
            return web.json_response(self.manifest()) if self.publish_manifest else _not_found()
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405)
        found = self._lookup(request.path)
        if found is None:
            return _not_found()
        commit, file_path = found
        body = commit.files[file_path]
        if file_path in self._corrupt:
            body = bytes(b ^ 0x5A for b in body)
        return serve_bytes(request, body, {"ETag": f'"{commit.etag(file_path)}"'})

    def _lookup(self, decoded_path: str) -> tuple[Commit, str] | None:
        """The commit and file a resolve path names, if this node serves it (taking it if a cache).

        ``decoded_path`` is percent-decoded: a revision with a slash (``refs/pr/1``) cannot be
        told apart, which is fine: nodes serve commits by sha, and branch or tag names via the
        refs the node publishes.
        """
        with self._lock:
            return self._lookup_locked(decoded_path)

    def _lookup_locked(self, decoded_path: str) -> tuple[Commit, str] | None:
        for repo in self.hub.repos:
            start = f"/{TYPE_PREFIX[repo.repo_type]}{repo.repo_id}/resolve/"
            if not decoded_path.startswith(start):
                continue
            revision, _, file_path = decoded_path[len(start) :].partition("/")
            sha = revision if _is_sha(revision) else self._refs(repo).get(revision)
            if sha is None or not file_path:
                return None
            held = self._held.get(repo.key, {}).get(sha)
            if held is not None and file_path in held[0]:
                return repo.commit(sha), file_path
            if self.mode != "cache" or repo.private or repo.gated:
                return None
            commit = repo.resolve(sha)
            if commit is None or file_path not in commit.files:
                return None
            self.cache_misses.append((repo.repo_type, repo.repo_id, sha, file_path))
            self.hold(repo.key, sha, paths=[file_path])
            return commit, file_path
        return None


def _not_found() -> web.Response:
    return web.Response(status=404, text=_NOT_HERE)


def node_entry(
    node_id: str, node: HfMirrorNode, lat: float, lon: float, asns: list[int], **extra: Any
) -> dict[str, Any]:
    return {
        "id": node_id,
        "url": node.url,
        "country": "CN",
        "latitude": lat,
        "longitude": lon,
        "asns": asns,
        "serves": {"countries": ["CN"]},
        "manifest_url": node.manifest_url,
        **extra,
    }
