"""The small protocol between an engine and a model backend.

A backend turns one request into an async stream of events. The engine owns everything else
(items, events, usage bookkeeping, interrupts): a backend only talks to its model. Cancelling the
iteration (an interrupt) must stop the backend promptly; it should not catch ``trio.Cancelled``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, AsyncIterator, Protocol, Union

import trio


@dataclasses.dataclass(frozen=True)
class ModelRequest:
    thread_id: str
    turn_id: str
    model: str
    mode: str
    system_prompt: str | None
    history: list[dict[str, Any]]
    prompt: str
    # Text the client steered into the running turn; the backend reads it when it can use it.
    steers: trio.MemoryReceiveChannel[str]


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
