"""A local HF-compatible upstream: just the two API calls the gateway's catalog makes.

- ``GET /api/models/{org}/{name}/revision/{revision}``: ``{"id", "sha", "private", "gated"}``.
- ``GET /api/models/{org}/{name}/tree/{commit}?recursive=true``: every file in one page, with
  ``oid`` (git blob sha1) and ``size``, and for LFS files ``lfs: {oid (sha256), size}``.
- ``GET /_stats``: how many of each call were answered, so the benchmark can check that the
  catalog was filled from here.

Repositories are generated, not stored: ``bench-org/model-0000`` onwards, each with ``files``
files, one in five a plain JSON file and the rest LFS shards. Every sha derives from the names,
so the benchmark knows the answers without asking. tests/fake_hub.py is the full-featured hub
of the test suite; it holds file contents and needs the tests directory on ``sys.path``, which
is more than metadata for 100,000 files calls for.

Run: ``python -m bench_support.hub --port P --repos R --files F`` (``scripts`` on the path).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
from typing import Any

from aiohttp import web

ORG = "bench-org"
REVISION = "main"
#: One file in this many is a plain git file; the others are LFS.
PLAIN_EVERY = 5


def repo_id(index: int) -> str:
    return f"{ORG}/model-{index:04d}"


def commit_of(repo: str) -> str:
    return hashlib.sha1(f"{repo}@{REVISION}".encode()).hexdigest()


def file_name(index: int) -> str:
    if index % PLAIN_EVERY == 0:
        return f"config-{index:03d}.json"
    return f"model-{index:03d}.safetensors"


def resolve_path(repo: str, revision: str, file_index: int) -> str:
    return f"/{repo}/resolve/{revision}/{file_name(file_index)}"


@functools.lru_cache(maxsize=4096)
def tree(repo: str, files: int) -> tuple[dict[str, Any], ...]:
    entries = []
    for index in range(files):
        name = file_name(index)
        digest = hashlib.sha256(f"{repo}/{name}".encode()).hexdigest()
        if index % PLAIN_EVERY == 0:
            size = 500 + index
            entries.append({"type": "file", "path": name, "size": size, "oid": digest[:40]})
        else:
            size = 2_000_000_000 + index * 1_000_003
            entries.append(
                {
                    "type": "file",
                    "path": name,
                    "size": size,
                    "oid": hashlib.sha1(digest.encode()).hexdigest(),
                    "lfs": {"oid": digest, "size": size, "pointerSize": 134},
                }
            )
    return tuple(entries)


def _not_found(code: str, message: str) -> web.Response:
    return web.json_response({"error": message}, status=404, headers={"X-Error-Code": code})


def make_app(repos: int, files: int) -> web.Application:
    known = {repo_id(i) for i in range(repos)}
    stats = {"revision": 0, "tree": 0}

    def lookup(request: web.Request) -> tuple[str | None, web.Response | None]:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo not in known:
            return None, _not_found("RepoNotFound", f"repository {repo} not found")
        revision = request.match_info["revision"]
        if revision not in (REVISION, commit_of(repo)):
            return None, _not_found("RevisionNotFound", f"revision {revision} not found")
        return repo, None

    async def revision_info(request: web.Request) -> web.Response:
        repo, error = lookup(request)
        if repo is None:
            assert error is not None
            return error
        stats["revision"] += 1
        return web.json_response(
            {"id": repo, "sha": commit_of(repo), "private": False, "gated": False}
        )

    async def tree_listing(request: web.Request) -> web.Response:
        repo, error = lookup(request)
        if repo is None:
            assert error is not None
            return error
        stats["tree"] += 1
        return web.json_response(list(tree(repo, files)))

    async def stats_endpoint(request: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application()
    base = "/api/models/{org}/{name}"
    app.router.add_get(base + "/revision/{revision}", revision_info)
    app.router.add_get(base + "/tree/{revision}", tree_listing)
    app.router.add_get("/_stats", stats_endpoint)
    app.router.add_get("/healthz", stats_endpoint)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--repos", type=int, required=True)
    parser.add_argument("--files", type=int, required=True)
    args = parser.parse_args()
    # run_app stops cleanly on SIGTERM and SIGINT.
    web.run_app(
        make_app(args.repos, args.files),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
