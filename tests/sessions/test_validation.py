"""Issue 11, defect 6: session files are validated block by block, and no stored data can crash an
engine.

A file with ``content: ["hello"]`` used to be served by GET (200) and resumed (201) while missing from
the list; every turn of the resumed thread then failed with AttributeError, compact crashed the engine
(503) and PUT answered 500. Now every bad shape gets the same 400 naming the file and the first bad path
(``messages[3].content[0]: ...``) on GET, resume, PUT (update in place) and PATCH, and the list skips
the file with a log line. Threads an older version resumed from such files (their ``base_messages``
hold the bad content) still run turns, compact and save.

Real SQLite and real files; the HTTP tests use a real server on a real socket.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime import InvalidData
from runtime.store.migrations import MIGRATIONS
from runtime.sessions.files import parse_document
from runtime.transcript import word_count
from tests import support
from tests.conftest import E2E_LIMIT, start_server
from tests.e2e.helpers import wait_turn_end

from .conftest import LIMIT, dir_snapshot, run_turn, session_ids_listed, sessions_dir

SMILE = "\U0001F600"
FFFD = "\ufffd"
GOOD_MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": [{"type": "text", "text": "what time is it?"}]},
    {"role": "assistant", "content": [
        {"type": "thinking", "text": "use the tool"},
        {"type": "tool_use", "id": "call_1", "name": "get_time", "input": {}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "12:00"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "It is noon."}]},
]


def document(session_id: str, messages: Any, **metadata: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "metadata": {"id": session_id, "title": "A session", "created_at": "2030-01-01T00:00:00.000Z",
                     "updated_at": "2030-01-01T00:00:00.000Z", "message_count": 4, "total_tokens": 10,
                     "model": "scripted", "workspace": None, "mode": "default", "archived": False, "revision": 3,
                     **metadata},
        "messages": messages,
        "system_prompt": None,
    }


def with_block(message: int, block: int, value: Any) -> list[Any]:
    """GOOD_MESSAGES with one block replaced (or appended at the end of that message)."""
    messages = json.loads(json.dumps(GOOD_MESSAGES))
    content = messages[message]["content"]
    if block < len(content):
        content[block] = value
    else:
        content.append(value)
    return messages


def with_message(index: int, value: Any) -> list[Any]:
    messages = json.loads(json.dumps(GOOD_MESSAGES))
    messages[index] = value
    return messages


# messages -> the problem parse_document names (after "Failed to parse session 's': ").
BAD_SHAPES: dict[str, tuple[Any, str]] = {
    "content_string_block": (with_block(0, 0, "hello"), "messages[0].content[0]: expected an object, got a string"),
    "messages_not_array": ({"0": GOOD_MESSAGES[0]}, "messages: expected an array, got an object"),
    "messages_missing": (None, "messages: expected an array, got null"),
    "message_string": (with_message(2, "hello"), "messages[2]: expected an object, got a string"),
    "role_system": (with_message(1, {"role": "system", "content": []}),
                    "messages[1].role: expected \"user\" or \"assistant\", got 'system'"),
    "role_missing": (with_message(0, {"content": []}), 'messages[0].role: expected "user" or "assistant", got null'),
    "content_string": (with_message(3, {"role": "assistant", "content": "hi"}),
                       "messages[3].content: expected an array, got a string"),
    "interrupted_string": (with_message(3, {**GOOD_MESSAGES[3], "interrupted": "yes"}),
                           "messages[3].interrupted: expected a boolean, got a string"),
    "text_missing": (with_block(3, 0, {"type": "text"}), "messages[3].content[0].text: expected a string, got null"),
    "text_number": (with_block(3, 1, {"type": "text", "text": 5}),
                    "messages[3].content[1].text: expected a string, got a number"),
    "thinking_array": (with_block(1, 0, {"type": "thinking", "text": ["a"]}),
                       "messages[1].content[0].text: expected a string, got an array"),
    "tool_use_id_missing": (with_block(1, 1, {"type": "tool_use", "name": "t", "input": {}}),
                            "messages[1].content[1].id: expected a string, got null"),
    "tool_use_name_bool": (with_block(1, 1, {"type": "tool_use", "id": "c", "name": True, "input": {}}),
                           "messages[1].content[1].name: expected a string, got a boolean"),
    "tool_use_input_string": (with_block(1, 1, {"type": "tool_use", "id": "c", "name": "t", "input": "{}"}),
                              "messages[1].content[1].input: expected an object, got a string"),
    "tool_result_id_number": (with_block(2, 0, {"type": "tool_result", "tool_use_id": 1, "content": "x"}),
                              "messages[2].content[0].tool_use_id: expected a string, got a number"),
    "tool_result_content_number": (
        with_block(2, 0, {"type": "tool_result", "tool_use_id": "c", "content": 12}),
        "messages[2].content[0].content: expected a string or an array of text blocks, got a number"),
    "tool_result_content_bad_part": (
        with_block(2, 0, {"type": "tool_result", "tool_use_id": "c", "content": [{"type": "text", "text": "a"}, "b"]}),
        'messages[2].content[0].content[1]: expected a {type: "text", text} object'),
    "tool_result_is_error_number": (
        with_block(2, 0, {"type": "tool_result", "tool_use_id": "c", "content": "x", "is_error": 1}),
        "messages[2].content[0].is_error: expected a boolean, got a number"),
    "unknown_type": (with_block(3, 1, {"type": "image", "source": {}}),
                     "messages[3].content[1].type: expected one of text, thinking, tool_use, tool_result, got 'image'"),
    "type_missing": (with_block(0, 0, {"text": "hi"}), "messages[0].content[0].type: expected a string, got null"),
}


@pytest.mark.parametrize("shape", sorted(BAD_SHAPES))
def test_each_bad_shape_is_refused_with_its_path(shape):
    messages, problem = BAD_SHAPES[shape]
    data = json.dumps(document("s", messages)).encode()

    with pytest.raises(InvalidData) as caught:
        parse_document("s", data)

    assert str(caught.value) == f"Failed to parse session 's': {problem}"


@pytest.mark.parametrize("field, value, problem", [
    ("revision", True, "metadata.revision must be a positive integer"),
    ("revision", 0, "metadata.revision must be a positive integer"),
    ("revision", "3", "metadata.revision is missing or not a int"),
    ("message_count", -1, "metadata.message_count must be a non-negative integer"),
    ("message_count", False, "metadata.message_count must be a non-negative integer"),
    ("total_tokens", 1.5, "metadata.total_tokens must be a non-negative integer"),
])
def test_metadata_numbers_are_integers_of_their_range(field, value, problem):
    data = json.dumps(document("s", GOOD_MESSAGES, **{field: value})).encode()
    with pytest.raises(InvalidData) as caught:
        parse_document("s", data)
    assert str(caught.value) == f"Failed to parse session 's': {problem}"


def test_every_block_type_extra_fields_and_result_lists_are_accepted_as_they_are():
    messages = json.loads(json.dumps(GOOD_MESSAGES))
    messages[1]["content"][1]["cache_control"] = {"type": "ephemeral"}  # an extra field: kept
    messages[1]["interrupted"] = True
    messages[2]["content"][0].update(is_error=False, content=[{"type": "text", "text": "12:00"}])
    messages.append({"role": "user", "content": [], "note": "extra"})
    doc = document("s", messages)

    assert parse_document("s", json.dumps(doc).encode()) == doc


@pytest.mark.parametrize("where, path", [
    ("text", "messages[3].content[0].text"), ("title", "metadata.title"), ("input", "messages[1].content[1].input.q")])
def test_a_lone_surrogate_escape_is_refused_with_its_path(where, path):
    messages = json.loads(json.dumps(GOOD_MESSAGES))
    doc = document("s", messages)
    marker = "@@lone@@"
    if where == "text":
        messages[3]["content"][0]["text"] = f"noon {marker}"
    elif where == "title":
        doc["metadata"]["title"] = marker
    else:
        messages[1]["content"][1]["input"] = {"q": marker}
    data = json.dumps(doc).replace(marker, "\\ud83d").encode()

    with pytest.raises(InvalidData) as caught:
        parse_document("s", data)

    assert str(caught.value) == (f"Failed to parse session 's': {path}: holds a lone UTF-16 surrogate, which is not"
                                 " valid Unicode text")


def test_an_escaped_surrogate_pair_is_one_valid_character():
    doc = document("s", [{"role": "user", "content": [{"type": "text", "text": "@@"}]}])
    data = json.dumps(doc).replace("@@", "smile \\ud83d\\ude00").encode()

    assert parse_document("s", data)["messages"][0]["content"][0]["text"] == f"smile {SMILE}"


def test_a_surrogate_escape_is_found_wherever_it_is_in_the_sliced_scan(monkeypatch):
    """The scan for surrogate escapes runs a slice at a time (``ESCAPE_SCAN_SLICE``, 1 MB; 16 bytes here) and
    skips data without a backslash: an escape is found at every offset, across every slice border,
    whatever other escapes come before it, and a long document with one only in its last message is
    refused as before."""
    from runtime.sessions import files

    monkeypatch.setattr(files, "ESCAPE_SCAN_SLICE", 16)
    for offset in range(40):
        for before in (b"x", b"\\n"):
            head = (before * 40)[:offset]
            assert files.has_surrogate_escape(head + b"\\udc00" + b"y" * 30), (offset, before)
            assert files.has_surrogate_escape(head + b"\\uD83d"), (offset, before)
            assert not files.has_surrogate_escape(head + b"\\u00e9\\ud7ff" + b"y" * 30), (offset, before)
    assert not files.has_surrogate_escape(b"no backslash at all " * 10)

    messages = [{"role": "user", "content": [{"type": "text", "text": f"line {i}\nnext"}]} for i in range(40)]
    messages[-1]["content"][0]["text"] = "@@lone@@"
    data = json.dumps(document("s", messages)).replace("@@lone@@", "\\udfff").encode()
    assert len(data) > 100 * files.ESCAPE_SCAN_SLICE
    with pytest.raises(InvalidData, match=r"messages\[39\]\.content\[0\]\.text: holds a lone UTF-16 surrogate"):
        parse_document("s", data)


# ---- over HTTP: the same 400 everywhere, the list skips the file -------------------------------------


AUTH = {"Authorization": "Bearer test-token"}


@pytest.mark.files_only
@pytest.mark.parametrize("shape", ["content_string_block", "tool_use_input_string", "unknown_type"])
async def test_a_bad_file_is_the_same_400_on_every_route_and_is_not_listed(nursery, tmp_path, caplog, shape):
    data_dir = tmp_path / "data"
    sessions = sessions_dir(data_dir)
    sessions.mkdir(parents=True)
    messages, problem = BAD_SHAPES[shape]
    (sessions / "bad.json").write_text(json.dumps(document("bad", messages)))
    (sessions / "good.json").write_text(json.dumps(document("good", GOOD_MESSAGES)))
    caplog.set_level(logging.WARNING, logger="runtime.sessions")

    server = await start_server(nursery, data_dir)
    try:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=E2E_LIMIT) as http:
            thread = (await http.post("/v1/threads", json={})).json()
            before = dir_snapshot(sessions)
            expected = f"Failed to parse session 'bad': {problem}"
            for response in (
                await http.get("/v1/sessions/bad"),
                await http.post("/v1/sessions/bad/resume-thread", json={}),
                await http.put("/v1/sessions", json={"thread_id": thread["id"], "session_id": "bad"}),
                await http.patch("/v1/sessions/bad", json={"title": "renamed"}),
            ):
                assert response.status_code == 400, response.text
                assert response.json() == {"error": {"status": 400, "code": "invalid_data", "message": expected}}

            listed = (await http.get("/v1/sessions", params={"include_archived": "true"})).json()["sessions"]
            assert [m["id"] for m in listed] == ["good"]
            assert (await http.get("/v1/sessions/good")).json()["messages"] == GOOD_MESSAGES
            # Nothing was written, no thread was made from the bad file, nothing was linked.
            assert dir_snapshot(sessions) == before
            threads = (await http.get("/v1/threads")).json()
            assert [t["id"] for t in threads] == [thread["id"]] and threads[0]["session_id"] is None
            assert (await http.get("/health")).status_code == 200
    finally:
        server.shutdown.set()
    logged = [r.getMessage() for r in caplog.records if "bad.json" in r.getMessage()]
    assert logged == [f"session file bad.json is not indexed: {expected}"]


@pytest.mark.files_only
async def test_a_bad_file_indexed_by_an_older_version_leaves_the_list_at_the_next_start(open_rt, data_dir):
    """The old shallow check let ``input: "{}"`` through, and the index row's size and mtime still match
    the file, so reconcile would never look at it again: the schema upgrade makes it look once."""
    sessions = sessions_dir(data_dir)
    sessions.mkdir(parents=True)
    conn = sqlite3.connect(data_dir / "runtime.sqlite3")
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    for sid, messages in (("old-bad", BAD_SHAPES["tool_use_input_string"][0]), ("old-good", GOOD_MESSAGES)):
        path = sessions / f"{sid}.json"
        path.write_text(json.dumps(document(sid, messages)))
        st = path.stat()
        conn.execute(
            "INSERT INTO sessions (id, title, created_at, updated_at, message_count, total_tokens, model, workspace,"
            " mode, archived, revision, size, file_mtime_ns, search_text) VALUES (?, 'A session', '2030', '2030', 4,"
            " '10', 'scripted', NULL, 'default', 0, 3, ?, ?, '')", (sid, st.st_size, st.st_mtime_ns))
    conn.commit()
    conn.close()

    async with open_rt() as rt:
        assert await session_ids_listed(rt) == ["old-good"]
        with pytest.raises(InvalidData, match=r"messages\[1\]\.content\[1\]\.input: expected an object"):
            await rt.sessions.get("old-bad")


# ---- threads an older version resumed from a bad file ------------------------------------------------

LEGACY_BASE = [
    {"role": "user", "content": ["hello", {"type": "text", "text": "lone \ud83d"}]},
    "a bare string",
    {"role": "assistant", "content": "plain text content", "interrupted": "yes"},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "t", "input": "{}"}]},
]
# What readable_messages makes of it: nothing readable is dropped.
READABLE_BASE = [
    {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": f"lone {FFFD}"}]},
    {"role": "user", "content": [{"type": "text", "text": "a bare string"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "plain text content"}]},
    {"role": "assistant", "content": [
        {"type": "text", "text": '{"type": "tool_use", "id": "c1", "name": "t", "input": "{}"}'}]},
]


def store_legacy_thread(data_dir: Path, thread_id: str) -> None:
    """Put LEGACY_BASE into the thread's base_messages as an older version's resume did (json.dumps)."""
    with support.store_connection(data_dir) as conn:
        conn.execute("UPDATE threads SET base_messages = ?, base_tokens = 7 WHERE id = ?",
                     (json.dumps(LEGACY_BASE), thread_id))


async def test_an_old_thread_with_bad_base_messages_runs_a_turn_compacts_and_saves(open_rt, data_dir, caplog):
    async with open_rt() as rt:
        tid = (await rt.create_thread(title="Old thread"))["id"]
    store_legacy_thread(data_dir, tid)
    caplog.set_level(logging.WARNING, logger="runtime.transcript")

    async with open_rt() as rt:
        end = await run_turn(rt, tid, "still there?")
        assert (end["status"], end["error"]) == ("completed", None)
        # The scripted model counted the history's words: it read every legacy message.
        assert end["usage"] == {"input_tokens": word_count(READABLE_BASE) + 2, "output_tokens": 4}
        snapshot = await rt.get_session_snapshot(tid)
        assert list(snapshot.messages[:4]) == READABLE_BASE

        rebuilt = await rt.sessions.rebuild(thread_id=tid, timeout=LIMIT)
        assert (await rt.sessions.get(rebuilt["session_id"]))["messages"][:4] == READABLE_BASE

        compacted = await rt.compact(tid, reason="old data")
        assert compacted["summary"].startswith("6 earlier message(s).\nuser: hello lone \ufffd")
        saved = await rt.sessions.save(thread_id=tid, timeout=LIMIT)
        assert saved["session"]["messages"] == [{"role": "user", "content": [
            {"type": "text", "text": f"[Summary of earlier conversation]\n{compacted['summary']}"}]}]
        assert (await rt.sessions.get(saved["session_id"]))["messages"] == saved["session"]["messages"]
        assert (await run_turn(rt, tid, "after compaction"))["status"] == "completed"
        assert rt.manager.engine(tid) is not None and not rt.manager.engine(tid).crashed
    assert f"thread {tid}: base_messages: not valid (messages[0].content[0]: expected an object, got a string);" \
        " read leniently, nothing readable dropped" in [r.getMessage() for r in caplog.records]


async def test_an_old_thread_with_bad_base_messages_over_http(nursery, tmp_path):
    data_dir = tmp_path / "data"
    async with support.open_runtime(data_dir) as rt:
        tid = (await rt.create_thread())["id"]
    store_legacy_thread(data_dir, tid)

    server = await start_server(nursery, data_dir)
    try:
        async with server.client() as client, httpx.AsyncClient(base_url=server.url, headers=AUTH,
                                                                timeout=E2E_LIMIT) as http:
            turn = await client.start_turn(tid, "still there?")
            assert (await wait_turn_end(client, tid, turn["id"]))["payload"]["status"] == "completed"
            put = await http.put("/v1/sessions", json={"thread_id": tid})
            assert put.status_code == 200, put.text
            assert put.json()["session"]["messages"][:4] == READABLE_BASE
            post = await http.post("/v1/sessions", json={"thread_id": tid})
            assert post.status_code == 201, post.text
            compact = await http.post(f"/v1/threads/{tid}/compact", json={})
            assert compact.status_code == 200, compact.text
            assert (await http.get(f"/v1/sessions/{put.json()['session_id']}")).status_code == 200
            second = await client.start_turn(tid, "and now?")
            assert (await wait_turn_end(client, tid, second["id"]))["payload"]["status"] == "completed"
    finally:
        server.shutdown.set()
