"""Tools a model backend may offer the model: a name, a JSON-schema description, and an async function.

A registry is empty unless tools are added; ``demo_registry()`` holds the one safe built-in demo tool,
``get_time``. A tool takes the model's arguments (a dict) and returns text. Whatever goes wrong inside a
tool (it raises, it is unknown, it runs past its timeout) becomes an error *result* the model is shown,
never an exception for the turn: the model may recover, and the turn only fails if the model does.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

import trio

from ..text import valid_text

# A tool call gets this long before its result becomes an error; generous for local tools, and it keeps
# a wedged tool from holding a turn forever (an interrupt cancels it sooner).
DEFAULT_TOOL_TIMEOUT = 30.0
# Results longer than this are cut: they are sent back to the model on every later request of the thread.
MAX_RESULT_CHARS = 16_000

ToolFunction = Callable[[dict[str, Any]], Awaitable[Any]]


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    # JSON schema of the arguments object (OpenAI's ``function.parameters``).
    parameters: dict[str, Any]
    run: ToolFunction


@dataclasses.dataclass(frozen=True)
class ToolContext:
    """Where a tool call runs: the thread it belongs to and the server's data dir."""

    thread_id: str
    data_dir: Path


@dataclasses.dataclass(frozen=True)
class ToolOutcome:
    content: str
    is_error: bool = False


class ToolRegistry:
    """Tools by name. ``call`` never raises for a tool's own failure (see the module docstring)."""

    def __init__(self, tools: Iterable[Tool] = (), *, timeout: float = DEFAULT_TOOL_TIMEOUT) -> None:
        self.timeout = timeout
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    @property
    def names(self) -> list[str]:
        return sorted(self._tools)

    def openai_tools(self) -> list[dict[str, Any]]:
        """The ``tools`` field of an OpenAI chat completion request."""
        return [
            {"type": "function",
             "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
            for t in self._tools.values()
        ]

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        """Run one tool, bounded by ``self.timeout``. Cancellation (an interrupt) propagates: the tool
        is abandoned mid-call and no result is produced."""
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(self.names) or "none"
            return ToolOutcome(f"Unknown tool '{name}' (available tools: {known})", is_error=True)
        try:
            with trio.fail_after(self.timeout):
                value = await tool.run(arguments)
        except trio.TooSlowError:
            return ToolOutcome(f"Tool '{name}' did not finish within {self.timeout:g} s", is_error=True)
        except Exception as exc:  # a tool's bug is the model's problem to read about, not the turn's
            return ToolOutcome(f"Tool '{name}' failed: {type(exc).__name__}: {exc}", is_error=True)
        # A tool's text goes back to the model and into the transcript: valid Unicode (runtime.text).
        content = valid_text(value) if isinstance(value, str) else json.dumps(value, default=str)
        if len(content) > MAX_RESULT_CHARS:
            content = content[: MAX_RESULT_CHARS - 1] + "…"
        return ToolOutcome(content)


async def get_time(arguments: dict[str, Any]) -> str:
    """The current UTC time as an ISO 8601 string, e.g. ``2025-01-31T12:00:00+00:00``. Takes no arguments."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


GET_TIME = Tool(
    name="get_time",
    description="Returns the current date and time in UTC as an ISO 8601 string.",
    parameters={"type": "object", "properties": {}, "additionalProperties": False},
    run=get_time,
)


def demo_registry() -> ToolRegistry:
    """A registry with the safe demo tool ``get_time`` (it reads the clock and nothing else)."""
    return ToolRegistry([GET_TIME])
