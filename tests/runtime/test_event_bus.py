"""EventBus subscriptions: replay then live with no gap and no duplicate, since_seq, isolation between
threads, slow subscribers that are detached instead of slowing the turn, and the SSE chunks made of
the events a stream has ready together (web/sse.py)."""

from __future__ import annotations

import contextlib
import functools
import json

import trio

from runtime.store import EventDraft, records
from web.sse import CHUNK_BYTES, StreamRegistry, frame

from .helpers import collect_events, nth, stored_events, turn_completed, wait_turn_end

REAL_LIMIT = 10.0  # bound for the real-clock tests below


async def test_subscribers_joining_while_events_stream_get_every_event_exactly_once(rt, thread_id):
    # Real clock on purpose: subscribers attach and replay while the turn and the store's writer thread
    # keep appending, which virtual time would serialise.
    prompt = " ".join(f"w{i}" for i in range(1200))  # > 2 replay pages of events
    turn = await rt.start_turn(thread_id, prompt)
    streams: list[list] = []

    async def late_subscriber() -> None:
        streams.append(await collect_events(rt, thread_id, turn_completed(turn["id"]), limit=REAL_LIMIT))

    with trio.fail_after(REAL_LIMIT):
        async with trio.open_nursery() as nursery:
            main: list = []
            deltas = 0
            async with contextlib.aclosing(await rt.subscribe(thread_id, 0)) as stream:
                async for event in stream:
                    main.append(event)
                    if event.event == "item.delta":
                        deltas += 1
                        if deltas in (1, 50, 400, 900):
                            nursery.start_soon(late_subscriber)
                    if turn_completed(turn["id"])(event):
                        break
            streams.append(main)

    expected = [e.seq for e in await stored_events(rt, thread_id)]
    assert len(expected) > 2 * 500 and expected == sorted(set(expected))
    assert len(streams) == 5
    for events in streams:
        assert [e.seq for e in events] == expected
    assert rt.bus.subscriber_count == 0  # every subscription detached when its consumer left


async def test_events_committed_between_attach_and_replay_are_delivered_once(rt, thread_id, autojump_clock):
    turn = await rt.start_turn(thread_id, "/slow 10\none two three four five six seven eight")
    await collect_events(rt, thread_id, nth("item.delta", 2, turn["id"]))
    late = await rt.subscribe(thread_id, 0)
    # Two more deltas are committed before `late` reads anything: they reach it both from the store
    # replay and from its live buffer (if it attached already), and must come out once, in order.
    await collect_events(rt, thread_id, nth("item.delta", 4, turn["id"]))

    events = []
    async with contextlib.aclosing(late) as stream:
        async for event in stream:
            events.append(event)
            if turn_completed(turn["id"])(event):
                break

    assert [e.seq for e in events] == [e.seq for e in await stored_events(rt, thread_id)]
    assert sum(e.event == "item.delta" for e in events) == 10


async def test_since_seq_replays_only_later_events(rt, thread_id):
    turn = await rt.start_turn(thread_id, "one two three four five")
    everything = await collect_events(rt, thread_id, turn_completed(turn["id"]), limit=REAL_LIMIT)
    mid = everything[len(everything) // 2].seq

    later = await collect_events(rt, thread_id, turn_completed(turn["id"]), since_seq=mid, limit=REAL_LIMIT)

    assert [e.seq for e in later] == [e.seq for e in everything if e.seq > mid]
    assert len(later) < len(everything)


async def test_subscription_only_carries_its_own_threads_events(rt, thread_id):
    other = (await rt.create_thread())["id"]
    mine = await rt.start_turn(thread_id, "mine")
    theirs = await rt.start_turn(other, "theirs")

    events = await collect_events(rt, thread_id, turn_completed(mine["id"]), limit=REAL_LIMIT)
    await collect_events(rt, other, turn_completed(theirs["id"]), limit=REAL_LIMIT)

    assert {e.thread_id for e in events} == {thread_id}
    assert theirs["id"] not in {e.turn_id for e in events}


async def test_slow_subscriber_is_detached_without_blocking_the_turn_and_then_catches_up(
        open_runtime, autojump_clock):
    async with open_runtime(subscriber_buffer=4) as rt:
        tid = (await rt.create_thread())["id"]
        prompt = " ".join(f"word{i}" for i in range(48))  # a 50-word reply: > 50 events into a 4-event buffer
        async with contextlib.aclosing(await rt.subscribe(tid, 0)) as stalled:
            first = await stalled.__anext__()  # attached; now it stops reading
            assert first.event == "thread.started"
            assert rt.bus.subscriber_count == 1

            turn = await rt.start_turn(tid, prompt)
            # Another (reading) subscriber sees the turn finish while `stalled` reads nothing.
            end = (await collect_events(rt, tid, turn_completed(turn["id"])))[-1]

            assert end.payload["status"] == "completed"
            if rt.bus.polled:
                # PostgreSQL (several hosts): a stream reads the events table when woken and buffers nothing,
                # so a stalled one holds nothing up and is never detached.
                assert rt.bus.overflows == 0 and rt.bus.subscriber_count == 1
            else:
                assert rt.bus.overflows > 0
                assert rt.bus.subscriber_count == 0  # stalled was detached, not allowed to block the writer

            rest = []
            with trio.fail_after(5):
                async for event in stalled:
                    rest.append(event)
                    if turn_completed(turn["id"])(event):
                        break

        expected = [e.seq for e in await stored_events(rt, tid)]
        assert [first.seq] + [e.seq for e in rest] == expected
        assert sum(e.event == "item.delta" for e in rest) == 50


async def test_sse_sends_the_events_a_replay_page_holds_as_one_chunk_of_the_same_bytes(rt, thread_id):
    turn = await rt.start_turn(thread_id, " ".join(f"w{i}" for i in range(30)))
    await wait_turn_end(rt, thread_id, turn["id"])
    stored = await stored_events(rt, thread_id)
    assert sum(e.event == "item.delta" for e in stored) == 32  # "You said:" and the 30 words

    with trio.fail_after(REAL_LIMIT):
        async with contextlib.aclosing(StreamRegistry().frames(await rt.subscribe(thread_id, 0), 60.0)) as chunks:
            chunk = await chunks.__anext__()

    # One chunk, byte for byte the frames one by one, in seq order.
    assert chunk == b"".join(frame(e) for e in stored)
    assert rt.bus.subscriber_count == 0


async def test_sse_sends_the_events_one_write_published_as_one_chunk(rt, thread_id):
    registry = StreamRegistry()
    with trio.fail_after(REAL_LIMIT):
        async with contextlib.aclosing(registry.frames(await rt.subscribe(thread_id, 0), 60.0)) as chunks:
            started = await chunks.__anext__()
            assert started.startswith(b"id: ") and b"\nevent: thread.started\n" in started
            _, committed = await rt.store.write(events=[
                EventDraft(thread_id, "item.delta", {"delta": f" d{i}", "kind": "agent_message"}, "turn_x", "item_x")
                for i in range(5)])
            live = await chunks.__anext__()

    assert [e.seq for e in committed] == sorted(e.seq for e in committed)
    assert live == b"".join(frame(e) for e in committed)
    assert live.count(b"\nevent: item.delta\n") == 5
    assert rt.bus.subscriber_count == 0 and len(registry) == 0


async def test_sse_chunks_stop_at_chunk_bytes_and_keep_every_frame_in_order(rt, thread_id):
    text = "x" * 1000
    drafts = [EventDraft(thread_id, "item.delta", {"delta": f"{i} {text}", "kind": "agent_message"}, "turn_x", "item_x")
              for i in range(200)]  # ~210 KB of frames, all committed (and published) together
    _, committed = await rt.store.write(events=drafts)
    expected = b"".join(frame(e) for e in await stored_events(rt, thread_id))
    largest = max(len(frame(e)) for e in committed)

    chunks: list[bytes] = []
    with trio.fail_after(REAL_LIMIT):
        async with contextlib.aclosing(StreamRegistry().frames(await rt.subscribe(thread_id, 0), 60.0)) as stream:
            async for chunk in stream:
                chunks.append(chunk)
                if chunk.endswith(frame(committed[-1])):
                    break

    assert b"".join(chunks) == expected
    assert len(chunks) >= 4  # 210 KB in chunks of at most CHUNK_BYTES and one frame
    assert all(len(chunk) < CHUNK_BYTES + largest for chunk in chunks)
    assert all(chunk.startswith(b"id: ") and chunk.endswith(b"\n\n") for chunk in chunks)


async def test_sse_chunk_ends_with_thread_deleted_and_the_stream_ends(rt, thread_id):
    with trio.fail_after(REAL_LIMIT):
        async with contextlib.aclosing(StreamRegistry().frames(await rt.subscribe(thread_id, 0), 60.0)) as chunks:
            await chunks.__anext__()  # thread.started
            await rt.delete_thread(thread_id)
            rest = [chunk async for chunk in chunks]

    assert len(rest) == 1 and rest[0].count(b"\nevent: ") == 1
    assert b"\nevent: thread.deleted\n" in rest[0]
    assert rt.bus.subscriber_count == 0


# ---- replay of a long history (issue 16): encoded pages, bounded, handed over to live events ----------------

# Payloads whose stored text takes each path of web/sse.render_stored: plain ASCII (spliced as stored) and every
# kind of escape (decoded and encoded again), with JSON-significant and LIKE-significant characters.
ODD_PAYLOADS = [
    {"delta": " plain", "kind": "agent_message"},
    {"text": "d\u00e9j\u00e0 vu \U0001F600", "n": 1},
    {"text": "line\nbreak\r\tand \x01 control"},
    {"text": 'quote " and backslash \\ and slash /', "pct": "100% _x_"},
    {"f": 1.5, "big": 10**20, "neg": -0.0, "e": 1e16, "list": [1, None, True, {"k": []}], "empty": {}},
    {"lone": "smile \ud83d", "\ude00key": "v"},
    {},
]


async def test_a_replayed_page_is_byte_for_byte_the_frames_of_its_events(rt, thread_id):
    from web.sse import frame, render_stored

    drafts = [EventDraft(thread_id, "test.odd", payload, turn_id=("turn_x" if i % 2 else None),
                         item_id=("item_\u00e9" if i % 3 == 0 else None)) for i, payload in enumerate(ODD_PAYLOADS)]
    await rt.store.write(events=drafts)

    decoded = await rt.store.read(functools.partial(records.events_after, thread_id=thread_id, since_seq=0))
    (page,) = await rt.store.read(functools.partial(records.encoded_events_after, thread_id=thread_id, since_seq=0,
                                                    render=render_stored))

    assert len(decoded) == 1 + len(ODD_PAYLOADS) and (page.seq, page.count) == (decoded[-1].seq, len(decoded))
    assert frame(page) == page.data == b"".join(frame(event) for event in decoded)
    envelopes = [json.loads(line[6:]) for line in page.data.decode().split("\n") if line.startswith("data: ")]
    assert [e["payload"] for e in envelopes[1:]] == [
        {**p, "lone": "smile \ufffd", "\ufffdkey": "v"} if "lone" in p else p for p in
        [{k: v for k, v in p.items() if k != "\ude00key"} for p in ODD_PAYLOADS]]
    assert await rt.store.read(functools.partial(records.encoded_events_after, thread_id=thread_id,
                                                 since_seq=page.seq, render=render_stored)) == []


async def test_a_replayed_page_of_runs_of_events_sharing_fields_is_byte_for_byte_their_frames(rt, thread_id):
    """render_stored quotes the envelope's fields from thread_id to the payload's key once for each run of events
    that share them (an item's deltas): every change of one of them alone (turn, item, event name, to and from
    None), and an escaped payload inside a run, still gives each event its own fields."""
    from web.sse import render_stored

    plain, escaped = {"delta": " w"}, {"delta": "\u00e9t\u00e9 \n"}
    shapes = [  # (turn_id, item_id, event, payload)
        ("turn_a", "item_1", "item.delta", plain), ("turn_a", "item_1", "item.delta", plain),
        ("turn_a", "item_1", "item.completed", plain),  # the event name alone changes
        ("turn_a", "item_2", "item.completed", plain),  # the item alone
        ("turn_b", "item_2", "item.completed", plain),  # the turn alone
        ("turn_b", None, "item.completed", plain),  # the item to None
        (None, None, "item.completed", plain),  # the turn to None
        (None, "item_2", "item.completed", plain),  # the item from None
        ("turn_b", "item_2", "item.completed", plain),  # the turn from None
        ("turn_b", "item_2", "item.delta", plain), ("turn_b", "item_2", "item.delta", escaped),
        ("turn_b", "item_2", "item.delta", plain), ("turn_b", "item_2", "item.delta", plain),
        ("turn_b", "item_3", "item.delta", plain),
    ]
    await rt.store.write(events=[EventDraft(thread_id, event, {**payload, "i": i}, turn_id=turn_id, item_id=item_id)
                                 for i, (turn_id, item_id, event, payload) in enumerate(shapes)])

    decoded = await rt.store.read(functools.partial(records.events_after, thread_id=thread_id, since_seq=0))
    (page,) = await rt.store.read(functools.partial(records.encoded_events_after, thread_id=thread_id, since_seq=0,
                                                    render=render_stored))

    assert page.count == len(decoded) == 1 + len(shapes)
    assert page.data == b"".join(frame(event) for event in decoded)
    envelopes = [json.loads(line[6:]) for line in page.data.decode().split("\n") if line.startswith("data: ")]
    assert [(e.get("turn_id"), e.get("item_id"), e["event"], e["payload"]["i"]) for e in envelopes[1:]] == [
        (turn_id, item_id, event, i) for i, (turn_id, item_id, event, _) in enumerate(shapes)]
    assert {e["thread_id"] for e in envelopes} == {thread_id}


async def test_a_rendered_replay_reads_replay_pages_and_goes_live_after_the_first_short_one(rt, thread_id):
    """An SSE replay (pages rendered to bytes) reads records.REPLAY_PAGE events a page, more than a decoded
    replay's EVENT_PAGE: each page costs a thread hop, a read transaction and a pass through the web stack
    (issue 16 fifth pass). The first page shorter than REPLAY_PAGE is the last one stored, even when it is
    longer than EVENT_PAGE: the stream then takes live events from the bus without reading the store again."""
    from runtime.store import Event
    from web.sse import render_stored

    assert records.REPLAY_PAGE > records.EVENT_PAGE
    stored = 2 * records.REPLAY_PAGE + records.EVENT_PAGE + 7  # + thread.started: a last page > EVENT_PAGE
    for start in range(0, stored, 1000):
        await rt.store.write(events=[EventDraft(thread_id, "test.old", {"n": n})
                                     for n in range(start, min(stored, start + 1000))])
    last = (await stored_events(rt, thread_id))[-1].seq
    rendered: list[int] = []

    def render(tid: str, rows: list[tuple]) -> bytes:
        rendered.append(len(rows))
        return render_stored(tid, rows)

    reads = 0
    read = rt.store.read

    async def counted_read(fn, **kwargs):
        nonlocal reads
        reads += 1
        return await read(fn, **kwargs)

    rt.store.read = counted_read
    try:
        with trio.fail_after(REAL_LIMIT):
            async with contextlib.aclosing(await rt.subscribe(thread_id, 0, render=render)) as stream:
                reads = 0  # the pages' reads only (subscribing looks the thread up)
                pages = []
                while stream.last_seq < last:
                    pages.append(await stream.next())
                assert rendered == [p.count for p in pages] == [records.REPLAY_PAGE] * 2 + [records.EVENT_PAGE + 8]
                assert reads == 3
                _, live = await rt.store.write(events=[EventDraft(thread_id, "test.new", {"n": 0})])
                event = await stream.next()
    finally:
        del rt.store.read
    assert event.seq == live[0].seq
    if not rt.bus.polled:  # a polled stream (PostgreSQL) reads every event from the table, live ones too
        assert type(event) is Event and reads == 3


async def test_a_replay_longer_than_a_page_is_sent_in_page_chunks_and_hands_over_to_live_events(rt, thread_id):
    """A replay reads the store a page at a time (never the whole history), sends each page in one chunk,
    and events appended while it replays come once each, in order, after the stored ones."""
    from web.sse import StreamRegistry, render_stored

    stored = 3 * records.REPLAY_PAGE + 7
    for start in range(0, stored, 1000):
        await rt.store.write(events=[EventDraft(thread_id, "test.old", {"n": n})
                                     for n in range(start, min(stored, start + 1000))])
    expected = [e.seq for e in await stored_events(rt, thread_id)]
    registry = StreamRegistry()
    stream = await rt.subscribe(thread_id, 0, render=render_stored)
    chunks: list[bytes] = []
    appended = 0
    frames = registry.frames(stream, keepalive=REAL_LIMIT)
    with trio.fail_after(REAL_LIMIT):
        async with contextlib.aclosing(frames):
            async for chunk in frames:
                chunks.append(chunk)
                assert len(stream._pending) <= 1  # one page (records.REPLAY_PAGE events) in memory at most
                if len(chunks) == 2:  # mid-replay: more than a page of history still to read
                    _, live = await rt.store.write(events=[EventDraft(thread_id, "test.new", {"n": n})
                                                           for n in range(30)])
                    appended = len(live)
                    expected += [e.seq for e in live]
                if stream.last_seq >= expected[-1] and appended:
                    break

    body = b"".join(chunks)
    seqs = [int(line[4:]) for line in body.split(b"\n") if line.startswith(b"id: ")]
    assert seqs == expected and len(seqs) == stored + 1 + 30  # + thread.started; no gap, no duplicate
    assert body.count(b"event: test.new") == 30
    # The stored history went out a page per chunk, not an event per chunk.
    assert len(chunks) <= 4 + 30
    assert rt.bus.subscriber_count == 0
