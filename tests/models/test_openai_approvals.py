"""The OpenAI-compatible backend behind a real server with the demo tools: a model that calls write_note
waits for the approval, decided over HTTP, before its next request goes out (API.md "Tools and approvals").

Everything is real but the model: the fake OpenAI server on a loopback socket, the runtime's server on
another, SQLite, the note file. "No request before the decision" is checked once the whole process is
quiet (every task blocked), so a request that was going to be sent early would have been.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from runtime.models.tools import demo_registry
from tests.e2e.helpers import collect_until, start_tool_server, wait_turn_end

from .conftest import LIMIT, make_model
from .fake_openai import FakeOpenAI, text_reply, tool_reply

NOTE = {"name": "groceries", "text": "buy milk"}
ARGUMENTS = json.dumps(NOTE)


@pytest.fixture
def registry():
    return demo_registry()


@pytest.fixture
async def server(nursery, tmp_path, fake, registry):
    live = await start_tool_server(nursery, tmp_path, tools=registry, default_model="fake-model",
                                   model_factory=lambda: make_model(fake))
    yield live
    live.shutdown.set()


def call_messages(tool_message: str) -> list[dict[str, Any]]:
    """What the second request ends with: the model's call, then the engine's result as the tool message."""
    return [{"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_w", "type": "function", "function": {"name": "write_note", "arguments": ARGUMENTS}}]},
            {"role": "tool", "tool_call_id": "call_w", "content": tool_message}]


async def pending_call(client, fake: FakeOpenAI, after: str) -> tuple[str, str, str]:
    """Start a turn whose model calls write_note; wait for the approval and for the process to go quiet.
    Returns (thread id, turn id, approval id); asserts the server got only the first request."""
    fake.queue(tool_reply("call_w", "write_note", ['{"name": "groceries", ', '"text": "buy milk"}']),
               text_reply(after, usage=(30, 4)))
    tid = (await client.create_thread())["id"]
    turn = await client.start_turn(tid, "Note that I need milk")
    event = (await collect_until(client, tid, lambda e: e["event"] == "approval.requested"))[-1]
    assert (event["payload"]["tool"], event["payload"]["input"]) == ("write_note", NOTE)
    with trio.fail_after(LIMIT):
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    assert len(fake.chat_requests) == 1
    assert (await client.get_thread(tid))["turns"][0]["status"] == "awaiting_approval"
    return tid, turn["id"], event["payload"]["approval_id"]


async def test_the_tool_result_reaches_the_server_only_after_the_approval(server, client, fake, registry):
    tid, turn_id, approval_id = await pending_call(client, fake, "Saved your note.")
    assert registry.runs == {}

    await client.decide_approval(tid, approval_id, "allow")
    end = await wait_turn_end(client, tid, turn_id)
    assert end["payload"]["status"] == "completed"
    assert end["payload"]["usage"] == {"input_tokens": 50, "output_tokens": 9}  # both rounds: (20, 5) + (30, 4)

    result = f"Wrote note 'groceries' (8 characters) to notes/{tid}/groceries.txt"
    first, second = fake.chat_requests
    assert first.messages == [{"role": "user", "content": "Note that I need milk"}]
    assert second.messages == first.messages + call_messages(result)
    assert registry.runs == {"write_note": 1}
    assert (server.data_dir / "notes" / tid / "groceries.txt").read_text() == "buy milk"
    detail = await client.get_thread(tid)
    assert [(i["kind"], i["detail"]) for i in detail["items"]] == [
        ("user_message", "Note that I need milk"), ("tool_call", result), ("agent_message", "Saved your note.")]


async def test_a_denial_reaches_the_server_as_the_error_tool_message(server, client, fake, registry):
    tid, turn_id, approval_id = await pending_call(client, fake, "Understood, no note.")

    await client.decide_approval(tid, approval_id, "deny", message="not now")
    end = await wait_turn_end(client, tid, turn_id)
    assert end["payload"]["status"] == "completed"

    first, second = fake.chat_requests
    assert second.messages == first.messages + call_messages("denied by user: not now")
    assert registry.runs == {}
    assert not (server.data_dir / "notes").exists()
    detail = await client.get_thread(tid)
    (item,) = [i for i in detail["items"] if i["kind"] == "tool_call"]
    assert item["metadata"]["is_error"] is True and item["detail"] == "denied by user: not now"
    assert [i["detail"] for i in detail["items"] if i["kind"] == "agent_message"] == ["Understood, no note."]


async def test_an_interrupt_while_pending_sends_nothing_more_to_the_server(server, client, fake, registry):
    tid, turn_id, approval_id = await pending_call(client, fake, "never sent")

    assert (await client.interrupt(tid, turn_id))["status"] == "interrupted"
    with trio.fail_after(LIMIT):
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    assert len(fake.chat_requests) == 1 and registry.runs == {}
    (record,) = await client.list_approvals(tid)
    assert (record["id"], record["status"], record["decided_by"]) == (approval_id, "canceled", "interrupt")
