"""Run an operation with an I/O fault at its k-th step: the twin of tests/cancellation/harness.py.

``run_with_fault`` arms the plan, runs the action, disarms, and reports what fired. ``every_step``
drives k = 1, 2, ... until a run completes without its fault firing (so the last k is N + 1, where N
is the number of steps of the fault's layer in that run), calling ``judge`` after each run. Counting
until the fault stops firing, instead of taking N from one clean run, keeps the loop exact when
N varies a little between runs (the group-commit writer batches by timing).

Judge every run from the database and the files (``tests.cancellation.harness.capture`` and
``check_invariants``), never only from the status or the exception.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Awaitable, Callable

from runtime.errors import RuntimeFailure

from .seam import FaultPlan

# No operation here has anywhere near this many I/O steps; reaching it means the loop never ends.
MAX_STEPS = 500


@dataclasses.dataclass
class FaultRun:
    k: int | None
    kind: str
    fired: str | None  # "sqlite:COMMIT", "file:replace", ... or None when the run had fewer steps
    steps: int  # steps of the fault's layer in this run
    value: Any = None
    error: RuntimeFailure | None = None


async def run_with_fault(plan: FaultPlan, action: Callable[[], Awaitable[Any]], k: int | None,
                         kind: str, **arm: Any) -> FaultRun:
    """Run ``action`` with ``kind`` injected at step ``k`` (None: count only). Runtime errors are the
    operation's answer and are returned; anything else (a crash) propagates."""
    plan.arm(k, kind, **arm)
    run = FaultRun(k, kind, None, 0)
    try:
        run.value = await action()
    except RuntimeFailure as exc:
        run.error = exc
    finally:
        plan.disarm()
        run.fired, run.steps = plan.fired, plan.count
    return run


async def every_step(plan: FaultPlan, action: Callable[[], Awaitable[Any]], kind: str,
                     judge: Callable[[FaultRun], Awaitable[None]], **arm: Any) -> int:
    """Fail ``action`` at k = 1, 2, ... until a run has no k-th step; ``judge`` sees every run,
    including the last, clean one. Returns N (the steps of the clean run)."""
    for k in range(1, MAX_STEPS + 1):
        run = await run_with_fault(plan, action, k, kind, **arm)
        await judge(run)
        if run.fired is None:
            # Fewer than k steps (not exactly k - 1: a group-commit writer may batch a run's writes
            # differently from the previous run's, so N can shrink by a step or two).
            assert run.steps < k, f"step {k} was reached ({run.steps} steps) but the fault did not fire"
            return run.steps
    raise AssertionError(f"more than {MAX_STEPS} I/O steps: the operation never ends")
