"""Fixtures and helpers for the sessions tests.

Unit tests drive ``Runtime`` directly on ``tmp_path``. Tests that need virtual time request
``autojump_clock``; ``open_rt`` then keeps the MockClock honest (see tests/support.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
import trio
import trio.testing

from runtime import Runtime
from runtime.sessions.undo import wait_for_undo_files
from runtime.store import records
from tests import support

# Upper bound on any single real-clock wait in these tests: a bug fails the test instead of hanging.
LIMIT = 10.0


@pytest.fixture(params=support.SESSION_STORAGES, autouse=True)
def session_storage(request) -> Iterator[str]:
    """Every sessions test runs with each RuntimeConfig.session_storage (session files, or documents in the
    store's ``session_docs`` table): every session feature must behave the same. A test of the files
    themselves is marked ``files_only`` and runs with files only; one that chooses its storages itself is
    marked ``store_only`` and runs once."""
    if request.param == "files" and support.on_postgresql():
        pytest.skip("on PostgreSQL sessions always live in the store (files on one host's disk cannot be shared "
                    "by several hosts): the store variant runs")
    if request.param == "store" and request.node.get_closest_marker("files_only"):
        pytest.skip("a test of the session files themselves: with session_storage=store there are none")
    if request.param == "files" and request.node.get_closest_marker("store_only"):
        pytest.skip("a test that chooses its storages itself: runs once")
    with support.session_storage(request.param):
        yield request.param


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def open_rt(data_dir):
    """``async with open_rt(**config_overrides) as rt``: a Runtime on ``data_dir`` (reopenable)."""
    return functools.partial(support.open_runtime, data_dir)


@pytest.fixture
async def rt(open_rt) -> AsyncIterator[Runtime]:
    async with open_rt() as runtime:
        yield runtime


# ---- helpers ---------------------------------------------------------------------------------


def sessions_dir(rt_or_dir: Any) -> Path:
    if isinstance(rt_or_dir, Path):
        return rt_or_dir / "sessions"
    return rt_or_dir.config.sessions_dir


def stored_documents(data_dir: Path) -> dict[str, bytes]:
    """``<id>.json`` -> the document's bytes, of every session kept in the store (``session_docs``), read
    with a connection of its own (what a restart would see), on the suite's backend. Empty with session files."""
    with support.store_connection(data_dir) as conn:
        try:
            return {f"{row[0]}.json": bytes(row[1]) for row in conn.execute("SELECT id, document FROM session_docs")}
        except support.store_errors():  # no database yet, or one from before migration 7
            return {}


def dir_snapshot(directory: Path) -> dict[str, Any]:
    """Every entry of ``directory`` (recursively): file name -> bytes, directory name -> nested dict. For
    the sessions directory with session_storage=store, the documents kept in the store are its files (so
    "nothing changed" and "nothing saved" read the same in both storages); a missing directory is empty.
    A change answers before its undo file is dropped (runtime/sessions/undo.py): that is waited for first."""
    wait_for_undo_files()
    result: dict[str, Any] = {}
    if directory.name == "sessions" and support.SESSION_STORAGE == "store":
        result.update(stored_documents(directory.parent))
    if not directory.exists():
        return result
    for entry in sorted(directory.iterdir()):
        result[entry.name] = dir_snapshot(entry) if entry.is_dir() else entry.read_bytes()
    return result


def temp_files(directory: Path) -> list[str]:
    wait_for_undo_files()  # a change answers before its undo file is dropped (runtime/sessions/undo.py)
    if not directory.exists():
        return []
    return sorted(entry.name for entry in directory.iterdir() if entry.name.startswith("."))


def stored_bytes(rt_or_dir: Any, session_id: str) -> bytes | None:
    """The stored document of ``session_id`` (its file, or its row in the store), None when there is none."""
    directory = sessions_dir(rt_or_dir)
    return dir_snapshot(directory).get(f"{session_id}.json")


def read_session_file(rt: Any, session_id: str) -> dict[str, Any]:
    data = stored_bytes(rt, session_id)
    assert data is not None, f"session {session_id!r} is not stored"
    return json.loads(data)


async def events_of(rt: Runtime, thread_id: str, name: str | None = None) -> list[Any]:
    events, since = [], 0
    while True:
        page = await rt.store.read(functools.partial(records.events_after, thread_id=thread_id, since_seq=since))
        if not page:
            break
        events += page
        since = page[-1].seq
    return [e for e in events if name is None or e.event == name]


async def wait_turn_end(rt: Runtime, thread_id: str, turn_id: str) -> dict[str, Any]:
    """Read the thread's event stream (replay, then live) until the turn's ``turn.completed``."""
    stream = await rt.subscribe(thread_id)
    try:
        with trio.fail_after(LIMIT):
            async for event in stream:
                if event.event == "turn.completed" and event.turn_id == turn_id:
                    return event.payload
    finally:
        stream.close()
    raise AssertionError("event stream ended early")


async def run_turn(rt: Runtime, thread_id: str, prompt: str) -> dict[str, Any]:
    """Start a turn and wait for it to end; returns the ``turn.completed`` payload."""
    turn = await rt.start_turn(thread_id, prompt)
    payload = await wait_turn_end(rt, thread_id, turn["id"])
    payload["turn_id"] = turn["id"]
    return payload


async def session_ids_listed(rt: Runtime, **kw: Any) -> list[str]:
    return [m["id"] for m in await rt.sessions.list(limit=kw.pop("limit", 500), **kw)]


@pytest.fixture
def fake_now(monkeypatch):
    """A strictly increasing wall clock (1 ms per call) for every module that stamps records, so
    orderings by ``updated_at`` are deterministic however fast the machine is."""
    import datetime as dt
    import itertools

    base = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    counter = itertools.count(1)

    def now() -> str:
        t = base + dt.timedelta(milliseconds=next(counter))
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"

    for module in ("runtime.core", "runtime.engine.engine", "runtime.sessions.service"):
        monkeypatch.setattr(f"{module}.utc_now", now)
    return now


@contextlib.contextmanager
def real_time_limit(seconds: float):
    """Fail the block after ``seconds`` of *real* time. Under a MockClock, ``fail_after`` cannot fire
    while some task spins (virtual time only moves when every task is blocked), so a live-lock would
    hang the suite instead of failing the test."""
    token = trio.lowlevel.current_trio_token()
    with trio.CancelScope() as scope:
        def fire() -> None:
            try:
                token.run_sync_soon(scope.cancel)
            except trio.RunFinishedError:
                pass

        timer = threading.Timer(seconds, fire)
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
    if scope.cancelled_caught:
        raise AssertionError(f"did not finish within {seconds} s of real time (is a task spinning?)")
