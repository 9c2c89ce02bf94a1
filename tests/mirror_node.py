"""A plain HTTP mirror node on loopback for live-state tests (health, load, files).

Its behaviour is switched from the test (health status, delay, published load, files), and
every request it receives is recorded, so tests assert what the node itself saw.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from threaded_server import ThreadedServer


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]


class MirrorNode(ThreadedServer):
    thread_name = "mirror-node"

    def __init__(self, name: str = "node") -> None:
        self.name = name
        self.health_status = 200
        self.health_delay_s = 0.0
        self.load: dict[str, Any] | None = None
        self.files: dict[str, bytes] = {}
        self.seen: list[SeenRequest] = []
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['node']}"

    def _sites(self) -> dict[str, web.Application]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return {"node": app}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(SeenRequest(request.method, request.path, dict(request.headers)))
        if request.path == "/health":
            if self.health_delay_s:
                await asyncio.sleep(self.health_delay_s)
            return web.Response(status=self.health_status, text="ok")
        if request.path == "/load":
            if self.load is None:
                return web.Response(status=404)
            return web.json_response(self.load)
        body = self.files.get(request.path)
        if body is None:
            return web.Response(status=404, text="not on this node")
        return web.Response(body=body)

    def probes(self) -> list[SeenRequest]:
        return [r for r in self.seen if r.path == "/health"]
