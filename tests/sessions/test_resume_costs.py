"""What a resume costs the event loop and the store's writer (issue 16, row 14c of ``make bench``: /health
while a 12.7 MB session is resumed).

A resume decodes and checks the session, then encodes its messages for ``threads.base_messages``, all in a
worker thread. Two steps still held the GIL for a 12 MB document in one call: the writer bound the encoded
messages as one parameter (the sqlite3 module copies a bound value with the GIL held), and the decoded
messages went back to the event loop and were freed there when the resume returned (~7 ms). Now the pieces
of the encoding are written into the row by incremental blob I/O, and the decoded messages die in the
worker thread. The stored value is the same TEXT as before, and the engine reads it back whole.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
from typing import Any

import pytest

from runtime import codec
from runtime.sessions.files import SESSION_SCHEMA_VERSION
from runtime.store import records
from tests import support

from .conftest import LIMIT

# More than codec.ARRAY_BATCH messages, so that their encoding comes in several pieces.
MESSAGES = 3 * codec.ARRAY_BATCH + 7


def session_document(session_id: str, count: int = MESSAGES) -> dict[str, Any]:
    return {
        "schema_version": SESSION_SCHEMA_VERSION,
        "metadata": {"id": session_id, "title": "long talk", "created_at": "2026-01-01T00:00:00Z",
                     "updated_at": "2026-01-01T00:00:00Z", "revision": 3, "message_count": count,
                     "total_tokens": 42, "model": "scripted", "workspace": None, "mode": "default"},
        "messages": [{"role": "user" if i % 2 == 0 else "assistant",
                      "content": [{"type": "text", "text": f"message {i}: café ☕ \"quoted\" \\ {'x' * (i % 50)}"}]}
                     for i in range(count)],
        "system_prompt": "be brief",
    }


class RecordingConnection(sqlite3.Connection):
    """Keeps the length of the longest bytes or str parameter every ``execute`` was given."""

    longest: list[int] = []

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:  # type: ignore[override]
        if isinstance(parameters, (list, tuple)):
            RecordingConnection.longest.append(max(
                (len(value) for value in parameters if isinstance(value, (bytes, str, memoryview))), default=0))
        return super().execute(sql, parameters)


async def test_a_resumed_threads_base_messages_are_written_in_pieces_never_bound_as_one_value(data_dir):
    if support.on_postgresql():
        pytest.skip("SQLite's incremental blob I/O; on PostgreSQL the pieces are joined and bound in the writer")
    doc = session_document("long")
    encoded = codec.dumps(doc["messages"])
    RecordingConnection.longest = []
    async with support.open_runtime(data_dir, sqlite_connection_factory=RecordingConnection) as rt:
        await support.plant_session_document(rt, "long", codec.dumps(doc))
        RecordingConnection.longest.clear()
        resumed = await rt.sessions.resume("long", timeout=LIMIT)
        # No statement of the resume was given the messages (or anything near their size) as a parameter.
        assert len(encoded) > 60_000 and max(RecordingConnection.longest) < 1_000
        state = await rt.store.read(functools.partial(records.engine_state, thread_id=resumed["thread_id"]))
        thread = (await rt.get_thread(resumed["thread_id"]))["thread"]
    assert resumed["message_count"] == MESSAGES and state["base_messages"] == doc["messages"]
    assert (thread["title"], thread["system_prompt"], thread["session_id"]) == ("long talk", "be brief", "long")
    with support.store_connection(data_dir) as conn:
        kind, stored = conn.execute("SELECT typeof(base_messages), CAST(base_messages AS BLOB) FROM threads"
                                    " WHERE id = ?", (resumed["thread_id"],)).fetchone()
    # The same TEXT, byte for byte, as the messages' encoding was stored before.
    assert (kind, bytes(stored)) == ("text", encoded)


class Tracked(dict):
    """A decoded message that notes the thread it is freed in."""

    freed_in: list[str] = []

    def __del__(self) -> None:
        Tracked.freed_in.append(threading.current_thread().name)


async def test_a_resume_frees_the_decoded_messages_in_its_worker_thread_not_on_the_event_loop(rt, monkeypatch):
    await support.plant_session_document(rt, "long", codec.dumps(session_document("long")))
    loads = codec.loads

    def tracking_loads(data: Any) -> Any:
        value = loads(data)
        if isinstance(value, dict) and isinstance(value.get("messages"), list):
            value["messages"] = [Tracked(message) for message in value["messages"]]
        return value

    monkeypatch.setattr(codec, "loads", tracking_loads)
    Tracked.freed_in = []
    loop_thread = threading.current_thread().name
    resumed = await rt.sessions.resume("long", timeout=LIMIT)
    monkeypatch.setattr(codec, "loads", loads)
    assert resumed["message_count"] == MESSAGES
    assert len(Tracked.freed_in) == MESSAGES and loop_thread not in Tracked.freed_in, set(Tracked.freed_in)
    state = await rt.store.read(functools.partial(records.engine_state, thread_id=resumed["thread_id"]))
    assert state["base_messages"] == session_document("long")["messages"]


@pytest.mark.files_only  # a function of the writer's connection alone: one run is enough
def test_base_message_pieces_written_once_refuse_a_second_write_instead_of_storing_nothing(tmp_path):
    """write_base drops the pieces after the blob write (freed in the writer thread); a second run of the same
    request must fail, never store the emptied (zero-length, not JSON) value."""
    from runtime.store.records import BASE_PIECES, write_base

    conn = sqlite3.connect(tmp_path / "t.sqlite3", isolation_level=None)
    conn.execute("CREATE TABLE threads (id TEXT PRIMARY KEY, base_messages TEXT)")
    messages = session_document("s")["messages"]
    pieces = codec.dumps_parts(messages)
    insert = (f"INSERT INTO threads (id, base_messages) VALUES (?, {BASE_PIECES})", ("t1", pieces))
    write_base(conn, insert, pieces)
    assert codec.loads(conn.execute("SELECT base_messages FROM threads WHERE id = 't1'").fetchone()[0]) == messages
    again = (f"INSERT INTO threads (id, base_messages) VALUES (?, {BASE_PIECES})", ("t2", pieces))
    with pytest.raises(RuntimeError, match="already written"):
        write_base(conn, again, pieces)
    assert conn.execute("SELECT count(*) FROM threads WHERE id = 't2'").fetchone()[0] == 0
