"""ToolRegistry: input checked against each tool's JSON schema (Draft 2020-12) before the tool runs,
every failure an error outcome the model reads (never an exception for the turn), counters of calls and
runs, the specs the engine offers. Timed cases run on the MockClock (``autojump_clock``)."""

from __future__ import annotations

import pytest
import trio

from runtime.models.base import ToolOutcome, ToolSpec
from runtime.models.tools import (
    DEFAULT_TOOL_TIMEOUT, MAX_RESULT_CHARS, Tool, ToolContext, ToolError, ToolRegistry, demo_registry,
)

SCHEMA = {
    "type": "object",
    "properties": {"count": {"type": "integer", "minimum": 1}, "label": {"type": "string", "maxLength": 5}},
    "required": ["count"],
    "additionalProperties": False,
}


def recorder() -> tuple[list[dict], Tool]:
    seen: list[dict] = []

    async def run(arguments, context):
        seen.append(arguments)
        return f"got {arguments['count']} for {context.thread_id}"

    return seen, Tool("count", "Counts.", SCHEMA, run)


@pytest.fixture
def context(tmp_path) -> ToolContext:
    return ToolContext("thr_1", tmp_path)


async def test_a_valid_input_runs_the_tool_with_its_context(context):
    seen, tool = recorder()
    registry = ToolRegistry([tool])

    outcome = await registry.call("count", {"count": 3, "label": "abc"}, context)

    assert outcome == ToolOutcome("got 3 for thr_1", False)
    assert seen == [{"count": 3, "label": "abc"}]
    assert (registry.calls, registry.runs) == ({"count": 1}, {"count": 1})


@pytest.mark.parametrize("arguments, message", [
    ({}, "Invalid input for tool 'count': $: 'count' is a required property"),
    ({"count": "3"}, "Invalid input for tool 'count': $.count: '3' is not of type 'integer'"),
    ({"count": 0}, "Invalid input for tool 'count': $.count: 0 is less than the minimum of 1"),
    ({"count": True}, "Invalid input for tool 'count': $.count: True is not of type 'integer'"),
    ({"count": 1, "label": "too long"}, "Invalid input for tool 'count': $.label: 'too long' is too long"),
    ({"count": 1, "extra": 1},
     "Invalid input for tool 'count': $: Additional properties are not allowed ('extra' was unexpected)"),
    ([1, 2], "Invalid input for tool 'count': $: [1, 2] is not of type 'object'"),
    ("count=3", "Invalid input for tool 'count': $: 'count=3' is not of type 'object'"),
])
async def test_each_bad_input_is_a_clear_error_outcome_and_the_tool_does_not_run(context, arguments, message):
    seen, tool = recorder()
    registry = ToolRegistry([tool])

    outcome = await registry.call("count", arguments, context)

    assert outcome == ToolOutcome(message, is_error=True)
    assert seen == []
    assert (registry.calls, registry.runs) == ({"count": 1}, {})


async def test_a_long_reason_is_cut(context):
    _, tool = recorder()
    outcome = await ToolRegistry([tool]).call("count", {"count": "x" * 5000}, context)

    assert outcome.is_error
    assert outcome.content.startswith("Invalid input for tool 'count': $.count: 'xxxx")
    assert outcome.content.endswith("…") and len(outcome.content) < 400


async def test_an_unknown_tool_is_an_error_outcome_naming_the_tools_there_are(context):
    registry = demo_registry()

    outcome = await registry.call("rm_rf", {}, context)

    assert outcome == ToolOutcome("Unknown tool 'rm_rf' (available tools: get_time, wait, write_note)", True)
    assert (registry.calls, registry.runs) == ({"rm_rf": 1}, {})
    assert (await ToolRegistry().call("x", {}, context)).content == "Unknown tool 'x' (available tools: none)"


async def test_exceptions_become_error_outcomes(context):
    async def crash(arguments, context):
        raise KeyError("boom")

    async def refuse(arguments, context):
        raise ToolError("the file is locked")

    registry = ToolRegistry([Tool("crash", "", {"type": "object"}, crash), Tool("refuse", "", {"type": "object"}, refuse)])

    assert await registry.call("crash", {}, context) == ToolOutcome("Tool 'crash' failed: KeyError: 'boom'", True)
    assert await registry.call("refuse", {}, context) == ToolOutcome("Tool 'refuse' failed: the file is locked", True)
    assert registry.runs == {"crash": 1, "refuse": 1}


async def test_a_tool_past_its_timeout_is_an_error_outcome(context, autojump_clock):
    async def hang(arguments, context):
        await trio.sleep_forever()

    registry = ToolRegistry([Tool("hang", "", {"type": "object"}, hang),
                             Tool("slow", "", {"type": "object"}, hang, timeout=2.5)])
    start = trio.current_time()

    assert await registry.call("hang", {}, context) == ToolOutcome(
        f"Tool 'hang' did not finish within {DEFAULT_TOOL_TIMEOUT:g} s", True)
    assert trio.current_time() - start == pytest.approx(DEFAULT_TOOL_TIMEOUT)
    assert await registry.call("slow", {}, context) == ToolOutcome("Tool 'slow' did not finish within 2.5 s", True)
    assert trio.current_time() - start == pytest.approx(DEFAULT_TOOL_TIMEOUT + 2.5)


async def test_cancellation_propagates_and_produces_no_outcome(context):
    started = trio.Event()

    async def hang(arguments, context):
        started.set()
        await trio.sleep_forever()

    registry = ToolRegistry([Tool("hang", "", {"type": "object"}, hang)])
    outcomes: list[ToolOutcome] = []

    async def call() -> None:
        outcomes.append(await registry.call("hang", {}, context))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await started.wait()
        nursery.cancel_scope.cancel(reason="turn interrupted by test")

    assert nursery.cancel_scope.cancelled_caught
    assert outcomes == []
    assert registry.runs == {"hang": 1}


async def test_results_are_text_cut_to_the_limit(context):
    async def big(arguments, context):
        return "x" * (MAX_RESULT_CHARS + 10)

    async def structured(arguments, context):
        return {"a": [1, 2]}

    registry = ToolRegistry([Tool("big", "", {"type": "object"}, big), Tool("dict", "", {"type": "object"}, structured)])

    cut = await registry.call("big", {}, context)
    assert (len(cut.content), cut.content[-1], cut.is_error) == (MAX_RESULT_CHARS, "…", False)
    assert await registry.call("dict", {}, context) == ToolOutcome('{"a": [1, 2]}')


def test_spec_get_and_the_demo_tools_flags():
    registry = demo_registry()

    assert [s.name for s in registry.spec()] == ["get_time", "write_note", "wait"]
    assert all(isinstance(s, ToolSpec) for s in registry.spec())
    assert registry.spec()[1].parameters["required"] == ["name", "text"]
    assert [(registry.get(n).needs_approval, registry.get(n).writes) for n in ("get_time", "write_note", "wait")] == [
        (False, False), (True, True), (True, False)]
    assert registry.get("nope") is None
    assert demo_registry() is not registry and demo_registry().runs == {}


def test_a_duplicate_name_or_an_invalid_schema_is_refused_when_added():
    _, tool = recorder()
    registry = ToolRegistry([tool])
    with pytest.raises(ValueError, match="a tool named 'count' is already registered"):
        registry.add(tool)
    with pytest.raises(ValueError, match="tool 'bad' has an invalid input schema: 'objekt' is not valid"):
        ToolRegistry([Tool("bad", "", {"type": "objekt"}, tool.run)])


def test_the_tool_module_re_exports_tool_outcome():
    from runtime.models import base, tools
    assert tools.ToolOutcome is base.ToolOutcome
