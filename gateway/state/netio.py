"""Small helpers for the gateway's own outbound I/O (probes, manifests, verification, Redis)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import aiohttp

_READ_CHUNK_BYTES = 64 * 1024
_DETAIL_MAX_CHARS = 120


def stop_if_cancelled() -> None:
    """Raise the cancellation a library call swallowed.

    On Python 3.11, ``asyncio.wait_for`` (redis-py sends every command through it) returns
    the result instead of raising when the task is cancelled just as the send completes. The
    request to stop then shows only in ``Task.cancelling()``, and a loop that does not look
    would run on after shutdown gave up waiting for it.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def describe_error(exc: BaseException) -> str:
    """A short one-line description of a network error, for reasons and logs."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        exc = exc.os_error
    if isinstance(exc, aiohttp.ClientResponseError):
        # Its str() adds the URL and a repr of the parser's multi-line message.
        text = exc.message
    elif isinstance(exc, ConnectionError) and exc.errno:
        # asyncio's own text repeats the address ("Connect call failed ('10.0.0.1', 443)").
        text = os.strerror(exc.errno)
    else:
        text = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= _DETAIL_MAX_CHARS else text[: _DETAIL_MAX_CHARS - 3] + "..."


async def bounded_chunks(content: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    """The body in chunks, stopping once ``limit`` bytes have come: never read unbounded."""
    left = limit
    while left > 0:
        chunk = await content.read(min(left, _READ_CHUNK_BYTES))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk
