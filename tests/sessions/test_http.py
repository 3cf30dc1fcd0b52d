"""The sessions routes against a real server on a real socket (fixtures ``server``/``client``)."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from tests.conftest import E2E_LIMIT, start_server
from tests.e2e.helpers import collect_until, wait_turn_end
from web.client import ApiError

from .conftest import dir_snapshot, stored_bytes, temp_files

AUTH = {"Authorization": "Bearer test-token"}
HELLO = [
    {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "You said: hello there"}]},
]


@pytest.fixture
async def http(server):
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=E2E_LIMIT) as h:
        yield h


def sessions_path(server):
    return server.data_dir / "sessions"


def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["status"] == status and error["code"] == code, error
    for fragment in fragments:
        assert fragment in error["message"], error


async def thread_with_turn(client, prompt="hello there", **fields):
    thread = await client.create_thread(**fields)
    turn = await client.start_turn(thread["id"], prompt)
    end = await wait_turn_end(client, thread["id"], turn["id"])
    assert end["payload"]["status"] == "completed"
    return thread["id"]


# ---- PUT -------------------------------------------------------------------------------------


async def test_put_during_a_hanging_turn_answers_at_once_with_turn_in_progress(server, client):
    tid = await thread_with_turn(client)
    hang = await client.start_turn(tid, "/hang")
    t0 = trio.current_time()
    with trio.fail_after(E2E_LIMIT):
        result = await client.save_session(thread_id=tid)
    elapsed = trio.current_time() - t0
    assert elapsed < 2.0  # the request timeout is 10 s: it did not wait for the turn
    assert result["turn_in_progress"] is True and result["thread_id"] == tid
    assert result["session"]["messages"] == HELLO
    assert result["session"]["metadata"]["revision"] == 1
    events = await collect_until(client, tid, lambda e: e["event"] == "session.saved")
    assert events[-1]["payload"]["turn_in_progress"] is True
    assert events[-1]["payload"]["session_id"] == result["session_id"]
    assert (await client.interrupt(tid, hang["id"]))["status"] == "interrupted"
    thread = await client.get_thread(tid)
    assert thread["thread"]["session_id"] == result["session_id"]


async def test_put_with_empty_body_saves_the_most_recent_thread(server, http, client):
    await thread_with_turn(client, "older thread")
    tid = await thread_with_turn(client)
    response = await http.put("/v1/sessions", content=b"")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["thread_id"] == tid and body["session"]["messages"] == HELLO
    assert response.headers["etag"] == '"1"'


async def test_put_with_no_threads_is_400_and_unknown_thread_404(http, server):
    assert_error(await http.put("/v1/sessions", json={}), 400, "invalid_input", "No threads to save")
    assert_error(await http.put("/v1/sessions", json={"thread_id": "thr_nope"}), 404, "not_found", "thr_nope")
    assert_error(await http.put("/v1/sessions", json={"wait_for_idle": "yes"}), 400, "invalid_input",
                 "'wait_for_idle' must be a boolean")
    assert dir_snapshot(sessions_path(server)) == {}


async def test_etags_and_if_match(server, http, client):
    tid = await thread_with_turn(client)
    created = await http.put("/v1/sessions", json={"thread_id": tid, "session_id": "etag-test"})
    assert created.status_code == 200 and created.headers["etag"] == '"1"'
    got = await http.get("/v1/sessions/etag-test")
    assert got.status_code == 200 and got.headers["etag"] == '"1"'
    assert got.json()["metadata"]["revision"] == 1 and got.json()["messages"] == HELLO

    updated = await http.put("/v1/sessions", json={"thread_id": tid, "session_id": "etag-test"},
                             headers={"If-Match": '"1"'})
    assert updated.status_code == 200 and updated.headers["etag"] == '"2"'
    assert (await http.get("/v1/sessions/etag-test")).headers["etag"] == '"2"'

    before = dir_snapshot(sessions_path(server))
    stale = await http.put("/v1/sessions", json={"thread_id": tid, "session_id": "etag-test"},
                           headers={"If-Match": '"1"'})
    assert_error(stale, 412, "precondition_failed", "revision 2, not 1")
    assert_error(await http.patch("/v1/sessions/etag-test", json={"title": "x"}, headers={"If-Match": '"7"'}),
                 412, "precondition_failed")
    assert_error(await http.put("/v1/sessions", json={"thread_id": tid, "session_id": "fresh"},
                                headers={"If-Match": '"1"'}), 412, "precondition_failed")
    assert_error(await http.patch("/v1/sessions/etag-test", json={"title": "x"}, headers={"If-Match": "abc"}),
                 400, "invalid_input", "If-Match")
    assert dir_snapshot(sessions_path(server)) == before

    weak = await http.patch("/v1/sessions/etag-test", json={"title": "renamed"}, headers={"If-Match": 'W/"2"'})
    assert weak.status_code == 200 and weak.headers["etag"] == '"3"'
    assert weak.json() == {"session": {**weak.json()["session"], "title": "renamed", "revision": 3},
                           "changes": {"title": "renamed"}}
    with pytest.raises(ApiError) as info:
        await client.save_session(thread_id=tid, session_id="etag-test", if_match=2)
    assert info.value.status == 412
    assert (await client.save_session(thread_id=tid, session_id="etag-test", if_match=3)
            )["session"]["metadata"]["revision"] == 4


async def test_wait_for_idle_past_the_request_timeout_is_504_and_saves_nothing(nursery, tmp_path):
    live = await start_server(nursery, tmp_path / "short", request_timeout=0.5)
    try:
        async with live.client() as client:
            tid = await thread_with_turn(client)
            await client.save_session(thread_id=tid, session_id="kept")
            hang = await client.start_turn(tid, "/hang")
            before = dir_snapshot(live.data_dir / "sessions")
            for session_id in ("kept", None):
                with pytest.raises(ApiError) as info:
                    with trio.fail_after(E2E_LIMIT):
                        await client.save_session(thread_id=tid, session_id=session_id, wait_for_idle=True)
                assert info.value.status == 504 and info.value.code == "timeout"
            assert dir_snapshot(live.data_dir / "sessions") == before
            assert (await client.get_thread(tid))["thread"]["session_id"] == "kept"
            assert [s["id"] for s in await client.list_sessions()] == ["kept"]
            assert (await client.interrupt(tid, hang["id"]))["status"] == "interrupted"
    finally:
        live.shutdown.set()


# ---- ids, not found, error map ---------------------------------------------------------------

BAD_PATH_IDS = ["..%2F..%2Fetc", "..%2Fsessions", "a%2Fb", "%2E%2E", "-lead", "_lead", "a%00b", "x" * 129,
                "a.json", "..%5C..%5Cetc", "%C3%BC"]


async def test_invalid_session_id_in_the_path_is_400_for_every_method(server, http, client):
    tid = await thread_with_turn(client)
    await client.save_session(thread_id=tid, session_id="present")
    before = dir_snapshot(sessions_path(server))
    threads = len(await client.list_threads(include_archived=True))
    wrong = []
    for raw_id in BAD_PATH_IDS:
        for method, suffix, body in (("GET", "", None), ("PATCH", "", {"title": "x"}), ("DELETE", "", None),
                                     ("POST", "/resume-thread", {}), ("GET", "/export", None)):
            response = await http.request(method, f"/v1/sessions/{raw_id}{suffix}", json=body)
            error = response.json().get("error", {})
            if (response.status_code, error.get("code")) != (400, "invalid_input") or (
                    "Invalid session id" not in error.get("message", "")):
                wrong.append((method, raw_id + suffix, response.status_code, error.get("message")))
    assert wrong == []
    assert dir_snapshot(sessions_path(server)) == before
    assert len(await client.list_threads(include_archived=True)) == threads


async def test_the_client_never_lets_a_session_id_escape_its_path_segment(server, client):
    """``AsyncClient.get_session('../threads')`` must not turn into ``GET /v1/threads``."""
    await client.create_thread(title="not a session")
    with pytest.raises(ApiError) as info:
        await client.get_session("../threads")
    assert info.value.status in (400, 404)
    with pytest.raises(ApiError) as info:
        await client.delete_session("../sessions/x/..")
    assert info.value.status in (400, 404)


async def test_invalid_session_id_in_the_put_body_is_400(server, http, client):
    tid = await thread_with_turn(client)
    for session_id in ["../x", "a/b", "..", "", "a\x00b", "x" * 129, "-lead", 5, ["x"]]:
        response = await http.put("/v1/sessions", json={"thread_id": tid, "session_id": session_id})
        assert_error(response, 400, "invalid_input")
    assert dir_snapshot(sessions_path(server)) == {}
    assert (await client.get_thread(tid))["thread"]["session_id"] is None


async def test_unknown_session_is_404_for_every_method(server, http):
    for method, suffix, body in (("GET", "", None), ("PATCH", "", {"title": "x"}), ("DELETE", "", None),
                                 ("POST", "/resume-thread", {}), ("GET", "/export", None)):
        response = await http.request(method, f"/v1/sessions/nope{suffix}", json=body)
        assert_error(response, 404, "not_found", "Session 'nope' not found")
    assert dir_snapshot(sessions_path(server)) == {}


@pytest.mark.files_only
async def test_unparseable_file_is_400_and_directory_in_the_way_is_500(server, http, client):
    tid = await thread_with_turn(client)
    (sessions_path(server) / "bad.json").write_bytes(b'{"schema_version": 1, "meta')
    (sessions_path(server) / "dir.json").mkdir()
    before = dir_snapshot(sessions_path(server))
    for response in (await http.get("/v1/sessions/bad"),
                     await http.put("/v1/sessions", json={"thread_id": tid, "session_id": "bad"}),
                     await http.patch("/v1/sessions/bad", json={"archived": True}),
                     await http.post("/v1/sessions/bad/resume-thread", json={})):
        assert_error(response, 400, "invalid_data", "Failed to parse session 'bad'")
    for response in (await http.get("/v1/sessions/dir"),
                     await http.put("/v1/sessions", json={"thread_id": tid, "session_id": "dir"})):
        assert_error(response, 500, "storage_error", "Failed to load session 'dir'", "a directory is in the way")
    assert_error(await http.delete("/v1/sessions/dir"), 500, "storage_error", "Failed to delete session 'dir'")
    assert dir_snapshot(sessions_path(server)) == before
    assert (await client.get_thread(tid))["thread"]["session_id"] is None


# ---- POST, PATCH, DELETE, list, resume -------------------------------------------------------


async def test_post_rebuilds_201_and_its_errors(server, http, client):
    tid = await thread_with_turn(client, title="Rebuilt thread")
    response = await http.post("/v1/sessions", json={"thread_id": tid})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body == {"session_id": body["session_id"], "thread_id": tid, "message_count": 2,
                    "title": "Rebuilt thread"}
    assert (await client.get_session(body["session_id"]))["messages"] == HELLO
    assert (await client.rebuild_session(tid, title="  Given  "))["title"] == "Given"

    assert_error(await http.post("/v1/sessions", json={"thread_id": "  "}), 400, "invalid_input", "blank")
    assert_error(await http.post("/v1/sessions", json={}), 400, "invalid_input", "Missing required field")
    assert_error(await http.post("/v1/sessions", json={"thread_id": "thr_nope"}), 404, "not_found")
    empty = await client.create_thread()
    assert_error(await http.post("/v1/sessions", json={"thread_id": empty["id"]}), 400, "invalid_input",
                 "no messages")
    hang = await client.start_turn(tid, "/hang")
    assert_error(await http.post("/v1/sessions", json={"thread_id": tid}), 409, "conflict")
    await client.interrupt(tid, hang["id"])


async def test_patch_delete_and_list_over_http(server, http, client):
    tid = await thread_with_turn(client, "Ünïcode message body")
    sid = (await client.save_session(thread_id=tid))["session_id"]
    other = (await client.rebuild_session(tid, title="Zebra"))["session_id"]

    patched = await client.patch_session(sid, title="Alpha title", archived=True)
    assert patched["changes"] == {"title": "Alpha title", "archived": True}
    assert patched["session"]["revision"] == 2
    assert_error(await http.patch(f"/v1/sessions/{sid}", json={}), 400, "invalid_input", "at least one")
    assert_error(await http.patch(f"/v1/sessions/{sid}", json={"title": 3}), 400, "invalid_input")

    assert [s["id"] for s in await client.list_sessions()] == [other]
    assert [s["id"] for s in await client.list_sessions(archived_only=True)] == [sid]
    assert [s["id"] for s in await client.list_sessions(include_archived=True, sort="name")] == [sid, other]
    assert {s["id"] for s in await client.list_sessions(include_archived=True, search="ÜNÏCODE")} == {sid, other}
    assert len(await client.list_sessions(include_archived=True, limit=1)) == 1
    assert_error(await http.get("/v1/sessions", params={"sort": "bogus"}), 400, "invalid_input")

    response = await http.delete(f"/v1/sessions/{sid}")
    assert response.status_code == 204 and response.content == b""
    assert stored_bytes(server.data_dir, sid) is None
    assert [s["id"] for s in await client.list_sessions(include_archived=True)] == [other]
    assert_error(await http.get(f"/v1/sessions/{sid}"), 404, "not_found")


async def test_resume_thread_201_and_the_new_thread_sees_the_whole_history(server, http, client):
    tid = await thread_with_turn(client)
    sid = (await client.save_session(thread_id=tid))["session_id"]
    response = await http.post(f"/v1/sessions/{sid}/resume-thread", json={"mode": "plan"})
    assert response.status_code == 201, response.text
    resumed = response.json()
    assert resumed["session_id"] == sid and resumed["message_count"] == 2
    new = resumed["thread_id"]
    record = (await client.get_thread(new))["thread"]
    assert record["session_id"] == sid and record["mode"] == "plan"
    turn = await client.start_turn(new, "next one")
    end = await wait_turn_end(client, new, turn["id"])
    # history: "hello there" (2) + "You said: hello there" (4); prompt: 2
    assert end["payload"]["usage"] == {"input_tokens": 8, "output_tokens": 4}
    saved = await client.save_session(thread_id=new, session_id=sid)
    assert saved["session"]["messages"][:2] == HELLO and len(saved["session"]["messages"]) == 4
    assert_error(await http.post(f"/v1/sessions/{sid}/resume-thread", json={"bogus": 1}), 400, "invalid_input")
    assert temp_files(sessions_path(server)) == []
    assert json.loads(stored_bytes(server.data_dir, sid))["metadata"]["revision"] == 2
