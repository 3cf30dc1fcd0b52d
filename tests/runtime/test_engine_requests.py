"""Snapshots and the oneshot request protocol: answers mid-turn, wait_for_idle, deadlines, cancelled
requesters, the zero-buffer rendezvous of a reply, backpressure from a full inbox, and ops queued when an
engine stops or crashes.

Everything timed runs on the MockClock (``autojump_clock``; see conftest for why it is thread-safe
here), so "at once" means "virtual time did not move" and a deadline is hit exactly.
"""

from __future__ import annotations

import sqlite3

import pytest
import trio
import trio.testing

from runtime import EngineTimeout, EngineUnavailable
from runtime.engine import ops
from web.errors import status_for

from .helpers import (
    GatedModel, ReplyProbe, block_engine, collect_events, inbox_used, run_turn, turn_record, wait_turn_end,
)

# ---- snapshots ------------------------------------------------------------------------------------


async def test_snapshot_during_a_turn_answers_at_once_with_the_previous_boundary(rt, thread_id, autojump_clock):
    await run_turn(rt, thread_id, "first question")
    boundary = await rt.get_session_snapshot(thread_id)
    running = await rt.start_turn(thread_id, "/hang")
    t0 = trio.current_time()

    snapshot = await rt.get_session_snapshot(thread_id, timeout=5)

    assert trio.current_time() == t0
    assert snapshot.turn_in_progress is True
    assert snapshot.active_turn_id == running["id"]
    assert snapshot.messages == boundary.messages  # the running turn's prompt is not in it yet
    assert snapshot.total_tokens == boundary.total_tokens
    assert boundary.turn_in_progress is False and boundary.active_turn_id is None
    await rt.interrupt_turn(thread_id, running["id"])


async def test_snapshot_wait_for_idle_waits_for_the_turn_end_and_returns_the_new_state(
        rt, thread_id, autojump_clock):
    await run_turn(rt, thread_id, "first question")
    boundary = await rt.get_session_snapshot(thread_id)
    running = await rt.start_turn(thread_id, "/hang")
    got: list = []

    async def waiter() -> None:
        got.append(await rt.get_session_snapshot(thread_id, wait_for_idle=True, timeout=60))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # still waiting: the turn hangs
        t0 = trio.current_time()
        await rt.interrupt_turn(thread_id, running["id"])

    [snapshot] = got
    assert trio.current_time() == t0
    assert snapshot.turn_in_progress is False and snapshot.active_turn_id is None
    assert list(snapshot.messages) == [*boundary.messages,
                                       {"role": "user", "content": [{"type": "text", "text": "/hang"}]}]
    assert (await turn_record(rt, thread_id, running["id"]))["status"] == "interrupted"


async def test_snapshot_wait_for_idle_on_an_idle_engine_answers_at_once(rt, thread_id, autojump_clock):
    await run_turn(rt, thread_id, "hello")
    t0 = trio.current_time()

    snapshot = await rt.get_session_snapshot(thread_id, wait_for_idle=True, timeout=5)

    assert trio.current_time() == t0
    assert snapshot.turn_in_progress is False and len(snapshot.messages) == 2


# ---- deadlines and requesters that give up ---------------------------------------------------------


async def test_wait_for_idle_timeout_raises_at_the_deadline_and_engine_keeps_serving(rt, thread_id, autojump_clock):
    running = await rt.start_turn(thread_id, "/hang")
    t0 = trio.current_time()

    with pytest.raises(EngineTimeout):
        await rt.get_session_snapshot(thread_id, wait_for_idle=True, timeout=3)

    assert trio.current_time() == pytest.approx(t0 + 3, abs=1e-9)
    t1 = trio.current_time()
    snapshot = await rt.get_session_snapshot(thread_id, timeout=3)
    assert trio.current_time() == t1
    assert snapshot.turn_in_progress is True
    record = await rt.interrupt_turn(thread_id, running["id"], timeout=3)
    assert record["status"] == "interrupted"
    assert trio.current_time() == t1
    after = await rt.get_session_snapshot(thread_id, wait_for_idle=True, timeout=3)
    assert after.turn_in_progress is False


async def cancel_once_queued(rt, tid: str, request) -> None:
    """Run ``request()`` against a blocked engine and cancel its requester once its op sits in the inbox:
    what a client disconnect does to a route."""
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def requester() -> None:
            with scope:
                await request()
                raise AssertionError("answered while the engine was blocked")

        nursery.start_soon(requester)
        await trio.testing.wait_all_tasks_blocked()
        assert inbox_used(rt, tid) == 1  # its op is queued
        scope.cancel()
    assert inbox_used(rt, tid) == 1  # ... and still queued after the requester left


async def test_requester_cancelled_after_its_op_was_queued_does_not_wedge_the_engine(open_runtime, autojump_clock):
    # A huge reply bound: if the engine waited on the dead requester's oneshot, the next request would time out.
    async with open_runtime(reply_send_seconds=1000) as rt:
        tid = (await rt.create_thread())["id"]
        blocker = await block_engine(rt, tid)
        await cancel_once_queued(rt, tid, lambda: rt.get_session_snapshot(tid, timeout=50))
        t0 = trio.current_time()
        async with blocker:
            await blocker.receive()  # release: the engine now meets the dead requester's oneshot

        snapshot = await rt.get_session_snapshot(tid, timeout=5)

        assert trio.current_time() == t0
        assert snapshot.thread_id == tid


async def test_start_turn_requester_cancelled_after_queueing_still_gets_its_turn_run(open_runtime, autojump_clock):
    async with open_runtime(reply_send_seconds=1000) as rt:
        tid = (await rt.create_thread())["id"]
        blocker = await block_engine(rt, tid)
        await cancel_once_queued(rt, tid, lambda: rt.start_turn(tid, "accepted anyway", timeout=50))
        async with blocker:
            await blocker.receive()

        end = (await collect_events(rt, tid, lambda e: e.event == "turn.completed"))[-1]

        # The op was accepted before the requester left, so the turn ran; its reply was simply dropped.
        assert end.payload["status"] == "completed"
        snapshot = await rt.get_session_snapshot(tid, timeout=5)
        assert [m["content"][0]["text"] for m in snapshot.messages] == ["accepted anyway", "You said: accepted anyway"]


# ---- the oneshot is a rendezvous ------------------------------------------------------------------
# A reply must be handed to a requester that is there to take it. With any buffer, the engine's send would
# "succeed" into the buffer of a requester that has already gone, and nobody would know the reply was lost.


def probed(make_op, probes: list[ReplyProbe], before_send=None):
    """``make_op`` with its oneshot's send side wrapped in a ReplyProbe (appended to ``probes``)."""

    def make(reply: ops.Reply) -> ops.Op:
        probe = ReplyProbe(reply, before_send=before_send)
        probes.append(probe)
        return make_op(probe)

    return make


async def test_a_requesters_oneshot_has_no_buffer_and_its_reply_is_handed_over(rt, thread_id, autojump_clock):
    handle = await rt.manager.handle(thread_id)
    probes: list[ReplyProbe] = []
    t0 = trio.current_time()

    snapshot = await handle.request(probed(lambda r: ops.GetSessionSnapshot(reply=r), probes),
                                    deadline=t0 + 5, what="answer a session snapshot")

    [probe] = probes
    assert probe.inner.statistics().max_buffer_size == 0  # a rendezvous, not a mailbox
    assert probe.log == ["delivered"]  # the requester was waiting: handed over without a wait
    assert probe.inner.statistics().open_send_channels == 0  # and the engine closed its side
    assert snapshot.thread_id == thread_id and trio.current_time() == t0


@pytest.mark.parametrize("kind", ["snapshot answered inline", "update answered after its commit"])
async def test_a_reply_to_a_requester_cancelled_as_it_is_sent_is_never_reported_delivered(
        open_runtime, kind, autojump_clock):
    # The requester's op is queued and taken; its cancellation (a client disconnect) lands in the very step
    # the engine sends the reply. A huge send bound: an engine waiting on the gone requester would show.
    async with open_runtime(reply_send_seconds=1000) as rt:
        tid = (await rt.create_thread(title="before"))["id"]
        handle = await rt.manager.handle(tid)
        scope = trio.CancelScope()
        probes: list[ReplyProbe] = []
        if kind.startswith("snapshot"):
            make = probed(lambda r: ops.GetSessionSnapshot(reply=r), probes, before_send=scope.cancel)
        else:
            make = probed(lambda r: ops.UpdateThread(changes={"title": "after"}, reply=r), probes,
                          before_send=scope.cancel)
        t0 = trio.current_time()

        async def requester() -> None:
            with scope:
                await handle.request(make, deadline=t0 + 50, what="answer")
                raise AssertionError("the requester got a reply after its cancellation landed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(requester)
        await trio.testing.wait_all_tasks_blocked()  # the engine has taken in the outcome of its send

        [probe] = probes
        assert scope.cancelled_caught
        # Not "delivered": the engine found nobody waiting, waited, and saw the requester close its side.
        assert probe.log == ["would_block", "BrokenResourceError"]
        assert trio.current_time() == t0  # ... at once, not at the 1000 s send bound
        # The accepted op still happened; only its reply was dropped. The engine serves on.
        snapshot = await rt.get_session_snapshot(tid, timeout=5)
        assert snapshot.title == (await rt.thread_record(tid))["title"] == ("before" if kind.startswith("snapshot")
                                                                           else "after")
        assert trio.current_time() == t0


async def test_full_inbox_makes_a_request_time_out_exactly_at_its_deadline(open_runtime, autojump_clock):
    async with open_runtime(inbox_capacity=1, reply_send_seconds=1000) as rt:
        tid = (await rt.create_thread())["id"]
        blocker = await block_engine(rt, tid)
        handle = await rt.manager.handle(tid)
        filler_tx, filler_rx = trio.open_memory_channel(0)
        await handle.submit(ops.GetSessionSnapshot(reply=filler_tx))  # takes the inbox's only slot
        assert inbox_used(rt, tid) == 1
        t0 = trio.current_time()

        with pytest.raises(EngineTimeout):
            await rt.get_session_snapshot(tid, timeout=2)

        assert trio.current_time() == pytest.approx(t0 + 2, abs=1e-9)
        assert inbox_used(rt, tid) == 1  # the timed-out op was never queued
        # The engine then serves what it accepted, and new requests again.
        t1 = trio.current_time()
        async with blocker:
            assert (await blocker.receive()).unwrap().thread_id == tid
        async with filler_rx:
            assert (await filler_rx.receive()).unwrap().thread_id == tid
        snapshot = await rt.get_session_snapshot(tid, timeout=2)
        assert snapshot.thread_id == tid
        assert trio.current_time() == t1


# ---- ops queued when an engine stops ---------------------------------------------------------------


async def test_ops_queued_when_shutdown_thread_runs_fail_unavailable_at_once(open_runtime, autojump_clock):
    async with open_runtime(reply_send_seconds=1000) as rt:
        tid = (await rt.create_thread())["id"]
        blocker = await block_engine(rt, tid)
        results: dict[str, object] = {}

        async def shut_down() -> None:
            results["shutdown"] = await rt.shutdown_thread(tid, timeout=30)

        async def queued_request() -> None:
            try:
                results["snapshot"] = await rt.get_session_snapshot(tid, timeout=30)
            except EngineUnavailable as exc:
                results["snapshot"] = exc
            results["at"] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(queued_request)
            await trio.testing.wait_all_tasks_blocked()
            assert inbox_used(rt, tid) == 1  # the snapshot, queued behind the wedged engine
            nursery.start_soon(shut_down)
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            blocker.close()  # release the engine: it sees it is stopping and fails what is queued

        assert results["shutdown"] is None
        assert isinstance(results["snapshot"], EngineUnavailable)
        assert results["at"] == t0  # at once, not at the 30 s deadline


async def test_ops_queued_when_the_runtime_closes_fail_unavailable_before_their_deadline(
        open_runtime, autojump_clock):
    results: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        async with open_runtime(reply_send_seconds=5) as rt:
            tid = (await rt.create_thread())["id"]
            blocker = await block_engine(rt, tid)  # wedged until its reply bound: 5 s

            async def queued_request() -> None:
                try:
                    results["snapshot"] = await rt.get_session_snapshot(tid, timeout=30)
                except EngineUnavailable as exc:
                    results["snapshot"] = exc
                results["at"] = trio.current_time()

            nursery.start_soon(queued_request)
            await trio.testing.wait_all_tasks_blocked()
            assert inbox_used(rt, tid) == 1
            t0 = trio.current_time()
        # Leaving the block stopped the engine: once its wedged reply gave up it failed the queued op.
        closed_at = trio.current_time()
    blocker.close()

    assert isinstance(results["snapshot"], EngineUnavailable)
    assert results["at"] == pytest.approx(t0 + 5, abs=1e-9)  # the wedge's bound, not the 30 s deadline
    assert closed_at == pytest.approx(t0 + 5, abs=1e-9)


async def test_ops_queued_behind_an_op_that_crashes_the_engine_fail_unavailable_at_once(
        open_runtime, monkeypatch, autojump_clock):
    async with open_runtime(reply_send_seconds=1000) as rt:
        tid = (await rt.create_thread(title="crashing"))["id"]
        await run_turn(rt, tid, "hello")
        before = await rt.get_session_snapshot(tid)
        engine = rt.manager.engine(tid)
        blocker = await block_engine(rt, tid)

        def crash(op: ops.Compact) -> None:
            raise RuntimeError("bug in an op handler")

        monkeypatch.setattr(engine, "_on_compact", crash)
        results: dict[str, tuple[object, float]] = {}

        async def ask(name: str, request) -> None:
            try:
                results[name] = (await request(), trio.current_time())
            except (EngineUnavailable, EngineTimeout) as exc:
                results[name] = (exc, trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "compact", lambda: rt.compact(tid, timeout=60))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(ask, "snapshot", lambda: rt.get_session_snapshot(tid, timeout=60))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(ask, "update", lambda: rt.update_thread(tid, {"title": "never"}, timeout=60))
            await trio.testing.wait_all_tasks_blocked()
            assert inbox_used(rt, tid) == 3  # the crashing op, and two queued behind it
            t0 = trio.current_time()
            blocker.close()  # release the engine: it takes the compact and crashes

        assert engine.crashed
        for name in ("compact", "snapshot", "update"):
            error, at = results[name]
            assert at == t0, f"{name} failed at t0 + {at - t0} s ({error!r}), not at once"
            assert isinstance(error, EngineUnavailable) and status_for(error) == 503, (name, error)
        assert "stopped before it could" in results["snapshot"][0].message
        # Nothing queued was applied, and the successor restores exactly the state before the crash.
        t1 = trio.current_time()
        after = await rt.get_session_snapshot(tid, timeout=5)
        assert trio.current_time() == t1
        assert rt.manager.engine(tid) is not engine and rt.manager.spawned == 2
        assert (after.messages, after.total_tokens, after.title) == (before.messages, before.total_tokens, "crashing")
        assert (await rt.thread_record(tid))["title"] == "crashing"


async def test_an_op_applied_before_its_engine_crashes_still_answers_with_its_committed_outcome(
        open_runtime, tmp_path, monkeypatch):
    # The update is applied and its write queued, but the write cannot commit yet (SQLite's write lock is
    # held from outside); then another op crashes the engine. The update happened, so its requester must
    # hear so: a 503 says "nothing happened", and a client retrying on it would apply it twice.
    async with open_runtime() as rt:
        tid = (await rt.create_thread(title="before"))["id"]
        engine = (await rt.manager.handle(tid)) and rt.manager.engine(tid)

        def crash(op: ops.Compact) -> None:
            raise RuntimeError("bug in an op handler")

        monkeypatch.setattr(engine, "_on_compact", crash)
        lock = sqlite3.connect(tmp_path / "runtime.sqlite3", isolation_level=None)
        results: dict[str, object] = {}

        async def update() -> None:
            try:
                results["update"] = await rt.update_thread(tid, {"title": "applied"}, timeout=10)
            except EngineUnavailable as exc:
                results["update"] = exc

        try:
            lock.execute("BEGIN IMMEDIATE")  # the store's writer now waits (busy_timeout) on every commit
            with trio.fail_after(3):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(update)
                    await trio.testing.wait_all_tasks_blocked()  # applied; its reply waits for the commit
                    assert engine.thread["title"] == "applied" and "update" not in results
                    with pytest.raises(EngineUnavailable):
                        await rt.compact(tid, timeout=10)
                    lock.execute("ROLLBACK")  # let the writer commit
        finally:
            if lock.in_transaction:
                lock.execute("ROLLBACK")
            lock.close()

        assert engine.crashed
        assert not isinstance(results["update"], EngineUnavailable), results["update"]
        assert results["update"]["title"] == "applied"
        assert (await rt.thread_record(tid))["title"] == "applied"
        assert (await rt.get_session_snapshot(tid, timeout=5)).title == "applied"  # the successor agrees


async def test_shutdown_thread_interrupts_the_running_turn(rt, thread_id, autojump_clock):
    running = await rt.start_turn(thread_id, "/hang")

    await rt.shutdown_thread(thread_id)
    end = await wait_turn_end(rt, thread_id, running["id"])

    assert end.payload["status"] == "interrupted"
    assert end.payload["error"] == "engine shut down"
    assert (await turn_record(rt, thread_id, running["id"]))["status"] == "interrupted"


async def test_request_right_after_shutdown_thread_is_served_by_a_new_engine(rt, thread_id, autojump_clock):
    await run_turn(rt, thread_id, "remember me")
    before = await rt.get_session_snapshot(thread_id)

    await rt.shutdown_thread(thread_id)
    # "the next use restores a new one" (Runtime.shutdown_thread)
    after = await rt.get_session_snapshot(thread_id, timeout=5)

    assert after.messages == before.messages
    assert rt.manager.spawned == 2


async def test_snapshot_after_a_turn_ends_never_runs_ahead_of_the_store(open_runtime, tmp_path):
    # DESIGN.md: "A snapshot is taken from committed state only". Hold SQLite's write lock from outside
    # so the turn's final record cannot commit, let the turn finish, then ask for a snapshot.
    model = GatedModel()
    async with open_runtime(model_factory=lambda: model) as rt:
        tid = (await rt.create_thread())["id"]
        turn = await rt.start_turn(tid, "hello there")
        lock = sqlite3.connect(tmp_path / "runtime.sqlite3", isolation_level=None)
        reader = sqlite3.connect(tmp_path / "runtime.sqlite3")
        got = []
        try:
            lock.execute("BEGIN IMMEDIATE")  # the store's writer now waits (busy_timeout) on every commit
            with trio.fail_after(3):
                model.gate.set()
                await model.finished.wait()
                await trio.testing.wait_all_tasks_blocked()  # the engine closed the turn; its record waits

                async def ask() -> None:
                    snapshot = await rt.get_session_snapshot(tid, wait_for_idle=True, timeout=2)
                    # What is durable at the moment the snapshot is answered:
                    (status,) = reader.execute("SELECT status FROM turns WHERE id = ?", (turn["id"],)).fetchone()
                    got.append((snapshot.turn_in_progress, len(snapshot.messages), status))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ask)
                    await trio.testing.wait_all_tasks_blocked()
                    lock.execute("ROLLBACK")  # let the writer commit
        finally:
            if lock.in_transaction:
                lock.execute("ROLLBACK")
            lock.close()
            reader.close()

    [(in_progress, message_count, stored_status)] = got
    assert (in_progress, message_count) == (False, 2)
    assert stored_status == "completed", "snapshot reported a turn end the store had not committed"
