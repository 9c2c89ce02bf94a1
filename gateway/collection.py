"""Garbage collection for a server whose memory is mostly large, long-lived tables.

A worker holds hundreds of thousands of long-lived objects (catalog entries, rankings, remembered
answers) and makes almost no reference cycles: a full collection of the default collector scans
all of them, for 100-200 ms every few seconds at 10,000 nodes, and finds next to nothing. Every
request in flight waits that long. Here the objects that survive a full collection are frozen
(moved where the collector no longer looks), so each later full collection scans only what
became long-lived since the one before. A cycle that turns into garbage after being frozen is
reclaimed by a sweep of everything once an hour, the one long pause left.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

#: Seconds between collections that look at frozen objects too.
SWEEP_INTERVAL_S = 3600.0


def freeze_survivors(
    loop: asyncio.AbstractEventLoop, sweep_interval_s: float = SWEEP_INTERVAL_S
) -> Callable[[], None]:
    """Freeze what exists now, then the survivors of every full collection; returns the
    function that undoes it."""
    freeze_pending = False
    sweeping: asyncio.TimerHandle | None = None

    def freeze() -> None:
        nonlocal freeze_pending
        freeze_pending = False
        gc.freeze()

    def after_collection(phase: str, info: dict[str, Any]) -> None:
        nonlocal freeze_pending
        # Not during the collection itself: after it, from the loop.
        if phase == "stop" and info["generation"] == 2 and not freeze_pending:
            freeze_pending = True
            loop.call_soon(freeze)

    def sweep() -> None:
        nonlocal sweeping
        gc.unfreeze()
        gc.collect()
        sweeping = loop.call_later(sweep_interval_s, sweep)

    gc.collect()
    gc.freeze()
    gc.callbacks.append(after_collection)
    sweeping = loop.call_later(sweep_interval_s, sweep)

    def undo() -> None:
        gc.callbacks.remove(after_collection)
        if sweeping is not None:
            sweeping.cancel()
        gc.unfreeze()

    return undo
