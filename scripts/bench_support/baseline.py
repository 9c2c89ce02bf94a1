"""The yardstick: a bare aiohttp app on uvloop that answers every request with a fixed 302.

It has the gateway's serving stack (aiohttp's HTTP parser and response writer, uvloop, no access
log) and none of its work, so gateway/baseline is the share of the machine's HTTP capacity
that routing leaves. With ``--workers N`` (N > 1) it runs N worker processes, each with its own
``SO_REUSEPORT`` listening socket on the same port, as the gateway's workers have, under a
supervisor that stops them all on SIGTERM or SIGINT.

Run: ``python -m bench_support.baseline --port P [--workers N]`` (``scripts`` on the path).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from types import FrameType

import uvloop
from aiohttp import web

#: A Location of the same shape and length class as the gateway's redirects.
LOCATION = (
    "https://huggingface.co/bench-org/model-0000/resolve/"
    "4f3c2a1b0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b/model-001.safetensors"
)


async def answer(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": LOCATION})


async def serve_worker(port: int) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # reuse_port even with one worker: the same socket options as the multi-worker case.
    await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def supervise(port: int, workers: int) -> int:
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    argv = [sys.executable, "-m", "bench_support.baseline", "--port", str(port), "--worker"]
    processes = [subprocess.Popen(argv) for _ in range(workers)]
    try:
        while not stopping and all(p.poll() is None for p in processes):
            time.sleep(0.1)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait(timeout=10)
    return 0 if stopping else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workers > 1 and not args.worker:
        return supervise(args.port, args.workers)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_worker(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
