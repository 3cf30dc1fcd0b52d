"""Idempotency-Key and caller-supplied thread ids over a real socket (API.md v1.1, "Idempotency and
caller-supplied ids"). Every test judges from the database too, not only from the answers: exactly one
thread or turn per key, a record only where a change was made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests import support
from tests.conftest import E2E_LIMIT, start_server
from tests.e2e.helpers import wait_turn_end
from tests.e2e.process import ServerProcess
from tests.support import CLIENT_TLS
from web.client import AsyncClient

CONCURRENT = 50  # the "50 requests with one key at once"


def _http(server: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"},
                             timeout=E2E_LIMIT, verify=CLIENT_TLS,
                             limits=httpx.Limits(max_connections=CONCURRENT + 5))


def _rows(data_dir: Path, sql: str, *params: Any) -> list[tuple]:
    with support.store_connection(data_dir) as db:
        return [tuple(row) for row in db.execute(sql, params).fetchall()]


def _count(data_dir: Path, table: str) -> int:
    return _rows(data_dir, f"SELECT COUNT(*) FROM {table}")[0][0]


async def _all_at_once(http: httpx.AsyncClient, method: str, path: str, body: dict, key: str) -> list[httpx.Response]:
    answers: list[httpx.Response] = []

    async def one() -> None:
        answers.append(await http.request(method, path, json=body, headers={"Idempotency-Key": key}))

    with trio.fail_after(E2E_LIMIT):
        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENT):
                nursery.start_soon(one)
    return answers


def _one_change(answers: list[httpx.Response], status: int) -> bytes:
    """Every answer is the change's (same bytes) or 409 in progress; exactly one ran it (no replay header)."""
    assert len(answers) == CONCURRENT
    ok = [a for a in answers if a.status_code == status]
    busy = [a for a in answers if a.status_code == 409]
    assert len(ok) + len(busy) == CONCURRENT, sorted({a.status_code for a in answers})
    assert {a.json()["error"]["code"] for a in busy} <= {"idempotency_key_in_progress"}
    assert ok and len({a.content for a in ok}) == 1
    assert [a.headers.get("Idempotent-Replayed") for a in ok].count(None) == 1
    return ok[0].content


async def test_fifty_concurrent_creates_with_one_key_make_one_thread_and_a_retry_replays_it(server):
    async with _http(server) as http:
        answers = await _all_at_once(http, "POST", "/v1/threads", {"title": "exactly once"}, "create-once")
        body = _one_change(answers, 201)
        listed = (await http.get("/v1/threads")).json()
        assert [t["title"] for t in listed] == ["exactly once"]
        assert _rows(server.data_dir, "SELECT title FROM threads") == [("exactly once",)]
        assert _rows(server.data_dir, "SELECT key, status FROM idempotency") == [("create-once", 201)]
        retry = await http.post("/v1/threads", json={"title": "exactly once"},
                                headers={"Idempotency-Key": "create-once"})
        assert (retry.status_code, retry.content, retry.headers["Idempotent-Replayed"]) == (201, body, "true")
        assert retry.json()["id"] == listed[0]["id"]
        assert _count(server.data_dir, "threads") == 1


async def test_fifty_concurrent_turn_starts_with_one_key_make_one_turn_and_a_retry_replays_it(server, client):
    tid = (await client.create_thread())["id"]
    async with _http(server) as http:
        path = f"/v1/threads/{tid}/turns"
        answers = await _all_at_once(http, "POST", path, {"prompt": "one two three"}, "turn-once")
        body = _one_change(answers, 201)
        turn = json.loads(body)
        await wait_turn_end(client, tid, turn["id"])
        detail = (await http.get(f"/v1/threads/{tid}")).json()
        assert [(t["id"], t["status"]) for t in detail["turns"]] == [(turn["id"], "completed")]
        assert _rows(server.data_dir, "SELECT COUNT(*) FROM events WHERE event = 'turn.started'") == [(1,)]
        retry = await http.post(path, json={"prompt": "one two three"}, headers={"Idempotency-Key": "turn-once"})
        assert (retry.status_code, retry.content, retry.headers["Idempotent-Replayed"]) == (201, body, "true")
        # The replay is the first answer (the turn as it started), not the turn as it is now.
        assert retry.json()["status"] == "in_progress"
        assert _count(server.data_dir, "turns") == 1


async def test_every_post_and_put_replays_byte_for_byte_after_a_restart(tmp_path):
    data_dir = tmp_path / "data"
    proc = await ServerProcess(data_dir).start()
    calls: list[tuple[str, str, dict | None, str, int]] = []
    first: list[httpx.Response] = []
    try:
        async with httpx.AsyncClient(base_url=proc.url, headers={"Authorization": f"Bearer {proc.token}"},
                                     timeout=E2E_LIMIT, verify=CLIENT_TLS) as http:
            async def keyed(method: str, path: str, body: dict | None, key: str, status: int) -> dict:
                answer = await http.request(method, path, json=body, headers={"Idempotency-Key": key})
                assert answer.status_code == status, answer.text
                assert "Idempotent-Replayed" not in answer.headers
                calls.append((method, path, body, key, status))
                first.append(answer)
                return answer.json()

            await keyed("POST", "/v1/threads", {"id": "kept", "title": "kept"}, "k-create", 201)
            hang = await keyed("POST", "/v1/threads/kept/turns", {"prompt": "/hang"}, "k-turn", 201)
            await keyed("POST", f"/v1/threads/kept/turns/{hang['id']}/steer", {"prompt": "and this"}, "k-steer", 200)
            await keyed("POST", f"/v1/threads/kept/turns/{hang['id']}/interrupt", None, "k-interrupt", 200)
            await keyed("POST", "/v1/threads/kept/compact", {"reason": "short"}, "k-compact", 200)
            await keyed("PUT", "/v1/sessions", {"thread_id": "kept", "session_id": "kept-s"}, "k-save", 200)
            await keyed("POST", "/v1/sessions", {"thread_id": "kept"}, "k-rebuild", 201)
            resumed = await keyed("POST", "/v1/sessions/kept-s/resume-thread", {}, "k-resume", 201)
            assert first[5].headers["ETag"] == '"1"'
            # History control and import (each stores its answer in its own change's write).
            fork = await keyed("POST", "/v1/threads/kept/fork", {"id": "kept-fork"}, "k-fork", 201)
            await keyed("POST", "/v1/threads/kept-fork/rewind", {"before_turn_id": fork["turn_ids"][1]},
                        "k-rewind", 200)
            await http.post("/v1/threads", json={"id": "r"})
            async with AsyncClient(proc.url, proc.token) as typed:
                done = await typed.start_turn("r", "hello there")
                await wait_turn_end(typed, "r", done["id"])
                retried = await keyed("POST", "/v1/threads/r/retry", {}, "k-retry", 201)
                await wait_turn_end(typed, "r", retried["id"])
            await keyed("POST", "/v1/threads/r/restore", {"session_id": "kept-s"}, "k-restore", 200)
            exported = (await http.get("/v1/sessions/kept-s/export")).json()
            answer = await http.post("/v1/sessions/import", params={"id": "imp"}, json=exported,
                                     headers={"Idempotency-Key": "k-import"})
            assert answer.status_code == 201, answer.text
            calls.append(("POST", "/v1/sessions/import?id=imp", exported, "k-import", 201))
            first.append(answer)
        proc.process.terminate()
        assert await proc.wait() == 0
        before = (_count(data_dir, "threads"), _count(data_dir, "turns"), _count(data_dir, "sessions"),
                  _count(data_dir, "events"))
        # Threads kept, resumed, kept-fork and r; turns: kept's hang and compaction, their copies in the fork,
        # r's turn and its retry; sessions kept-s, the rebuild, the restore's safety session and the import.
        assert before[:3] == (4, 6, 4)
        proc = await ServerProcess(data_dir).start()
        async with httpx.AsyncClient(base_url=proc.url, headers={"Authorization": f"Bearer {proc.token}"},
                                     timeout=E2E_LIMIT, verify=CLIENT_TLS) as http:
            for (method, path, body, key, status), answer in zip(calls, first):
                again = await http.request(method, path, json=body, headers={"Idempotency-Key": key})
                assert (again.status_code, again.content) == (status, answer.content), (method, path)
                assert again.headers["Idempotent-Replayed"] == "true"
                assert again.headers.get("ETag") == answer.headers.get("ETag")
            assert resumed["thread_id"] in {t["id"] for t in (await http.get("/v1/threads")).json()}
        after = (_count(data_dir, "threads"), _count(data_dir, "turns"), _count(data_dir, "sessions"),
                 _count(data_dir, "events"))
        assert after == before
        assert _count(data_dir, "idempotency") == len(calls)
    finally:
        proc.kill()


@pytest.mark.parametrize("key", [
    pytest.param("k" * 256, id="256 characters"),
    pytest.param("", id="empty"),
    pytest.param("with space", id="space"),
    pytest.param("tab\there", id="control character"),
    pytest.param("caf\xe9".encode("latin-1"), id="non-ASCII"),
    pytest.param(b"del\x7f", id="DEL"),
])
async def test_a_malformed_key_is_400_naming_the_header_and_changes_nothing(server, key):
    async with _http(server) as http:
        answer = await http.post("/v1/threads", json={"title": "never"}, headers={"Idempotency-Key": key})
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "invalid_input"
        assert "Idempotency-Key" in answer.json()["error"]["message"]
    assert (_count(server.data_dir, "threads"), _count(server.data_dir, "idempotency")) == (0, 0)


async def test_a_key_of_255_visible_characters_is_accepted(server):
    key = "".join(chr(c) for c in range(0x21, 0x7F)) * 3  # every visible character, 282 of them: cut to 255
    async with _http(server) as http:
        answer = await http.post("/v1/threads", json={}, headers={"Idempotency-Key": key[:255]})
        assert answer.status_code == 201
    assert _rows(server.data_dir, "SELECT key FROM idempotency") == [(key[:255],)]


async def test_the_same_key_for_a_different_body_path_or_query_is_422_and_changes_nothing(server):
    async with _http(server) as http:
        first = await http.post("/v1/threads", json={"title": "a"}, headers={"Idempotency-Key": "reused"})
        assert first.status_code == 201
        others = [
            await http.post("/v1/threads", json={"title": "b"}, headers={"Idempotency-Key": "reused"}),
            await http.post("/v1/threads", content=b'{"title": "a"}', headers={"Idempotency-Key": "reused"}),
            await http.post("/v1/threads?x=1", json={"title": "a"}, headers={"Idempotency-Key": "reused"}),
            await http.post("/v1/sessions", json={"thread_id": first.json()["id"]},
                            headers={"Idempotency-Key": "reused"}),
            await http.put("/v1/sessions", json={"title": "a"}, headers={"Idempotency-Key": "reused"}),
        ]
        for answer in others:
            assert answer.status_code == 422, answer.text
            error = answer.json()["error"]
            assert (error["status"], error["code"]) == (422, "idempotency_key_reused")
            assert "'reused'" in error["message"]
    assert _count(server.data_dir, "threads") == 1 and _count(server.data_dir, "sessions") == 0
    assert _rows(server.data_dir, "SELECT key, status FROM idempotency") == [("reused", 201)]


async def test_a_request_that_failed_stores_nothing_and_its_retry_executes(server, client):
    tid = (await client.create_thread())["id"]
    hang = await client.start_turn(tid, "/hang")
    async with _http(server) as http:
        busy = await http.post(f"/v1/threads/{tid}/turns", json={"prompt": "next"}, headers={"Idempotency-Key": "t2"})
        assert (busy.status_code, busy.json()["error"]["code"]) == (409, "conflict")
        assert _count(server.data_dir, "idempotency") == 0
        await client.interrupt(tid, hang["id"])
        ran = await http.post(f"/v1/threads/{tid}/turns", json={"prompt": "next"}, headers={"Idempotency-Key": "t2"})
        assert ran.status_code == 201 and "Idempotent-Replayed" not in ran.headers
        await wait_turn_end(client, tid, ran.json()["id"])
        # A 404 (no such thread yet) stores nothing either: the same key works once the thread exists.
        missing = await http.post("/v1/threads/later/turns", json={"prompt": "hi"}, headers={"Idempotency-Key": "t3"})
        assert missing.status_code == 404
        await client.create_thread(id="later")
        found = await http.post("/v1/threads/later/turns", json={"prompt": "hi"}, headers={"Idempotency-Key": "t3"})
        assert found.status_code == 201 and found.json()["thread_id"] == "later"
        await wait_turn_end(client, "later", found.json()["id"])
    assert sorted(_rows(server.data_dir, "SELECT key, status FROM idempotency")) == [("t2", 201), ("t3", 201)]
    assert [t["status"] for t in (await client.get_thread(tid))["turns"]] == ["interrupted", "completed"]


async def test_a_caller_supplied_thread_id_is_used_and_a_taken_one_is_409_changing_nothing(server, client):
    created = await client.create_thread(id="my-thread_1", title="mine")
    assert created["id"] == "my-thread_1"
    detail = await client.get_thread("my-thread_1")
    assert (detail["thread"]["id"], detail["thread"]["title"]) == ("my-thread_1", "mine")
    events = _count(server.data_dir, "events")
    async with _http(server) as http:
        taken = await http.post("/v1/threads", json={"id": "my-thread_1", "title": "other"})
        assert taken.status_code == 409
        assert taken.json()["error"] == {"status": 409, "code": "conflict",
                                         "message": "Thread 'my-thread_1' already exists; choose another id"}
    assert _rows(server.data_dir, "SELECT id, title FROM threads") == [("my-thread_1", "mine")]
    assert _count(server.data_dir, "events") == events
    # The server still creates threads (its own ids and the caller's).
    assert (await client.create_thread(id="second"))["id"] == "second"


@pytest.mark.parametrize("bad", ["a/b", "..", "", "x" * 129, "-leading-dash", "sp ace", "dot.ted", "caf\xe9"])
async def test_a_bad_caller_supplied_thread_id_is_400_and_creates_nothing(server, bad):
    async with _http(server) as http:
        answer = await http.post("/v1/threads", json={"id": bad})
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "invalid_input"
        assert "id" in answer.json()["error"]["message"]
    assert _count(server.data_dir, "threads") == 0


async def test_concurrent_creates_of_one_caller_id_make_exactly_one_thread(server):
    async with _http(server) as http:
        answers: list[httpx.Response] = []

        async def one(i: int) -> None:
            answers.append(await http.post("/v1/threads", json={"id": "contested", "title": f"t{i}"}))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
    assert sorted(a.status_code for a in answers) == [201] + [409] * 19
    [winner] = [a.json() for a in answers if a.status_code == 201]
    assert _rows(server.data_dir, "SELECT id, title FROM threads") == [("contested", winner["title"])]
    assert _rows(server.data_dir, "SELECT COUNT(*) FROM events WHERE event = 'thread.started'") == [(1,)]


async def test_openapi_documents_the_key_the_replay_header_and_the_new_errors(server):
    async with _http(server) as http:
        spec = (await http.get("/openapi.json")).json()
    keyed = [(path, method) for path, ops in spec["paths"].items() for method, op in ops.items()
             if any(p["name"] == "Idempotency-Key" for p in op.get("parameters", []))]
    assert sorted(keyed) == sorted((path, method) for path, ops in spec["paths"].items() for method in ops
                                   if path.startswith("/v1") and method in ("post", "put"))
    op = spec["paths"]["/v1/threads"]["post"]
    assert {"409", "422"} <= set(op["responses"])
    assert "Idempotent-Replayed" in op["responses"]["201"]["headers"]
    assert "id" in spec["components"]["schemas"]["CreateThreadBody"]["properties"]


async def test_a_browser_may_send_the_key_and_read_the_replay_header(nursery, tmp_path):
    live = await start_server(nursery, tmp_path / "cors", cors_origins=("http://app.example",))
    origin = {"Origin": "http://app.example"}
    async with _http(live) as http:
        preflight = await http.options("/v1/threads", headers={
            **origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"})
        assert preflight.status_code == 204
        assert "Idempotency-Key" in preflight.headers["Access-Control-Allow-Headers"].split(", ")
        for _ in range(2):
            answer = await http.post("/v1/threads", json={}, headers={**origin, "Idempotency-Key": "from-a-page"})
        assert answer.headers["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" in answer.headers["Access-Control-Expose-Headers"].split(", ")
    live.shutdown.set()


async def test_the_client_sends_its_idempotency_key(server, client):
    first = await client.create_thread(id="by-client", title="c", idempotency_key="client-1")
    assert await client.create_thread(id="by-client", title="c", idempotency_key="client-1") == first
    turn = await client.start_turn("by-client", "hi", idempotency_key="client-2")
    assert await client.start_turn("by-client", "hi", idempotency_key="client-2") == turn
    await wait_turn_end(client, "by-client", turn["id"])
    saved = await client.save_session(thread_id="by-client", session_id="s", idempotency_key="client-3")
    assert await client.save_session(thread_id="by-client", session_id="s", idempotency_key="client-3") == saved
    assert (_count(server.data_dir, "threads"), _count(server.data_dir, "turns")) == (1, 1)
    assert saved["session"]["metadata"]["revision"] == 1
    assert sorted(_rows(server.data_dir, "SELECT key FROM idempotency")) == [("client-1",), ("client-2",),
                                                                            ("client-3",)]


async def test_fifty_concurrent_forks_and_rewinds_with_one_key_each_change_once(server, client):
    tid = (await client.create_thread())["id"]
    turns = []
    for prompt in ("one", "two", "three"):
        turn = await client.start_turn(tid, prompt)
        await wait_turn_end(client, tid, turn["id"])
        turns.append(turn["id"])
    async with _http(server) as http:
        answers = await _all_at_once(http, "POST", f"/v1/threads/{tid}/fork", {"through_turn_id": turns[0]}, "fork-1")
        fork = json.loads(_one_change(answers, 201))
        assert _rows(server.data_dir, "SELECT COUNT(*) FROM threads WHERE forked_from IS NOT NULL") == [(1,)]
        assert _rows(server.data_dir, "SELECT COUNT(*) FROM turns WHERE thread_id = ?", fork["thread"]["id"]) == [(1,)]
        answers = await _all_at_once(http, "POST", f"/v1/threads/{tid}/rewind", {"before_turn_id": turns[1]}, "rw-1")
        rewound = json.loads(_one_change(answers, 200))
        assert rewound["removed_turn_ids"] == turns[1:]
        assert _rows(server.data_dir, "SELECT COUNT(*) FROM events WHERE event = 'thread.rewound'") == [(1,)]
        assert [t["id"] for t in (await http.get(f"/v1/threads/{tid}")).json()["turns"]] == turns[:1]
