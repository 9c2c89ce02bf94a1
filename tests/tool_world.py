"""A gateway process in front of a local hub and mirror nodes, for the command-line download
tools (aria2c, wget, curl, git) that users point at a gateway.

The tools run as users run them: no forwarding headers, so the gateway sees a loopback client
of unknown location, and the nodes (which serve everywhere) take it. Every node records the
requests it gets (``HfMirrorNode.seen``): its access log, where a leaked token would show.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fake_hub import FakeHub, SeenRequest
from hf_nodes import HfMirrorNode
from processes import GatewayProcess, wait_until

from gateway.state.sync import USER_AGENT as SYNC_USER_AGENT

#: Every tool run is bounded: a hang is a failure, not a stuck suite.
TOOL_TIMEOUT_S = 60


@dataclass
class ToolWorld:
    hub: FakeHub
    nodes: dict[str, HfMirrorNode]
    gateway: GatewayProcess

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    def downloads(self, name: str) -> list[SeenRequest]:
        """File requests node ``name`` received from clients (``hub``: upstream, its CDN
        included), the gateway's own checks of the node aside."""
        if name == "hub":
            return [r for r in list(self.hub.seen) if not r.path.startswith("/api/")]
        return [
            r
            for r in self.nodes[name].downloads()
            if not (r.header("User-Agent") or "").startswith(SYNC_USER_AGENT)
        ]

    def clear_logs(self) -> None:
        self.hub.clear_seen()
        for node in self.nodes.values():
            node.seen.clear()


def node_entries(
    nodes: Mapping[str, HfMirrorNode], extra: Mapping[str, Mapping[str, Any]]
) -> list[Any]:
    """Config entries of nodes that serve everywhere, with each node's ``extra`` keys."""
    return [
        {"id": name, "url": node.url, "manifest_url": node.manifest_url, **extra.get(name, {})}
        for name, node in nodes.items()
    ]


@contextmanager
def tool_world(
    tmp_path: Path,
    node_names: tuple[str, ...] = ("own",),
    *,
    node_config: Mapping[str, Mapping[str, Any]] | None = None,
    config: Mapping[str, Any] | None = None,
    hub: FakeHub | None = None,
    ready_path: str = "/acme/tiny-model/resolve/main/config.json",
) -> Iterator[ToolWorld]:
    """Hub, nodes (mirrors of every public commit) and a gateway process that routes to them.

    ``node_config``: more config keys per node (kind, weight...); ``config`` is laid over the
    gateway's config; ``hub`` replaces the standard one. Ready when ``ready_path`` goes to a node.
    """
    with ExitStack() as stack:
        if hub is None:
            hub = stack.enter_context(FakeHub())
        nodes = {name: HfMirrorNode(name, hub) for name in node_names}
        for node in nodes.values():
            stack.callback(node.stop)
        gateway_config = {
            "upstream": {"url": hub.url},
            "probing": {"interval_s": 0.2, "rise": 1, "probe": {"path": "/health"}},
            "sync": {"interval_s": 0.3},
            "nodes": node_entries(nodes, node_config or {}),
            **(config or {}),
        }
        gateway = GatewayProcess(gateway_config, tmp_path)
        stack.callback(gateway.stop)
        world = ToolWorld(hub, nodes, gateway)
        if nodes:
            wait_until(lambda: routed_to(world, ready_path) != "upstream", 10, "a node routed to")
        yield world


def routed_to(world: ToolWorld, path: str) -> str:
    """The node a plain client asking for ``path`` is sent to (``upstream``, or the status)."""
    status, headers, _ = world.gateway.get(path, method="HEAD")
    return headers.get("x-mirror-node", f"status {status}")


def run_tool(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a download tool to its end, bounded in time; its exit code is for the test."""
    return subprocess.run(
        args, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False, cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd or Path.cwd()), "LC_ALL": "C"},
    )  # fmt: skip


def report(run: subprocess.CompletedProcess[str]) -> str:
    return f"{run.args} exited {run.returncode}:\n{run.stdout}\n{run.stderr}"
