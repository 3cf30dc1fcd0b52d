"""Store.read runs each read function inside one read transaction (issue 11, defect 5).

Deterministic: a read function commits a write through a second, real SQLite connection between two of
its own SELECTs, so "a write lands between the reads" happens at an exact point, not by timing. After
every failure or cancellation the read connections must be outside any transaction, which is checked
the way it matters: a later read sees a write committed after the failure.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest
import trio

from runtime import store

THREAD_COUNT = "SELECT COUNT(*) FROM threads"
THREAD_ROW = ("INSERT INTO threads (id, created_at, updated_at, model, mode) VALUES"
              " (?, '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z', 'scripted', 'default')")


def commit_thread_outside(rt, thread_id: str) -> int:
    """Insert a thread through a connection of its own and commit; returns the count it then sees. On
    PostgreSQL (the store suite runs on both backends) the connection is psycopg's, to the same database."""
    if rt.store.kind == "postgresql":
        import psycopg

        with psycopg.connect(rt.config.store_url, autocommit=True) as outside:
            outside.execute(THREAD_ROW.replace("?", "%s"), (thread_id,))
            return outside.execute(THREAD_COUNT).fetchone()[0]
    outside = sqlite3.connect(rt.config.db_path, isolation_level=None)
    try:
        outside.execute("PRAGMA busy_timeout=5000")
        outside.execute(THREAD_ROW, (thread_id,))
        return outside.execute(THREAD_COUNT).fetchone()[0]
    finally:
        outside.close()


def read_connections(rt) -> list:
    """The store's read connections (PostgreSQL: every connection of its read pool)."""
    if rt.store.kind == "postgresql":
        return sorted(rt.store._all_readers, key=id)
    return [rt.store._iconn, rt.store._rconn]


def outside_transactions(rt) -> bool:
    return not any(conn.in_transaction for conn in read_connections(rt))


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "worker-thread"])
async def test_a_write_committed_between_two_selects_of_one_read_is_not_seen(rt, inline):
    await rt.create_thread()

    def fn(conn: sqlite3.Connection) -> tuple[int, int, int]:
        before = conn.execute(THREAD_COUNT).fetchone()[0]
        outside = commit_thread_outside(rt, "thr_outside")
        after = conn.execute(THREAD_COUNT).fetchone()[0]
        return before, outside, after

    assert await rt.store.read(fn, inline=inline) == (1, 2, 1)
    assert outside_transactions(rt)
    # The snapshot ended with the read: the next read of either kind sees the committed row.
    for kind in (True, False):
        assert await rt.store.read(lambda conn: conn.execute(THREAD_COUNT).fetchone()[0], inline=kind) == 2


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "worker-thread"])
async def test_a_read_that_raises_leaves_no_snapshot_behind(rt, inline):
    await rt.create_thread()

    def failing(conn: sqlite3.Connection) -> None:
        assert conn.execute(THREAD_COUNT).fetchone()[0] == 1
        raise LookupError("the read function failed")

    with pytest.raises(LookupError, match="the read function failed"):
        await rt.store.read(failing, inline=inline)
    assert outside_transactions(rt)
    assert await trio.to_thread.run_sync(commit_thread_outside, rt, "thr_later") == 2
    assert await rt.store.read(lambda conn: conn.execute(THREAD_COUNT).fetchone()[0], inline=inline) == 2
    assert (await rt.thread_record("thr_later"))["id"] == "thr_later"


async def test_a_reader_cancelled_while_its_thread_runs_still_ends_the_transaction(rt):
    await rt.create_thread()
    selected, release = threading.Event(), threading.Event()

    def blocking(conn: sqlite3.Connection) -> int:
        count = conn.execute(THREAD_COUNT).fetchone()[0]
        selected.set()
        assert release.wait(10), "the test never released the read"
        return count

    async def cancel_when_selected(scope: trio.CancelScope) -> None:
        await trio.to_thread.run_sync(selected.wait, 10)
        scope.cancel()
        release.set()

    results = []
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            nursery.start_soon(cancel_when_selected, scope)
            # trio lets a running worker thread finish (it is never abandoned mid-transaction) and
            # delivers the cancellation at the caller's next checkpoint.
            results.append(await rt.store.read(blocking))
            await trio.lowlevel.checkpoint()
            raise AssertionError("the caller's cancellation was lost")
    assert scope.cancelled_caught and results == [1]
    assert outside_transactions(rt)
    assert await trio.to_thread.run_sync(commit_thread_outside, rt, "thr_after_cancel") == 2
    assert await rt.store.read(lambda conn: conn.execute(THREAD_COUNT).fetchone()[0]) == 2


async def test_an_inline_read_cancelled_before_it_starts_runs_nothing(rt):
    ran = []
    with trio.CancelScope() as scope:
        scope.cancel()
        await rt.store.read(ran.append, inline=True)
    assert scope.cancelled_caught and ran == []
    assert outside_transactions(rt)


@pytest.mark.sqlite_only(reason="PostgreSQL has no inline connection (an inline read is a query on the loop)")
async def test_a_busy_inline_read_rolls_back_and_runs_again_in_a_worker_thread(rt):
    await rt.create_thread()
    inline_conn, thread_conn = read_connections(rt)
    calls: list[tuple[str, bool]] = []

    def fn(conn: sqlite3.Connection) -> tuple[int, int]:
        count = conn.execute(THREAD_COUNT).fetchone()[0]
        calls.append(("inline" if conn is inline_conn else "thread", conn.in_transaction))
        if conn is inline_conn:
            # What SQLite raises at a SELECT when the database is busy (busy_timeout=0 inline); the
            # fallback must not inherit this half-done read's snapshot.
            commit_thread_outside(rt, "thr_meanwhile")
            raise sqlite3.OperationalError("database is locked")
        return count, conn.execute(THREAD_COUNT).fetchone()[0]

    assert await rt.store.read(fn, inline=True) == (2, 2)
    assert calls == [("inline", True), ("thread", True)]
    assert [inline_conn.in_transaction, thread_conn.in_transaction] == [False, False]
    assert await rt.store.read(lambda conn: conn.execute(THREAD_COUNT).fetchone()[0], inline=True) == 2


@pytest.mark.sqlite_only(reason="PostgreSQL has no inline connection (an inline read is a query on the loop)")
async def test_an_inline_read_error_other_than_busy_is_raised_not_retried(rt):
    calls = []

    def fn(conn: sqlite3.Connection) -> None:
        calls.append(conn)
        conn.execute("SELECT * FROM no_such_table")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        await rt.store.read(fn, inline=True)
    assert calls == [rt.store._iconn]
    assert outside_transactions(rt)


def test_read_snapshot_recovers_a_connection_left_inside_a_transaction(tmp_path):
    db = tmp_path / "db.sqlite3"
    setup = sqlite3.connect(db, isolation_level=None)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE t (x INTEGER)")
    setup.execute("INSERT INTO t VALUES (1)")
    reader = sqlite3.connect(db, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1  # a stale snapshot, left open
    setup.execute("INSERT INTO t VALUES (2)")
    assert store.read_snapshot(reader, lambda conn: conn.execute("SELECT COUNT(*) FROM t").fetchone()[0]) == 2
    assert reader.in_transaction is False
    reader.close()
    setup.close()
