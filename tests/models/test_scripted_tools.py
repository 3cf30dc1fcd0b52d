"""The scripted model's ``/tool NAME {json}`` directive and its continuation form, driven directly with
a fake ``run_tool`` (the engine's side): the call it emits, that it waits for the result, the answer
``Tool NAME returned: <result>``, usage, and each malformed directive as a ModelError."""

from __future__ import annotations

import pytest
import trio

from runtime.models.base import ModelError, TextDelta, ToolCall, ToolOutcome, ToolResult, Usage
from runtime.models.scripted import ScriptedModel
from runtime.models.tools import demo_registry

from .conftest import LIMIT, FakeRunTool, make_request, registry_runner

TOOLS = demo_registry().spec()


def answer(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def run(request) -> list:
    events = []
    with trio.fail_after(LIMIT):
        async for event in ScriptedModel().stream(request):
            events.append(event)
    return events


async def test_the_directive_emits_the_call_awaits_run_tool_and_answers_with_the_result():
    run_tool = FakeRunTool(ToolOutcome("Wrote note 'todo' (4 characters) to notes/thr_test/todo.txt"))
    prompt = '/tool write_note {"name": "todo", "text": "milk"}\nplease'

    events = await run(make_request(prompt, tools=TOOLS, run_tool=run_tool))

    call = ToolCall("call_1", "write_note", {"name": "todo", "text": "milk"})
    assert run_tool.calls == [call]
    words = "Tool write_note returned: Wrote note 'todo' (4 characters) to notes/thr_test/todo.txt".split()
    assert events[:3] == [call, Usage(7, 0),
                          ToolResult("call_1", "Wrote note 'todo' (4 characters) to notes/thr_test/todo.txt", False)]
    assert events[3:] == [e for n, w in enumerate(words)
                          for e in (TextDelta(w if n == 0 else " " + w), Usage(7, n + 1))]
    assert answer(events) == " ".join(words)


async def test_without_json_the_input_is_an_empty_object_and_an_error_result_is_answered_too():
    run_tool = FakeRunTool(ToolOutcome("denied by user: no", is_error=True))

    events = await run(make_request("/tool get_time", tools=TOOLS, run_tool=run_tool))

    assert run_tool.calls == [ToolCall("call_1", "get_time", {})]
    assert events[2] == ToolResult("call_1", "denied by user: no", True)
    assert answer(events) == "Tool get_time returned: denied by user: no"
    assert events[-1] == Usage(2, 7)


async def test_nothing_follows_the_call_until_run_tool_returns():
    gate = trio.Event()
    run_tool = FakeRunTool(ToolOutcome("Waited 1 s"), gate=gate)
    events = []

    async def consume() -> None:
        async for event in ScriptedModel().stream(make_request('/tool wait {"seconds": 1}', tools=TOOLS,
                                                               run_tool=run_tool)):
            events.append(event)

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await run_tool.waiting.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert events == [ToolCall("call_1", "wait", {"seconds": 1}), Usage(4, 0)]
            gate.set()

    assert answer(events) == "Tool wait returned: Waited 1 s"


async def test_an_interrupt_while_the_tool_is_pending_ends_the_stream_with_no_result():
    run_tool = FakeRunTool(ToolOutcome("never"), gate=trio.Event())
    events = []

    async def consume() -> None:
        async for event in ScriptedModel().stream(make_request("/tool get_time", tools=TOOLS, run_tool=run_tool)):
            events.append(event)

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await run_tool.waiting.wait()
            nursery.cancel_scope.cancel(reason="turn interrupted by test")

    assert events == [ToolCall("call_1", "get_time", {}), Usage(2, 0)]


async def test_call_ids_are_numbered_after_the_calls_in_the_history():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "first"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "noon"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Tool get_time returned: noon"}]},
    ]
    run_tool = FakeRunTool(ToolOutcome("later"))

    events = await run(make_request("/tool get_time {}", history=history, tools=TOOLS, run_tool=run_tool))

    assert run_tool.calls == [ToolCall("call_2", "get_time", {})]
    assert events[1] == Usage(1 + 1 + 4 + 3, 0)  # history words (a tool result counts, a call does not) + prompt


async def test_a_tool_that_is_not_offered_is_still_called_and_the_engine_answers(tmp_path):
    """As a real model may make a name up: the engine's answer (here the registry's) is the result."""
    registry = demo_registry()

    events = await run(make_request("/tool rm_rf {}", tools=registry.spec(),
                                    run_tool=registry_runner(registry, tmp_path)))

    assert events[2] == ToolResult("call_1", "Unknown tool 'rm_rf' (available tools: get_time, wait, write_note)",
                                   True)
    assert answer(events) == "Tool rm_rf returned: Unknown tool 'rm_rf' (available tools: get_time, wait, write_note)"


async def test_the_directive_runs_a_real_demo_tool_end_to_end(tmp_path):
    registry = demo_registry()

    events = await run(make_request('/tool write_note {"name": "a", "text": "hello there"}', tools=registry.spec(),
                                    run_tool=registry_runner(registry, tmp_path)))

    assert (tmp_path / "notes" / "thr_test" / "a.txt").read_text() == "hello there"
    assert answer(events) == "Tool write_note returned: Wrote note 'a' (11 characters) to notes/thr_test/a.txt"
    assert registry.runs == {"write_note": 1}


@pytest.mark.parametrize("prompt, message", [
    ("/tool", "/tool needs a tool name: /tool NAME {json input}"),
    ("/tool get_time {nope", "/tool get_time: the input is not valid JSON (Expecting property name enclosed in double"
                             " quotes: line 1 column 2 (char 1)): {nope"),
    ('/tool get_time ["a"]', '/tool get_time: the input must be a JSON object, got ["a"]'),
    ("/tool get_time 5", "/tool get_time: the input must be a JSON object, got 5"),
])
async def test_a_malformed_directive_fails_the_turn_naming_it(prompt, message):
    run_tool = FakeRunTool(ToolOutcome("never"))

    with pytest.raises(ModelError) as failed:
        await run(make_request(prompt, tools=TOOLS, run_tool=run_tool))

    assert str(failed.value) == message
    assert run_tool.calls == []


@pytest.mark.parametrize("tools, with_run_tool", [((), True), (TOOLS, False), ((), False)])
async def test_without_tools_offered_the_directive_fails_the_turn(tools, with_run_tool):
    run_tool = FakeRunTool(ToolOutcome("never"))

    with pytest.raises(ModelError) as failed:
        await run(make_request("/tool get_time", tools=tools, run_tool=run_tool if with_run_tool else None))

    assert str(failed.value) == "/tool get_time: no tools are offered to the model (start the server with --tools demo)"
    assert run_tool.calls == []


async def test_other_prompts_are_answered_as_before_when_tools_are_offered():
    run_tool = FakeRunTool(ToolOutcome("never"))

    events = await run(make_request("hello tool", tools=TOOLS, run_tool=run_tool))

    assert answer(events) == "You said: hello tool"
    assert run_tool.calls == []


# ---- continuation (prompt None) ------------------------------------------------------------------


def resumed_history(result: str, *, is_error: bool = False) -> list[dict]:
    block = {"type": "tool_result", "tool_use_id": "call_1", "content": result}
    if is_error:
        block["is_error"] = True
    return [
        {"role": "user", "content": [{"type": "text", "text": '/tool wait {"seconds": 5}'}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "wait", "input": {"seconds": 5}}]},
        {"role": "user", "content": [block]},
    ]


async def test_a_continuation_answers_from_the_tool_result_that_ends_the_history():
    run_tool = FakeRunTool(ToolOutcome("never"))
    history = resumed_history("outcome unknown: the server restarted while the tool ran", is_error=True)

    events = await run(make_request(None, history=history, tools=TOOLS, run_tool=run_tool))

    assert answer(events) == "Tool wait returned: outcome unknown: the server restarted while the tool ran"
    assert run_tool.calls == []
    assert not any(isinstance(e, (ToolCall, ToolResult)) for e in events)
    words = len("Tool wait returned: outcome unknown: the server restarted while the tool ran".split())
    assert events[-1] == Usage(4 + 9, words)  # history words only: there is no prompt


async def test_a_continuation_with_a_list_result_and_a_steer():
    history = resumed_history([{"type": "text", "text": "Waited 5 s"}])

    events = await run(make_request(None, history=history, steers=["thanks"]))

    assert answer(events) == "Tool wait returned: Waited 5 sYou said: thanks"


@pytest.mark.parametrize("history", [
    [],
    [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    [{"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "wait", "input": {}}]}],
])
async def test_a_continuation_without_tool_results_to_answer_fails(history):
    with pytest.raises(ModelError) as failed:
        await run(make_request(None, history=history))

    assert str(failed.value) == ("nothing to continue: a turn without a prompt needs a history that ends with tool"
                                 " results")
