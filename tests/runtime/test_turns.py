"""Turns through the public Runtime object: lifecycle, usage, directives, steer, interrupt, compact.

Usage follows the scripted model's contract (API.md): input_tokens = words of history + prompt (+ steers),
output_tokens = words streamed (reasoning included).
"""

from __future__ import annotations

import pytest
import trio

from runtime import Conflict, InvalidInput, NotFound
from runtime.transcript import SUMMARY_PREFIX, word_count

from .helpers import collect_events, items_of, nth, run_turn, turn_completed, turn_record, wait_turn_end, words

# ---- lifecycle ------------------------------------------------------------------------------------


async def test_start_turn_returns_in_progress_record_visible_in_store(rt, thread_id):
    turn = await rt.start_turn(thread_id, "hello there world")

    assert turn["status"] == "in_progress"
    assert turn["thread_id"] == thread_id
    assert turn["id"].startswith("turn_")
    assert turn["steer_count"] == 0
    assert turn["ended_at"] is None and turn["usage"] is None and turn["error"] is None
    assert turn["input_summary"] == "hello there world"
    assert len(turn["item_ids"]) == 1  # the user message
    # The reply comes once the start is durable: the stored thread already names the turn.
    detail = await rt.get_thread(thread_id)
    assert detail["thread"]["latest_turn_id"] == turn["id"]
    assert [t["id"] for t in detail["turns"]] == [turn["id"]]
    await wait_turn_end(rt, thread_id, turn["id"])


async def test_turn_events_go_started_items_completed_in_order(rt, thread_id):
    prompt = "hello there world"
    turn = await rt.start_turn(thread_id, prompt)
    events = await collect_events(rt, thread_id, turn_completed(turn["id"]))

    assert events[0].event == "thread.started" and events[0].turn_id is None
    mine = [e for e in events if e.turn_id == turn["id"]]
    assert [e.event for e in mine] == [
        "turn.started",
        "item.started", "item.completed",                     # the user message
        "item.started", *["item.delta"] * 5, "item.completed",  # "You said: hello there world"
        "turn.completed",
    ]
    assert mine[0].payload == {"prompt": prompt, "model": "scripted", "mode": "default"}
    user_started, user_done, agent_started = mine[1], mine[2], mine[3]
    assert user_started.payload == {"kind": "user_message"}
    assert user_done.payload == {"kind": "user_message", "text": prompt}
    assert agent_started.payload == {"kind": "agent_message"}
    deltas = [e for e in mine if e.event == "item.delta"]
    assert all(e.payload["kind"] == "agent_message" and e.item_id == agent_started.item_id for e in deltas)
    assert "".join(e.payload["delta"] for e in deltas) == "You said: hello there world"
    assert mine[-2].payload == {"kind": "agent_message", "text": "You said: hello there world"}
    assert mine[-1].payload == {"status": "completed", "usage": {"input_tokens": 3, "output_tokens": 5},
                                "error": None}
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs))


async def test_completed_turn_record_has_usage_of_prompt_and_reply_words(rt, thread_id):
    record = await run_turn(rt, thread_id, "hello there world")

    assert record["status"] == "completed"
    assert record["usage"] == {"input_tokens": words("hello there world"),
                               "output_tokens": words("You said: hello there world")}
    assert record["error"] is None
    assert record["ended_at"] is not None and record["duration_ms"] >= 0
    assert record["steer_count"] == 0


async def test_completed_turn_items_are_user_then_agent_message_with_full_text(rt, thread_id):
    record = await run_turn(rt, thread_id, "hello there world")
    detail = await rt.get_thread(thread_id)

    items = items_of(detail, record["id"])
    assert [i["id"] for i in items] == record["item_ids"]
    assert [(i["kind"], i["status"], i["detail"]) for i in items] == [
        ("user_message", "completed", "hello there world"),
        ("agent_message", "completed", "You said: hello there world"),
    ]
    assert items[1]["summary"] == "You said: hello there world"
    assert detail["latest_seq"] == (await collect_events(rt, thread_id, turn_completed(record["id"])))[-1].seq


async def test_second_turn_input_tokens_include_first_turn_history(rt, thread_id):
    first = await run_turn(rt, thread_id, "hello there world")
    second = await run_turn(rt, thread_id, "how are you")

    history = words("hello there world") + words("You said: hello there world")
    assert second["usage"] == {"input_tokens": history + words("how are you"),
                               "output_tokens": words("You said: how are you")}
    snapshot = await rt.get_session_snapshot(thread_id)
    assert snapshot.total_tokens == sum(t["usage"]["input_tokens"] + t["usage"]["output_tokens"]
                                        for t in (first, second))
    assert [m["role"] for m in snapshot.messages] == ["user", "assistant", "user", "assistant"]


# ---- directives ---------------------------------------------------------------------------------


THINK_PROMPT = "/think weighing the options\nwhich one"


async def test_think_directive_emits_reasoning_item_before_agent_message(rt, thread_id):
    record = await run_turn(rt, thread_id, THINK_PROMPT)
    detail = await rt.get_thread(thread_id)

    items = items_of(detail, record["id"])
    assert [(i["kind"], i["status"], i["detail"]) for i in items] == [
        ("user_message", "completed", THINK_PROMPT),
        ("agent_reasoning", "completed", "weighing the options"),
        ("agent_message", "completed", "You said: which one"),
    ]
    assert record["usage"] == {"input_tokens": words(THINK_PROMPT),
                               "output_tokens": words("weighing the options") + words("You said: which one")}
    events = await collect_events(rt, thread_id, turn_completed(record["id"]))
    kinds = [e.payload["kind"] for e in events if e.event == "item.delta"]
    assert kinds == ["agent_reasoning"] * 3 + ["agent_message"] * 4


async def test_think_directive_snapshot_has_thinking_block_before_text(rt, thread_id):
    await run_turn(rt, thread_id, THINK_PROMPT)
    snapshot = await rt.get_session_snapshot(thread_id)

    assert list(snapshot.messages) == [
        {"role": "user", "content": [{"type": "text", "text": THINK_PROMPT}]},
        {"role": "assistant", "content": [{"type": "thinking", "text": "weighing the options"},
                                          {"type": "text", "text": "You said: which one"}]},
    ]


async def test_fail_directive_fails_turn_with_error_and_error_item(rt, thread_id):
    turn = await rt.start_turn(thread_id, "/fail boom")
    end = await wait_turn_end(rt, thread_id, turn["id"])

    assert end.payload["status"] == "failed" and end.payload["error"] == "boom"
    record = await turn_record(rt, thread_id, turn["id"])
    assert record["status"] == "failed" and record["error"] == "boom"
    items = items_of(await rt.get_thread(thread_id), turn["id"])
    assert [(i["kind"], i["status"], i["detail"]) for i in items] == [
        ("user_message", "completed", "/fail boom"),
        ("error", "failed", "boom"),
    ]
    failed = [e for e in await collect_events(rt, thread_id, turn_completed(turn["id"])) if e.event == "item.failed"]
    assert [(e.payload["kind"], e.payload["text"], e.item_id) for e in failed] == [("error", "boom", items[1]["id"])]


async def test_engine_serves_next_turn_after_a_failed_turn(rt, thread_id):
    failed = await run_turn(rt, thread_id, "/fail boom")
    after = await run_turn(rt, thread_id, "still there")

    assert failed["status"] == "failed"
    assert after["status"] == "completed"
    # The failed turn's prompt stays in the history the next turn sees.
    assert after["usage"] == {"input_tokens": words("/fail boom") + words("still there"),
                              "output_tokens": words("You said: still there")}
    assert rt.manager.spawned == 1


# ---- steer ----------------------------------------------------------------------------------------


async def test_steer_joins_running_turn_and_is_answered_in_its_own_agent_message(rt, thread_id, autojump_clock):
    prompt, steer = "/slow 5\nalpha beta gamma", "change course now"
    turn = await rt.start_turn(thread_id, prompt)
    await collect_events(rt, thread_id, nth("item.delta", 1, turn["id"]))

    steered = await rt.steer_turn(thread_id, turn["id"], steer)

    assert steered["status"] == "in_progress" and steered["steer_count"] == 1
    assert (await turn_record(rt, thread_id, turn["id"]))["steer_count"] == 1  # durable before the reply
    events = await collect_events(rt, thread_id, turn_completed(turn["id"]))
    steer_events = [e for e in events if e.event == "turn.steered"]
    assert [e.payload for e in steer_events] == [{"prompt": steer, "steer_count": 1}]

    record = await turn_record(rt, thread_id, turn["id"])
    assert record["status"] == "completed" and record["steer_count"] == 1
    assert record["usage"] == {"input_tokens": words(prompt) + words(steer),
                               "output_tokens": words("You said: alpha beta gamma") + words(f"You said: {steer}")}
    items = items_of(await rt.get_thread(thread_id), turn["id"])
    steer_item = next(i for i in items if i["kind"] == "user_message" and i["detail"] == steer)
    assert steer_item["id"] == steer_events[0].item_id
    assert steer_item["metadata"] == {"steer": True}
    answer = items[-1]
    assert (answer["kind"], answer["detail"]) == ("agent_message", f"You said: {steer}")
    assert items.index(steer_item) < items.index(answer)
    # The main reply is still complete across the agent items streamed before the answer to the steer
    # (split where the steer came; the part after it starts without the separating space).
    main = " ".join(i["detail"] for i in items[:-1] if i["kind"] == "agent_message")
    assert main == "You said: alpha beta gamma"


async def test_steer_on_a_finished_turn_is_conflict(rt, thread_id):
    record = await run_turn(rt, thread_id, "done already")

    with pytest.raises(Conflict):
        await rt.steer_turn(thread_id, record["id"], "too late")
    assert (await turn_record(rt, thread_id, record["id"]))["steer_count"] == 0


async def test_steer_and_interrupt_of_unknown_turn_or_thread_are_not_found(rt, thread_id):
    other = (await rt.create_thread())["id"]
    foreign = await run_turn(rt, other, "belongs elsewhere")

    for call in (lambda tid, turn: rt.steer_turn(tid, turn, "hi"), lambda tid, turn: rt.interrupt_turn(tid, turn)):
        with pytest.raises(NotFound):
            await call(thread_id, "turn_does_not_exist")
        with pytest.raises(NotFound):
            await call("thr_does_not_exist", "turn_does_not_exist")
        with pytest.raises(NotFound):
            await call("thr_does_not_exist", foreign["id"])
        with pytest.raises(NotFound):
            await call(thread_id, foreign["id"])  # a real turn, but of another thread


async def test_start_snapshot_and_compact_on_unknown_thread_are_not_found(rt):
    with pytest.raises(NotFound):
        await rt.start_turn("thr_nope", "hello")
    with pytest.raises(NotFound):
        await rt.get_session_snapshot("thr_nope")
    with pytest.raises(NotFound):
        await rt.compact("thr_nope")
    with pytest.raises(NotFound):
        await rt.get_thread("thr_nope")
    with pytest.raises(NotFound):
        await rt.subscribe("thr_nope")
    assert rt.manager.live_count == 0


# ---- interrupt ------------------------------------------------------------------------------------


async def test_interrupt_of_hanging_turn_returns_interrupted_record(rt, thread_id, autojump_clock):
    turn = await rt.start_turn(thread_id, "/hang")
    t0 = trio.current_time()

    record = await rt.interrupt_turn(thread_id, turn["id"])

    assert trio.current_time() == t0  # prompt: no waiting on the model
    assert record["id"] == turn["id"]
    assert record["status"] == "interrupted"
    assert record["ended_at"] is not None
    stored = await turn_record(rt, thread_id, turn["id"])  # durable by the time the reply came
    assert stored["status"] == "interrupted"
    events = await collect_events(rt, thread_id, turn_completed(turn["id"]))
    names = [e.event for e in events if e.turn_id == turn["id"]]
    assert names[-2:] == ["turn.interrupt_requested", "turn.completed"]
    assert events[-1].payload["status"] == "interrupted"


async def test_interrupt_keeps_partial_reply_marked_interrupted(rt, thread_id, autojump_clock):
    reply = "You said: one two three four five six seven eight nine ten"
    turn = await rt.start_turn(thread_id, "/slow 100\none two three four five six seven eight nine ten")
    t0 = trio.current_time()
    seen = await collect_events(rt, thread_id, nth("item.delta", 2, turn["id"]))
    streamed = "".join(e.payload["delta"] for e in seen if e.event == "item.delta")

    record = await rt.interrupt_turn(thread_id, turn["id"])

    assert record["status"] == "interrupted"
    assert trio.current_time() - t0 < 100  # did not wait for the reply to finish
    assert streamed == "You said:"
    items = items_of(await rt.get_thread(thread_id), turn["id"])
    agent = [i for i in items if i["kind"] == "agent_message"]
    assert [(i["status"], i["detail"]) for i in agent] == [("interrupted", streamed)]
    assert reply.startswith(agent[0]["detail"])
    snapshot = await rt.get_session_snapshot(thread_id)
    assert snapshot.turn_in_progress is False
    assert snapshot.messages[-1] == {"role": "assistant", "content": [{"type": "text", "text": streamed}],
                                     "interrupted": True}
    events = await collect_events(rt, thread_id, turn_completed(turn["id"]))
    assert [e.payload["text"] for e in events if e.event == "item.interrupted"] == [streamed]


async def test_interrupt_of_a_finished_turn_is_conflict(rt, thread_id):
    record = await run_turn(rt, thread_id, "quick one")

    with pytest.raises(Conflict):
        await rt.interrupt_turn(thread_id, record["id"])
    assert (await turn_record(rt, thread_id, record["id"]))["status"] == "completed"


# ---- one active turn; input validation ------------------------------------------------------------


async def test_second_start_while_a_turn_runs_is_conflict(rt, thread_id):
    running = await rt.start_turn(thread_id, "/hang")

    with pytest.raises(Conflict) as excinfo:
        await rt.start_turn(thread_id, "me too")
    assert running["id"] in excinfo.value.message
    detail = await rt.get_thread(thread_id)
    assert [t["id"] for t in detail["turns"]] == [running["id"]]
    await rt.interrupt_turn(thread_id, running["id"])
    assert (await run_turn(rt, thread_id, "now it fits"))["status"] == "completed"


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
async def test_empty_prompt_is_invalid_input_and_starts_nothing(rt, thread_id, prompt):
    with pytest.raises(InvalidInput):
        await rt.start_turn(thread_id, prompt)
    running = await rt.start_turn(thread_id, "/hang")
    with pytest.raises(InvalidInput):
        await rt.steer_turn(thread_id, running["id"], prompt)
    await rt.interrupt_turn(thread_id, running["id"])
    detail = await rt.get_thread(thread_id)
    assert [t["id"] for t in detail["turns"]] == [running["id"]]
    assert detail["turns"][0]["steer_count"] == 0


# ---- compact --------------------------------------------------------------------------------------


async def test_compact_replaces_history_with_one_summary_user_message(rt, thread_id):
    await run_turn(rt, thread_id, "first question")
    await run_turn(rt, thread_id, "/think hmm\nsecond question")
    before = await rt.get_session_snapshot(thread_id)

    result = await rt.compact(thread_id, reason="tidy up")

    summary = result["summary"]
    assert summary.startswith("4 earlier message(s).")
    assert "first question" in summary and "You said: second question" in summary
    item = result["item"]
    assert (item["kind"], item["status"], item["detail"]) == ("context_compaction", "completed", summary)
    assert item["metadata"] == {"reason": "tidy up", "replaced_messages": 4}
    snapshot = await rt.get_session_snapshot(thread_id)
    assert list(snapshot.messages) == [{"role": "user", "content": [{"type": "text",
                                                                      "text": f"{SUMMARY_PREFIX}\n{summary}"}]}]
    assert snapshot.total_tokens == before.total_tokens  # compaction is not a model call
    detail = await rt.get_thread(thread_id)
    assert (detail["items"][-1]["id"], detail["items"][-1]["kind"]) == (item["id"], "context_compaction")
    events = await collect_events(rt, thread_id, lambda e: e.event == "item.completed" and e.item_id == item["id"])
    assert events[-1].payload == {"kind": "context_compaction", "text": summary}
    # The next turn sees only the summary as history.
    nxt = await run_turn(rt, thread_id, "third question")
    assert nxt["usage"]["input_tokens"] == word_count(snapshot.messages) + words("third question")


async def test_compact_during_an_active_turn_is_conflict(rt, thread_id):
    await run_turn(rt, thread_id, "some history")
    running = await rt.start_turn(thread_id, "/hang")

    with pytest.raises(Conflict):
        await rt.compact(thread_id)
    kinds = [i["kind"] for i in (await rt.get_thread(thread_id))["items"]]
    assert "context_compaction" not in kinds
    await rt.interrupt_turn(thread_id, running["id"])


async def test_compact_of_an_empty_thread_is_invalid_input(rt, thread_id):
    with pytest.raises(InvalidInput):
        await rt.compact(thread_id)
