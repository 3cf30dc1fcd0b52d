"""Dropping the undo files of committed session changes after the change has answered.

A change of a session file keeps the previous file as an undo file until the store's COMMIT decides
(runtime/sessions/files.py). Once it committed, the undo file is harmless: the journal says to drop it, at
the next start or when the session is settled. So a change answers (and lets go of the session's lock) as
soon as it committed, and ``UndoFiles`` drops the undo files meanwhile, in one worker thread at a time for
every undo file queued (runtime/sessions/batches.py). Under row 3 of ``make bench`` (50 clients saving in
place) a worker thread of its own per save, waited for before the answer, was ~15 ms of a ~95 ms save (its
start and its hand-off back) and ~0.5 ms of server CPU per save (issue 16, sixth pass).

What a cancel or a crash leaves: nothing waits here but ``cleaned``, bounded by its caller; a stop before a
file was dropped leaves a committed change's undo file, which the next start drops (its journal row stays
until a later transaction forgets it, after a directory fsync made the removal durable).
"""

from __future__ import annotations

import weakref
from typing import Callable

import trio

from ..errors import StorageError
from .batches import BatchThread
from .files import Change, SessionFiles

# Every live ``UndoFiles``, for ``wait_for_undo_files``.
_ALL: "weakref.WeakSet[UndoFiles]" = weakref.WeakSet()

Dropped = tuple[Change, "StorageError | None"]


class UndoFiles:
    """``drop`` queues a committed change's undo file; ``dropped`` (called on the event loop) hears each
    change's outcome once its thread ended: None when the file is gone, else the StorageError."""

    def __init__(self, files: SessionFiles, dropped: Callable[[list[Dropped]], None]) -> None:
        self._files = files
        self._dropped = dropped
        self._thread: BatchThread[Change, Dropped] = BatchThread(self._remove, dropped, "session undo files")
        self.limiter: trio.CapacityLimiter = self._thread.limiter
        _ALL.add(self)

    def drop(self, change: Change) -> None:
        """Queue ``change``'s undo file (the change committed). No schedule point: the caller cannot be
        cancelled between its commit and this. If no thread can be started, the change is reported as not
        dropped (its session is settled before its next change): the change itself committed."""
        try:
            self._thread.submit(change)
        except Exception as exc:
            self._dropped([(change, StorageError(
                f"Failed to clean up after changing session '{change.session_id}': {exc!r}"))])

    def _remove(self, changes: list[Change]) -> list[Dropped]:
        """In the worker thread: drop each undo file; a failure is that change's alone."""
        results: list[Dropped] = []
        for change in changes:
            try:
                self._files.finish(change)
            except Exception as exc:  # StorageError, or a bug: reported as a failed removal either way
                results.append((change, exc if isinstance(exc, StorageError) else StorageError(
                    f"Failed to clean up after changing session '{change.session_id}': {exc!r}")))
            else:
                results.append((change, None))
        return results

    async def cleaned(self) -> None:
        """Until every queued undo file was dropped and reported (the caller bounds it)."""
        await self._thread.idle()

    def wait(self, timeout: float) -> bool:
        """Block until no undo file is queued or being dropped: for tests and tools that read the sessions
        directory right after a change answered. False on timeout."""
        return self._thread.wait(timeout)


def wait_for_undo_files(timeout: float = 30.0) -> bool:
    """``UndoFiles.wait`` for every live runtime in this process (tests read the directory with it)."""
    return all(undo.wait(timeout) for undo in list(_ALL))
