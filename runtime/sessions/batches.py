"""One worker thread at a time for a queue of session file work (runtime/sessions/staging.py,
runtime/sessions/undo.py).

``BatchThread.submit`` queues an item from the event loop; if no thread is working the queue, it starts
one (trio's thread cache, at once, without a schedule point), which calls ``handle`` with every item
queued so far, and again with those queued meanwhile, until the queue stays empty. One thread's start and
hand-off back serve every change that arrives while it works: under row 3 of ``make bench`` (50 clients
saving in place) a worker thread per save spent more in those hand-offs, and in handing the GIL back and
forth between ~10 threads on two vCPUs, than in its file work (issue 16, sixth pass).

What a cancel leaves: ``submit`` has no schedule point; ``idle`` waits and can be cancelled (the thread goes
on). A run that ends while a thread works loses only the thread's report back (``ended``); what the items
stood for is settled as after a kill (the session journal).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import Callable, Generic, TypeVar

import outcome
import trio

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatchThread(Generic[Item, Result]):
    """``handle(items)`` runs in the worker thread and must not raise (a bug that does is logged, and the
    items it had are lost to ``ended``); ``ended(results)``, on the event loop, gets every result of one
    thread's run, in order, once it ended."""

    def __init__(self, handle: Callable[[list[Item]], list[Result]], ended: Callable[[list[Result]], None],
                 name: str) -> None:
        self._handle = handle
        self._ended_fn = ended
        self._name = name
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: list[Item] = []
        self._running = False  # a thread works the queue (set and cleared under the lock)
        # Set on the event loop once the thread started last has ended and been reported (set: none started).
        self._ended = trio.Event()
        self._ended.set()
        # The thread holds a token of this limiter (never short of tokens) while it works, taken and given
        # back on the event loop, so tests on a MockClock see it working (tests/support.py, ThreadGuard).
        self.limiter = trio.CapacityLimiter(math.inf)

    def submit(self, item: Item) -> None:
        """Queue ``item``; start the thread unless one is working (it takes ``item`` before it ends). If no
        thread can be started, raises, and ``item`` is not queued (the next submit tries again)."""
        with self._lock:
            self._queue.append(item)
            if self._running:
                return
            self._running = True
        token = trio.lowlevel.current_trio_token()
        borrower = object()
        self.limiter.acquire_on_behalf_of_nowait(borrower)
        ended = self._ended = trio.Event()

        def report(result: outcome.Outcome) -> None:
            try:
                self._ended_fn(result.unwrap())
            except Exception:
                log.exception("%s: a worker thread's report failed", self._name)
            finally:
                self.limiter.release_on_behalf_of(borrower)
                ended.set()

        def deliver(result: outcome.Outcome) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(report, result)

        try:
            trio.lowlevel.start_thread_soon(self._drain, deliver, name=self._name)
        except BaseException:  # no thread (e.g. the process is out of threads): never left "running"
            with self._lock:
                self._running = False
                self._queue.clear()  # only ``item``: the queue is empty whenever no thread works it
                self._idle.notify_all()
            self.limiter.release_on_behalf_of(borrower)
            ended.set()
            raise

    def _drain(self) -> list[Result]:
        results: list[Result] = []
        try:
            while True:
                with self._lock:
                    items, self._queue = self._queue, []
                    if not items:
                        self._running = False
                        self._idle.notify_all()
                        return results
                results += self._handle(items)
        except BaseException:
            with self._lock:  # never left "running" with no thread: the next submit starts one
                self._running = False
                self._idle.notify_all()
            raise

    async def idle(self) -> None:
        """Until no thread works and the last one's report was made."""
        while True:
            ended = self._ended
            with self._lock:
                busy = self._running
            if not busy and ended.is_set():
                return
            await ended.wait()

    def wait(self, timeout: float) -> bool:
        """Block (no event loop needed) until no thread works; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._running, timeout)
