"""A local hub that also serves its repositories over git, as huggingface.co does.

``GitHub`` is a ``FakeHub`` whose public repositories also exist as bare git repositories on
disk, built from the same commits with ``git fast-import`` (LFS files committed as their
pointers, with a ``.gitattributes`` naming them, as git-lfs writes them), and served with
Debian's ``git http-backend`` as a CGI program:

- ``GET /{prefix}{repo}[.git]/info/refs?service=git-upload-pack`` and
  ``POST /{prefix}{repo}[.git]/git-upload-pack``: git's smart HTTP.
- ``POST /{prefix}{repo}.git/info/lfs/objects/batch``: the git-lfs batch API, each object's
  download href at the hub's CDN (``/_cdn/{sha256}``), as huggingface.co answers it.

Git commit ids differ from the API's (``Commit.sha`` is a stand-in, not a git hash): a test
names refs, never commits, across the two.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from functools import partial
from pathlib import Path

from aiohttp import web
from fake_hub import TYPE_PREFIX, FakeHub, FakeRepo, lfs_pointer, sha256_hex

_GIT_RE = re.compile(
    r"/(?P<repo>(?:datasets/|spaces/)?[^/]+(?:/[^/]+)?)"
    r"/(?P<rest>info/refs|git-upload-pack|info/lfs/objects/batch)"
)
_GIT_TIMEOUT_S = 30
_COMMITTER = "Hub <hub@hub.test>"


def _fast_import_stream(repo: FakeRepo) -> bytes:
    """The repository's commits as a ``git fast-import`` stream, refs included."""
    out: list[bytes] = []
    marks = {commit.sha: index for index, commit in enumerate(repo.commits, 1)}

    def data(payload: bytes) -> None:
        out.append(b"data %d\n%s\n" % (len(payload), payload))

    for commit in repo.commits:
        out.append(b"commit refs/hub/all\nmark :%d\n" % marks[commit.sha])
        out.append(f"committer {_COMMITTER} {int(commit.timestamp)} +0000\n".encode())
        data((commit.title or "commit").encode())
        if commit.parent:
            out.append(b"from :%d\n" % marks[commit.parent])
        out.append(b"deleteall\n")
        files = dict(commit.files)
        for path in commit.lfs:
            files[path] = lfs_pointer(commit.files[path])
        if commit.lfs:
            lines = [f"{p.replace(' ', '[[:space:]]')} filter=lfs diff=lfs merge=lfs -text"
                     for p in sorted(commit.lfs)]  # fmt: skip
            files[".gitattributes"] = ("\n".join(lines) + "\n").encode()
        for path, content in sorted(files.items()):
            out.append(f'M 100644 inline "{path}"\n'.encode())
            data(content)
    for name, sha in repo.refs.items():
        ref = name if name.startswith("refs/") else f"refs/heads/{name}"
        out.append(f"reset {ref}\nfrom :{marks[sha]}\n\n".encode())
    return b"".join(out)


def build_bare_repo(repo: FakeRepo, directory: Path) -> None:
    for args, stdin in (
        (["init", "-q", "--bare", "-b", "main", str(directory)], None),
        (["-C", str(directory), "fast-import", "--quiet"], _fast_import_stream(repo)),
    ):
        subprocess.run(
            ["git", *args], input=stdin, check=True, capture_output=True, timeout=_GIT_TIMEOUT_S
        )


class GitHub(FakeHub):
    """A ``FakeHub`` that also serves git and the git-lfs batch API; see the module docstring."""

    def __init__(self, repos: Iterable[FakeRepo] | None = None, **kwargs: object) -> None:
        self._git_root = Path(tempfile.mkdtemp(prefix="git-hub-"))
        super().__init__(repos, **kwargs)  # type: ignore[arg-type]
        for repo in self.repos:
            if not (repo.private or repo.gated):
                build_bare_repo(repo, self._git_root / f"{repo.prefix}{repo.repo_id}.git")

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self._git_root, ignore_errors=True)

    def git_requests(self) -> list[str]:
        """Paths of the git requests the hub got (smart HTTP and LFS batch)."""
        return [r.path for r in list(self.seen) if _GIT_RE.fullmatch(r.path.split("?")[0])]

    async def _handle_hub(self, request: web.Request) -> web.StreamResponse:
        match = _GIT_RE.fullmatch(request.rel_url.raw_path)
        if match is None:
            return await super()._handle_hub(request)
        failed = await self._gate(request, "hub")
        if failed is not None:
            return failed
        repo = self._git_repo(match["repo"])
        if repo is None:
            return web.json_response({"message": "Repository not found"}, status=404)
        if match["rest"] == "info/lfs/objects/batch":
            return self._lfs_batch(repo, await request.read())
        return await self._http_backend(request, repo, match["rest"])

    def _git_repo(self, name: str) -> FakeRepo | None:
        for repo in self.repos:
            if f"{repo.prefix}{repo.repo_id}" == name.removesuffix(".git") and not (
                repo.private or repo.gated
            ):
                return repo
        return None

    def _lfs_batch(self, repo: FakeRepo, body: bytes) -> web.Response:
        objects = []
        for item in json.loads(body)["objects"]:
            content = self._blob_by_sha256(item["oid"])
            entry = {"oid": item["oid"], "size": item["size"]}
            if content is None or len(content) != item["size"]:
                entry["error"] = {"code": 404, "message": "Object does not exist"}
            else:
                href = f"{self.cdn_url}/_cdn/{sha256_hex(content)}"
                entry["actions"] = {"download": {"href": href, "expires_in": 3600}}
            objects.append(entry)
        return web.json_response(
            {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json"
        )

    async def _http_backend(
        self, request: web.Request, repo: FakeRepo, rest: str
    ) -> web.StreamResponse:
        body = await request.read()
        env = {
            "GIT_PROJECT_ROOT": str(self._git_root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": f"/{TYPE_PREFIX[repo.repo_type]}{repo.repo_id}.git/{rest}",
            "REQUEST_METHOD": request.method,
            "QUERY_STRING": request.query_string,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1",
            "PATH": "/usr/bin:/bin",
        }
        for header in ("Content-Encoding", "Git-Protocol"):
            if header in request.headers:
                env["HTTP_" + header.upper().replace("-", "_")] = request.headers[header]
        cgi = await asyncio.get_running_loop().run_in_executor(
            None,
            partial(
                subprocess.run, ["git", "http-backend"], input=body, env=env,
                capture_output=True, timeout=_GIT_TIMEOUT_S, check=False,
            ),
        )  # fmt: skip
        # CGI headers end at the first blank line, with or without carriage returns.
        ends = [(cgi.stdout.find(sep), sep) for sep in (b"\r\n\r\n", b"\n\n")]
        end, separator = min((i, sep) for i, sep in ends if i >= 0)
        head, payload = cgi.stdout[:end], cgi.stdout[end + len(separator) :]
        status, headers = 200, {}
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers[name] = value.strip()
        return web.Response(status=status, body=payload, headers=headers)
