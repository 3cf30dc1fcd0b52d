"""The runtime's side of Idempotency-Key (runtime/idempotency.py): the in-flight table, stored answers and
their expiry, a request that gives up mid-write, and the record committing with its change or not at all
at every SQLite step (the fault seam, tests/faults/seam.py). Judged from the database."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from runtime import EngineUnavailable, IdempotencyKeyInProgress, IdempotencyKeyReused, Runtime, clock, codec
from runtime.idempotency import PURGE_BATCH, Claim
from tests.cancellation.harness import check_invariants
from tests.faults.harness import FaultRun, every_step
from tests.faults.seam import FaultPlan
from tests.support import clock_ticking, held_writer, open_runtime


# The test's PostgreSQL database when it runs on that backend (set by the autouse fixture below), else None.
_PG_URL: list[str | None] = [None]


@pytest.fixture(autouse=True)
def _backend_of_rows(request):
    _PG_URL[0] = request.getfixturevalue("store_url") if "store_url" in request.fixturenames else None
    yield
    _PG_URL[0] = None


def _rows(data_dir: Path, sql: str, *params: Any, many: list | None = None) -> list[tuple]:
    """Run ``sql`` on the test's database through a connection of its own (committed); ``many``: executemany."""
    if _PG_URL[0] is not None:
        import psycopg

        with psycopg.connect(_PG_URL[0], autocommit=True) as pg:
            if many is not None:
                pg.cursor().executemany(sql.replace("?", "%s"), many)
                return []
            return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                    for row in pg.execute(sql.replace("?", "%s"), params).fetchall()]
    db = sqlite3.connect(data_dir / "runtime.sqlite3")
    try:
        with db:
            if many is not None:
                db.executemany(sql, many)
                return []
            return db.execute(sql, params).fetchall()
    finally:
        db.close()


async def keyed_create(rt: Runtime, key: str, title: str) -> tuple[bytes, bool]:
    """What web/idempotency.py does around POST /v1/threads: (answer bytes, replayed?)."""
    with rt.idempotency.hold(key, f"create {title}") as slot:
        stored = await rt.idempotency.lookup(key, slot.fingerprint)
        if stored is not None:
            return stored.body, True
        claim = slot.claim(201, codec.dumps)
        await rt.create_thread(title=title, claim=claim)
        assert claim.body is not None
        return claim.body, False


async def test_a_stored_answer_is_replayed_and_a_different_request_is_refused(rt, tmp_path):
    body, replayed = await keyed_create(rt, "k", "first")
    assert not replayed and json.loads(body)["title"] == "first"
    assert await keyed_create(rt, "k", "first") == (body, True)
    with pytest.raises(IdempotencyKeyReused) as info:
        await keyed_create(rt, "k", "second")
    assert info.value.message.startswith("Idempotency-Key 'k' was already used for a different request")
    assert _rows(tmp_path, "SELECT title FROM threads") == [("first",)]


async def test_a_held_key_is_in_progress_without_a_checkpoint_between_check_and_set(rt):
    with rt.idempotency.hold("busy", "fp"):
        with pytest.raises(IdempotencyKeyInProgress) as info:
            with rt.idempotency.hold("busy", "fp"):
                pass  # pragma: no cover
        assert info.value.code == "idempotency_key_in_progress"
        with rt.idempotency.hold("other", "fp"):  # other keys are free
            pass
    with rt.idempotency.hold("busy", "fp"):  # released on exit
        pass


async def test_an_expired_answer_is_ignored_and_the_request_executes_again(open_runtime, tmp_path):
    async with open_runtime(idempotency_ttl=0) as rt:
        first, replayed = await keyed_create(rt, "k", "again")
        second, replayed_again = await keyed_create(rt, "k", "again")
    assert (replayed, replayed_again) == (False, False)
    assert json.loads(first)["id"] != json.loads(second)["id"]
    assert len(_rows(tmp_path, "SELECT id FROM threads")) == 2
    # The expired row was replaced by the new answer.
    assert _rows(tmp_path, "SELECT key, body FROM idempotency") == [("k", second)]


async def test_each_new_record_purges_a_bounded_batch_of_expired_ones(open_runtime, tmp_path):
    async with open_runtime(idempotency_ttl=0) as rt:
        for i in range(PURGE_BATCH + 3):
            await keyed_create(rt, f"k{i}", f"t{i}")
        # Each record's purge (queued with its claim, one at a time) deleted the expired ones before it (at
        # most PURGE_BATCH): only the last is left.
        assert _rows(tmp_path, "SELECT key FROM idempotency") == [(f"k{PURGE_BATCH + 2}",)]
        _rows(tmp_path, "INSERT INTO idempotency VALUES (?, 'fp', 201, '{}', ?, '2000-01-01', '2000-01-01')",
              many=[(f"old{i}", b"\x00") for i in range(PURGE_BATCH + 5)])
        await keyed_create(rt, "new", "new")
        # Oldest first, PURGE_BATCH of them: 5 of the old rows and the previous record are left for later.
        left = {key for (key,) in _rows(tmp_path, "SELECT key FROM idempotency")}
        assert left == {f"old{i}" for i in range(PURGE_BATCH, PURGE_BATCH + 5)} | {f"k{PURGE_BATCH + 2}", "new"}
    assert len(_rows(tmp_path, "SELECT id FROM threads")) == PURGE_BATCH + 4


async def test_records_queued_together_share_one_purge_and_its_allowance_is_kept_for_the_next(open_runtime,
                                                                                              tmp_path):
    """Three keyed creates queued behind a held writer: the first claim queued a purge, the other two found
    it still queued and added their allowance to the debt instead of a DELETE each (row 15: one purge per
    writer batch, not one per record). The next record's purge spends all three allowances and its own."""
    async with open_runtime() as rt:
        _rows(tmp_path, "INSERT INTO idempotency VALUES (?, 'fp', 201, '{}', ?, '2000-01-01', '2000-01-01')",
              many=[(f"old{i:02}", b"\x00") for i in range(3 * PURGE_BATCH - 8)])
        claims: list[Claim] = []

        async def create(i: int) -> None:
            with rt.idempotency.hold(f"k{i}", "fp") as slot:
                assert await rt.idempotency.lookup(f"k{i}", "fp") is None
                claims.append(slot.claim(201, codec.dumps))
                await rt.create_thread(title=f"t{i}", claim=claims[-1])

        with held_writer(rt) as release:
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(create, i)
                while len(claims) < 3 or not all(c.pending for c in claims):
                    await trio.testing.wait_all_tasks_blocked()
                release.set()
        old = "SELECT COUNT(*) FROM idempotency WHERE key LIKE ?"
        assert _rows(tmp_path, old, "old%") == [(2 * PURGE_BATCH - 8,)]  # one purge: one record's allowance
        await keyed_create(rt, "k3", "t3")
        assert _rows(tmp_path, old, "old%") == [(0,)]  # four records' allowance: every expired row
        assert _rows(tmp_path, "SELECT COUNT(*) FROM idempotency") == [(4,)]


def test_one_purge_write_at_a_time_spends_a_bounded_allowance_and_keeps_the_rest():
    """``Idempotency.claimed`` against a store that only queues: a claim made while a purge is queued adds
    its allowance to the debt; one purge spends PURGE_RECORDS_MAX records' worth at most."""
    from runtime.idempotency import PURGE_RECORDS_MAX, Idempotency
    from runtime.store import WriteRequest

    class Queue:
        def __init__(self) -> None:
            self.queued: list[WriteRequest] = []

        def submit(self, request: WriteRequest) -> WriteRequest:
            self.queued.append(request)
            return request

    store = Queue()
    service = Idempotency(store)  # type: ignore[arg-type]
    limits = lambda: [request.statements[0][1][1] for request in store.queued]  # noqa: E731
    service.claimed()
    for _ in range(PURGE_RECORDS_MAX + 9):
        service.claimed()  # the first purge is still queued
    assert limits() == [PURGE_BATCH]
    store.queued[-1].finish()
    service.claimed()
    assert limits() == [PURGE_BATCH, PURGE_BATCH * PURGE_RECORDS_MAX]
    store.queued[-1].finish()
    service.claimed()
    assert limits() == [PURGE_BATCH, PURGE_BATCH * PURGE_RECORDS_MAX, PURGE_BATCH * 11]


def clock_ahead(monkeypatch: Any) -> list[float]:
    """runtime.clock's wall clock runs the given number of seconds ahead of the real one (the list's one
    item, 0 at first; set it to jump)."""
    import datetime as real
    import types

    from runtime import clock

    ahead = [0.0]

    class Ahead(real.datetime):
        @classmethod
        def now(cls, tz=None):
            return real.datetime.now(tz) + real.timedelta(seconds=ahead[0])

    monkeypatch.setattr(clock, "_dt", types.SimpleNamespace(datetime=Ahead, timezone=real.timezone,
                                                             timedelta=real.timedelta))
    return ahead


def purges_queued(rt: Runtime) -> list[Any]:
    """The purge writes queued from now on (the store's ``submit`` watched)."""
    queued: list[Any] = []
    submit = rt.store.submit

    def watching(request):
        if request.action == "purge expired idempotency records":
            queued.append(request)
        return submit(request)

    rt.store.submit = watching  # type: ignore[method-assign]
    return queued


async def test_no_purge_write_is_queued_while_no_record_can_have_expired(rt, tmp_path, monkeypatch, store_url):
    """SQLite (one process owns the file): the first claim's purge finds the earliest expiry stored; until
    that moment, or until this process's own first records can expire (its start plus the ttl), no purge
    write is queued (row 15: a keyed create's writer batch no longer carries a DELETE that can delete
    nothing). Once the clock passes it, the next claim's purge deletes the expired records as before."""
    if store_url is not None:
        pytest.skip("several hosts write the PostgreSQL table: every claim's purge runs there, as before")
    ahead = clock_ahead(monkeypatch)
    _rows(tmp_path, "INSERT INTO idempotency VALUES ('old', 'fp', 201, '{}', ?, ?, ?)",
          many=[(b"\x00", clock.utc_now(), clock.utc_after(3600))])
    purges = purges_queued(rt)
    for i in range(3):
        await keyed_create(rt, f"k{i}", f"t{i}")
    assert len(purges) == 1  # the first one: what is stored was not known yet
    ahead[0] = 3600 + 1  # "old" has expired, the records made meanwhile not
    await keyed_create(rt, "k3", "t3")
    assert len(purges) == 2
    assert sorted(_rows(tmp_path, "SELECT key FROM idempotency")) == [("k0",), ("k1",), ("k2",), ("k3",)]
    await keyed_create(rt, "k4", "t4")  # the last purge deleted some: this one looks again, finds none
    await keyed_create(rt, "k5", "t5")  # and the earliest expiry is k0's, a ttl away
    assert len(purges) == 3
    ahead[0] += rt.idempotency.ttl + 60
    await keyed_create(rt, "k6", "t6")  # k0..k5 have expired
    assert len(purges) == 4
    assert _rows(tmp_path, "SELECT key FROM idempotency") == [("k6",)]


async def test_a_records_expiry_is_its_creation_stamp_plus_the_ttl_however_the_clock_moves(rt, tmp_path,
                                                                                              monkeypatch):
    """The wall clock moves 7 ms at every reading: an expiry read from the clock a second time would come
    out 7 ms late (a record kept 24 h and 7 ms)."""
    import datetime as real

    from runtime import clock

    clock_ticking(monkeypatch, milliseconds=7)
    await keyed_create(rt, "k", "ticking")
    ((created, expires),) = _rows(tmp_path, "SELECT created_at, expires_at FROM idempotency WHERE key = 'k'")
    assert clock.parse_utc(expires) - clock.parse_utc(created) == real.timedelta(seconds=rt.idempotency.ttl)


def test_a_stamp_parses_back_to_the_moment_it_was_made_and_other_text_is_refused():
    """The stamp's text, parse_utc's fast path (fromisoformat for exactly utc_now's format) and its strict
    fallback."""
    import datetime as real

    from runtime import clock

    moment = real.datetime(2026, 12, 3, 12, 0, 5, 42_000, tzinfo=real.timezone.utc)
    assert clock.parse_utc("2026-12-03T12:00:05.042Z") == moment
    assert clock.parse_utc("2026-12-03T12:00:05.042Z").utcoffset() == real.timedelta(0)
    assert clock.parse_utc("2026-12-03T12:00:05.042000Z") == moment  # the fallback's %f takes 6 digits too
    # Fixed width, so stamps sort as text, for every moment (strftime's %Y gives "999" for the year 999).
    for when in (moment, real.datetime(999, 1, 2, 3, 4, 5, 999_999, tzinfo=real.timezone.utc),
                 real.datetime(9999, 12, 31, 23, 59, 59, 0, tzinfo=real.timezone.utc)):
        assert clock._stamp(when) == when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    for wrong in ("2026-12-03T12:00:05Z", "2026-12-03T12:00:05.042+00:00", "2026-12-03 12:00:05.042",
                  "2026-12-03T12:00:05.04Z0"):
        with pytest.raises(ValueError):
            clock.parse_utc(wrong)


@pytest.mark.sqlite_only(reason="PostgreSQL has no inline connection: its lookup is always awaited")
async def test_a_lookup_on_sqlite_is_one_select_on_the_spot_and_leaves_no_snapshot_behind(rt, tmp_path):
    """web/idempotency.py reads a keyed request's stored answer with ``lookup_now``: one SELECT on the loop's
    own connection (no BEGIN/ROLLBACK around it), no schedule point. Nothing of it outlives the call: a
    record committed afterwards by another connection is seen, and a checkpoint can empty the WAL."""
    body, _ = await keyed_create(rt, "k", "first")
    traced: list[str] = []
    rt.store._iconn.set_trace_callback(traced.append)
    try:
        with trio.testing.assert_no_checkpoints():
            stored = rt.idempotency.lookup_now("k", "create first")
            missing = rt.idempotency.lookup_now("other", "create first")
    finally:
        rt.store._iconn.set_trace_callback(None)
    assert (stored.status, stored.body, missing) == (201, body, None)
    assert len(traced) == 2 and all(sql.startswith("SELECT fingerprint, status") for sql in traced), traced
    assert not rt.store._iconn.in_transaction
    _rows(tmp_path, "INSERT INTO idempotency VALUES ('later', 'fp', 201, '{}', x'7b7d', '2000-01-01',"
          " '2999-01-01')")
    assert rt.idempotency.lookup_now("later", "fp").body == b"{}"
    outside = sqlite3.connect(tmp_path / "runtime.sqlite3", isolation_level=None)
    try:
        outside.execute("PRAGMA busy_timeout=0")
        busy, _, _ = outside.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        outside.close()
    assert busy == 0  # no reader holds a snapshot of the log


@pytest.mark.sqlite_only(reason="PostgreSQL has no inline connection: its lookup is always awaited")
async def test_a_lookup_that_cannot_answer_on_the_spot_says_so_and_the_awaited_lookup_answers(rt, monkeypatch):
    """SQLite busy on the loop's connection, or an answer too big to read there: ``lookup_now`` answers
    NOT_READ (it never raises the busy error nor blocks), and ``lookup`` reads it in a worker thread."""
    from runtime import idempotency

    small, _ = await keyed_create(rt, "small", "s")
    with rt.idempotency.hold("big", "fp") as slot:
        claim = slot.claim(201, lambda result: b"x" * (idempotency.INLINE_BODY_MAX + 1))
        await rt.create_thread(title="big", claim=claim)
    assert rt.idempotency.lookup_now("big", "fp") is idempotency.NOT_READ
    assert (await rt.idempotency.lookup("big", "fp")).body == claim.body

    real = idempotency._stored_head

    def busy_inline(conn: sqlite3.Connection, **kwargs: Any) -> Any:
        if conn is rt.store._iconn:
            raise sqlite3.OperationalError("database is locked")
        return real(conn, **kwargs)

    monkeypatch.setattr(idempotency, "_stored_head", busy_inline)
    assert rt.idempotency.lookup_now("small", "create s") is idempotency.NOT_READ
    assert (await rt.idempotency.lookup("small", "create s")).body == small
    assert not rt.store._iconn.in_transaction


async def test_a_request_cancelled_while_its_write_is_queued_keeps_its_key_in_progress_until_it_commits(rt, tmp_path):
    with held_writer(rt) as release:
        async with trio.open_nursery() as nursery:
            async def create() -> None:
                with rt.idempotency.hold("k", "fp") as slot:
                    await rt.create_thread(title="once", claim=slot.claim(201, codec.dumps))

            nursery.start_soon(create)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel(reason="the client went away")
        # The requester is gone; its write (thread + record) is still queued behind the held one.
        with pytest.raises(IdempotencyKeyInProgress):
            with rt.idempotency.hold("k", "fp"):
                pass  # pragma: no cover
        release.set()
    await rt.store.write()  # every write queued before this one is done
    with rt.idempotency.hold("k", "fp") as slot:
        stored = await rt.idempotency.lookup("k", slot.fingerprint)
    assert stored is not None and stored.status == 201 and json.loads(stored.body)["title"] == "once"
    assert _rows(tmp_path, "SELECT title FROM threads") == [("once",)]


async def test_an_op_whose_keyed_requester_gave_up_is_dropped_by_the_engine(rt, thread_id, tmp_path):
    made: list[Claim] = []
    with pytest.raises(RuntimeError):
        with rt.idempotency.hold("k", "fp") as slot:
            made.append(slot.claim(201, codec.dumps))
            raise RuntimeError("the request ended without an answer")
    assert made[0].abandoned
    with pytest.raises(EngineUnavailable):
        await rt.start_turn(thread_id, "never", claim=made[0], timeout=10)
    assert _rows(tmp_path, "SELECT COUNT(*) FROM turns") == [(0,)]
    assert _rows(tmp_path, "SELECT COUNT(*) FROM idempotency") == [(0,)]
    # The retry with the same key runs it, once.
    with rt.idempotency.hold("k", "fp") as slot:
        assert await rt.idempotency.lookup("k", "fp") is None
        turn = await rt.start_turn(thread_id, "once", claim=slot.claim(201, codec.dumps), timeout=10)
    assert _rows(tmp_path, "SELECT id FROM turns") == [(turn["id"],)]
    assert json.loads(_rows(tmp_path, "SELECT body FROM idempotency")[0][0]) == turn


# ---- the record commits with its change, at every SQLite step --------------------------------------

FAULTS = ("sqlite_full", "sqlite_ioerr")


@pytest.mark.parametrize("kind", FAULTS)
@pytest.mark.parametrize("operation", ["create thread", "start turn"])
async def test_a_fault_at_every_step_stores_the_change_and_its_answer_together_or_neither(tmp_path, operation, kind):
    plan, data_dir = FaultPlan(), tmp_path / "data"
    async with open_runtime(data_dir, sqlite_connection_factory=plan.connection_factory()) as rt:
        tid = (await rt.create_thread(title="faults"))["id"]
        run_no = 0

        async def action() -> Any:
            claim = Claim(f"key-{run_no}", "fp", 201, codec.dumps)
            if operation == "create thread":
                return await rt.create_thread(title=f"run {run_no}", claim=claim)
            return await rt.start_turn(tid, f"run {run_no}", claim=claim, timeout=10)

        async def judge(run: FaultRun) -> None:
            nonlocal run_no
            where = f"{operation}, {kind} at step {run.k} ({run.fired})"
            # Let a started turn end (on a successor engine if the fault retired the first).
            await rt.get_session_snapshot(tid, wait_for_idle=True, timeout=10)
            state = await check_invariants(rt, data_dir, (tid,))
            if operation == "create thread":
                made = [t["id"] for t in state.threads.values() if t["title"] == f"run {run_no}"]
            else:
                made = [t["id"] for t in state.turns.values() if t["input_summary"] == f"run {run_no}"]
            records = _rows(data_dir, "SELECT status, body FROM idempotency WHERE key = ?", f"key-{run_no}")
            assert len(made) == len(records) <= 1, f"{where}: changes {made}, records {records}"
            if made:
                assert run.error is None, f"{where}: answered {run.error!r} for a change that was made"
                assert records[0][0] == 201 and json.loads(records[0][1]) == run.value
                assert run.value["id"] == made[0]
            else:
                assert run.error is not None and run.error.message.startswith("Failed to "), where
            run_no += 1

        n = await every_step(plan, action, kind, judge)
        assert n >= 5, f"{operation} took only {n} steps: the plan is not counting"
