"""Transcript: the messages an engine holds live are exactly the fold of its stored turn items, so a
session rebuilt from the store (POST /v1/sessions) and a live save (PUT /v1/sessions) agree."""

from __future__ import annotations


from runtime.transcript import SUMMARY_PREFIX, apply_items, build_messages, messages_problem, readable_messages, text_of

from .helpers import collect_events, nth, run_turn, wait_turn_end

STEER = "change course"
INTERRUPTED = "/slow 100\none two three four five six seven eight nine ten"


async def build_varied_thread(rt, tid: str) -> None:
    """Plain, thinking, steered, interrupted, failed and plain turns, in that order."""
    await run_turn(rt, tid, "plain question")
    await run_turn(rt, tid, "/think pondering hard\nthinky question")

    steered = await rt.start_turn(tid, "/slow 5\nalpha beta gamma")
    await collect_events(rt, tid, nth("item.delta", 1, steered["id"]))
    await rt.steer_turn(tid, steered["id"], STEER)
    await wait_turn_end(rt, tid, steered["id"])

    cut = await rt.start_turn(tid, INTERRUPTED)
    await collect_events(rt, tid, nth("item.delta", 2, cut["id"]))
    await rt.interrupt_turn(tid, cut["id"])

    await run_turn(rt, tid, "/fail model fell over")
    await run_turn(rt, tid, "last words")


async def test_messages_rebuilt_from_items_equal_the_live_snapshot(rt, thread_id, autojump_clock):
    await build_varied_thread(rt, thread_id)
    detail = await rt.get_thread(thread_id)
    snapshot = await rt.get_session_snapshot(thread_id)

    rebuilt = build_messages([], detail["items"])

    assert rebuilt == list(snapshot.messages)
    # The fixture really covers what it claims to.
    blocks = [(m["role"], b["type"], b["text"]) for m in rebuilt for b in m["content"]]
    assert ("assistant", "thinking", "pondering hard") in blocks
    assert ("user", "text", STEER) in blocks
    assert ("assistant", "text", f"You said: {STEER}") in blocks
    assert any(m.get("interrupted") for m in rebuilt)
    assert rebuilt[-1] == {"role": "assistant", "content": [{"type": "text", "text": "You said: last words"}]}


async def test_engine_restored_after_restart_has_the_same_messages(open_runtime, autojump_clock):
    async with open_runtime() as rt:
        tid = (await rt.create_thread())["id"]
        await build_varied_thread(rt, tid)
        live = await rt.get_session_snapshot(tid)

    async with open_runtime() as rt:
        restored = await rt.get_session_snapshot(tid)

    assert restored.messages == live.messages
    assert restored.total_tokens == live.total_tokens


async def test_messages_rebuilt_after_compaction_equal_the_live_snapshot(rt, thread_id):
    await run_turn(rt, thread_id, "one")
    await run_turn(rt, thread_id, "/think hmm\ntwo")
    await rt.compact(thread_id, reason="shorter")
    await run_turn(rt, thread_id, "three")

    detail = await rt.get_thread(thread_id)
    snapshot = await rt.get_session_snapshot(thread_id)

    assert build_messages([], detail["items"]) == list(snapshot.messages)
    assert len(snapshot.messages) == 2
    assert snapshot.messages[0]["content"][0]["text"].startswith(SUMMARY_PREFIX)
    assert [b["text"] for b in snapshot.messages[0]["content"]][1:] == ["three"]


def _item(kind: str, status: str, detail: str, **extra) -> dict:
    return {"id": f"item_{kind}_{detail}", "kind": kind, "status": status, "detail": detail, **extra}


def test_apply_items_folds_finished_items_and_skips_unfinished_ones():
    messages: list = []
    apply_items(messages, [
        _item("user_message", "completed", "hi"),
        _item("agent_reasoning", "completed", "think"),
        _item("agent_message", "in_progress", "not yet"),
        _item("agent_message", "interrupted", "partial"),
        _item("error", "failed", "boom"),
        _item("user_message", "completed", "again"),
        _item("user_message", "completed", "and again"),
    ])

    assert messages == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "thinking", "text": "think"}, {"type": "text", "text": "partial"}],
         "interrupted": True},
        {"role": "user", "content": [{"type": "text", "text": "again"}, {"type": "text", "text": "and again"}]},
    ]


def test_apply_items_never_mutates_messages_a_snapshot_already_holds():
    messages: list = []
    apply_items(messages, [_item("user_message", "completed", "hi")])
    held = tuple(messages)
    first = dict(held[0])

    apply_items(messages, [_item("user_message", "completed", "more"), _item("context_compaction", "completed", "s")])

    assert held[0] == first and held[0]["content"] == [{"type": "text", "text": "hi"}]
    assert messages == [{"role": "user", "content": [{"type": "text", "text": f"{SUMMARY_PREFIX}\ns"}]}]


# ---- shapes and data an older version stored ---------------------------------------------------------


def test_readable_messages_hands_back_valid_messages_as_they_are():
    valid = [{"role": "user", "content": [{"type": "text", "text": "hi"}], "extra": 1},
             {"role": "assistant", "content": [{"type": "tool_use", "id": "c", "name": "t", "input": {"a": [1]}}],
              "interrupted": True}]

    readable = readable_messages(valid)

    assert readable == valid
    assert all(a is b for a, b in zip(readable, valid))  # no copy of a big resumed session


def test_readable_messages_keeps_everything_it_can_read_as_text():
    stored = [
        {"role": "user", "content": ["hello", 5, {"type": "image", "url": "x"}, {"type": "text", "text": "ok \ud83d"}]},
        ["not", "a", "message"],
        {"role": "system", "content": []},
        {"role": "assistant", "content": None, "interrupted": 1},
        {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "c", "content": {"a": 1}}]},
    ]

    assert messages_problem(stored) == "messages[0].content[0]: expected an object, got a string"
    readable = readable_messages(stored)

    assert readable == [
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "5"},
                                     {"type": "text", "text": '{"type": "image", "url": "x"}'},
                                     {"type": "text", "text": "ok \ufffd"}]},
        {"role": "user", "content": [{"type": "text", "text": '["not", "a", "message"]'}]},
        {"role": "user", "content": [{"type": "text", "text": '{"role": "system", "content": []}'}]},
        {"role": "assistant", "content": []},
        {"role": "assistant", "content": [
            {"type": "text", "text": '{"type": "tool_result", "tool_use_id": "c", "content": {"a": 1}}'}]},
    ]
    assert messages_problem(readable) is None
    assert readable_messages("not even a list") == [
        {"role": "user", "content": [{"type": "text", "text": "not even a list"}]}]


def test_tool_call_items_with_lone_surrogates_in_their_metadata_fold_into_valid_blocks():
    """Item metadata is JSON in the store, where an older version could keep a lone surrogate."""
    messages: list = []
    apply_items(messages, [_item("tool_call", "completed", "r", metadata={
        "tool_use_id": "c\ud83d", "name": "look\ude00", "input": {"q": "\ud83d\ude00"}, "result": "x\ud83d"})])

    assert messages == [
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "c\ufffd", "name": "look\ufffd", "input": {"q": "\U0001F600"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c\ufffd", "content": "x\ufffd"}]},
    ]


def test_text_of_reads_a_tool_result_given_as_text_blocks():
    message = {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "c", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                                              "text": "b"}]}]}

    assert text_of(message) == "a\nb"
