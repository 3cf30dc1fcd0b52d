"""The scripted model: deterministic, offline, and the default backend (see API.md).

It answers ``You said: <prompt>`` word by word. A first prompt line may hold one directive:
``/slow SECONDS``, ``/hang``, ``/fail MESSAGE`` or ``/think TEXT``. Steered text is answered after the
main reply with ``You said: <steer>``. Usage counts words: input is the history plus the prompt and
any steers, output is every word streamed (reasoning included).
"""

from __future__ import annotations

from typing import AsyncIterator

import trio

from ..transcript import word_count
from .base import ItemBreak, ModelError, ModelEvent, ModelRequest, ReasoningDelta, TextDelta, Usage


def parse_directive(prompt: str) -> tuple[str | None, str, str]:
    """Split ``prompt`` into (directive, argument, rest of the prompt)."""
    first, _, rest = prompt.partition("\n")
    stripped = first.strip()
    if stripped.startswith("/"):
        name, _, arg = stripped.partition(" ")
        if name in ("/slow", "/hang", "/fail", "/think"):
            return name, arg.strip(), rest
    return None, "", prompt


async def _words(text: str, delay: float, kind: type) -> AsyncIterator[ModelEvent]:
    """One delta per word; the first comes at once, then one every ``delay`` seconds."""
    for index, word in enumerate(text.split()):
        if delay and index:
            await trio.sleep(delay)
        else:
            await trio.lowlevel.checkpoint()
        yield kind(word if index == 0 else " " + word)


class ScriptedModel:
    name = "scripted"

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        directive, arg, rest = parse_directive(request.prompt)
        input_tokens = word_count(request.history) + len(request.prompt.split())
        output_tokens = 0
        if directive == "/fail":
            raise ModelError(arg or "scripted failure")
        if directive == "/hang":
            await trio.sleep_forever()
        if directive == "/think" and arg:
            async for event in _words(arg, 0.0, ReasoningDelta):
                yield event
            output_tokens += len(arg.split())
            yield ItemBreak()
        reply = f"You said: {rest.strip()}".strip()
        delay = 0.0
        if directive == "/slow":
            try:
                delay = max(0.0, float(arg)) / max(1, len(reply.split()))
            except ValueError as exc:
                raise ModelError(f"/slow needs a number of seconds, got {arg!r}") from exc
        async for event in _words(reply, delay, TextDelta):
            yield event
        output_tokens += len(reply.split())
        while True:
            try:
                steer = request.steers.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            input_tokens += len(steer.split())
            yield ItemBreak()
            answer = f"You said: {steer.strip()}"
            async for event in _words(answer, 0.0, TextDelta):
                yield event
            output_tokens += len(answer.split())
        yield Usage(input_tokens, output_tokens)
