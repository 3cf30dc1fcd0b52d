"""Where blocking work (SQLite, file writes, fsync) runs: a worker thread, or inline for virtual time.

Production always uses threads, so the event loop never blocks on a disk. Tests on trio's MockClock
with autojump use ``in_thread=False``: while a worker thread runs, the loop looks idle and autojump
would leap to the next deadline, firing timeouts that real time never would. Inline, the same code runs
with one checkpoint before it, so virtual-time tests stay exact.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import trio

T = TypeVar("T")


class BlockingIO:
    def __init__(self, in_thread: bool = True) -> None:
        self.in_thread = in_thread

    async def run(self, fn: Callable[..., T], *args: object, limiter: trio.CapacityLimiter | None = None) -> T:
        """Run ``fn(*args)``. Like ``trio.to_thread.run_sync`` it cannot be interrupted once started:
        cancelled meanwhile, it finishes and then raises Cancelled (its result is dropped)."""
        if self.in_thread:
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
        await trio.lowlevel.checkpoint()
        return fn(*args)
