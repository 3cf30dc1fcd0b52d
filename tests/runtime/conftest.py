"""Fixtures for the runtime core tests.

Virtual time and worker threads
-------------------------------
pytest-trio's ``autojump_clock`` (``MockClock(autojump_threshold=0)``) jumps to the next deadline as
soon as every task is blocked, and a task waiting on ``trio.to_thread.run_sync`` counts as blocked.
The store runs every SQLite read and commit in a worker thread, so with the bare clock virtual time
races ahead while SQLite works: e.g. ``await rt.start_turn(tid, "hi", timeout=10)`` raises
EngineTimeout at virtual t=10 because the clock jumped to the caller's deadline while the engine's
state was being read. ``open_runtime`` therefore installs :class:`ThreadGuard` when the test runs on
a MockClock: an instrument that switches autojump off while any worker thread is busy and back on
when they are all done, so virtual time only moves when the program is truly idle. Only public trio
APIs are used (``Instrument.after_task_step`` and ``MockClock.autojump_threshold``).
"""

from __future__ import annotations

import contextlib
import math
from typing import AsyncIterator

import pytest
import trio
import trio.testing

from runtime import Runtime, RuntimeConfig


class ThreadGuard(trio.abc.Instrument):
    """Keeps a MockClock from autojumping while a thread holds a token of a watched limiter.

    A thread's token is taken in the step that starts it and released in the same step that
    reschedules its waiting task, so checking after every task step never leaves a window where
    the program looks idle but a thread is about to wake it."""

    def __init__(self, clock: trio.testing.MockClock) -> None:
        self.clock = clock
        self.threshold = clock.autojump_threshold
        self.limiters: list[trio.CapacityLimiter] = [trio.to_thread.current_default_thread_limiter()]

    def busy(self) -> bool:
        return any(limiter.borrowed_tokens for limiter in self.limiters)

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        wanted = math.inf if self.busy() else self.threshold
        if self.clock.autojump_threshold != wanted:
            self.clock.autojump_threshold = wanted


@pytest.fixture
def open_runtime(tmp_path):
    """``async with open_runtime(**config_overrides) as rt`` opens a Runtime on ``tmp_path``."""

    @contextlib.asynccontextmanager
    async def opener(**overrides) -> AsyncIterator[Runtime]:
        config = RuntimeConfig(**{"data_dir": tmp_path, **overrides})
        clock = trio.lowlevel.current_clock()
        guard = None
        if isinstance(clock, trio.testing.MockClock) and clock.autojump_threshold < math.inf:
            guard = ThreadGuard(clock)
            trio.lowlevel.add_instrument(guard)
        try:
            async with Runtime.open(config) as rt:
                if guard is not None:
                    guard.limiters.append(rt.store._read_limiter)  # store reads use their own limiter
                yield rt
        finally:
            if guard is not None:
                trio.lowlevel.remove_instrument(guard)
                clock.autojump_threshold = guard.threshold

    return opener


@pytest.fixture
async def rt(open_runtime) -> AsyncIterator[Runtime]:
    async with open_runtime() as runtime:
        yield runtime


@pytest.fixture
async def thread_id(rt: Runtime) -> str:
    return (await rt.create_thread())["id"]
