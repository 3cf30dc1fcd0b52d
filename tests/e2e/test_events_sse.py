"""SSE: replay then live with no gap or duplicate, Last-Event-ID, keepalives, disconnects."""

from __future__ import annotations

import contextlib

import httpx
import pytest
import trio

from tests.conftest import E2E_LIMIT, start_server
from tests.support import ThreadGuard, worker_limiters
from tests.e2e.helpers import collect_until
from web.client import ApiError, AsyncClient, SseParser


async def _stored_seqs(client, thread_id):
    return [e["seq"] async for e in _replay_all(client, thread_id)]


async def _replay_all(client, thread_id):
    detail = await client.get_thread(thread_id)
    latest = detail["latest_seq"]
    with trio.fail_after(E2E_LIMIT):
        async for event in client.events(thread_id):
            yield event
            if event["seq"] >= latest:
                return


async def test_replay_then_live_has_no_gap_while_a_turn_streams(client, server):
    thread = await client.create_thread()
    turn = await client.start_turn(thread["id"], "/slow 0.5\n" + " ".join(f"w{i}" for i in range(40)))
    # Subscribe mid-stream: part of the turn is already stored, the rest arrives live.
    await collect_until(client, thread["id"], lambda e: e["event"] == "item.delta")
    events = await collect_until(client, thread["id"],
                                 lambda e: e["event"] == "turn.completed" and e.get("turn_id") == turn["id"])
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))
    assert seqs == await _stored_seqs(client, thread["id"])
    deltas = "".join(e["payload"]["delta"] for e in events if e["event"] == "item.delta")
    assert deltas == "You said: " + " ".join(f"w{i}" for i in range(40))


async def test_since_seq_and_last_event_id_replay_only_later_events(client, server):
    thread = await client.create_thread()
    turn = await client.start_turn(thread["id"], "one two three")
    all_events = await collect_until(client, thread["id"], lambda e: e["event"] == "turn.completed")
    middle = all_events[3]["seq"]
    later = await collect_until(client, thread["id"], lambda e: e["event"] == "turn.completed", since_seq=middle)
    assert [e["seq"] for e in later] == [e["seq"] for e in all_events if e["seq"] > middle]

    headers = {"Authorization": f"Bearer {server.token}", "Last-Event-ID": str(middle)}
    parser = SseParser()
    got = []
    with trio.fail_after(E2E_LIMIT):
        async with httpx.AsyncClient(base_url=server.url) as http:
            async with http.stream("GET", f"/v1/threads/{thread['id']}/events", headers=headers) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event:
                        got.append(event["seq"])
                        if event["event"] == "turn.completed":
                            break
    assert got == [e["seq"] for e in later]
    assert turn["id"] == all_events[-1]["turn_id"]


async def test_frames_have_id_event_and_data_lines(client, server):
    thread = await client.create_thread()
    with trio.fail_after(E2E_LIMIT):
        async with httpx.AsyncClient(base_url=server.url) as http:
            async with http.stream("GET", f"/v1/threads/{thread['id']}/events",
                                   params={"token": server.token}) as response:
                lines = []
                async for line in response.aiter_lines():
                    lines.append(line)
                    if line == "":
                        break
    assert lines[0] == "id: 1" or lines[0].startswith("id: ")
    assert lines[1] == "event: thread.started"
    assert lines[2].startswith("data: {") and '"event":"thread.started"' in lines[2]


async def test_unknown_thread_is_404_before_the_stream_starts(client):
    with pytest.raises(ApiError) as info:
        async for _ in client.events("thr_nope"):
            pass
    assert info.value.status == 404


# The keepalive period of the quiet-stream test, in virtual seconds (MockClock): any value works there; this
# one is well inside E2E_LIMIT for the two periods the test waits, and below httpx's 5 s read timeout.
KEEPALIVE = 2.0


async def test_keepalive_comment_on_a_quiet_stream(nursery, tmp_path, autojump_clock):
    """A quiet stream gets ``: keepalive`` comments, one period apart, and stays open: an event after them
    still arrives on it. (Reading until the comment alone also passed when the server ended the stream.)

    On MockClock (the server runs in this trio run, so its timers are virtual): time moves only when the
    server and the client are both idle, never while a store thread works (ThreadGuard). So the first
    comment comes exactly one period after the stream opened, after the replayed event, whatever the load
    (on the real clock, with a short period, a slow replay read let a comment go first)."""
    guard = ThreadGuard(autojump_clock)
    trio.lowlevel.add_instrument(guard)  # stays for the whole run: the server's shutdown uses threads too
    live = await start_server(nursery, tmp_path / "d", sse_keepalive=KEEPALIVE)
    guard.limiters.extend(worker_limiters(live.runtime)[1:])
    async with live.client() as c:
        thread = await c.create_thread()
        lines: list[tuple[float, str]] = []  # (virtual seconds since the stream opened, line)
        with trio.fail_after(E2E_LIMIT):
            async with httpx.AsyncClient(base_url=live.url, headers={"Authorization": "Bearer test-token"}) as http:
                async with http.stream("GET", f"/v1/threads/{thread['id']}/events") as response:
                    opened = trio.current_time()
                    stream = response.aiter_lines()
                    async for line in stream:
                        lines.append((trio.current_time() - opened, line))
                        if [text for _, text in lines].count(": keepalive") == 2:  # the stream outlived a period
                            break
                    # Still open: an event published after the keepalives is delivered on the same stream.
                    await c.update_thread(thread["id"], title="after the keepalives")
                    parser, event = SseParser(), None
                    async for line in stream:
                        lines.append((trio.current_time() - opened, line))
                        if (event := parser.feed(line)) is not None:
                            break
    texts = [text for _, text in lines]
    assert texts.count(": keepalive") == 2, f"the stream ended instead: {lines}"
    assert event is not None, f"the stream ended after the keepalives: {lines}"
    assert texts[:3] == ["id: 1", "event: thread.started", texts[2]] and texts[2].startswith("data: {")
    assert all(at == 0 for at, _ in lines[:3])  # the replay at once, before any comment
    assert [at for at, text in lines if text == ": keepalive"] == [KEEPALIVE, 2 * KEEPALIVE]
    assert event["event"] == "thread.updated" and event["payload"]["changes"] == {"title": "after the keepalives"}
    assert event["seq"] > 1
    live.shutdown.set()


async def test_client_disconnect_frees_the_subscription(client, server):
    thread = await client.create_thread()
    bus = server.runtime.bus
    async with AsyncClient(server.url, server.token) as other:
        with trio.fail_after(E2E_LIMIT):
            async with contextlib.aclosing(other.events(thread["id"])) as stream:
                async for _ in stream:
                    assert bus.subscriber_count == 1
                    break  # aclosing closes the HTTP response: the client disconnects
    with trio.fail_after(E2E_LIMIT):
        await bus.wait_for_subscribers(lambda n: n == 0)
    assert bus.subscriber_count == 0
