"""The worker's garbage collection: survivors of full collections are frozen, and a periodic
sweep still reclaims cycles that became garbage after being frozen."""

from __future__ import annotations

import asyncio
import gc
import weakref

from gateway.collection import freeze_survivors


class Cyclic:
    def __init__(self) -> None:
        self.me = self


async def test_survivors_are_frozen_and_undo_thaws_them() -> None:
    undo = freeze_survivors(asyncio.get_running_loop())
    try:
        at_start = gc.get_freeze_count()
        assert at_start > 0, "what existed at start is frozen"
        kept = [[n] for n in range(1000)]
        gc.collect()
        await asyncio.sleep(0)  # the freeze runs from the loop, after the collection
        assert gc.get_freeze_count() >= at_start + len(kept)
    finally:
        undo()
    assert gc.get_freeze_count() == 0


async def test_a_sweep_reclaims_cycles_that_died_frozen() -> None:
    undo = freeze_survivors(asyncio.get_running_loop(), sweep_interval_s=0.2)
    try:
        cycle = Cyclic()
        alive = weakref.ref(cycle)
        gc.collect()
        await asyncio.sleep(0)
        del cycle
        gc.collect()
        assert alive() is not None, "frozen: full collections no longer look at it"
        for _ in range(50):
            await asyncio.sleep(0.05)
            if alive() is None:
                break
        assert alive() is None, "the sweep looks at frozen objects too"
    finally:
        undo()
