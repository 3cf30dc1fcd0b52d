"""Saved sessions: save live engine state, rebuild from the store, list, patch, delete, resume.

Every mutation has two phases. The *wait* phase (lock, load, ask the engine) is cancellable and
bounded by the caller's timeout; cancelled there, nothing has changed. The *commit* phase runs under a
shield: stage the new file beside the old one (kept as an undo file), then one request to the store's
writer puts the file in place and writes the index row, the thread link, the ``session.saved`` event
and a journal row in one transaction; after it the undo file is dropped, or, when the transaction did
not commit, put back. A cancellation (timeout, client disconnect, shutdown) arriving meanwhile waits
for it to finish; a kill -9 at any point is settled at the next start from the journal. So every
outcome is "nothing changed" or "the whole save is durable and linked" (docs/design.md, "Sessions").

The session files are the source of truth; the ``sessions`` table is an index for listing and
search, written in the same transaction as each file and reconciled with the directory on start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import sqlite3
import threading
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

import trio

from .. import codec
from ..clock import new_id, utc_now
from ..config import RuntimeConfig
from ..engine import ops
from ..engine.manager import ThreadManager
from ..errors import Conflict, EngineTimeout, InvalidInput, NotFound, PreconditionFailed, StorageError
from ..idempotency import Claim
from . import portable
from .files import (
    BACKUP_SUFFIX, SESSION_SCHEMA_VERSION, Change, SessionFiles, encode_document, parse_document,
    validate_session_id,
)
from ..store import DatabaseError, EventDraft, Store, records
from ..transcript import build_messages, derive_title, first_user_text, text_of

log = logging.getLogger(__name__)


class SessionHost(Protocol):
    """What a SessionService uses of the Runtime that builds it (``Runtime`` is the one implementation).

    Declared here, not imported from ``runtime.core``, so sessions never imports core: core builds the
    service and passes itself, and the module graph stays acyclic (tests/test_layout.py)."""

    config: RuntimeConfig
    store: Store
    manager: ThreadManager
    # Runtime.create_thread and Runtime.get_session_snapshot: keyword arguments as there.
    create_thread: Callable[..., Awaitable[dict[str, Any]]]
    get_session_snapshot: Callable[..., Awaitable[ops.SessionSnapshot]]
    # Runtime._request: send one op to a thread's engine (started or restored if needed) and await its
    # reply; private to the Runtime's public face, shared with the service it builds.
    _request: Callable[..., Awaitable[Any]]


SORTS = {
    "recent": "updated_at DESC, id",
    "name": "title COLLATE NOCASE ASC, id",
    "size": "size DESC, id",
}
# What the index's readers select: never ``search_text`` (a session's whole text, 1 MB for a 1 MB
# session), which only the WHERE of a search reads, inside SQLite.
INDEX_COLUMNS = ("id, title, created_at, updated_at, message_count, total_tokens, model, workspace, mode,"
                 " archived, revision, size, file_mtime_ns")
# The commit phase is shielded; this bounds it so a wedged disk cannot hold a request forever.
COMMIT_TIMEOUT = 60.0
UNTITLED = "Untitled session"
# Resume's wait for the session's lock when the caller gives no timeout (the server passes its request
# timeout); the same default as every Runtime request.
RESUME_TIMEOUT = 10.0


def normalize_title(title: object) -> str:
    if not isinstance(title, str):
        raise InvalidInput("title must be a string")
    cleaned = derive_title(title)
    if not cleaned:
        raise InvalidInput("title must not be blank")
    return cleaned


def _search_text(title: str, messages: list[dict[str, Any]]) -> bytes:
    """The lower-cased text search matches, UTF-8 encoded (stored with ``CAST(? AS TEXT)``). Built a
    message at a time, handing the GIL to the event loop in between: lower-casing or encoding 12 MB in
    one call holds the GIL for ~60 ms, which stalls the event loop even from the staging thread.
    (Joined by newlines, the parts lower-case exactly as the whole would: no letter meets a letter
    across a boundary.)"""
    def lowered(message: dict[str, Any]) -> bytes:
        codec.let_others_run()
        return text_of(message).lower().encode("utf-8")

    return b"\n".join([title.lower().encode("utf-8"), *(lowered(m) for m in messages)])


def _like_pattern(search: str) -> str:
    escaped = search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class _Document(dict):
    """A session document that keeps the bytes it was saved as, so that PUT's response, which repeats
    the whole session, reuses the file's bytes instead of encoding 12 MB again on the event loop."""

    encoded: bytes | None = None


def _encode(doc: dict[str, Any]) -> bytes:
    """The document's file bytes (runs in the commit's staging thread); a ``_Document`` keeps them."""
    data = encode_document(doc)
    if isinstance(doc, _Document):
        doc.encoded = data
    return data


class SessionService:
    def __init__(self, runtime: SessionHost) -> None:
        self._rt = runtime
        self.files = SessionFiles(runtime.config.sessions_dir, runtime.config.session_fs)  # type: ignore[arg-type]
        self._locks: dict[str, list[Any]] = {}  # id -> [lock, holders and waiters]; dropped at zero
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

    # ---- startup ---------------------------------------------------------------------------

    async def open(self) -> None:
        await trio.to_thread.run_sync(self.files.prepare)
        await self._rt.store.write(fn=self._reconcile)

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

    # ---- locking ---------------------------------------------------------------------------

    async def _acquire(self, session_id: str, deadline: float) -> trio.Lock:
        slot = self._locks.setdefault(session_id, [trio.Lock(), 0])
        slot[1] += 1
        try:
            with trio.move_on_at(deadline):
                await slot[0].acquire()
                return slot[0]
            raise Conflict(f"Session '{session_id}' is in use by a live save")
        except BaseException:
            self._release_slot(session_id, slot)
            raise

    def _release(self, session_id: str) -> None:
        slot = self._locks[session_id]
        slot[0].release()
        self._release_slot(session_id, slot)

    def _release_slot(self, session_id: str, slot: list[Any]) -> None:
        slot[1] -= 1
        if slot[1] == 0 and self._locks.get(session_id) is slot:
            del self._locks[session_id]

    @contextlib.asynccontextmanager
    async def _locked(self, session_id: str, deadline: float) -> AsyncIterator[None]:
        """Serialise every mutation of one session id (never two writers in one file). Waiting past
        ``deadline`` is a Conflict: another save holds the session. Inside, the session's earlier
        change is settled first if it may have left work files (``_settle``)."""
        await self._acquire(session_id, deadline)
        try:
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
            yield
        finally:
            self._release(session_id)

    # ---- commit ----------------------------------------------------------------------------

    async def _commit(self, doc: dict[str, Any], *, action: str, thread_id: str | None,
                      event: dict[str, Any] | None, replacing: bool, claim: Claim | None = None,
                      answer: Any = None) -> None:
        """The commit phase, shielded as a whole: once it starts it runs to its end, so the caller
        always learns the outcome and never releases the session's lock early.

        Encoding the document, writing + fsyncing the temp file and keeping the previous file as an
        undo file run in a worker thread of their own, so saves of different sessions overlap (and the
        event loop never encodes a 10 MB document). Then one writer request writes index row, thread
        link and journal row, and last puts the file in place (``replacing``: over the previous one);
        ``_apply`` settles what follows. Raises StorageError (StorageFull for a full disk) naming
        ``action`` when nothing was saved. ``claim``: the request's idempotency record of ``answer``,
        written by that same writer request (so it commits with the change or not at all).
        """
        session_id = doc["metadata"]["id"]
        change = self.files.change(session_id)
        # The staging thread can be abandoned (a stuck disk): ``guard`` makes "the thread finished" and
        # "the request gave up" one decision, so exactly one of them cleans up.
        guard, flags, staged_or_abandoned = threading.Lock(), {"done": False, "abandoned": False}, trio.Event()
        token = trio.lowlevel.current_trio_token()

        def stage() -> tuple[Change, str]:
            try:
                data = _encode(doc)
                staged = self.files.stage(change, data, action, replacing=replacing)
                return staged, _search_text(doc["metadata"]["title"], doc["messages"])
            finally:
                with guard:
                    flags["done"] = True
                    abandoned = flags["abandoned"]
                if abandoned:  # the request gave up on a stuck disk meanwhile: leave nothing behind
                    with contextlib.suppress(StorageError):
                        self.files.settle(change, committed=False)
                    with contextlib.suppress(trio.RunFinishedError):
                        token.run_sync_soon(staged_or_abandoned.set)

        events = []
        if event is not None and thread_id is not None:
            events.append(EventDraft(thread_id, "session.saved", event))
        # Shielded: see the docstring. Bounded by commit_timeout for the staging thread, then by
        # ``_apply``'s own bound on the writer.
        with trio.CancelScope(shield=True):
            failure: Exception | None = None
            with trio.move_on_after(self.commit_timeout) as bound:
                # Abandonable: if the disk is stuck, give up (nothing was published) and let the
                # thread clean up after itself when it finishes.
                try:
                    staged, search_text = await trio.to_thread.run_sync(stage, abandon_on_cancel=True)
                except Exception as exc:
                    failure = exc
            if failure is not None:
                await self._settle_change(change)  # nothing was published; in case the stage's cleanup failed
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
            retired = tuple(self._retired)

            def commit(conn: sqlite3.Connection) -> None:
                upsert_index(conn, doc, staged.size, staged.mtime_ns, search_text)
                if thread_id is not None:
                    conn.execute("UPDATE threads SET session_id = ? WHERE id = ?", (session_id, thread_id))
                _journal(conn, staged, retired)
                if claim is not None:
                    claim.record(conn, answer)
                self.files.publish(staged, action)  # last: every failure before it changed no file

            await self._apply(staged, commit, events, retired, action)

    async def _apply(self, change: Change, fn: Any, events: list[EventDraft], retired: tuple[str, ...],
                     action: str) -> None:
        """Run a change's writer request, then settle the change: committed, its undo file goes;
        not committed, the previous file comes back; the journal decides either way. Called
        shielded; the writer wait has its own bound (commit_timeout). Past it, a request the writer
        has not begun is refused when the writer reaches it (nothing was saved); one it has begun has
        an unknown outcome: nothing is undone (the writer may still commit), and the session is
        settled before its next change."""
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
                await self._rt.store.write(fn=guarded, events=events)
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
                named = _named(failure, action, session_id)
                if named is failure:
                    raise failure
                raise named from failure
            log.error("the store reported %r for a change of session '%s' that committed", failure, session_id)
        self._retired.difference_update(retired)
        try:
            await trio.to_thread.run_sync(self.files.finish, change)
        except StorageError as exc:
            log.warning("%s; it is removed before the session's next change", exc.message)
            self._unsettled.add(session_id)
        else:
            self._retired.add(change.token)

    async def _settle_change(self, change: Change) -> bool:
        """Settle one change whose writer request has finished: True when the journal says it committed.
        A failure to settle is logged and leaves the session unsettled (settled before its next change
        and at the next start); the caller's own error is what the client hears."""
        try:
            committed = await self._rt.store.read(
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
                    await self._rt.store.write()
            if bound.cancelled_caught:
                raise StorageError(f"Failed to recover session '{session_id}': the store did not answer within "
                                   f"{self.commit_timeout:g} s")
            try:
                committed = await self._rt.store.read(functools.partial(_committed_tokens, session_id=session_id))
            except DatabaseError as exc:
                raise StorageError(f"Failed to recover session '{session_id}': {exc}") from exc

            def settle() -> list[str]:
                return [change.token for change in self.files.pending(session_id)
                        if self.files.settle(change, change.token in committed)]

            self._retired.update(await trio.to_thread.run_sync(settle))
            self._unsettled.discard(session_id)

    async def _stored_metadata(self, session_id: str) -> dict[str, Any] | None:
        """The stored session's metadata, or None when there is none. The file is always read, so any
        I/O failure is reported exactly as a full load would; it is parsed only when its size or mtime
        differ from what the index recorded at the last commit (a 10 MB session parses in ~80 ms)."""
        row = await self._rt.store.read(functools.partial(_index_row, session_id=session_id), inline=True)

        def load() -> dict[str, Any] | None:
            found = self.files.read(session_id)
            if found is None:
                return None
            data, st = found
            if row is not None and (row["size"], row["file_mtime_ns"]) == (len(data), st.st_mtime_ns):
                return _index_metadata(row)
            return parse_document(session_id, data)["metadata"]

        meta = await trio.to_thread.run_sync(load)
        if meta is not None:
            meta.setdefault("archived", False)
        return meta

    # ---- PUT: save live engine state -------------------------------------------------------

    async def save(self, *, thread_id: str | None = None, session_id: str | None = None,
                   wait_for_idle: bool = False, if_match: int | str | None = None,
                   timeout: float, claim: Claim | None = None) -> dict[str, Any]:
        """Save the thread's live engine state. Waits (lock, load, engine snapshot) under ``timeout``;
        the commit is shielded. Cancelled or timed out before the commit: nothing was written."""
        deadline = trio.current_time() + timeout
        if session_id is not None:
            validate_session_id(session_id)
        if thread_id is None:
            thread_id = await self._rt.store.read(records.most_recent_thread_id, inline=True)
            if thread_id is None:
                raise InvalidInput("No threads to save")
        target = session_id or str(uuid.uuid4())
        async with self._locked(target, deadline):
            existing = None
            if session_id is not None:
                existing = await self._stored_metadata(session_id)
            _check_if_match(target, existing["revision"] if existing else None, if_match)
            snapshot = await self._rt.get_session_snapshot(
                thread_id, wait_for_idle=wait_for_idle, timeout=max(0.0, deadline - trio.current_time()))
            now = utc_now()
            messages = list(snapshot.messages)
            if existing is not None:
                created_at, title, revision, archived = (existing["created_at"], existing["title"],
                                                         existing["revision"] + 1, existing["archived"])
            else:
                created_at, revision, archived = now, 1, False
                title = derive_title(snapshot.title or "") or derive_title(first_user_text(messages)) or UNTITLED
            doc = _Document({
                "schema_version": SESSION_SCHEMA_VERSION,
                "metadata": {
                    "id": target, "title": title, "created_at": created_at, "updated_at": now,
                    "message_count": len(messages), "total_tokens": snapshot.total_tokens,
                    "model": snapshot.model, "workspace": snapshot.workspace, "mode": snapshot.mode,
                    "archived": archived, "revision": revision, "thread_id": thread_id,
                },
                "messages": messages,
                "system_prompt": snapshot.system_prompt,
            })
            # ``session`` is the saved document itself (its ``schema_version`` too); ``session.encoded`` holds
            # the file's bytes (set by the commit's staging), which the HTTP layer sends as they are.
            result = {"session_id": target, "thread_id": thread_id, "turn_in_progress": snapshot.turn_in_progress,
                      "session": doc}
            await self._commit(doc, action="save", thread_id=thread_id, event={
                "session_id": target, "revision": revision, "message_count": len(messages),
                "turn_in_progress": snapshot.turn_in_progress, "created": existing is None,
            }, replacing=existing is not None, claim=claim, answer=result)
        return result

    # ---- POST: rebuild from stored items ---------------------------------------------------

    async def rebuild(self, *, thread_id: str, title: str | None = None, timeout: float,
                      claim: Claim | None = None) -> dict[str, Any]:
        """Rebuild a new session from the thread's stored items (no engine involved)."""
        if not isinstance(thread_id, str) or not thread_id.strip():
            raise InvalidInput("thread_id must not be blank")
        given_title = normalize_title(title) if title is not None else None
        engine = self._rt.manager.engine(thread_id)
        if engine is not None and engine.active is not None:
            raise Conflict(f"Thread '{thread_id}' has a turn in progress ('{engine.active.id}')")
        state = await self._rt.store.read(functools.partial(_rebuild_state, thread_id=thread_id))
        if state is None:
            raise NotFound(f"Thread '{thread_id}' not found")
        if state["active_turn"]:
            raise Conflict(f"Thread '{thread_id}' has a turn in progress ('{state['active_turn']}')")
        messages = build_messages(state["base_messages"], state["items"])
        if not messages:
            raise InvalidInput(f"Thread '{thread_id}' has no messages to save")
        thread = state["thread"]
        final_title = given_title or derive_title(thread["title"] or "") or derive_title(
            first_user_text(messages)) or UNTITLED
        session_id = str(uuid.uuid4())
        now = utc_now()
        doc = {
            "schema_version": SESSION_SCHEMA_VERSION,
            "metadata": {
                "id": session_id, "title": final_title, "created_at": now, "updated_at": now,
                "message_count": len(messages), "total_tokens": state["total_tokens"], "model": thread["model"],
                "workspace": thread["workspace"], "mode": thread["mode"], "archived": False, "revision": 1,
                "thread_id": thread_id,
            },
            "messages": messages,
            "system_prompt": thread["system_prompt"],
        }
        result = {"session_id": session_id, "thread_id": thread_id, "message_count": len(messages),
                  "title": final_title}
        await self._commit(doc, action="save", thread_id=thread_id, event={
            "session_id": session_id, "revision": 1, "message_count": len(messages),
            "turn_in_progress": False, "created": True,
        }, replacing=False, claim=claim, answer=result)
        return result

    # ---- reads -----------------------------------------------------------------------------

    async def list(self, *, limit: int, search: str | None = None, include_archived: bool = False,
                   archived_only: bool = False, sort: str = "recent") -> list[dict[str, Any]]:
        if sort not in SORTS:
            raise InvalidInput(f"sort must be one of: {', '.join(SORTS)}")
        where, params = [], []
        if archived_only:
            where.append("archived = 1")
        elif not include_archived:
            where.append("archived = 0")
        if search:
            where.append("search_text LIKE ? ESCAPE '\\'")
            params.append(_like_pattern(search))
        sql = (f"SELECT {INDEX_COLUMNS} FROM sessions {'WHERE ' + ' AND '.join(where) if where else ''}"
               f" ORDER BY {SORTS[sort]} LIMIT ?")
        params.append(limit)

        def query(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            return [_index_metadata(row) for row in conn.execute(sql, params)]

        # A page of index rows is a small read; a search scans search_text, so it stays off the loop.
        return await self._rt.store.read(query, inline=not search)

    async def read_document(self, session_id: str) -> tuple[bytes, int]:
        """The session file's bytes, to be sent as they are, and its revision (for the ETag).

        The bytes are trusted without parsing when the file's size and mtime still match what the index
        recorded when it was last validated (at its save, or at start-up reconcile): decoding 12 MB only
        to encode it again held the event loop for ~400 ms. A file changed behind the index (or not in
        it) is parsed and validated first, in a worker thread; a bad one is InvalidData, as always.
        The stat is taken after the read, so matching bytes are the indexed file's (a replace in between
        changes the mtime and sends the read down the validating path)."""
        validate_session_id(session_id)
        row = await self._rt.store.read(functools.partial(_index_row, session_id=session_id), inline=True)

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

    async def get(self, session_id: str) -> dict[str, Any]:
        """The session document as Python values (what ``read_document``'s bytes decode to)."""
        data, _ = await self.read_document(session_id)
        doc = await trio.to_thread.run_sync(codec.loads, data)
        return {"metadata": doc["metadata"], "messages": doc["messages"], "system_prompt": doc.get("system_prompt")}

    # ---- PATCH / DELETE --------------------------------------------------------------------

    async def patch(self, session_id: str, *, title: str | None = None, archived: bool | None = None,
                    if_match: int | str | None = None, timeout: float) -> dict[str, Any]:
        validate_session_id(session_id)
        if title is None and archived is None:
            raise InvalidInput("Give at least one of: title, archived")
        new_title = normalize_title(title) if title is not None else None
        deadline = trio.current_time() + timeout
        async with self._locked(session_id, deadline):
            doc = await trio.to_thread.run_sync(self.files.load_existing, session_id)
            _check_if_match(session_id, doc["metadata"]["revision"], if_match)
            meta = dict(doc["metadata"])
            changes: dict[str, Any] = {}
            if new_title is not None and new_title != meta["title"]:
                changes["title"] = new_title
            if archived is not None and bool(archived) != bool(meta.get("archived", False)):
                changes["archived"] = bool(archived)
            if changes:
                meta.update(changes)
                meta["revision"] += 1
                meta["updated_at"] = utc_now()
                doc = {**doc, "metadata": meta}
                await self._commit(doc, action="update", thread_id=None, event=None, replacing=True)
        return {"session": meta, "changes": changes}

    async def delete(self, session_id: str, *, timeout: float) -> None:
        """Delete the file, its index row and the threads' links as one change: the file is moved to
        an undo name inside the writer's transaction and dropped once it committed (put back if not).
        The lock wait is bounded by ``timeout``; the commit phase is shielded (see ``_commit``)."""
        validate_session_id(session_id)
        deadline = trio.current_time() + timeout
        async with self._locked(session_id, deadline):
            change = dataclasses.replace(self.files.change(session_id), undo=BACKUP_SUFFIX)
            retired = tuple(self._retired)

            def commit(conn: sqlite3.Connection) -> None:
                conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
                conn.execute("UPDATE threads SET session_id = NULL WHERE session_id = ?", (session_id,))
                _journal(conn, change, retired)
                self.files.set_aside(change)  # last: every failure before it changed no file

            # Shielded like _commit: once the file may have moved, the change must be settled before
            # the lock is released; bounded by _apply's commit_timeout and one settling thread.
            with trio.CancelScope(shield=True):
                await self._apply(change, commit, [], retired, "delete")

    # ---- resume ----------------------------------------------------------------------------

    def _load_for_resume(self, session_id: str) -> tuple[dict[str, Any], bytes | None]:
        """The validated document and its messages encoded for ``threads.base_messages``, both made in
        this worker thread in slices (runtime.codec), never on the event loop."""
        doc = self.files.load_existing(session_id)
        return doc, codec.dumps_sliced(doc["messages"]) if doc["messages"] else None

    async def resume(self, session_id: str, *, model: str | None = None, mode: str | None = None,
                     timeout: float = RESUME_TIMEOUT, claim: Claim | None = None) -> dict[str, Any]:
        """A new thread whose engine starts from the session's messages (its next turn sees them all).

        Holds the session's lock from the load to the thread's commit, so a DELETE, save or PATCH of the
        same session comes wholly before the resume or wholly after it: the new thread is never linked to
        a session deleted meanwhile (a DELETE after it unlinks it, as it unlinks every thread). Waiting for
        the lock counts against ``timeout`` (past it: Conflict); cancelled while waiting or loading, nothing
        was created. The thread's create is one shielded store write: once it started, the caller learns
        its id.
        """
        validate_session_id(session_id)
        deadline = trio.current_time() + timeout
        async with self._locked(session_id, deadline):
            doc, base_json = await trio.to_thread.run_sync(self._load_for_resume, session_id)
            meta = doc["metadata"]
            messages = doc["messages"]
            total = meta.get("total_tokens", 0)
            thread_id = new_id("thr")
            result = {
                "thread_id": thread_id, "session_id": session_id, "message_count": len(messages),
                "summary": f"Resumed {len(messages)} message(s) from session '{meta['title']}'",
            }
            with trio.CancelScope(shield=True):  # one bounded store write; the caller always learns its id
                await self._rt.create_thread(
                    model=model or meta.get("model"), mode=mode or meta.get("mode"), workspace=meta.get("workspace"),
                    system_prompt=doc.get("system_prompt"), title=meta["title"], base_messages=messages,
                    base_tokens=total if isinstance(total, int) else 0, session_id=session_id,
                    base_messages_json=base_json, thread_id=thread_id, claim=claim, answer=result)
        return result

    # ---- export / import (portable sessions) ----------------------------------------------

    async def export(self, session_id: str, format: str = "json") -> tuple[bytes, str, str]:
        """The session as a download: (body, Content-Type, file name). ``json`` is the stored file's
        bytes as they are (``read_document``: never decoded and encoded again); ``markdown`` a readable
        transcript, rendered in a worker thread. A read only: a cancellation leaves nothing behind."""
        content_type, extension = portable.FORMATS[portable.check_format(format)]
        validate_session_id(session_id)
        data, _ = await self.read_document(session_id)
        if format == "markdown":
            data = await trio.to_thread.run_sync(lambda: portable.render_markdown(codec.loads(data)))
        return data, content_type, f"{session_id}.{extension}"

    async def import_document(self, data: bytes, *, session_id: str | None = None, timeout: float,
                              claim: Claim | None = None) -> dict[str, Any]:
        """Store a document (as a ``json`` export gives it) as a new session: ``session_id``, else the
        document's own ``metadata.id``; revision 1, every other field as it is. Checked exactly as a
        file on load, in a worker thread, before anything is written (InvalidInput naming the path);
        an existing id is a Conflict, checked under the session's lock, which is held through the
        commit. Waiting for the lock counts against ``timeout``; cancelled before the commit, nothing
        was written; the commit is ``_commit``'s (shielded, all or nothing, indexed and listed)."""
        deadline = trio.current_time() + timeout
        if session_id is not None:
            validate_session_id(session_id)
        doc, target = await trio.to_thread.run_sync(portable.decode_import, data, session_id)
        async with self._locked(target, deadline):
            if await trio.to_thread.run_sync(self.files.exists, target, "import"):
                raise Conflict(f"Cannot import session '{target}': a session with that id already exists")
            result = {"session_id": target, "revision": 1}
            await self._commit(doc, action="import", thread_id=None, event=None, replacing=False, claim=claim,
                               answer=result)
        return result

    # ---- restore: a thread's live history from a session, its current one saved first -----------

    async def restore(self, thread_id: str, session_id: str, *, if_busy: str = "reject",
                      if_match: int | str | None = None, timeout: float, claim: Claim | None = None) -> dict[str, Any]:
        """Replace the thread's live history with the session's messages, and save the state it replaces
        as a new session (``safety_session_id``) in the same store write, so restoring that one undoes this.

        Wait phase (cancellable, bounded by ``timeout``): both sessions' locks, loading and validating the
        session (400 for a file that does not parse), If-Match. Commit phase, shielded: the engine applies
        the op (runtime.engine.history.restore), whose one write stages and publishes the safety file, indexes and
        journals it, and changes the thread; then the safety change is settled from the journal like every
        session change. So a timeout, a disconnect, a storage error or a kill -9 leaves thread and sessions
        exactly before or exactly after."""
        validate_session_id(session_id)
        deadline = trio.current_time() + timeout
        safety_id = str(uuid.uuid4())
        async with self._locked(session_id, deadline), self._locked(safety_id, deadline):
            doc, messages_json = await trio.to_thread.run_sync(self._load_for_resume, session_id)
            meta = doc["metadata"]
            _check_if_match(session_id, meta["revision"], if_match)
            change = self.files.change(safety_id)
            retired = tuple(self._retired)
            # "The engine's write began" and "this request gave up on it" are one decision (as in _apply).
            guard, state = threading.Lock(), {"begun": False, "gave_up": False}

            def safety(snapshot: Any) -> Any:
                """Called by the engine with its live state; returns the writer-thread part of its write."""
                title = derive_title("Before restore: " + (derive_title(snapshot.title or "") or derive_title(
                    first_user_text(list(snapshot.messages))) or UNTITLED))
                now = utc_now()
                safety_doc = {
                    "schema_version": SESSION_SCHEMA_VERSION,
                    "metadata": {
                        "id": safety_id, "title": title, "created_at": now, "updated_at": now,
                        "message_count": len(snapshot.messages), "total_tokens": snapshot.total_tokens,
                        "model": snapshot.model, "workspace": snapshot.workspace, "mode": snapshot.mode,
                        "archived": False, "revision": 1, "thread_id": thread_id,
                    },
                    "messages": list(snapshot.messages),
                    "system_prompt": snapshot.system_prompt,
                }

                def write(conn: sqlite3.Connection) -> None:
                    with guard:
                        if state["gave_up"]:
                            raise StorageError(f"Failed to restore thread '{thread_id}': the request gave up")
                        state["begun"] = True
                    try:
                        staged = self.files.stage(change, _encode(safety_doc), "save", replacing=False)
                        upsert_index(conn, safety_doc, staged.size, staged.mtime_ns)
                        _journal(conn, staged, retired)
                        self.files.publish(staged, "save")  # last: every failure before it changed no file
                    except StorageError as exc:
                        # Name the restore the client asked for, not only the safety session it never saw.
                        raise type(exc)(f"Failed to restore thread '{thread_id}' from session '{session_id}': "
                                        f"{exc.message[0].lower()}{exc.message[1:]}") from exc

                return write

            op_timeout = self.commit_timeout
            # Shielded: from here the engine may apply the change, so this request waits for its outcome and
            # settles the safety session's files (a cancellation meanwhile waits too). Bounded by
            # commit_timeout for the engine's answer, then one read and one thread that moves few files.
            with trio.CancelScope(shield=True):
                try:
                    result = await self._rt._request(thread_id, lambda r: ops.Restore(
                        session_id=session_id, revision=meta["revision"], messages=doc["messages"],
                        messages_json=messages_json, total_tokens=_tokens(meta), system_prompt=doc.get("system_prompt"),
                        safety_session_id=safety_id, safety=safety, if_busy=if_busy, claim=claim, reply=r),
                        timeout=op_timeout, what="restore the thread")
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


def _tokens(meta: dict[str, Any]) -> int:
    total = meta.get("total_tokens", 0)
    return total if isinstance(total, int) and not isinstance(total, bool) else 0


def _check_if_match(session_id: str, current: int | None, if_match: int | str | None) -> None:
    """``current``: the stored revision, None when the session does not exist."""
    if if_match is None:
        return
    if if_match == "*":
        if current is None:
            raise PreconditionFailed(f"Session '{session_id}' does not exist (If-Match: *)")
        return
    if current != if_match:
        raise PreconditionFailed(
            f"Session '{session_id}' is at revision {current if current is not None else 'none'}, not {if_match}")


def upsert_index(conn: sqlite3.Connection, doc: dict[str, Any], size: int, mtime_ns: int,
                 search_text: bytes | None = None) -> None:
    """Insert or replace the ``sessions`` index row of session ``doc`` (a checked session document)
    whose file is ``size`` bytes with mtime ``mtime_ns``; ``search_text`` defaults to the title and
    message text the search reads.

    The SessionService calls it in the same store transaction that puts the file in place, so the row
    and the file never disagree after a commit. Public for tools that write session files outside a
    server (bench/datagen.py): they must call it in one transaction with their writes, on a database
    migrated by ``runtime.store.migrations``; the next start re-indexes a file whose size or mtime
    disagrees with its row."""
    meta = doc["metadata"]
    if search_text is None:
        search_text = _search_text(meta["title"], doc["messages"])
    conn.execute(
        "INSERT INTO sessions (id, title, created_at, updated_at, message_count, total_tokens, model, workspace,"
        " mode, archived, revision, size, file_mtime_ns, search_text)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, CAST(? AS TEXT))"
        " ON CONFLICT (id) DO UPDATE SET title = excluded.title, created_at = excluded.created_at,"
        " updated_at = excluded.updated_at, message_count = excluded.message_count,"
        " total_tokens = excluded.total_tokens, model = excluded.model, workspace = excluded.workspace,"
        " mode = excluded.mode, archived = excluded.archived, revision = excluded.revision, size = excluded.size,"
        " file_mtime_ns = excluded.file_mtime_ns, search_text = excluded.search_text",
        (meta["id"], meta["title"], meta["created_at"], meta["updated_at"], len(doc["messages"]),
         str(meta.get("total_tokens", 0)), meta.get("model"), meta.get("workspace"), meta.get("mode"),
         int(bool(meta.get("archived", False))), meta["revision"], size, mtime_ns, search_text),
    )


def _index_metadata(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"], "title": row["title"], "created_at": row["created_at"], "updated_at": row["updated_at"],
        "message_count": row["message_count"], "total_tokens": int(row["total_tokens"]), "model": row["model"],
        "workspace": row["workspace"], "mode": row["mode"], "archived": bool(row["archived"]),
        "revision": row["revision"], "size": row["size"],
    }


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


def _named(exc: Exception, action: str, session_id: str) -> Exception:
    """A store error names the session action it broke (``Failed to save session 'x': disk I/O error``),
    keeping its class (StorageFull stays StorageFull); other errors pass unchanged."""
    if not isinstance(exc, StorageError):
        return exc
    prefix = f"Failed to {action} session '{session_id}'"
    if exc.message.startswith(prefix):
        return exc
    reason, cause = exc.message, exc.__cause__
    while cause is not None:  # the store keeps SQLite's own error as the cause: it is the reason
        if isinstance(cause, DatabaseError):
            reason = str(cause)
            break
        cause = cause.__cause__
    return type(exc)(f"{prefix}: {reason}")


def _index_row(conn: sqlite3.Connection, session_id: str) -> sqlite3.Row | None:
    return conn.execute(f"SELECT {INDEX_COLUMNS} FROM sessions WHERE id = ?", (session_id,)).fetchone()


def _rebuild_state(conn: sqlite3.Connection, thread_id: str) -> dict[str, Any] | None:
    state = records.engine_state(conn, thread_id)
    if state is None:
        return None
    active = conn.execute(
        "SELECT id FROM turns WHERE thread_id = ? AND status IN ('queued', 'in_progress') LIMIT 1", (thread_id,)
    ).fetchone()
    state["active_turn"] = active["id"] if active else None
    state["total_tokens"] = state["base_tokens"] + state["turn_tokens"]
    return state
