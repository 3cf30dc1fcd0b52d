"""The small protocol between an engine and a model backend.

A backend turns one request into an async stream of events. The engine owns everything else
(items, events, usage bookkeeping, interrupts): a backend only talks to its model. Cancelling the
iteration (an interrupt) must stop the backend promptly; it should not catch ``trio.Cancelled``.

Tools: a backend never runs a tool itself. The engine offers the tools in ``ModelRequest.tools`` and a
``run_tool`` callback; when the model asks for one, the backend yields the ToolCall, awaits
``run_tool(call)`` (the engine asks for approval, records the start, runs the tool, bounded) and yields
the ToolResult built from the ToolOutcome it returns. Cancellation while ``run_tool`` waits is an
interrupt: it propagates like any other.

Every backend's stream reaches the engine through ``ValidText``, so the rule "text from any model is
valid Unicode before it is stored or sent" (API.md) is kept in this one place, whatever the backend.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol, Union

import trio

from ..text import REPLACEMENT, has_surrogate, is_high_surrogate, valid_text, valid_value


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """A tool as the model is told about it: what the backend puts in its request (OpenAI's
    ``function`` object). ``parameters`` is the JSON schema of the input object."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ToolOutcome:
    """What a tool call came to, as the model reads it: the result text, and whether it is an error
    (the tool failed, was refused or denied). Never an exception: the model may recover."""

    content: str
    is_error: bool = False


@dataclasses.dataclass(frozen=True)
class ModelRequest:
    thread_id: str
    turn_id: str
    model: str
    mode: str
    system_prompt: str | None
    history: list[dict[str, Any]]
    # None: a continuation of a turn whose history already ends with tool results (the turn was
    # resumed after a restart); the model answers from the history alone.
    prompt: str | None
    # Text the client steered into the running turn; the backend reads it when it can use it.
    steers: trio.MemoryReceiveChannel[str]
    # The tools the model may call, and the engine's callback that runs one (see the module docstring).
    # A backend offers tools only when it has both.
    tools: tuple[ToolSpec, ...] = ()
    run_tool: Callable[[ToolCall], Awaitable[ToolOutcome]] | None = None

    @property
    def offered_tools(self) -> tuple[ToolSpec, ...]:
        """The tools to offer the model: none unless there is a ``run_tool`` to run them with."""
        return self.tools if self.run_tool is not None else ()


@dataclasses.dataclass(frozen=True)
class TextDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class ItemBreak:
    """Ends the item being streamed, so the next delta opens a new one."""


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """The model asked for a tool; becomes a ``tool_call`` item (a ``tool_use`` block)."""

    id: str
    name: str
    input: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """The tool's answer to the ToolCall with the same ``id``; completes that item (a ``tool_result`` block)."""

    id: str
    content: str
    is_error: bool = False


@dataclasses.dataclass(frozen=True)
class Retrying:
    """The backend is retrying the model request (before any output); recorded in item metadata."""

    attempt: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Truncated:
    """The model stopped at its token limit, not because it had finished; the item it cut off is
    recorded with ``metadata.truncated = true`` so a client can tell a short answer from a cut one."""


@dataclasses.dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int


ModelEvent = Union[TextDelta, ReasoningDelta, ItemBreak, ToolCall, ToolResult, Retrying, Truncated, Usage]


class ModelError(Exception):
    """The model failed the turn; the message is shown to the client as the turn's error."""


class ModelBackend(Protocol):
    name: str

    def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]: ...


class ValidText:
    """A backend's event stream in which every text is valid Unicode (see ``runtime.text``).

    A delta that ends in a high surrogate is held back until the next event: when that event is a
    delta of the same kind starting with the low half, the two are joined into one character (a server
    that splits an emoji's UTF-16 pair across two chunks); when it is anything else, or the stream
    ends, the held half is yielded as U+FFFD first. Every other lone surrogate, in deltas, tool call
    names and inputs, tool results, retry reasons and ModelError messages, becomes U+FFFD.

    Cancellation (an interrupt) or a ModelError can end the stream while a half is held; the engine
    then calls ``flush`` and appends what it returns to the item the half belonged to. Closing this
    iterator closes the backend's stream.
    """

    def __init__(self, events: AsyncIterator[ModelEvent]) -> None:
        self._events = events
        self._ready: collections.deque[ModelEvent] = collections.deque()
        self._held: TextDelta | ReasoningDelta | None = None
        self._ended = False

    def __aiter__(self) -> "ValidText":
        return self

    async def __anext__(self) -> ModelEvent:
        while not self._ready:
            if self._ended:
                raise StopAsyncIteration
            try:
                event = await self._events.__anext__()
            except StopAsyncIteration:
                self._ended = True
                held = self.flush()
                if held is None:
                    raise
                return held
            except ModelError as exc:
                message = str(exc)
                if has_surrogate(message):
                    raise ModelError(valid_text(message)) from exc
                raise
            self._take(event)
        return self._ready.popleft()

    def flush(self) -> TextDelta | ReasoningDelta | None:
        """The held first half of a pair, as a U+FFFD delta of its kind; None when nothing is held."""
        held, self._held = self._held, None
        return None if held is None else type(held)(REPLACEMENT)

    async def aclose(self) -> None:
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()

    def _take(self, event: ModelEvent) -> None:
        if isinstance(event, (TextDelta, ReasoningDelta)):
            text = event.text
            if self._held is not None:
                if type(self._held) is type(event):
                    text = self._held.text + text
                    self._held = None
                else:
                    self._ready.append(self.flush())  # type: ignore[arg-type]
            if text and is_high_surrogate(text[-1]):
                # Possibly the first half of a pair whose second half is in the next chunk.
                self._held = type(event)(text[-1])
                text = text[:-1]
            if text:
                fixed = valid_text(text)
                self._ready.append(event if fixed is event.text else type(event)(fixed))
            return
        held = self.flush()
        if held is not None:
            self._ready.append(held)
        if isinstance(event, ToolCall):
            event = ToolCall(valid_text(event.id), valid_text(event.name), valid_value(event.input))
        elif isinstance(event, ToolResult):
            event = ToolResult(valid_text(event.id), valid_text(event.content), event.is_error)
        elif isinstance(event, Retrying):
            event = Retrying(event.attempt, valid_text(event.reason))
        self._ready.append(event)
