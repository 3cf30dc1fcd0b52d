"""The rule the PostgreSQL store will use to hand out the global ``seq`` (docs/design.md, "PostgreSQL
driver" -> "seq on PostgreSQL"), proven on the real cluster before the store exists.

The hazard: a sequence hands out numbers before commit. Two writers take seq 1 and 2, the one with 2
commits first; a reader that reads "seq > since" sees 2, moves its position to 2 and never sees 1 when it
commits later. The API forbids that skip for the events of a thread.

The rule: a transaction that writes events of a thread first locks that thread's lease row, with its
epoch in the WHERE clause (``SELECT ... FOR UPDATE`` – the same lock fences an old owner out), and only
then takes seqs from the sequence. Writers of one thread are then serialised from their first seq to
their commit or rollback, so a thread's seqs become visible in increasing order; writers of different
threads do not wait for each other (their seqs interleave, which no per-thread reader can notice).
"""

from __future__ import annotations

import concurrent.futures
import time

import psycopg
import pytest

# Bound on every wait for the other connection to reach a state (a loaded 2-core machine).
WAIT_LIMIT = 30.0

SCHEMA = """
CREATE SEQUENCE event_seq;
CREATE TABLE thread_leases (thread_id text PRIMARY KEY, owner text NOT NULL, epoch bigint NOT NULL);
CREATE TABLE events (seq bigint PRIMARY KEY, thread_id text NOT NULL, event text NOT NULL);
INSERT INTO thread_leases VALUES ('thr_x', 'host-a', 1), ('thr_y', 'host-a', 1);
"""


class Fenced(Exception):
    """The writer's epoch is no longer the lease's: it must not write."""


def append_locked(conn: psycopg.Connection, thread_id: str, epoch: int, event: str) -> int:
    """The rule: lock the thread's lease row at our epoch, then take the seq (inside the caller's txn)."""
    row = conn.execute("SELECT 1 FROM thread_leases WHERE thread_id = %s AND epoch = %s FOR UPDATE",
                       (thread_id, epoch)).fetchone()
    if row is None:
        raise Fenced(f"thread {thread_id!r}: epoch {epoch} no longer holds the lease")
    return conn.execute("INSERT INTO events VALUES (nextval('event_seq'), %s, %s) RETURNING seq",
                        (thread_id, event)).fetchone()[0]


def append_naive(conn: psycopg.Connection, thread_id: str, event: str) -> int:
    """Without the rule: just a sequence (what AUTOINCREMENT-like code would do on PostgreSQL)."""
    return conn.execute("INSERT INTO events VALUES (nextval('event_seq'), %s, %s) RETURNING seq",
                        (thread_id, event)).fetchone()[0]


class Reader:
    """A streaming reader of one thread: reads ``seq > position`` and moves its position, like SSE."""

    def __init__(self, dsn: str, thread_id: str):
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.thread_id = thread_id
        self.position = 0
        self.seen: list[int] = []

    def poll(self) -> list[int]:
        got = [r[0] for r in self.conn.execute("SELECT seq FROM events WHERE thread_id = %s AND seq > %s "
                                               "ORDER BY seq", (self.thread_id, self.position)).fetchall()]
        if got:
            self.position = got[-1]
            self.seen += got
        return got

    def committed(self) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT seq FROM events WHERE thread_id = %s ORDER BY seq",
                                                (self.thread_id,)).fetchall()]


@pytest.fixture
def db(pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
    conns: list[psycopg.Connection] = []

    def connect() -> psycopg.Connection:
        conns.append(psycopg.connect(pg_dsn))
        return conns[-1]

    yield pg_dsn, connect
    for c in conns:
        c.close()


def wait_until_blocked_by(observer: psycopg.Connection, waiter_pid: int, holder_pid: int) -> None:
    """Poll pg_blocking_pids until the waiter's backend waits on the holder's lock (bounded)."""
    deadline = time.monotonic() + WAIT_LIMIT
    while holder_pid not in observer.execute("SELECT pg_blocking_pids(%s)", (waiter_pid,)).fetchone()[0]:
        assert time.monotonic() < deadline, f"backend {waiter_pid} never waited for {holder_pid}"
        time.sleep(0.01)


def test_a_bare_sequence_lets_a_reader_skip_an_event(db):
    """The hazard is real on this server (and the Reader detects it): seq 2 commits first, 1 is skipped."""
    dsn, connect = db
    t1, t2 = connect(), connect()
    reader = Reader(dsn, "thr_x")
    s1 = append_naive(t1, "thr_x", "turn.started")
    s2 = append_naive(t2, "thr_x", "item.started")
    assert s2 > s1
    t2.commit()
    assert reader.poll() == [s2]
    t1.commit()
    assert reader.poll() == []
    assert reader.committed() == [s1, s2]
    assert reader.seen == [s2], "the reader skipped s1 for good"


def test_the_lease_lock_rule_never_lets_a_higher_seq_of_a_thread_be_seen_first(db):
    dsn, connect = db
    t1, t2, other = connect(), connect(), connect()
    observer = psycopg.connect(dsn, autocommit=True)
    reader = Reader(dsn, "thr_x")
    reader_y = Reader(dsn, "thr_y")
    try:
        s1 = append_locked(t1, "thr_x", 1, "turn.started")
        # A writer of another thread is not held up by thr_x's lock: it takes a higher seq and commits first.
        s_other = append_locked(other, "thr_y", 1, "turn.started")
        other.commit()
        assert s_other > s1
        assert reader_y.poll() == [s_other]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            t2_pid = t2.info.backend_pid
            second = pool.submit(append_locked, t2, "thr_x", 1, "item.started")
            wait_until_blocked_by(observer, t2_pid, t1.info.backend_pid)
            assert not second.done(), "the second writer of thr_x must wait for the first to end"
            assert reader.poll() == []
            t1.commit()
            s2 = second.result(timeout=WAIT_LIMIT)
        assert s2 > s_other > s1
        assert reader.poll() == [s1]  # s2 taken but not committed: invisible, and lower seqs are all in
        t2.commit()
        assert reader.poll() == [s2]
        assert reader.seen == reader.committed() == [s1, s2]
    finally:
        observer.close()
        reader.conn.close()
        reader_y.conn.close()


def test_a_rolled_back_writer_leaves_a_gap_but_no_skip(db):
    dsn, connect = db
    t1, t2 = connect(), connect()
    observer = psycopg.connect(dsn, autocommit=True)
    reader = Reader(dsn, "thr_x")
    try:
        s1 = append_locked(t1, "thr_x", 1, "turn.started")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            second = pool.submit(append_locked, t2, "thr_x", 1, "item.started")
            wait_until_blocked_by(observer, t2.info.backend_pid, t1.info.backend_pid)
            t1.rollback()
            s2 = second.result(timeout=WAIT_LIMIT)
        assert s2 > s1  # s1 is never handed out again
        t2.commit()
        assert reader.poll() == [s2]
        assert reader.committed() == [s2]
    finally:
        observer.close()
        reader.conn.close()


def test_the_same_lock_fences_a_writer_whose_epoch_was_taken_over(db):
    """A new owner bumps the epoch while the old owner's write waits: the old write is refused."""
    dsn, connect = db
    new_owner, old_owner = connect(), connect()
    observer = psycopg.connect(dsn, autocommit=True)
    reader = Reader(dsn, "thr_x")
    try:
        new_owner.execute("UPDATE thread_leases SET owner = 'host-b', epoch = 2 WHERE thread_id = 'thr_x'")
        s_new = append_locked(new_owner, "thr_x", 2, "turn.completed")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stale = pool.submit(append_locked, old_owner, "thr_x", 1, "item.delta")
            wait_until_blocked_by(observer, old_owner.info.backend_pid, new_owner.info.backend_pid)
            new_owner.commit()
            with pytest.raises(Fenced, match="epoch 1 no longer holds the lease"):
                stale.result(timeout=WAIT_LIMIT)
        old_owner.rollback()
        with pytest.raises(Fenced):
            append_locked(old_owner, "thr_x", 1, "item.delta")
        old_owner.rollback()
        assert reader.poll() == [s_new]
    finally:
        observer.close()
        reader.conn.close()
