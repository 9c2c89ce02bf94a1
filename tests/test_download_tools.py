"""aria2c, wget and hfd.sh's way of using them, run for real against a gateway process.

aria2c sends ``Accept: */*,application/metalink4+xml,application/metalink+xml`` on every
request; that header must get the redirect, or aria2c saves a Metalink document under the
file's name. Each test checks the files on disk byte for byte, and that the node (not upstream)
served them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_hub import Commit
from hfd_flow import Tool, hfd
from tool_world import ToolWorld, report, run_tool, tool_world

TINY = "acme/tiny-model"
DATA = "acme/data"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToolWorld]:
    with tool_world(tmp_path_factory.mktemp("tools")) as world:
        yield world


@pytest.fixture
def fresh(world: ToolWorld) -> ToolWorld:
    world.clear_logs()
    return world


def commit_of(world: ToolWorld, repo_id: str, revision: str = "main") -> Commit:
    commit = world.hub.repo(repo_id).resolve(revision)
    assert commit is not None
    return commit


def files_in(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (hfd's ``.hfd`` bookkeeping aside), by relative path."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file() and ".hfd" not in p.relative_to(directory).parts
    }


def paths_by(world: ToolWorld, server: str, agent: str) -> list[str]:
    """Paths of the file requests ``server`` got from the tool whose User-Agent starts so."""
    return [
        r.path for r in world.downloads(server) if (r.header("User-Agent") or "").startswith(agent)
    ]


def assert_served_by_node(world: ToolWorld, names: list[str], agent: str) -> None:
    """Every file came from the node, none from upstream or its CDN."""
    served = paths_by(world, "own", agent)
    for name in names:
        leaf = name.rsplit("/", 1)[-1].replace(" ", "%20")
        assert any(p.endswith("/" + leaf) for p in served), f"the node did not serve {name}"
    assert paths_by(world, "hub", agent) == [], "a download went upstream"


def aria2c(*args: str) -> list[str]:
    """aria2c as a user types it, without a config file of theirs."""
    return ["aria2c", "--no-conf=true", "--console-log-level=warn", "--summary-interval=0", *args]


# --------------------------------------------------------------------------- aria2c alone


@pytest.mark.parametrize("path", ["config.json", WEIGHTS])
def test_aria2c_url_saves_the_file_under_its_own_name(
    fresh: ToolWorld, tmp_path: Path, path: str
) -> None:
    run = run_tool(aria2c(f"{fresh.endpoint}/{TINY}/resolve/main/{path}"), cwd=tmp_path)
    assert run.returncode == 0, report(run)
    # Not the Metalink as config.json and the file as config.1.json.
    assert files_in(tmp_path) == {path: commit_of(fresh, TINY).files[path]}
    assert_served_by_node(fresh, [path], "aria2")


def test_aria2c_output_name(fresh: ToolWorld, tmp_path: Path) -> None:
    url = f"{fresh.endpoint}/{TINY}/resolve/main/{WEIGHTS}"
    run = run_tool(aria2c("-o", "weights.bin", url), cwd=tmp_path)
    assert run.returncode == 0, report(run)
    assert files_in(tmp_path) == {"weights.bin": commit_of(fresh, TINY).files[WEIGHTS]}
    assert_served_by_node(fresh, [WEIGHTS], "aria2")


def test_aria2c_metalink_file(fresh: ToolWorld, tmp_path: Path) -> None:
    status, _, body = fresh.gateway.get(f"/{TINY}/resolve/main/{WEIGHTS}.meta4")
    assert status == 200, body
    document = tmp_path / "weights.meta4"
    document.write_bytes(body)
    out = tmp_path / "out"
    run = run_tool(aria2c("-M", str(document), f"--dir={out}", "--check-integrity=true"))
    assert run.returncode == 0, report(run)
    assert files_in(out) == {WEIGHTS: commit_of(fresh, TINY).files[WEIGHTS]}
    assert_served_by_node(fresh, [WEIGHTS], "aria2")


# --------------------------------------------------------------------------- hfd.sh


HFD_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "include": (TINY, {"include": ["*.json"]}),
    "revision": (TINY, {"revision": "v1.0"}),
    "dataset": (DATA, {"dataset": True}),
}


@pytest.mark.parametrize("tool", ["aria2c", "wget"])
@pytest.mark.parametrize("case", list(HFD_CASES))
def test_hfd(fresh: ToolWorld, tmp_path: Path, tool: Tool, case: str) -> None:
    repo_id, options = HFD_CASES[case]
    listed = hfd(fresh.endpoint, repo_id, tmp_path, tool=tool, **options)
    commit = commit_of(fresh, repo_id, options.get("revision", "main"))
    expected = {p: b for p, b in commit.files.items() if p in listed}
    assert listed and (case != "include" or set(listed) < set(commit.files))
    assert files_in(tmp_path) == expected
    assert_served_by_node(fresh, listed, "aria2" if tool == "aria2c" else "Wget")
