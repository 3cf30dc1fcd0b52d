"""The scripted model: deterministic, offline, and the default backend (see API.md).

It answers ``You said: <prompt>`` word by word. A first prompt line may hold one directive:
``/slow SECONDS``, ``/hang``, ``/fail MESSAGE``, ``/think TEXT`` or ``/tool NAME {json input}``.

``/tool NAME {json}`` (the JSON may be left out: ``{}``) calls a tool offline: the model emits that tool
call (id ``call_<n>``, n = 1 + the tool calls already in the history, so ids are deterministic and
unique in the thread), awaits the engine's ``run_tool``, yields the result, then answers ``Tool NAME
returned: <result text>`` (an error result too: a denial reads ``Tool NAME returned: denied by user``).
It calls the tool even when NAME is not among the offered tools (the engine answers "unknown tool", as
for a real model that makes a name up); with no tools offered at all, or a malformed directive, the turn
fails with a ModelError naming the problem. A continuation (``prompt`` None: the turn was resumed with
its tool results already in the history) answers ``Tool NAME returned: <result text>`` for the results
that end the history. Steered text is answered after the
main reply with ``You said: <steer>``. Usage counts words: input is the history plus the prompt and
any steers, output is every word streamed (reasoning included; a tool call is not a word).

Usage is reported as it grows, after every word (and before a ``/hang`` waits), not only at the end:
an interrupted turn is cancelled at the model's next checkpoint, and its usage is then the words sent
(history, prompt, the steers taken in) and streamed until that point (a ``/tool`` call reports it
before it waits for the tool). The first event of a reply is
its first word, so wrappers that act "after the first word" still can. A steer closes the item being
streamed (the engine does that), so the word after a steer starts the new item without its separating
space.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import trio

from ..transcript import result_text, word_count
from .base import (
    ItemBreak, ModelError, ModelEvent, ModelRequest, ReasoningDelta, TextDelta, ToolCall, ToolResult, Usage,
)

DIRECTIVES = ("/slow", "/hang", "/fail", "/think", "/tool")


def parse_directive(prompt: str) -> tuple[str | None, str, str]:
    """Split ``prompt`` into (directive, argument, rest of the prompt)."""
    first, _, rest = prompt.partition("\n")
    stripped = first.strip()
    if stripped.startswith("/"):
        name, _, arg = stripped.partition(" ")
        if name in DIRECTIVES:
            return name, arg.strip(), rest
    return None, "", prompt


def parse_tool_directive(arg: str) -> tuple[str, dict[str, Any]]:
    """``NAME {json}`` of a ``/tool`` line as (name, input); ModelError naming what is wrong."""
    name, _, raw = arg.partition(" ")
    if not name:
        raise ModelError("/tool needs a tool name: /tool NAME {json input}")
    raw = raw.strip()
    if not raw:
        return name, {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ModelError(f"/tool {name}: the input is not valid JSON ({exc}): {raw[:200]}") from exc
    if not isinstance(value, dict):
        raise ModelError(f"/tool {name}: the input must be a JSON object, got {raw[:200]}")
    return name, value


def tool_call_count(history: list[dict[str, Any]]) -> int:
    """The tool calls (``tool_use`` blocks) in the history: the next call's id is ``call_<count + 1>``."""
    return sum(1 for message in history if isinstance(message.get("content"), list)
               for block in message["content"] if isinstance(block, dict) and block.get("type") == "tool_use")


def continuation_answer(history: list[dict[str, Any]]) -> str:
    """``Tool NAME returned: <result>`` for each tool result of the last message of ``history`` (a user
    message of tool_result blocks), NAME from the matching tool_use of the assistant message before it."""
    last = history[-1] if history else {}
    content = last.get("content")
    results = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"] \
        if last.get("role") == "user" and isinstance(content, list) else []
    if not results:
        raise ModelError("nothing to continue: a turn without a prompt needs a history that ends with tool results")
    names: dict[str, str] = {}
    for message in history[:-1]:
        if message.get("role") == "assistant" and isinstance(message.get("content"), list):
            for block in message["content"]:
                if isinstance(block, dict) and block.get("type") == "tool_use":
                    names[str(block.get("id"))] = str(block.get("name") or "")
    return " ".join(f"Tool {names.get(str(b.get('tool_use_id')), 'unknown')} returned: {result_text(b.get('content'))}"
                    for b in results)


class _Reply:
    """One turn's running counts and the steers taken in so far (answered after the main reply)."""

    def __init__(self, request: ModelRequest) -> None:
        self.steers_rx = request.steers
        self.input_tokens = word_count(request.history) + len((request.prompt or "").split())
        self.output_tokens = 0
        self.steers: list[str] = []

    def usage(self) -> Usage:
        return Usage(self.input_tokens, self.output_tokens)

    def take_steers(self) -> bool:
        """Take in the steers that arrived; True if there was one (the engine then closed the item)."""
        took = False
        while True:
            try:
                steer = self.steers_rx.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return took
            self.steers.append(steer)
            self.input_tokens += len(steer.split())
            took = True

    async def words(self, text: str, delay: float, kind: type) -> AsyncIterator[ModelEvent]:
        """One delta per word, each followed by the usage so far; the first comes at once, then one
        every ``delay`` seconds. A word after a steer opens a new item, so it has no leading space."""
        for index, word in enumerate(text.split()):
            if delay and index:
                await trio.sleep(delay)
            else:
                await trio.lowlevel.checkpoint()
            fresh = self.take_steers() or index == 0
            yield kind(word if fresh else " " + word)
            self.output_tokens += 1
            yield self.usage()


class ScriptedModel:
    name = "scripted"

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        reply = _Reply(request)
        if request.prompt is None:
            directive, arg, rest = None, "", ""
            text = continuation_answer(request.history)
        else:
            directive, arg, rest = parse_directive(request.prompt)
            text = f"You said: {rest.strip()}".strip()
        delay = 0.0
        if directive == "/tool":
            name, tool_input = parse_tool_directive(arg)
            if request.run_tool is None or not request.tools:
                raise ModelError(f"/tool {name}: no tools are offered to the model (start the server with"
                                 " --tools demo)")
            call = ToolCall(f"call_{tool_call_count(request.history) + 1}", name, tool_input)
            yield call
            yield reply.usage()  # the prompt was sent; the tool may wait a long time for its approval
            outcome = await request.run_tool(call)
            yield ToolResult(call.id, outcome.content, outcome.is_error)
            text = f"Tool {name} returned: {outcome.content}"
        if directive == "/fail":
            raise ModelError(arg or "scripted failure")
        if directive == "/slow":
            try:
                delay = max(0.0, float(arg)) / max(1, len(text.split()))
            except ValueError as exc:
                raise ModelError(f"/slow needs a number of seconds, got {arg!r}") from exc
        if directive == "/hang":
            yield reply.usage()  # the prompt was sent; nothing will come back until the turn is interrupted
            await trio.sleep_forever()
        if directive == "/think" and arg:
            async for event in reply.words(arg, 0.0, ReasoningDelta):
                yield event
            yield ItemBreak()
        async for event in reply.words(text, delay, TextDelta):
            yield event
        reply.take_steers()
        answered = 0
        while answered < len(reply.steers):
            steer = reply.steers[answered]
            answered += 1
            yield ItemBreak()
            async for event in reply.words(f"You said: {steer.strip()}", 0.0, TextDelta):
                yield event
            reply.take_steers()  # a steer that came while answering one is answered too
