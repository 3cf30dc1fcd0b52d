"""Staging session files in groups: one worker thread at a time stages every change queued so far, and
the group shares its directory fsyncs.

A save's staging (runtime/sessions/filedocs.py, ``FileDocs.commit``) writes and fsyncs its temp file, links
its undo file, fsyncs the directory, renames the file into place and fsyncs the directory again, all before
its COMMIT. Each change's staging is a generator (``SessionFiles.stage_steps``) that stops where it waits for
the group: ``WRITTEN`` after its temp file is written (every change of the group writes its file before any
is fsynced: the first fsync's journal commit then writes them all, where write, fsync, write, fsync waited
for one commit each), and ``FSYNC_DIR`` where the directory is fsynced, once for the whole group. Every
change still has its own file operations in the same order, and each one's COMMIT still comes after its
rename is durable.

Why (issue 16, sixth pass, bench row 3: 50 clients saving in place): a worker thread per save meant ~10
threads at once on two vCPUs handing the GIL back and forth after each of ~20 system calls, plus each
thread's start and hand-off back: 72 context switches and ~1.7 ms of server CPU per save. Grouped (a
first version): ~14 context switches and ~1.15 ms, 645-669 -> 742-761 PUT/s in turns; more than one group
thread at a time measured worse (2: 695-715, 3: 696 PUT/s). With every temp file written before any is
fsynced, three full bench runs gave 724-873 PUT/s (docs/design.md, Sessions, "Groups").

Failures stay each change's own: a change whose step raises is reported alone (its generator cleaned up
after itself, as ``stage`` does); a failed directory fsync is thrown into every change waiting on it, and
each cleans up (first fsync) or is left for its caller to settle (second fsync, as a failed ``publish``).
What a cancel leaves: nothing here waits on the event loop; a request that stops waiting (its commit bound)
is told nothing more, and its generator's own cleanup runs when the group reaches it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Generator

import outcome
import trio

from .batches import BatchThread
from .files import FSYNC_DIR, SessionFiles

Steps = Generator[str, None, Any]
# More rounds than any change's steps have (WRITTEN, FSYNC_DIR, FSYNC_DIR, the end).
MAX_STEPS = 8
# A staged change's steps, what to call on the event loop with its outcome, and that loop's token.
Job = tuple[Steps, Callable[[outcome.Outcome], None], trio.lowlevel.TrioToken]


class Stager:
    def __init__(self, files: SessionFiles) -> None:
        self._files = files
        self._thread: BatchThread[Job, None] = BatchThread(self._run_group, lambda _: None, "session staging")
        self.limiter: trio.CapacityLimiter = self._thread.limiter

    async def run(self, steps: Steps) -> Any:
        """Stage ``steps`` with the group it joins and return its result (raise its error). Cancellable:
        a caller that stops waiting is told nothing more; ``steps`` runs to its end all the same."""
        done, box = trio.Event(), []

        def on_loop(result: outcome.Outcome) -> None:
            box.append(result)
            done.set()

        self._thread.submit((steps, on_loop, trio.lowlevel.current_trio_token()))
        await done.wait()
        return box[0].unwrap()

    def _run_group(self, group: list[Job]) -> list[None]:
        """In the worker thread: every change of the group up to what it waits for (``WRITTEN``: every temp
        file written; ``FSYNC_DIR``: one directory fsync for all), then on, until each has ended. Changes
        move in step: they all yield the same things in the same order. The changes that ended in a round
        are told in one hand-off to the event loop (one wake-up, not one per change)."""
        waiting = self._advance([(job, None) for job in group])
        for _ in range(MAX_STEPS):
            if not waiting:
                return []
            thrown: Exception | None = None
            if any(wanted == FSYNC_DIR for _, wanted in waiting):
                try:
                    self._files.fs.fsync_dir(self._files.directory)
                except Exception as exc:  # each change hears it where it waits, and cleans up
                    thrown = exc
            waiting = self._advance(waiting, thrown)
        ended = []
        for (steps, on_loop, token), _ in waiting:  # more steps than any change has: a bug; never left running
            steps.close()
            ended.append(((steps, on_loop, token), outcome.Error(
                RuntimeError("a session change staged in a group did not end"))))
        _tell(ended)
        return []

    @staticmethod
    def _advance(group: list[tuple[Job, str | None]],
                 thrown: Exception | None = None) -> list[tuple[Job, str | None]]:
        """Run each change to what it waits for next (throwing ``thrown`` into those that waited for the
        directory fsync); tell those that ended; return the others with what they wait for."""
        waiting, ended = [], []
        for job, wanted in group:
            steps = job[0]
            try:
                if thrown is not None and wanted == FSYNC_DIR:  # an exception of its own each
                    wanted = steps.throw(_copy(thrown))
                else:
                    wanted = next(steps)
            except StopIteration as stop:
                ended.append((job, outcome.Value(stop.value)))
            except BaseException as exc:
                ended.append((job, outcome.Error(exc)))
            else:
                waiting.append((job, wanted))
        _tell(ended)
        return waiting


def _tell(ended: list[tuple[Job, outcome.Outcome]]) -> None:
    """Hand the outcomes of ended changes to their event loops, one ``run_sync_soon`` per loop. A loop that
    has ended hears nothing (its requests are gone; what they staged is settled as after a kill)."""
    by_token: dict[trio.lowlevel.TrioToken, list[tuple[Callable[[outcome.Outcome], None], outcome.Outcome]]] = {}
    for (_, on_loop, token), result in ended:
        by_token.setdefault(token, []).append((on_loop, result))
    for token, calls in by_token.items():
        def call_all(calls=calls) -> None:
            for on_loop, result in calls:
                on_loop(result)

        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(call_all)


def _copy(exc: Exception) -> Exception:
    if isinstance(exc, OSError):
        return type(exc)(exc.errno, exc.strerror, exc.filename)
    return exc
