"""The store's writer after a commit: a big batch is published in slices, in order, and each slice's
requests are let go of within the slice's own step (issue 16, bench row 2: freeing a batch of 512 streamed
deltas at once was one step of up to ~0.4 ms that every op in the process waited behind); a request's
``done`` event is made only when someone asks for it."""

from __future__ import annotations

import weakref

from runtime.store import PUBLISH_SLICE, EventDraft, Store, WriteRequest

THREAD = ("INSERT INTO threads (id, created_at, updated_at, model, mode) VALUES ('thr_w', 't', 't', 'm', 'default')", ())


async def test_a_big_batch_is_published_in_order_and_each_slice_is_freed_in_its_own_step(tmp_path):
    count = 2 * PUBLISH_SLICE + 1
    refs: list[weakref.ref] = []
    published: list[int] = []
    alive_at: dict[int, list[bool]] = {}

    def publish(events) -> None:
        for event in events:
            index = event.payload["n"]
            published.append(index)
            if index % PUBLISH_SLICE == 0:  # the first request of a slice: what of the earlier slices lives?
                alive_at[index] = [ref() is not None for ref in refs[:index]]

    async with Store.open(tmp_path / "db.sqlite3", publish) as store:
        await store.write(statements=[THREAD])
        # Submitted in one step (submit never awaits): the writer takes them all as one batch.
        for index in range(count):
            refs.append(weakref.ref(store.submit(WriteRequest(
                events=[EventDraft("thr_w", "item.delta", {"n": index})], action="stream"))))
        await store.write()  # queued after them: returns once they are all published

    assert published == list(range(count))
    assert sorted(alive_at) == [0, PUBLISH_SLICE, 2 * PUBLISH_SLICE]
    # Nothing holds a published request but the writer: when a slice starts, every earlier one is gone.
    assert alive_at[PUBLISH_SLICE] == [False] * PUBLISH_SLICE
    assert alive_at[2 * PUBLISH_SLICE] == [False] * (2 * PUBLISH_SLICE)


async def test_a_write_nobody_waits_on_makes_no_event_and_a_late_waiter_finds_it_done(tmp_path):
    async with Store.open(tmp_path / "db.sqlite3", lambda events: None) as store:
        await store.write(statements=[THREAD])
        streamed = store.submit(WriteRequest(events=[EventDraft("thr_w", "item.delta", {"n": 0})], action="stream"))
        waited = store.submit(WriteRequest(events=[EventDraft("thr_w", "item.delta", {"n": 1})], action="stream"))
        await waited.done.wait()
        assert streamed._done is None  # finished without ever making its trio.Event
        assert streamed.done.is_set() and [e.payload for e in streamed.committed] == [{"n": 0}]
        late = WriteRequest()
        late.finish()
        assert late.done.is_set()


async def test_throttle_waits_while_the_backlog_exceeds_the_write_queue_and_not_otherwise(tmp_path):
    async with Store.open(tmp_path / "db.sqlite3", lambda events: None, write_queue=2) as store:
        await store.write(statements=[THREAD])

        def delta(n: int) -> WriteRequest:
            return store.submit(WriteRequest(events=[EventDraft("thr_w", "item.delta", {"n": n})], action="stream"))

        within = [delta(n) for n in range(2)]  # the writer has not run yet: a backlog of 2, not above 2
        await store.throttle()
        assert not any(r.done.is_set() for r in within)  # returned without waiting for the writer
        over = [delta(n) for n in range(2, 5)]  # a backlog of 5 (the first two may be taken meanwhile)
        await store.throttle()
        assert all(r.done.is_set() for r in within + over)  # waited until the writer took its batch
        await store.throttle()  # nothing queued: returns at once
