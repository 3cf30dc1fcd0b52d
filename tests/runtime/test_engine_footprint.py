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
from runtime.store import WriteLane

from tests.support import held_writer

from .helpers import run_turn

IDLE = 5.0

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


async def test_an_idle_engine_has_no_timer_event_or_write_lane_of_its_own(rt):
    # Each cost ~0.3-0.8 KiB per parked engine: a cancel scope (with its deadline entry) per engine for idle
    # eviction (now one timer in the manager), the manager's "exited" event (now made on first wait) and
    # the engine's write lane (now made at its first write; a snapshot writes nothing).
    per = await _per_idle_engine(rt, {"cancel_scope": trio.CancelScope, "event": trio.Event, "lane": WriteLane})
    assert per == {"cancel_scope": 1, "event": 0, "lane": 0}  # the scope: the engine's nursery's


async def test_every_engine_attribute_is_a_slot(rt, thread_id):
    # Past 30 attributes an instance dict no longer shares its keys (CPython 3.11): ~1.3 KiB more per
    # engine. After a turn, a snapshot and an update, everything the engine set lives in its slots.
    record = await run_turn(rt, thread_id, "hello")
    assert record["status"] == "completed"
    await rt.update_thread(thread_id, {"title": "slots"})
    snap = await rt.get_session_snapshot(thread_id)
    assert snap.title == "slots" and len(snap.messages) == 2
    engine = rt.manager.engine(thread_id)
    assert engine is not None and engine.active is None
    assert vars(engine) == {}


async def test_the_idle_timer_evicts_each_engine_at_its_own_deadline(open_runtime, autojump_clock):
    async with open_runtime(idle_evict_seconds=IDLE) as rt:
        first, second = [(await rt.create_thread(title=name))["id"] for name in ("first", "second")]
        t0 = trio.current_time()
        await rt.get_session_snapshot(first)
        await trio.sleep(2)
        await rt.get_session_snapshot(second)

        await trio.sleep_until(t0 + IDLE - 0.5)
        assert (rt.manager.engine(first), rt.manager.engine(second)) != (None, None)
        assert rt.manager.live_count == 2
        await trio.sleep_until(t0 + IDLE + 0.5)
        assert rt.manager.engine(first) is None and rt.manager.engine(second) is not None
        await rt.get_session_snapshot(second)  # an op moves the second engine's deadline to t0 + 5.5 + IDLE
        await trio.sleep_until(t0 + 2 + IDLE + 0.5)
        assert rt.manager.engine(second) is not None
        await trio.sleep_until(t0 + 5.5 + IDLE + 0.5)
        assert rt.manager.live_count == 0 and rt.manager.spawned == 2
        assert rt.manager._idle_heap == []  # nothing left watched


async def test_the_idle_timer_forgets_engines_that_exited(open_runtime, autojump_clock):
    async with open_runtime(idle_evict_seconds=IDLE) as rt:
        tid = (await rt.create_thread())["id"]
        for _ in range(3):  # three engines in turn: the first two shut down before their deadline
            await rt.get_session_snapshot(tid)
            engine = rt.manager.engine(tid)
            await rt.manager.shutdown(tid)
            assert rt.manager.engine(tid) is None
        await rt.get_session_snapshot(tid)
        successor = rt.manager.engine(tid)
        assert successor is not None and successor is not engine
        assert len(rt.manager._idle_heap) == 4  # stale watches stay until reached ...

        await trio.sleep(IDLE + 1)

        assert rt.manager._idle_heap == [] and rt.manager.live_count == 0  # ... and are dropped then
        assert rt.manager.spawned == 4


async def test_an_engine_busy_with_an_op_at_its_idle_deadline_is_not_retired_in_the_middle(
        open_runtime, autojump_clock):
    async with open_runtime(idle_evict_seconds=IDLE) as rt:
        tid = (await rt.create_thread())["id"]
        first = await run_turn(rt, tid, "hello")
        engine = rt.manager.engine(tid)
        done: dict[str, object] = {}

        async def rewind() -> None:
            done["rewind"] = await rt.rewind_thread(tid, first["id"])

        async with trio.open_nursery() as nursery:
            with held_writer(rt) as release:  # the rewind's one write waits: the engine is inside the op
                nursery.start_soon(rewind)
                await trio.testing.wait_all_tasks_blocked()
                autojump_clock.jump(IDLE + 0.5)  # past the deadline counted from the op's arrival
                await trio.testing.wait_all_tasks_blocked()
                assert rt.manager.engine(tid) is engine and rt.manager.live_handle(tid) is not None
                release.set()
        assert "rewind" in done and (await rt.get_session_snapshot(tid)).messages == ()  # the turn left
        assert rt.manager.engine(tid) is engine  # served on; the change counts as activity: idle from now
        await trio.sleep(IDLE + 1)
        assert rt.manager.live_count == 0 and rt.manager.spawned == 1
