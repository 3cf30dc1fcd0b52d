"""No stored event can make an SSE frame fail to encode (API.md, "Hardening rules"). The engine keeps
model text valid, but an event stored by an older version may hold a lone surrogate; ``frame`` repairs
it (U+FFFD) instead of raising on it, live and on every replay.

Issue 16: an event is encoded once (orjson), for the store and every subscriber; the frames stay the
stdlib's bytes (the JSON the stdlib made before), live and replayed.
"""

from __future__ import annotations

import functools
import json

import httpx
import trio

from runtime.store import Event, EventDraft, encode_payload, records
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


def stdlib_frame(event: Event) -> bytes:
    """The frame as it was made before issue 16 (the stdlib's JSON of the envelope): the reference."""
    data = json.dumps(event.envelope(), separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.seq}\nevent: {event.event}\ndata: {data}\n\n".encode()


PAYLOADS = [
    {"delta": " word", "kind": "agent_message"},
    {"delta": "d\u00e9j\u00e0 \U0001F600 \u2028 \u4e2d", "kind": "agent_reasoning"},
    {"delta": 'quote " back \\ slash / tab \t nl \n cr \r ctl \x01\x1f del \x7f', "kind": "agent_message"},
    {"status": "completed", "usage": {"input_tokens": 12, "output_tokens": 2**62}, "n": -7, "ok": True, "no": False},
    {"kind": "tool_call", "text": "t", "metadata": {"input": {"a": [1, 2.5, 1e+20, [], {}], "b": "\u00e9"}}},
    # What orjson would write differently, which the stdlib's way writes: NaN, None, beyond 64 bits, a key
    # that is not a string (the stdlib writes it as a string).
    {"value": float("nan"), "inf": float("inf")},
    {"status": "completed", "error": None},
    {"big": 2**70, "neg": -(2**64)},
    {1: "int key", "k": "v"},
]


def test_every_frame_is_the_stdlib_frame_byte_for_byte():
    for payload in PAYLOADS:
        data, text = encode_payload(payload)
        from_writer = Event(7, "2030-01-01T00:00:00.000Z", "thr_x", "turn_x", None, "item.delta", payload, data)
        from_replay = Event(7, "2030-01-01T00:00:00.000Z", "thr_x", "turn_x", None, "item.delta", json.loads(text))
        assert frame(from_writer) == stdlib_frame(from_writer), payload
        assert frame(from_replay) == stdlib_frame(from_replay), payload


def test_a_float_orjson_spells_otherwise_means_the_same_number():
    event = Event(7, "2030-01-01T00:00:00.000Z", "thr_x", None, None, "x", {"small": 1e-05, "list": [3e-7]})
    envelope = json.loads(frame(event).decode().split("data: ", 1)[1])
    assert envelope == json.loads(stdlib_frame(event).decode().split("data: ", 1)[1])
    assert envelope["payload"] == {"small": 1e-05, "list": [3e-7]}


def test_an_event_is_encoded_once_for_the_store_and_every_subscriber():
    payload = {"delta": "d\u00e9j\u00e0", "kind": "agent_message"}
    data, text = encode_payload(payload)
    assert data is not None and text == data.decode()  # the stored text is those bytes (UTF-8, not escaped)
    event = Event(7, "2030-01-01T00:00:00.000Z", "thr_x", "turn_x", "item_x", "item.delta", payload, data)
    first, second = frame(event), frame(event)
    assert first == second == stdlib_frame(event)
    assert event.envelope_json is event.envelope_json  # made once, for every subscriber
    assert b'"payload":' + data + b"}" in first  # the stored bytes, not encoded again


def test_a_payload_the_fast_way_declines_is_stored_as_before():
    for payload in ({"delta": f"x {HIGH}"}, {"v": float("nan")}, {"big": 2**70}):
        data, text = encode_payload(payload)
        assert data is None
        assert text == json.dumps(payload, separators=(",", ":"))  # ASCII, a lone surrogate escaped: as stored before
    assert encode_payload({"delta": f"x {HIGH}"})[1] == '{"delta":"x \\ud83d"}'


async def raw_frames(url: str, token: str, thread_id: str, until_seq: int, started: trio.Event | None = None) -> bytes:
    """The SSE stream's frames from since_seq=0 up to and including the event ``until_seq`` (0: up to the
    first turn.completed), as the bytes on the wire (keepalive comments left out)."""
    buffer, frames = b"", []
    with trio.fail_after(E2E_LIMIT):
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
            async with http.stream("GET", f"/v1/threads/{thread_id}/events", params={"since_seq": 0}) as response:
                assert response.status_code == 200
                if started is not None:
                    started.set()
                async for piece in response.aiter_bytes():
                    buffer += piece
                    while b"\n\n" in buffer:
                        raw, buffer = buffer.split(b"\n\n", 1)
                        if raw.startswith(b":"):
                            continue
                        frames.append(raw + b"\n\n")
                        seq = int(raw.split(b"\n", 1)[0].removeprefix(b"id: "))
                        if seq == until_seq or (not until_seq and b"\nevent: turn.completed\n" in raw):
                            return b"".join(frames)
    raise AssertionError("the stream ended early")


async def test_live_and_replayed_frames_are_the_same_bytes_as_the_stdlib_frames(server, client):
    thread = await client.create_thread()
    text = 'd\u00e9j\u00e0 vu \U0001F600 "quoted" back\\slash \u2028 ctl\x01 \u4e2d\u6587'
    live: list[bytes] = []
    async with trio.open_nursery() as nursery:
        connected = trio.Event()

        async def reader() -> None:
            live.append(await raw_frames(server.url, server.token, thread["id"], 0, connected))

        nursery.start_soon(reader)
        await connected.wait()
        await client.start_turn(thread["id"], text)

    stored = []
    since = 0
    while True:
        page = await server.runtime.store.read(functools.partial(records.events_after, thread_id=thread["id"],
                                                                 since_seq=since))
        stored += page
        if len(page) < records.EVENT_PAGE:
            break
        since = page[-1].seq
    assert stored[-1].event == "turn.completed"
    replayed = await raw_frames(server.url, server.token, thread["id"], stored[-1].seq)

    expected = b"".join(stdlib_frame(event) for event in stored)
    assert live[0] == replayed == expected
    assert "d\u00e9j\u00e0".encode() in expected and b"\\u0001" in expected
    assert (await client.health())["status"] == "ok"


# Timestamps for render_stored's page check (issue 16 third pass): the writers' ISO 8601, then one with each kind
# of character json's quoting escapes or that lies outside the bare set (quote, backslash, control, DEL,
# non-ASCII, a lone surrogate), each in a page of plain ones.
PLAIN_STAMP = "2030-01-01T00:00:00.000Z"
ODD_STAMPS = ['2030"01', "2030\\01", "2030\x0101", "2030\n01", "2030\x7f01", "2030-\u00e9", f"2030{HIGH}", " ", ""]


def _rows(stamps: list[str], payloads: list[str]) -> list[tuple]:
    return [(seq, stamp, "turn_x" if seq % 2 else None, "item_x", "item.delta", payload)
            for seq, (stamp, payload) in enumerate(zip(stamps, payloads), start=1)]


def _frames_one_by_one(rows: list[tuple]) -> bytes:
    return b"".join(frame(Event(seq, stamp, "thr_x", turn_id, item_id, event, json.loads(payload)))
                    for seq, stamp, turn_id, item_id, event, payload in rows)


def test_a_page_whose_timestamps_need_quoting_renders_each_as_its_own_frame():
    """render_stored checks a page's timestamps and payloads once; a page with one timestamp json quotes otherwise
    than by adding quotes, or one escaped payload, still gives every event exactly its own frame."""
    from web.sse import render_stored

    plain = encode_payload({"delta": " w"})[1]  # the stored text
    for odd in ODD_STAMPS:
        rows = _rows([PLAIN_STAMP, odd, PLAIN_STAMP], [plain] * 3)
        assert render_stored("thr_x", rows) == _frames_one_by_one(rows), odd
    # Stored texts the envelope's encoder would not write: an escape, or a line break (JSON whitespace).
    for odd in (json.dumps({"t": "\u00e9"}), '{"t":\n"a"}', '{"t":\r"a"}'):
        rows = _rows([PLAIN_STAMP] * 3, [plain, odd, plain])
        assert render_stored("thr_x", rows) == _frames_one_by_one(rows), odd
    rows = _rows([PLAIN_STAMP] * 3, [plain] * 3)
    data = render_stored("thr_x", rows)
    assert data == _frames_one_by_one(rows) and data.count(f'"timestamp":"{PLAIN_STAMP}"'.encode()) == 3
