"""EventBus: fan committed events out to subscribers, and replay-then-live subscriptions.

``publish`` is called by the store's writer after each commit and never blocks: every subscriber has
a bounded buffer, and one that falls behind is detached rather than allowed to slow the writer, the
engines or other subscribers. ``subscribe`` hides that from its consumer: a detached subscription
catches up from the store and re-attaches, so the stream has no gap and no duplicate either way.
"""

from __future__ import annotations

import functools
from typing import AsyncIterator

import trio

from . import records
from .store import Event, Store


class Subscription:
    __slots__ = ("thread_id", "send", "receive", "overflowed")

    def __init__(self, thread_id: str, capacity: int) -> None:
        self.thread_id = thread_id
        self.send, self.receive = trio.open_memory_channel[Event](capacity)
        self.overflowed = False


class EventBus:
    def __init__(self, buffer: int) -> None:
        self._buffer = buffer
        self._subs: dict[str, set[Subscription]] = {}
        self.overflows = 0

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def attach(self, thread_id: str) -> Subscription:
        sub = Subscription(thread_id, self._buffer)
        self._subs.setdefault(thread_id, set()).add(sub)
        return sub

    def detach(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.thread_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.thread_id]
        sub.send.close()

    def publish(self, events: list[Event]) -> None:
        for event in events:
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

    async def subscribe(self, store: Store, thread_id: str, since_seq: int) -> AsyncIterator[Event]:
        """Yield every event of ``thread_id`` with ``seq > since_seq``: stored ones, then live ones.

        Attaching before reading the store is what closes the gap: anything committed after the
        attach is in the buffer, anything before it is in the store, and seqs already yielded are
        skipped. Cancelling the consumer detaches the subscription at once.
        """
        last = since_seq
        while True:
            sub = self.attach(thread_id)
            try:
                while True:
                    page = await store.read(functools.partial(records.events_after, thread_id=thread_id,
                                                              since_seq=last))
                    for event in page:
                        yield event
                        last = event.seq
                    if len(page) < records.EVENT_PAGE:
                        break
                async for event in sub.receive:
                    if event.seq > last:
                        yield event
                        last = event.seq
            finally:
                self.detach(sub)
            if not sub.overflowed:
                return
