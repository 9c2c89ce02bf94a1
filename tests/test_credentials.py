"""A user's token never reaches a node that is not ours, with the tools that re-send it.

wget (and hfd.sh ``--hf_token``, with wget or aria2c) sends ``--header`` values again to the
host a redirect names. With ``credentials.route: upstream`` (the default) a request carrying
credentials goes to upstream, and no node sees it; with ``own_nodes`` it may go to our own
mirrors, never to a ``third_party`` node. The nodes' own request logs are the evidence.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import VALID_TOKEN
from hfd_flow import Tool, hfd
from processes import wait_until
from tool_world import ToolWorld, report, run_tool, tool_world

TINY = "acme/tiny-model"
#: The third-party node is the one plain clients nearly always get.
NODES = {"own": {"kind": "mirror", "weight": 1}, "tp": {"kind": "third_party", "weight": 100}}
BEARER = f"Authorization: Bearer {VALID_TOKEN}"
COOKIE = f"Cookie: token={VALID_TOKEN}"


def saw_credentials(world: ToolWorld, name: str) -> bool:
    return any(
        r.header("Authorization") is not None or r.header("Cookie") is not None
        for r in world.nodes[name].seen
    )


def expected(world: ToolWorld, path: str) -> bytes:
    return world.hub.repo(TINY).head().files[path]


def resolve_url(world: ToolWorld, path: str) -> str:
    return f"{world.endpoint}/{TINY}/resolve/main/{path}"


def wget(world: ToolWorld, directory: Path, path: str, *headers: str) -> bytes:
    out = directory / path.replace("/", "_")
    args = ["wget", "-q", "-O", str(out), *(f"--header={h}" for h in headers)]
    run = run_tool([*args, resolve_url(world, path)], cwd=directory)
    assert run.returncode == 0, report(run)
    return out.read_bytes()


@pytest.fixture(scope="module")
def default_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToolWorld]:
    with tool_world(tmp_path_factory.mktemp("creds"), tuple(NODES), node_config=NODES) as world:
        yield world


@pytest.fixture(scope="module")
def own_nodes_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToolWorld]:
    with tool_world(
        tmp_path_factory.mktemp("creds-own"),
        tuple(NODES),
        node_config=NODES,
        config={"credentials": {"route": "own_nodes"}},
    ) as world:
        yield world


def test_without_credentials_wget_goes_to_a_node(default_world: ToolWorld, tmp_path: Path) -> None:
    default_world.clear_logs()
    assert wget(default_world, tmp_path, "model.safetensors") == expected(
        default_world, "model.safetensors"
    )
    served = default_world.downloads("own") + default_world.downloads("tp")
    assert [r.path for r in served if r.path.endswith("/model.safetensors")]


@pytest.mark.parametrize("credential", [BEARER, COOKIE], ids=["authorization", "cookie"])
@pytest.mark.parametrize("path", ["config.json", "model.safetensors"])
def test_wget_with_credentials_goes_upstream_by_default(
    default_world: ToolWorld, tmp_path: Path, credential: str, path: str
) -> None:
    default_world.clear_logs()
    assert wget(default_world, tmp_path, path, credential) == expected(default_world, path)
    assert not saw_credentials(default_world, "own")
    assert not saw_credentials(default_world, "tp")
    assert any("/resolve/" in r.path for r in default_world.downloads("hub"))


def test_curl_with_a_token(default_world: ToolWorld, tmp_path: Path) -> None:
    default_world.clear_logs()
    out = tmp_path / "weights"
    run = run_tool(
        [
            "curl",
            "-sSfL",
            "-o",
            str(out),
            "-H",
            BEARER,
            resolve_url(default_world, "model.safetensors"),
        ]
    )
    assert run.returncode == 0, report(run)
    assert out.read_bytes() == expected(default_world, "model.safetensors")
    assert not saw_credentials(default_world, "own") and not saw_credentials(default_world, "tp")


@pytest.mark.parametrize("tool", ["wget", "aria2c"])
def test_hfd_with_a_token_goes_upstream_by_default(
    default_world: ToolWorld, tmp_path: Path, tool: Tool
) -> None:
    default_world.clear_logs()
    files = hfd(default_world.endpoint, TINY, tmp_path, tool=tool, token=VALID_TOKEN)
    for path in files:
        assert (tmp_path / path).read_bytes() == expected(default_world, path), path
    assert not saw_credentials(default_world, "own") and not saw_credentials(default_world, "tp")


def test_metalink_for_a_token_names_upstream_only_by_default(default_world: ToolWorld) -> None:
    _, _, body = default_world.gateway.get(
        f"/{TINY}/resolve/main/model.safetensors.meta4", {"Authorization": BEARER.split(": ")[1]}
    )
    assert default_world.hub.url.encode() in body
    assert not any(n.url.encode() in body for n in default_world.nodes.values())


@pytest.mark.parametrize("tool", ["wget", "aria2c"])
def test_own_nodes_take_tokens_third_party_nodes_never(
    own_nodes_world: ToolWorld, tmp_path: Path, tool: Tool
) -> None:
    world = own_nodes_world
    # Without a token, clients go to the third-party node (it weighs 100 to 1).
    wait_until(
        lambda: (
            world.gateway.get(f"/{TINY}/resolve/main/config.json")[1].get("x-mirror-node") == "tp"
        ),
        10,
        "the third-party node taking clients",
    )
    world.clear_logs()
    files = hfd(world.endpoint, TINY, tmp_path, tool=tool, token=VALID_TOKEN)
    for path in files:
        assert (tmp_path / path).read_bytes() == expected(world, path), path
    assert not saw_credentials(world, "tp")
    assert world.downloads("tp") == []
    served = {r.path.rsplit("/", 1)[-1] for r in world.downloads("own")}
    assert {p.rsplit("/", 1)[-1].replace(" ", "%20") for p in files} <= served
    # The Metalink such a client gets names no third-party node either.
    _, _, body = world.gateway.get(
        f"/{TINY}/resolve/main/model.safetensors.meta4", {"Authorization": BEARER.split(": ")[1]}
    )
    assert world.nodes["own"].url.encode() in body
    assert world.nodes["tp"].url.encode() not in body
