"""Session documents as JSON files (RuntimeConfig.session_storage = "files", the default on SQLite):
the all-or-nothing change protocol of runtime/sessions/files.py driven against the store.

Every change has a *commit* phase run under a shield: stage the new file beside the old one (kept as an
undo file) and put it in place (saves that arrive together are staged as one group:
runtime/sessions/staging.py), then one request to the store's writer writes the index row, the thread
link, the ``session.saved`` event and a journal row in one transaction; after it the undo file is dropped
(after the answer: runtime/sessions/undo.py), or, when the transaction did not commit, put back (a delete
moves its file aside inside that transaction). A cancellation (timeout, client disconnect, shutdown)
arriving meanwhile waits for it to finish; a kill -9 at any point is settled at the next start
from the journal. So every outcome is "nothing changed" or "the whole save is durable and linked"
(docs/design.md, "Sessions").

The session files are the source of truth; the ``sessions`` table is an index for listing and
search, written in the same transaction as each file and reconciled with the directory on start.
(Moved here unchanged from service.py when the storage became a choice: runtime/sessions/docs.py.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import sqlite3
import threading
from typing import Any, Awaitable, Callable, Generator

import trio

from .. import codec
from ..errors import EngineTimeout, NotFound, StorageError
from ..idempotency import Claim
from ..store import DatabaseError, EventDraft, Store
from .docs import (
    COMMIT_TIMEOUT, KEEP_TEXT, ResumeSource, SafetyWriter, encode, encode_with_messages_span, index_metadata,
    index_row, index_text, index_values, Stale, link_thread, raise_named, resume_source, upsert_index,
)
from .files import BACKUP_SUFFIX, Change, SessionFiles, parse_document, validate_session_id
from .staging import Stager
from .undo import UndoFiles

log = logging.getLogger(__name__)


# A document at least this long (encoded) gets its search text made in a thread of its own while the file is
# written and fsynced (``_SearchText``); below it, the staging thread makes it afterwards, since another
# thread job costs a small save more than it overlaps (row 3 of ``make bench`` is thread hand-offs).
PARALLEL_SEARCH_TEXT_BYTES = 1024 * 1024


class _SearchText:
    """``index_text`` of a document, made in a worker thread started at once (trio's thread cache) while
    the caller, the staging thread, writes and fsyncs the file: those calls let go of the GIL, so the two
    overlap. For the 10.6 MB session of bench row 9 the text took ~9 ms and the file steps ~7 ms, one
    after the other. ``result`` waits for it (it reads the document only, and ends: no cancel point);
    the document is not changed while it runs (a save's document is its own)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self._done = threading.Event()
        self._outcome: Any = None
        title, messages = doc["metadata"]["title"], doc["messages"]

        def deliver(result: Any) -> None:
            self._outcome = result
            self._done.set()

        trio.lowlevel.start_thread_soon(lambda: index_text(title, messages), deliver, name="session search text")

    def wait(self) -> None:
        self._done.wait()

    def result(self) -> bytes:
        self._done.wait()
        return self._outcome.unwrap()


def _same_text(kept: tuple[int, int, str, int, int] | None, expected: tuple[int, int] | None,
               found: tuple[bytes, Any] | None, doc: dict[str, Any], data: bytes,
               span: tuple[int, int] | None) -> bool:
    """Whether ``doc``'s search text is the one stored for the file this process last committed
    (``FileDocs._texts``): the file read (``found``) is that file, by its size and mtime, and the title
    and the messages' bytes are the same (one memcmp, ~0.5 ms for 10 MB)."""
    if kept is None or expected is None or found is None or span is None or kept[:2] != expected:
        return False
    size, mtime_ns, title, start, end = kept
    return (title == doc["metadata"]["title"] and end - start == span[1] - span[0]
            and found[0].startswith(memoryview(data)[span[0]:span[1]], start))


class FileDocs:
    def __init__(self, store: Store, files: SessionFiles) -> None:
        self._store = store
        self.files = files
        self.commit_timeout = COMMIT_TIMEOUT
        # Sessions whose last change may have left work files: its outcome is unknown (the writer did
        # not answer in time) or settling it failed. Their next change settles them first (_settle).
        self._unsettled: set[str] = set()
        # Staging threads that a timed-out request abandoned, by session: the next change waits for
        # them, so two changes of one session never have undo files at the same time.
        self._staging: dict[str, trio.Event] = {}
        # Tokens of committed changes whose undo file is gone. Their journal rows are deleted by a later
        # change's transaction, which commits after a directory fsync made those removals durable.
        self._retired: set[str] = set()
        # Index rows (``index_values``) as this process last committed or read them, by session; read and
        # changed only under the session's lock. Every change of a session drops its row first and puts
        # the new one back only once the change committed, so a row here is always the database's. Saves
        # read it instead of the database on the event loop: three SQLite calls, each handing the GIL to
        # a worker thread and waiting to get it back (issue 16, row 3 of ``make bench``).
        self._rows: dict[str, dict[str, Any]] = {}
        # Sessions whose ``metadata`` came from ``_rows`` without reading the file, with the (size, mtime)
        # the file must still have: the save's staging thread reads and compares it before it writes
        # anything (``Stale`` when it differs), instead of a worker-thread hop of its own before the engine
        # snapshot (issue 16, row 3 of ``make bench``). Set and taken under the session's lock.
        self._unconfirmed: dict[str, tuple[int, int]] = {}
        # What the search text of the file this process last committed for a session was made of: the file's
        # (size, mtime), its title, and where its messages lie in its bytes. Kept and dropped with ``_rows``.
        # A save that reads that very file (a save without If-Match checks it in its staging thread) and
        # finds the same title and the same messages' bytes neither makes the search text (~9 ms for 10 MB)
        # nor writes it (``KEEP_TEXT``; issue 16, bench row 9). Equal bytes are equal messages, so the
        # stored text, made from that file's document or kept the same way, is already the new document's.
        self._texts: dict[str, tuple[int, int, str, int, int]] = {}
        # Undo files of committed changes, dropped after the change answered (runtime/sessions/undo.py).
        self.undo_files = UndoFiles(files, self._undo_files_dropped)
        # Saves' files are staged in groups by one worker thread at a time (runtime/sessions/staging.py).
        self.stager = Stager(files)

    # ---- startup ---------------------------------------------------------------------------

    async def open(self) -> None:
        await trio.to_thread.run_sync(self.files.prepare)
        await self._store.write(fn=self._reconcile)

    def _recover(self, conn: sqlite3.Connection) -> None:
        """Settle every change a crash left in flight: the journal says which committed (keep it,
        drop its undo file) and which did not (put the previous file back). Then, after a directory
        fsync made those removals durable, empty the journal. A session that cannot be settled is
        logged, keeps its journal rows and is settled again at its next change."""
        committed = {row[0] for row in conn.execute("SELECT token FROM session_commits")}
        pending = self.files.pending()
        kept = rolled_back = 0
        for change in pending:
            try:
                if self.files.settle(change, change.token in committed):
                    kept += 1
                else:
                    rolled_back += 1
            except StorageError as exc:
                log.error("%s; it is settled again at its next change", exc.message)
                self._unsettled.add(change.session_id)
        if pending:
            log.warning("settled %d session change(s) left in flight by an unclean stop: %d committed, "
                        "%d rolled back", len(pending), kept, rolled_back)
        if committed:
            try:
                self.files.fs.fsync_dir(self.files.directory)
            except OSError as exc:
                log.error("could not fsync %s; the session journal is kept: %s", self.files.directory, exc)
                return
            conn.execute("DELETE FROM session_commits WHERE session_id NOT IN (SELECT value FROM json_each(?))",
                         (json.dumps(sorted(self._unsettled)),))

    def _reconcile(self, conn: sqlite3.Connection) -> None:
        """Settle changes left in flight (``_recover``), then bring the index in line with the files:
        (re)index files whose size or mtime changed, drop rows whose file is gone. Runs in the writer
        thread at start; stats every file but parses only the changed ones. A session that could not be
        settled keeps its index row as it is."""
        self._recover(conn)
        indexed = {row["id"]: (row["size"], row["file_mtime_ns"])
                   for row in conn.execute("SELECT id, size, file_mtime_ns FROM sessions")}
        seen = set(self._unsettled)
        for entry in self.files.directory.iterdir():
            if entry.suffix != ".json" or entry.name.startswith("."):
                continue
            session_id = entry.stem
            try:
                validate_session_id(session_id)
                st = entry.stat()
            except Exception:
                continue
            if session_id in self._unsettled:
                continue
            seen.add(session_id)
            if indexed.get(session_id) == (st.st_size, st.st_mtime_ns):
                continue
            try:
                doc = parse_document(session_id, self.files.fs.read_bytes(entry))
                upsert_index(conn, doc, st.st_size, st.st_mtime_ns)
            except Exception as exc:  # one bad file must never stop the server from starting
                log.warning("session file %s is not indexed: %s", entry.name, exc)
                conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        for session_id in indexed.keys() - seen:
            conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    # ---- before every change ---------------------------------------------------------------

    async def before_change(self, session_id: str, deadline: float) -> None:
        """Under the session's lock: wait for a staging thread an earlier request abandoned, and settle
        the session's earlier change if it may have left work files (``_settle``)."""
        self._unconfirmed.pop(session_id, None)  # a check left by a save that never reached its commit
        staging = self._staging.get(session_id)
        if staging is not None:
            with trio.move_on_at(deadline):
                await staging.wait()
            if not staging.is_set():
                raise StorageError(f"Failed to change session '{session_id}': the disk has not finished "
                                   f"an earlier write of it")
            if self._staging.get(session_id) is staging:
                del self._staging[session_id]
        if session_id in self._unsettled:
            await self._settle(session_id)

    # ---- commit ----------------------------------------------------------------------------

    async def commit(self, doc: dict[str, Any], *, action: str, thread_id: str | None,
                     events: list[EventDraft], replacing: bool, claim: Claim | None = None,
                     answer: Any = None) -> None:
        """The commit phase, shielded as a whole: once it starts it runs to its end, so the caller
        always learns the outcome and never releases the session's lock early.

        Encoding the document, writing + fsyncing the temp file, keeping the previous file as an undo
        file and putting the new one in place (``replacing``: over the previous one; the directory fsynced
        after each) run in the group stager's worker thread, with every save queued meanwhile sharing
        its directory fsyncs (runtime/sessions/staging.py; the event loop never encodes a 10 MB
        document). Then one writer request writes index row, thread link and journal row; ``_apply``
        settles what follows (the journal decides: not committed, the undo file goes back). Raises
        StorageError (StorageFull for a full disk) naming ``action`` when nothing was saved. ``claim``:
        the request's idempotency record of ``answer``, written by that same writer request (so it
        commits with the change or not at all).
        """
        session_id = doc["metadata"]["id"]
        self._rows.pop(session_id, None)  # known again only once this change committed (below)
        kept_text = self._texts.pop(session_id, None)
        # (size, mtime) the file must still have (``metadata`` took the kept row without reading it).
        expected = self._unconfirmed.pop(session_id, None)
        change = self.files.change(session_id)
        # The staging thread can be abandoned (a stuck disk): ``guard`` makes "the thread finished" and
        # "the request gave up" one decision, so exactly one of them cleans up.
        guard, flags, staged_or_abandoned = threading.Lock(), {"done": False, "abandoned": False}, trio.Event()
        token = trio.lowlevel.current_trio_token()

        # Captured before staging: the staging thread's directory fsyncs come after these changes' undo
        # files were removed, so this change's COMMIT may forget their journal rows (``_journal``).
        retired = tuple(self._retired)

        def stage() -> Generator[str, None, tuple[Change, Any, tuple[int, int] | None]]:
            """The staged change, its search text (or KEEP_TEXT) and where the new file's messages lie; run by
            the group stager (runtime/sessions/staging.py), whose directory fsyncs are at its ``yield``s."""
            try:
                with guard:
                    if flags["abandoned"]:  # the request gave up while this waited in the queue: write nothing
                        raise StorageError(f"Failed to {action} session '{session_id}': the request gave up")
                found = None
                if expected is not None:
                    # Read as ``metadata`` would have, so a file that cannot be read fails the same way
                    # ("Failed to load session"), and nothing is written yet.
                    found = self.files.read(session_id)
                    if found is None or (len(found[0]), found[1].st_mtime_ns) != expected:
                        raise Stale(session_id)
                data, span = encode_with_messages_span(doc)
                if _same_text(kept_text, expected, found, doc, data, span):
                    search, same = None, True
                else:
                    # A big document's search text is made in a thread of its own while this one writes
                    # and fsyncs the file (see ``_SearchText``); a small one's here, after the file steps.
                    search = _SearchText(doc) if len(data) >= PARALLEL_SEARCH_TEXT_BYTES else None
                    same = False
                try:
                    # The file goes in place here, not in the writer's transaction: the writer ran every
                    # save's replace + directory fsync one after the other (~5 ms each under row 3's load,
                    # the writer busy all the time); a group of changes staged together shares its
                    # directory fsyncs. The COMMIT still comes after the rename is durable, and the journal
                    # still decides.
                    staged = yield from self.files.stage_steps(change, data, action, replacing=replacing)
                except BaseException:
                    if search is not None:
                        search.wait()  # never left running behind a failed stage
                    raise
                if same:
                    return staged, KEEP_TEXT, span
                if search is not None:
                    return staged, search.result(), span
                return staged, index_text(doc["metadata"]["title"], doc["messages"]), span
            finally:
                with guard:
                    flags["done"] = True
                    abandoned = flags["abandoned"]
                if abandoned:  # the request gave up on a stuck disk meanwhile: leave nothing behind
                    with contextlib.suppress(StorageError):
                        self.files.settle(change, committed=False)
                    with contextlib.suppress(trio.RunFinishedError):
                        token.run_sync_soon(staged_or_abandoned.set)

        # Shielded: see the docstring. Bounded by commit_timeout for the staging thread, then by
        # ``_apply``'s own bound on the writer.
        with trio.CancelScope(shield=True):
            failure: Exception | None = None
            with trio.move_on_after(self.commit_timeout) as bound:
                # Abandonable: if the disk is stuck, give up (nothing was committed) and let the
                # thread clean up after itself when it finishes (it puts the undo file back).
                try:
                    staged, search_text, span = await self.stager.run(stage())
                except Exception as exc:
                    failure = exc
            if isinstance(failure, Stale):
                raise failure  # raised before the stage wrote anything: nothing to settle
            if failure is not None:
                await self._settle_change(change)  # not committed: puts back a file the stage may have replaced
                raise failure
            if bound.cancelled_caught:
                with guard:
                    flags["abandoned"] = True
                    finished = flags["done"]
                self._unsettled.add(session_id)  # its next change settles whatever the thread leaves
                if not finished:
                    self._staging[session_id] = staged_or_abandoned
                raise StorageError(f"Failed to {action} session '{session_id}': the disk did not finish "
                                   f"writing within {self.commit_timeout:g} s; nothing was saved")

            def commit(conn: sqlite3.Connection) -> None:
                upsert_index(conn, doc, staged.size, staged.mtime_ns, search_text)
                if thread_id is not None:
                    link_thread(conn, thread_id, session_id)
                _journal(conn, staged, retired)
                if claim is not None:
                    claim.record(conn, answer)

            await self._apply(staged, commit, events, retired, action)
            self._rows[session_id] = index_values(doc, staged.size, staged.mtime_ns)
            if span is not None:
                self._texts[session_id] = (staged.size, staged.mtime_ns, doc["metadata"]["title"], *span)

    async def _apply(self, change: Change, fn: Any, events: list[EventDraft], retired: tuple[str, ...],
                     action: str) -> None:
        """Run a change's writer request, then settle the change: committed, its undo file is queued for
        removal after the answer (``UndoFiles``); not committed, the previous file comes back; the journal
        decides either way. Called shielded; the writer wait has its own bound (commit_timeout). Past it,
        a request the writer has not begun is refused when the writer reaches it (nothing was saved); one
        it has begun has an unknown outcome: nothing is undone (the writer may still commit), and the
        session is settled before its next change."""
        session_id = change.session_id
        # "The writer began the request" and "the request gave up" are one decision (see above).
        guard, state = threading.Lock(), {"begun": False, "gave_up": False}

        def guarded(conn: sqlite3.Connection) -> Any:
            with guard:
                if state["gave_up"]:
                    raise StorageError(f"Failed to {action} session '{session_id}': the request gave up")
                state["begun"] = True
            return fn(conn)

        failure: Exception | None = None
        with trio.move_on_after(self.commit_timeout) as bound:
            try:
                await self._store.write(fn=guarded, events=events)
            except Exception as exc:  # any failure of the request: the journal below says what happened
                failure = exc
        if bound.cancelled_caught:
            with guard:
                state["gave_up"] = True
                begun = state["begun"]
            if not begun:
                await self._settle_change(change)  # the writer will refuse it: nothing changes, clean up
                raise StorageError(f"Failed to {action} session '{session_id}': the store did not begin the "
                                   f"change within {self.commit_timeout:g} s; nothing was saved")
            self._unsettled.add(session_id)
            raise StorageError(f"Failed to {action} session '{session_id}': the store did not finish within "
                               f"{self.commit_timeout:g} s; the change is kept or undone before the next one")
        if failure is not None:
            if not await self._settle_change(change):
                raise_named(failure, action, session_id)
            log.error("the store reported %r for a change of session '%s' that committed", failure, session_id)
        self._retired.difference_update(retired)
        # Committed: the change answers now, and its undo file is dropped meanwhile (``UndoFiles``).
        self.undo_files.drop(change)

    def _undo_files_dropped(self, results: list[tuple[Change, StorageError | None]]) -> None:
        """``UndoFiles``'s booking, on the event loop: a dropped undo file's token is retired (a later change's
        COMMIT forgets its journal row); a session whose undo file could not be dropped is settled before
        its next change."""
        for change, error in results:
            if error is None:
                self._retired.add(change.token)
            else:
                log.warning("%s; it is removed before the session's next change", error.message)
                self._unsettled.add(change.session_id)

    async def cleaned(self) -> None:
        """Until every committed change's undo file was dropped (``UndoFiles.cleaned``; the caller bounds it)."""
        await self.undo_files.cleaned()

    async def _settle_change(self, change: Change) -> bool:
        """Settle one change whose writer request has finished: True when the journal says it committed.
        A failure to settle is logged and leaves the session unsettled (settled before its next change
        and at the next start); the caller's own error is what the client hears."""
        try:
            committed = await self._store.read(
                functools.partial(_is_committed, token=change.token), inline=True)
            if await trio.to_thread.run_sync(self.files.settle, change, committed):
                self._retired.add(change.token)
            return committed
        except (StorageError, *DatabaseError) as exc:
            log.error("could not settle a change of session '%s': %s; it is settled before the session's "
                      "next change", change.session_id, exc)
            self._unsettled.add(change.session_id)
            return False

    async def _settle(self, session_id: str) -> None:
        """Settle every change of ``session_id`` left in flight, from the committed journal, before the
        session changes again. First an empty write: once it is done, every write queued before it has
        committed or failed. Shielded, because it moves files; bounded by commit_timeout and one worker
        thread. Raises StorageError when the session cannot be settled (nothing else was changed)."""
        # Shielded: a settle cut short would leave the session half put back for its own next change;
        # bounded by commit_timeout for the barrier, then one read and one thread that moves few files.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.commit_timeout) as bound:
                with contextlib.suppress(StorageError):  # a failed empty batch is a barrier all the same
                    await self._store.write()
            if bound.cancelled_caught:
                raise StorageError(f"Failed to recover session '{session_id}': the store did not answer within "
                                   f"{self.commit_timeout:g} s")
            try:
                committed = await self._store.read(functools.partial(_committed_tokens, session_id=session_id))
            except DatabaseError as exc:
                raise StorageError(f"Failed to recover session '{session_id}': {exc}") from exc

            def settle() -> list[str]:
                return [change.token for change in self.files.pending(session_id)
                        if self.files.settle(change, change.token in committed)]

            self._retired.update(await trio.to_thread.run_sync(settle))
            self._unsettled.discard(session_id)

    async def metadata(self, session_id: str, *, confirm: bool = True) -> dict[str, Any] | None:
        """The stored session's metadata, or None when there is none. The file is always read, so any
        I/O failure is reported exactly as a full load would; it is parsed only when its size or mtime
        differ from what the index recorded at the last commit (a 10 MB session parses in ~80 ms). The
        index row is the one this process last committed or read (``_rows``) when it has it.

        ``confirm=False`` (a save without If-Match): with the row kept, its metadata is returned at once,
        and the file is read and compared in the save's own staging thread, before it writes anything;
        if the file differs there, the commit raises ``Stale`` having changed nothing, and the save asks
        again with ``confirm=True``. One worker-thread hop less per save (issue 16, row 3)."""
        row = self._rows.get(session_id)
        if row is not None and not confirm:
            self._unconfirmed[session_id] = (row["size"], row["file_mtime_ns"])
            return index_metadata(row)  # it always has "archived" (a parsed file's metadata may not)
        self._unconfirmed.pop(session_id, None)
        if row is None:
            found = await self._store.read(functools.partial(index_row, session_id=session_id), inline=True)
            if found is not None:
                self._rows[session_id] = row = {key: found[key] for key in found.keys()}

        def load() -> dict[str, Any] | None:
            found = self.files.read(session_id)
            if found is None:
                return None
            data, st = found
            if row is not None and (row["size"], row["file_mtime_ns"]) == (len(data), st.st_mtime_ns):
                return index_metadata(row)
            return parse_document(session_id, data)["metadata"]

        meta = await trio.to_thread.run_sync(load)
        if meta is not None:
            meta.setdefault("archived", False)
        return meta

    # ---- reads -----------------------------------------------------------------------------

    async def read_document(self, session_id: str) -> tuple[bytes, int]:
        """The session file's bytes, to be sent as they are, and its revision (for the ETag).

        The bytes are trusted without parsing when the file's size and mtime still match what the index
        recorded when it was last validated (at its save, or at start-up reconcile): decoding 12 MB only
        to encode it again held the event loop for ~400 ms. A file changed behind the index (or not in
        it) is parsed and validated first, in a worker thread; a bad one is InvalidData, as always.
        The stat is taken after the read, so matching bytes are the indexed file's (a replace in between
        changes the mtime and sends the read down the validating path)."""
        row = await self._store.read(functools.partial(index_row, session_id=session_id), inline=True)

        def load() -> tuple[bytes, int]:
            found = self.files.read(session_id)
            if found is None:
                raise NotFound(f"Session '{session_id}' not found")
            data, st = found
            if (row is not None and len(data) == st.st_size
                    and (row["size"], row["file_mtime_ns"]) == (st.st_size, st.st_mtime_ns)):
                return data, row["revision"]
            return data, parse_document(session_id, data)["metadata"]["revision"]

        return await trio.to_thread.run_sync(load)

    async def load(self, session_id: str) -> dict[str, Any]:
        return await trio.to_thread.run_sync(self.files.load_existing, session_id)

    def _load_for_resume(self, session_id: str) -> tuple[dict[str, Any], bytes | None]:
        """The validated document and its messages encoded for ``threads.base_messages``, both made in
        this worker thread in slices (runtime.codec), never on the event loop."""
        doc = self.files.load_existing(session_id)
        return doc, codec.dumps_sliced(doc["messages"]) if doc["messages"] else None

    async def load_for_resume(self, session_id: str) -> tuple[dict[str, Any], bytes | None]:
        return await trio.to_thread.run_sync(self._load_for_resume, session_id)

    async def resume_source(self, session_id: str) -> ResumeSource:
        return await trio.to_thread.run_sync(lambda: resume_source(self.files.load_existing(session_id)))

    async def exists(self, session_id: str, action: str) -> bool:
        return await trio.to_thread.run_sync(self.files.exists, session_id, action)

    # ---- delete ----------------------------------------------------------------------------

    async def delete(self, session_id: str) -> None:
        """Delete the file, its index row and the threads' links as one change: the file is moved to
        an undo name inside the writer's transaction and dropped once it committed (put back if not)."""
        change = dataclasses.replace(self.files.change(session_id), undo=BACKUP_SUFFIX)
        retired = tuple(self._retired)
        self._rows.pop(session_id, None)
        self._texts.pop(session_id, None)

        def commit(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            conn.execute("UPDATE threads SET session_id = NULL WHERE session_id = ?", (session_id,))
            _journal(conn, change, retired)
            self.files.set_aside(change)  # last: every failure before it changed no file

        # Shielded like commit: once the file may have moved, the change must be settled before
        # the lock is released; bounded by _apply's commit_timeout and one settling thread.
        with trio.CancelScope(shield=True):
            await self._apply(change, commit, [], retired, "delete")

    # ---- restore: the safety session's file, written by the engine's one write ----------------

    async def restore(self, *, thread_id: str, session_id: str, safety_id: str,
                      make_doc: Callable[[Any], dict[str, Any]],
                      send: Callable[[SafetyWriter], Awaitable[Any]]) -> Any:
        """The engine's write (runtime.engine.history.restore) stages and publishes the safety file,
        indexes and journals it, and changes the thread; then the safety change is settled from the
        journal like every session change."""
        change = self.files.change(safety_id)
        retired = tuple(self._retired)
        # "The engine's write began" and "this request gave up on it" are one decision (as in _apply).
        guard, state = threading.Lock(), {"begun": False, "gave_up": False}

        def safety(snapshot: Any) -> Any:
            """Called by the engine with its live state; returns the writer-thread part of its write."""
            safety_doc = make_doc(snapshot)

            def write(conn: sqlite3.Connection) -> None:
                with guard:
                    if state["gave_up"]:
                        raise StorageError(f"Failed to restore thread '{thread_id}': the request gave up")
                    state["begun"] = True
                try:
                    staged = self.files.stage(change, encode(safety_doc), "save", replacing=False)
                    upsert_index(conn, safety_doc, staged.size, staged.mtime_ns)
                    _journal(conn, staged, retired)
                    self.files.publish(staged, "save")  # last: every failure before it changed no file
                except StorageError as exc:
                    # Name the restore the client asked for, not only the safety session it never saw.
                    raise type(exc)(f"Failed to restore thread '{thread_id}' from session '{session_id}': "
                                    f"{exc.message[0].lower()}{exc.message[1:]}") from exc

            return write

        # Shielded: from here the engine may apply the change, so this request waits for its outcome and
        # settles the safety session's files (a cancellation meanwhile waits too). Bounded by
        # commit_timeout for the engine's answer, then one read and one thread that moves few files.
        with trio.CancelScope(shield=True):
            try:
                result = await send(safety)
            except EngineTimeout:
                with guard:
                    state["gave_up"] = True
                    begun = state["begun"]
                if begun:  # the write may still commit: settled at the session's next change or start
                    self._unsettled.add(safety_id)
                else:
                    await self._settle_change(change)
                raise
            except BaseException:
                await self._settle_change(change)
                raise
            if await self._settle_change(change):
                self._retired.difference_update(retired)
        return result


def _journal(conn: sqlite3.Connection, change: Change, retired: tuple[str, ...]) -> None:
    """Record ``change`` as committed (the row commits with the change or not at all), and forget
    ``retired`` changes: their undo files were removed before this request was queued, and this
    transaction commits only after a directory fsync made that durable."""
    conn.execute("INSERT INTO session_commits (token, session_id) VALUES (?, ?)", (change.token, change.session_id))
    if retired:
        conn.execute("DELETE FROM session_commits WHERE token IN (SELECT value FROM json_each(?))",
                     (json.dumps(retired),))


def _is_committed(conn: sqlite3.Connection, token: str) -> bool:
    return conn.execute("SELECT 1 FROM session_commits WHERE token = ?", (token,)).fetchone() is not None


def _committed_tokens(conn: sqlite3.Connection, session_id: str) -> set[str]:
    return {row[0] for row in conn.execute("SELECT token FROM session_commits WHERE session_id = ?", (session_id,))}
