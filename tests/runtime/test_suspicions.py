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
from runtime.engine.manager import ThreadManager
from tests.support import held_writer

from .helpers import collect_events, items_of, nth, run_turn, stored_events, turn_completed, turn_record, words


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


# ---- the scripted model after a steer, and when interrupted ----------------------------------------


async def test_scripted_text_after_a_steer_starts_a_new_item_without_a_leading_space(rt, thread_id, autojump_clock):
    """Suspicion: the steer closes the item being streamed, and the rest of the reply came in a new item
    whose text began with the space that separated it from the previous word."""
    turn = await rt.start_turn(thread_id, "/slow 5\nalpha beta gamma")
    await collect_events(rt, thread_id, nth("item.delta", 2, turn["id"]))  # "You", " said:"
    await rt.steer_turn(thread_id, turn["id"], "change course now")
    events = await collect_events(rt, thread_id, turn_completed(turn["id"]))

    items = [i for i in items_of(await rt.get_thread(thread_id), turn["id"]) if i["kind"] == "agent_message"]
    assert [i["detail"] for i in items] == ["You said:", "alpha beta gamma", "You said: change course now"]
    first_deltas = {}
    for event in events:
        if event.event == "item.delta":
            first_deltas.setdefault(event.item_id, event.payload["delta"])
    assert [first_deltas[i["id"]] for i in items] == ["You", "alpha", "You"]
    # A session keeps the reply readable: the split parts join with the one space between them.
    snapshot = await rt.get_session_snapshot(thread_id)
    assert [b["text"] for m in snapshot.messages if m["role"] == "assistant" for b in m["content"]] == [
        "You said:", "alpha beta gamma", "You said: change course now"]


async def test_an_interrupted_scripted_turn_reports_the_words_sent_and_streamed_so_far(rt, thread_id, autojump_clock):
    """Suspicion: the scripted model reported usage only at its end, so an interrupted turn said 0/0."""
    history = await run_turn(rt, thread_id, "some history first")
    prompt = "/slow 100\none two three four five six seven eight nine ten"
    turn = await rt.start_turn(thread_id, prompt)
    await collect_events(rt, thread_id, nth("item.delta", 3, turn["id"]))  # "You", " said:", " one"

    record = await rt.interrupt_turn(thread_id, turn["id"])

    sent = words("some history first") + words("You said: some history first") + words(prompt)
    expected = {"input_tokens": sent, "output_tokens": 3}
    assert record["usage"] == expected
    assert (await turn_record(rt, thread_id, turn["id"]))["usage"] == expected
    end = (await collect_events(rt, thread_id, turn_completed(turn["id"])))[-1]
    assert end.payload["usage"] == expected
    snapshot = await rt.get_session_snapshot(thread_id)
    assert snapshot.total_tokens == sum(history["usage"].values()) + sent + 3


async def test_an_interrupted_hanging_turn_reports_its_prompt_as_sent_and_nothing_streamed(
        rt, thread_id, autojump_clock):
    turn = await rt.start_turn(thread_id, "/hang\nwait for me")

    record = await rt.interrupt_turn(thread_id, turn["id"])

    assert record["usage"] == {"input_tokens": words("/hang\nwait for me"), "output_tokens": 0}


async def test_an_interrupted_steered_turn_counts_the_steer_as_sent(rt, thread_id, autojump_clock):
    prompt, steer = "/slow 100\nalpha beta gamma delta", "and also this"
    turn = await rt.start_turn(thread_id, prompt)
    await collect_events(rt, thread_id, nth("item.delta", 1, turn["id"]))
    await rt.steer_turn(thread_id, turn["id"], steer)
    await collect_events(rt, thread_id, nth("item.delta", 2, turn["id"]))  # one more word after the steer

    record = await rt.interrupt_turn(thread_id, turn["id"])

    assert record["usage"] == {"input_tokens": words(prompt) + words(steer), "output_tokens": 2}
