"""The host's LISTEN connection (runtime/cluster/listener.py) on the real server: a NOTIFY from another
connection wakes the thread it names, a broken connection is reopened (and wakes every reader once, since
notifications sent meanwhile are lost), and cancelling the listener closes its connection."""

from __future__ import annotations

import psycopg
import trio

from runtime.cluster.listener import CHANNEL, Listener

# Bound on every wait below (a loaded 2-core machine); the waits are on events, this only stops a hang.
WAIT = 20


def notify(dsn: str, payload: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


def listen_backends(dsn: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [row[0] for row in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE query = %s", (f"LISTEN {CHANNEL}",)).fetchall()]


def test_notifications_wake_threads_and_a_broken_connection_is_reopened(pg_dsn: str):
    woken: list[str | None] = []
    arrived = trio.Event()

    def wake(thread_id):
        woken.append(thread_id)
        arrived.set()

    async def until(predicate):
        nonlocal arrived
        while not predicate():
            await arrived.wait()
            arrived = trio.Event()

    async def main():
        listener = Listener(pg_dsn, wake)
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                await nursery.start(listener.run)
                await listener.connected.wait()
                assert woken == [None]  # a (re)connect wakes every reader once
                await trio.to_thread.run_sync(notify, pg_dsn, "thr_a")
                await trio.to_thread.run_sync(notify, pg_dsn, "thr_b")
                await until(lambda: len(woken) == 3)
                assert woken == [None, "thr_a", "thr_b"]
                assert listener.notifications == 2

                # The server ends the listen backend: the listener reconnects and wakes everyone.
                (pid,) = await trio.to_thread.run_sync(listen_backends, pg_dsn)
                with psycopg.connect(pg_dsn, autocommit=True) as conn:
                    assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0] is True
                await until(lambda: len(woken) == 4)
                assert woken[3] is None and listener.reconnects == 1
                await listener.connected.wait()
                (new_pid,) = await trio.to_thread.run_sync(listen_backends, pg_dsn)
                assert new_pid != pid
                await trio.to_thread.run_sync(notify, pg_dsn, "thr_c")
                await until(lambda: len(woken) == 5)
                assert woken[4] == "thr_c"
                nursery.cancel_scope.cancel()
        # Cancelled: its connection is closed (the server sees no LISTEN backend left).
        with trio.fail_after(WAIT):
            while await trio.to_thread.run_sync(listen_backends, pg_dsn):
                await trio.sleep(0.02)

    trio.run(main)


def test_an_unreachable_database_is_retried_and_the_host_starts_anyway(pg_dsn: str):
    attempts: list[int] = []

    def connect():
        attempts.append(1)
        if len(attempts) < 3:
            raise psycopg.OperationalError("connection refused")
        conn = psycopg.connect(pg_dsn, autocommit=True)
        conn.execute(f"LISTEN {CHANNEL}")
        return conn

    woken: list[str | None] = []

    async def main():
        listener = Listener(pg_dsn, woken.append, connect=connect)
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                await nursery.start(listener.run)  # returns after the first failed attempt
                assert not listener.connected.is_set() and len(attempts) == 1
                await listener.connected.wait()
                assert len(attempts) == 3 and woken == [None]
                nursery.cancel_scope.cancel()

    trio.run(main)
