"""History control over a real server on a real socket: fork, rewind, retry, restore and delete thread.

Each happy path is checked by its exact answer, its events on the SSE stream, what GET thread shows
afterwards and what the next turn sees (the scripted model's ``input_tokens`` counts the words of the
whole context it was sent, so it tells exactly which history the engine holds). Each bad input is a
JSON 4xx that changes nothing: the thread's full detail (rewound turns included, ``latest_seq`` too) is
the same before and after, and the server still answers.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from tests import support
from tests.conftest import E2E_LIMIT
from tests.e2e.helpers import api_error, collect_until, wait_turn_end
from web.client import ApiError, AsyncClient

# The scripted model answers "You said: <prompt>": a one-word prompt gets a three-word reply, so a
# conversation of one-word prompts holds 4 words per turn, and a turn's input_tokens is
# 4 x (turns in its history) + 1.
WORDS_PER_TURN = 4


async def _turn(client: AsyncClient, thread_id: str, prompt: str) -> dict:
    turn = await client.start_turn(thread_id, prompt)
    end = await wait_turn_end(client, thread_id, turn["id"])
    assert end["payload"]["status"] == "completed"
    return turn


async def _conversation(client: AsyncClient, *prompts: str, title: str = "history") -> tuple[str, list[str]]:
    thread = await client.create_thread(title=title)
    return thread["id"], [(await _turn(client, thread["id"], p))["id"] for p in prompts]


async def _next_input_tokens(client: AsyncClient, thread_id: str) -> int:
    """Run one more one-word turn and return its input_tokens: what the engine's history holds, plus 1."""
    turn = await client.start_turn(thread_id, "next")
    end = await wait_turn_end(client, thread_id, turn["id"])
    return end["payload"]["usage"]["input_tokens"]


async def _events_after(client: AsyncClient, thread_id: str, since_seq: int) -> list[dict]:
    """The stored events with seq > since_seq, read from the SSE stream up to GET's latest_seq."""
    latest = (await client.get_thread(thread_id))["latest_seq"]
    assert latest > since_seq
    return await collect_until(client, thread_id, lambda e: e["seq"] >= latest, since_seq=since_seq)


def _texts(detail: dict) -> list[tuple[str, str]]:
    return [(i["kind"], i["detail"]) for i in detail["items"]]


# ---- happy paths --------------------------------------------------------------------------------


async def test_fork_copies_the_history_through_a_turn_and_leaves_the_source_alone(client):
    source, (t1, t2, t3) = await _conversation(client, "one", "two", "three", title="source")
    before = await client.get_thread(source)

    forked = await client.fork_thread(source, through_turn_id=t1, title="the fork", id="my-fork_1")
    assert forked["forked_from"] == {"thread_id": source, "through_turn_id": t1}
    assert forked["thread"]["id"] == "my-fork_1" and forked["thread"]["title"] == "the fork"
    assert forked["thread"]["forked_from"] == forked["forked_from"]
    assert forked["thread"]["session_id"] is None and forked["thread"]["archived"] is False
    assert len(forked["turn_ids"]) == 1 and forked["turn_ids"][0] not in (t1, t2, t3)
    assert forked["thread"]["latest_turn_id"] == forked["turn_ids"][0]

    copy = await client.get_thread("my-fork_1")
    assert [t["id"] for t in copy["turns"]] == forked["turn_ids"]
    assert [t["status"] for t in copy["turns"]] == ["completed"]
    assert _texts(copy) == [("user_message", "one"), ("agent_message", "You said: one")]
    assert not {i["id"] for i in copy["items"]} & {i["id"] for i in before["items"]}
    assert copy["turns"][0]["item_ids"] == [i["id"] for i in copy["items"]]

    # The source is unchanged but for its thread.forked event.
    after = await client.get_thread(source)
    assert {k: v for k, v in after.items() if k != "latest_seq"} == {k: v for k, v in before.items()
                                                                    if k != "latest_seq"}
    (forked_event,) = await _events_after(client, source, before["latest_seq"])
    assert forked_event["event"] == "thread.forked"
    assert forked_event["payload"] == {"thread_id": "my-fork_1", "through_turn_id": t1}
    (started,) = await collect_until(client, "my-fork_1", lambda e: True)
    assert started["event"] == "thread.started"
    assert started["payload"]["forked_from"] == {"thread_id": source, "through_turn_id": t1}
    assert started["payload"]["thread"]["id"] == "my-fork_1"

    # The fork's next turn sees one turn of history; the source's sees three.
    assert await _next_input_tokens(client, "my-fork_1") == WORDS_PER_TURN * 1 + 1
    assert await _next_input_tokens(client, source) == WORDS_PER_TURN * 3 + 1


async def test_fork_defaults_to_the_latest_finished_turn_and_an_empty_thread_forks_empty(client):
    source, (t1, t2) = await _conversation(client, "one", "two")
    latest = await client.fork_thread(source)
    assert latest["forked_from"] == {"thread_id": source, "through_turn_id": t2}
    assert len(latest["turn_ids"]) == 2
    assert latest["thread"]["title"] == "history"  # the source's title when none is given
    assert [t["id"] for t in (await client.get_thread(latest["thread"]["id"]))["turns"]] == latest["turn_ids"]

    empty = await client.create_thread(title="empty")
    forked = await client.fork_thread(empty["id"])
    assert forked["forked_from"] == {"thread_id": empty["id"], "through_turn_id": None}
    assert forked["turn_ids"] == [] and forked["thread"]["latest_turn_id"] is None
    assert (await client.get_thread(forked["thread"]["id"]))["turns"] == []


async def test_fork_of_a_thread_with_a_running_turn_copies_the_finished_turns_and_the_turn_runs_on(client):
    source, (t1,) = await _conversation(client, "one")
    hang = await client.start_turn(source, "/hang")
    forked = await client.fork_thread(source)
    assert forked["forked_from"]["through_turn_id"] == t1 and len(forked["turn_ids"]) == 1
    running = (await client.get_thread(source))["turns"][-1]
    assert (running["id"], running["status"]) == (hang["id"], "in_progress")
    ended = await client.interrupt(source, hang["id"])
    assert ended["status"] == "interrupted"


async def test_rewind_takes_turns_out_of_the_live_history_and_keeps_them_stored(client):
    thread_id, (t1, t2, t3) = await _conversation(client, "one", "two", "three")
    before = await client.get_thread(thread_id)

    result = await client.rewind(thread_id, t2)
    assert result["removed_turn_ids"] == [t2, t3]
    assert result["thread"]["id"] == thread_id and result["thread"]["latest_turn_id"] == t1
    (event,) = await _events_after(client, thread_id, before["latest_seq"])
    assert event["event"] == "thread.rewound" and event["seq"] == result["latest_seq"]
    assert event["payload"] == {"before_turn_id": t2, "removed_turn_ids": [t2, t3]}

    live = await client.get_thread(thread_id)
    assert [t["id"] for t in live["turns"]] == [t1] and live["latest_seq"] == result["latest_seq"]
    assert live["turns"][0]["rewound"] is False
    assert _texts(live) == [("user_message", "one"), ("agent_message", "You said: one")]
    assert live["thread"]["latest_turn_id"] == t1

    everything = await client.get_thread(thread_id, include_rewound=True)
    assert [(t["id"], t["rewound"]) for t in everything["turns"]] == [(t1, False), (t2, True), (t3, True)]
    assert _texts(everything) == _texts(before)
    assert [i["id"] for i in everything["items"]] == [i["id"] for i in before["items"]]

    # A save and the next turn see only the first turn; the old events stay in the log.
    saved = await client.save_session(thread_id=thread_id)
    assert [m["content"][0]["text"] for m in saved["session"]["messages"]] == ["one", "You said: one"]
    assert await _next_input_tokens(client, thread_id) == WORDS_PER_TURN * 1 + 1
    replay = await collect_until(client, thread_id, lambda e: e["event"] == "thread.rewound")
    assert {e["turn_id"] for e in replay if e["event"] == "turn.completed"} == {t1, t2, t3}


async def test_rewind_with_if_busy_interrupt_ends_the_running_turn_first(client):
    thread_id, (t1,) = await _conversation(client, "one")
    hang = await client.start_turn(thread_id, "/hang")
    await api_error(client.rewind(thread_id, t1), 409, "conflict", "turn in progress", "if_busy")
    assert (await client.get_thread(thread_id))["turns"][-1]["status"] == "in_progress"

    result = await client.rewind(thread_id, t1, if_busy="interrupt")
    assert result["removed_turn_ids"] == [t1, hang["id"]]
    everything = await client.get_thread(thread_id, include_rewound=True)
    assert [(t["status"], t["rewound"]) for t in everything["turns"]] == [("completed", True),
                                                                         ("interrupted", True)]
    assert (await client.get_thread(thread_id))["turns"] == []
    assert await _next_input_tokens(client, thread_id) == 1


async def test_retry_rewinds_the_latest_turn_and_runs_its_prompt_again(client):
    thread_id, (t1, t2) = await _conversation(client, "one", "two")
    since = (await client.get_thread(thread_id))["latest_seq"]

    turn = await client.retry(thread_id)
    assert turn["retry_of"] == t2 and turn["id"] not in (t1, t2)
    assert turn["status"] == "in_progress" and turn["input_summary"] == "two" and turn["thread_id"] == thread_id
    end = await wait_turn_end(client, thread_id, turn["id"])
    # The retried turn's history is the first turn only.
    assert end["payload"]["usage"] == {"input_tokens": WORDS_PER_TURN + 1, "output_tokens": 3}

    events = await _events_after(client, thread_id, since)
    assert [e["event"] for e in events[:2]] == ["thread.rewound", "turn.started"]
    assert events[0]["payload"] == {"before_turn_id": t2, "removed_turn_ids": [t2]}
    assert events[1]["turn_id"] == turn["id"]
    assert events[1]["payload"]["retry_of"] == t2 and events[1]["payload"]["prompt"] == "two"

    live = await client.get_thread(thread_id)
    assert [(t["id"], t["status"], t["retry_of"]) for t in live["turns"]] == [
        (t1, "completed", None), (turn["id"], "completed", t2)]
    assert _texts(live) == [("user_message", "one"), ("agent_message", "You said: one"),
                            ("user_message", "two"), ("agent_message", "You said: two")]
    assert live["thread"]["latest_turn_id"] == turn["id"]


async def test_retry_of_an_earlier_turn_with_another_model_and_mode(client):
    thread_id, (t1, t2) = await _conversation(client, "one", "two")
    since = (await client.get_thread(thread_id))["latest_seq"]
    turn = await client.retry(thread_id, t1, model="scripted-2", mode="plan")
    assert turn["retry_of"] == t1 and turn["input_summary"] == "one"
    end = await wait_turn_end(client, thread_id, turn["id"])
    assert end["payload"]["usage"] == {"input_tokens": 1, "output_tokens": 3}
    events = await _events_after(client, thread_id, since)
    assert events[0]["payload"] == {"before_turn_id": t1, "removed_turn_ids": [t1, t2]}
    started = events[1]["payload"]
    assert (started["model"], started["mode"], started["retry_of"]) == ("scripted-2", "plan", t1)
    assert [t["id"] for t in (await client.get_thread(thread_id))["turns"]] == [turn["id"]]


async def test_restore_replaces_the_live_history_and_saves_the_old_one_first(client):
    thread_id, (t1,) = await _conversation(client, "one", title="restorable")
    saved = await client.save_session(thread_id=thread_id)
    session_id = saved["session_id"]
    t2 = (await _turn(client, thread_id, "two"))["id"]
    since = (await client.get_thread(thread_id))["latest_seq"]

    result = await client.restore(thread_id, session_id, if_match=1)
    safety_id = result["safety_session_id"]
    assert (result["session_id"], result["revision"], result["message_count"]) == (session_id, 1, 2)
    assert safety_id != session_id and result["thread"]["session_id"] == session_id
    (event,) = await _events_after(client, thread_id, since)
    assert event["event"] == "thread.restored"
    assert event["payload"] == {"session_id": session_id, "revision": 1, "safety_session_id": safety_id}

    # The earlier turns are rewound; the live history is the session's two messages.
    assert (await client.get_thread(thread_id))["turns"] == []
    everything = await client.get_thread(thread_id, include_rewound=True)
    assert [(t["id"], t["rewound"]) for t in everything["turns"]] == [(t1, True), (t2, True)]
    safety = await client.get_session(safety_id)
    assert safety["metadata"]["title"] == "Before restore: restorable"
    assert safety["metadata"]["message_count"] == 4 and safety["metadata"]["revision"] == 1
    assert [m["content"][0]["text"] for m in safety["messages"]] == ["one", "You said: one", "two", "You said: two"]
    assert (await client.get_session(session_id))["metadata"]["revision"] == 1  # the restored one is not changed

    again = await client.save_session(thread_id=thread_id, session_id="after-restore")
    assert [m["content"][0]["text"] for m in again["session"]["messages"]] == ["one", "You said: one"]
    assert await _next_input_tokens(client, thread_id) == WORDS_PER_TURN * 1 + 1

    # Restoring the safety session undoes the restore (the turn run since is rewound with the rest).
    undo = await client.restore(thread_id, safety_id)
    assert undo["message_count"] == 4 and undo["thread"]["session_id"] == safety_id
    assert await _next_input_tokens(client, thread_id) == WORDS_PER_TURN * 2 + 1


async def test_delete_thread_removes_it_and_ends_its_open_event_streams(client, server):
    thread_id, (t1,) = await _conversation(client, "one")
    saved = await client.save_session(thread_id=thread_id)
    latest = (await client.get_thread(thread_id))["latest_seq"]
    seen: list[dict] = []
    attached, ended = trio.Event(), trio.Event()

    async def reader() -> None:
        # since_seq = latest - 1: the stored last event arrives first, so the stream is attached.
        async for event in client.events(thread_id, since_seq=latest - 1):
            seen.append(event)
            attached.set()
        ended.set()  # the response ended: the iterator finished without an error

    with trio.fail_after(E2E_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await attached.wait()
            assert await client.delete_thread(thread_id) is None
            await ended.wait()

    assert [e["event"] for e in seen] == ["session.saved", "thread.deleted"]
    deleted = seen[-1]
    assert deleted["payload"] == {"thread_id": thread_id} and deleted["seq"] > latest
    await api_error(client.get_thread(thread_id), 404, "not_found", thread_id)
    await api_error(client.start_turn(thread_id, "hi"), 404, "not_found")
    with pytest.raises(ApiError) as info:
        async for _ in client.events(thread_id):
            pass
    assert info.value.status == 404
    await api_error(client.delete_thread(thread_id), 404, "not_found")
    # The linked session stays; the deleted event's seq is never given to another event.
    assert (await client.get_session(saved["session_id"]))["metadata"]["message_count"] == 2
    other = await client.create_thread()
    assert (await client.get_thread(other["id"]))["latest_seq"] > deleted["seq"]
    assert (await client.health())["status"] == "ok"


async def test_delete_of_a_busy_thread_is_409_unless_asked_to_interrupt(client):
    thread_id, _ = await _conversation(client, "one")
    hang = await client.start_turn(thread_id, "/hang")
    before = await client.get_thread(thread_id, include_rewound=True)
    await api_error(client.delete_thread(thread_id), 409, "conflict", "turn in progress")
    await api_error(client.delete_thread(thread_id, if_busy="reject"), 409, "conflict")
    assert await client.get_thread(thread_id, include_rewound=True) == before
    assert await client.delete_thread(thread_id, if_busy="interrupt") is None
    await api_error(client.get_thread(thread_id), 404, "not_found")
    await api_error(client.interrupt(thread_id, hang["id"]), 404, "not_found")


# ---- bad input: a clear JSON 4xx that changes nothing ------------------------------------------


@pytest.fixture
async def http(server):
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"},
                                 timeout=E2E_LIMIT) as h:
        yield h


class Unchanged:
    """``async with Unchanged(client, *thread_ids)``: the threads' full detail (rewound turns and
    latest_seq included), the thread list and the session list are the same after the block."""

    def __init__(self, client: AsyncClient, *thread_ids: str) -> None:
        self.client = client
        self.thread_ids = thread_ids

    async def _state(self):
        return ([self._data(await self.client.get_thread(t, include_rewound=True)) for t in self.thread_ids],
                [self._thread(t) for t in await self.client.list_threads(include_archived=True)],
                await self.client.list_sessions())

    @staticmethod
    def _thread(thread: dict) -> dict:
        """The thread's data. Its ``owner`` (the lease, always null on SQLite) is not: on PostgreSQL a request
        that needs the thread's engine takes the lease, also when it is refused, and the lease renews."""
        return {k: v for k, v in thread.items() if k != "owner"} if support.on_postgresql() else thread

    def _data(self, detail: dict) -> dict:
        return {**detail, "thread": self._thread(detail["thread"])}

    async def __aenter__(self):
        self.before = await self._state()

    async def __aexit__(self, *exc):
        if exc[0] is None:
            assert await self._state() == self.before
            assert (await self.client.health())["status"] == "ok"


def assert_json_error(response: httpx.Response, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert (error["status"], error["code"]) == (status, code)
    for fragment in fragments:
        assert fragment in error["message"], error["message"]


async def test_unknown_and_foreign_anchors_are_404(client):
    thread_id, (t1, t2) = await _conversation(client, "one", "two")
    other_id, (foreign,) = await _conversation(client, "elsewhere")
    async with Unchanged(client, thread_id, other_id):
        for anchor in ("turn_nope", foreign):
            message = f"Turn '{anchor}' not found in thread '{thread_id}'"
            await api_error(client.rewind(thread_id, anchor), 404, "not_found", message)
            await api_error(client.retry(thread_id, anchor), 404, "not_found", message)
            await api_error(client.fork_thread(thread_id, through_turn_id=anchor), 404, "not_found", message)


async def test_a_running_or_rewound_anchor_is_409(client):
    thread_id, (t1, t2, t3) = await _conversation(client, "one", "two", "three")
    await client.rewind(thread_id, t3)
    async with Unchanged(client, thread_id):
        for call in (client.rewind(thread_id, t3), client.retry(thread_id, t3),
                     client.fork_thread(thread_id, through_turn_id=t3)):
            await api_error(call, 409, "conflict", f"turn '{t3}'", "rewound")

    hang = await client.start_turn(thread_id, "/hang")
    await collect_until(client, thread_id, lambda e: e["event"] == "turn.started" and e["turn_id"] == hang["id"])
    async with Unchanged(client, thread_id):
        # A fork checks the anchor itself (it leaves the running turn alone); the others find the thread busy.
        await api_error(client.fork_thread(thread_id, through_turn_id=hang["id"]), 409, "conflict",
                     f"turn '{hang['id']}'", "in_progress", "only a finished turn")
        await api_error(client.rewind(thread_id, hang["id"]), 409, "conflict", "turn in progress")
        await api_error(client.retry(thread_id, hang["id"]), 409, "conflict", "turn in progress")
        await api_error(client.retry(thread_id), 409, "conflict", "turn in progress")
    await client.interrupt(thread_id, hang["id"])


async def test_a_thread_without_turns_cannot_be_rewound_or_retried(client):
    thread_id = (await client.create_thread(title="empty"))["id"]
    other_id, (foreign,) = await _conversation(client, "elsewhere")
    async with Unchanged(client, thread_id, other_id):
        for anchor in ("turn_nope", foreign):
            await api_error(client.rewind(thread_id, anchor), 404, "not_found", f"Turn '{anchor}' not found")
        await api_error(client.retry(thread_id), 409, "conflict", f"Thread '{thread_id}' has no turn to retry")


async def test_restore_errors_change_nothing(client, server):
    thread_id, _ = await _conversation(client, "one")
    saved = await client.save_session(thread_id=thread_id)
    await support.plant_session_document(server.runtime, "broken", b'{"schema_version": 1, "metadata": ')
    async with Unchanged(client, thread_id):
        await api_error(client.restore(thread_id, "broken"), 400, "invalid_data", "Failed to parse session 'broken'")
        await api_error(client.restore(thread_id, "missing"), 404, "not_found", "missing")
        await api_error(client.restore(thread_id, "../etc"), 400, "invalid_input")
        await api_error(client.restore(thread_id, saved["session_id"], if_match=7), 412, "precondition_failed")
        await api_error(client.restore(thread_id, saved["session_id"], if_busy="later"), 400, "invalid_input",
                     "if_busy must be one of: reject, interrupt")
        await api_error(client.restore("thr_missing", saved["session_id"]), 404, "not_found", "thr_missing")
    assert await support.stored_session_ids(server.runtime) == sorted(["broken", saved["session_id"]])


@pytest.mark.parametrize("new_id,status,code", [
    ("a/b", 400, "invalid_input"),
    ("..", 400, "invalid_input"),
    ("x" * 129, 400, "invalid_input"),
])
async def test_fork_refuses_a_bad_new_id(client, new_id, status, code):
    thread_id, _ = await _conversation(client, "one")
    async with Unchanged(client, thread_id):
        await api_error(client.fork_thread(thread_id, id=new_id), status, code, "Invalid thread id")
    assert len(await client.fork_thread(thread_id, id="x" * 128)) == 3  # 128 characters is allowed


async def test_fork_to_an_existing_id_is_409(client):
    thread_id, _ = await _conversation(client, "one")
    other = await client.create_thread(title="taken")
    async with Unchanged(client, thread_id, other["id"]):
        await api_error(client.fork_thread(thread_id, id=other["id"]), 409, "conflict",
                     f"Thread '{other['id']}' already exists")
        await api_error(client.fork_thread(thread_id, id=thread_id), 409, "conflict")


ROUTES = ("fork", "rewind", "retry", "restore")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("body,fragment", [
    (b"{not json", "Malformed JSON"),
    (b"[1]", "must be a JSON object"),
    (b'{"typo": 1}', "Unknown field 'typo'"),
])
async def test_malformed_bodies_and_unknown_fields_are_400(client, http, route, body, fragment):
    thread_id, _ = await _conversation(client, "one")
    async with Unchanged(client, thread_id):
        response = await http.post(f"/v1/threads/{thread_id}/{route}", content=body)
        assert_json_error(response, 400, "invalid_input", fragment)


@pytest.mark.parametrize("route,body,fragment", [
    ("fork", {"through_turn_id": 5}, "'through_turn_id' must be a string"),
    ("fork", {"title": ["x"]}, "'title' must be a string"),
    ("fork", {"id": 12}, "'id' must be a string"),
    ("fork", {"title": "  "}, "title must not be blank"),
    ("rewind", {}, "Missing required field 'before_turn_id'"),
    ("rewind", {"before_turn_id": None}, "'before_turn_id' must be a string"),
    ("rewind", {"before_turn_id": "t", "if_busy": True}, "'if_busy' must be a string"),
    ("rewind", {"before_turn_id": "  "}, "before_turn_id must be a non-blank string"),
    ("rewind", {"before_turn_id": "t", "if_busy": "bogus"}, "if_busy must be one of: reject, interrupt"),
    ("retry", {"turn_id": 1}, "'turn_id' must be a string"),
    ("retry", {"model": False}, "'model' must be a string"),
    ("retry", {"if_busy": "later"}, "if_busy must be one of: reject, interrupt"),
    ("restore", {}, "Missing required field 'session_id'"),
    ("restore", {"session_id": 3}, "'session_id' must be a string"),
])
async def test_wrong_types_and_values_are_400(client, http, route, body, fragment):
    thread_id, _ = await _conversation(client, "one")
    async with Unchanged(client, thread_id):
        response = await http.post(f"/v1/threads/{thread_id}/{route}", json=body)
        assert_json_error(response, 400, "invalid_input", fragment)


async def test_unknown_thread_is_404_on_every_history_route(client, http):
    thread_id, (t1,) = await _conversation(client, "one")
    saved = await client.save_session(thread_id=thread_id)
    bodies = {"fork": {}, "rewind": {"before_turn_id": t1}, "retry": {}, "restore": {"session_id": saved["session_id"]}}
    async with Unchanged(client, thread_id):
        for route, body in bodies.items():
            response = await http.post(f"/v1/threads/thr_missing/{route}", json=body)
            assert_json_error(response, 404, "not_found", "Thread 'thr_missing' not found")
        assert_json_error(await http.delete("/v1/threads/thr_missing"), 404, "not_found", "thr_missing")
        assert_json_error(await http.get("/v1/threads/thr_missing", params={"include_rewound": "true"}), 404,
                          "not_found")


async def test_bad_query_values_on_delete_and_get_are_400(client, http):
    thread_id, _ = await _conversation(client, "one")
    async with Unchanged(client, thread_id):
        assert_json_error(await http.delete(f"/v1/threads/{thread_id}", params={"if_busy": "bogus"}), 400,
                          "invalid_input", "if_busy must be one of: reject, interrupt")
        assert_json_error(await http.get(f"/v1/threads/{thread_id}", params={"include_rewound": "maybe"}), 400,
                          "invalid_input", "include_rewound")


async def test_the_typed_client_sends_exactly_the_documented_bodies(client, http):
    """The client's history methods leave out what the caller did not give (the server's defaults apply)."""
    thread_id, (t1, t2) = await _conversation(client, "one", "two")
    requests: list[tuple[str, str, dict | None, str | None]] = []

    def record(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        requests.append((request.method, request.url.raw_path.decode(), body, request.headers.get("if-match")))
        return httpx.Response(200, json={})

    async with AsyncClient("http://test") as fake:
        await fake._http.aclose()
        fake._http = httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(record))
        await fake.fork_thread("a b")
        await fake.fork_thread("t", through_turn_id="turn_1", title="x", id="new")
        await fake.rewind("t", "turn_1")
        await fake.rewind("t", "turn_1", if_busy="interrupt")
        await fake.retry("t")
        await fake.retry("t", "turn_1", model="m", mode="plan", if_busy="interrupt")
        await fake.restore("t", "s1", if_match=3, if_busy="interrupt")
        await fake.delete_thread("t", if_busy="interrupt")
        await fake.get_thread("t", include_rewound=True)
        await fake.get_thread("t")
    assert requests == [
        ("POST", "/v1/threads/a%20b/fork", {}, None),
        ("POST", "/v1/threads/t/fork", {"through_turn_id": "turn_1", "title": "x", "id": "new"}, None),
        ("POST", "/v1/threads/t/rewind", {"before_turn_id": "turn_1"}, None),
        ("POST", "/v1/threads/t/rewind", {"before_turn_id": "turn_1", "if_busy": "interrupt"}, None),
        ("POST", "/v1/threads/t/retry", {}, None),
        ("POST", "/v1/threads/t/retry", {"turn_id": "turn_1", "model": "m", "mode": "plan", "if_busy": "interrupt"},
         None),
        ("POST", "/v1/threads/t/restore", {"session_id": "s1", "if_busy": "interrupt"}, '"3"'),
        ("DELETE", "/v1/threads/t?if_busy=interrupt", None, None),
        ("GET", "/v1/threads/t?include_rewound=true", None, None),
        ("GET", "/v1/threads/t", None, None),
    ]
    # And the sync client shares the methods: one real call through it.
    with trio.fail_after(E2E_LIMIT):
        detail = await trio.to_thread.run_sync(_sync_get_rewound, client.url, client.token, thread_id)
    assert [t["id"] for t in detail["turns"]] == [t1, t2]


def _sync_get_rewound(url: str, token: str, thread_id: str) -> dict:
    from web.client import Client

    with Client(url, token) as sync:
        return sync.get_thread(thread_id, include_rewound=True)
