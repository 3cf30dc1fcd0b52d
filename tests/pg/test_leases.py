"""Lease SQL (runtime/cluster/leases.py) on the real server: the database clock decides expiry, the epoch
only grows, a live lease of another host is refused with its owner named, and release keeps the epoch."""

from __future__ import annotations

import time

import psycopg
import pytest

from runtime.cluster import leases
from runtime.errors import NotOwner

# The contract's table (the PostgreSQL migrations create the same) and the columns of turns the sweeper reads.
DDL = """
CREATE TABLE thread_leases (
  thread_id TEXT PRIMARY KEY,
  owner TEXT,
  advertise_url TEXT,
  epoch BIGINT NOT NULL DEFAULT 0,
  expires_at TIMESTAMPTZ
);
CREATE TABLE turns (id TEXT PRIMARY KEY, thread_id TEXT NOT NULL, status TEXT NOT NULL,
                    rewound INTEGER NOT NULL DEFAULT 0);
"""
# Bound on waiting for the database clock to pass a lease's expiry (the ttls below are a fraction of it).
EXPIRY_WAIT = 10.0


def connect(dsn: str) -> leases.QmarkConnection:
    return leases.QmarkConnection(psycopg.connect(dsn, autocommit=False))


@pytest.fixture
def db(pg_dsn: str):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(DDL)
    a, b = connect(pg_dsn), connect(pg_dsn)
    yield a, b
    a.conn.close()
    b.conn.close()


def wait_expired(conn: leases.QmarkConnection, thread_id: str) -> None:
    """Wait until the DATABASE clock has passed the lease's expiry (a condition on the server, polled)."""
    deadline = time.monotonic() + EXPIRY_WAIT
    while True:
        row = conn.execute("SELECT expires_at <= now() FROM thread_leases WHERE thread_id = ?", (thread_id,)).fetchone()
        conn.conn.rollback()
        if row[0]:
            return
        assert time.monotonic() < deadline, "the lease never expired by the database clock"
        time.sleep(0.02)


def in_tx(conn: leases.QmarkConnection, fn, *args, **kwargs):
    try:
        result = fn(conn, *args, **kwargs)
    except BaseException:
        conn.conn.rollback()
        raise
    conn.conn.commit()
    return result


def test_acquire_renew_refuse_expire_take_over(db):
    a, b = db
    first = in_tx(a, leases.acquire, "thr1", "h1", "http://h1", 30)
    assert (first.taken, first.previous_owner, first.lease.owner, first.lease.epoch) == (True, None, "h1", 1)
    assert first.lease.live and first.lease.advertise_url == "http://h1"
    assert first.lease.record() == {"host_id": "h1", "advertise_url": "http://h1", "epoch": 1,
                                    "expires_at": first.lease.expires_at}
    assert first.lease.expires_at.endswith("Z") and len(first.lease.expires_at) == 24

    again = in_tx(a, leases.acquire, "thr1", "h1", "http://h1", 30)
    assert (again.taken, again.lease.epoch) == (False, 1)  # ours and live: a renewal, same epoch

    with pytest.raises(NotOwner) as refused:
        in_tx(b, leases.acquire, "thr1", "h2", "http://h2", 30)
    assert (refused.value.owner_host_id, refused.value.advertise_url) == ("h1", "http://h1")
    assert "h1" in refused.value.message and "thr1" in refused.value.message
    assert in_tx(b, leases.lease_of, "thr1").epoch == 1  # the refusal changed nothing

    # Shorten h1's lease, let the database clock pass it: h2 takes over with a higher epoch.
    in_tx(a, leases.acquire, "thr1", "h1", "http://h1", 0.2)
    wait_expired(b, "thr1")
    assert in_tx(b, leases.lease_of, "thr1").record() is None  # expired: no owner to show
    taken = in_tx(b, leases.acquire, "thr1", "h2", "http://h2", 30)
    assert (taken.taken, taken.previous_owner, taken.lease.owner, taken.lease.epoch) == (True, "h1", "h2", 2)
    # h1's renewal at its old epoch extends nothing now.
    assert in_tx(a, leases.renew, "h1", {"thr1": 1}, 30) == set()
    assert in_tx(a, leases.lease_of, "thr1").owner == "h2"


def test_release_keeps_the_epoch_and_frees_the_thread(db):
    a, b = db
    in_tx(a, leases.acquire, "thr1", "h1", "http://h1", 30)
    assert in_tx(b, leases.release, "thr1", "h2", 1) is False  # not h2's
    assert in_tx(a, leases.release, "thr1", "h1", 0) is False  # not that epoch
    assert in_tx(a, leases.release, "thr1", "h1", 1) is True
    row = in_tx(a, leases.lease_of, "thr1")
    assert (row.owner, row.expires_at, row.epoch, row.live) == (None, None, 1, False)
    taken = in_tx(b, leases.acquire, "thr1", "h2", "http://h2", 30)
    assert (taken.taken, taken.previous_owner, taken.lease.epoch) == (True, None, 2)


def test_renew_extends_only_leases_held_at_that_epoch(db):
    a, _ = db
    in_tx(a, leases.acquire, "thr1", "h1", "http://h1", 0.5)
    in_tx(a, leases.acquire, "thr2", "h1", "http://h1", 0.5)
    before = in_tx(a, leases.lease_of, "thr1").expires_at
    renewed = in_tx(a, leases.renew, "h1", {"thr1": 1, "thr2": 7, "thr3": 1}, 60)
    assert renewed == {"thr1"}  # thr2 is held at epoch 1, not 7; thr3 has no lease
    assert in_tx(a, leases.lease_of, "thr1").expires_at > before
    assert in_tx(a, leases.renew, "h1", {}, 60) == set()


def test_recovery_runs_in_the_acquiring_transaction(db):
    a, b = db
    seen: list[tuple[str, int]] = []

    def recover(conn, thread_id):
        # Sees the lease already bumped in its own transaction.
        seen.append((thread_id, leases.lease_of(conn, thread_id).epoch))
        conn.execute("UPDATE turns SET status = 'interrupted' WHERE thread_id = ?", (thread_id,))

    in_tx(a, lambda c: c.execute("INSERT INTO turns (id, thread_id, status) VALUES ('t1', 'thr1', 'in_progress')"))

    def failing(conn, thread_id):
        recover(conn, thread_id)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        in_tx(a, leases.acquire, "thr1", "h1", "http://h1", 30, recover=failing)
    # Rolled back together: no epoch bump, no recovery.
    assert in_tx(b, leases.lease_of, "thr1") is None
    assert in_tx(b, lambda c: c.execute("SELECT status FROM turns").fetchone()[0]) == "in_progress"
    in_tx(a, leases.acquire, "thr1", "h1", "http://h1", 30, recover=recover)
    assert seen == [("thr1", 1), ("thr1", 1)]
    assert in_tx(b, lambda c: c.execute("SELECT status FROM turns").fetchone()[0]) == "interrupted"


def test_orphaned_threads_are_those_with_a_running_turn_and_no_live_owner(db):
    a, _ = db
    in_tx(a, lambda c: c.conn.execute(
        "INSERT INTO turns (id, thread_id, status, rewound) VALUES"
        " ('t1', 'live', 'in_progress', 0), ('t2', 'expired', 'awaiting_approval', 0),"
        " ('t3', 'released', 'queued', 0), ('t4', 'nolease', 'in_progress', 0),"
        " ('t5', 'done', 'completed', 0), ('t6', 'rewound', 'in_progress', 1)"))
    in_tx(a, leases.acquire, "live", "h1", "http://h1", 30)
    in_tx(a, leases.acquire, "expired", "h1", "http://h1", 0.1)
    in_tx(a, leases.acquire, "released", "h1", "http://h1", 30)
    in_tx(a, leases.release, "released", "h1", 1)
    in_tx(a, leases.acquire, "done", "h1", "http://h1", 0.1)
    wait_expired(a, "expired")
    assert sorted(in_tx(a, leases.orphaned_threads)) == ["expired", "nolease", "released"]
