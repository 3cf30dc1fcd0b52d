"""Big sessions move as stored bytes (issue 11, defect 8): on a real server on a real socket.

Encoding or decoding a 12 MB session on the event loop (or holding the GIL for it from a thread)
stalled /health for 160-400 ms; the stall itself is measured by ``make bench`` (rows 14a-c). These tests
pin the mechanisms that keep it away, by counting the big encodes and decodes a request makes:
- PUT answers with the file's own bytes, encoded once, for the file;
- GET sends the file's bytes without decoding them while the index vouches for the file (its size and
  mtime match what was validated at save or start-up), and validates a file that changed behind it;
- resume decodes and encodes off the event loop, stores the base messages as TEXT built from orjson's
  bytes, and a thread's reads leave them out.
"""

from __future__ import annotations

import json
import os
import threading

import httpx
import pytest

from runtime import codec
from runtime.transcript import derive_title
from tests import support
from tests.conftest import E2E_LIMIT
from tests.e2e.helpers import wait_turn_end

from .conftest import stored_bytes

AUTH = {"Authorization": "Bearer test-token"}
# Text with what the codecs must keep: non-ASCII, an emoji, escapes, a Greek final sigma.
TEXT = 'Grüße, café ☕ 😀 "quoted" back\\slash tab\t ΟΔΟΣ'
REPLY = "You said: " + " ".join(TEXT.split())  # the scripted model answers word by word


def typeof(column: str) -> str:
    """SQL naming the stored type of ``column``'s value: SQLite's is per value ("text", "blob"); PostgreSQL's
    is the column's ("text")."""
    return f"pg_typeof({column})::text" if support.on_postgresql() else f"typeof({column})"


@pytest.fixture
async def http(server):
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=E2E_LIMIT) as h:
        yield h


@pytest.fixture
def big_codecs(monkeypatch):
    """Counts every encode and decode of a session-sized value (anything holding ``messages``) by the
    runtime's codec and by the stdlib (which Quart's jsonify uses)."""
    seen: list[str] = []
    loop_thread = threading.current_thread()

    def holds_messages(value) -> bool:
        if isinstance(value, (bytes, bytearray, str)):
            return (b'"messages"' if isinstance(value, (bytes, bytearray)) else '"messages"') in value
        return isinstance(value, dict) and ("messages" in value or holds_messages(value.get("session")))

    inside = threading.local()  # count only the outermost call (dumps_sliced calls dumps, loads json.loads)

    def spy(name, real):
        def wrapper(value, *args, **kwargs):
            if getattr(inside, "depth", 0) == 0 and (
                    holds_messages(value) or (isinstance(value, list) and value and isinstance(value[0], dict)
                                              and "content" in value[0])):
                seen.append(name + (" ON THE EVENT LOOP" if threading.current_thread() is loop_thread else ""))
            inside.depth = getattr(inside, "depth", 0) + 1
            try:
                return real(value, *args, **kwargs)
            finally:
                inside.depth -= 1
        return wrapper

    monkeypatch.setattr(codec, "dumps", spy("codec.dumps", codec.dumps))
    monkeypatch.setattr(codec, "dumps_sliced", spy("codec.dumps_sliced", codec.dumps_sliced))
    monkeypatch.setattr(codec, "dumps_parts", spy("codec.dumps_parts", codec.dumps_parts))
    # dumps_sliced that also says where the messages lie (a save in the files storage): one encoding all the same
    monkeypatch.setattr(codec, "dumps_sliced_span", spy("codec.dumps_sliced", codec.dumps_sliced_span))
    monkeypatch.setattr(codec, "loads", spy("codec.loads", codec.loads))
    monkeypatch.setattr(json, "dumps", spy("json.dumps", json.dumps))
    monkeypatch.setattr(json, "loads", spy("json.loads", json.loads))
    return seen


async def saved_thread(client) -> str:
    thread = await client.create_thread()
    turn = await client.start_turn(thread["id"], TEXT)
    assert (await wait_turn_end(client, thread["id"], turn["id"]))["payload"]["status"] == "completed"
    return thread["id"]


async def test_put_answers_with_the_file_bytes_encoded_once(server, client, http, big_codecs):
    tid = await saved_thread(client)
    big_codecs.clear()
    response = await http.put("/v1/sessions", json={"thread_id": tid, "session_id": "big"})
    assert response.status_code == 200, response.text
    assert big_codecs == ["codec.dumps_sliced"]  # the file's encoding, and nothing else

    stored = stored_bytes(server.data_dir, "big")  # the file, or the row in the store
    head = json.dumps({"session_id": "big", "thread_id": tid, "turn_in_progress": False}, separators=(",", ":"))
    assert response.content == head[:-1].encode() + b',"session":' + stored + b"}"
    assert response.headers["content-type"] == "application/json"
    assert response.headers["etag"] == '"1"'
    session = response.json()["session"]
    assert session == json.loads(stored)
    assert session["schema_version"] == 1 and session["metadata"]["revision"] == 1
    assert [m["content"][0]["text"] for m in session["messages"]] == [TEXT, REPLY]


async def test_get_sends_the_stored_document_as_it_is(server, client, http, big_codecs):
    tid = await saved_thread(client)
    assert (await http.put("/v1/sessions", json={"thread_id": tid, "session_id": "big"})).status_code == 200
    stored = stored_bytes(server.data_dir, "big")

    big_codecs.clear()
    response = await http.get("/v1/sessions/big")
    assert response.status_code == 200 and response.content == stored
    assert response.headers["etag"] == '"1"' and response.headers["content-type"] == "application/json"
    assert big_codecs == []  # trusted: sent without a decode or an encode


@pytest.mark.files_only
async def test_get_sends_the_indexed_file_as_stored_and_validates_a_file_changed_behind_the_index(
        server, client, http, big_codecs):
    tid = await saved_thread(client)
    assert (await http.put("/v1/sessions", json={"thread_id": tid, "session_id": "big"})).status_code == 200
    path = server.data_dir / "sessions" / "big.json"
    stored = path.read_bytes()

    big_codecs.clear()
    response = await http.get("/v1/sessions/big")
    assert response.status_code == 200 and response.content == stored
    assert response.headers["etag"] == '"1"' and response.headers["content-type"] == "application/json"
    assert big_codecs == []  # trusted: sent without a decode or an encode

    # Edited on disk while the server runs: the index no longer vouches for it, so it is validated.
    doc = json.loads(stored)
    doc["metadata"].update(title="Edited on disk", revision=7)
    edited = json.dumps(doc, indent=1).encode()
    path.write_bytes(edited)
    big_codecs.clear()
    response = await http.get("/v1/sessions/big")
    assert response.status_code == 200 and response.content == edited
    assert response.headers["etag"] == '"7"'
    assert big_codecs == ["codec.loads"]

    path.write_bytes(edited.replace(b'"messages"', b'"messagez"'))
    response = await http.get("/v1/sessions/big")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_data"
    assert "Failed to parse session 'big'" in response.json()["error"]["message"]

    os.unlink(path)
    response = await http.get("/v1/sessions/big")
    assert response.status_code == 404 and response.json()["error"]["message"] == "Session 'big' not found"
    assert (await http.get("/health")).status_code == 200


async def test_a_big_session_resumes_whole_and_its_thread_reads_leave_the_base_messages_out(
        server, client, http, big_codecs):
    tid = await saved_thread(client)
    assert (await http.put("/v1/sessions", json={"thread_id": tid, "session_id": "big"})).status_code == 200
    doc = json.loads(stored_bytes(server.data_dir, "big"))
    # Make it big enough to be decoded in slices, then let the server validate it (it changed on disk;
    # in the store, there is no disk to change: it is imported under the same id instead).
    doc["messages"] = [{"role": "user" if i % 2 == 0 else "assistant",
                        "content": [{"type": "text", "text": f"{i} {TEXT} " * 300}]} for i in range(200)]
    doc["metadata"]["message_count"] = 200
    if server.runtime.sessions.storage == "files":
        path = server.data_dir / "sessions" / "big.json"
        path.write_bytes(codec.dumps(doc))
    else:
        assert (await http.delete("/v1/sessions/big")).status_code == 204
        assert (await http.post("/v1/sessions/import", content=codec.dumps(doc))).status_code == 201
    assert len(stored_bytes(server.data_dir, "big")) > codec.SLICE_ABOVE

    big_codecs.clear()
    resumed = await http.post("/v1/sessions/big/resume-thread", json={})
    assert resumed.status_code == 201, resumed.text
    # Decoded and encoded again for threads.base_messages (in pieces, never joined: runtime.store.records write_base),
    # both in the worker thread, never on the loop.
    assert big_codecs == ["codec.loads", "codec.dumps_parts"]
    new_tid = resumed.json()["thread_id"]
    assert resumed.json()["message_count"] == 200

    with support.store_connection(server.data_dir) as db:
        kind, text = db.execute(f"SELECT {typeof('base_messages')}, base_messages FROM threads WHERE id = ?",
                                (new_tid,)).fetchone()
    assert kind == "text" and json.loads(text) == doc["messages"]

    detail = await http.get(f"/v1/threads/{new_tid}")
    assert detail.status_code == 200 and "base_messages" not in detail.text
    # The engine restores the messages (decoded in slices) and its next turn sees all of them.
    turn = await client.start_turn(new_tid, "one more")
    assert (await wait_turn_end(client, new_tid, turn["id"]))["payload"]["status"] == "completed"
    saved = await http.put("/v1/sessions", json={"thread_id": new_tid, "session_id": "again"})
    assert saved.status_code == 200
    assert saved.json()["session"]["messages"][:200] == doc["messages"]
    assert saved.json()["session"]["metadata"]["message_count"] == 202


async def test_search_text_is_stored_as_text_and_matches_any_case(server, client, http):
    tid = await saved_thread(client)
    assert (await http.put("/v1/sessions", json={"thread_id": tid, "session_id": "big"})).status_code == 200
    with support.store_connection(server.data_dir) as db:
        # Keyed by the session id on PostgreSQL, by the sessions row's rowid on SQLite (migrations 4 and 11).
        key = "id = 'big'" if support.on_postgresql() else "session_rowid = (SELECT rowid FROM sessions WHERE id = 'big')"
        kind, text = db.execute(f"SELECT {typeof('search_text')}, search_text FROM session_texts WHERE {key}").fetchone()
    assert kind == "text"
    title = derive_title(TEXT)  # whitespace collapsed, cut to 50 characters
    assert text == "\n".join([title, TEXT, REPLY]).lower()
    for query in ("GRÜSSE", "grüße", "CAFÉ ☕ 😀", "οδος", "ΟΔΟΣ"):
        listed = (await http.get("/v1/sessions", params={"search": query})).json()["sessions"]
        expected = ["big"] if query.lower() in text else []
        assert [s["id"] for s in listed] == expected, query
    assert [s["id"] for s in (await http.get("/v1/sessions", params={"search": "ΟΔΟΣ"})).json()["sessions"]] == ["big"]
