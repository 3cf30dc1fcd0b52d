"""One LISTEN connection per host: wake this host's event readers of a thread another host wrote.

The PostgreSQL writer of every host sends ``NOTIFY trio_runtime_events, '<thread_id>'`` inside each
transaction that wrote events of that thread (delivered after its commit). A notification is only a
wake-up: the readers re-read the events table after their position (docs/design.md "seq on
PostgreSQL" says why that never skips), so a lost or coalesced notification never loses an event, and
after a reconnect every reader is woken once to re-read.

The connection (autocommit, never used for queries) is awaited on the event loop with
``trio.lowlevel.wait_readable(conn.pgconn.socket)``, then ``pgconn.consume_input()`` and the parsed
notifications drained without I/O (docs/design.md "PostgreSQL driver"). Connecting runs in a worker
thread. A broken connection is reopened with capped backoff; cancelling ``run`` closes it.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import psycopg
import trio

log = logging.getLogger(__name__)

CHANNEL = "trio_runtime_events"
# Reconnect backoff after the listen connection broke or could not be opened: first delay, doubling up to
# the cap. A cluster's events are also caught up by readers that wake for local writes; the cap bounds how
# long a reader following only another host's writes can lag behind a database restart.
RECONNECT_FIRST_DELAY = 0.1
RECONNECT_MAX_DELAY = 5.0
# The special "thread id" a wake for every reader carries (after a reconnect: notifications may be lost).
EVERY_THREAD = None


class Listener:
    """``wake(thread_id)`` is called on the loop for every notification (``wake(None)``: every thread,
    after a (re)connect). ``connected`` is set while the LISTEN is in place (tests wait on it)."""

    def __init__(self, dsn: str, wake: Callable[[str | None], None], *,
                 connect: Callable[[], Any] | None = None) -> None:
        self._dsn = dsn
        self._wake = wake
        self._connect = connect or self._default_connect
        self.connected = trio.Event()
        self.notifications = 0
        self.reconnects = 0
        self._conn: Any = None

    def _default_connect(self) -> Any:
        conn = psycopg.connect(self._dsn, autocommit=True)
        conn.execute(f"LISTEN {CHANNEL}")
        return conn

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``task_status.started()`` once the first LISTEN is in place or the first
        attempt failed (the host serves anyway; local events need no listener)."""
        try:
            await self._listen(task_status)
        finally:
            self._close()  # also when cancelled between a connect and the drain

    async def _listen(self, task_status: trio.TaskStatus) -> None:
        delay = RECONNECT_FIRST_DELAY
        started = False
        while True:
            try:
                self._conn = await trio.to_thread.run_sync(self._connect)
            except Exception as exc:
                log.warning("could not LISTEN on %s (retrying in %.1f s): %s", CHANNEL, delay, exc)
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            delay = RECONNECT_FIRST_DELAY
            self.connected.set()
            # Notifications sent while no connection listened are lost: every reader re-reads once.
            self._wake(EVERY_THREAD)
            if not started:
                task_status.started()
                started = True
            try:
                await self._drain()
            except (psycopg.Error, OSError) as exc:
                log.warning("the LISTEN connection broke (reconnecting): %s", exc)
                self.reconnects += 1
            finally:
                self.connected = trio.Event() if self.connected.is_set() else self.connected
                self._close()

    async def _drain(self) -> None:
        conn = self._conn
        pgconn = conn.pgconn
        while True:
            await trio.lowlevel.wait_readable(pgconn.socket)
            # consume_input reads what the socket holds (it is readable: no wait); notifies() parses
            # buffered messages only. A closed connection raises here (OperationalError).
            pgconn.consume_input()
            if pgconn.status != psycopg.pq.ConnStatus.OK:
                raise psycopg.OperationalError("the LISTEN connection was closed by the server")
            while True:
                note = pgconn.notifies()
                if note is None:
                    break
                self.notifications += 1
                thread_id = note.extra.decode("utf-8", "replace")
                try:
                    self._wake(thread_id or EVERY_THREAD)
                except Exception:  # a reader's bug must not stop the host's wake-ups
                    log.exception("waking the readers of thread %s failed", thread_id)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()  # a local socket close: no network wait
            except Exception as exc:
                log.debug("closing the LISTEN connection: %s", exc)
