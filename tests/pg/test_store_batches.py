"""The PostgreSQL writer's batch of plain data writes (runtime/store/postgres.py, PostgresStore._apply_transaction):
one query for the whole batch, its COMMIT included, and the same guarantees as one savepoint per request (a failing
request fails alone, a stale fence refuses only its own write, nothing of a refused write is stored or
published). Speed itself is measured in bench/pg_store.py and bench/cluster.py, never here: these tests count
statements sent to the server, which is what the speed depends on."""

from __future__ import annotations

import threading

import psycopg
import pytest

from runtime import StorageError
from runtime.errors import LeaseLost
from runtime.store import EventDraft, WriteLane, WriteRequest
from runtime.store import postgres
from runtime.store.postgres import EVENT_ROWS_STATEMENT, PostgresStore

from .test_store import rows, set_lease, thread_row

# Thread creations folded into one batch: bench/pg_store.py's 16 concurrent creators.
CREATORS = 16


class CountWriterStatements:
    """Counts the statements (each one round trip) the store's writer connection sends, by wrapping
    ``psycopg.Cursor.execute`` (``Connection.execute`` and ``ClientCursor`` go through it: the writer thread)
    and ``script_on_loop`` (a plain batch's query awaited on the event loop); ``on_loop`` counts the latter."""

    def __init__(self, monkeypatch, store: PostgresStore) -> None:
        self.sent: list[str] = []
        self.on_loop = 0
        original = psycopg.Cursor.execute
        original_on_loop = postgres.script_on_loop
        lock = threading.Lock()

        def execute(cursor, query, *args, **kwargs):
            if store._wconn is not None and cursor.connection is store._wconn.raw:
                with lock:
                    self.sent.append(str(query).split(None, 1)[0].upper())
            return original(cursor, query, *args, **kwargs)

        async def script_on_loop(conn, query):
            if conn is store._wconn:
                with lock:
                    self.on_loop += 1
                    self.sent.append(query.decode().split(None, 1)[0].upper())
                    self.seen(query.decode())
            return await original_on_loop(conn, query)

        monkeypatch.setattr(psycopg.Cursor, "execute", execute)
        monkeypatch.setattr(postgres, "script_on_loop", script_on_loop)

    def seen(self, query: str) -> None:
        """A query sent on the loop (CountWriterQueries keeps its text)."""


def create(tid: str) -> WriteRequest:
    return WriteRequest([thread_row(tid)], [EventDraft(tid, "thread.started", {"thread": {"id": tid}})],
                        action=f"create thread {tid}")


async def test_a_batch_of_thread_creations_is_one_query(pg_url, monkeypatch):
    published: list = []
    async with PostgresStore.open(pg_url, published.extend) as store:
        counter = CountWriterStatements(monkeypatch, store)
        # Submitted without a checkpoint in between: the writer takes all of them as one batch.
        requests = [store.submit(create(f"thr_{i:02d}")) for i in range(CREATORS)]
        for request in requests:
            await request.done.wait()
        assert [request.result.unwrap() for request in requests] == [None] * CREATORS
        # Was ~5 per request (SAVEPOINT, INSERT, lease lock, event INSERT, RELEASE) + BEGIN, NOTIFY, COMMIT.
        assert counter.sent == ["BEGIN;"]  # BEGIN; ...; COMMIT: one query, one round trip
        assert counter.on_loop == 1  # awaited on the event loop, not through the writer thread
    seqs = [request.committed[0].seq for request in requests]
    assert seqs == sorted(seqs) and len(set(seqs)) == CREATORS
    assert [(e.thread_id, e.event) for e in published] == [(f"thr_{i:02d}", "thread.started") for i in range(CREATORS)]
    assert rows(pg_url, "SELECT seq, thread_id FROM events ORDER BY seq") == \
        [(e.seq, e.thread_id) for e in published]
    assert rows(pg_url, "SELECT count(*) FROM threads") == [(CREATORS,)]
    # Each thread's lease row was created (epoch 0, no owner) by the seq rule's lock.
    assert rows(pg_url, "SELECT count(*) FROM thread_leases WHERE epoch = 0 AND owner IS NULL") == [(CREATORS,)]


async def test_a_failing_request_in_a_plain_batch_fails_alone_and_its_seqs_are_never_published(pg_url):
    published: list = []
    async with PostgresStore.open(pg_url, published.extend) as store:
        await store.write([thread_row("thr_taken")])
        requests = [store.submit(create("thr_a")), store.submit(create("thr_taken")), store.submit(create("thr_b"))]
        for request in requests:
            await request.done.wait()
        assert requests[0].result.unwrap() is None and requests[2].result.unwrap() is None
        with pytest.raises(StorageError, match="create thread thr_taken"):
            requests[1].result.unwrap()
        assert requests[1].committed == []
        _, later = await store.write(events=[EventDraft("thr_a", "after", {})])
    assert [(e.thread_id, e.event) for e in published] == [("thr_a", "thread.started"), ("thr_b", "thread.started"),
                                                           ("thr_a", "after")]
    # What the database holds is exactly what was published: the first attempt's seqs are a gap, not rows.
    assert rows(pg_url, "SELECT seq, thread_id, event FROM events ORDER BY seq") == \
        [(e.seq, e.thread_id, e.event) for e in published]
    assert published[0].seq < published[1].seq < later[0].seq
    assert rows(pg_url, "SELECT id FROM threads ORDER BY id") == [("thr_a",), ("thr_b",), ("thr_taken",)]


async def test_a_stale_fence_in_a_plain_batch_refuses_only_its_own_writes(pg_url):
    published: list = []
    async with PostgresStore.open(pg_url, published.extend) as store:
        await store.write([thread_row("thr_old"), thread_row("thr_cur")])
        set_lease(pg_url, "thr_old", 2)  # taken over by another host
        set_lease(pg_url, "thr_cur", 1)
        heard: list = []
        stale = WriteLane(on_failure=heard.append, fence=("thr_old", 1))
        current = WriteLane(fence=("thr_cur", 1))
        requests = [
            store.submit(WriteRequest([("UPDATE threads SET title = 'mine' WHERE id = ?", ("thr_cur",))],
                                      [EventDraft("thr_cur", "thread.updated", {})], action="update cur",
                                      lane=current)),
            store.submit(WriteRequest([("UPDATE threads SET title = 'stale' WHERE id = ?", ("thr_old",))],
                                      [EventDraft("thr_old", "thread.updated", {})], action="update old",
                                      lane=stale)),
            store.submit(create("thr_new")),
        ]
        for request in requests:
            await request.done.wait()
        with pytest.raises(LeaseLost, match="update old"):
            requests[1].result.unwrap()
        assert requests[0].result.unwrap() is None and requests[2].result.unwrap() is None
        assert len(heard) == 1 and isinstance(heard[0], LeaseLost)
    assert [(e.thread_id, e.event) for e in published] == [("thr_cur", "thread.updated"),
                                                           ("thr_new", "thread.started")]
    assert rows(pg_url, "SELECT id, title FROM threads ORDER BY id") == [("thr_cur", "mine"), ("thr_new", None),
                                                                         ("thr_old", None)]
    assert rows(pg_url, "SELECT seq, thread_id FROM events ORDER BY seq") == [(e.seq, e.thread_id) for e in published]
    assert rows(pg_url, "SELECT thread_id, epoch FROM thread_leases ORDER BY thread_id") == [
        ("thr_cur", 1), ("thr_new", 0), ("thr_old", 2)]


class CountWriterQueries(CountWriterStatements):
    """Also keeps each query's whole text (the batch is one query: its statements are in it)."""

    def __init__(self, monkeypatch, store: PostgresStore) -> None:
        self.queries: list[str] = []
        super().__init__(monkeypatch, store)
        counted = psycopg.Cursor.execute

        def execute(cursor, query, *args, **kwargs):
            if store._wconn is not None and cursor.connection is store._wconn.raw:
                self.queries.append(str(query))
            return counted(cursor, query, *args, **kwargs)

        monkeypatch.setattr(psycopg.Cursor, "execute", execute)

    def seen(self, query: str) -> None:
        self.queries.append(query)


# Streamed deltas of two engines folded into one batch, and text that JSON, SQL literals and psycopg's
# placeholders each treat specially.
DELTAS = 40
ODD_TEXT = "é \"quoted\" \\ back\nslash 😀 100% ? 'single' %s {}"


async def test_a_run_of_event_writes_is_one_insert_and_each_seq_is_its_stored_row(pg_url, monkeypatch):
    published: list = []
    async with PostgresStore.open(pg_url, published.extend) as store:
        await store.write([thread_row("thr_a"), thread_row("thr_b")])
        set_lease(pg_url, "thr_a", 1)
        set_lease(pg_url, "thr_b", 1)
        lanes = {"thr_a": WriteLane(fence=("thr_a", 1)), "thr_b": WriteLane(fence=("thr_b", 1))}
        counter = CountWriterQueries(monkeypatch, store)
        requests = [store.submit(WriteRequest(events=[EventDraft(tid, "item.delta", {"delta": f"{ODD_TEXT} {i}"},
                                                                 turn_id=f"turn_{tid}", item_id=None)],
                                              action=f"delta {i}", lane=lanes[tid]))
                    for i in range(DELTAS) for tid in ("thr_a", "thr_b")]
        # An engine's item end in the middle: statements and two events of its own.
        requests.append(store.submit(WriteRequest(
            [("UPDATE threads SET title = ? WHERE id = ?", ("done", "thr_a"))],
            [EventDraft("thr_a", "item.completed", {"text": ODD_TEXT}), EventDraft("thr_a", "turn.completed", {})],
            action="end", lane=lanes["thr_a"])))
        requests += [store.submit(WriteRequest(events=[EventDraft("thr_b", "item.delta", {"delta": "tail"})],
                                               action="tail", lane=lanes["thr_b"]))]
        for request in requests:
            await request.done.wait()
        assert [request.result.unwrap() for request in requests] == [None] * len(requests)
        assert len(counter.queries) == 1
        script = counter.queries[0]
        # Before: one INSERT per event (83) and a fence check per request (82); now one INSERT per run of
        # event-only requests and per request with statements, and one fence per lease. Several events go
        # by the statement prepared on the writer's session (EXECUTE), a lone one by its own INSERT.
        assert script.count(f"EXECUTE {EVENT_ROWS_STATEMENT} (") == 2
        assert script.count("INSERT INTO events") == 1
        assert script.count("FROM thread_leases WHERE thread_id") == 2 + 1  # two fences + the seq rule's lock
    committed = [event for request in requests for event in request.committed]
    assert [e.event for e in committed] == ["item.delta"] * (2 * DELTAS) + ["item.completed", "turn.completed",
                                                                            "item.delta"]
    assert committed == published
    seqs = [e.seq for e in committed]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    stored = rows(pg_url, "SELECT seq, thread_id, turn_id, item_id, event, payload FROM events ORDER BY seq")
    import json
    assert [(s, t, u, i, e, json.loads(p)) for s, t, u, i, e, p in stored] == \
        [(e.seq, e.thread_id, e.turn_id, e.item_id, e.event, e.payload) for e in committed]
    assert stored[0][5] == json.dumps({"delta": f"{ODD_TEXT} 0"}, ensure_ascii=False, separators=(",", ":"))
    assert rows(pg_url, "SELECT title FROM threads WHERE id = 'thr_a'") == [("done",)]


async def test_a_failing_request_in_a_run_of_event_writes_fails_alone(pg_url):
    published: list = []
    async with PostgresStore.open(pg_url, published.extend) as store:
        heard: list = []
        lane = WriteLane(on_failure=heard.append)
        requests = [store.submit(WriteRequest(events=[EventDraft("thr_a", name, {"n": i})], action=f"event {i}",
                                              lane=None if i == 2 else lane))
                    for i, name in enumerate(["one", "two", "bad\x00name", "four"])]
        for request in requests:
            await request.done.wait()
        with pytest.raises(StorageError, match="event 2"):
            requests[2].result.unwrap()
        assert [requests[i].result.unwrap() for i in (0, 1, 3)] == [None, None, None]
        assert heard == [] and lane.failed is None
        _, later = await store.write(events=[EventDraft("thr_a", "after", {})])
    assert [(e.event, e.payload) for e in published] == [("one", {"n": 0}), ("two", {"n": 1}), ("four", {"n": 3}),
                                                         ("after", {})]
    # The stored rows are exactly the published events: the failed attempt's seqs are a gap, never rows.
    assert rows(pg_url, "SELECT seq, event FROM events ORDER BY seq") == [(e.seq, e.event) for e in published]
    assert published[2].seq < later[0].seq


async def test_the_run_insert_is_prepared_once_per_writer_session_and_again_on_a_new_one(pg_url, monkeypatch):
    # EXECUTE_EVENT_ROWS needs its PREPARE on the session it runs on: done when the store opens (before this
    # counter), and again by a new writer connection (the old one was lost or dropped) before its first batch.
    # Without that the batch's query would fail and the batch would run again the slow way, one savepoint
    # per request.
    async with PostgresStore.open(pg_url, lambda events: None) as store:
        counter = CountWriterQueries(monkeypatch, store)

        async def run_of(n: int, tag: str) -> None:
            requests = [store.submit(WriteRequest(events=[EventDraft("thr_p", "item.delta", {"n": i})],
                                                  action=f"{tag} {i}")) for i in range(n)]
            for request in requests:
                await request.done.wait()
            assert [request.result.unwrap() for request in requests] == [None] * n

        await run_of(5, "first")
        await run_of(5, "second")
        store._drop_connection()  # as after a lost connection: the next batch opens a new session
        await run_of(5, "third")
        prepares = [at for at, q in enumerate(counter.queries) if q.startswith(f"PREPARE {EVENT_ROWS_STATEMENT} ")]
        executes = [at for at, q in enumerate(counter.queries) if f"EXECUTE {EVENT_ROWS_STATEMENT} (" in q]
        assert len(prepares) == 1 and len(executes) == 3
        assert executes[1] < prepares[0] < executes[2]  # the new session prepared before its first batch
        assert not [q for q in counter.queries if "SAVEPOINT" in q]  # no batch fell back to the slow way
    assert [n for (n,) in rows(pg_url, "SELECT CAST(payload AS jsonb)->>'n' FROM events ORDER BY seq")] == \
        [str(i) for i in range(5)] * 3


# The plain batch's query awaited on the event loop (PostgresStore._apply_batch_async): a failure there is
# handled as in the writer thread, by the writer thread.

def _run_of(store: PostgresStore, tid: str, names: list[str]) -> list[WriteRequest]:
    return [store.submit(WriteRequest(events=[EventDraft(tid, name, {"n": name})], action=f"append {name}"))
            for name in names]


async def _settled(requests: list[WriteRequest]) -> None:
    for request in requests:
        await request.done.wait()


async def test_a_writer_session_killed_between_batches_fails_the_next_batch_on_the_loop_and_the_one_after_works(
        pg_url, monkeypatch):
    published: list = []
    async with PostgresStore.open(pg_url, published.extend) as store:
        counter = CountWriterStatements(monkeypatch, store)
        first = _run_of(store, "thr_l", ["a", "b"])
        await _settled(first)
        assert [r.result.unwrap() for r in first] == [None, None] and counter.on_loop == 1
        with psycopg.connect(pg_url, autocommit=True) as admin:  # the server ends the writer's session
            admin.execute("SELECT pg_terminate_backend(%s)", (store._wconn.raw.info.backend_pid,))
        lost = _run_of(store, "thr_l", ["c", "d"])
        await _settled(lost)
        assert counter.on_loop == 2  # sent on the loop: the client cannot know the session is gone before
        for request in lost:  # the outcome of a query on a lost connection is unknown: never run again
            with pytest.raises(StorageError, match="could not commit"):
                request.result.unwrap()
            assert request.committed == []
        after = _run_of(store, "thr_l", ["e", "f"])
        await _settled(after)
        assert [r.result.unwrap() for r in after] == [None, None]
    assert [e.event for e in published] == ["a", "b", "e", "f"]
    assert rows(pg_url, "SELECT event FROM events WHERE thread_id = 'thr_l' ORDER BY seq") == \
        [("a",), ("b",), ("e",), ("f",)]


async def test_a_batch_whose_commit_fails_on_the_loop_fails_whole_and_publishes_nothing(pg_url, monkeypatch):
    # A deferred constraint trigger runs at COMMIT: the COMMIT itself fails, after every statement ran.
    published: list = []
    async with PostgresStore.open(pg_url, published.extend) as store:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("""CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN IF NEW.event = 'refused' THEN RAISE EXCEPTION 'refused at commit'; END IF; RETURN NULL; END $$""")
            admin.execute("CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON events DEFERRABLE INITIALLY DEFERRED"
                          " FOR EACH ROW EXECUTE FUNCTION refuse_at_commit()")
        counter = CountWriterStatements(monkeypatch, store)
        batch = _run_of(store, "thr_c", ["kept?", "refused", "kept too?"])
        await _settled(batch)
        assert counter.on_loop == 1
        for request in batch:
            with pytest.raises(StorageError, match="could not commit"):
                request.result.unwrap()
            assert request.committed == []
        after = _run_of(store, "thr_c", ["x", "y"])
        await _settled(after)
        assert [r.result.unwrap() for r in after] == [None, None]
    assert [e.event for e in published] == ["x", "y"]
    assert rows(pg_url, "SELECT event FROM events WHERE thread_id = 'thr_c' ORDER BY seq") == [("x",), ("y",)]
