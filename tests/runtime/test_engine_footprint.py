"""What a live idle engine holds (issue 16, bench row 6: RSS per idle engine within 2x a bare idle trio task).

An idle engine is one parked task per thread. These tests count, per idle engine, the objects that made it
cost more than it needs: each was a leak or a per-engine object created whether used or not. They count
objects (gc), not bytes, so they do not depend on the allocator; the byte figure is `make bench` row 6."""

from __future__ import annotations

import gc
from collections import Counter

import trio
import trio.testing

from trio._core._run import _TaskStatus  # trio's task status of ``nursery.start`` (private: no public name)

from runtime.engine import ops

ENGINES = 5


def _live(kinds: dict[str, type]) -> Counter:
    counts: Counter = Counter()
    for obj in gc.get_objects():
        for name, kind in kinds.items():
            if isinstance(obj, kind):
                counts[name] += 1
    return counts


async def _per_idle_engine(rt, kinds: dict[str, type]) -> dict[str, float]:
    """Spawn ENGINES engines (each answering one snapshot), let them park, and return how many objects of
    each kind every one of them added."""
    ids = [(await rt.create_thread(title=f"idle {i}"))["id"] for i in range(ENGINES)]
    await trio.testing.wait_all_tasks_blocked()
    gc.collect()
    before = _live(kinds)
    for tid in ids:
        snap = await rt.get_session_snapshot(tid)
        assert snap.thread_id == tid
    await trio.testing.wait_all_tasks_blocked()
    gc.collect()
    after = _live(kinds)
    assert rt.manager.live_count == ENGINES
    return {name: (after[name] - before[name]) / ENGINES for name in kinds}


async def test_an_idle_engine_keeps_no_op_it_answered(rt):
    # The op loop kept its last op bound while parked: the answered snapshot op and its closed reply
    # channel (a ~0.8 KiB buffer) lived as long as the engine stayed idle.
    per = await _per_idle_engine(rt, {"op": ops.Op, "reply": trio.MemorySendChannel})
    assert per == {"op": 0, "reply": 1}  # the engine's inbox (its send side) only


async def test_an_idle_engine_keeps_no_start_nursery(rt):
    # trio's task status of ``nursery.start`` holds the temporary nursery ``start`` ran the engine in; the
    # manager and the engine kept it in their frames for the engine's whole life (~1 KiB each).
    per = await _per_idle_engine(rt, {"task_status": _TaskStatus, "nursery": trio.Nursery})
    assert per == {"task_status": 0, "nursery": 1}  # the engine's own nursery only
