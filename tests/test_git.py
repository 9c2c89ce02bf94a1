"""git clone and git-lfs through the gateway, with Debian's real git and git-lfs.

Upstream serves git with ``git http-backend`` and the git-lfs batch API (tests/git_hub.py). The
gateway passes git's smart HTTP to upstream and answers the batch API itself, with hrefs at the
node the client is routed to: the LFS bytes come from the node, checked against their oid.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import lfs_pointer
from git_hub import GitHub
from tool_world import ToolWorld, report, tool_world

from gateway.hf.git import GitPath, LfsError, LfsObject, parse_batch, parse_git_path
from gateway.hf.paths import PathError

TINY = "acme/tiny-model"
WEIGHTS = "model.safetensors"
LFS_TYPE = "application/vnd.git-lfs+json"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToolWorld]:
    with GitHub() as hub, tool_world(tmp_path_factory.mktemp("git"), hub=hub) as world:
        yield world


def git(home: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run git with ``home`` as HOME (git-lfs installed there), failing the test on an error."""
    run = subprocess.run(
        ["git", *args], capture_output=True, text=True, timeout=60, check=False, cwd=home,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "LC_ALL": "C",
             "GIT_TERMINAL_PROMPT": "0", **(env or {})},
    )  # fmt: skip
    assert run.returncode == 0, report(run)
    return run.stdout


@pytest.fixture
def home(tmp_path: Path) -> Path:
    git(tmp_path, "lfs", "install", "--skip-repo")
    return tmp_path


def lfs_downloads(world: ToolWorld) -> list[str]:
    return [r.path for r in world.downloads("own") if "git-lfs" in (r.header("User-Agent") or "")]


def assert_lfs_file(world: ToolWorld, checkout: Path, repo_id: str, path: str) -> None:
    expected = world.hub.repo(repo_id).head().files[path]
    got = (checkout / path).read_bytes()
    # The oid git-lfs asked for is the sha256 of what it wrote.
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert got == expected


@pytest.mark.parametrize("suffix", ["", ".git"])
def test_clone_with_lfs_takes_lfs_files_from_the_node(
    world: ToolWorld, home: Path, suffix: str
) -> None:
    world.clear_logs()
    git(home, "clone", "-q", f"{world.endpoint}/{TINY}{suffix}", "repo")
    checkout = home / "repo"
    head = world.hub.repo(TINY).head()
    for path in head.files:
        assert (checkout / path).read_bytes() == head.files[path], path
    assert_lfs_file(world, checkout, TINY, WEIGHTS)
    assert [p for p in lfs_downloads(world) if p.endswith(f"/{WEIGHTS}")], "not from the node"
    assert not world.hub.cdn_requests(), "LFS content came from upstream's CDN"
    # Git itself went to upstream through the gateway.
    assert any(p.endswith("/git-upload-pack") for p in world.hub.git_requests())
    assert not any("lfs" in p for p in world.hub.git_requests()), "upstream answered the batch"


def test_skip_smudge_then_lfs_pull(world: ToolWorld, home: Path) -> None:
    world.clear_logs()
    url = f"{world.endpoint}/{TINY}.git"
    git(home, "clone", "-q", url, "repo", env={"GIT_LFS_SKIP_SMUDGE": "1"})
    checkout = home / "repo"
    weights = world.hub.repo(TINY).head().files[WEIGHTS]
    assert (checkout / WEIGHTS).read_bytes() == lfs_pointer(weights)
    assert lfs_downloads(world) == []
    git(checkout, "lfs", "pull")
    assert_lfs_file(world, checkout, TINY, WEIGHTS)
    assert [p for p in lfs_downloads(world) if p.endswith(f"/{WEIGHTS}")]


def test_clone_a_dataset(world: ToolWorld, home: Path) -> None:
    world.clear_logs()
    git(home, "clone", "-q", f"{world.endpoint}/datasets/acme/data", "data")
    assert_lfs_file(world, home / "data", "acme/data", "data/train-00000.parquet")
    assert [p for p in lfs_downloads(world) if p.startswith("/datasets/acme/data/resolve/")]


def test_objects_the_catalog_does_not_list_are_left_to_upstream(world: ToolWorld) -> None:
    world.clear_logs()
    unknown = {"oid": "0" * 64, "size": 3}
    status, _, body = post(world, f"/{TINY}.git/info/lfs/objects/batch", batch([unknown]))
    assert status == 200
    assert json.loads(body)["objects"][0]["error"]["code"] == 404
    assert any(p.endswith("/info/lfs/objects/batch") for p in world.hub.git_requests())


# --------------------------------------------------------------------------- bad input


def batch(objects: list[dict[str, object]], operation: str = "download") -> bytes:
    return json.dumps({"operation": operation, "objects": objects}).encode()


def post(world: ToolWorld, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", world.gateway.port, timeout=30)
    try:
        connection.request("POST", path, body, {"Content-Type": LFS_TYPE})
        response = connection.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        (f"/{TINY}.git/info/lfs/objects/batch", b"{not json", 422, "bad_lfs_batch"),
        (f"/{TINY}.git/info/lfs/objects/batch", batch([{"oid": "x", "size": 1}]), 422,
         "bad_lfs_batch"),
        (f"/{TINY}.git/info/lfs/objects/batch", batch([{"oid": "a" * 64, "size": 1}], "upload"),
         403, "bad_lfs_batch"),
        (f"/{TINY}.git/git-receive-pack", b"0000", 403, "read_only"),
        ("/a--b/c.git/git-upload-pack", b"0000", 400, "invalid_repo_id"),
        ("/a/b/c/d.git/info/refs", b"", 400, "invalid_repo_id"),
        ("/acme/%2e%2e/git-upload-pack", b"0000", 400, "path_traversal"),
        (f"/{TINY}.git/info/lfs/objects/batch", b"x" * 9_000_000, 413, "request_too_large"),
    ],
)  # fmt: skip
def test_bad_git_requests_get_json_errors(
    world: ToolWorld, path: str, body: bytes, status: int, code: str
) -> None:
    got, headers, payload = post(world, path, body)
    assert (got, json.loads(payload)["error"]) == (status, code)
    assert headers["content-type"].startswith("application/json")


def test_dumb_http_and_push_discovery_are_refused(world: ToolWorld) -> None:
    for query, code in (("", "smart_http_only"), ("?service=git-receive-pack", "read_only")):
        status, _, body = world.gateway.get(f"/{TINY}/info/refs{query}")
        assert (status, json.loads(body)["error"]) == (403, code)


# --------------------------------------------------------------------------- pure parsing


@pytest.mark.parametrize(
    ("path", "parsed"),
    [
        ("/acme/m/info/refs", GitPath("model", "acme/m", "info_refs")),
        ("/acme/m.git/git-upload-pack", GitPath("model", "acme/m", "upload_pack")),
        ("/gpt2.git/info/refs", GitPath("model", "gpt2", "info_refs")),
        ("/datasets/acme/d.git/info/lfs/objects/batch", GitPath("dataset", "acme/d", "lfs_batch")),
        ("/spaces/acme/s/info/refs", GitPath("space", "acme/s", "info_refs")),
        # A repository's own file named info/refs is a file.
        ("/acme/m/resolve/main/info/refs", None),
        ("/acme/m/tree/main", None),
    ],
)
def test_parse_git_path(path: str, parsed: GitPath | None) -> None:
    assert parse_git_path(path) == parsed


def test_upstream_path_is_rebuilt_from_parts() -> None:
    parsed = parse_git_path("/datasets/acme/d/info/refs")
    assert parsed is not None and parsed.upstream_path() == "/datasets/acme/d.git/info/refs"
    with pytest.raises(PathError, match="invalid"):
        parse_git_path("/acme/a%20b/info/refs")


def test_parse_batch() -> None:
    body = {"operation": "download", "ref": {"name": "refs/heads/v2"},
            "objects": [{"oid": "a" * 64, "size": 5}]}  # fmt: skip
    parsed = parse_batch(json.dumps(body).encode())
    assert (parsed.ref, parsed.objects) == ("v2", (LfsObject("a" * 64, 5),))
    with pytest.raises(LfsError, match="objects"):
        parse_batch(b'{"operation": "download", "objects": []}')
