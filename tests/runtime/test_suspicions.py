"""The suspicions of issue 11, each proved (the test failed on the code before its fix) or disproved
(the test passed on the code as it was, and stays as the proof).

Orderings are forced with events and a held store writer, never with sleeps: the writer is held by a
write request whose function blocks its worker thread until the test lets it go (a real SQLite
transaction that simply waits), and ThreadGuard keeps the MockClock still while it waits.
"""

from __future__ import annotations

import contextlib
import sqlite3

import trio
import trio.testing

from runtime.errors import EngineUnavailable
from runtime.manager import ThreadManager
from tests.support import held_writer

from .helpers import stored_events, turn_record


# ---- manager.aclose and an engine spawned while it runs ------------------------------------------


async def test_an_engine_spawned_while_aclose_runs_is_stopped_before_it_takes_a_turn(
        open_runtime, autojump_clock, monkeypatch, tmp_path):
    """Suspicion: ``aclose`` only stopped the engines registered when it began. An engine whose spawn
    had passed the "closing?" check registers a step later; it then took a turn, and the nursery's
    final cancel recorded that turn ``completed`` (or "engine crashed"), never ``interrupted``."""
    reached, proceed = trio.Event(), trio.Event()
    supervise = ThreadManager._supervise

    async def supervise_late(self, entry, task_status=trio.TASK_STATUS_IGNORED):
        # Forces one legal scheduling: _spawn has passed its check, aclose takes its step before this
        # task registers the new engine.
        reached.set()
        await proceed.wait()
        await supervise(self, entry, task_status=task_status)

    outcome: dict[str, object] = {}
    async with open_runtime() as rt:
        busy = (await rt.create_thread())["id"]
        late = (await rt.create_thread())["id"]
        running = await rt.start_turn(busy, "/hang")  # an engine aclose has to wait for
        monkeypatch.setattr(ThreadManager, "_supervise", supervise_late)

        async def start_late_turn() -> None:
            try:
                outcome["start"] = await rt.start_turn(late, "/hang", timeout=30)
            except EngineUnavailable as exc:
                outcome["start"] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start_late_turn)
            await reached.wait()
            with held_writer(rt) as release:  # the busy engine's final write waits: aclose stays busy
                nursery.start_soon(rt.manager.aclose)
                await trio.testing.wait_all_tasks_blocked()
                assert rt.manager.engine(busy) is not None  # aclose is still waiting for it
                proceed.set()
                await trio.testing.wait_all_tasks_blocked()
                release.set()

        assert isinstance(outcome["start"], EngineUnavailable), outcome["start"]
        assert rt.manager.live_count == 0
        assert [e.event for e in await stored_events(rt, late)] == ["thread.started"]
        stopped = await turn_record(rt, busy, running["id"])
        assert (stopped["status"], stopped["error"]) == ("interrupted", "server shutting down")
    # What the store holds once the runtime has closed: the late thread never got a turn.
    with contextlib.closing(sqlite3.connect(tmp_path / "runtime.sqlite3")) as db:
        assert db.execute("SELECT status, error FROM turns WHERE thread_id = ?", (late,)).fetchall() == []
