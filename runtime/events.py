"""EventBus: fan committed events out to subscribers, and replay-then-live subscriptions.

``publish`` is called by the store's writer after each commit and never blocks: every subscriber has
a bounded buffer, and one that falls behind is detached rather than allowed to slow the writer, the
engines or other subscribers. ``EventStream`` hides that from its consumer: a detached stream
catches up from the store and re-attaches, so it has no gap and no duplicate either way.
"""

from __future__ import annotations

import collections
import contextlib
import functools

import trio

from .errors import StorageError
from .store import Event, Store, records


class Subscription:
    __slots__ = ("thread_id", "send", "receive", "overflowed")

    def __init__(self, thread_id: str, capacity: int) -> None:
        self.thread_id = thread_id
        self.send, self.receive = trio.open_memory_channel[Event](capacity)
        self.overflowed = False


# Deleted threads whose ``thread.deleted`` event the bus remembers, for a stream that was catching up
# from the store when it was published (the event is in no store: it is deleted with the thread).
DELETED_REMEMBERED = 1024


class EventBus:
    def __init__(self, buffer: int) -> None:
        self._buffer = buffer
        self._subs: dict[str, set[Subscription]] = {}
        self._deleted: collections.OrderedDict[str, Event] = collections.OrderedDict()
        self.overflows = 0
        self._changed = trio.Event()
        # Several hosts on one PostgreSQL (runtime/cluster/listener.py): events of a thread may be written
        # by any host, so a stream cannot trust the order in which they reach this process. ``polled``
        # streams treat every publication (local, or another host's notification) as a wake-up only and
        # read the events table after their position (the seq rule makes that read gap-free).
        self.polled = False
        self._wakes: dict[str, trio.Event] = {}
        self._polled_streams = 0

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values()) + self._polled_streams

    def wake(self, thread_id: str | None) -> None:
        """Wake the polled streams of ``thread_id`` (None: of every thread) to re-read the store."""
        if thread_id is None:
            wakes, self._wakes = self._wakes, {}
            for event in wakes.values():
                event.set()
            return
        event = self._wakes.pop(thread_id, None)
        if event is not None:
            event.set()

    def wake_event(self, thread_id: str) -> trio.Event:
        """The event the next ``wake(thread_id)`` sets (take it BEFORE reading, so no wake is missed)."""
        event = self._wakes.get(thread_id)
        if event is None:
            event = self._wakes[thread_id] = trio.Event()
        return event

    async def wait_for_subscribers(self, predicate) -> None:
        """Wait until ``predicate(subscriber_count)`` holds (lets shutdown and tests wait without polling)."""
        while not predicate(self.subscriber_count):
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def attach(self, thread_id: str) -> Subscription:
        sub = Subscription(thread_id, self._buffer)
        self._subs.setdefault(thread_id, set()).add(sub)
        self._notify()
        return sub

    def detach(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.thread_id)
        if subs is not None and sub in subs:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.thread_id]
            self._notify()
        sub.send.close()

    def deleted(self, thread_id: str) -> Event | None:
        """The ``thread.deleted`` event of a thread deleted while this process ran (recent ones only)."""
        return self._deleted.get(thread_id)

    def publish(self, events: list[Event]) -> None:
        if self.polled:
            for event in events:
                if event.event == "thread.deleted":
                    self._deleted[event.thread_id] = event
                    while len(self._deleted) > DELETED_REMEMBERED:
                        self._deleted.popitem(last=False)
                self.wake(event.thread_id)
            return
        for event in events:
            if event.event == "thread.deleted":
                self._thread_deleted(event)
                continue
            subs = self._subs.get(event.thread_id)
            if not subs:
                continue
            for sub in tuple(subs):
                try:
                    sub.send.send_nowait(event)
                except trio.WouldBlock:
                    sub.overflowed = True
                    self.overflows += 1
                    self.detach(sub)
                except trio.BrokenResourceError:
                    self.detach(sub)

    def _thread_deleted(self, event: Event) -> None:
        """Hand every stream of the thread its last event and end it (a full buffer gets it from
        ``deleted`` when it catches up)."""
        self._deleted[event.thread_id] = event
        while len(self._deleted) > DELETED_REMEMBERED:
            self._deleted.popitem(last=False)
        for sub in tuple(self._subs.get(event.thread_id, ())):
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                sub.overflowed = True
            except trio.BrokenResourceError:
                pass
            self.detach(sub)

    def subscribe(self, store: Store, thread_id: str, since_seq: int,
                  render: "records.Render | None" = None) -> "EventStream | PolledStream":
        """``render``: stored events come as ``records.EncodedEvents`` pages made by it (for a consumer that only
        sends them on; see records.encoded_events_after); live ones are Events either way."""
        if self.polled:
            return PolledStream(self, store, thread_id, since_seq, render)
        return EventStream(self, store, thread_id, since_seq, render)


class EventStream:
    """Every event of one thread with ``seq > since_seq``: stored ones, then live ones.

    Attaching to the bus before reading the store is what closes the gap: anything committed after
    the attach is in the buffer, anything before it is in the store, and seqs already returned are
    skipped. ``next`` is cancellation-safe (a cancelled call loses nothing; the next call resumes),
    so callers may wrap it in timeouts. Use as an async iterator, and ``close`` it when done.
    """

    def __init__(self, bus: EventBus, store: Store, thread_id: str, since_seq: int,
                 render: "records.Render | None" = None) -> None:
        self._bus = bus
        self._store = store
        self.thread_id = thread_id
        self.last_seq = since_seq
        # Stored events as one records.EncodedEvents per page (``render``'s bytes), or as Events; live ones are Events.
        self._read_page = records.events_after if render is None else functools.partial(
            records.encoded_events_after, render=render)
        # A page shorter than this is the last one stored: the replay is over.
        self._page_size = records.EVENT_PAGE if render is None else records.REPLAY_PAGE
        self._sub = bus.attach(thread_id)
        self._pending: collections.deque[Event] = collections.deque()
        self._replaying = True
        self._ended = False
        self.catch_ups = 0

    async def next(self) -> Event:
        while True:
            if self._pending:
                return self.next_nowait()  # type: ignore[return-value]  # not None: one is pending
            if self._ended:
                raise StopAsyncIteration
            if self._replaying:
                page = await self._store.read(functools.partial(
                    self._read_page, thread_id=self.thread_id, since_seq=self.last_seq))
                self._pending.extend(page)
                read = page[0].count if page and type(page[0]) is records.EncodedEvents else len(page)
                if read < self._page_size:
                    self._replaying = False
                    deleted = self._bus.deleted(self.thread_id)
                    if deleted is not None and not page:  # gone while catching up: its last event, then the end
                        self._ended = True
                        if deleted.seq > self.last_seq:
                            self._pending.append(deleted)
                continue
            try:
                event = await self._sub.receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                if not self._sub.overflowed:
                    raise StopAsyncIteration from None
                # Detached for falling behind: catch up from the store, then go live again.
                self.catch_ups += 1
                self._sub = self._bus.attach(self.thread_id)
                self._replaying = True
                continue
            if event.seq > self.last_seq:
                self.last_seq = event.seq
                if event.event == "thread.deleted":
                    self._ended = True  # nothing can follow: the thread is gone
                return event

    def next_nowait(self) -> Event | None:
        """The event ``next`` would return at once, or None when it would have to wait (or read the store):
        the events a writer's batch published together are taken in one go (web/sse.py sends them as one
        chunk). Synchronous, so nothing is lost to a cancellation; the position moves as with ``next``."""
        if self._pending:
            event = self._pending.popleft()
            self.last_seq = event.seq
            return event
        if self._ended or self._replaying:
            return None
        while True:
            try:
                event = self._sub.receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return None  # ``next`` waits, ends the stream or catches up after an overflow
            if event.seq > self.last_seq:
                self.last_seq = event.seq
                if event.event == "thread.deleted":
                    self._ended = True
                return event

    def close(self) -> None:
        self._bus.detach(self._sub)
        self._sub.overflowed = False

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> Event:
        return await self.next()

    async def aclose(self) -> None:
        self.close()


class PolledStream:
    """EventStream's interface for a cluster (``EventBus.polled``): every event comes from the events table
    (``seq > last_seq``, in order), read again whenever the bus wakes the thread (a local commit, or another
    host's NOTIFY through the listener). Readers on any host see the same events in the same order, and
    ``Last-Event-ID`` is only a position. ``next`` is cancellation-safe: the position moves only when an
    event is returned. A thread deleted on another host (its events are gone) ends the stream once a wake
    finds neither new events nor the thread."""

    def __init__(self, bus: EventBus, store: Store, thread_id: str, since_seq: int,
                 render: "records.Render | None" = None) -> None:
        self._bus = bus
        self._store = store
        self.thread_id = thread_id
        self.last_seq = since_seq
        # As EventStream's: pages of stored events as records.EncodedEvents when ``render`` is given.
        self._read_page = records.events_after if render is None else functools.partial(
            records.encoded_events_after, render=render)
        self._pending: collections.deque[Event] = collections.deque()
        self._ended = False
        self._closed = False
        self._woken = False
        self._gone = False
        self.catch_ups = 0
        bus._polled_streams += 1
        bus._notify()

    async def next(self) -> Event:
        while True:
            if self._pending:
                return self.next_nowait()  # type: ignore[return-value]  # not None: one is pending
            if self._ended or self._closed:
                raise StopAsyncIteration
            wake = self._bus.wake_event(self.thread_id)  # before the read: a wake during it is kept
            page = await self._store.read(functools.partial(
                self._read_page, thread_id=self.thread_id, since_seq=self.last_seq))
            if page:
                self._pending.extend(page)
                self._woken = False
                continue
            deleted = self._bus.deleted(self.thread_id)
            if deleted is not None:  # deleted by this host: its last event, then the end
                self._ended = True
                if deleted.seq > self.last_seq:
                    self._pending.append(deleted)
                continue
            if self._gone:  # the thread is gone and no deletion of this host says so: another host's
                self._ended = True
                continue
            if self._woken:
                # Woken and nothing new: a deletion on another host (its events went with the thread)?
                self._woken = False
                if await self._store.read(functools.partial(records.get_thread_row, thread_id=self.thread_id)) is None:
                    # Or this host's own, committed but not yet published (``deleted`` above is set after
                    # the commit): an empty write returns once every earlier batch is committed and
                    # published, so the next pass finds it there and hands out its ``thread.deleted``.
                    with contextlib.suppress(StorageError):  # a failed empty batch is a barrier all the same
                        await self._store.write()
                    self._gone = True
                    continue
            await wake.wait()
            self._woken = True

    def next_nowait(self) -> Event | None:
        """An event of the page already read, or None (``next`` then reads or waits); as ``next`` otherwise."""
        if not self._pending:
            return None
        event = self._pending.popleft()
        self.last_seq = event.seq
        # (a page of stored events never holds thread.deleted: it is stored nowhere)
        if type(event) is not records.EncodedEvents and event.event == "thread.deleted":
            self._ended = True
            self._pending.clear()
        return event

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._bus._polled_streams -= 1
            self._bus._notify()

    def __aiter__(self) -> "PolledStream":
        return self

    async def __anext__(self) -> Event:
        return await self.next()

    async def aclose(self) -> None:
        self.close()
