"""``wait``: 0 to 60 seconds (schema and code), sleeps on trio's clock (MockClock here: exact virtual
times), and an interrupt ends it at once."""

from __future__ import annotations

import math

import pytest
import trio

from runtime.models.base import ToolOutcome
from runtime.models.tools import MAX_WAIT_SECONDS, ToolContext, demo_registry


@pytest.fixture
def context(tmp_path) -> ToolContext:
    return ToolContext("thr_1", tmp_path)


@pytest.mark.parametrize("seconds, result", [(0, "Waited 0 s"), (2.5, "Waited 2.5 s"), (60, "Waited 60 s")])
async def test_wait_sleeps_the_given_seconds(context, autojump_clock, seconds, result):
    registry = demo_registry()
    start = trio.current_time()

    outcome = await registry.call("wait", {"seconds": seconds}, context)

    assert outcome == ToolOutcome(result)
    assert trio.current_time() - start == pytest.approx(seconds)
    assert registry.runs == {"wait": 1}


@pytest.mark.parametrize("arguments, reason", [
    ({"seconds": -1}, "$.seconds: -1 is less than the minimum of 0"),
    ({"seconds": 60.5}, "$.seconds: 60.5 is greater than the maximum of 60"),
    ({"seconds": "5"}, "$.seconds: '5' is not of type 'number'"),
    ({"seconds": True}, "$.seconds: True is not of type 'number'"),
    ({}, "$: 'seconds' is a required property"),
])
async def test_out_of_bounds_waits_are_refused_without_running(context, autojump_clock, arguments, reason):
    registry = demo_registry()
    start = trio.current_time()

    outcome = await registry.call("wait", arguments, context)

    assert outcome == ToolOutcome(f"Invalid input for tool 'wait': {reason}", is_error=True)
    assert (registry.runs, trio.current_time()) == ({}, start)


@pytest.mark.parametrize("seconds", [math.nan, math.inf])
async def test_nan_and_infinity_pass_the_schema_but_not_the_code(context, autojump_clock, seconds):
    """``json.loads`` reads ``NaN``; the schema's bounds compare false with it, so the code checks too."""
    registry = demo_registry()
    start = trio.current_time()

    outcome = await registry.call("wait", {"seconds": seconds}, context)

    if math.isnan(seconds):
        assert outcome == ToolOutcome("Tool 'wait' failed: seconds must be a number from 0 to 60, got nan", True)
    else:
        assert outcome == ToolOutcome("Invalid input for tool 'wait': $.seconds: inf is greater than the maximum of 60",
                                      True)
    assert trio.current_time() == start


async def test_the_longest_wait_does_not_time_out(context, autojump_clock):
    registry = demo_registry()
    assert registry.get("wait").timeout > MAX_WAIT_SECONDS > registry.timeout

    outcome = await registry.call("wait", {"seconds": MAX_WAIT_SECONDS}, context)

    assert outcome == ToolOutcome("Waited 60 s")


async def test_an_interrupt_ends_a_wait_at_once(context, autojump_clock):
    registry = demo_registry()
    outcomes: list[ToolOutcome] = []

    async def call() -> None:
        outcomes.append(await registry.call("wait", {"seconds": 60}, context))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await trio.sleep(5)
        nursery.cancel_scope.cancel(reason="turn interrupted by test")

    assert nursery.cancel_scope.cancelled_caught
    assert outcomes == []
    assert trio.current_time() - start == 5
    assert registry.runs == {"wait": 1}
