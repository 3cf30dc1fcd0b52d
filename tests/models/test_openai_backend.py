"""OpenAICompatModel driven directly against the fake server: streaming, usage, reasoning, tools, steers,
history conversion, every failure mode, retries and interrupts (see conftest for the test policy)."""

from __future__ import annotations

import datetime
import logging
import socket

import httpx
import pytest
import trio

from runtime.models.base import (
    ItemBreak, ReasoningDelta, Retrying, TextDelta, ToolCall, ToolOutcome, ToolResult, Truncated, Usage,
)
from runtime.models.openai_compat import INTERRUPTED_TOOL_RESULT, OpenAICompatModel, openai_messages
from runtime.models.tools import Tool, ToolRegistry, demo_registry

from .conftest import API_KEY, LIMIT, FakeRunTool, make_model, make_request, registry_runner, run_failing, run_stream
from .fake_openai import (
    Close, Raw, Reply, Stall, Wait, chunk, error_reply, text_reply, tool_reply, usage_chunk,
)


def texts(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


# ---- streaming -----------------------------------------------------------------------------------


async def test_text_streams_as_deltas_and_usage_comes_from_the_usage_chunk(fake):
    fake.queue(text_reply("Hello", " there", "!", usage=(12, 4)))

    events = await run_stream(make_model(fake), make_request("Hi", system_prompt="Be brief."))

    assert events == [TextDelta("Hello"), TextDelta(" there"), TextDelta("!"), Usage(12, 4)]
    [sent] = fake.chat_requests
    assert sent.body == {
        "model": "fake-model",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["accept"] == "text/event-stream"


async def test_max_tokens_is_asked_for_and_an_answer_cut_at_the_limit_completes(fake):
    fake.queue(Reply(steps=[chunk("One, two,"), chunk(finish="length"), usage_chunk(9, 4)]))

    events = await run_stream(make_model(fake, max_tokens=4), make_request("Count."))

    assert events == [TextDelta("One, two,"), Truncated(), Usage(9, 4)]
    [sent] = fake.chat_requests
    assert sent.body["max_tokens"] == 4


async def test_each_delta_is_yielded_before_the_rest_of_the_stream_arrives(fake):
    release = trio.Event()
    fake.queue(Reply(steps=[chunk("first"), Wait(release), chunk(" second"), chunk(finish="stop")]))
    model = make_model(fake)
    seen = []

    with trio.fail_after(LIMIT):
        async for event in model.stream(make_request()):
            seen.append(event)
            if event == TextDelta("first"):
                assert not release.is_set()  # the server is still holding the rest back
                release.set()

    assert texts(seen) == "first second"


async def test_sse_comments_crlf_and_multi_line_data_are_parsed(fake):
    fake.queue(Reply(steps=[
        Raw(b": keepalive\r\n\r\n"),
        Raw(b'data: {"choices": [{"index": 0, "delta": {"content": "a"}, \r\ndata: "finish_reason": null}]}\r\n\r\n'),
        Raw(b'data: {"choices": [{"index": 0, "delta": {"content": "b"}, "fin'),  # one event over two writes
        Raw(b'ish_reason": "stop"}]}\n\n'),
    ]))

    events = await run_stream(make_model(fake), make_request("abcdefgh"))

    assert texts(events) == "ab"


async def test_without_a_usage_chunk_usage_is_estimated_at_four_characters_per_token(fake):
    fake.queue(text_reply("Hello", " world!", usage=None))  # 12 characters out

    events = await run_stream(make_model(fake), make_request("abcdefghi"))  # 9 characters in

    assert events[-1] == Usage(input_tokens=3, output_tokens=3)  # ceil(9/4), ceil(12/4)


async def test_a_server_that_ignores_stream_true_is_read_as_one_whole_answer(fake):
    fake.queue(Reply(body={"choices": [{"index": 0, "message": {"role": "assistant", "content": "All at once"},
                                        "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 7, "completion_tokens": 3}}))

    events = await run_stream(make_model(fake), make_request())

    assert events == [TextDelta("All at once"), Usage(7, 3)]


async def test_reasoning_content_becomes_reasoning_deltas_then_an_item_break_before_the_text(fake):
    fake.queue(text_reply("The", " answer", reasoning=("Let me", " think"), usage=(5, 9)))

    events = await run_stream(make_model(fake), make_request())

    assert events == [ReasoningDelta("Let me"), ReasoningDelta(" think"), ItemBreak(),
                      TextDelta("The"), TextDelta(" answer"), Usage(5, 9)]


# ---- tools ---------------------------------------------------------------------------------------


async def test_tool_call_assembled_from_fragments_is_run_by_the_engine_and_its_result_sent_back(fake, tmp_path):
    fake.queue(tool_reply("call_abc", "get_time", ['{', '}'], usage=(20, 6)),
               text_reply("It is noon.", usage=(40, 4)))
    registry = demo_registry()

    events = await run_stream(make_model(fake), make_request(
        "What time is it?", tools=registry.spec(), run_tool=registry_runner(registry, tmp_path)))

    call, result = events[1], events[2]
    assert events[0] == Usage(20, 6)
    assert call == ToolCall("call_abc", "get_time", {})
    assert isinstance(result, ToolResult) and result.id == "call_abc" and not result.is_error
    when = datetime.datetime.fromisoformat(result.content)
    assert when.utcoffset() == datetime.timedelta(0)
    assert events[3:] == [TextDelta("It is noon."), Usage(60, 10)]  # usage summed over both rounds
    assert registry.runs == {"get_time": 1}

    first, second = fake.chat_requests
    assert first.body["tools"] == [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in registry.spec()]
    assert [t["function"]["name"] for t in first.body["tools"]] == ["get_time", "write_note", "wait"]
    assert second.messages == [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_time", "arguments": '{}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": result.content},
    ]


async def test_without_tools_or_without_run_tool_no_tools_are_offered(fake, tmp_path):
    registry = demo_registry()
    fake.queue(text_reply("ok"), text_reply("ok"), text_reply("ok"))

    await run_stream(make_model(fake), make_request())
    await run_stream(make_model(fake), make_request(tools=registry.spec()))  # nothing to run them with
    await run_stream(make_model(fake), make_request(run_tool=registry_runner(registry, tmp_path)))

    assert ["tools" in r.body for r in fake.chat_requests] == [False, False, False]


async def test_a_write_note_call_gets_the_result_run_tool_returns_a_denial_included(fake):
    """The backend never runs a tool: a denial the engine answers with reaches the model as the tool
    message (is_error), and the turn goes on to the model's next answer."""
    fake.queue(tool_reply("call_w", "write_note", ['{"name": "todo", ', '"text": "buy milk"}'], usage=(15, 5)),
               text_reply("Understood, no note.", usage=(30, 4)))
    run_tool = FakeRunTool(ToolOutcome("denied by user: no", is_error=True))
    registry = demo_registry()

    events = await run_stream(make_model(fake), make_request("Note: buy milk", tools=registry.spec(),
                                                             run_tool=run_tool))

    call = ToolCall("call_w", "write_note", {"name": "todo", "text": "buy milk"})
    assert run_tool.calls == [call]
    assert events == [Usage(15, 5), call, ToolResult("call_w", "denied by user: no", True),
                      TextDelta("Understood, no note."), Usage(45, 9)]
    assert registry.runs == {}  # the registry was never asked: running tools is the engine's
    first, second = fake.chat_requests
    assert "write_note" in [t["function"]["name"] for t in first.body["tools"]]
    assert second.messages[-2:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_w", "type": "function",
             "function": {"name": "write_note", "arguments": '{"name": "todo", "text": "buy milk"}'}}]},
        {"role": "tool", "tool_call_id": "call_w", "content": "denied by user: no"},
    ]


async def test_the_result_is_sent_only_once_run_tool_returns(fake):
    """While the engine holds the call (an approval pending), no second request goes to the server."""
    fake.queue(tool_reply("call_w", "wait", ['{"seconds": 1}']), text_reply("Done waiting."))
    gate = trio.Event()
    run_tool = FakeRunTool(ToolOutcome("Waited 1 s"), gate=gate)
    events = []

    async def consume() -> None:
        async for event in make_model(fake).stream(make_request(tools=demo_registry().spec(), run_tool=run_tool)):
            events.append(event)

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await run_tool.waiting.wait()
            assert len(fake.chat_requests) == 1
            assert events[-1] == ToolCall("call_w", "wait", {"seconds": 1})
            gate.set()

    assert len(fake.chat_requests) == 2
    assert fake.chat_requests[1].messages[-1] == {"role": "tool", "tool_call_id": "call_w", "content": "Waited 1 s"}
    assert texts(events) == "Done waiting."


async def test_an_interrupt_while_run_tool_waits_closes_the_stream_and_sends_nothing_more(fake):
    fake.queue(tool_reply("call_w", "wait", ['{"seconds": 5}']))
    run_tool = FakeRunTool(ToolOutcome("never"), gate=trio.Event())

    async def consume() -> None:
        async for _ in make_model(fake).stream(make_request(tools=demo_registry().spec(), run_tool=run_tool)):
            pass

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await run_tool.waiting.wait()
            nursery.cancel_scope.cancel(reason="turn interrupted by test")

    assert nursery.cancel_scope.cancelled_caught
    assert len(fake.chat_requests) == 1
    assert run_tool.calls == [ToolCall("call_w", "wait", {"seconds": 5})]


async def test_failing_unknown_and_garbled_tool_calls_become_error_results_the_model_sees(fake, tmp_path):
    async def explode(arguments, context):
        raise RuntimeError("disk on fire")

    tools = ToolRegistry([Tool("explode", "Always fails.", {"type": "object", "properties": {}}, explode)])
    fake.queue(
        Reply(steps=[
            chunk(tool_calls=[{"index": 0, "id": "c1", "function": {"name": "explode", "arguments": "{}"}},
                              {"index": 1, "id": "c2", "function": {"name": "nope", "arguments": "{}"}},
                              {"index": 2, "id": "c3", "function": {"name": "explode", "arguments": "{oops"}}]),
            chunk(finish="tool_calls"),
        ]),
        text_reply("Sorry, the tools failed."),
    )

    events = await run_stream(make_model(fake), make_request(tools=tools.spec(),
                                                             run_tool=registry_runner(tools, tmp_path)))

    results = [e for e in events if isinstance(e, ToolResult)]
    assert [(r.id, r.is_error) for r in results] == [("c1", True), ("c2", True), ("c3", True)]
    assert results[0].content == "Tool 'explode' failed: RuntimeError: disk on fire"
    assert results[1].content == "Unknown tool 'nope' (available tools: explode)"
    assert results[2].content == "Tool 'explode' was not run: its arguments were not valid JSON"
    tool_messages = [m for m in fake.chat_requests[1].messages if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["c1", "c2", "c3"]
    assert texts(events) == "Sorry, the tools failed."
    assert (tools.calls, tools.runs) == ({"explode": 1, "nope": 1}, {"explode": 1})  # c3 never reached it


async def test_a_model_that_never_stops_calling_tools_fails_the_turn_after_the_round_cap(fake, tmp_path):
    for n in range(4):
        fake.queue(tool_reply(f"call_{n}", "get_time", ["{}"]))
    registry = demo_registry()

    events, error = await run_failing(make_model(fake, max_tool_rounds=2), make_request(
        tools=registry.spec(), run_tool=registry_runner(registry, tmp_path)))

    assert "kept calling tools for 2 rounds" in str(error)
    assert len(fake.chat_requests) == 3
    assert [e.id for e in events if isinstance(e, ToolResult)] == ["call_0", "call_1"]


# ---- conversation --------------------------------------------------------------------------------


def test_history_blocks_become_openai_messages():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "What time is it?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "text": "use the tool"},
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "t1", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "12:00"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Noon."}]},
        {"role": "user", "content": [{"type": "text", "text": "And again?"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t2", "name": "get_time", "input": {}}],
         "interrupted": True},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "gone", "content": "old"},
                                     {"type": "text", "text": "Never mind."}]},
    ]

    messages = openai_messages("Be brief.", history, "Thanks")

    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "12:00"},
        {"role": "assistant", "content": "Noon."},
        {"role": "user", "content": "And again?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "t2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t2", "content": INTERRUPTED_TOOL_RESULT},
        {"role": "user", "content": "[Result of tool call gone]\nold\n\nNever mind."},
        {"role": "user", "content": "Thanks"},
    ]


async def test_steers_waiting_at_the_end_are_sent_as_user_messages_and_answered(fake):
    fake.queue(text_reply("First answer.", usage=(10, 2)), text_reply("About the steer.", usage=(20, 3)))

    events = await run_stream(make_model(fake), make_request("Q", steers=["Also this", "And that"]))

    assert events == [TextDelta("First answer."), Usage(10, 2), ItemBreak(), TextDelta("About the steer."),
                      Usage(30, 5)]
    assert fake.chat_requests[1].messages == [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Also this"},
        {"role": "user", "content": "And that"},
    ]


# ---- failures ------------------------------------------------------------------------------------


async def test_connection_refused_is_a_clear_model_error():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model = OpenAICompatModel(f"http://127.0.0.1:{port}/v1", "m")

    events, error = await run_failing(model, make_request())

    assert events == []
    assert str(error) == (f"Cannot connect to the model server at http://127.0.0.1:{port}/v1: connection refused"
                          " (is the server running?)")


class NoSuchHost(trio.abc.HostnameResolver):
    async def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def getnameinfo(self, sockaddr, flags):
        raise NotImplementedError


async def test_dns_failure_names_the_host():
    trio.socket.set_custom_hostname_resolver(NoSuchHost())  # this test's trio run only
    model = OpenAICompatModel("http://llm.invalid:8080/v1", "m")

    _, error = await run_failing(model, make_request())

    assert str(error) == ("Cannot connect to the model server at http://llm.invalid:8080/v1: the host name"
                          " 'llm.invalid' could not be resolved (DNS failure: Name or service not known)")


@pytest.mark.parametrize("status, expected", [
    (401, "refused the request (HTTP 401, bad or missing API key): Incorrect API key provided: ***; check the API key"),
    (403, "refused the request (HTTP 403, bad or missing API key): Incorrect API key provided: ***; check the API key"),
])
async def test_a_rejected_key_says_so_without_repeating_the_key(fake, status, expected, caplog):
    caplog.set_level(logging.DEBUG)
    fake.queue(error_reply(status, f"Incorrect API key provided: {API_KEY}"))

    _, error = await run_failing(make_model(fake), make_request())

    assert str(error) == f"The model server at {fake.base_url} {expected}"
    assert API_KEY not in caplog.text
    assert API_KEY not in repr(make_model(fake))
    assert len(fake.chat_requests) == 1  # not retried


async def test_a_missing_key_is_named_as_the_problem(fake):
    fake.queue(error_reply(401, "You didn't provide an API key."))

    _, error = await run_failing(make_model(fake, api_key=None), make_request())

    assert "authorization" not in fake.chat_requests[0].headers
    assert str(error).endswith("it needs an API key and none is set")


async def test_an_unknown_model_names_the_model_and_the_base_url(fake):
    fake.queue(error_reply(404, "The model `gpt-9` does not exist"))

    _, error = await run_failing(make_model(fake, model_name="gpt-9"), make_request())

    assert str(error) == (
        f"The model server at {fake.base_url} answered HTTP 404 for model 'gpt-9': The model `gpt-9` does not"
        " exist; the model is not served there, or the base URL is wrong (OpenAI-compatible servers usually"
        " serve under /v1)")


async def test_other_client_errors_quote_the_server_and_are_not_retried(fake):
    fake.queue(error_reply(400, "context length exceeded"))

    _, error = await run_failing(make_model(fake), make_request())

    assert str(error) == f"The model server at {fake.base_url} rejected the request (HTTP 400): context length exceeded"
    assert len(fake.chat_requests) == 1


async def test_429_and_5xx_are_retried_with_retrying_events_then_the_answer_streams(fake):
    fake.queue(error_reply(429, "slow down"), error_reply(503, "overloaded"), text_reply("Finally"))

    events = await run_stream(make_model(fake), make_request())

    assert events[:2] == [Retrying(1, "HTTP 429: slow down"), Retrying(2, "HTTP 503: overloaded")]
    assert texts(events) == "Finally"
    assert len(fake.chat_requests) == 3


async def test_retries_give_up_after_max_retries_with_the_last_status(fake):
    fake.queue(*[error_reply(502, "bad gateway")] * 3)

    events, error = await run_failing(make_model(fake, max_retries=2), make_request())

    assert events == [Retrying(1, "HTTP 502: bad gateway"), Retrying(2, "HTTP 502: bad gateway")]
    assert str(error) == f"The model server at {fake.base_url} failed with HTTP 502 after 2 retries: bad gateway"


async def test_retry_backoff_doubles_up_to_the_cap_on_virtual_time(autojump_clock):
    """The backoff schedule, exactly, on the MockClock (an in-memory transport: no socket, no real time)."""
    asked_at: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        asked_at.append(trio.current_time())
        if len(asked_at) <= 4:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=b'data: {"choices": [{"index": 0, "delta": {"content": "ok"},'
                                      b' "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n')

    model = OpenAICompatModel("http://llm.test/v1", "m", backoff_base=0.5, backoff_max=2.0, max_retries=4,
                              http_client=lambda: httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    start = trio.current_time()

    events = [e async for e in model.stream(make_request())]

    assert [t - start for t in asked_at] == [0.0, 0.5, 1.5, 3.5, 5.5]  # waits 0.5, 1, 2, then capped at 2
    assert [e.attempt for e in events if isinstance(e, Retrying)] == [1, 2, 3, 4]
    assert texts(events) == "ok"


async def test_retry_after_is_honoured_up_to_the_cap(autojump_clock):
    asked_at: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        asked_at.append(trio.current_time())
        if len(asked_at) == 1:
            return httpx.Response(429, headers={"retry-after": "3"}, json={"error": "rate limited"})
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=b'data: {"choices": [{"index": 0, "delta": {"content": "ok"},'
                                      b' "finish_reason": "stop"}]}\n\n')

    model = OpenAICompatModel("http://llm.test/v1", "m", backoff_base=0.5, backoff_max=8.0,
                              http_client=lambda: httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    start = trio.current_time()

    await run_stream(model, make_request())

    assert [t - start for t in asked_at] == [0.0, 3.0]


async def test_malformed_chunk_fails_with_the_chunk_quoted(fake):
    fake.queue(Reply(steps=[chunk("Partial"), Raw(b"data: {this is not json\n\n")]))

    events, error = await run_failing(make_model(fake), make_request())

    assert texts(events) == "Partial"
    assert str(error) == (f"The model server at {fake.base_url} sent a malformed stream chunk (not JSON):"
                          " {this is not json")


async def test_a_chunk_of_the_wrong_shape_is_malformed_too(fake):
    fake.queue(Reply(steps=[{"choices": [{"index": 0, "delta": {"content": 42}}]}]))

    _, error = await run_failing(make_model(fake), make_request())

    assert "sent a malformed stream chunk ('content' is not a string)" in str(error)


async def test_an_error_object_in_the_stream_fails_with_its_message(fake):
    fake.queue(Reply(steps=[chunk("Par"), {"error": {"message": "CUDA out of memory", "code": 500}}]))

    events, error = await run_failing(make_model(fake), make_request())

    assert texts(events) == "Par"
    assert str(error) == f"The model server at {fake.base_url} reported an error mid-answer: CUDA out of memory"


async def test_a_stalled_stream_fails_after_the_read_timeout_keeping_partial_text(fake):
    fake.queue(Reply(steps=[chunk("Partial"), Stall()]))
    model = make_model(fake, read_timeout=0.5)
    start = trio.current_time()

    events, error = await run_failing(model, make_request())

    assert 0.5 <= trio.current_time() - start < 3.0
    assert texts(events) == "Partial"
    assert str(error) == (f"The model stream from the model server at {fake.base_url} stalled: nothing arrived"
                          " for 0.5 s (read timeout); the text so far is kept")
    with trio.fail_after(LIMIT):
        await fake.disconnected.wait()  # and the connection was closed, not left hanging


async def test_a_server_silent_before_answering_times_out_too(fake):
    fake.queue(Reply(steps=[Stall()]))

    _, error = await run_failing(make_model(fake, read_timeout=0.5), make_request())

    assert str(error) == f"The model server at {fake.base_url} did not answer within 0.5 s (read timeout)"


async def test_a_server_closing_mid_stream_fails_after_the_partial_text_without_retrying(fake):
    fake.queue(Reply(steps=[chunk("Half an"), Close()]), text_reply("never sent"))

    events, error = await run_failing(make_model(fake), make_request())

    assert texts(events) == "Half an"
    assert str(error).startswith(f"The model server at {fake.base_url} closed the connection mid-answer;"
                                 " the text so far is kept (")
    assert len(fake.chat_requests) == 1


async def test_a_stream_that_ends_cleanly_but_unfinished_is_a_failure(fake):
    fake.queue(Reply(steps=[chunk("Half")], done=False))

    _, error = await run_failing(make_model(fake), make_request())

    assert str(error) == f"The model server at {fake.base_url} ended the stream mid-answer; the text so far is kept"


async def test_an_html_page_instead_of_a_stream_points_at_the_base_url(fake):
    fake.queue(Reply(steps=[Raw(b"<html>hello</html>")], content_type="text/html", done=False))

    _, error = await run_failing(make_model(fake), make_request())

    assert "answered with Content-Type 'text/html' instead of an event stream" in str(error)


# ---- interrupt -----------------------------------------------------------------------------------


async def test_cancelling_the_stream_closes_the_connection_promptly(fake):
    fake.queue(Reply(steps=[chunk("Partial"), Stall()]))
    model = make_model(fake, read_timeout=60.0)
    seen = []

    with trio.fail_after(LIMIT):
        with trio.CancelScope() as scope:
            async for event in model.stream(make_request()):
                seen.append(event)
                scope.cancel(reason="interrupted by the test")
        start = trio.current_time()
        await fake.disconnected.wait()

    assert scope.cancelled_caught
    assert seen == [TextDelta("Partial")]
    assert trio.current_time() - start < 1.0


async def test_cancelling_during_the_wait_for_headers_closes_the_connection(fake):
    fake.queue(Reply(steps=[Stall()]))

    with trio.fail_after(LIMIT):
        with trio.move_on_after(0.2) as scope:
            await run_stream(make_model(fake), make_request())
        await fake.disconnected.wait()

    assert scope.cancelled_caught


async def test_cancelling_during_a_retry_backoff_ends_at_once(fake):
    fake.queue(error_reply(503, "busy"))
    model = make_model(fake, backoff_base=30.0, backoff_max=30.0)
    seen = []

    with trio.fail_after(LIMIT):
        with trio.CancelScope() as scope:
            async for event in model.stream(make_request()):
                seen.append(event)
                scope.cancel()

    assert seen == [Retrying(1, "HTTP 503: busy")]


async def test_usage_chunk_alone_after_finish(fake):
    fake.queue(Reply(steps=[chunk("x", finish="stop"), usage_chunk(3, 1)], done=False))
    events = await run_stream(make_model(fake), make_request())
    assert events == [TextDelta("x"), Usage(3, 1)]
