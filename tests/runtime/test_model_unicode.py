"""Issue 11, defect 4: a model backend that splits an emoji's surrogate pair across two chunks (or sends
a lone half) must not poison the thread. Text from any backend is valid Unicode before it is stored or
sent: the halves are joined, a lone one becomes U+FFFD; every stored event frames as UTF-8; the item
ends with its turn; the session saves.

Real Runtime (real SQLite, real session files); only the model backend is a fake, on the MockClock.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import trio

from runtime.models.base import (
    ModelError, ReasoningDelta, TextDelta, ToolCall, ToolResult, Usage,
)
from runtime.store import Event
from web.sse import frame

from .helpers import collect_events, items_of, nth, run_turn, stored_events, wait_turn_end

SMILE = "\U0001F600"
HIGH, LOW = "\ud83d", "\ude00"
FFFD = "\ufffd"
HANG = object()  # in a script: wait until the turn is interrupted


class ScriptedChunks:
    """A backend that streams the next queued script per turn, chunk by chunk, as a server would."""

    name = "chunks"

    def __init__(self) -> None:
        self.scripts: deque[list[Any]] = deque()

    async def stream(self, request):
        for step in self.scripts.popleft() if self.scripts else [TextDelta("plain answer"), Usage(1, 2)]:
            await trio.lowlevel.checkpoint()
            if step is HANG:
                await trio.sleep_forever()
            elif isinstance(step, BaseException):
                raise step
            else:
                yield step


def deltas(events: list[Event], item_id: str) -> str:
    return "".join(e.payload["delta"] for e in events if e.event == "item.delta" and e.item_id == item_id)


async def assert_every_event_frames(rt, thread_id: str) -> list[Event]:
    """Every stored event of the thread, replayed, becomes a frame that is valid UTF-8."""
    events = await stored_events(rt, thread_id)
    for event in events:
        data = frame(event).decode("utf-8")  # strict: raises on anything a client could not read
        assert f"id: {event.seq}\n" in data
    return events


async def assert_saves_and_reads_back(rt, thread_id: str) -> list[dict[str, Any]]:
    saved = await rt.sessions.save(thread_id=thread_id, timeout=10)
    path = rt.config.sessions_dir / f"{saved['session_id']}.json"
    on_disk = json.loads(path.read_bytes().decode("utf-8"))
    assert on_disk["messages"] == saved["session"]["messages"]
    assert (await rt.sessions.get(saved["session_id"]))["messages"] == on_disk["messages"]
    return on_disk["messages"]


async def test_a_pair_split_across_two_deltas_is_stored_sent_and_saved_as_one_character(open_runtime,
                                                                                          autojump_clock):
    model = ScriptedChunks()
    model.scripts.append([TextDelta("Smile "), TextDelta(HIGH), TextDelta(f"{LOW} now"), Usage(4, 3)])
    async with open_runtime(model_factory=lambda: model) as rt:
        tid = (await rt.create_thread())["id"]
        record = await run_turn(rt, tid, "make me smile")

        assert record["status"] == "completed" and record["error"] is None
        [user, answer] = items_of(await rt.get_thread(tid), record["id"])
        assert (answer["kind"], answer["status"], answer["detail"]) == ("agent_message", "completed",
                                                                        f"Smile {SMILE} now")
        events = await assert_every_event_frames(rt, tid)
        assert deltas(events, answer["id"]) == f"Smile {SMILE} now"
        [completed] = [e for e in events if e.event == "item.completed" and e.item_id == answer["id"]]
        assert completed.payload["text"] == f"Smile {SMILE} now"

        messages = await assert_saves_and_reads_back(rt, tid)
        assert messages[-1] == {"role": "assistant", "content": [{"type": "text", "text": f"Smile {SMILE} now"}]}
        # The thread is not poisoned: the next turn runs normally.
        assert (await run_turn(rt, tid, "again"))["status"] == "completed"


async def test_lone_halves_become_fffd(open_runtime, autojump_clock):
    model = ScriptedChunks()
    model.scripts.append([TextDelta(f"lone {HIGH}"), TextDelta(f" and {LOW} too"), TextDelta(f" last {HIGH}")])
    async with open_runtime(model_factory=lambda: model) as rt:
        tid = (await rt.create_thread())["id"]
        record = await run_turn(rt, tid, "go")

        assert record["status"] == "completed"
        answer = items_of(await rt.get_thread(tid), record["id"])[-1]
        expected = f"lone {FFFD} and {FFFD} too last {FFFD}"
        assert (answer["status"], answer["detail"]) == ("completed", expected)
        assert deltas(await assert_every_event_frames(rt, tid), answer["id"]) == expected
        assert (await assert_saves_and_reads_back(rt, tid))[-1]["content"][0]["text"] == expected


async def test_an_interrupt_while_a_half_is_held_ends_the_item_with_fffd(open_runtime, autojump_clock):
    model = ScriptedChunks()
    model.scripts.append([TextDelta(f"cut {HIGH}"), HANG])
    async with open_runtime(model_factory=lambda: model) as rt:
        tid = (await rt.create_thread())["id"]
        turn = await rt.start_turn(tid, "go")
        await collect_events(rt, tid, nth("item.delta", 1, turn["id"]))
        await rt.interrupt_turn(tid, turn["id"])
        end = await wait_turn_end(rt, tid, turn["id"])

        assert end.payload["status"] == "interrupted"
        answer = items_of(await rt.get_thread(tid), turn["id"])[-1]
        assert (answer["kind"], answer["status"], answer["detail"]) == ("agent_message", "interrupted", f"cut {FFFD}")
        assert deltas(await assert_every_event_frames(rt, tid), answer["id"]) == f"cut {FFFD}"
        assert (await assert_saves_and_reads_back(rt, tid))[-1]["content"][0]["text"] == f"cut {FFFD}"


async def test_reasoning_tools_and_a_failing_models_error_are_repaired_too(open_runtime, autojump_clock):
    model = ScriptedChunks()
    model.scripts.append([
        ReasoningDelta(f"think {HIGH}"), ReasoningDelta(LOW),
        ToolCall("call_1", f"look{HIGH}", {"q": f"{HIGH}{LOW}", "w": f"{LOW}"}),
        ToolResult("call_1", f"found {HIGH}"),
        TextDelta(f"so {HIGH}"),
        ModelError(f"the server broke {LOW}"),
    ])
    async with open_runtime(model_factory=lambda: model) as rt:
        tid = (await rt.create_thread())["id"]
        record = await run_turn(rt, tid, "go")

        assert (record["status"], record["error"]) == ("failed", f"the server broke {FFFD}")
        items = items_of(await rt.get_thread(tid), record["id"])
        assert [(i["kind"], i["status"], i["detail"]) for i in items] == [
            ("user_message", "completed", "go"),
            ("agent_reasoning", "completed", f"think {SMILE}"),
            ("tool_call", "completed", f"found {FFFD}"),
            ("agent_message", "failed", f"so {FFFD}"),
            ("error", "failed", f"the server broke {FFFD}"),
        ]
        assert items[2]["metadata"] == {"tool_use_id": "call_1", "name": f"look{FFFD}",
                                        "input": {"q": SMILE, "w": FFFD}, "result": f"found {FFFD}",
                                        "is_error": False}
        await assert_every_event_frames(rt, tid)
        messages = await assert_saves_and_reads_back(rt, tid)
        assert messages == [
            {"role": "user", "content": [{"type": "text", "text": "go"}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "text": f"think {SMILE}"},
                {"type": "tool_use", "id": "call_1", "name": f"look{FFFD}", "input": {"q": SMILE, "w": FFFD}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": f"found {FFFD}"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"so {FFFD}"}]},
        ]
