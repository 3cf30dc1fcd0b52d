"""Helpers for end-to-end tests: wait for events over the real SSE stream, never by sleeping."""

from __future__ import annotations

from typing import Any

import trio

from tests.conftest import E2E_LIMIT
from web.client import AsyncClient


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
