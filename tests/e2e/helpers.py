"""Helpers for end-to-end tests: wait for events over the real SSE stream, never by sleeping."""

from __future__ import annotations

from functools import partial
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from runtime import RuntimeConfig
from runtime.models.tools import demo_registry
from tests import support
from tests.conftest import E2E_LIMIT, LiveServer
from web.cli import run_server
from web.client import ApiError, AsyncClient
from web.settings import ServerSettings


async def start_tool_server(nursery: trio.Nursery, data_dir: Path, *, settings: dict[str, Any] | None = None,
                            **config: Any) -> LiveServer:
    """``tests.conftest.start_server`` with the demo tools offered (what ``serve --tools demo`` sets up);
    ``config``: more RuntimeConfig fields (``approval_timeout``, ``model_factory``...)."""
    server_settings = ServerSettings(**{"host": "127.0.0.1", "port": 0, "data_dir": data_dir,
                                        "auth_token": "test-token", **(settings or {})})
    shutdown = trio.Event()
    runtime_config = RuntimeConfig(**{"data_dir": data_dir, "tools": demo_registry(),
                                      "store_url": support.store_url_for(data_dir), **config})
    running = await nursery.start(partial(run_server, server_settings, runtime_config, shutdown=shutdown))
    return LiveServer(running, data_dir, shutdown)


async def collect_until(client: AsyncClient, thread_id: str, predicate, since_seq: int = 0) -> list[dict[str, Any]]:
    """Read the thread's SSE stream until ``predicate(event)`` holds; returns every event read."""
    seen: list[dict[str, Any]] = []
    with trio.fail_after(E2E_LIMIT):
        async for event in client.events(thread_id, since_seq=since_seq):
            seen.append(event)
            if predicate(event):
                return seen
    raise AssertionError("event stream ended early")


async def wait_turn_end(client: AsyncClient, thread_id: str, turn_id: str) -> dict[str, Any]:
    events = await collect_until(
        client, thread_id, lambda e: e["event"] == "turn.completed" and e.get("turn_id") == turn_id)
    return events[-1]


def turn_of(detail: dict[str, Any], turn_id: str) -> dict[str, Any]:
    return next(t for t in detail["turns"] if t["id"] == turn_id)


async def api_error(call, status: int, code: str, *fragments: str) -> ApiError:
    """Await ``call``, which must fail with ``status`` and ``code`` and a message holding every fragment."""
    with pytest.raises(ApiError) as info:
        await call
    assert (info.value.status, info.value.code) == (status, code), info.value
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    return info.value


async def stream_from(url: str, token: str, thread_id: str, last_event_id: int, turn_id: str) -> list[dict[str, Any]]:
    """Reconnect as a browser's EventSource does: the header ``Last-Event-ID``, no query; read until the
    turn's end. Returns the events (seq, event, turn_id, item_id, payload)."""
    seen: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": str(last_event_id)}
    event: dict[str, Any] = {}
    with trio.fail_after(E2E_LIMIT):
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(None, connect=10)) as http:
            async with http.stream("GET", f"/v1/threads/{thread_id}/events") as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("id: "):
                        event["id"] = int(line[4:])
                    elif line.startswith("data: "):
                        event["data"] = json.loads(line[6:])
                    elif line == "" and "data" in event:
                        data = event.pop("data")
                        assert data["seq"] == event.pop("id")  # the SSE id is the event's seq
                        seen.append(data)
                        if data["event"] == "turn.completed" and data.get("turn_id") == turn_id:
                            return seen
    raise AssertionError("event stream ended early")


def comparable(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Events as comparable tuples (seq, event, turn_id, item_id, payload as canonical JSON)."""
    return [(e["seq"], e["event"], e.get("turn_id"), e.get("item_id"), json.dumps(e["payload"], sort_keys=True))
            for e in events]
