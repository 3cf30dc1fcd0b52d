"""Fixtures for the model backend tests.

Test policy: the fake OpenAI server runs on a real loopback socket, so those tests use the real clock
and bound every wait with ``trio.fail_after(LIMIT)``; timeouts and backoffs they exercise are made
small (a 0.5 s read timeout, 10 ms backoff). The backoff schedule itself is checked on trio's MockClock
through the ``http_client`` seam with an in-memory transport, where no socket is involved.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import trio

from runtime.models.base import ModelError, ModelEvent, ModelRequest, ToolCall, ToolOutcome, ToolSpec
from runtime.models.openai_compat import OpenAICompatModel
from runtime.models.tools import ToolContext, ToolRegistry

from .fake_openai import FakeOpenAI

# Upper bound on any single wait of a socket test; generous for a busy CI machine, never a sync device.
LIMIT = 10.0
API_KEY = "sk-test-SECRET-0123456789"


@pytest.fixture
async def fake(nursery) -> FakeOpenAI:
    server = FakeOpenAI()
    await nursery.start(server.serve)
    return server


def make_model(fake: FakeOpenAI, **overrides: Any) -> OpenAICompatModel:
    options: dict[str, Any] = {"api_key": API_KEY, "read_timeout": 5.0, "backoff_base": 0.01, "backoff_max": 0.05}
    options.update(overrides)
    base_url = options.pop("base_url", fake.base_url)
    model_name = options.pop("model_name", "fake-model")
    return OpenAICompatModel(base_url, model_name, **options)


def make_request(prompt: str | None = "Hello?", *, history: list[dict[str, Any]] | None = None,
                 system_prompt: str | None = None, steers: list[str] = (), tools: tuple[ToolSpec, ...] = (),
                 run_tool: Any = None) -> ModelRequest:
    send, receive = trio.open_memory_channel[str](math.inf)
    for steer in steers:
        send.send_nowait(steer)
    return ModelRequest(thread_id="thr_test", turn_id="turn_test", model="fake-model", mode="default",
                        system_prompt=system_prompt, history=history or [], prompt=prompt, steers=receive,
                        tools=tools, run_tool=run_tool)


class FakeRunTool:
    """The engine's side of a tool call, faked: records each ToolCall it is handed and answers with
    ``outcome`` (a ToolOutcome, or a function of the call), after ``gate`` is set when one is given."""

    def __init__(self, outcome: ToolOutcome | Any, gate: trio.Event | None = None) -> None:
        self.outcome = outcome
        self.gate = gate
        self.calls: list[ToolCall] = []
        self.waiting = trio.Event()  # set once a call is waiting for the gate

    async def __call__(self, call: ToolCall) -> ToolOutcome:
        self.calls.append(call)
        if self.gate is not None:
            self.waiting.set()
            await self.gate.wait()
        return self.outcome(call) if callable(self.outcome) else self.outcome


def registry_runner(registry: ToolRegistry, data_dir: Path, thread_id: str = "thr_test") -> Any:
    """A run_tool that runs calls straight in ``registry`` (no approval): the engine's part, minus the
    approvals and the records."""
    async def run_tool(call: ToolCall) -> ToolOutcome:
        return await registry.call(call.name, call.input, ToolContext(thread_id, data_dir))
    return run_tool


async def run_stream(model: OpenAICompatModel, request: ModelRequest) -> list[ModelEvent]:
    """Every event of one turn; raises what the stream raises."""
    events: list[ModelEvent] = []
    with trio.fail_after(LIMIT):
        async for event in model.stream(request):
            events.append(event)
    return events


async def run_failing(model: OpenAICompatModel, request: ModelRequest) -> tuple[list[ModelEvent], ModelError]:
    """The events a failing turn yielded before its ModelError, and the error."""
    events: list[ModelEvent] = []
    with pytest.raises(ModelError) as caught:
        with trio.fail_after(LIMIT):
            async for event in model.stream(request):
                events.append(event)
    return events, caught.value
