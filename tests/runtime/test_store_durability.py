"""Durability: the global event seq across reopen, clean shutdown, recovery after a crash, and the
writer surviving every storage failure.

A crash is simulated by a consistent SQLite backup taken while the runtime is mid-turn: the copy holds
exactly what a killed process would leave (the turn committed as in_progress, an agent item open),
without anything the clean shutdown writes later.

Storage failures come from the fault seam (tests/faults/seam.py): a real SQLite connection that fails
its k-th statement with the real error, rolling the transaction back first where SQLite does. Writes
submitted in one scheduling step form one batch (the writer takes everything queued), so a test can
place a fault on an exact statement of an exact request and read the outcome from the database.
"""

from __future__ import annotations

import json
import sqlite3

import outcome
import pytest
import trio

from runtime import StorageError, StorageFull
from runtime.store import RESTART_ERROR, Store, WriteLane, WriteRequest, EventDraft
from runtime.transcript import build_messages
from tests.faults.seam import FaultPlan

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


@pytest.mark.sqlite_only(reason="a crash is an SQLite backup taken mid-turn; on PostgreSQL a thread is recovered at a lease takeover (tests/cluster)")
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

        # The interrupted item keeps the text that streamed before the crash: its deltas concatenate to it.
        streamed = "".join(e.payload["delta"] for e in await stored_events(rt, tid)
                           if e.event == "item.delta" and e.item_id == items[1]["id"])
        assert streamed.startswith("You said:") and items[1]["detail"] == streamed
        # The restored engine is idle, holds the crashed turn's prompt and partial answer, and serves new turns.
        snapshot = await rt.get_session_snapshot(tid)
        assert snapshot.turn_in_progress is False
        assert snapshot.messages[-2] == {"role": "user", "content": [{"type": "text", "text": prompt}]}
        assert snapshot.messages[-1] == {"role": "assistant", "content": [{"type": "text", "text": streamed}],
                                         "interrupted": True}
        assert list(snapshot.messages) == build_messages([], (await rt.get_thread(tid))["items"])
        nxt = await run_turn(rt, tid, "after the crash")
        assert nxt["status"] == "completed"
        assert min(e.seq for e in await stored_events(rt, tid, since_seq=last_seq)) > last_seq


@pytest.mark.sqlite_only(reason="a crash is an SQLite backup taken mid-turn; on PostgreSQL a thread is recovered at a lease takeover (tests/cluster)")
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


@pytest.mark.sqlite_only(reason="an SQLite trigger written into the database file refuses the insert")
async def test_a_turn_the_store_refused_is_forgotten_by_the_engine(open_runtime, tmp_path):
    async with open_runtime() as rt:
        tid = (await rt.create_thread())["id"]
        await rt.get_session_snapshot(tid, timeout=10)  # the engine is live
        outside = sqlite3.connect(tmp_path / "runtime.sqlite3")
        outside.execute("CREATE TRIGGER refuse BEFORE INSERT ON turns BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
        outside.commit()
        with pytest.raises(StorageError, match=f"^Failed to start a turn on thread '{tid}': disk says no$"):
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


# ---- the writer under storage failures ------------------------------------------------------

# The writer's statements for a batch of thread inserts, one request each: BEGIN, then per request
# SAVEPOINT, INSERT thread, INSERT event, RELEASE; then COMMIT. The tests below place faults by these.
BEGIN, FIRST_INSERT, STEPS_PER_REQUEST = 1, 3, 4


def _thread_write(name: str, lane: WriteLane | None = None) -> WriteRequest:
    return WriteRequest(
        statements=[("INSERT INTO threads (id, created_at, updated_at, model, mode) VALUES (?, 'now', 'now', 'm', 'd')",
                     (name,))],
        events=[EventDraft(name, "thread.started", {"name": name})],
        action=f"create thread '{name}'", lane=lane)


def _stored_threads(path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [row[0] for row in db.execute("SELECT id FROM threads ORDER BY id")]
    finally:
        db.close()


def _stored_event_threads(path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [row[0] for row in db.execute("SELECT thread_id FROM events ORDER BY seq")]
    finally:
        db.close()


async def _batch(store: Store, *requests: WriteRequest) -> list[WriteRequest]:
    """Submit in one step (so the writer takes them as one batch) and wait for every outcome."""
    for request in requests:
        store.submit(request)
    for request in requests:
        await request.done.wait()
    return list(requests)


def _error(request: WriteRequest) -> BaseException:
    assert isinstance(request.result, outcome.Error), f"{request.action} did not fail"
    assert request.committed == []
    return request.result.error


@pytest.fixture
async def faulty_store(tmp_path):
    """A Store on the fault seam, and every event it published (in order)."""
    plan, published = FaultPlan(), []
    async with Store.open(tmp_path / "db.sqlite3", published.extend,
                          connection_factory=plan.connection_factory()) as store:
        yield store, plan, published


async def test_a_full_disk_at_commit_fails_the_batch_and_the_writer_keeps_writing(faulty_store, tmp_path):
    store, plan, published = faulty_store
    plan.arm(BEGIN + 2 * STEPS_PER_REQUEST + 1, "sqlite_full")  # the COMMIT of a two-request batch
    a, b = await _batch(store, _thread_write("a"), _thread_write("b"))
    assert plan.fired == "sqlite:COMMIT"
    for request in (a, b):
        error = _error(request)
        assert isinstance(error, StorageFull) and error.code == "insufficient_storage"
        assert error.message == (f"Failed to {request.action}: the store could not commit "
                                 "(database or disk is full)")
    plan.disarm()
    assert published == [] and _stored_threads(tmp_path / "db.sqlite3") == []
    # The writer survived (it used to die on its own ROLLBACK: "no transaction is active").
    (c,) = await _batch(store, _thread_write("c"))
    assert c.result == outcome.Value(None)
    assert [e.thread_id for e in published] == ["c"] == _stored_threads(tmp_path / "db.sqlite3")


async def test_sqlite_rolling_back_by_itself_mid_batch_fails_every_write_it_lost(faulty_store, tmp_path):
    store, plan, published = faulty_store
    # b's INSERT fails and SQLite rolls the whole transaction back, a (already applied) with it.
    plan.arm(BEGIN + STEPS_PER_REQUEST + FIRST_INSERT - 1, "sqlite_full", rollback=True)
    a, b, c = await _batch(store, _thread_write("a"), _thread_write("b"), _thread_write("c"))
    plan.disarm()
    assert plan.fired == "sqlite:INSERT"
    assert _error(a).message == ("Failed to create thread 'a': the transaction was rolled back after another "
                                 "write failed (database or disk is full)")
    assert _error(b).message == "Failed to create thread 'b': database or disk is full"
    assert isinstance(_error(a), StorageFull) and isinstance(_error(b), StorageFull)
    # c was not applied yet when the transaction was lost: it went on in a new one.
    assert c.result == outcome.Value(None)
    assert _stored_threads(tmp_path / "db.sqlite3") == ["c"] == [e.thread_id for e in published]
    assert _stored_event_threads(tmp_path / "db.sqlite3") == ["c"]


async def test_a_failing_statement_that_sqlite_did_not_roll_back_fails_only_its_own_write(faulty_store, tmp_path):
    store, plan, published = faulty_store
    plan.arm(BEGIN + STEPS_PER_REQUEST + FIRST_INSERT - 1, "sqlite_ioerr")
    a, b, c = await _batch(store, _thread_write("a"), _thread_write("b"), _thread_write("c"))
    plan.disarm()
    error = _error(b)
    assert type(error) is StorageError and error.message == "Failed to create thread 'b': disk I/O error"
    assert a.result == c.result == outcome.Value(None)
    assert _stored_threads(tmp_path / "db.sqlite3") == ["a", "c"] == [e.thread_id for e in published]


async def test_a_savepoint_that_cannot_open_fails_only_its_own_write(faulty_store, tmp_path):
    store, plan, published = faulty_store
    plan.arm(BEGIN + STEPS_PER_REQUEST + 1, "sqlite_full")  # b's SAVEPOINT: nothing of b ran
    a, b, c = await _batch(store, _thread_write("a"), _thread_write("b"), _thread_write("c"))
    plan.disarm()
    assert plan.fired == "sqlite:SAVEPOINT"
    assert _error(b).message == "Failed to create thread 'b': database or disk is full"
    assert a.result == c.result == outcome.Value(None)
    assert _stored_threads(tmp_path / "db.sqlite3") == ["a", "c"] == [e.thread_id for e in published]


async def test_a_failing_begin_fails_its_batch_and_the_next_batch_commits(faulty_store, tmp_path):
    store, plan, published = faulty_store
    plan.arm(BEGIN, "sqlite_ioerr")
    a, b = await _batch(store, _thread_write("a"), _thread_write("b"))
    plan.disarm()
    assert plan.fired == "sqlite:BEGIN"
    assert _error(a).message == ("Failed to create thread 'a': the store could not begin a transaction "
                                 "(disk I/O error)")
    assert _error(b).message.startswith("Failed to create thread 'b': the store could not begin")
    (c,) = await _batch(store, _thread_write("c"))
    assert c.result == outcome.Value(None) and _stored_threads(tmp_path / "db.sqlite3") == ["c"]


async def test_a_connection_that_cannot_roll_back_is_replaced_and_the_writer_goes_on(tmp_path):
    broken = {"rollback": False}

    class StuckConnection(sqlite3.Connection):
        """Fails one statement, then every ROLLBACK while ``broken``: the transaction cannot be left."""

        def execute(self, sql, parameters=(), /):
            if broken["rollback"] and sql.startswith("ROLLBACK"):
                raise sqlite3.OperationalError("disk I/O error")
            if sql.startswith("INSERT INTO threads") and parameters == ("b",):
                broken["rollback"] = True
                raise sqlite3.OperationalError("disk I/O error")
            return super().execute(sql, parameters)

    published = []
    async with Store.open(tmp_path / "db.sqlite3", published.extend, connection_factory=StuckConnection) as store:
        original = store._wconn
        a, b = await _batch(store, _thread_write("a"), _thread_write("b"))
        broken["rollback"] = False
        (c,) = await _batch(store, _thread_write("c"))
        assert store._wconn is not original and original is not None
    assert _error(a).message == ("Failed to create thread 'a': the transaction was rolled back after another "
                                 "write failed (disk I/O error)")
    assert _error(b).message == "Failed to create thread 'b': disk I/O error"
    assert c.result == outcome.Value(None)
    assert _stored_threads(tmp_path / "db.sqlite3") == ["c"] == [e.thread_id for e in published]


async def test_a_lane_stops_at_its_first_failure_and_tells_its_producer_once(faulty_store, tmp_path):
    store, plan, published = faulty_store
    heard = []
    lane = WriteLane(on_failure=lambda error: heard.append((error.message, first.done.is_set())))
    first, second, other, third = (_thread_write("l1", lane), _thread_write("l2", lane), _thread_write("x"),
                                   _thread_write("l3", lane))
    plan.arm(BEGIN + FIRST_INSERT - 1, "sqlite_ioerr")  # l1's INSERT
    await _batch(store, first, second, other)
    await _batch(store, third)  # a later batch: the lane is still stopped
    plan.disarm()
    assert _error(first).message == "Failed to create thread 'l1': disk I/O error" and not first.skipped
    for skipped in (second, third):
        assert skipped.skipped
        assert _error(skipped).message == (f"Failed to {skipped.action}: an earlier write of its thread failed "
                                           "(Failed to create thread 'l1': disk I/O error)")
    assert other.result == outcome.Value(None)
    # Told once, with the first error, before anyone waiting on that write woke.
    assert heard == [("Failed to create thread 'l1': disk I/O error", False)]
    assert _stored_threads(tmp_path / "db.sqlite3") == ["x"] == [e.thread_id for e in published]


@pytest.mark.sqlite_only(reason="the SQLite fault seam fails recovery's COMMIT")
async def test_a_recovery_that_cannot_commit_reports_the_disk_error_itself(open_runtime, tmp_path):
    async with open_runtime() as rt:
        tid = (await rt.create_thread())["id"]
    db = sqlite3.connect(tmp_path / "runtime.sqlite3")
    with db:
        db.execute("INSERT INTO turns (id, thread_id, ord, status, input_summary, created_at)"
                   " VALUES ('turn_open', ?, 1, 'in_progress', 'crashed', '2026-01-01T00:00:00.000Z')", (tid,))
    db.close()
    plan = FaultPlan()
    # Recovery: BEGIN, the SELECT of threads to settle, two SELECTs of that thread, the turn's UPDATE and its
    # event, then COMMIT.
    plan.arm(7, "sqlite_full")
    with pytest.raises(StorageError) as info:
        async with Store.open(tmp_path / "runtime.sqlite3", lambda events: None,
                              connection_factory=plan.connection_factory()):
            pass
    assert plan.fired == "sqlite:COMMIT"
    assert info.value.message == (f"Failed to open the store at {tmp_path / 'runtime.sqlite3'}: "
                                  "database or disk is full")
    async with open_runtime() as rt:  # the disk has room again: recovery runs, nothing was half-done
        assert rt.store.recovered_turns == 1
        assert (await turn_record(rt, tid, "turn_open"))["status"] == "interrupted"


async def test_a_lane_told_of_a_failure_that_is_not_sqlite_gets_it_as_a_storage_error(faulty_store, tmp_path):
    store, _plan, published = faulty_store
    heard = []
    lane = WriteLane(on_failure=heard.append)

    def broken(conn):
        raise ValueError("a bug in the request")

    bad = WriteRequest(fn=broken, action="apply a broken request", lane=lane)
    later = _thread_write("after", lane)
    await _batch(store, bad, later)
    assert isinstance(_error(bad), ValueError)  # the request itself sees its own exception
    assert [type(e) for e in heard] == [StorageError]
    assert heard[0].message == "Failed to apply a broken request: a bug in the request"
    assert later.skipped and _stored_threads(tmp_path / "db.sqlite3") == [] and published == []


# ---- event appends in one statement (issue 16) --------------------------------------------------

def _delta(i: int, lane: WriteLane | None = None, thread: str = "thr_t") -> WriteRequest:
    """A request that is one event append and nothing else, as a streamed delta is."""
    return WriteRequest(events=[EventDraft(thread, "item.delta", {"delta": f" w{i}", "kind": "agent_message"},
                                           "turn_t", "item_t")], action=f"append delta {i}", lane=lane)


def _stored_rows(path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return [(seq, thread_id, event, json.loads(payload)) for seq, thread_id, event, payload in db.execute(
            "SELECT seq, thread_id, event, payload FROM events ORDER BY seq")]
    finally:
        db.close()


async def test_lone_event_appends_of_a_batch_take_one_insert_per_128_and_no_savepoints(faulty_store, tmp_path):
    store, plan, published = faulty_store
    plan.arm(None)  # count and log the writer's statements, fail none
    requests = await _batch(store, *(_delta(i) for i in range(300)))
    plan.disarm()
    # BEGIN, 128 + 128 + 44 rows, COMMIT (it was a SAVEPOINT, an INSERT and a RELEASE per event).
    assert plan.log == ["sqlite:BEGIN", "sqlite:INSERT", "sqlite:INSERT", "sqlite:INSERT", "sqlite:COMMIT"]
    assert all(request.result == outcome.Value(None) for request in requests)
    assert [e.payload["delta"] for e in published] == [f" w{i}" for i in range(300)]


async def test_event_appends_of_one_batch_get_the_seqs_of_their_stored_rows_in_order(faulty_store, tmp_path):
    store, plan, published = faulty_store
    two = WriteRequest(events=[EventDraft("thr_t", "item.completed", {"kind": "agent_message", "text": "x"}),
                               EventDraft("thr_t", "turn.completed", {"status": "completed"})], action="end a turn")
    requests = await _batch(store, *(_delta(i) for i in range(5)), _thread_write("a"),
                            *(_delta(i) for i in range(5, 300)), two, _delta(300),
                            _delta(301, thread="thr_u"), _delta(302, thread="d\u00e9j\u00e0 \U0001F600"))
    committed = [event for request in requests for event in request.committed]

    rows = _stored_rows(tmp_path / "db.sqlite3")
    assert len(rows) == len(committed) == 306
    assert [(e.seq, e.thread_id, e.event, e.payload) for e in committed] == rows
    assert [e.seq for e in committed] == list(range(rows[0][0], rows[0][0] + 306))
    assert published == committed
    # Each event's stored JSON is the JSON it carries for its subscribers (encoded once).
    assert all(json.loads(e.payload_json) == e.payload for e in committed)


async def test_a_failing_multi_row_insert_is_applied_again_one_request_at_a_time(tmp_path):
    """One event that cannot be written fails its own request (and stops its lane), never its neighbours'."""

    class Poisoned(sqlite3.Connection):
        def execute(self, sql, parameters=(), /):
            if sql.startswith("INSERT INTO events") and any("poison" in str(p) for p in parameters):
                raise sqlite3.IntegrityError("CHECK constraint failed: poison")
            return super().execute(sql, parameters)

    published: list = []
    lane = WriteLane()
    requests = [_delta(0), _delta(1, lane), _delta(2), _delta(3, lane), _delta(4)]
    requests[1].events[0].payload["delta"] = "poison"
    async with Store.open(tmp_path / "db.sqlite3", published.extend, connection_factory=Poisoned) as store:
        await _batch(store, *requests)
        (after,) = await _batch(store, _delta(5))

    assert _error(requests[1]).message == "Failed to append delta 1: CHECK constraint failed: poison"
    assert requests[3].skipped  # the poisoned request's lane stops there
    assert all(r.result == outcome.Value(None) for r in (requests[0], requests[2], requests[4], after))
    rows = _stored_rows(tmp_path / "db.sqlite3")
    assert [row[3]["delta"] for row in rows] == [" w0", " w2", " w4", " w5"]
    assert [(e.seq, e.payload["delta"]) for e in published] == [(row[0], row[3]["delta"]) for row in rows]


async def test_sqlite_rolling_back_at_a_multi_row_insert_fails_the_writes_it_lost(faulty_store, tmp_path):
    store, plan, published = faulty_store
    # a's four statements, then the one INSERT of the three deltas: SQLite rolls everything back.
    plan.arm(BEGIN + STEPS_PER_REQUEST + 1, "sqlite_full", rollback=True)
    a, *deltas, c = await _batch(store, _thread_write("a"), _delta(0), _delta(1), _delta(2), _thread_write("c"))
    plan.disarm()
    assert plan.fired == "sqlite:INSERT"
    assert _error(a).message == ("Failed to create thread 'a': the transaction was rolled back after another "
                                 "write failed (database or disk is full)")
    assert [_error(d).message for d in deltas] == [f"Failed to append delta {i}: database or disk is full"
                                                   for i in range(3)]
    assert all(isinstance(_error(d), StorageFull) for d in deltas)
    # c was not applied yet when the transaction was lost: it went on in a new one.
    assert c.result == outcome.Value(None)
    assert _stored_threads(tmp_path / "db.sqlite3") == ["c"] == [e.thread_id for e in published]
    assert _stored_event_threads(tmp_path / "db.sqlite3") == ["c"]
