"""OpenAICompatModel behind a real Runtime (real SQLite, real engine, the fake server on a real socket):
what a client sees of turns, items, events, usage, snapshots and sessions with the OpenAI backend."""

from __future__ import annotations

import contextlib
import socket
from typing import Any, AsyncIterator, Callable

import pytest
import trio

from runtime import Runtime, RuntimeConfig
from runtime.models.openai_compat import OpenAICompatModel
from runtime.models.tools import demo_registry
from runtime.store import Event

from .conftest import LIMIT, make_model
from .fake_openai import Close, Raw, Reply, Stall, Wait, chunk, error_reply, text_reply, tool_reply


@contextlib.asynccontextmanager
async def open_runtime(tmp_path, model_factory: Callable[[], OpenAICompatModel], **config: Any
                       ) -> AsyncIterator[Runtime]:
    async with Runtime.open(RuntimeConfig(data_dir=tmp_path, model_factory=model_factory, **config)) as rt:
        yield rt


@pytest.fixture
async def rt(tmp_path, fake) -> AsyncIterator[Runtime]:
    registry = demo_registry()
    async with open_runtime(tmp_path, lambda: make_model(fake, read_timeout=0.5),
                            tools=registry) as runtime:
        yield runtime


async def collect(rt: Runtime, thread_id: str, until: Callable[[Event], bool]) -> list[Event]:
    events: list[Event] = []
    with trio.fail_after(LIMIT):
        async with contextlib.aclosing(await rt.subscribe(thread_id, 0)) as stream:
            async for event in stream:
                events.append(event)
                if until(event):
                    return events
    raise AssertionError("event stream ended early")


def ended(turn_id: str) -> Callable[[Event], bool]:
    return lambda e: e.event == "turn.completed" and e.turn_id == turn_id


async def run_turn(rt: Runtime, thread_id: str, prompt: str) -> tuple[dict[str, Any], list[Event]]:
    """Start a turn, wait for its end; its stored TurnRecord and its events."""
    turn = await rt.start_turn(thread_id, prompt)
    events = [e for e in await collect(rt, thread_id, ended(turn["id"])) if e.turn_id == turn["id"]]
    detail = await rt.get_thread(thread_id)
    return next(t for t in detail["turns"] if t["id"] == turn["id"]), events


async def items_of(rt: Runtime, thread_id: str, turn_id: str) -> list[dict[str, Any]]:
    detail = await rt.get_thread(thread_id)
    return [i for i in detail["items"] if i["turn_id"] == turn_id]


# ---- turns ---------------------------------------------------------------------------------------


async def test_a_turn_streams_item_deltas_and_records_the_servers_usage(rt, fake):
    fake.queue(text_reply("Hello", " from", " the model", usage=(17, 5)))
    thread = await rt.create_thread(system_prompt="Be kind.")

    record, events = await run_turn(rt, thread["id"], "Hi there")

    assert record["status"] == "completed" and record["error"] is None
    assert record["usage"] == {"input_tokens": 17, "output_tokens": 5}
    deltas = [e.payload for e in events if e.event == "item.delta"]
    assert deltas == [{"delta": "Hello", "kind": "agent_message"}, {"delta": " from", "kind": "agent_message"},
                      {"delta": " the model", "kind": "agent_message"}]
    items = await items_of(rt, thread["id"], record["id"])
    assert [(i["kind"], i["status"], i["detail"]) for i in items] == [
        ("user_message", "completed", "Hi there"), ("agent_message", "completed", "Hello from the model")]
    assert fake.chat_requests[0].messages == [{"role": "system", "content": "Be kind."},
                                              {"role": "user", "content": "Hi there"}]
    assert rt.info()["model_backend"] == "openai"


async def test_an_answer_cut_at_the_token_limit_is_marked_truncated(rt, fake):
    fake.queue(Reply(steps=[chunk("One, two,"), chunk(" three"), chunk(finish="length")]))
    fake.queue(text_reply("Done."))
    thread = await rt.create_thread()

    cut, cut_events = await run_turn(rt, thread["id"], "Count to ten.")
    whole, whole_events = await run_turn(rt, thread["id"], "Thanks.")

    assert cut["status"] == "completed" and whole["status"] == "completed"
    [completed] = [e.payload for e in cut_events if e.event == "item.completed" and e.payload["kind"] == "agent_message"]
    assert completed == {"kind": "agent_message", "text": "One, two, three", "metadata": {"truncated": True}}
    [answer] = [i for i in await items_of(rt, thread["id"], cut["id"]) if i["kind"] == "agent_message"]
    assert answer["metadata"] == {"truncated": True}
    [answer] = [i for i in await items_of(rt, thread["id"], whole["id"]) if i["kind"] == "agent_message"]
    assert not answer.get("metadata")
    assert "metadata" not in next(e.payload for e in whole_events if e.event == "item.completed"
                                  and e.payload["kind"] == "agent_message")


async def test_reasoning_becomes_an_agent_reasoning_item_before_the_message(rt, fake):
    fake.queue(text_reply("42", reasoning=("Six", " times seven")))
    thread = await rt.create_thread()

    record, _ = await run_turn(rt, thread["id"], "What is six times seven?")

    items = await items_of(rt, thread["id"], record["id"])
    assert [(i["kind"], i["detail"]) for i in items] == [
        ("user_message", "What is six times seven?"), ("agent_reasoning", "Six times seven"), ("agent_message", "42")]
    snapshot = await rt.get_session_snapshot(thread["id"])
    assert snapshot.messages[-1]["content"] == [{"type": "thinking", "text": "Six times seven"},
                                                {"type": "text", "text": "42"}]


async def test_a_tool_round_trip_leaves_tool_use_and_tool_result_blocks_in_the_snapshot(rt, fake):
    fake.queue(tool_reply("call_1", "get_time", ["{", "}"], usage=(30, 8)), text_reply("It is late.", usage=(50, 4)))
    thread = await rt.create_thread()

    record, events = await run_turn(rt, thread["id"], "What time is it?")

    assert record["status"] == "completed"
    assert record["usage"] == {"input_tokens": 80, "output_tokens": 12}
    items = await items_of(rt, thread["id"], record["id"])
    assert [i["kind"] for i in items] == ["user_message", "tool_call", "agent_message"]
    tool_item = items[1]
    now = tool_item["metadata"]["result"]
    started = tool_item["metadata"]["started_at"]  # recorded (committed) before the tool ran
    assert tool_item["metadata"] == {"tool_use_id": "call_1", "name": "get_time", "input": {}, "result": now,
                                     "is_error": False, "started_at": started}
    assert tool_item["detail"] == now
    snapshot = await rt.get_session_snapshot(thread["id"])
    assert list(snapshot.messages) == [
        {"role": "user", "content": [{"type": "text", "text": "What time is it?"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": now}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is late."}]},
    ]

    # The next turn sends that whole history back in OpenAI form.
    fake.queue(text_reply("You asked the time."))
    await run_turn(rt, thread["id"], "What did I ask?")
    assert fake.chat_requests[-1].messages == [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": now},
        {"role": "assistant", "content": "It is late."},
        {"role": "user", "content": "What did I ask?"},
    ]


# ---- failures ------------------------------------------------------------------------------------

FAILURES = {
    "bad key": (error_reply(401, "invalid api key"), "refused the request (HTTP 401, bad or missing API key)"),
    "forbidden": (error_reply(403, "no access"), "refused the request (HTTP 403, bad or missing API key)"),
    "unknown model": (error_reply(404, "model 'fake-model' not found"), "answered HTTP 404 for model 'fake-model'"),
    "malformed chunk": (Reply(steps=[chunk("Part"), Raw(b"data: {nope\n\n")]), "sent a malformed stream chunk"),
    "stream error": (Reply(steps=[{"error": {"message": "model crashed"}}]), "reported an error: model crashed"),
    "stall": (Reply(steps=[chunk("Part"), Stall()]), "stalled: nothing arrived for 0.5 s (read timeout)"),
    "closed mid-stream": (Reply(steps=[chunk("Part"), Close()]), "closed the connection mid-answer"),
}


@pytest.mark.parametrize("case", list(FAILURES))
async def test_each_failure_fails_the_turn_with_a_clear_error_and_the_next_turn_works(rt, fake, case):
    reply, expected = FAILURES[case]
    fake.queue(reply)
    thread = await rt.create_thread()

    record, events = await run_turn(rt, thread["id"], "Try this")

    assert record["status"] == "failed"
    assert record["error"].startswith(f"The model server at {fake.base_url} ") or \
        record["error"].startswith("The model stream from")
    assert expected in record["error"]
    items = await items_of(rt, thread["id"], record["id"])
    assert items[-1]["kind"] == "error" and items[-1]["detail"] == record["error"]
    if any(e.event == "item.delta" for e in events):  # partial text stays, marked failed
        agent = next(i for i in items if i["kind"] == "agent_message")
        assert (agent["detail"], agent["status"]) == ("Part", "failed")

    fake.queue(text_reply("Recovered"))
    again, _ = await run_turn(rt, thread["id"], "Again")
    assert again["status"] == "completed"
    assert (await items_of(rt, thread["id"], again["id"]))[-1]["detail"] == "Recovered"


async def test_an_unreachable_server_fails_each_turn_and_the_engine_keeps_answering(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with open_runtime(tmp_path, lambda: OpenAICompatModel(f"http://127.0.0.1:{port}/v1", "m")) as rt:
        thread = await rt.create_thread()
        for prompt in ("one", "two"):
            record, _ = await run_turn(rt, thread["id"], prompt)
            assert record["status"] == "failed"
            assert record["error"] == (f"Cannot connect to the model server at http://127.0.0.1:{port}/v1:"
                                       " connection refused (is the server running?)")
        snapshot = await rt.get_session_snapshot(thread["id"])
        assert not snapshot.turn_in_progress and len(snapshot.messages) == 1  # both prompts, one user message


async def test_retries_are_recorded_in_item_metadata_and_events(rt, fake):
    fake.queue(error_reply(503, "warming up"), error_reply(429, "slow down"), text_reply("Ready"))
    thread = await rt.create_thread()

    record, events = await run_turn(rt, thread["id"], "Hello")

    assert record["status"] == "completed"
    retrying = [e.payload for e in events if e.event == "turn.retrying"]
    assert retrying == [{"attempt": 1, "reason": "HTTP 503: warming up"},
                        {"attempt": 2, "reason": "HTTP 429: slow down"}]
    agent = (await items_of(rt, thread["id"], record["id"]))[-1]
    assert agent["kind"] == "agent_message" and agent["metadata"] == {"retries": 2}


async def test_exhausted_retries_fail_the_turn_naming_the_status(tmp_path, fake):
    fake.queue(*[error_reply(500, "boom")] * 2)
    async with open_runtime(tmp_path, lambda: make_model(fake, max_retries=1)) as rt:
        thread = await rt.create_thread()
        record, _ = await run_turn(rt, thread["id"], "Hello")
    assert record["error"] == f"The model server at {fake.base_url} failed with HTTP 500 after 1 retry: boom"


# ---- interrupt, steer, resume --------------------------------------------------------------------


async def test_interrupt_closes_the_http_stream_promptly_and_keeps_the_partial_text(rt, fake):
    fake.queue(Reply(steps=[chunk("Partial answer"), Stall()]))
    thread = await rt.create_thread()
    turn = await rt.start_turn(thread["id"], "Tell me a long story")
    await collect(rt, thread["id"], lambda e: e.event == "item.delta")

    record = await rt.interrupt_turn(thread["id"], turn["id"])
    with trio.fail_after(1.0):  # well under the 0.5 s read timeout + slack: it was the interrupt
        await fake.disconnected.wait()

    assert record["status"] == "interrupted" and record["error"] is None
    items = await items_of(rt, thread["id"], turn["id"])
    assert [(i["kind"], i["status"], i["detail"]) for i in items][-1] == (
        "agent_message", "interrupted", "Partial answer")
    fake.queue(text_reply("Next"))
    again, _ = await run_turn(rt, thread["id"], "Go on")
    assert again["status"] == "completed"


async def test_interrupt_of_a_turn_waiting_for_headers_cancels_the_request(tmp_path, fake):
    fake.queue(Reply(steps=[Stall()]))
    async with open_runtime(tmp_path, lambda: make_model(fake, read_timeout=60.0)) as rt:
        thread = await rt.create_thread()
        turn = await rt.start_turn(thread["id"], "Hello")
        with trio.fail_after(LIMIT):
            await fake.wait_for_chat_requests(1)
        record = await rt.interrupt_turn(thread["id"], turn["id"])
        with trio.fail_after(1.0):
            await fake.disconnected.wait()
    assert record["status"] == "interrupted"


async def test_steered_text_is_sent_to_the_model_and_answered_in_the_same_turn(rt, fake):
    release = trio.Event()
    fake.queue(Reply(steps=[chunk("Working"), Wait(release), chunk(" on it."), chunk(finish="stop")]),
               text_reply("Switching to French."))
    thread = await rt.create_thread()
    turn = await rt.start_turn(thread["id"], "Write a poem")
    await collect(rt, thread["id"], lambda e: e.event == "item.delta")

    await rt.steer_turn(thread["id"], turn["id"], "In French, please")
    release.set()
    events = await collect(rt, thread["id"], ended(turn["id"]))

    assert events[-1].payload["status"] == "completed"
    assert fake.chat_requests[1].messages == [
        {"role": "user", "content": "Write a poem"},
        {"role": "assistant", "content": "Working on it."},
        {"role": "user", "content": "In French, please"},
    ]
    items = await items_of(rt, thread["id"], turn["id"])
    assert [(i["kind"], i["detail"]) for i in items] == [
        ("user_message", "Write a poem"), ("agent_message", "Working"), ("user_message", "In French, please"),
        ("agent_message", " on it."), ("agent_message", "Switching to French.")]


async def test_a_thread_resumed_from_a_saved_session_sends_the_sessions_history(rt, fake):
    fake.queue(text_reply("Paris."))
    first = await rt.create_thread(system_prompt="Answer in one word.")
    await run_turn(rt, first["id"], "Capital of France?")
    saved = await rt.sessions.save(thread_id=first["id"], timeout=LIMIT)

    resumed = await rt.sessions.resume(saved["session_id"])
    fake.queue(text_reply("Berlin."))
    record, _ = await run_turn(rt, resumed["thread_id"], "And of Germany?")

    assert record["status"] == "completed"
    assert fake.chat_requests[-1].messages == [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Germany?"},
    ]
