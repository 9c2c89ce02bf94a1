"""What a sync shows while it runs: a progress line on a terminal, nothing extra in logs."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

_REDRAW_S = 0.2
_MIB = 1024 * 1024


class Progress(Protocol):
    def begin(self, label: str, files: int, total_bytes: int) -> None: ...

    def advance(self, received: int) -> None: ...

    def file_done(self) -> None: ...

    def end(self) -> None: ...


class Silent:
    """For logs and pipes: the JSON log lines say what happened, a bar would only add noise."""

    def begin(self, label: str, files: int, total_bytes: int) -> None:
        pass

    def advance(self, received: int) -> None:
        pass

    def file_done(self) -> None:
        pass

    def end(self) -> None:
        pass


class TerminalBar:
    """One line, redrawn at most five times a second: ``label  12.0/48.0 MiB  3/7 files``."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._label = ""
        self._files = self._done = 0
        self._total = self._received = 0
        self._drawn_at = 0.0

    def begin(self, label: str, files: int, total_bytes: int) -> None:
        self._label, self._files, self._total = label, files, total_bytes
        self._done = self._received = 0
        self._draw(force=True)

    def advance(self, received: int) -> None:
        self._received += received
        self._draw()

    def file_done(self) -> None:
        self._done += 1
        self._draw()

    def end(self) -> None:
        self._draw(force=True)
        self._stream.write("\n")
        self._stream.flush()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn_at < _REDRAW_S:
            return
        self._drawn_at = now
        self._stream.write(
            f"\r{self._label}  {self._received / _MIB:.1f}/{self._total / _MIB:.1f} MiB  "
            f"{self._done}/{self._files} files\x1b[K"
        )
        self._stream.flush()
