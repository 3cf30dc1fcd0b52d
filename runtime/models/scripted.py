"""The scripted model: deterministic, offline, and the default backend (see API.md).

It answers ``You said: <prompt>`` word by word. A first prompt line may hold one directive:
``/slow SECONDS``, ``/hang``, ``/fail MESSAGE`` or ``/think TEXT``. Steered text is answered after the
main reply with ``You said: <steer>``. Usage counts words: input is the history plus the prompt and
any steers, output is every word streamed (reasoning included).

Usage is reported as it grows, after every word (and before a ``/hang`` waits), not only at the end:
an interrupted turn is cancelled at the model's next checkpoint, and its usage is then the words sent
(history, prompt, the steers taken in) and streamed until that point. The first event of a reply is
its first word, so wrappers that act "after the first word" still can. A steer closes the item being
streamed (the engine does that), so the word after a steer starts the new item without its separating
space.
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


class _Reply:
    """One turn's running counts and the steers taken in so far (answered after the main reply)."""

    def __init__(self, request: ModelRequest) -> None:
        self.steers_rx = request.steers
        self.input_tokens = word_count(request.history) + len(request.prompt.split())
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
        directive, arg, rest = parse_directive(request.prompt)
        reply = _Reply(request)
        text = f"You said: {rest.strip()}".strip()
        delay = 0.0
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
