"""The sessions' SQL runs unchanged on PostgreSQL (issue 15): StoreDocs and the SessionService's index
queries on the real cluster, on their tables alone.

The test drives the shared ``fn(conn)`` code through the store's own adapter (runtime.store.postgres
PgConnection: ``?`` placeholders, rows by name and position) with one transaction per write, on the tables
the sessions use alone (``session_docs`` with BYTEA); tests/sessions runs the whole sessions suite on the
real PostgreSQL store (TRIO_TEST_STORE=postgresql, in ``make test``). What it proves: the SQL is portable
(placeholders, ON CONFLICT, CAST, LIKE ... ESCAPE, LOWER(title), NOT IN), a document's bytes come back
byte for byte, search matches exactly what it matches on SQLite (both sides lower-cased by Python), and the
name sort is the same.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import trio

from runtime.errors import NotFound
from runtime.sessions import SessionService
from runtime.sessions.files import encode_document
from runtime.store.postgres import PgConnection, connect

# The PostgreSQL form of the tables the sessions write (SQLite: runtime/store/migrations.py 1, 7 and 11).
SCHEMA = """
CREATE TABLE threads (id TEXT PRIMARY KEY, session_id TEXT);
CREATE TABLE sessions (
    id TEXT PRIMARY KEY, title TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    message_count INTEGER NOT NULL, total_tokens TEXT NOT NULL, model TEXT, workspace TEXT, mode TEXT,
    archived INTEGER NOT NULL DEFAULT 0, revision INTEGER NOT NULL, size INTEGER NOT NULL,
    file_mtime_ns BIGINT NOT NULL
);
CREATE TABLE session_texts (
    id TEXT PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE, search_text TEXT NOT NULL
);
CREATE TABLE session_docs (
    id TEXT PRIMARY KEY, revision BIGINT NOT NULL, document BYTEA NOT NULL, size BIGINT NOT NULL,
    updated_at TEXT NOT NULL
);
"""


class FakeStore:
    """``Store.read``/``write`` on one PostgreSQL connection (the store's own adapter, PgConnection): a write
    is one transaction (all or nothing)."""

    kind = "postgresql"

    def __init__(self, conn: PgConnection) -> None:
        self.conn = conn

    async def read(self, fn: Any, *, inline: bool = False) -> Any:
        await trio.lowlevel.checkpoint()
        with self.conn.raw.transaction():
            return fn(self.conn)

    async def write(self, statements: Any = (), events: Any = (), fn: Any = None, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        assert not statements and not events  # the sessions' writes used here carry neither
        with self.conn.raw.transaction():
            return (fn(self.conn) if fn is not None else None), []


def document(session_id: str, title: str, text: str, revision: int = 1) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "metadata": {"id": session_id, "title": title, "created_at": "2030-01-01T00:00:00.000Z",
                     "updated_at": f"2030-01-01T00:00:0{revision}.000Z", "message_count": 2, "total_tokens": 5,
                     "model": "scripted", "workspace": None, "mode": "default", "archived": False,
                     "revision": revision},
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "You said: " + text}]}],
        "system_prompt": None,
    }


@pytest.fixture
def service(pg_dsn):
    conn = connect(pg_dsn)
    try:
        conn.execute(SCHEMA)
        conn.execute("INSERT INTO threads VALUES ('thr_1', NULL)")
        host = types.SimpleNamespace(
            store=FakeStore(conn),
            config=types.SimpleNamespace(session_storage="files", sessions_dir=None, session_fs=None))
        yield SessionService(host), conn
    finally:
        conn.close()


async def test_store_docs_sql_runs_on_postgresql_with_the_same_results(service):
    sessions, conn = service
    assert sessions.storage == "store"  # a PostgreSQL store keeps sessions in the database, whatever asked
    docs = sessions.docs
    stored = {}
    for sid, title, text in (("s-b", "beta notes", "Grüße, café ☕ 😀 ΟΔΟΣ 100% done_now"),
                             ("s-a", "Alpha", "plain words"), ("s-c", "charlie", "more plain words")):
        doc = document(sid, title, text)
        await docs.commit(doc, action="save", thread_id="thr_1" if sid == "s-b" else None, events=[],
                          replacing=False)
        stored[sid] = encode_document(doc)

    # Bytes back exactly (BYTEA), the revision with them, the index row beside them.
    assert await docs.read_document("s-b") == (stored["s-b"], 1)
    assert (await docs.load("s-b"))["messages"][0]["content"][0]["text"].startswith("Grüße")
    assert (await docs.metadata("s-b"))["size"] == len(stored["s-b"])
    assert await docs.exists("s-b", "import") and not await docs.exists("nope", "import")
    assert conn.execute("SELECT session_id FROM threads").fetchone()[0] == "s-b"

    # Search: both sides lower-cased by Python, so PostgreSQL's case-sensitive LIKE matches what SQLite's
    # does; % and _ in the query are literal (ESCAPE '\').
    async def found(query: str) -> list[str]:
        return [m["id"] for m in await sessions.list(limit=10, search=query)]

    assert await found("GRÜßE, CAFÉ ☕ 😀") == ["s-b"]
    assert await found("οδος") == ["s-b"] and await found("ΟΔΟΣ") == ["s-b"]
    assert await found("100% done_now") == ["s-b"]
    assert await found("100%% done") == [] and await found("done_") == ["s-b"] and await found("o_d") == []  # not "ord"
    assert sorted(await found("PLAIN")) == ["s-a", "s-c"]
    # The name sort: LOWER(title), then id (SQLite's COLLATE NOCASE order).
    assert [m["id"] for m in await sessions.list(limit=10, sort="name")] == ["s-a", "s-b", "s-c"]
    assert [m["id"] for m in await sessions.list(limit=10, sort="size")][0] == "s-b"

    # An update in place (ON CONFLICT DO UPDATE) of both rows.
    changed = document("s-b", "beta notes", "rewritten", revision=2)
    await docs.commit(changed, action="update", thread_id=None, events=[], replacing=True)
    assert await docs.read_document("s-b") == (encode_document(changed), 2)
    assert await found("grüße") == [] and await found("REWRITTEN") == ["s-b"]

    # Delete: both rows and the thread's link, in one transaction; a second one is NotFound, nothing changed.
    await docs.delete("s-b")
    assert conn.execute("SELECT session_id FROM threads").fetchone()[0] is None
    with pytest.raises(NotFound, match="Session 's-b' not found"):
        await docs.delete("s-b")
    with pytest.raises(NotFound):
        await docs.read_document("s-b")
    assert sorted(m["id"] for m in await sessions.list(limit=10)) == ["s-a", "s-c"]

    # Start-up: an index row without a document (indexed while the data kept files) is dropped.
    conn.execute("INSERT INTO sessions SELECT 'orphan', title, created_at, updated_at, message_count, total_tokens,"
                 " model, workspace, mode, archived, revision, size, file_mtime_ns FROM sessions"
                 " WHERE id = 's-a'")
    await sessions.open()
    assert sorted(m["id"] for m in await sessions.list(limit=10)) == ["s-a", "s-c"]
