"""Reads that combine tables see one snapshot (issue 11, defect 5): POST /v1/sessions (rebuild) and the
thread detail.

Each test makes a write land at an exact point between two SELECTs of one read, by wrapping a records
function the read calls: the rebuild's read runs in a worker thread, so its hook drives a real turn on
the event loop (``trio.from_thread.run``) and waits for its commit; the thread detail's read runs inline
on the loop, so its hook commits through a second SQLite connection, as another writer would.
"""

from __future__ import annotations

import functools
import sqlite3

import pytest
import trio

from runtime import Conflict
from runtime.store import records

from .conftest import LIMIT, dir_snapshot, events_of, read_session_file, run_turn, sessions_dir


def usage_total(turn: dict) -> int:
    usage = turn["usage"] or {"input_tokens": 0, "output_tokens": 0}
    return usage["input_tokens"] + usage["output_tokens"]


def in_worker_read(rt, conn: sqlite3.Connection) -> bool:
    """Hooks fire only inside the store's worker-thread read, never in inline reads on the loop."""
    return conn is rt.store._rconn


async def test_a_turn_that_ends_between_the_rebuilds_reads_is_wholly_out_of_the_session(rt, monkeypatch):
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "hello there")
    [first] = (await rt.get_thread(tid))["turns"]

    async def second_turn() -> str:
        turn = await rt.start_turn(tid, "a second turn")
        await rt.get_session_snapshot(tid, wait_for_idle=True, timeout=LIMIT)  # answered once committed
        return turn["id"]

    original = records.thread_items
    fired: list[str] = []

    def items_then_a_whole_turn(conn, thread_id):
        items = original(conn, thread_id)
        if in_worker_read(rt, conn) and not fired:
            fired.append(trio.from_thread.run(second_turn))
        return items

    monkeypatch.setattr(records, "thread_items", items_then_a_whole_turn)
    post = await rt.sessions.rebuild(thread_id=tid, timeout=LIMIT)
    monkeypatch.undo()

    turns = (await rt.get_thread(tid))["turns"]
    assert [t["id"] for t in turns] == [first["id"], fired[0]] and turns[1]["status"] == "completed"
    doc = read_session_file(rt, post["session_id"])
    # One snapshot: the second turn is in none of the reads, so messages and totals agree.
    assert post["message_count"] == doc["metadata"]["message_count"] == len(doc["messages"]) == 2
    assert [m["content"][0]["text"] for m in doc["messages"]] == ["hello there", "You said: hello there"]
    assert doc["metadata"]["total_tokens"] == usage_total(first)

    again = read_session_file(rt, (await rt.sessions.rebuild(thread_id=tid, timeout=LIMIT))["session_id"])
    assert again["metadata"]["message_count"] == 4
    assert again["metadata"]["total_tokens"] == usage_total(first) + usage_total(turns[1]) > usage_total(first)


async def test_a_turn_running_when_the_rebuild_snapshot_is_taken_is_a_conflict(rt, monkeypatch):
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "hello there")
    started: list[str] = []

    async def start_hanging_turn() -> None:
        started.append((await rt.start_turn(tid, "/hang"))["id"])  # answered once its start committed

    async def end_it() -> None:
        await rt.interrupt_turn(tid, started[0], timeout=LIMIT)
        await rt.get_session_snapshot(tid, wait_for_idle=True, timeout=LIMIT)

    original_row, original_items = records.get_thread_row, records.thread_items

    def turn_starts_before_the_first_select(conn, thread_id):
        if in_worker_read(rt, conn) and not started:
            trio.from_thread.run(start_hanging_turn)
        return original_row(conn, thread_id)

    def turn_ends_after_the_items_are_read(conn, thread_id):
        items = original_items(conn, thread_id)
        if in_worker_read(rt, conn) and started:
            trio.from_thread.run(end_it)
        return items

    monkeypatch.setattr(records, "get_thread_row", turn_starts_before_the_first_select)
    monkeypatch.setattr(records, "thread_items", turn_ends_after_the_items_are_read)
    with pytest.raises(Conflict) as refused:
        await rt.sessions.rebuild(thread_id=tid, timeout=LIMIT)
    monkeypatch.undo()
    assert str(refused.value) == f"Thread '{tid}' has a turn in progress ('{started[0]}')"

    # Nothing of the refused rebuild exists; the turn really ran and ended meanwhile.
    assert dir_snapshot(sessions_dir(rt)) == {}
    assert await events_of(rt, tid, "session.saved") == []
    assert (await rt.get_thread(tid))["turns"][-1]["status"] == "interrupted"
    assert (await rt.thread_record(tid))["session_id"] is None
    post = await rt.sessions.rebuild(thread_id=tid, timeout=LIMIT)
    assert read_session_file(rt, post["session_id"])["metadata"]["message_count"] == 3


async def test_thread_detail_reads_items_and_latest_seq_from_one_snapshot(rt, monkeypatch):
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "hello there")
    before = await rt.get_thread(tid)
    [turn] = before["turns"]

    def commit_an_item_and_its_event() -> int:
        outside = sqlite3.connect(rt.config.db_path, isolation_level=None)
        try:
            outside.execute("PRAGMA busy_timeout=5000")
            outside.execute("BEGIN IMMEDIATE")
            outside.execute("INSERT INTO items (id, turn_id, thread_id, ord, kind, status, summary, detail)"
                            " VALUES ('item_late', ?, ?, 99, 'agent_message', 'completed', 'late', 'late')",
                            (turn["id"], tid))
            seq = outside.execute("INSERT INTO events (thread_id, turn_id, item_id, event, timestamp, payload)"
                                  " VALUES (?, ?, 'item_late', 'item.completed', '2026-01-01T00:00:00.000Z',"
                                  " '{\"kind\":\"agent_message\",\"text\":\"late\"}')", (tid, turn["id"])).lastrowid
            outside.execute("COMMIT")
            return seq
        finally:
            outside.close()

    original = records.thread_turns
    late: list[int] = []

    def turns_after_a_commit(conn, thread_id, items, *rest):
        if not late:
            late.append(commit_an_item_and_its_event())  # inline read: we are on the loop, no trio here
        return original(conn, thread_id, items, *rest)

    monkeypatch.setattr(records, "thread_turns", turns_after_a_commit)
    detail = await rt.get_thread(tid)
    monkeypatch.undo()

    assert late and late[0] > before["latest_seq"]
    assert [i["id"] for i in detail["items"]] == [i["id"] for i in before["items"]]
    assert detail["latest_seq"] == before["latest_seq"]
    # A client that subscribes with since_seq=latest_seq gets exactly what the detail did not show.
    page = await rt.store.read(functools.partial(records.events_after, thread_id=tid, since_seq=detail["latest_seq"]))
    assert [(e.seq, e.item_id, e.event) for e in page] == [(late[0], "item_late", "item.completed")]
    after = await rt.get_thread(tid)
    assert after["latest_seq"] == late[0] and after["items"][-1]["id"] == "item_late"
