"""Durability: the global event seq across reopen, clean shutdown, and recovery after a crash.

A crash is simulated by a consistent SQLite backup taken while the runtime is mid-turn: the copy holds
exactly what a killed process would leave (the turn committed as in_progress, an agent item open),
without anything the clean shutdown writes later.
"""

from __future__ import annotations

import sqlite3

import pytest
import trio

from runtime import StorageError
from runtime.store import RESTART_ERROR
from runtime.transcript import build_messages

from .helpers import collect_events, crash_image, items_of, nth, run_turn, stored_events, turn_record


async def test_event_seq_strictly_increases_across_close_and_reopen(open_runtime, tmp_path):
    async with open_runtime() as rt:
        first = (await rt.create_thread())["id"]
        await run_turn(rt, first, "before the restart")
        before = [e.seq for e in await stored_events(rt, first)]

    async with open_runtime() as rt:
        second = (await rt.create_thread())["id"]
        await run_turn(rt, second, "after the restart")
        await run_turn(rt, first, "old thread, new process")
        after_second = [e.seq for e in await stored_events(rt, second)]
        after_first = [e.seq for e in await stored_events(rt, first)]

    assert before == sorted(set(before))
    assert after_first[: len(before)] == before  # history kept as it was
    new = sorted(after_second + after_first[len(before):])
    assert len(new) == len(set(new))
    assert min(new) > max(before)


async def test_leaving_the_runtime_interrupts_running_turns_and_records_them(open_runtime, autojump_clock):
    async with open_runtime() as rt:
        tid = (await rt.create_thread())["id"]
        running = await rt.start_turn(tid, "/hang")

    async with open_runtime() as rt:
        assert rt.store.recovered_turns == 0  # a clean stop leaves nothing to recover
        record = await turn_record(rt, tid, running["id"])
        assert record["status"] == "interrupted"
        assert record["error"] == "server shutting down"
        events = await stored_events(rt, tid)
        assert events[-1].event == "turn.completed" and events[-1].payload["status"] == "interrupted"
        assert (await run_turn(rt, tid, "new process"))["status"] == "completed"


async def test_restart_after_a_crash_marks_in_progress_turn_and_items_interrupted(
        open_runtime, tmp_path, autojump_clock):
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    prompt = "/slow 100\none two three four five six seven eight nine ten"
    async with open_runtime(data_dir=live) as rt:
        tid = (await rt.create_thread())["id"]
        await run_turn(rt, tid, "before the crash")
        turn = await rt.start_turn(tid, prompt)
        await collect_events(rt, tid, nth("item.delta", 2, turn["id"]))
        last_seq = await trio.to_thread.run_sync(crash_image, live, crashed)

    async with open_runtime(data_dir=crashed) as rt:
        assert rt.store.recovered_turns == 1
        record = await turn_record(rt, tid, turn["id"])
        assert record["status"] == "interrupted"
        assert record["error"] == RESTART_ERROR == "interrupted by process restart"
        assert record["ended_at"] is not None
        items = items_of(await rt.get_thread(tid), turn["id"])
        assert [(i["kind"], i["status"]) for i in items] == [("user_message", "completed"),
                                                             ("agent_message", "interrupted")]

        recovery = await stored_events(rt, tid, since_seq=last_seq)
        assert [e.event for e in recovery] == ["item.interrupted", "turn.completed"]
        assert all(e.turn_id == turn["id"] for e in recovery)
        assert recovery[0].item_id == items[1]["id"]
        assert recovery[1].payload["status"] == "interrupted"
        assert recovery[1].payload["error"] == RESTART_ERROR
        assert min(e.seq for e in recovery) > last_seq

        # The restored engine is idle, holds the crashed turn's prompt, and serves new turns.
        snapshot = await rt.get_session_snapshot(tid)
        assert snapshot.turn_in_progress is False
        assert snapshot.messages[-1] == {"role": "user", "content": [{"type": "text", "text": prompt}]}
        assert list(snapshot.messages) == build_messages([], (await rt.get_thread(tid))["items"])
        nxt = await run_turn(rt, tid, "after the crash")
        assert nxt["status"] == "completed"
        assert min(e.seq for e in await stored_events(rt, tid, since_seq=last_seq)) > last_seq


async def test_restart_after_a_crash_interrupts_queued_turns_too(open_runtime, tmp_path):
    async with open_runtime() as rt:
        tid = (await rt.create_thread())["id"]
        await run_turn(rt, tid, "hello")
        last_seq = (await rt.get_thread(tid))["latest_seq"]
    db = sqlite3.connect(tmp_path / "runtime.sqlite3")
    with db:
        db.execute("INSERT INTO turns (id, thread_id, ord, status, input_summary, created_at)"
                   " VALUES ('turn_queued', ?, 99, 'queued', 'waiting', '2026-01-01T00:00:00.000Z')", (tid,))
    db.close()

    async with open_runtime() as rt:
        assert rt.store.recovered_turns == 1
        record = await turn_record(rt, tid, "turn_queued")
        assert (record["status"], record["error"]) == ("interrupted", RESTART_ERROR)
        [event] = await stored_events(rt, tid, since_seq=last_seq)
        assert (event.event, event.turn_id, event.payload["status"]) == ("turn.completed", "turn_queued",
                                                                         "interrupted")
        assert event.seq > last_seq


async def test_a_turn_the_store_refused_is_forgotten_by_the_engine(open_runtime, tmp_path):
    async with open_runtime() as rt:
        tid = (await rt.create_thread())["id"]
        await rt.get_session_snapshot(tid, timeout=10)  # the engine is live
        outside = sqlite3.connect(tmp_path / "runtime.sqlite3")
        outside.execute("CREATE TRIGGER refuse BEFORE INSERT ON turns BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
        outside.commit()
        with pytest.raises(StorageError, match="Failed to write to the store: disk says no"):
            await rt.start_turn(tid, "never recorded", timeout=10)
        snapshot = await rt.get_session_snapshot(tid, timeout=10)
        assert not snapshot.turn_in_progress and snapshot.messages == ()
        outside.execute("DROP TRIGGER refuse")
        outside.commit()
        outside.close()
        turn = await rt.start_turn(tid, "recorded now", timeout=10)
        after = await rt.get_session_snapshot(tid, wait_for_idle=True, timeout=10)
        assert [m["role"] for m in after.messages] == ["user", "assistant"]
        assert (await rt.get_thread(tid))["turns"][-1]["id"] == turn["id"]
