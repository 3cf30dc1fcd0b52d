"""The OpenAI backend and split surrogate escapes (issue 11, defect 4). ``json.loads`` accepts a lone
``"\\ud83d"`` escape, and a real server may send an emoji's two UTF-16 halves in two SSE chunks, as
``"\\ud83d"`` then ``"\\ude00"``. The fake server here does exactly that (``json.dumps`` escapes each
half). Stored text, SSE frames, the session file and what the backend sends back to the server must all
be valid Unicode: the halves joined, a lone one replaced by U+FFFD.

Real sockets and the real clock (see conftest.py), every wait bounded.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncIterator

import httpx
import pytest
import trio

from runtime import Runtime, RuntimeConfig
from runtime.models.tools import demo_registry
from tests.reliability.support import serving
from web.client import AsyncClient

from .conftest import LIMIT, make_model
from .fake_openai import Reply, chunk, text_reply, usage_chunk

SMILE = "\U0001F600"
HIGH, LOW = "\ud83d", "\ude00"
FFFD = "\ufffd"


def test_the_fake_server_really_sends_the_halves_as_separate_escapes():
    """What the tests below rely on: one chunk carries ``\\ud83d``, the next ``\\ude00``."""
    assert json.dumps(chunk(HIGH)).count("\\ud83d") == 1 and "\\ude00" not in json.dumps(chunk(HIGH))


@pytest.fixture
async def rt(tmp_path, fake) -> AsyncIterator[Runtime]:
    registry = demo_registry()
    config = RuntimeConfig(data_dir=tmp_path, model_factory=lambda: make_model(fake),
                           tools=registry)
    async with Runtime.open(config) as runtime:
        yield runtime


async def run_turn(rt: Runtime, thread_id: str, prompt: str) -> tuple[dict[str, Any], list[Any]]:
    turn = await rt.start_turn(thread_id, prompt)
    events = []
    with trio.fail_after(LIMIT):
        async with contextlib.aclosing(await rt.subscribe(thread_id, 0)) as stream:
            async for event in stream:
                events.append(event)
                if event.event == "turn.completed" and event.turn_id == turn["id"]:
                    break
    detail = await rt.get_thread(thread_id)
    items = [i for i in detail["items"] if i["turn_id"] == turn["id"]]
    return items, [e for e in events if e.turn_id == turn["id"]]


async def test_split_escapes_in_text_and_reasoning_are_stored_as_one_character(rt, fake):
    fake.queue(text_reply("Smile ", HIGH, f"{LOW} now", f" lone {LOW}", reasoning=(f"hmm {HIGH}", LOW)))
    thread = await rt.create_thread()

    items, events = await run_turn(rt, thread["id"], "make me smile")

    assert [(i["kind"], i["status"], i["detail"]) for i in items] == [
        ("user_message", "completed", "make me smile"),
        ("agent_reasoning", "completed", f"hmm {SMILE}"),
        ("agent_message", "completed", f"Smile {SMILE} now lone {FFFD}"),
    ]
    answer = items[-1]["id"]
    assert "".join(e.payload["delta"] for e in events if e.event == "item.delta" and e.item_id == answer) == (
        f"Smile {SMILE} now lone {FFFD}")
    saved = await rt.sessions.save(thread_id=thread["id"], timeout=LIMIT)
    assert saved["session"]["messages"][-1]["content"] == [
        {"type": "thinking", "text": f"hmm {SMILE}"}, {"type": "text", "text": f"Smile {SMILE} now lone {FFFD}"}]


async def test_what_the_backend_sends_back_to_the_server_is_valid_unicode(rt, fake):
    """A tool round sends the round's text and the tool call back: joined and repaired, not refused by
    the HTTP client's UTF-8 encoder (the turn used to fail with 'model backend error: UnicodeEncodeError')."""
    fake.queue(
        Reply(steps=[
            chunk(f"Checking {HIGH}"), chunk(LOW),
            chunk(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "get_time", "arguments": ""}}]),
            chunk(tool_calls=[{"index": 0, "function": {"arguments": f'{{"why": "{HIGH}'}}]),
            chunk(tool_calls=[{"index": 0, "function": {"arguments": f'{LOW} {HIGH}"}}'}}]),
            chunk(finish="tool_calls"), usage_chunk(10, 5),
        ]),
        text_reply("done"),
    )
    thread = await rt.create_thread()

    items, _ = await run_turn(rt, thread["id"], "what time is it?")

    assert [(i["kind"], i["status"]) for i in items] == [
        ("user_message", "completed"), ("agent_message", "completed"), ("tool_call", "completed"),
        ("agent_message", "completed")]
    assert items[1]["detail"] == f"Checking {SMILE}"
    assert items[2]["metadata"]["input"] == {"why": f"{SMILE} {FFFD}"}
    second = fake.chat_requests[1].messages
    assert second[-2] == {"role": "assistant", "content": f"Checking {SMILE}", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_time", "arguments": f'{{"why": "{SMILE} {FFFD}"}}'}}]}
    assert second[-1]["role"] == "tool" and second[-1]["tool_call_id"] == "call_1"


async def test_end_to_end_over_sse_with_a_real_server_process(tmp_path, fake):
    """``trio-runtime serve --model openai`` against the fake server: the SSE stream a client reads is
    valid UTF-8 with the emoji whole, the item completes with the turn, and PUT /v1/sessions is 200."""
    fake.queue(text_reply("Smile ", HIGH, f"{LOW}!", f" half {HIGH}"))
    async with serving(tmp_path / "data", "--model", "openai", "--model-base-url", fake.base_url,
                       "--model-name", "fake-model") as server:
        async with AsyncClient(server.url, server.token) as client:
            thread = await client.create_thread()
            turn = await client.start_turn(thread["id"], "make me smile")
            frames = []
            buffer = b""
            headers = {"Authorization": f"Bearer {server.token}"}
            with trio.fail_after(LIMIT):
                async with httpx.AsyncClient(base_url=server.url, headers=headers) as http:
                    async with http.stream("GET", f"/v1/threads/{thread['id']}/events") as response:
                        async for piece in response.aiter_bytes():
                            buffer += piece
                            *done, buffer = buffer.split(b"\n\n")
                            # strict UTF-8: a frame a client could not decode fails here
                            frames += [json.loads(f.decode("utf-8").split("data: ", 1)[1]) for f in done
                                       if not f.startswith(b":")]
                            if any(f["event"] == "turn.completed" for f in frames):
                                break

            answer = [f for f in frames if f["event"] == "item.completed"
                      and f["payload"]["kind"] == "agent_message"]
            assert [a["payload"]["text"] for a in answer] == [f"Smile {SMILE}! half {FFFD}"]
            assert "".join(f["payload"]["delta"] for f in frames if f["event"] == "item.delta") == (
                f"Smile {SMILE}! half {FFFD}")
            assert frames[-1]["payload"]["status"] == "completed"
            detail = await client.get_thread(thread["id"])
            assert [(i["kind"], i["status"]) for i in detail["items"]] == [
                ("user_message", "completed"), ("agent_message", "completed")]
            assert detail["turns"][0]["id"] == turn["id"] and detail["turns"][0]["status"] == "completed"

            saved = await client.save_session(thread_id=thread["id"])
            assert saved["session"]["messages"][-1]["content"] == [
                {"type": "text", "text": f"Smile {SMILE}! half {FFFD}"}]
            assert (await client.get_session(saved["session_id"]))["messages"] == saved["session"]["messages"]
