"""Portable sessions: export (json, markdown) and import, on real Runtimes, real files and real SQLite.

The round trips go between two data directories (two Runtimes), as a user moving a session to another
machine would. Every refused import is checked from the disk and the index (nothing written, no temp
file), never from the error alone. The HTTP side (routes, headers, the ``/import`` and ``/export`` URLs
against sessions of those names) runs on a real server on a real socket; the two-process round trip is
in tests/e2e/test_portable_e2e.py.
"""

from __future__ import annotations

import json

import httpx
import pytest

from runtime import InvalidData, InvalidInput, NotFound
from runtime.errors import Conflict
from runtime.sessions.portable import render_markdown
from runtime.sessions.files import encode_document
from tests.cancellation.harness import capture, check_invariants
from tests.conftest import E2E_LIMIT
from tests.support import open_runtime
from web.client import ApiError

from .conftest import LIMIT, dir_snapshot, run_turn, session_ids_listed, stored_bytes
from .test_big_documents import big_codecs  # noqa: F401 (a fixture)

AUTH = {"Authorization": "Bearer test-token"}
SYSTEM = "Be brief."
# A document whose messages hold all four block types, an interrupted message, extra fields (kept as
# they are by an import) and text with backticks (a tool result fenced around them).
FOUR_BLOCKS = {
    "schema_version": 1,
    "metadata": {
        "id": "four-blocks", "title": "Weather  check", "created_at": "2030-01-01T00:00:00.000Z",
        "updated_at": "2030-01-01T00:00:01.000Z", "message_count": 4, "total_tokens": 42, "model": "scripted",
        "workspace": None, "mode": "default", "archived": False, "revision": 1, "thread_id": "t-elsewhere",
        "origin": {"exported_by": "another tool"},
    },
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is the weather in Oslo?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "text": "I should call the tool.\nThen answer."},
            {"type": "tool_use", "id": "call-1", "name": "get_weather", "input": {"city": "Oslo", "days": 2}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call-1", "content": "rain ``` and wind", "is_error": True},
            {"type": "tool_result", "tool_use_id": "call-2", "content": [{"type": "text", "text": "sunny"}]},
        ], "note": "an extra field"},
        {"role": "assistant", "content": [{"type": "text", "text": "Rain, *maybe* sun."}], "interrupted": True},
    ],
    "system_prompt": SYSTEM,
    "extra": [1, 2, 3],
}
FOUR_BLOCKS_MARKDOWN = """\
# Weather check

Session `four-blocks`, 4 message(s), updated 2030-01-01T00:00:01.000Z

## System prompt

Be brief.

## User

What is the weather in Oslo?

## Assistant

> **Thinking**
>
> I should call the tool.
> Then answer.

**Tool call** `get_weather` (id `call-1`)

```json
{
  "city": "Oslo",
  "days": 2
}
```

## User

**Tool result** (error) for `call-1`

````
rain ``` and wind
````

**Tool result** for `call-2`

```
sunny
```

## Assistant (interrupted)

Rain, *maybe* sun.
"""


def four_blocks(**metadata) -> dict:
    doc = json.loads(json.dumps(FOUR_BLOCKS))
    doc["metadata"].update(metadata)
    return doc


async def saved_session(rt, session_id: str = "source") -> str:
    """A session saved from a real thread: a /think turn (thinking block) and a plain one."""
    thread = await rt.create_thread(title="portable", system_prompt=SYSTEM)
    for prompt in ("/think weighing it\nfirst question", "second question"):
        assert (await run_turn(rt, thread["id"], prompt))["status"] == "completed"
    await rt.sessions.save(thread_id=thread["id"], session_id=session_id, timeout=LIMIT)
    return thread["id"]


def stored(rt, session_id: str) -> bytes:
    """The stored document: its file, or its row in the store."""
    data = stored_bytes(rt, session_id)
    assert data is not None
    return data


def durable(data_dir):
    """Files (temp files included), index rows, threads and events: what a refused import must not touch."""
    state = capture(data_dir)
    return state.files, state.temp_files, state.sessions, state.threads, state.event_counts


# ---- export ----------------------------------------------------------------------------------


async def test_json_export_is_the_stored_file_as_it_is(rt):
    await saved_session(rt)
    data, content_type, filename = await rt.sessions.export("source", "json")
    assert data == stored(rt, "source")
    assert (content_type, filename) == ("application/json", "source.json")
    doc = json.loads(data)
    assert [m["role"] for m in doc["messages"]] == ["user", "assistant", "user", "assistant"]
    assert doc["messages"][1]["content"][0] == {"type": "thinking", "text": "weighing it"}


@pytest.mark.files_only
async def test_markdown_export_renders_every_block_type(tmp_path):
    """Title, system prompt first, each message under its role, thinking as a quoted "Thinking" block,
    tool calls with name and JSON input, tool results with their content and "(error)"."""
    data_dir = tmp_path / "data"
    (data_dir / "sessions").mkdir(parents=True)
    (data_dir / "sessions" / "four-blocks.json").write_bytes(encode_document(FOUR_BLOCKS))
    async with open_runtime(data_dir) as rt:  # indexed by the start-up reconcile, like any file
        data, content_type, filename = await rt.sessions.export("four-blocks", "markdown")
    assert (content_type, filename) == ("text/markdown; charset=utf-8", "four-blocks.md")
    assert data.decode("utf-8") == FOUR_BLOCKS_MARKDOWN


async def test_markdown_export_of_a_saved_thread(rt):
    await saved_session(rt)
    data, _, _ = await rt.sessions.export("source", "markdown")
    text = data.decode("utf-8")
    assert text.startswith("# portable\n\nSession `source`, 4 message(s), updated ")
    sections = text.split("\n\n## ")[1:]
    assert [s.split("\n", 1)[0] for s in sections] == ["System prompt", "User", "Assistant", "User", "Assistant"]
    assert sections[2] == "Assistant\n\n> **Thinking**\n>\n> weighing it\n\nYou said: first question"
    assert sections[4] == "Assistant\n\nYou said: second question\n"


def test_a_fence_is_longer_than_any_backtick_run_inside():
    doc = four_blocks()
    doc["messages"] = [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "x", "content": "a ````` b"}]}]
    assert "\n``````\na ````` b\n``````\n" in render_markdown(doc).decode()


async def test_export_errors(rt):
    await saved_session(rt)
    with pytest.raises(InvalidInput, match="Cannot export a session as 'pdf': format must be one of: json, markdown"):
        await rt.sessions.export("source", "pdf")
    with pytest.raises(NotFound, match="Session 'missing' not found"):
        await rt.sessions.export("missing", "json")
    with pytest.raises(InvalidInput, match="Invalid session id '../source'"):
        await rt.sessions.export("../source", "markdown")
    if rt.sessions.storage != "files":
        return  # no file to break by hand: the store holds only documents it checked
    (rt.config.sessions_dir / "broken.json").write_bytes(b'{"schema_version": 1')  # never indexed
    for fmt in ("json", "markdown"):
        with pytest.raises(InvalidData, match="Failed to parse session 'broken': "):
            await rt.sessions.export("broken", fmt)


# ---- round trips -----------------------------------------------------------------------------


async def test_round_trip_into_another_data_dir_is_byte_equal_at_revision_1(tmp_path):
    async with open_runtime(tmp_path / "a") as source:
        await saved_session(source)
        exported, _, _ = await source.sessions.export("source", "json")
    async with open_runtime(tmp_path / "b") as target:
        assert await target.sessions.import_document(exported, timeout=LIMIT) == {"session_id": "source",
                                                                                  "revision": 1}
        again, _, _ = await target.sessions.export("source", "json")
        assert again == exported == stored(target, "source")
        # Indexed and listed like any session, searchable by its text, and it resumes.
        assert await session_ids_listed(target) == ["source"]
        assert await session_ids_listed(target, search="SECOND QUESTION") == ["source"]
        listed = (await target.sessions.list(limit=10))[0]
        assert (listed["revision"], listed["message_count"], listed["title"]) == (1, 4, "portable")
        resumed = await target.sessions.resume("source")
        snapshot = await target.get_session_snapshot(resumed["thread_id"], timeout=LIMIT)
        assert list(snapshot.messages) == json.loads(exported)["messages"]
        assert snapshot.system_prompt == SYSTEM
        await check_invariants(target, tmp_path / "b")


async def test_round_trip_at_a_later_revision_differs_only_in_the_revision(tmp_path):
    async with open_runtime(tmp_path / "a") as source:
        thread_id = await saved_session(source)
        await source.sessions.save(thread_id=thread_id, session_id="source", timeout=LIMIT)
        await source.sessions.patch("source", title="renamed", archived=True, timeout=LIMIT)
        exported, _, _ = await source.sessions.export("source", "json")
    assert json.loads(exported)["metadata"]["revision"] == 3
    async with open_runtime(tmp_path / "b") as target:
        assert (await target.sessions.import_document(exported, timeout=LIMIT))["revision"] == 1
        again = json.loads((await target.sessions.export("source", "json"))[0])
        expected = json.loads(exported)
        expected["metadata"]["revision"] = 1
        assert again == expected
        assert list(again["metadata"]) == list(expected["metadata"])  # the fields keep their order
        assert await session_ids_listed(target) == []  # archived, as it was
        assert await session_ids_listed(target, archived_only=True) == ["source"]
        # It changes like any session from here: the next save is revision 2.
        thread = await target.create_thread()
        await run_turn(target, thread["id"], "hello")
        saved = await target.sessions.save(thread_id=thread["id"], session_id="source", timeout=LIMIT)
        assert saved["session"]["metadata"]["revision"] == 2
        await check_invariants(target, tmp_path / "b")


async def test_import_keeps_every_field_extra_ones_too(rt, data_dir):
    document = four_blocks(revision=7)
    result = await rt.sessions.import_document(json.dumps(document).encode(), timeout=LIMIT)
    assert result == {"session_id": "four-blocks", "revision": 1}
    document["metadata"]["revision"] = 1
    assert json.loads(stored(rt, "four-blocks")) == document
    assert stored(rt, "four-blocks") == encode_document(document)
    assert (await rt.sessions.get("four-blocks"))["messages"] == document["messages"]
    state = await check_invariants(rt, data_dir)
    assert state.sessions["four-blocks"]["revision"] == 1
    assert state.event_counts.get("session.saved", 0) == 0  # no thread here to tell


async def test_import_with_an_id_stores_the_document_under_that_id(rt, data_dir):
    await saved_session(rt)
    exported, _, _ = await rt.sessions.export("source", "json")
    # The document's own id is taken (by "source" itself): ?id makes that irrelevant.
    result = await rt.sessions.import_document(exported, session_id="copy_2", timeout=LIMIT)
    assert result == {"session_id": "copy_2", "revision": 1}
    copy = json.loads(stored(rt, "copy_2"))
    original = json.loads(exported)
    assert copy["metadata"]["id"] == "copy_2"
    copy["metadata"]["id"] = "source"
    assert copy == original
    assert stored(rt, "source") == exported
    assert sorted(await session_ids_listed(rt)) == ["copy_2", "source"]
    await check_invariants(rt, data_dir)


# ---- refused imports: nothing written ------------------------------------------------------------


async def test_import_of_an_existing_id_is_409_and_changes_nothing(rt, data_dir):
    await saved_session(rt)
    exported, _, _ = await rt.sessions.export("source", "json")
    await rt.sessions.import_document(json.dumps(four_blocks()).encode(), timeout=LIMIT)
    before = durable(data_dir)
    with pytest.raises(Conflict, match="Cannot import session 'source': a session with that id already exists"):
        await rt.sessions.import_document(exported, timeout=LIMIT)
    with pytest.raises(Conflict, match="Cannot import session 'four-blocks': a session with that id already"):
        await rt.sessions.import_document(exported, session_id="four-blocks", timeout=LIMIT)
    assert durable(data_dir) == before
    await check_invariants(rt, data_dir)


def _deep_bad_block() -> bytes:
    doc = four_blocks()
    doc["messages"][2]["content"][1]["content"][0] = {"type": "image", "text": "x"}
    return json.dumps(doc).encode()


def _with(**changes) -> bytes:
    doc = four_blocks()
    for key, value in changes.items():
        doc[key] = value
    return json.dumps(doc).encode()


BAD_DOCUMENTS = [
    ("not JSON", b"this is not json", None,
     "Failed to import session: the body is not a JSON document: Expecting value: line 1 column 1 (char 0)"),
    ("not UTF-8", b'{"schema_version": 1, "x": "\xff"}', None,
     "Failed to import session: the body is not a JSON document: 'utf-8' codec can't decode byte 0xff"),
    ("empty", b"", "fresh", "Failed to import session 'fresh': the body is not a JSON document: Expecting value"),
    ("an array", b"[]", None, "Failed to import session: the file does not hold a JSON object"),
    ("schema_version 2", _with(schema_version=2), None, "Failed to import session: unsupported schema_version 2"),
    ("a bad block type deep inside", _deep_bad_block(), "fresh",
     "Failed to import session 'fresh': messages[2].content[1].content[0]: expected a {type: \"text\", text} object"),
    ("a bad block type", json.dumps(four_blocks()).replace('"thinking"', '"musing"').encode(), None,
     "Failed to import session: messages[1].content[0].type: expected one of text, thinking, tool_use, "
     "tool_result, got 'musing'"),
    ("a lone surrogate escape", json.dumps(four_blocks()).replace("Oslo?", "Oslo\\ud83d").encode(), None,
     "Failed to import session: messages[0].content[0].text: holds a lone UTF-16 surrogate"),
    ("a bad id in the document", json.dumps(four_blocks(id="../etc")).encode(), None,
     "Failed to import session: metadata.id: Invalid session id '../etc'"),
    ("a bad id in the document, with ?id", json.dumps(four_blocks(id="a/b")).encode(), "fresh",
     "Failed to import session 'fresh': metadata.id: Invalid session id 'a/b'"),
    ("no title", json.dumps(four_blocks(title=None)).encode(), None,
     "Failed to import session: metadata.title is missing or not a str"),
    ("nested too deeply", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, None,
     "Failed to import session: the document is nested too deeply"),
]


@pytest.mark.parametrize("name,data,session_id,message", BAD_DOCUMENTS, ids=[b[0] for b in BAD_DOCUMENTS])
async def test_a_bad_document_is_refused_naming_the_path_and_nothing_is_written(rt, data_dir, name, data,
                                                                                session_id, message):
    await saved_session(rt)
    before = durable(data_dir)
    with pytest.raises(InvalidInput) as info:
        await rt.sessions.import_document(data, session_id=session_id, timeout=LIMIT)
    assert info.value.message.startswith(message), info.value.message
    assert durable(data_dir) == before
    assert before[1] == []  # no temp file either
    await check_invariants(rt, data_dir)


@pytest.mark.parametrize("session_id", ["a/b", "..", "../x", "", ".hidden", "x" * 129, "caf\u00e9"])
async def test_a_bad_id_parameter_is_refused_before_the_body_is_read(rt, data_dir, session_id):
    before = durable(data_dir)
    with pytest.raises(InvalidInput, match="Invalid session id"):
        await rt.sessions.import_document(json.dumps(four_blocks()).encode(), session_id=session_id, timeout=LIMIT)
    assert durable(data_dir) == before


# ---- over HTTP (a real server, a real socket) ---------------------------------------------------


@pytest.fixture
async def http(server):
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=E2E_LIMIT) as h:
        yield h


def assert_error(response: httpx.Response, status: int, code: str, message: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {"error": {"status": status, "code": code, "message": message}}


async def test_export_over_http_is_a_download(server, http):
    await saved_session(server.runtime)
    response = await http.get("/v1/sessions/source/export")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-disposition"] == 'attachment; filename="source.json"'
    assert response.content == stored(server.runtime, "source")
    response = await http.get("/v1/sessions/source/export", params={"format": "markdown"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/markdown; charset=utf-8"
    assert response.headers["content-disposition"] == 'attachment; filename="source.md"'
    assert response.text.startswith("# portable\n")
    assert_error(await http.get("/v1/sessions/source/export", params={"format": "html"}), 400, "invalid_input",
                 "Cannot export a session as 'html': format must be one of: json, markdown")
    assert_error(await http.get("/v1/sessions/nope/export"), 404, "not_found", "Session 'nope' not found")
    response = await http.get("/v1/sessions/a%2F..%2Fsource/export")
    assert response.status_code == 400 and "Invalid session id 'a/../source'" in response.json()["error"]["message"]
    if server.runtime.sessions.storage == "files":  # the store holds only documents it checked
        (server.data_dir / "sessions" / "broken.json").write_bytes(b"{")
        response = await http.get("/v1/sessions/broken/export")
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_data"
    for method in ("PATCH", "DELETE", "POST", "PUT"):
        assert_error(await http.request(method, "/v1/sessions/source/export"), 405, "method_not_allowed",
                     "Method not allowed for this route")


async def test_import_over_http(server, http, client):
    await saved_session(server.runtime)
    exported = await client.export_session("source")
    assert exported == stored(server.runtime, "source")
    response = await http.post("/v1/sessions/import", params={"id": "moved"}, content=exported)
    assert response.status_code == 201 and response.json() == {"session_id": "moved", "revision": 1}
    assert_error(await http.post("/v1/sessions/import", content=exported), 409, "conflict",
                 "Cannot import session 'source': a session with that id already exists")
    response = await http.post("/v1/sessions/import", params={"id": "a/b"}, content=exported)
    assert response.status_code == 400 and response.json()["error"]["message"].startswith("Invalid session id 'a/b'")
    # An empty query value means "not given", as for every query parameter: the document's own id.
    response = await http.post("/v1/sessions/import?id=", content=json.dumps(four_blocks()))
    assert response.status_code == 201 and response.json()["session_id"] == "four-blocks"
    assert_error(await http.post("/v1/sessions/import", content=b"[1]"), 400, "invalid_input",
                 "Failed to import session: the file does not hold a JSON object")
    # The typed client: a dict or bytes; markdown comes back as text.
    assert await client.import_session(four_blocks(), session_id="typed") == {"session_id": "typed", "revision": 1}
    assert await client.export_session("typed", format="markdown") == FOUR_BLOCKS_MARKDOWN.replace(
        "`four-blocks`", "`typed`")
    with pytest.raises(ApiError) as info:
        await client.import_session(exported)
    assert (info.value.status, info.value.code) == (409, "conflict")
    assert sorted(await session_ids_listed(server.runtime)) == ["four-blocks", "moved", "source", "typed"]
    await check_invariants(server.runtime, server.data_dir)


async def test_a_session_called_import_or_export_is_still_reachable(server, http, client):
    """``POST /v1/sessions/import`` is the import route; every other method of that URL, and every URL
    under it, addresses a session called "import" (and likewise for "export")."""
    thread_id = await saved_session(server.runtime)
    for name in ("import", "export"):
        saved = await client.save_session(thread_id=thread_id, session_id=name)
        assert saved["session_id"] == name
        assert (await client.get_session(name))["metadata"]["id"] == name
        assert (await client.patch_session(name, title=f"called {name}"))["session"]["revision"] == 2
        exported = await client.export_session(name)
        assert json.loads(exported)["metadata"]["title"] == f"called {name}"
        resumed = await client.resume_thread(name)
        assert resumed["session_id"] == name
    # /v1/sessions/x/export is the export of "x", never a session id "x/export".
    assert (await http.get("/v1/sessions/import/export")).content == stored(server.runtime, "import")
    assert (await http.get("/v1/sessions/export/export")).content == stored(server.runtime, "export")
    for name in ("import", "export"):
        assert (await http.delete(f"/v1/sessions/{name}")).status_code == 204
    assert_error(await http.get("/v1/sessions/import"), 404, "not_found", "Session 'import' not found")
    response = await http.put("/v1/sessions/import", json={})
    assert response.status_code == 405
    assert sorted(response.headers["allow"].split(", ")) == ["DELETE", "GET", "HEAD", "PATCH", "POST"]
    assert sorted(await session_ids_listed(server.runtime)) == ["source"]
    await check_invariants(server.runtime, server.data_dir)


async def test_an_import_body_over_the_limit_is_413_and_nothing_is_written(nursery, tmp_path):
    from tests.conftest import start_server

    live = await start_server(nursery, tmp_path / "data", max_body=4096)
    try:
        document = four_blocks()
        document["messages"][0]["content"][0]["text"] = "x" * 5000
        async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=E2E_LIMIT) as h:
            response = await h.post("/v1/sessions/import", content=json.dumps(document))
            assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
        assert dir_snapshot(tmp_path / "data" / "sessions") == {}
        await check_invariants(live.runtime, live.data_dir)
    finally:
        live.shutdown.set()


async def test_openapi_describes_export_and_import(http):
    spec = (await http.get("/openapi.json")).json()
    export = spec["paths"]["/v1/sessions/{session_id}/export"]["get"]
    assert [p["name"] for p in export["parameters"]] == ["session_id", "format"]
    assert export["parameters"][1]["schema"] == {"type": "string", "enum": ["json", "markdown"]}
    assert sorted(export["responses"]) == ["200", "400", "401", "404", "500", "507"]
    assert export["responses"]["200"]["content"] == {
        "application/json": {"schema": {"$ref": "#/components/schemas/SessionDocument"}},
        "text/markdown": {"schema": {"type": "string"}}}
    # The URL of the import is also the session called "import": the document says so, like Allow does.
    assert sorted(spec["paths"]["/v1/sessions/import"]) == ["delete", "get", "patch", "post"]
    imported = spec["paths"]["/v1/sessions/import"]["post"]
    assert imported["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SessionDocument"}
    assert imported["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ImportResult"}
    assert sorted(imported["responses"]) == ["201", "400", "401", "403", "409", "413", "422", "500", "507"]
    assert spec["components"]["schemas"]["ImportResult"]["required"] == ["session_id", "revision"]


async def test_a_big_document_is_decoded_and_encoded_once_each_off_the_event_loop(server, http, big_codecs):
    """A ~6 MB import (under the 8 MiB default body limit): decoded once and encoded once, both in
    worker threads; the json export sends the file without touching a codec; the markdown export decodes
    once, in a worker thread. Round trip byte for byte."""
    document = four_blocks(id="big")
    document["messages"] = [
        {"role": role, "content": [{"type": "text", "text": f"message {i} Grüße 😀 " + "x" * 3000}]}
        for i, role in zip(range(2000), ["user", "assistant"] * 1000)]
    data = encode_document(document)
    assert 6_000_000 < len(data) < 8 * 1024 * 1024
    big_codecs.clear()
    response = await http.post("/v1/sessions/import", content=data)
    assert response.status_code == 201 and response.json() == {"session_id": "big", "revision": 1}
    assert big_codecs == ["codec.loads", "codec.dumps_sliced"]
    big_codecs.clear()
    response = await http.get("/v1/sessions/big/export")
    assert response.content == data and big_codecs == []
    response = await http.get("/v1/sessions/big/export", params={"format": "markdown"})
    assert big_codecs == ["codec.loads"]
    assert response.text.count("\n## User\n") == 1000 and response.text.count("\n## Assistant\n") == 1000
    assert "\n\nmessage 1999 Grüße 😀 xxx" in response.text
    await check_invariants(server.runtime, server.data_dir)
