"""Valid Unicode from every model (API.md, "Hardening rules"): ``runtime.text.valid_text`` and the
``ValidText`` stream every backend's events pass through on their way to the engine.

A lone UTF-16 surrogate is joined with its other half when the half arrives in the next chunk, and
otherwise replaced by U+FFFD. These are pure unit tests: no clock, no I/O.
"""

from __future__ import annotations

import pytest
import trio

from runtime.models.base import (
    ItemBreak, ModelError, ReasoningDelta, Retrying, TextDelta, ToolCall, ToolResult, Truncated, Usage, ValidText,
)
from runtime.models.tools import Tool, ToolContext, ToolRegistry
from runtime.text import has_surrogate_in, surrogate_path, valid_text, valid_value

SMILE = "\U0001F600"  # 😀, in UTF-16 the pair \ud83d \ude00
HIGH, LOW = "\ud83d", "\ude00"
FFFD = "\ufffd"


@pytest.mark.parametrize("text, expected", [
    ("plain ascii", "plain ascii"),
    ("déjà vu " + SMILE, "déjà vu " + SMILE),
    (f"a{HIGH}{LOW}b", f"a{SMILE}b"),  # two code points that spell one character are joined
    (f"a{HIGH}b", f"a{FFFD}b"),
    (f"{LOW}{HIGH}", FFFD + FFFD),  # the wrong order is two lone halves
    (f"x{HIGH}{HIGH}{LOW}", f"x{FFFD}{SMILE}"),
    (HIGH, FFFD),
    (LOW + LOW + "y", FFFD + FFFD + "y"),
])
def test_valid_text_joins_pairs_and_replaces_lone_halves(text, expected):
    fixed = valid_text(text)

    assert fixed == expected
    assert fixed.encode("utf-8").decode("utf-8") == expected


def test_valid_text_returns_valid_text_itself():
    text = "unchanged " + SMILE
    assert valid_text(text) is text


def test_valid_value_repairs_every_string_of_a_json_value_and_the_paths_are_found():
    value = {"city": f"Z{HIGH}rich", f"k{LOW}": [1, True, None, {"deep": f"{HIGH}{LOW}"}], "n": 2.5}

    assert has_surrogate_in(value)
    assert surrogate_path(value) == "city"
    assert surrogate_path({"a": ["ok", {"b": f"x{LOW}"}]}) == "a[1].b"
    assert valid_value(value) == {"city": f"Z{FFFD}rich", f"k{FFFD}": [1, True, None, {"deep": SMILE}], "n": 2.5}
    assert not has_surrogate_in(valid_value(value))
    assert surrogate_path({"a": ["ok", SMILE]}) is None


async def _stream(*events):
    for event in events:
        await trio.lowlevel.checkpoint()
        if isinstance(event, BaseException):
            raise event
        yield event


async def _collect(stream: ValidText) -> list:
    return [event async for event in stream]


async def test_a_pair_split_across_two_text_deltas_is_joined():
    events = await _collect(ValidText(_stream(TextDelta(f"Hi {HIGH}"), TextDelta(f"{LOW} there"), Usage(3, 2))))

    assert events == [TextDelta("Hi "), TextDelta(f"{SMILE} there"), Usage(3, 2)]


async def test_a_chunk_holding_only_the_first_half_waits_for_the_second():
    events = await _collect(ValidText(_stream(TextDelta("a"), TextDelta(HIGH), TextDelta(LOW), TextDelta("b"))))

    assert events == [TextDelta("a"), TextDelta(SMILE), TextDelta("b")]


async def test_reasoning_pairs_are_joined_like_text():
    events = await _collect(ValidText(_stream(ReasoningDelta(f"hmm{HIGH}"), ReasoningDelta(LOW))))

    assert events == [ReasoningDelta("hmm"), ReasoningDelta(SMILE)]


@pytest.mark.parametrize("after", [ItemBreak(), Truncated(), Usage(1, 1), ReasoningDelta(LOW), Retrying(1, "x")])
async def test_a_half_followed_by_anything_but_its_other_half_becomes_fffd_in_its_own_item(after):
    events = await _collect(ValidText(_stream(TextDelta(f"end{HIGH}"), after)))

    repaired_after = ReasoningDelta(FFFD) if isinstance(after, ReasoningDelta) else after
    assert events == [TextDelta("end"), TextDelta(FFFD), repaired_after]


async def test_a_half_at_the_end_of_the_stream_becomes_fffd():
    events = await _collect(ValidText(_stream(TextDelta("bye "), TextDelta(HIGH))))

    assert events == [TextDelta("bye "), TextDelta(FFFD)]


async def test_lone_halves_inside_a_delta_become_fffd():
    events = await _collect(ValidText(_stream(TextDelta(f"{LOW}a{HIGH}b"), TextDelta(f"{LOW}c"))))

    assert events == [TextDelta(f"{FFFD}a{FFFD}b"), TextDelta(f"{FFFD}c")]


async def test_tool_calls_results_and_retry_reasons_are_repaired():
    events = await _collect(ValidText(_stream(
        ToolCall(f"call{HIGH}", f"look{LOW}up", {"q": f"{HIGH}{LOW} {HIGH}", f"k{HIGH}": [f"{LOW}"]}),
        ToolResult(f"call{HIGH}", f"found {HIGH}", True),
        Retrying(2, f"HTTP 503: busy {LOW}"),
    )))

    assert events == [
        ToolCall(f"call{FFFD}", f"look{FFFD}up", {"q": f"{SMILE} {FFFD}", f"k{FFFD}": [FFFD]}),
        ToolResult(f"call{FFFD}", f"found {FFFD}", True),
        Retrying(2, f"HTTP 503: busy {FFFD}"),
    ]


async def test_a_model_error_message_is_repaired_and_keeps_its_cause():
    original = ModelError(f"server said {HIGH}")
    stream = ValidText(_stream(TextDelta("partial"), original))

    with pytest.raises(ModelError) as caught:
        await _collect(stream)

    assert str(caught.value) == f"server said {FFFD}"
    assert caught.value.__cause__ is original


async def test_flush_hands_over_a_half_held_when_the_stream_is_cut_off():
    """An interrupt cancels the iteration while a half is held: the engine asks for it with flush."""
    gate = trio.Event()

    async def backend():
        yield TextDelta("start")
        yield TextDelta(f" {HIGH}")
        await gate.wait()  # never set: the turn is interrupted here
        yield TextDelta(LOW)

    stream = ValidText(backend())
    seen = []
    with trio.CancelScope() as interrupt:
        async for event in stream:
            seen.append(event)
            if len(seen) == 2:
                interrupt.cancel()  # the next wait (on the gate) is cancelled
    await stream.aclose()

    assert interrupt.cancelled_caught
    assert seen == [TextDelta("start"), TextDelta(" ")]
    assert stream.flush() == TextDelta(FFFD)
    assert stream.flush() is None  # handed over once


async def test_a_tools_text_result_is_repaired_before_it_goes_back_to_the_model(tmp_path):
    async def broken(arguments, context):
        return f"read {HIGH} from a file"

    registry = ToolRegistry([Tool("read", "reads", {"type": "object"}, broken)])

    outcome = await registry.call("read", {}, ToolContext("thr_test", tmp_path))

    assert (outcome.content, outcome.is_error) == (f"read {FFFD} from a file", False)
