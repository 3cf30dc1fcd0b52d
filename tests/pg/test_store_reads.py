"""Store reads on PostgreSQL (PostgresStore.read; docs/design.md "One-statement reads"), on the throwaway cluster.

What each read sends is read off the wire: libpq's own trace (PQtrace) of the store's read connection lists
every protocol message the client sends; a round trip is a ``Query`` or a ``Sync`` (psycopg prepares a
statement it has run 5 times on a connection: one more round trip, once). The snapshot way is three or more
(BEGIN REPEATABLE READ READ ONLY, the statements, ROLLBACK); a read function seen running one statement is
then one round trip, inline on the event loop (no worker thread) or in a worker thread. A
function that needs a second statement after all runs again, whole, in one snapshot. The invariants after
each test: no read connection inside a transaction, the next read answers.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from typing import Any, Iterator

import psycopg
import psycopg.pq
import pytest
import trio

from runtime.store.postgres import PostgresStore

# Real-time bound on every wait for another connection to reach a state (a loaded 2-core machine).
WAIT_LIMIT = 30.0
# Seconds after which the cancellation test releases its lock itself (a read that ignored its cancellation).
UNCANCELLABLE_AFTER = 5.0
THREAD_ROW = "INSERT INTO threads (id, created_at, updated_at, model, mode) VALUES (%s, 't', 't', 'm', 'default')"
SNAPSHOT_BEGIN = ("Query", '"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"')
ROLLBACK = ("Query", '"ROLLBACK"')


def outside(url: str, sql: str, params: tuple = ()) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else None


def thread_title(conn: Any, thread_id: str) -> Any:
    """A one-statement read function (records.get_thread_row's shape)."""
    return conn.execute("SELECT id, title FROM threads WHERE id = ?", (thread_id,)).fetchone()


def run_sql(conn: Any, sql: str) -> Any:
    return conn.execute(sql).fetchall()


def counts(conn: Any, between: Any) -> tuple[int, ...]:
    """One statement while there is no thread, two (``between`` called between them) once there is one."""
    first = conn.execute("SELECT COUNT(*) FROM threads").fetchone()[0]
    if first == 0:
        return (first,)
    between()
    return first, conn.execute("SELECT COUNT(*) FROM threads").fetchone()[0]


@contextlib.contextmanager
def wire(store: PostgresStore) -> Iterator[list[tuple[str, str]]]:
    """The messages (type, text) the store's read connections send while the block runs, from libpq's trace."""
    traced = []
    for conn in store._all_readers:
        trace = tempfile.TemporaryFile()
        conn.raw.pgconn.trace(trace.fileno())
        conn.raw.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE)
        traced.append((conn, trace))
    sent: list[tuple[str, str]] = []
    try:
        yield sent
    finally:
        for conn, trace in traced:
            if not conn.raw.closed:
                conn.raw.pgconn.untrace()
            trace.seek(0)
            for line in trace.read().decode().splitlines():
                direction, _, kind, *text = line.split("\t")
                if direction == "F":
                    sent.append((kind, text[0].strip() if text else ""))
            trace.close()


def round_trips(sent: list[tuple[str, str]]) -> int:
    return sum(kind in ("Query", "Sync") for kind, _ in sent)


def statements(sent: list[tuple[str, str]]) -> int:
    """Statements run (a simple ``Query`` or an ``Execute``), BEGIN and ROLLBACK included."""
    return sum(kind in ("Query", "Execute") for kind, _ in sent)


@contextlib.contextmanager
def thread_hops(monkeypatch) -> Iterator[list[Any]]:
    hops: list[Any] = []
    original = trio.to_thread.run_sync

    async def counting(fn, *args, **kwargs):
        hops.append(fn)
        return await original(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    yield hops
    monkeypatch.setattr(trio.to_thread, "run_sync", original)


def outside_transactions(store: PostgresStore) -> bool:
    return not any(conn.in_transaction for conn in store._all_readers)


async def test_a_one_statement_read_is_one_query_on_the_event_loop_after_its_first_read(pg_url, monkeypatch):
    read = functools.partial(thread_title, thread_id="thr_a")
    async with PostgresStore.open(pg_url, lambda events: None, read_pool=1) as store:
        outside(pg_url, THREAD_ROW, ("thr_a",))
        outside(pg_url, "UPDATE threads SET title = %s WHERE id = 'thr_a'", ("it's 100%",))
        await store.read(read, inline=True)  # opens the read connection
        # The first read of a function we have not seen (the test's own lambda): the snapshot way.
        with wire(store) as first:
            assert await store.read(lambda conn: thread_title(conn, "thr_a"), inline=True) == ("thr_a", "it's 100%")
        assert first[0] == SNAPSHOT_BEGIN and first[-1] == ROLLBACK and statements(first) == 3
        with thread_hops(monkeypatch) as hops, wire(store) as sent:
            row = await store.read(read, inline=True)
        # One simple query, its value bound client-side, no BEGIN/ROLLBACK, no worker thread.
        assert sent == [("Query", "\"SELECT id, title FROM threads WHERE id = 'thr_a'\"")]
        assert hops == []
        assert (row[0], row["title"], dict(zip(row.keys(), row))) == ("thr_a", "it's 100%",
                                                                      {"id": "thr_a", "title": "it's 100%"})
        # A missing row is None, as on SQLite.
        assert await store.read(functools.partial(thread_title, thread_id="thr_none"), inline=True) is None
        assert outside_transactions(store)


async def test_a_one_statement_read_not_inline_is_one_round_trip_in_a_worker_thread(pg_url, monkeypatch):
    read = functools.partial(thread_title, thread_id="thr_b")
    async with PostgresStore.open(pg_url, lambda events: None, read_pool=1) as store:
        outside(pg_url, THREAD_ROW, ("thr_b",))
        assert await store.read(read) == ("thr_b", None)  # learns it: one statement
        with thread_hops(monkeypatch) as hops, wire(store) as sent:
            assert await store.read(read) == ("thr_b", None)
        assert round_trips(sent) == statements(sent) == 1 and SNAPSHOT_BEGIN not in sent, sent
        assert len(hops) == 1
        assert outside_transactions(store)


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "worker-thread"])
async def test_a_read_that_needs_a_second_statement_after_all_runs_again_whole_in_one_snapshot(pg_url, inline):
    async with PostgresStore.open(pg_url, lambda events: None, read_pool=1) as store:
        calls = []

        def commit_on_second_call() -> None:
            # The first call comes in the one-statement attempt, which is then abandoned; the second in the
            # snapshot, between its two SELECTs: a write committed there must not be seen by the second.
            calls.append(1)
            if len(calls) == 2:
                outside(pg_url, THREAD_ROW, ("thr_between",))

        read = functools.partial(counts, between=commit_on_second_call)
        assert await store.read(read, inline=inline) == (0,)  # one statement: learned as such
        outside(pg_url, THREAD_ROW, ("thr_c",))
        with wire(store) as sent:
            assert await store.read(read, inline=inline) == (1, 1)
        assert len(calls) == 2
        # The one-statement attempt (one statement), then the whole function in one snapshot.
        assert statements(sent) == 1 + 4 and sent.index(SNAPSHOT_BEGIN) > 0 and sent[-1] == ROLLBACK, sent
        assert outside_transactions(store)
        # From now on it goes the snapshot way at once, and sees the row committed meanwhile.
        with wire(store) as again:
            assert await store.read(read, inline=inline) == (2, 2)
        assert again[0] == SNAPSHOT_BEGIN and again[-1] == ROLLBACK and statements(again) == 4
        assert outside_transactions(store)


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "worker-thread"])
async def test_a_one_statement_read_can_never_write(pg_url, inline):
    async with PostgresStore.open(pg_url, lambda events: None, read_pool=1) as store:
        outside(pg_url, THREAD_ROW, ("thr_w",))
        assert await store.read(functools.partial(run_sql, sql="SELECT id FROM threads"), inline=inline) == [
            ("thr_w",)]
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await store.read(functools.partial(run_sql, sql="UPDATE threads SET title = 'w' RETURNING id"),
                             inline=inline)
        assert outside(pg_url, "SELECT title FROM threads") == [(None,)]
        assert outside_transactions(store)
        assert await store.read(functools.partial(thread_title, thread_id="thr_w"), inline=inline) == ("thr_w", None)


async def test_an_error_of_an_inline_one_statement_read_is_raised_and_the_connection_kept(pg_url):
    async with PostgresStore.open(pg_url, lambda events: None, read_pool=1) as store:
        assert await store.read(functools.partial(run_sql, sql="SELECT 1 / 1"), inline=True) == [(1,)]
        (conn,) = store._all_readers
        with pytest.raises(psycopg.errors.DivisionByZero):
            await store.read(functools.partial(run_sql, sql="SELECT 1 / 0"), inline=True)
        assert store._all_readers == {conn} and not conn.in_transaction
        assert await store.read(functools.partial(run_sql, sql="SELECT 2 / 1"), inline=True) == [(2,)]


async def test_an_inline_read_on_a_lost_connection_fails_and_the_next_read_opens_a_new_one(pg_url):
    read = functools.partial(thread_title, thread_id="thr_l")
    async with PostgresStore.open(pg_url, lambda events: None, read_pool=1) as store:
        outside(pg_url, THREAD_ROW, ("thr_l",))
        assert await store.read(read, inline=True) == ("thr_l", None)
        (conn,) = store._all_readers
        outside(pg_url, "SELECT pg_terminate_backend(%s)", (conn.raw.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError):
            await store.read(read, inline=True)
        # Closed and out of the pool at once, not handed to the next read.
        assert conn.raw.closed and store._all_readers == set() and store._idle_readers == []
        assert await store.read(read, inline=True) == ("thr_l", None)
        assert len(store._all_readers) == 1 and outside_transactions(store)


async def test_an_inline_read_cancelled_on_the_wire_closes_its_connection_and_the_next_read_answers(pg_url):
    read = functools.partial(thread_title, thread_id="thr_x")
    async with PostgresStore.open(pg_url, lambda events: None, read_pool=1) as store:
        outside(pg_url, THREAD_ROW, ("thr_x",))
        assert await store.read(read, inline=True) == ("thr_x", None)
        (conn,) = store._all_readers
        reader_pid = conn.raw.info.backend_pid
        with psycopg.connect(pg_url) as locker:  # holds the table: the read's SELECT waits for it
            locker.execute("LOCK TABLE threads IN ACCESS EXCLUSIVE MODE")
            locker_pid = locker.info.backend_pid

            async def cancel_when_waiting(scope: trio.CancelScope) -> None:
                with psycopg.connect(pg_url, autocommit=True) as observer:
                    while not observer.execute(
                            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
                            (reader_pid,)).fetchall():
                        await trio.sleep(0.01)  # polling another process's state (no event to wait on)
                scope.cancel()
                # A read that cannot be cancelled (a worker thread blocked in libpq) would wait for the lock
                # for ever: after a bound the lock goes, so such a read fails this test instead of hanging it.
                await trio.sleep(UNCANCELLABLE_AFTER)
                outside(pg_url, "SELECT pg_terminate_backend(%s)", (locker_pid,))

            with trio.fail_after(WAIT_LIMIT):
                async with trio.open_nursery() as nursery:
                    with trio.CancelScope() as scope:
                        nursery.start_soon(cancel_when_waiting, scope)
                        await store.read(read, inline=True)
                        raise AssertionError("the read answered: its cancellation was not delivered on the wire")
                    nursery.cancel_scope.cancel()
            assert scope.cancelled_caught
            # The connection whose query was on the wire is closed and out of the pool.
            assert conn.raw.closed and store._all_readers == set() and store._idle_readers == []
            locker.rollback()
        # Its backend ends (it finds its client gone), and the next read opens a new connection and answers.
        with trio.fail_after(WAIT_LIMIT):
            while outside(pg_url, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (reader_pid,)):
                await trio.sleep(0.01)  # polling another process's state (no event to wait on)
        assert await store.read(read, inline=True) == ("thr_x", None)
        assert len(store._all_readers) == 1 and outside_transactions(store)
