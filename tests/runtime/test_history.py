"""History control through the Runtime: fork, rewind, retry, restore, delete (API.md v1.1, "History control").

After every change the four views of a thread's history must agree: the engine's live messages (what the
next turn sends the model), ``PUT /v1/sessions`` (the engine's snapshot), ``POST /v1/sessions`` (a rebuild
from the stored items) and a freshly restored engine after a restart. ``assert_views_agree`` checks all
four, so each test below states the change and that one helper states the consistency.
"""

from __future__ import annotations

import functools

import pytest
import trio

from runtime import Conflict, InvalidData, InvalidInput, NotFound, PreconditionFailed, Runtime
from runtime.sessions.service import _rebuild_state
from runtime.transcript import build_messages, word_count

from tests import support
from .helpers import run_turn, stored_events, wait_turn_end


def texts(messages) -> list[tuple[str, str]]:
    return [(m["role"], " ".join(b.get("text", "") for b in m["content"])) for m in messages]


async def live_messages(rt, thread_id):
    return list((await rt.get_session_snapshot(thread_id)).messages)


async def rebuilt_messages(rt, thread_id):
    state = await rt.store.read(functools.partial(_rebuild_state, thread_id=thread_id))
    return build_messages(state["base_messages"], state["items"])


async def assert_views_agree(rt, thread_id, expected: list[tuple[str, str]]) -> None:
    """Engine, snapshot, rebuild and a successor engine restored from the store all hold ``expected``."""
    await rt.manager.handle(thread_id)  # spawned (restored from the store) if it was not running
    engine = rt.manager.engine(thread_id)
    assert engine is not None
    assert texts(engine.messages) == expected
    assert texts(await live_messages(rt, thread_id)) == expected
    assert texts(await rebuilt_messages(rt, thread_id)) == expected
    snapshot_tokens = (await rt.get_session_snapshot(thread_id)).total_tokens
    await rt.shutdown_thread(thread_id)  # the successor restores from the store
    assert texts(await live_messages(rt, thread_id)) == expected
    assert (await rt.get_session_snapshot(thread_id)).total_tokens == snapshot_tokens


def said(prompt: str) -> list[tuple[str, str]]:
    return [("user", prompt), ("assistant", f"You said: {prompt}")]


async def three_turns(rt, thread_id):
    return [await run_turn(rt, thread_id, p) for p in ("one alpha", "two beta", "three gamma")]


# ---- rewind ---------------------------------------------------------------------------------------


async def test_rewind_takes_the_turn_and_later_ones_out_of_the_live_history(rt, thread_id):
    t1, t2, t3 = await three_turns(rt, thread_id)

    result = await rt.rewind_thread(thread_id, t2["id"])

    assert result["removed_turn_ids"] == [t2["id"], t3["id"]]
    assert result["thread"]["latest_turn_id"] == t1["id"]
    detail = await rt.get_thread(thread_id)
    assert [t["id"] for t in detail["turns"]] == [t1["id"]]
    assert {i["turn_id"] for i in detail["items"]} == {t1["id"]}
    assert detail["latest_seq"] == result["latest_seq"]
    full = await rt.get_thread(thread_id, include_rewound=True)
    assert [(t["id"], t["rewound"]) for t in full["turns"]] == [(t1["id"], False), (t2["id"], True), (t3["id"], True)]
    assert {i["turn_id"] for i in full["items"]} == {t1["id"], t2["id"], t3["id"]}
    events = await stored_events(rt, thread_id)
    assert events[-1].event == "thread.rewound" and events[-1].seq == result["latest_seq"]
    assert events[-1].payload == {"before_turn_id": t2["id"], "removed_turn_ids": [t2["id"], t3["id"]]}
    # Rewound turns keep their events: the log is append-only.
    assert {e.turn_id for e in events if e.event == "turn.completed"} == {t1["id"], t2["id"], t3["id"]}
    await assert_views_agree(rt, thread_id, said("one alpha"))


async def test_the_next_turn_after_a_rewind_sees_only_the_kept_history(rt, thread_id):
    t1, t2, _ = await three_turns(rt, thread_id)
    await rt.rewind_thread(thread_id, t2["id"])

    t4 = await run_turn(rt, thread_id, "four delta")

    # Scripted usage: input_tokens = words of the whole context sent (history + prompt).
    assert t4["usage"]["input_tokens"] == word_count(build_messages([], [])) + len("one alpha You said: one alpha".split()) + 2
    await assert_views_agree(rt, thread_id, said("one alpha") + said("four delta"))
    snapshot = await rt.get_session_snapshot(thread_id)
    assert snapshot.total_tokens == t1["usage"]["input_tokens"] + t1["usage"]["output_tokens"] + \
        t4["usage"]["input_tokens"] + t4["usage"]["output_tokens"]


async def test_rewind_before_the_first_turn_empties_the_history(rt, thread_id):
    t1, t2, t3 = await three_turns(rt, thread_id)
    result = await rt.rewind_thread(thread_id, t1["id"])
    assert result["removed_turn_ids"] == [t1["id"], t2["id"], t3["id"]]
    assert result["thread"]["latest_turn_id"] is None
    assert (await rt.get_thread(thread_id))["turns"] == []
    await assert_views_agree(rt, thread_id, [])
    assert (await rt.get_session_snapshot(thread_id)).total_tokens == 0


async def test_rewind_anchors_that_are_unknown_foreign_rewound_or_running_change_nothing(rt, thread_id):
    t1, t2, _ = await three_turns(rt, thread_id)
    other = (await rt.create_thread())["id"]
    foreign = await run_turn(rt, other, "elsewhere")
    await rt.rewind_thread(thread_id, t2["id"])
    before = await rt.get_thread(thread_id, include_rewound=True)

    with pytest.raises(NotFound, match="Turn 'turn_nope' not found in thread"):
        await rt.rewind_thread(thread_id, "turn_nope")
    with pytest.raises(NotFound, match=foreign["id"]):
        await rt.rewind_thread(thread_id, foreign["id"])
    with pytest.raises(Conflict, match="was rewound"):
        await rt.rewind_thread(thread_id, t2["id"])
    with pytest.raises(InvalidInput, match="before_turn_id"):
        await rt.rewind_thread(thread_id, "  ")
    with pytest.raises(InvalidInput, match="if_busy"):
        await rt.rewind_thread(thread_id, t1["id"], if_busy="maybe")
    with pytest.raises(NotFound, match="Thread 'thr_nope' not found"):
        await rt.rewind_thread("thr_nope", t1["id"])

    assert await rt.get_thread(thread_id, include_rewound=True) == before
    await assert_views_agree(rt, thread_id, said("one alpha"))


async def test_a_running_turn_is_refused_unless_if_busy_interrupts_it(rt, thread_id):
    t1 = await run_turn(rt, thread_id, "one alpha")
    running = await rt.start_turn(thread_id, "/hang\nstuck here")

    with pytest.raises(Conflict, match="in progress"):
        await rt.rewind_thread(thread_id, t1["id"])
    with pytest.raises(Conflict, match="in progress"):
        await rt.rewind_thread(thread_id, running["id"], if_busy="reject")
    assert rt.manager.engine(thread_id).active is not None

    result = await rt.rewind_thread(thread_id, running["id"], if_busy="interrupt")

    assert result["removed_turn_ids"] == [running["id"]]
    full = await rt.get_thread(thread_id, include_rewound=True)
    ended = next(t for t in full["turns"] if t["id"] == running["id"])
    assert ended["status"] == "interrupted" and ended["rewound"] is True
    names = [e.event for e in await stored_events(rt, thread_id) if e.turn_id == running["id"] or e.turn_id is None]
    assert names.index("turn.interrupt_requested") < names.index("turn.completed") < names.index("thread.rewound")
    await assert_views_agree(rt, thread_id, said("one alpha"))


# ---- retry ----------------------------------------------------------------------------------------


async def test_retry_rewinds_the_latest_turn_and_runs_its_prompt_again_as_one_change(rt, thread_id):
    t1, t2 = [await run_turn(rt, thread_id, p) for p in ("one alpha", "two beta")]

    new = await rt.retry_turn(thread_id)

    assert new["retry_of"] == t2["id"] and new["status"] == "in_progress" and new["input_summary"] == "two beta"
    assert new["id"] not in (t1["id"], t2["id"])
    await wait_turn_end(rt, thread_id, new["id"])
    detail = await rt.get_thread(thread_id)
    assert [t["id"] for t in detail["turns"]] == [t1["id"], new["id"]]
    assert detail["turns"][1]["retry_of"] == t2["id"] and detail["turns"][1]["status"] == "completed"
    events = [e for e in await stored_events(rt, thread_id) if e.seq > 0]
    rewound = next(e for e in events if e.event == "thread.rewound")
    started = next(e for e in events if e.event == "turn.started" and e.turn_id == new["id"])
    assert rewound.payload == {"before_turn_id": t2["id"], "removed_turn_ids": [t2["id"]]}
    assert started.seq == rewound.seq + 1 and started.payload["retry_of"] == t2["id"]
    await assert_views_agree(rt, thread_id, said("one alpha") + said("two beta"))


async def test_retry_of_an_earlier_turn_with_another_model_mode(rt, thread_id):
    t1, t2, t3 = await three_turns(rt, thread_id)
    new = await rt.retry_turn(thread_id, t1["id"], mode="plan")
    await wait_turn_end(rt, thread_id, new["id"])
    detail = await rt.get_thread(thread_id)
    assert [t["id"] for t in detail["turns"]] == [new["id"]]
    started = [e for e in await stored_events(rt, thread_id) if e.event == "turn.started"][-1]
    assert started.payload["mode"] == "plan"
    await assert_views_agree(rt, thread_id, said("one alpha"))


async def test_retry_refuses_a_thread_without_turns_a_compaction_and_a_running_turn(rt, thread_id):
    with pytest.raises(Conflict, match="no turn to retry"):
        await rt.retry_turn(thread_id)
    await run_turn(rt, thread_id, "one alpha")
    compaction = await rt.compact(thread_id)
    with pytest.raises(Conflict, match="no prompt to retry"):
        await rt.retry_turn(thread_id, compaction["turn_id"])
    running = await rt.start_turn(thread_id, "/hang\nstuck")
    with pytest.raises(Conflict, match="in progress"):
        await rt.retry_turn(thread_id)
    new = await rt.retry_turn(thread_id, if_busy="interrupt")
    assert new["retry_of"] == running["id"]
    await rt.interrupt_turn(thread_id, new["id"])  # the retried prompt hangs again


# ---- fork -----------------------------------------------------------------------------------------


async def test_fork_copies_the_history_through_a_turn_and_leaves_the_source_alone(rt, thread_id):
    t1, t2, t3 = await three_turns(rt, thread_id)
    source_before = await rt.get_thread(thread_id)

    result = await rt.fork_thread(thread_id, through_turn_id=t2["id"], title="a fork")

    fork_id = result["thread"]["id"]
    assert result["forked_from"] == {"thread_id": thread_id, "through_turn_id": t2["id"]}
    assert result["thread"]["forked_from"] == result["forked_from"] and result["thread"]["title"] == "a fork"
    fork = await rt.get_thread(fork_id)
    assert [t["id"] for t in fork["turns"]] == result["turn_ids"] and len(result["turn_ids"]) == 2
    assert not {t["id"] for t in fork["turns"]} & {t1["id"], t2["id"]}
    assert [t["input_summary"] for t in fork["turns"]] == ["one alpha", "two beta"]
    assert [(i["kind"], i["detail"]) for i in fork["items"]] == [
        (i["kind"], i["detail"]) for i in source_before["items"] if i["turn_id"] in (t1["id"], t2["id"])]
    assert fork["thread"]["latest_turn_id"] == result["turn_ids"][-1]
    source_after = await rt.get_thread(thread_id)
    assert source_after["turns"] == source_before["turns"] and source_after["items"] == source_before["items"]
    forked_event = (await stored_events(rt, thread_id))[-1]
    assert forked_event.event == "thread.forked"
    assert forked_event.payload == {"thread_id": fork_id, "through_turn_id": t2["id"]}
    started = (await stored_events(rt, fork_id))[0]
    assert started.event == "thread.started" and started.payload["forked_from"] == result["forked_from"]
    await assert_views_agree(rt, fork_id, said("one alpha") + said("two beta"))
    t4 = await run_turn(rt, fork_id, "four delta")
    assert t4["usage"]["input_tokens"] == len("one alpha You said: one alpha two beta You said: two beta".split()) + 2


async def test_fork_defaults_to_the_latest_finished_turn_while_the_source_runs_one(rt, thread_id):
    t1 = await run_turn(rt, thread_id, "one alpha")
    running = await rt.start_turn(thread_id, "/hang\nstill going")

    result = await rt.fork_thread(thread_id, new_thread_id="my-fork_1")

    assert result["thread"]["id"] == "my-fork_1"
    assert result["forked_from"]["through_turn_id"] == t1["id"]
    engine = rt.manager.engine(thread_id)
    assert engine.active is not None and engine.active.id == running["id"]  # kept running
    with pytest.raises(Conflict, match="only a finished turn"):
        await rt.fork_thread(thread_id, through_turn_id=running["id"])
    with pytest.raises(Conflict, match="already exists"):
        await rt.fork_thread(thread_id, new_thread_id="my-fork_1")
    for bad in ("a/b", "..", "", "-x", "x" * 129):
        with pytest.raises(InvalidInput, match="Invalid thread id"):
            await rt.fork_thread(thread_id, new_thread_id=bad)
    await rt.interrupt_turn(thread_id, running["id"])
    assert [t["id"] for t in (await rt.get_thread(thread_id))["turns"]] == [t1["id"], running["id"]]


async def test_a_thread_without_turns_forks_empty(rt, thread_id):
    result = await rt.fork_thread(thread_id)
    assert result["turn_ids"] == [] and result["forked_from"]["through_turn_id"] is None
    assert (await rt.get_thread(result["thread"]["id"]))["turns"] == []


async def test_a_fork_of_a_resumed_thread_keeps_its_base_messages(rt, thread_id):
    await run_turn(rt, thread_id, "one alpha")
    saved = await rt.sessions.save(thread_id=thread_id, timeout=10)
    resumed = await rt.sessions.resume(saved["session_id"])
    t2 = await run_turn(rt, resumed["thread_id"], "two beta")
    result = await rt.fork_thread(resumed["thread_id"], through_turn_id=t2["id"])
    await assert_views_agree(rt, result["thread"]["id"], said("one alpha") + said("two beta"))


# ---- restore --------------------------------------------------------------------------------------


async def test_restore_replaces_the_history_and_its_safety_session_undoes_it(rt, thread_id):
    await rt.update_thread(thread_id, {"system_prompt": "be brief", "title": "work"})
    await run_turn(rt, thread_id, "one alpha")
    saved = await rt.sessions.save(thread_id=thread_id, timeout=10)
    await rt.update_thread(thread_id, {"system_prompt": "be verbose"})
    t2 = await run_turn(rt, thread_id, "two beta")

    result = await rt.restore_thread(thread_id, saved["session_id"])

    assert result["session_id"] == saved["session_id"] and result["revision"] == 1
    assert result["message_count"] == 2
    assert result["thread"]["system_prompt"] == "be brief" and result["thread"]["session_id"] == saved["session_id"]
    assert (await rt.get_thread(thread_id))["turns"] == []
    assert [t["rewound"] for t in (await rt.get_thread(thread_id, include_rewound=True))["turns"]] == [True, True]
    safety = await rt.sessions.get(result["safety_session_id"])
    assert safety["metadata"]["title"] == "Before restore: work"
    assert texts(safety["messages"]) == said("one alpha") + said("two beta")
    assert safety["system_prompt"] == "be verbose"
    event = (await stored_events(rt, thread_id))[-1]
    assert event.event == "thread.restored" and event.payload == {
        "session_id": saved["session_id"], "revision": 1, "safety_session_id": result["safety_session_id"]}
    await assert_views_agree(rt, thread_id, said("one alpha"))
    assert (await rt.get_session_snapshot(thread_id)).system_prompt == "be brief"

    undo = await rt.restore_thread(thread_id, result["safety_session_id"])

    assert undo["message_count"] == 4
    await assert_views_agree(rt, thread_id, said("one alpha") + said("two beta"))
    assert (await rt.get_session_snapshot(thread_id)).system_prompt == "be verbose"
    assert t2["id"] not in {t["id"] for t in (await rt.get_thread(thread_id))["turns"]}
    assert list(rt.config.sessions_dir.glob(".*")) == []  # no work file left behind


async def _plant_unparseable_session(rt: Runtime, session_id: str) -> None:
    """A stored session ``session_id`` whose document does not parse (tests/support.py)."""
    await support.plant_session_document(rt, session_id, b"{not json")


async def _stored_sessions(rt: Runtime) -> list:
    """Everything stored for sessions, byte for byte: the files, or the document rows."""
    if rt.sessions.storage == "files":
        return sorted((p.name, p.read_bytes()) for p in rt.config.sessions_dir.iterdir())
    rows = await rt.store.read(lambda conn: conn.execute(
        "SELECT id, revision, document FROM session_docs ORDER BY id").fetchall())
    return [(row[0], row[1], bytes(row[2])) for row in rows]


async def test_restore_refusals_change_nothing(rt, thread_id):
    await run_turn(rt, thread_id, "one alpha")
    saved = await rt.sessions.save(thread_id=thread_id, timeout=10)
    await _plant_unparseable_session(rt, "broken")
    await run_turn(rt, thread_id, "two beta")
    before = await rt.get_thread(thread_id, include_rewound=True)
    sessions_before = await _stored_sessions(rt)

    with pytest.raises(PreconditionFailed):
        await rt.restore_thread(thread_id, saved["session_id"], if_match=7)
    with pytest.raises(InvalidData, match="Failed to parse session 'broken'"):
        await rt.restore_thread(thread_id, "broken")
    with pytest.raises(NotFound, match="Session 'nope' not found"):
        await rt.restore_thread(thread_id, "nope")
    with pytest.raises(InvalidInput, match="Invalid session id"):
        await rt.restore_thread(thread_id, "../etc")
    running = await rt.start_turn(thread_id, "/hang\nbusy")
    with pytest.raises(Conflict, match="in progress"):
        await rt.restore_thread(thread_id, saved["session_id"])
    await rt.interrupt_turn(thread_id, running["id"])

    after = await rt.get_thread(thread_id, include_rewound=True)
    assert [t["id"] for t in after["turns"]] == [t["id"] for t in before["turns"]] + [running["id"]]
    assert await _stored_sessions(rt) == sessions_before
    result = await rt.restore_thread(thread_id, saved["session_id"], if_match=1)
    assert result["revision"] == 1


# ---- delete ---------------------------------------------------------------------------------------


async def test_delete_removes_the_thread_and_ends_its_streams_without_reusing_a_seq(rt, thread_id):
    await run_turn(rt, thread_id, "one alpha")
    saved = await rt.sessions.save(thread_id=thread_id, timeout=10)
    last_seq = (await stored_events(rt, thread_id))[-1].seq
    stream = await rt.subscribe(thread_id, last_seq)
    got = []

    async def read_stream():
        async for event in stream:
            got.append(event)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_stream)
        await trio.testing.wait_all_tasks_blocked()
        await rt.delete_thread(thread_id)
    stream.close()

    assert [e.event for e in got] == ["thread.deleted"] and got[0].seq > last_seq
    with pytest.raises(NotFound):
        await rt.get_thread(thread_id)
    with pytest.raises(NotFound):
        await rt.start_turn(thread_id, "hello")
    assert await stored_events(rt, thread_id) == []
    count = await rt.store.read(lambda c: c.execute(
        "SELECT (SELECT COUNT(*) FROM turns WHERE thread_id = ?) + (SELECT COUNT(*) FROM items WHERE thread_id = ?)",
        (thread_id, thread_id)).fetchone()[0])
    assert count == 0
    assert (await rt.sessions.get(saved["session_id"]))["metadata"]["id"] == saved["session_id"]
    other = (await rt.create_thread())["id"]
    assert (await stored_events(rt, other))[0].seq > got[0].seq  # never reused


async def test_delete_of_a_busy_thread_needs_if_busy_interrupt(rt, thread_id):
    running = await rt.start_turn(thread_id, "/hang\nbusy")
    with pytest.raises(Conflict, match="in progress"):
        await rt.delete_thread(thread_id)
    assert (await rt.get_thread(thread_id))["turns"][0]["id"] == running["id"]
    await rt.delete_thread(thread_id, if_busy="interrupt")
    with pytest.raises(NotFound):
        await rt.get_thread(thread_id)
    with pytest.raises(NotFound):
        await rt.delete_thread(thread_id)


async def test_a_bad_if_busy_is_refused_before_the_thread_is_looked_up(rt):
    for call in (lambda: rt.rewind_thread("thr_nope", "turn_x", if_busy="later"),
                 lambda: rt.retry_turn("thr_nope", if_busy="later"),
                 lambda: rt.delete_thread("thr_nope", if_busy="later"),
                 lambda: rt.restore_thread("thr_nope", "s1", if_busy="later")):
        with pytest.raises(InvalidInput, match="if_busy must be one of: reject, interrupt"):
            await call()
