"""Dropping the undo files of committed session changes after the change has answered.

A change of a session file keeps the previous file as an undo file until the store's COMMIT decides
(runtime/sessions/files.py). Once it committed, the undo file is harmless: the journal says to drop it, at
the next start or when the session is settled. So a change answers (and lets go of the session's lock) as
soon as it committed, and ``UndoFiles`` drops the undo files meanwhile: one worker thread at a time takes
every undo file queued so far, and keeps taking more until none is left. Under row 3 of ``make bench``
(50 clients saving in place) a worker thread of its own per save, waited for before the answer, was ~15 ms
of a ~95 ms save (its start and its hand-off back) and ~0.5 ms of server CPU per save (issue 16, sixth pass).

What a cancel or a crash leaves: nothing waits here but ``cleaned``, bounded by its caller; a stop before a
file was dropped leaves a committed change's undo file, which the next start drops (its journal row stays
until a later transaction forgets it, after a directory fsync made the removal durable).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import weakref
from typing import Callable

import outcome
import trio

from ..errors import StorageError
from .files import Change, SessionFiles

log = logging.getLogger(__name__)

# Every live ``UndoFiles``, for ``wait_for_undo_files``.
_ALL: "weakref.WeakSet[UndoFiles]" = weakref.WeakSet()

# What ``dropped`` hears for each change: None when its undo file is gone, else the StorageError.
Dropped = Callable[[list[tuple[Change, StorageError | None]]], None]


class UndoFiles:
    """One worker thread at a time drops the queued undo files; ``dropped`` (called on the event loop) hears
    each change's outcome, after its file is gone or its removal failed."""

    def __init__(self, files: SessionFiles, dropped: Dropped) -> None:
        self._files = files
        self._dropped = dropped
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: list[Change] = []
        self._running = False  # a thread is draining the queue (set and cleared under the lock)
        # Set on the event loop once the thread started last has ended and been booked (set: none started).
        self._ended = trio.Event()
        self._ended.set()
        # The thread holds a token of this limiter (never short of tokens) while it works, taken and given
        # back on the event loop, so tests on a MockClock see it working (tests/support.py, ThreadGuard).
        self.limiter = trio.CapacityLimiter(math.inf)
        _ALL.add(self)

    def drop(self, change: Change) -> None:
        """Queue ``change``'s undo file (the change committed). Synchronous: no schedule point, so the
        caller cannot be cancelled between its commit and this."""
        with self._lock:
            self._queue.append(change)
            if self._running:
                return  # the running thread takes it before it ends
            self._running = True
        token = trio.lowlevel.current_trio_token()
        borrower = object()
        self.limiter.acquire_on_behalf_of_nowait(borrower)
        ended = self._ended = trio.Event()

        def book(result: outcome.Outcome) -> None:
            try:
                self._dropped(result.unwrap())
            except Exception:  # a bug here must not leave the limiter's token taken or ``cleaned`` waiting
                log.exception("dropping undo files of session changes failed; they are dropped at the next start")
            finally:
                self.limiter.release_on_behalf_of(borrower)
                ended.set()

        def deliver(result: outcome.Outcome) -> None:
            with contextlib.suppress(trio.RunFinishedError):  # the run ended: the next start drops them
                token.run_sync_soon(book, result)

        trio.lowlevel.start_thread_soon(self._drain, deliver, name="session undo files")

    def _drain(self) -> list[tuple[Change, StorageError | None]]:
        """In the worker thread: drop every queued undo file, until the queue stays empty."""
        results: list[tuple[Change, StorageError | None]] = []
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._running = False
                    self._idle.notify_all()
                    return results
            for change in batch:
                try:
                    self._files.finish(change)
                except Exception as exc:  # StorageError, or a bug: booked as a failed removal either way
                    results.append((change, exc if isinstance(exc, StorageError) else StorageError(
                        f"Failed to clean up after changing session '{change.session_id}': {exc!r}")))
                else:
                    results.append((change, None))

    async def cleaned(self) -> None:
        """Until every queued undo file was dropped and booked (the caller bounds it)."""
        while True:
            ended = self._ended
            with self._lock:
                busy = self._running
            if not busy and ended.is_set():
                return
            await ended.wait()

    def wait(self, timeout: float) -> bool:
        """Block until no undo file is queued or being dropped (not booked yet, maybe): for tests and
        tools that read the sessions directory right after a change answered. False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._running, timeout)


def wait_for_undo_files(timeout: float = 30.0) -> bool:
    """``UndoFiles.wait`` for every live runtime in this process (tests read the directory with it)."""
    return all(undo.wait(timeout) for undo in list(_ALL))
