"""Saved sessions: save live engine state, rebuild from the store, list, patch, delete, resume.

Every mutation has two phases. The *wait* phase (lock, load, ask the engine) is cancellable and
bounded by the caller's timeout; cancelled there, nothing has changed. The *commit* phase runs under a
shield and is all or nothing: the document, its ``sessions`` index row, the thread link, the
``session.saved`` event and the idempotency record commit together or not at all. How is the storage's
(runtime/sessions/docs.py, chosen by ``RuntimeConfig.session_storage``): session files with an undo
file and a journal settled after a crash (filedocs.py), or a row of the store's ``session_docs`` table
in the same transaction (docs.StoreDocs). A cancellation (timeout, client disconnect, shutdown) arriving
during the commit waits for it to finish. So every outcome is "nothing changed" or "the whole save is
durable and linked" (docs/design.md, "Sessions").

The ``sessions`` table is an index for listing and search, written in the same transaction as each
document.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

import trio

from .. import codec
from ..clock import new_id, utc_now
from ..config import RuntimeConfig
from ..engine import ops
from ..engine.manager import ThreadManager
from ..errors import Conflict, InvalidInput, NotFound, PreconditionFailed
from ..idempotency import Claim
from . import portable
from .docs import (
    COMMIT_TIMEOUT, INDEX_COLUMNS, STORAGE_KINDS, Document, SafetyWriter, SessionDocs, Stale, StoreDocs,
    index_metadata, upsert_index,
)
from .filedocs import FileDocs
from .files import SESSION_SCHEMA_VERSION, SessionFiles, validate_session_id
from ..store import EventDraft, Store, records
from ..transcript import build_messages, derive_title, first_user_text

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
    # LOWER(), not COLLATE NOCASE (SQLite only): the same order on SQLite, portable SQL for PostgreSQL.
    "name": "LOWER(title) ASC, id",
    "size": "size DESC, id",
}
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


def _like_pattern(search: str) -> str:
    escaped = search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# The FTS5 trigram tokenizer indexes runs of this many characters: a shorter query cannot use the index.
TRIGRAM = 3
# A search whose trigrams leave at most this many candidate rows fetches them by rowid and sorts them;
# with more, it walks the listing's index in order and stops at ``limit`` matches. Measured on the bench
# store (issue 16, 10,000 sessions): fetching and checking a candidate costs about what walking 50 index
# entries does, so 500 candidates cost about a walk of 25,000 sessions.
FEW_CANDIDATES = 500
# Candidates whose documents add up to at most this many bytes are searched on the event loop (an inline
# read): their search text is at most about as long, and SQLite's LIKE reads 1 MB in 0.2-0.5 ms (measured
# for issue 16), less than the hop to a worker thread costs a request under load.
INLINE_SEARCH_BYTES = 1_000_000
# What SQLite migration 8 indexes instead of a search text longer than 32,768 characters (three Unicode
# noncharacters): every trigram query also asks for it, so long sessions are always candidates.
LONG_TEXT_MARKER = "\ufdd0\ufdd1\ufdd2"
# At most this many of a query's trigrams narrow a search: each one is a lookup, and any of them is a
# correct filter (a row holding the whole query holds every one of them); 32 keep a 100-character query
# exact to the character.
MAX_TRIGRAMS = 32


def _trigram_match(search: str) -> str | None:
    """The FTS5 query that finds every session whose search text may contain ``search`` (SQLite migration 8),
    or None when the query is too short for the index. It ANDs trigrams of the lower-cased query, each
    quoted (so ``"``, ``AND``, ``*`` and the like are text): every third one and the last, enough to cover
    each character; or the marker of a text too long to be indexed. Only the part before a NUL counts,
    because LIKE reads its pattern only that far (so a NUL never makes the index miss a row the LIKE would
    match). The candidates may include rows without the substring (trigrams out of order, FTS5's case
    folding): ``list`` keeps only those the LIKE matches."""
    text = search.lower().split("\x00", 1)[0]
    if len(text) < TRIGRAM:
        return None
    last = len(text) - TRIGRAM
    starts = sorted({*range(0, last, TRIGRAM), last})[:MAX_TRIGRAMS - 1] + [last]
    trigrams = dict.fromkeys(text[i:i + TRIGRAM] for i in starts)
    terms = " AND ".join('"' + trigram.replace('"', '""') + '"' for trigram in trigrams)
    return f'({terms}) OR "{LONG_TEXT_MARKER}"'



def _candidates(conn: sqlite3.Connection, match: str) -> tuple[int, int]:
    """How many sessions the trigram query ``match`` leaves (counted up to FEW_CANDIDATES + 1) and the
    bytes of their documents (``size``: read from each row's first page, not its search text)."""
    row = conn.execute(
        "SELECT COUNT(*), TOTAL(size) FROM (SELECT size FROM sessions WHERE rowid IN (SELECT rowid FROM"
        " sessions_search WHERE sessions_search MATCH ? LIMIT ?))", (match, FEW_CANDIDATES + 1)).fetchone()
    return row[0], int(row[1])


class SessionService:
    def __init__(self, runtime: SessionHost) -> None:
        self._rt = runtime
        self._locks: dict[str, list[Any]] = {}  # id -> [lock, holders and waiters]; dropped at zero
        storage = runtime.config.session_storage
        if getattr(runtime.store, "kind", "sqlite") == "postgresql":
            storage = "store"  # files on one host's disk cannot be shared by several hosts (issue 15)
        if storage not in STORAGE_KINDS:
            raise ValueError(f"session_storage must be one of: {', '.join(STORAGE_KINDS)}, not {storage!r}")
        self.storage = storage
        self.docs: SessionDocs
        if storage == "store":
            self.docs = StoreDocs(runtime.store)
        else:
            self.docs = FileDocs(runtime.store, SessionFiles(
                runtime.config.sessions_dir, runtime.config.session_fs))  # type: ignore[arg-type]

    # The files implementation's parts, for tests and tools that reach into them (files mode only).
    @property
    def files(self) -> SessionFiles:
        return self._file_docs.files

    @property
    def _unsettled(self) -> set[str]:
        return self.docs._unsettled  # type: ignore[attr-defined]

    @property
    def _staging(self) -> dict[str, trio.Event]:
        return self._file_docs._staging

    @property
    def _file_docs(self) -> FileDocs:
        if not isinstance(self.docs, FileDocs):
            raise AttributeError(f"sessions are kept in the {self.storage}, not in files")
        return self.docs

    async def cleaned(self) -> None:
        """Until no committed change's undo file is left to drop (files only: runtime/sessions/undo.py). The
        runtime waits for it, bounded, before it closes; unbounded here."""
        if isinstance(self.docs, FileDocs):
            await self.docs.cleaned()

    @property
    def thread_limiters(self) -> tuple[trio.CapacityLimiter, ...]:
        """Limiters of the worker threads the sessions start outside trio's default one (the staging and the
        undo files' threads): tests on a MockClock watch them, so time never jumps while one works."""
        return (self.docs.stager.limiter, self.docs.undo_files.limiter) if isinstance(self.docs, FileDocs) else ()

    @property
    def commit_timeout(self) -> float:
        """Bounds each shielded commit phase (a wedged disk or store cannot hold a request forever)."""
        return self.docs.commit_timeout

    @commit_timeout.setter
    def commit_timeout(self, value: float) -> None:
        self.docs.commit_timeout = value

    # ---- startup ---------------------------------------------------------------------------

    async def open(self) -> None:
        await self.docs.open()

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
        change is settled first if its outcome is unknown (``SessionDocs.before_change``)."""
        await self._acquire(session_id, deadline)
        try:
            await self.docs.before_change(session_id, deadline)
            yield
        finally:
            self._release(session_id)

    # ---- commit ----------------------------------------------------------------------------

    async def _commit(self, doc: dict[str, Any], *, action: str, thread_id: str | None,
                      event: dict[str, Any] | None, replacing: bool, claim: Claim | None = None,
                      answer: Any = None) -> None:
        """The commit phase (``SessionDocs.commit``): shielded, all or nothing. The document, its index
        row, the thread link, the ``session.saved`` event (``event``, for a save of a thread) and
        ``claim``'s record of ``answer`` commit together. Raises StorageError (StorageFull for a full
        disk) naming ``action`` when nothing was saved."""
        events = []
        if event is not None and thread_id is not None:
            events.append(EventDraft(thread_id, "session.saved", event))
        await self.docs.commit(doc, action=action, thread_id=thread_id, events=events, replacing=replacing,
                               claim=claim, answer=answer)

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
                # Without If-Match the files storage may answer from the index row it committed last and
                # check the file in the commit's staging thread (one worker-thread hop less per save);
                # a file changed behind it makes the commit raise Stale, and the save starts over below.
                existing = await self.docs.metadata(session_id, confirm=if_match is not None)
            _check_if_match(target, existing["revision"] if existing else None, if_match)
            snapshot = await self._rt.get_session_snapshot(
                thread_id, wait_for_idle=wait_for_idle, timeout=max(0.0, deadline - trio.current_time()))
            try:
                return await self._save_snapshot(target, thread_id, snapshot, existing, claim)
            except Stale:
                # Nothing was written: this is still the wait phase. The stored session, read and checked.
                existing = await self.docs.metadata(target)
                _check_if_match(target, existing["revision"] if existing else None, if_match)
                return await self._save_snapshot(target, thread_id, snapshot, existing, claim)

    async def _save_snapshot(self, target: str, thread_id: str, snapshot: ops.SessionSnapshot,
                             existing: dict[str, Any] | None, claim: Claim | None) -> dict[str, Any]:
        """``save``'s document from the engine's ``snapshot`` and the stored session's metadata
        (``existing``; None: a new session), and its commit."""
        now = utc_now()
        messages = list(snapshot.messages)
        if existing is not None:
            created_at, title, revision, archived = (existing["created_at"], existing["title"],
                                                     existing["revision"] + 1, existing["archived"])
        else:
            created_at, revision, archived = now, 1, False
            title = derive_title(snapshot.title or "") or derive_title(first_user_text(messages)) or UNTITLED
        doc = Document({
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
        match, texts = None, ""
        if search:
            # SQLite: the trigram index narrows the rows, the LIKE checks each (the answers are the scan's);
            # PostgreSQL's pg_trgm index serves the LIKE itself (PG migrations 2 and 4).
            on_sqlite = getattr(self._rt.store, "kind", "sqlite") == "sqlite"
            if on_sqlite:
                match = _trigram_match(search)
            if match is not None:
                where.append("sessions.rowid IN (SELECT rowid FROM sessions_search WHERE sessions_search MATCH ?)")
                params.append(match)
            # The text lives in ``session_texts`` (SQLite migration 11, PG migration 4). SQLite joins it by
            # rowid to each row the query reaches (the candidates, or the listing's index walked in order
            # until ``limit`` match); PostgreSQL finds the matching ids with its trigram index of that table.
            if on_sqlite:
                texts = " JOIN session_texts ON session_rowid = sessions.rowid"
                where.append("search_text LIKE ? ESCAPE '\\'")
            else:
                where.append("id IN (SELECT id FROM session_texts WHERE search_text LIKE ? ESCAPE '\\')")
            params.append(_like_pattern(search))
        sql = (f"SELECT {INDEX_COLUMNS} FROM sessions{texts} {'WHERE ' + ' AND '.join(where) if where else ''}"
               f" ORDER BY {SORTS[sort]} LIMIT ?")
        params.append(limit)
        # With few candidates, fetch them by rowid and sort them, instead of walking the sessions_by_update
        # index through every listed session in order: ``+archived`` keeps SQLite off that index.
        by_rowid = sql.replace("WHERE archived =", "WHERE +archived =")
        inline = not search
        if match is not None:
            count, size = await self._rt.store.read(functools.partial(_candidates, match=match), inline=True)
            if count <= FEW_CANDIDATES:
                sql = by_rowid
                # Few small candidates: the LIKE reads at most INLINE_SEARCH_BYTES, on the loop, cheaper
                # than the thread hop. Decided in its own snapshot: only where the query runs depends on it.
                inline = size <= INLINE_SEARCH_BYTES

        def query(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            return [index_metadata(row) for row in conn.execute(sql, params)]

        # A page of index rows is a small read; a search without the index scans search_text, and one
        # with many or big candidates reads theirs, so it stays off the loop.
        return await self._rt.store.read(query, inline=inline)

    async def read_document(self, session_id: str) -> tuple[bytes, int]:
        """The stored document's bytes, to be sent as they are, and its revision (for the ETag); how
        they are trusted without decoding 12 MB is the storage's (``SessionDocs.read_document``)."""
        validate_session_id(session_id)
        return await self.docs.read_document(session_id)

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
            doc = await self.docs.load(session_id)
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
        """Delete the document, its index row and the threads' links as one change (``SessionDocs.delete``:
        all or nothing). The lock wait is bounded by ``timeout``; the commit phase is shielded."""
        validate_session_id(session_id)
        deadline = trio.current_time() + timeout
        async with self._locked(session_id, deadline):
            await self.docs.delete(session_id)

    # ---- resume ----------------------------------------------------------------------------

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
            # Decoded, checked and encoded again in a worker thread, where the decoded messages also die.
            source = await self.docs.resume_source(session_id)
            meta = source.metadata
            total = meta.get("total_tokens", 0)
            thread_id = new_id("thr")
            result = {
                "thread_id": thread_id, "session_id": session_id, "message_count": source.message_count,
                "summary": f"Resumed {source.message_count} message(s) from session '{meta['title']}'",
            }
            with trio.CancelScope(shield=True):  # one bounded store write; the caller always learns its id
                await self._rt.create_thread(
                    model=model or meta.get("model"), mode=mode or meta.get("mode"), workspace=meta.get("workspace"),
                    system_prompt=source.system_prompt, title=meta["title"],
                    base_tokens=total if isinstance(total, int) else 0, session_id=session_id,
                    base_messages_json=source.base_json, thread_id=thread_id, claim=claim, answer=result)
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
            if await self.docs.exists(target, "import"):
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
            doc, messages_json = await self.docs.load_for_resume(session_id)
            meta = doc["metadata"]
            _check_if_match(session_id, meta["revision"], if_match)
            def make_doc(snapshot: Any) -> dict[str, Any]:
                """The safety session of the engine's live state (called in the engine's write)."""
                title = derive_title("Before restore: " + (derive_title(snapshot.title or "") or derive_title(
                    first_user_text(list(snapshot.messages))) or UNTITLED))
                now = utc_now()
                return {
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

            def send(safety: SafetyWriter) -> Awaitable[Any]:
                return self._rt._request(thread_id, lambda r: ops.Restore(
                    session_id=session_id, revision=meta["revision"], messages=doc["messages"],
                    messages_json=messages_json, total_tokens=_tokens(meta), system_prompt=doc.get("system_prompt"),
                    safety_session_id=safety_id, safety=safety, if_busy=if_busy, claim=claim, reply=r),
                    timeout=self.commit_timeout, what="restore the thread")

            # The commit phase (shielded inside: the engine may apply the op once sent).
            result = await self.docs.restore(thread_id=thread_id, session_id=session_id, safety_id=safety_id,
                                             make_doc=make_doc, send=send)
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
