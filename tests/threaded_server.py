"""aiohttp servers in a thread of their own, for tests that block while servers must answer."""

from __future__ import annotations

import asyncio
import threading
from typing import Self

from aiohttp import web


class ThreadedServer:
    """aiohttp listeners in a thread of their own with their own loop.

    Tests call clients synchronously (often in subprocesses that take seconds); a server on the
    test's own loop would stall meanwhile. Subclasses implement ``_sites()``.
    """

    thread_name = "server"

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self._runners: list[web.AppRunner] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{self.thread_name} did not start")
        error = self._startup_error()
        if error is not None:
            self._thread.join(10)
            self._loop.close()
            raise RuntimeError(f"{self.thread_name} did not start") from error

    def _startup_error(self) -> BaseException | None:
        # A method, not the attribute: the server thread sets it behind the checker's back.
        return self._error

    def _sites(self) -> dict[str, web.Application]:
        raise NotImplementedError

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except OSError as error:  # e.g. no port to bind: the constructor raises it
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        for name, app in self._sites().items():
            # A short shutdown timeout: stop() must not wait for a deliberately slow handler.
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            server = site._server
            assert isinstance(server, asyncio.Server) and server.sockets
            self.ports[name] = int(server.sockets[0].getsockname()[1])
            self._runners.append(runner)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True

        async def shutdown() -> None:
            for runner in self._runners:
                await runner.cleanup()
            # Connections still open (a client's keep-alive) leave handler tasks behind; end
            # them here rather than leave them to die noisily with the loop.
            leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(15)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
