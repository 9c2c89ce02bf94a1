"""Download one file into staging: resumable, rate-limited, verified before it gets its name.

Bytes go to a partial file outside the staging tree; an interrupted download resumes from its
length with ``Range: bytes=N-`` (the partial bytes are hashed again from disk, no network).
Only content whose size and upstream etag (sha256 for LFS, git blob sha1 otherwise) match is
renamed into staging; a mismatch throws the partial file away and tries again, up to
``retries`` attempts, then raises ``FetchError``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from gateway.hf.catalog import FileMeta
from gateway.hf.paths import FileRef
from gateway.node.digest import Digest, Hasher
from gateway.node.upstream import Upstream, UpstreamError

#: Bytes gathered before one trip to the writer thread.
_WRITE_BATCH_BYTES = 1024 * 1024
_READ_BYTES = 256 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(?:\d+|\*)")

#: Called with the number of bytes just received.
Progress = Callable[[int], None]


class FetchError(Exception):
    """A file that could not be had with the right content; the message says why."""


class RateLimiter:
    """A token bucket over all downloads of a run: ``rate`` bytes per second, bursts of one
    second's worth."""

    def __init__(self, bytes_per_s: float | None) -> None:
        self._rate = bytes_per_s
        self._allowance = bytes_per_s or 0.0
        self._last = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, count: int) -> None:
        rate = self._rate
        if rate is None:
            return
        async with self._lock:
            now = time.monotonic()
            self._allowance = min(rate, self._allowance + (now - self._last) * rate)
            self._last = now
            self._allowance -= count
            if self._allowance < 0:
                await asyncio.sleep(-self._allowance / rate)


def _hash_existing(path: Path, hasher: Hasher) -> None:
    with path.open("rb") as f:
        while chunk := f.read(_WRITE_BATCH_BYTES):
            hasher.update(chunk)


def _absorb(f: IO[bytes], hasher: Hasher, data: bytes) -> None:
    f.write(data)
    hasher.update(data)


def _resume_offset(partial: Path, size: int) -> int:
    try:
        length = partial.stat().st_size
    except FileNotFoundError:
        return 0
    if length > size:  # not a prefix of this file: start again
        partial.unlink()
        return 0
    return length


async def _attempt(
    upstream: Upstream,
    ref: FileRef,
    meta: FileMeta,
    partial: Path,
    piece_bytes: int,
    limiter: RateLimiter,
    progress: Progress,
) -> Digest:
    """One download attempt, from where the partial file ends; raises UpstreamError."""
    start = _resume_offset(partial, meta.size)
    hasher = Hasher(meta.size, piece_bytes)
    if start:
        await asyncio.to_thread(_hash_existing, partial, hasher)
    if start == meta.size:
        return hasher.digest()  # complete already; only the check is left
    async with upstream.open_file(ref, start) as response:
        mode = "ab"
        if start and response.status == 200:
            # The server ignored the range: the body is the whole file.
            hasher, mode = Hasher(meta.size, piece_bytes), "wb"
        elif start:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != start:
                raise UpstreamError(f"file {ref.filename}: a range answer not from byte {start}")
        left = meta.size - hasher.size + 1  # one byte more shows an over-long body
        f: IO[bytes] = await asyncio.to_thread(partial.open, mode)
        try:
            batch = bytearray()
            async for received in response.content.iter_chunked(_READ_BYTES):
                chunk = received[:left]
                left -= len(chunk)
                await limiter.take(len(chunk))
                progress(len(chunk))
                batch += chunk
                if len(batch) >= _WRITE_BATCH_BYTES or left <= 0:
                    await asyncio.to_thread(_absorb, f, hasher, bytes(batch))
                    batch.clear()
                if left <= 0:
                    break
            if batch:
                await asyncio.to_thread(_absorb, f, hasher, bytes(batch))
        finally:
            await asyncio.to_thread(f.close)
    return hasher.digest()


async def fetch_file(
    upstream: Upstream,
    ref: FileRef,
    meta: FileMeta,
    target: Path,
    partial: Path,
    *,
    piece_bytes: int,
    retries: int,
    limiter: RateLimiter,
    progress: Progress = lambda _: None,
) -> Digest:
    """Download ``ref`` (upstream's file ``meta``) to ``target`` through ``partial``."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    for attempt in range(retries):
        if attempt:
            await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
        try:
            digest = await _attempt(upstream, ref, meta, partial, piece_bytes, limiter, progress)
        except UpstreamError as exc:
            if exc.permanent:
                raise FetchError(exc.message) from None
            problems.append(exc.message)  # the partial file stays: the next attempt resumes
            continue
        mismatch = digest.mismatch(meta)
        if mismatch is None:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial.replace(target)
            return digest
        problems.append(mismatch)
        partial.unlink(missing_ok=True)
    raise FetchError(f"{ref.filename}: {len(problems)} attempts failed; last: {problems[-1]}")
