"""EventBus: fan committed events out to subscribers, and replay-then-live subscriptions.

``publish`` is called by the store's writer after each commit and never blocks: every subscriber has
a bounded buffer, and one that falls behind is detached rather than allowed to slow the writer, the
engines or other subscribers. ``EventStream`` hides that from its consumer: a detached stream
catches up from the store and re-attaches, so it has no gap and no duplicate either way.
"""

from __future__ import annotations

import collections
import functools

import trio

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

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())

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

    def subscribe(self, store: Store, thread_id: str, since_seq: int) -> "EventStream":
        return EventStream(self, store, thread_id, since_seq)


class EventStream:
    """Every event of one thread with ``seq > since_seq``: stored ones, then live ones.

    Attaching to the bus before reading the store is what closes the gap: anything committed after
    the attach is in the buffer, anything before it is in the store, and seqs already returned are
    skipped. ``next`` is cancellation-safe (a cancelled call loses nothing; the next call resumes),
    so callers may wrap it in timeouts. Use as an async iterator, and ``close`` it when done.
    """

    def __init__(self, bus: EventBus, store: Store, thread_id: str, since_seq: int) -> None:
        self._bus = bus
        self._store = store
        self.thread_id = thread_id
        self.last_seq = since_seq
        self._sub = bus.attach(thread_id)
        self._pending: collections.deque[Event] = collections.deque()
        self._replaying = True
        self._ended = False
        self.catch_ups = 0

    async def next(self) -> Event:
        while True:
            if self._pending:
                event = self._pending.popleft()
                self.last_seq = event.seq
                return event
            if self._ended:
                raise StopAsyncIteration
            if self._replaying:
                page = await self._store.read(functools.partial(
                    records.events_after, thread_id=self.thread_id, since_seq=self.last_seq))
                self._pending.extend(page)
                if len(page) < records.EVENT_PAGE:
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

    def close(self) -> None:
        self._bus.detach(self._sub)
        self._sub.overflowed = False

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> Event:
        return await self.next()

    async def aclose(self) -> None:
        self.close()
