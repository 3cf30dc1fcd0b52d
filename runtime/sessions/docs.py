"""Where session documents live: the one seam between the SessionService and its storage.

``RuntimeConfig.session_storage`` picks the implementation (``SessionService`` builds it):

- ``"files"`` (the default on SQLite): ``filedocs.FileDocs``, one JSON file per session under
  ``sessions_dir`` and the file change protocol of runtime/sessions/files.py (temp and undo files, the
  ``session_commits`` journal, recovery at start).
- ``"store"`` (always on PostgreSQL): ``StoreDocs`` below, each document a row of the store's
  ``session_docs`` table, written by the store's writer in the SAME transaction as the ``sessions``
  index row, the thread link, the ``session.saved`` event and the idempotency record. The database alone
  makes every change all or nothing: no temp files, no journal, nothing to settle after a crash.

The SessionService keeps what both share (the per-session locks, If-Match, building documents from
engine state, the index queries); an implementation only stores, reads and deletes documents. The SQL
here is portable (``?`` placeholders, ``ON CONFLICT ... DO UPDATE``; docs/design.md, "Sessions").
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import sqlite3
import threading
from typing import Any, Awaitable, Callable, Protocol

import trio

from .. import codec
from ..errors import EngineTimeout, NotFound, StorageError
from ..idempotency import Claim
from ..store import DatabaseError, EventDraft, Store
from ..transcript import text_of
from .files import encode_document_with_span, parse_document

# The commit phase is shielded; this bounds it so a wedged disk or store cannot hold a request forever.
COMMIT_TIMEOUT = 60.0
STORAGE_KINDS = ("files", "store")
# What the index's readers select: never ``search_text`` (a session's whole text, 1 MB for a 1 MB
# session), which only the WHERE of a search reads, inside the database.
INDEX_COLUMNS = ("id, title, created_at, updated_at, message_count, total_tokens, model, workspace, mode,"
                 " archived, revision, size, file_mtime_ns")



# Text lower-cased and encoded by ``index_text`` between two offers of the GIL (~0.3 ms of work). Offering
# it after every message made even a 20-message save sleep once (``let_others_run`` times from the worker
# thread's previous job), one more GIL hand-over per save under row 3 of ``make bench``.
INDEX_TEXT_SLICE = 256 * 1024

# Called by the engine with its live state (the snapshot of runtime.engine.history.restore); returns the
# writer-thread part of the restore's one write.
SafetyWriter = Callable[[Any], Callable[[Any], None]]


class SessionDocs(Protocol):
    """The storage of session documents. Every method that changes something is all or nothing and
    is called with the session's lock held (SessionService._locked); the ``commit_timeout`` bounds the
    shielded commit phase of each."""

    commit_timeout: float

    async def open(self) -> None:
        """Prepare the storage at start (files: settle changes a crash left, reconcile the index)."""

    async def before_change(self, session_id: str, deadline: float) -> None:
        """Called under the session's lock before every change: finish what an earlier change of it
        left unknown (a timed-out commit), so two changes of one session never overlap."""

    async def metadata(self, session_id: str, *, confirm: bool = True) -> dict[str, Any] | None:
        """The stored session's metadata (None: no such session). ``confirm=False``: the storage may
        answer from what it last committed and check it at the commit, which raises ``Stale`` (having
        changed nothing) when the stored session differs; the caller then asks again, confirmed."""

    async def read_document(self, session_id: str) -> tuple[bytes, int]:
        """The stored document's bytes, sent as they are, and its revision. NotFound if none."""

    async def load(self, session_id: str) -> dict[str, Any]:
        """The stored document, checked (InvalidData for one that does not parse). NotFound if none."""

    async def load_for_resume(self, session_id: str) -> tuple[dict[str, Any], bytes | None]:
        """``load`` and the messages encoded for ``threads.base_messages``, off the event loop."""

    async def resume_source(self, session_id: str) -> "ResumeSource":
        """What resume takes of the stored document (``resume_source``), made in a worker thread."""

    async def exists(self, session_id: str, action: str) -> bool:
        """Whether the session exists; a failure to tell is a StorageError naming ``action``."""

    async def commit(self, doc: dict[str, Any], *, action: str, thread_id: str | None,
                     events: list[EventDraft], replacing: bool, claim: Claim | None, answer: Any) -> None:
        """Store ``doc`` (its index row, the thread link, ``events`` and ``claim``'s record in the same
        transaction), shielded: the caller always learns the outcome."""

    async def delete(self, session_id: str) -> None:
        """Delete the document, its index row and every thread's link to it. NotFound if none."""

    async def restore(self, *, thread_id: str, session_id: str, safety_id: str,
                      make_doc: Callable[[Any], dict[str, Any]],
                      send: Callable[[SafetyWriter], Awaitable[Any]]) -> Any:
        """Run a restore's engine op (``send``) whose one write also stores the safety session
        ``make_doc(snapshot)``; returns the op's result. Shielded: the engine may apply the op."""


# ---- shared by both implementations ---------------------------------------------------------


def _lower_run(exc: UnicodeError) -> tuple[bytes, int]:
    """``lower_utf8``'s encode error handler: a run of non-ASCII characters, lower-cased and UTF-8 encoded."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    return exc.object[exc.start:exc.end].lower().encode("utf-8"), exc.end


codecs.register_error("runtime.sessions.lower", _lower_run)
# The one character whose lower case depends on its neighbours in str.lower (Greek final sigma).
CAPITAL_SIGMA = "\u03a3"


def lower_utf8(text: str) -> bytes:
    """``text.lower().encode("utf-8")``, byte for byte, without lower-casing every character through the
    Unicode tables. ``str.lower`` takes that slow path for the whole string as soon as it holds one
    non-ASCII character: ~140 ms of 12 MB of text with a "café" per message, all with the GIL held (row
    14a of ``make bench``, issue 16). Here the ASCII characters are copied by the ASCII encoder and
    lower-cased by ``bytes.lower`` (A-Z only), and only the runs of other characters go through
    ``str.lower``, in the encoder's error handler: ~25 ms. Exact because a character's lower case depends on
    no other character (but capital sigma's: such a text takes ``str.lower`` whole), and what a lowered
    run holds is UTF-8 of lower-case text, which ``bytes.lower`` leaves alone. A lone surrogate raises
    UnicodeEncodeError, as ``encode`` does."""
    if CAPITAL_SIGMA in text:
        return text.lower().encode("utf-8")
    return text.encode("ascii", "runtime.sessions.lower").lower()


def index_text(title: str, messages: list[dict[str, Any]]) -> bytes:
    """The lower-cased text search matches, UTF-8 encoded (stored with ``CAST(? AS TEXT)``). Built a
    message at a time, handing the GIL to the event loop in between: lower-casing or encoding 12 MB in
    one call holds the GIL for ~60 ms, which stalls the event loop even from the staging thread.
    (Joined by newlines, the parts lower-case exactly as the whole would: no letter meets a letter
    across a boundary.)"""
    parts = [lower_utf8(title)]
    since = 0  # bytes made since the GIL was last offered
    for message in messages:
        if since >= INDEX_TEXT_SLICE:
            codec.let_others_run()
            since = 0
        parts.append(lower_utf8(text_of(message)))
        since += len(parts[-1])
    return b"\n".join(parts)


@dataclasses.dataclass
class ResumeSource:
    """What resume takes of a session: its metadata, system prompt, message count and the messages
    encoded for ``threads.base_messages`` (the pieces of ``codec.dumps_parts``; None for no messages)."""

    metadata: dict[str, Any]
    system_prompt: str | None
    message_count: int
    base_json: list[bytes | memoryview] | None


def resume_source(doc: dict[str, Any]) -> ResumeSource:
    """Called in the worker thread that loaded ``doc``: the messages are encoded there, in pieces that are
    never joined (runtime.store.records ``write_base``), and the decoded messages die there with ``doc``. Returned
    to the event loop, they were freed on it when resume returned: ~7 ms with the GIL held for a 12.7 MB
    session (thousands of dicts and strings; py-spy under row 14c of ``make bench``)."""
    messages = doc["messages"]
    return ResumeSource(doc["metadata"], doc.get("system_prompt"), len(messages),
                        codec.dumps_parts(messages) if messages else None)


class Stale(Exception):
    """A commit found the stored session other than the unconfirmed metadata it was built from
    (``SessionDocs.metadata(confirm=False)``); raised before anything was written."""


class Document(dict):
    """A session document that keeps the bytes it was saved as, so that PUT's response, which repeats
    the whole session, reuses the stored bytes instead of encoding 12 MB again on the event loop."""

    encoded: bytes | None = None


def encode(doc: dict[str, Any]) -> bytes:
    """The document's stored bytes (runs in a worker thread); a ``Document`` keeps them."""
    return encode_with_messages_span(doc)[0]


def encode_with_messages_span(doc: dict[str, Any]) -> tuple[bytes, tuple[int, int] | None]:
    """``encode(doc)``, and where the messages lie in those bytes (start, end; None when unknown)."""
    data, span = encode_document_with_span(doc)
    if isinstance(doc, Document):
        doc.encoded = data
    return data, span


# ``upsert_index``'s ``search_text`` for a change whose caller knows the stored search text is already the
# document's (``FileDocs``: the messages' bytes and the title equal those of the file it last committed).
KEEP_TEXT: Any = object()


def upsert_index(conn: sqlite3.Connection, doc: dict[str, Any], size: int, mtime_ns: int,
                 search_text: bytes | str | None = None) -> None:
    """Insert or replace the ``sessions`` index row of session ``doc`` (a checked session document)
    whose stored bytes are ``size`` long (a file's mtime ``mtime_ns``; 0 for a document in the store),
    and its ``session_texts`` row; ``search_text`` defaults to the title and message text the search reads.
    ``KEEP_TEXT``: the stored text is already this document's, and its row is not touched (a 10 MB text
    saved again unchanged cost the writer ~9 ms while it lived in the ``sessions`` row: SQLite migration 11).

    The SessionService calls it in the same store transaction that stores the document, so the row
    and the document never disagree after a commit. Public for tools that write session files outside a
    server (bench/datagen.py): they must call it in one transaction with their writes, on a database
    migrated by ``runtime.store.migrations``; the next start re-indexes a file whose size or mtime
    disagrees with its row. ``search_text`` as ``str`` is the portable form (PostgreSQL casts bytes to
    hex text); SQLite stores bytes and str alike. The ``sessions`` row goes first: on SQLite the text's
    row is keyed by its rowid."""
    if search_text is None:
        search_text = index_text(doc["metadata"]["title"], doc["messages"])
    values = index_values(doc, size, mtime_ns)
    conn.execute(
        "INSERT INTO sessions (id, title, created_at, updated_at, message_count, total_tokens, model, workspace,"
        " mode, archived, revision, size, file_mtime_ns)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET title = excluded.title, created_at = excluded.created_at,"
        " updated_at = excluded.updated_at, message_count = excluded.message_count,"
        " total_tokens = excluded.total_tokens, model = excluded.model, workspace = excluded.workspace,"
        " mode = excluded.mode, archived = excluded.archived, revision = excluded.revision, size = excluded.size,"
        " file_mtime_ns = excluded.file_mtime_ns",
        tuple(values.values()),
    )
    if search_text is KEEP_TEXT:
        return
    if isinstance(conn, sqlite3.Connection):  # keyed by the sessions row's rowid (SQLite migration 11)
        # The rowid read first, then the text as a VALUES upsert: as ``INSERT ... SELECT rowid, ? FROM
        # sessions`` a 10 MB text took ~40 ms instead of ~24 ms (SQLite copies a SELECT's values once more).
        (rowid,) = conn.execute("SELECT rowid FROM sessions WHERE id = ?", (values["id"],)).fetchone()
        conn.execute(
            "INSERT INTO session_texts (session_rowid, search_text) VALUES (?, CAST(? AS TEXT))"
            " ON CONFLICT (session_rowid) DO UPDATE SET search_text = excluded.search_text",
            (rowid, search_text),
        )
    else:  # by the session id (PG migration 4)
        conn.execute(
            "INSERT INTO session_texts (id, search_text) VALUES (?, CAST(? AS TEXT))"
            " ON CONFLICT (id) DO UPDATE SET search_text = excluded.search_text",
            (values["id"], search_text),
        )


def index_values(doc: dict[str, Any], size: int, mtime_ns: int) -> dict[str, Any]:
    """The ``sessions`` index row of ``doc`` as ``upsert_index`` writes it (every column but the search
    text, in its column order), so also what an ``index_row`` read of it gives back."""
    meta = doc["metadata"]
    return {
        "id": meta["id"], "title": meta["title"], "created_at": meta["created_at"], "updated_at": meta["updated_at"],
        "message_count": len(doc["messages"]), "total_tokens": str(meta.get("total_tokens", 0)),
        "model": meta.get("model"), "workspace": meta.get("workspace"), "mode": meta.get("mode"),
        "archived": int(bool(meta.get("archived", False))), "revision": meta["revision"], "size": size,
        "file_mtime_ns": mtime_ns,
    }


def link_thread(conn: Any, thread_id: str, session_id: str) -> None:
    """Link thread ``thread_id`` to session ``session_id`` (in the caller's transaction), writing its row
    only when the link changes. A save of the thread a session was saved from (every save in place but the
    first) changes nothing, and writing the row anyway rewrote the whole record, with its base messages:
    ~35 ms for a thread resumed from a 10 MB session (issue 16, row 9 of ``make bench``)."""
    conn.execute("UPDATE threads SET session_id = ? WHERE id = ? AND (session_id IS NULL OR session_id <> ?)",
                 (session_id, thread_id, session_id))


def index_metadata(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"], "title": row["title"], "created_at": row["created_at"], "updated_at": row["updated_at"],
        "message_count": row["message_count"], "total_tokens": int(row["total_tokens"]), "model": row["model"],
        "workspace": row["workspace"], "mode": row["mode"], "archived": bool(row["archived"]),
        "revision": row["revision"], "size": row["size"],
    }


def index_row(conn: sqlite3.Connection, session_id: str) -> Any:
    return conn.execute(f"SELECT {INDEX_COLUMNS} FROM sessions WHERE id = ?", (session_id,)).fetchone()


def named(exc: Exception, action: str, session_id: str) -> Exception:
    """A store error names the session action it broke (``Failed to save session 'x': disk I/O error``),
    keeping its class (StorageFull stays StorageFull); other errors pass unchanged."""
    if not isinstance(exc, StorageError):
        return exc
    prefix = f"Failed to {action} session '{session_id}'"
    if exc.message.startswith(prefix):
        return exc
    reason, cause = exc.message, exc.__cause__
    while cause is not None:  # the store keeps the database's own error as the cause: it is the reason
        if isinstance(cause, DatabaseError):
            reason = str(cause)
            break
        cause = cause.__cause__
    return type(exc)(f"{prefix}: {reason}")


def raise_named(exc: Exception, action: str, session_id: str) -> None:
    error = named(exc, action, session_id)
    if error is exc:
        raise exc
    raise error from exc


# ---- the store implementation ---------------------------------------------------------------


def _document_row(conn: sqlite3.Connection, session_id: str) -> tuple[bytes, int] | None:
    row = conn.execute("SELECT document, revision FROM session_docs WHERE id = ?", (session_id,)).fetchone()
    return (bytes(row[0]), row[1]) if row is not None else None


def _write_document(conn: sqlite3.Connection, doc: dict[str, Any], data: bytes, text: str) -> None:
    """The index row and the document row of ``doc`` (its encoded bytes ``data``), in the caller's
    transaction."""
    meta = doc["metadata"]
    upsert_index(conn, doc, len(data), 0, text)
    conn.execute(
        "INSERT INTO session_docs (id, revision, document, size, updated_at) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET revision = excluded.revision, document = excluded.document,"
        " size = excluded.size, updated_at = excluded.updated_at",
        (meta["id"], meta["revision"], data, len(data), meta["updated_at"]))


def _staged(doc: dict[str, Any]) -> tuple[bytes, str]:
    """The document's bytes and its search text as ``str`` (the portable binding), made in a worker
    thread: decoding is one pass over bytes that ``index_text`` built a message at a time."""
    data = encode(doc)
    return data, index_text(doc["metadata"]["title"], doc["messages"]).decode("utf-8")


class StoreDocs:
    """Session documents as rows of the store (``session_docs``): every change is one writer request,
    so it commits with its index row, thread link, event and idempotency record, or not at all.

    A change whose writer request did not finish within ``commit_timeout`` has an unknown outcome (the
    writer may still commit it whole): the session is marked, and its next change first waits for every
    write queued before (an empty write: the writer is FIFO) so it reads the committed revision."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.commit_timeout = COMMIT_TIMEOUT
        self._unsettled: set[str] = set()

    async def open(self) -> None:
        """Drop index rows without a document (sessions indexed while this data directory kept files:
        they are not moved into the store, see docs/design.md "Sessions")."""
        await self._store.write(fn=lambda conn: conn.execute(
            "DELETE FROM sessions WHERE id NOT IN (SELECT id FROM session_docs)"), action="open the sessions")

    async def before_change(self, session_id: str, deadline: float) -> None:
        if session_id not in self._unsettled:
            return
        with trio.move_on_at(deadline):
            # A failed empty batch is a barrier all the same: every write queued before it has finished.
            try:
                await self._store.write(action=f"wait for an earlier change of session '{session_id}'")
            except StorageError:
                pass
            self._unsettled.discard(session_id)
            return
        raise StorageError(f"Failed to change session '{session_id}': the store has not finished an earlier "
                           f"change of it")

    async def metadata(self, session_id: str, *, confirm: bool = True) -> dict[str, Any] | None:
        row = await self._store.read(functools.partial(index_row, session_id=session_id), inline=True)
        return index_metadata(row) if row is not None else None

    async def read_document(self, session_id: str) -> tuple[bytes, int]:
        """The stored bytes as they are: only this class writes them, from a checked document, in the
        transaction that wrote the index row. A 10 MB read runs in the store's read thread."""
        found = await self._store.read(functools.partial(_document_row, session_id=session_id))
        if found is None:
            raise NotFound(f"Session '{session_id}' not found")
        return found

    async def load(self, session_id: str) -> dict[str, Any]:
        data, _ = await self.read_document(session_id)
        return await trio.to_thread.run_sync(parse_document, session_id, data)

    async def load_for_resume(self, session_id: str) -> tuple[dict[str, Any], bytes | None]:
        data, _ = await self.read_document(session_id)

        def load() -> tuple[dict[str, Any], bytes | None]:
            doc = parse_document(session_id, data)
            return doc, codec.dumps_sliced(doc["messages"]) if doc["messages"] else None

        return await trio.to_thread.run_sync(load)

    async def resume_source(self, session_id: str) -> ResumeSource:
        # The document's bytes are handed to the worker thread in a list it empties, so they are freed
        # there, not on the event loop (a 12 MB buffer).
        held = [(await self.read_document(session_id))[0]]
        return await trio.to_thread.run_sync(lambda: resume_source(parse_document(session_id, held.pop())))

    async def exists(self, session_id: str, action: str) -> bool:
        def query(conn: sqlite3.Connection) -> bool:
            return conn.execute("SELECT 1 FROM session_docs WHERE id = ?", (session_id,)).fetchone() is not None

        try:
            return await self._store.read(query, inline=True)
        except DatabaseError as exc:
            raise StorageError(f"Failed to {action} session '{session_id}': {exc}") from exc

    async def _write(self, session_id: str, action: str, fn: Callable[[Any], Any],
                     events: list[EventDraft]) -> None:
        """One writer request, waited for under the caller's shield and bounded by commit_timeout. Past
        the bound, a request the writer has not begun is refused when the writer reaches it (nothing was
        saved); one it has begun commits whole or not at all, and the session is unsettled."""
        guard, state = threading.Lock(), {"begun": False, "gave_up": False}

        def guarded(conn: Any) -> Any:
            with guard:
                if state["gave_up"]:
                    raise StorageError(f"Failed to {action} session '{session_id}': the request gave up")
                state["begun"] = True
            return fn(conn)

        failure: Exception | None = None
        with trio.move_on_after(self.commit_timeout) as bound:
            try:
                # No ``action``: ``named`` makes the message, with the database's own reason (as for files).
                await self._store.write(fn=guarded, events=events)
            except Exception as exc:
                failure = exc
        if bound.cancelled_caught:
            with guard:
                state["gave_up"] = True
                begun = state["begun"]
            if not begun:
                raise StorageError(f"Failed to {action} session '{session_id}': the store did not begin the "
                                   f"change within {self.commit_timeout:g} s; nothing was saved")
            self._unsettled.add(session_id)
            raise StorageError(f"Failed to {action} session '{session_id}': the store did not finish within "
                               f"{self.commit_timeout:g} s; the change is saved whole or not at all")
        if failure is not None:
            raise_named(failure, action, session_id)

    async def commit(self, doc: dict[str, Any], *, action: str, thread_id: str | None,
                     events: list[EventDraft], replacing: bool, claim: Claim | None = None,
                     answer: Any = None) -> None:
        """Encode the document in a worker thread, then one writer request writes index row, document
        row, thread link, idempotency record and ``events``. Shielded as a whole (the caller always
        learns the outcome and holds the lock to the end); bounded by commit_timeout per stage.
        ``replacing`` needs nothing here: the upsert covers both, under the session's lock."""
        session_id = doc["metadata"]["id"]
        # Shielded: see the docstring. The encoding is CPU work in one thread; the write is bounded.
        with trio.CancelScope(shield=True):
            data, text = await trio.to_thread.run_sync(_staged, doc)

            def write(conn: Any) -> None:
                _write_document(conn, doc, data, text)
                if thread_id is not None:
                    link_thread(conn, thread_id, session_id)
                if claim is not None:
                    claim.record(conn, answer)

            await self._write(session_id, action, write, events)

    async def delete(self, session_id: str) -> None:
        def write(conn: Any) -> None:
            if conn.execute("DELETE FROM session_docs WHERE id = ?", (session_id,)).rowcount == 0:
                raise NotFound(f"Session '{session_id}' not found")
            conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            conn.execute("UPDATE threads SET session_id = NULL WHERE session_id = ?", (session_id,))

        # Shielded like commit: the caller learns whether the delete committed; bounded by commit_timeout.
        with trio.CancelScope(shield=True):
            await self._write(session_id, "delete", write, [])

    async def restore(self, *, thread_id: str, session_id: str, safety_id: str,
                      make_doc: Callable[[Any], dict[str, Any]],
                      send: Callable[[SafetyWriter], Awaitable[Any]]) -> Any:
        """The engine's one write also writes the safety session's rows (encoded in the writer thread,
        where the engine's snapshot is taken). The database makes it all or nothing; a timeout of the
        engine's answer leaves an unknown outcome, so the safety session is unsettled as after commit."""

        def safety(snapshot: Any) -> Callable[[Any], None]:
            doc = make_doc(snapshot)

            def write(conn: Any) -> None:
                data, text = _staged(doc)
                _write_document(conn, doc, data, text)

            return write

        # Shielded: once sent, the engine may apply the op, and the caller must learn its outcome; bounded
        # by the engine request's own timeout (commit_timeout, given by the service).
        with trio.CancelScope(shield=True):
            try:
                return await send(safety)
            except EngineTimeout:  # the engine may still write it: the safety session's next change waits
                self._unsettled.add(safety_id)
                raise
