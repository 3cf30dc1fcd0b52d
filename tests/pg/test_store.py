"""The PostgreSQL store's own behaviour (runtime/store/postgres.py), on the throwaway cluster: fencing of a
lane by its lease epoch, NOTIFY only after commit, a connection killed mid-batch, seqs across a restart.
The behaviour both backends share is tested by the store suite in tests/runtime, run on both."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
import trio

from runtime import StorageError
from runtime.errors import LeaseLost
from runtime.store import EventDraft, WriteLane, WriteRequest, append_event
from runtime.store.postgres import NOTIFY_CHANNEL, PostgresStore

# Real-time bound on every wait for another connection to reach a state (a loaded 2-core machine).
WAIT_LIMIT = 30.0


def thread_row(tid: str) -> tuple[str, tuple]:
    return ("INSERT INTO threads (id, created_at, updated_at, model, mode) VALUES (?, 't', 't', 'm', 'default')", (tid,))


def rows(url: str, sql: str, params=()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def set_lease(url: str, tid: str, epoch: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO thread_leases (thread_id, owner, epoch) VALUES (%s, 'host-a', %s)"
                     " ON CONFLICT (thread_id) DO UPDATE SET epoch = excluded.epoch, owner = excluded.owner",
                     (tid, epoch))


async def test_a_lane_with_an_old_epoch_is_refused_with_lease_lost_and_stores_nothing(pg_url):
    published: list = []
    async with PostgresStore.open(pg_url, published.extend) as store:
        await store.write([thread_row("thr_f")])
        set_lease(pg_url, "thr_f", 2)  # another host took the thread over: epoch 2
        heard: list = []
        old = WriteLane(on_failure=heard.append, fence=("thr_f", 1))
        first = store.submit(WriteRequest(
            [("UPDATE threads SET title = 'stale' WHERE id = ?", ("thr_f",))],
            [EventDraft("thr_f", "thread.updated", {"title": "stale"})], action="update the thread", lane=old))
        later = store.submit(WriteRequest(events=[EventDraft("thr_f", "turn.started", {})], action="start a turn",
                                          lane=old))
        current = WriteLane(fence=("thr_f", 2))
        ok = store.submit(WriteRequest(events=[EventDraft("thr_f", "thread.updated", {"title": "new"})],
                                       action="update the thread", lane=current))
        for request in (first, later, ok):
            await request.done.wait()
        with pytest.raises(LeaseLost) as info:
            first.result.unwrap()
        assert info.value.message == ("Failed to update the thread: this host no longer holds the lease of thread "
                                      "'thr_f' (epoch 1)")
        assert heard == [first.result.error]  # the producer was told once; its later write did not run
        assert later.skipped is True
        with pytest.raises(StorageError):
            later.result.unwrap()
        ok.result.unwrap()
    assert rows(pg_url, "SELECT title FROM threads WHERE id = 'thr_f'") == [(None,)]
    assert rows(pg_url, "SELECT event FROM events WHERE thread_id = 'thr_f' ORDER BY seq") == [("thread.updated",)]
    assert [e.event for batch in [published] for e in batch] == ["thread.updated"]
    assert published[0].seq == rows(pg_url, "SELECT max(seq) FROM events")[0][0]


async def test_an_epoch_bumped_while_the_write_waits_on_the_lease_row_refuses_it(pg_url):
    async with PostgresStore.open(pg_url, lambda events: None) as store:
        await store.write([thread_row("thr_b")])
        set_lease(pg_url, "thr_b", 1)
        # Another host's takeover holds the lease row (epoch 1 -> 2, not committed yet).
        taker = psycopg.connect(pg_url, autocommit=False)
        try:
            taker.execute("UPDATE thread_leases SET epoch = 2, owner = 'host-b' WHERE thread_id = 'thr_b'")
            request = store.submit(WriteRequest(events=[EventDraft("thr_b", "turn.started", {})],
                                                action="start a turn", lane=WriteLane(fence=("thr_b", 1))))
            watcher = psycopg.connect(pg_url, autocommit=True)
            try:
                with trio.fail_after(WAIT_LIMIT):
                    while not watcher.execute("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                              " AND query LIKE '%%FOR UPDATE%%'").fetchone():
                        await trio.sleep(0.01)  # polling another process's state (no event to wait on)
            finally:
                watcher.close()
            assert not request.done.is_set()  # the writer waits on the row lock
            taker.commit()
            with trio.fail_after(WAIT_LIMIT):
                await request.done.wait()
        finally:
            taker.close()
        with pytest.raises(LeaseLost):
            request.result.unwrap()
        assert request.committed == []
        (await store.write(events=[EventDraft("thr_b", "thread.updated", {})]))  # the writer goes on
    assert rows(pg_url, "SELECT event FROM events WHERE thread_id = 'thr_b'") == [("thread.updated",)]


async def test_notify_is_sent_per_thread_after_commit_and_never_after_a_rollback(pg_url):
    listener = psycopg.connect(pg_url, autocommit=True)
    listener.execute(f"LISTEN {NOTIFY_CHANNEL}")

    def drain() -> list[str]:
        return [n.payload for n in listener.notifies(timeout=0.5, stop_after=None)]

    try:
        async with PostgresStore.open(pg_url, lambda events: None) as store:
            release = threading.Event()
            seen_inside: list = []

            def hold(conn):
                # Inside the batch's transaction, after this request's events: nothing is delivered yet.
                seen_inside.append([n.payload for n in listener.notifies(timeout=0.2, stop_after=None)])
                release.set()

            a = store.submit(WriteRequest(events=[EventDraft("thr_1", "x", {}), EventDraft("thr_1", "y", {})]))
            b = store.submit(WriteRequest(events=[EventDraft("thr_2", "x", {})], fn=hold))
            for request in (a, b):
                await request.done.wait()
            assert seen_inside == [[]]
            assert sorted(await trio.to_thread.run_sync(drain)) == ["thr_1", "thr_2"]  # once per thread

            def boom(conn):
                raise RuntimeError("a bug after the events")

            failed = store.submit(WriteRequest(events=[EventDraft("thr_3", "x", {})], fn=boom))
            await failed.done.wait()
            with pytest.raises(RuntimeError):
                failed.result.unwrap()
            assert await trio.to_thread.run_sync(drain) == []  # rolled back: no notification
    finally:
        listener.close()


async def test_a_connection_killed_mid_batch_fails_that_batch_and_the_next_batch_works(pg_url):
    published: list = []
    async with PostgresStore.open(pg_url, published.extend) as store:
        await store.write([thread_row("thr_k")])

        def kill_own_backend(conn):
            # The batch's connection dies under it (a server restart or pg_terminate_backend does this).
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.raw.info.backend_pid,))

        heard: list = []
        lane = WriteLane(on_failure=heard.append)
        before = store.submit(WriteRequest([("UPDATE threads SET title = 'lost' WHERE id = ?", ("thr_k",))],
                                           [EventDraft("thr_k", "a", {})], action="rename the thread", lane=lane))
        killer = store.submit(WriteRequest(fn=kill_own_backend, action="do something"))
        after = store.submit(WriteRequest(events=[EventDraft("thr_k", "b", {})], action="append b"))
        for request in (before, killer, after):
            await request.done.wait()
        for request, action in ((before, "rename the thread"), (killer, "do something")):
            with pytest.raises(StorageError) as info:
                request.result.unwrap()
            assert info.value.message.startswith(f"Failed to {action}: ")
            assert request.committed == []
        assert len(heard) == 1 and isinstance(heard[0], StorageError)
        # Not yet applied when the transaction was lost: it went on in a new one, on a new connection.
        after.result.unwrap()
        assert [e.event for e in after.committed] == ["b"]
        published.clear()
        _, events = await store.write(events=[EventDraft("thr_k", "c", {})], action="append c")  # a new connection
        assert [e.event for e in events] == ["c"] and published == events
        # Reads on a killed connection fail once, then the pool opens a new one.
        await store.read(lambda conn: conn.execute("SELECT 1").fetchone())
    assert rows(pg_url, "SELECT title FROM threads WHERE id = 'thr_k'") == [(None,)]
    assert rows(pg_url, "SELECT event FROM events WHERE thread_id = 'thr_k' ORDER BY seq") == [("b",), ("c",)]


async def test_a_restart_on_the_same_database_never_reuses_a_seq(pg_url):
    async with PostgresStore.open(pg_url, lambda events: None) as store:
        _, first = await store.write(events=[EventDraft("thr_r", "a", {}), EventDraft("thr_r", "b", {})])

        def take_a_seq_then_fail(conn):
            append_event(conn, EventDraft("thr_r", "lost", {}))
            conn.execute("SELECT 1/0")

        lost = store.submit(WriteRequest(fn=take_a_seq_then_fail, action="append lost"))
        await lost.done.wait()
        assert isinstance(lost.result.error, StorageError)
    async with PostgresStore.open(pg_url, lambda events: None) as store:
        _, second = await store.write(events=[EventDraft("thr_r", "c", {})])
    assert [e.seq for e in first] == sorted(e.seq for e in first)
    assert second[0].seq > first[-1].seq + 1  # the rolled-back seq is a gap, never handed out again
    assert rows(pg_url, "SELECT event FROM events ORDER BY seq") == [("a",), ("b",), ("c",)]


async def test_the_store_url_password_never_appears_in_an_open_error(pg_cluster):
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{pg_cluster.port}/no_such_db"
    with pytest.raises(StorageError) as info:
        async with PostgresStore.open(url, lambda events: None):
            pass
    assert "s3cret-pw" not in info.value.message
    assert info.value.message.startswith(f"Failed to open the store at postgresql://postgres@127.0.0.1:"
                                         f"{pg_cluster.port}/no_such_db: ")


async def test_a_write_of_a_thread_waits_for_its_lease_row_before_taking_a_seq(pg_url):
    """The seq rule through the store: while another transaction holds thread A's lease row, the store's
    write of A's event waits before taking a seq (a writer of thread B commits a seq meanwhile), and takes
    it once the row is free: A's seq is higher than B's, so no reader of A can have moved past it."""
    async with PostgresStore.open(pg_url, lambda events: None) as store:
        await store.write(events=[EventDraft("thr_a", "first", {})])  # creates A's lease row (epoch 0)
        holder = psycopg.connect(pg_url, autocommit=False)
        try:
            holder.execute("SELECT 1 FROM thread_leases WHERE thread_id = 'thr_a' FOR UPDATE")
            # Another host's writer of thread B commits a seq meanwhile (its own connection, the same rule).
            with psycopg.connect(pg_url, autocommit=True) as other:
                (b_seq,) = other.execute("INSERT INTO events (thread_id, event, timestamp, payload)"
                                         " VALUES ('thr_b', 'b', 't', '{}') RETURNING seq").fetchone()
            request = store.submit(WriteRequest(events=[EventDraft("thr_a", "second", {})]))
            with psycopg.connect(pg_url, autocommit=True) as watcher:
                with trio.fail_after(WAIT_LIMIT):
                    while not watcher.execute("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                              " AND query LIKE '%%FOR UPDATE%%'").fetchone():
                        await trio.sleep(0.01)  # polling another process's state (no event to wait on)
                # The waiting writer has taken no seq yet: the sequence is where B left it.
                assert watcher.execute("SELECT last_value FROM events_seq_seq").fetchone()[0] == b_seq
            assert not request.done.is_set()
            holder.rollback()
            with trio.fail_after(WAIT_LIMIT):
                await request.done.wait()
        finally:
            holder.close()
        assert request.committed[0].seq == b_seq + 1


async def test_the_mcp_change_journal_is_kept_per_host(pg_url):
    """mcp.json is a file of each host: on a shared database each host's journal rows are its own, so one
    host's change neither drops nor settles another host's (runtime/mcp/changes.py)."""
    from runtime.mcp import changes

    class Change:
        def __init__(self, token: str) -> None:
            self.token = token

    async with PostgresStore.open(pg_url, lambda events: None, host_id="host-a") as a:
        async with PostgresStore.open(pg_url, lambda events: None, host_id="host-b") as b:
            await a.write(fn=lambda conn: changes.journal(conn, Change("tok-a1")))
            await b.write(fn=lambda conn: changes.journal(conn, Change("tok-b1")))
            await a.write(fn=lambda conn: changes.journal(conn, Change("tok-a2")))  # drops a1 only
            assert await a.read(changes.committed_tokens) == {"tok-a2"}
            assert await b.read(changes.committed_tokens) == {"tok-b1"}
            assert await b.read(lambda conn: changes.is_committed(conn, "tok-a2")) is False
            assert await a.read(lambda conn: changes.is_committed(conn, "tok-a2")) is True
    assert sorted(rows(pg_url, "SELECT host_id, token FROM mcp_commits")) == [("host-a", "tok-a2"), ("host-b", "tok-b1")]


async def test_recover_thread_settles_one_thread_and_leaves_the_others_running(pg_url):
    """recover_thread (what a host runs at a lease takeover) on PostgreSQL: the dead owner's running turn
    and item of that thread end interrupted with their events (seqs after every earlier one, NOTIFY sent);
    another thread's running turn (another host's) is untouched. Nothing is recovered at open."""
    from runtime.store import RESTART_ERROR, recover_thread

    def running(tid: str) -> list[tuple[str, tuple]]:
        return [thread_row(tid),
                ("INSERT INTO turns (id, thread_id, ord, status, input_summary, created_at)"
                 " VALUES (?, ?, 1, 'in_progress', 'p', 't')", (f"turn_{tid}", tid)),
                ("INSERT INTO items (id, turn_id, thread_id, ord, kind, status, summary)"
                 " VALUES (?, ?, ?, 1, 'agent_message', 'in_progress', '')", (f"item_{tid}", f"turn_{tid}", tid))]

    async with PostgresStore.open(pg_url, lambda events: None) as store:
        _, before = await store.write([*running("thr_dead"), *running("thr_live")],
                                      [EventDraft("thr_dead", "item.delta", {"delta": "half a reply"},
                                                  turn_id="turn_thr_dead", item_id="item_thr_dead")])
    listener = psycopg.connect(pg_url, autocommit=True)
    listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
    try:
        async with PostgresStore.open(pg_url, lambda events: None) as store:
            assert store.recovered_turns == 0
            assert rows(pg_url, "SELECT status FROM turns ORDER BY id") == [("in_progress",), ("in_progress",)]
            count, _ = await store.write(fn=lambda conn: recover_thread(conn, "thr_dead", "2026-01-01T00:00:00.000Z"))
        notified = [n.payload for n in listener.notifies(timeout=1, stop_after=1)]
    finally:
        listener.close()
    assert count == 1 and notified == ["thr_dead"]
    assert rows(pg_url, "SELECT id, status, error FROM turns ORDER BY id") == [
        ("turn_thr_dead", "interrupted", RESTART_ERROR), ("turn_thr_live", "in_progress", None)]
    assert rows(pg_url, "SELECT id, status, detail FROM items ORDER BY id") == [
        ("item_thr_dead", "interrupted", "half a reply"), ("item_thr_live", "in_progress", None)]
    events = rows(pg_url, "SELECT seq, event FROM events WHERE thread_id = 'thr_dead' ORDER BY seq")
    assert [e for _, e in events] == ["item.delta", "item.interrupted", "turn.completed"]
    assert events[0][0] == before[0].seq and events[1][0] > before[0].seq


async def test_a_writer_transaction_stalled_past_its_bound_releases_its_lease_row_locks(pg_url):
    """A host paused mid-batch (SIGSTOP) must not hold a thread's lease row forever: the server ends the
    writer's session once its transaction waits on the host longer than ``stalled_after``; another host's
    takeover then gets the row, and the stalled batch fails like a lost connection (the writer goes on)."""
    stalled = 0.5
    async with PostgresStore.open(pg_url, lambda events: None, stalled_after=stalled) as store:
        await store.write(events=[EventDraft("thr_s", "first", {})])  # creates the lease row
        takeover_done = threading.Event()
        paused = threading.Event()

        def pause_mid_batch(conn):
            # The lease row is locked by this batch (its event was appended first); the "host" stops here.
            paused.set()
            takeover_done.wait(WAIT_LIMIT)

        stuck = store.submit(WriteRequest(events=[EventDraft("thr_s", "second", {})], action="append second"))
        pause = store.submit(WriteRequest(fn=pause_mid_batch, action="pause"))

        def takeover() -> float:
            # Only once the batch holds the row: on a loaded machine the writer's thread may start after this
            # one, and a takeover that came first would leave nothing to wait for (seen in `make test`).
            assert paused.wait(WAIT_LIMIT)
            with psycopg.connect(pg_url, autocommit=True) as other:
                t0 = time.monotonic()
                other.execute("UPDATE thread_leases SET epoch = epoch + 1, owner = 'host-b' WHERE thread_id = 'thr_s'")
                took = time.monotonic() - t0
            takeover_done.set()
            return took

        took = await trio.to_thread.run_sync(takeover)
        for request in (stuck, pause):
            await request.done.wait()
        assert took < WAIT_LIMIT / 2
        with pytest.raises(StorageError):
            stuck.result.unwrap()
        _, events = await store.write(events=[EventDraft("thr_s", "third", {})])
        assert [e.event for e in events] == ["third"]
    assert rows(pg_url, "SELECT event FROM events ORDER BY seq") == [("first",), ("third",)]
    assert rows(pg_url, "SELECT epoch, owner FROM thread_leases") == [(1, "host-b")]
