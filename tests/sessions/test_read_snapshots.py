"""Reads that combine tables see one snapshot (issue 11, defect 5): POST /v1/sessions (rebuild) and the
thread detail.

Each test makes a write land at an exact point between two SELECTs of one read, by wrapping a records
function the read calls: the rebuild's read runs in a worker thread, so its hook drives a real turn on
the event loop (``trio.from_thread.run``) and waits for its commit; the thread detail's read runs inline
on the loop (on SQLite), so its hook commits through a connection of its own, as another writer would.
On PostgreSQL every read runs in a worker thread on a pooled read connection; the hooks are the same.
"""

from __future__ import annotations

import functools

import pytest
import trio

from runtime import Conflict
from runtime.store import EventDraft, records
from tests import support

from .conftest import LIMIT, dir_snapshot, events_of, read_session_file, run_turn, sessions_dir


def usage_total(turn: dict) -> int:
    usage = turn["usage"] or {"input_tokens": 0, "output_tokens": 0}
    return usage["input_tokens"] + usage["output_tokens"]


def on_loop(afn):
    """Run ``afn`` on the event loop from a read's worker thread and wait for it, in a task of its own:
    ``trio.from_thread.run`` runs it as the task that waits for the thread, and that task holds a token of
    the read limiter (PostgreSQL's pool) that a read of ``afn`` would ask for again."""
    result: list = []

    async def in_own_task() -> None:
        async def run() -> None:
            result.append(await afn())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)

    trio.from_thread.run(in_own_task)
    return result[0]


def in_worker_read(rt, conn) -> bool:
    """Hooks fire only inside the store's worker-thread read, never in inline reads on the loop (on
    PostgreSQL every read is one; the writer's connection is not)."""
    if rt.store.kind == "postgresql":
        return conn is not rt.store._wconn
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
            fired.append(on_loop(second_turn))
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
            on_loop(start_hanging_turn)
        return original_row(conn, thread_id)

    def turn_ends_after_the_items_are_read(conn, thread_id):
        items = original_items(conn, thread_id)
        if in_worker_read(rt, conn) and started:
            on_loop(end_it)
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
        with support.store_connection(rt.config.data_dir) as outside:
            if rt.store.kind == "sqlite":
                outside.execute("PRAGMA busy_timeout=5000")
            outside.execute("BEGIN IMMEDIATE" if rt.store.kind == "sqlite" else "BEGIN")
            outside.execute("INSERT INTO items (id, turn_id, thread_id, ord, kind, status, summary, detail)"
                            " VALUES ('item_late', ?, ?, 99, 'agent_message', 'completed', 'late', 'late')",
                            (turn["id"], tid))
            if rt.store.kind == "sqlite":
                seq = outside.execute(
                    "INSERT INTO events (thread_id, turn_id, item_id, event, timestamp, payload)"
                    " VALUES (?, ?, 'item_late', 'item.completed', '2026-01-01T00:00:00.000Z',"
                    " '{\"kind\":\"agent_message\",\"text\":\"late\"}')", (tid, turn["id"])).lastrowid
            else:  # the store's own event append: the lease-row lock, then the seq (the seq rule)
                seq = outside.append_event(EventDraft(
                    tid, "item.completed", {"kind": "agent_message", "text": "late"}, turn_id=turn["id"],
                    item_id="item_late", timestamp="2026-01-01T00:00:00.000Z")).seq
            outside.execute("COMMIT")
            return seq

    original = records.turns_items
    late: list[int] = []

    def items_after_a_commit(conn, turn_ids):  # the detail has read its page of turns, not yet their items
        if not late:
            late.append(commit_an_item_and_its_event())  # inline read on SQLite: we are on the loop, no trio here
        return original(conn, turn_ids)

    monkeypatch.setattr(records, "turns_items", items_after_a_commit)
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
