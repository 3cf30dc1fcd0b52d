"""No stored event can make an SSE frame fail to encode (API.md, "Hardening rules"). The engine keeps
model text valid, but an event stored by an older version may hold a lone surrogate; ``frame`` repairs
it (U+FFFD) instead of raising on it, live and on every replay.
"""

from __future__ import annotations

import json

import httpx
import trio

from runtime.store import Event, EventDraft
from tests.conftest import E2E_LIMIT
from web.sse import frame

HIGH, LOW = "\ud83d", "\ude00"
FFFD = "\ufffd"


def _event(payload: dict) -> Event:
    return Event(seq=7, timestamp="2030-01-01T00:00:00.000Z", thread_id="thr_x", turn_id="turn_x",
                 item_id="item_x", event="item.delta", payload=payload)


def test_a_frame_repairs_a_lone_surrogate_instead_of_raising():
    data = frame(_event({"delta": f"smile {HIGH}", "kind": "agent_message", f"k{LOW}": "v"}))

    text = data.decode("utf-8")  # strict
    assert text.startswith("id: 7\nevent: item.delta\ndata: ") and text.endswith("\n\n")
    envelope = json.loads(text.split("data: ", 1)[1])
    assert envelope["payload"] == {"delta": f"smile {FFFD}", "kind": "agent_message", f"k{FFFD}": "v"}


def test_a_valid_frame_is_unchanged_utf8():
    data = frame(_event({"delta": "d\u00e9j\u00e0 \U0001F600", "kind": "agent_message"}))

    assert "d\u00e9j\u00e0 \U0001F600".encode() in data


async def read_frames(url: str, token: str, thread_id: str, until_seq: int) -> list[dict]:
    """The raw SSE stream, decoded as strict UTF-8 frame by frame, up to the event ``until_seq``."""
    envelopes: list[dict] = []
    buffer = b""
    with trio.fail_after(E2E_LIMIT):
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
            async with http.stream("GET", f"/v1/threads/{thread_id}/events", params={"since_seq": 0}) as response:
                assert response.status_code == 200
                async for piece in response.aiter_bytes():
                    buffer += piece
                    while b"\n\n" in buffer:
                        raw, buffer = buffer.split(b"\n\n", 1)
                        text = raw.decode("utf-8")
                        if text.startswith(":"):
                            continue
                        envelopes.append(json.loads(text.split("data: ", 1)[1]))
                        if envelopes[-1]["seq"] >= until_seq:
                            return envelopes
    raise AssertionError(f"stream ended after {[e['seq'] for e in envelopes]}")


async def test_a_stored_event_with_a_lone_surrogate_replays_over_sse(server, client):
    thread = await client.create_thread()
    _, [legacy] = await server.runtime.store.write(events=[EventDraft(
        thread["id"], "item.delta", {"delta": f"old {HIGH}", "kind": "agent_message"}, turn_id="turn_old")])
    _, [after] = await server.runtime.store.write(events=[EventDraft(
        thread["id"], "item.delta", {"delta": "after", "kind": "agent_message"}, turn_id="turn_old")])

    for _ in range(2):  # every replay, not only the first
        envelopes = await read_frames(server.url, server.token, thread["id"], after.seq)
        by_seq = {e["seq"]: e for e in envelopes}
        assert by_seq[legacy.seq]["payload"] == {"delta": f"old {FFFD}", "kind": "agent_message"}
        assert by_seq[after.seq]["payload"] == {"delta": "after", "kind": "agent_message"}
    assert (await client.health())["status"] == "ok"
