"""A real HTTP mirror node on loopback, in its own thread and event loop.

Its behaviour is switched from the test (health status, delay, published load, files), and
every request it receives is recorded, so tests assert what the node itself saw.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class MirrorNode:
    name: str = "node"
    health_status: int = 200
    health_delay_s: float = 0.0
    load: dict[str, Any] | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    seen: list[SeenRequest] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"node-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"mirror node {self.name} did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

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

    def downloads(self) -> list[SeenRequest]:
        return [r for r in self.seen if r.path not in ("/health", "/load")]

    def stop(self) -> None:
        async def shutdown() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
