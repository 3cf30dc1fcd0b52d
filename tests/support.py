"""Test support shared by the suites: a Runtime opener that keeps MockClock honest, and a counter of
requests in flight inside a live server.

Virtual time and worker threads
-------------------------------
pytest-trio's ``autojump_clock`` jumps to the next deadline as soon as every task is blocked, and a
task waiting on ``trio.to_thread.run_sync`` counts as blocked. The store runs SQLite (and sessions
run file I/O) in worker threads, so the bare clock would race ahead while they work, firing timeouts
that real time never would. ``ThreadGuard`` switches autojump off while any watched limiter has a
token out and back on when all are returned, so virtual time only moves when the program is truly
idle, and the production code path (real threads) is what the tests run.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import ssl
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import trio
import trio.testing

from runtime import Runtime, RuntimeConfig

# Upper bound for any single real-clock wait; generous because CI machines are busy, never a sync device.
E2E_LIMIT = 20.0
# One TLS context for tests that open many httpx clients (they speak plain HTTP, but httpx builds a
# context per client anyway): built per client it loads the CA bundle on the event loop, ~30 ms of CPU
# each (measured), and an in-process server shares that loop. 25-50 clients starting together stalled it
# for over a second (loop lag p99 1.4 s), and requests ended 504/408 at a 1 s request timeout.
CLIENT_TLS = ssl.create_default_context()


def worker_limiters(rt: Runtime) -> list[trio.CapacityLimiter]:
    """Every limiter a worker thread of ``rt`` holds a token of while it runs: trio's default one (first),
    the store's reads, the store's writer while it awaits the database on the loop (PostgreSQL), and the
    sessions' own (the undo files' thread, runtime/sessions/undo.py)."""
    return [trio.to_thread.current_default_thread_limiter(), rt.store.read_limiter, rt.store.write_limiter,
            *rt.sessions.thread_limiters]


class ThreadGuard(trio.abc.Instrument):
    """Keeps a MockClock from autojumping while a thread holds a token of a watched limiter.

    A thread's token is taken in the step that starts it and released in the same step that
    reschedules its waiting task, so checking after every task step never leaves a window where the
    program looks idle but a thread is about to wake it."""

    def __init__(self, clock: trio.testing.MockClock) -> None:
        self.clock = clock
        self.threshold = clock.autojump_threshold
        self.limiters: list[trio.CapacityLimiter] = [trio.to_thread.current_default_thread_limiter()]

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        busy = any(limiter.borrowed_tokens for limiter in self.limiters)
        wanted = math.inf if busy else self.threshold
        if self.clock.autojump_threshold != wanted:
            self.clock.autojump_threshold = wanted


_PG_DATABASES: dict[Path, str] = {}
_PG_CLUSTER: list = []


def _pg_url_for(data_dir: Path) -> str:
    """The PostgreSQL database of ``data_dir`` on a cluster started once for the whole run (removed at exit)."""
    import pytest

    from tests.support_pg import PgUnavailable, start_cluster

    if not _PG_CLUSTER:
        try:
            _PG_CLUSTER.append(start_cluster())
        except PgUnavailable as e:  # no PostgreSQL here: the test is skipped with the reason, never passed
            pytest.skip(str(e))
    cluster = _PG_CLUSTER[0]
    key = Path(data_dir).resolve()
    if key not in _PG_DATABASES:
        _PG_DATABASES[key] = cluster.create_database()
    return cluster.url(_PG_DATABASES[key])


# The whole-suite switch (issue 15): TRIO_TEST_STORE=postgresql opens every Runtime and server the tests start
# on a PostgreSQL database of a throwaway cluster, one per data dir (README, "Tests").
STORE_ENV = "TRIO_TEST_STORE"


def on_postgresql() -> bool:
    """True in a whole-suite run on PostgreSQL (TRIO_TEST_STORE=postgresql)."""
    return os.environ.get(STORE_ENV) == "postgresql"


def store_url_for(data_dir: Path) -> str | None:
    """The ``store_url`` a Runtime or server on ``data_dir`` gets: None (SQLite in the data dir), or on
    PostgreSQL the URL of that data dir's database."""
    return _pg_url_for(data_dir) if on_postgresql() else None


def serve_store_args(data_dir: Path) -> list[str]:
    """The ``trio-runtime serve`` arguments that put a server subprocess on ``data_dir``'s store: none on
    SQLite, ``--store <url>`` on PostgreSQL (the same database open_runtime uses for that data dir)."""
    url = store_url_for(data_dir)
    return [] if url is None else ["--store", url]


@contextlib.contextmanager
def store_connection(data_dir: Path) -> Iterator[Any]:
    """A connection of its own to ``data_dir``'s store, in autocommit mode: what a restart or another writer
    sees, also of a stopped server's data. On SQLite an sqlite3 connection to the data dir's file; on
    PostgreSQL the store's own adapter (runtime.store.postgres.PgConnection: ``?`` placeholders, rows by name
    and by position), so a test writes its SQL once. ``store_errors()`` are what a missing table raises."""
    if on_postgresql():
        from runtime.store.postgres import connect

        conn = connect(_pg_url_for(data_dir))
    else:
        conn = sqlite3.connect(Path(data_dir) / "runtime.sqlite3", isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def store_errors() -> tuple[type[BaseException], ...]:
    """The errors a statement on ``store_connection`` raises (a missing table, a bad statement)."""
    if on_postgresql():
        import psycopg

        return (psycopg.Error,)
    return (sqlite3.Error,)


# The RuntimeConfig.session_storage of every Runtime and server the tests open unless they say otherwise:
# the session suites run each test with "files" and with "store" (tests/sessions/conftest.py sets it).
SESSION_STORAGE = "files"
SESSION_STORAGES = ("files", "store")


@contextlib.contextmanager
def session_storage(kind: str) -> Iterator[str]:
    """Open every Runtime and server with ``session_storage=kind`` inside the block. Set by hand, not with
    ``monkeypatch``: a test's own ``monkeypatch.undo()`` must not switch it back."""
    global SESSION_STORAGE
    SESSION_STORAGE = kind
    try:
        yield kind
    finally:
        SESSION_STORAGE = "files"


@contextlib.asynccontextmanager
async def open_runtime(data_dir: Path, **overrides) -> AsyncIterator[Runtime]:
    """``Runtime.open`` on ``data_dir``; under an autojumping MockClock it installs ThreadGuard.

    With TRIO_TEST_STORE=postgresql (a whole-suite run on PostgreSQL, issue 15) and no ``store_url`` given,
    the runtime opens on a database of the throwaway cluster that belongs to ``data_dir`` (a fresh one the
    first time, the same one when the test reopens that data dir: a restart)."""
    if "store_url" not in overrides and on_postgresql():
        overrides["store_url"] = _pg_url_for(data_dir)
    config = RuntimeConfig(**{"data_dir": data_dir, "session_storage": SESSION_STORAGE, **overrides})
    clock = trio.lowlevel.current_clock()
    guard = None
    if isinstance(clock, trio.testing.MockClock) and clock.autojump_threshold < math.inf:
        guard = ThreadGuard(clock)
        trio.lowlevel.add_instrument(guard)
    try:
        async with Runtime.open(config) as rt:
            if guard is not None:
                guard.limiters.extend(worker_limiters(rt)[1:])
            yield rt
    finally:
        if guard is not None:
            trio.lowlevel.remove_instrument(guard)
            clock.autojump_threshold = guard.threshold


async def plant_session_document(rt: Runtime, session_id: str, data: bytes) -> None:
    """Store ``data`` as session ``session_id``'s document behind the service's back (an unparseable one, say):
    a file in files mode, a ``session_docs`` row where sessions live in the database (always on PostgreSQL)."""
    if rt.sessions.storage == "files":
        rt.config.sessions_dir.mkdir(parents=True, exist_ok=True)
        (rt.config.sessions_dir / f"{session_id}.json").write_bytes(data)
        return
    await rt.store.write(fn=lambda conn: conn.execute(
        "INSERT INTO session_docs (id, revision, document, size, updated_at) VALUES (?, 1, ?, ?, '')",
        (session_id, data, len(data))))


async def stored_session_ids(rt: Runtime) -> list[str]:
    """The ids of every stored session document, sorted: the ``.json`` files in files mode, the
    ``session_docs`` rows where sessions live in the database."""
    if rt.sessions.storage == "files":
        return sorted(p.stem for p in rt.config.sessions_dir.iterdir() if p.suffix == ".json")
    rows = await rt.store.read(lambda conn: conn.execute("SELECT id FROM session_docs").fetchall())
    return sorted(row[0] for row in rows)


# Real-time bound on a held store writer: a test that forgets to let it go fails instead of hanging.
HOLD_LIMIT = 20.0


@contextlib.contextmanager
def held_writer(rt: Runtime) -> Iterator[threading.Event]:
    """Hold the store's single writer inside a real transaction until the yielded event is set (at the
    latest when the block ends): every write queued meanwhile commits after it, in order. Under an
    autojumping MockClock, ThreadGuard keeps virtual time still while the writer is held."""
    release = threading.Event()
    from runtime.store import WriteRequest

    rt.store.submit(WriteRequest(fn=lambda conn: release.wait(HOLD_LIMIT)))
    try:
        yield release
    finally:
        release.set()


async def run_clients(count: int, concurrency: int, client) -> None:
    """Run ``client(index)`` for every index in ``range(count)``, at most ``concurrency`` at once."""
    limiter = trio.CapacityLimiter(concurrency)

    async def limited(index: int) -> None:
        async with limiter:
            await client(index)

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(limited, index)


class InFlight:
    """Counts HTTP requests inside the app (Quart's documented ``app.asgi_app`` wrapping)."""

    def __init__(self, app) -> None:
        self.count = 0
        self.changed = trio.Event()
        self._inner = app.asgi_app
        app.asgi_app = self

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self._inner(scope, receive, send)
        self.count += 1
        try:
            await self._inner(scope, receive, send)
        finally:
            self.count -= 1
            self.changed.set()
            self.changed = trio.Event()

    async def settle(self) -> None:
        """Wait until the server has read everything clients sent and has no request in flight."""
        with trio.fail_after(E2E_LIMIT):
            while True:
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
                if self.count == 0:
                    return
                await self.changed.wait()


def clock_ticking(monkeypatch: Any, *, milliseconds: int) -> None:
    """runtime.clock's wall clock moves ``milliseconds`` at every reading (from 2026-12-03 12:00 UTC), so a
    value that reads the clock twice where it should read it once comes out late by that much."""
    import datetime as real
    import types

    from runtime import clock

    class Ticking(real.datetime):
        at = real.datetime(2026, 12, 3, 12, 0, 0, tzinfo=real.timezone.utc)

        @classmethod
        def now(cls, tz=None):
            cls.at += real.timedelta(milliseconds=milliseconds)
            return cls.at

    monkeypatch.setattr(clock, "_dt", types.SimpleNamespace(datetime=Ticking, timezone=real.timezone,
                                                             timedelta=real.timedelta))
