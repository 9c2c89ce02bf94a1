"""An upstream that answers at once and then trickles its body, as a stalling hub or proxy does."""

from __future__ import annotations

import asyncio

from aiohttp import web
from threaded_server import ThreadedServer


class TricklingUpstream(ThreadedServer):
    """Every request gets a 200 whose ``size`` bytes come one every ``interval_s`` seconds."""

    thread_name = "trickling-upstream"

    def __init__(self, size: int, interval_s: float) -> None:
        self.size = size
        self.interval_s = interval_s
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['upstream']}"

    def _sites(self) -> dict[str, web.Application]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._trickle)
        return {"upstream": app}

    async def _trickle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = self.size
        await response.prepare(request)
        for _ in range(self.size):
            await response.write(b"x")
            await asyncio.sleep(self.interval_s)
        await response.write_eof()
        return response
