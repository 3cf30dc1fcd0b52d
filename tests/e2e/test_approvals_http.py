"""Approvals over HTTP on a real server on a real socket, with the demo tools (API.md "Tools and approvals").

The scripted model's ``/tool NAME {json}`` line makes it call a tool offline and then answer ``Tool NAME
returned: <result>``, so every path is checked by what the model got back, by the ApprovalRecord the
routes answer and list, by the exact ``approval.*`` payloads on the SSE stream and by the note file on
disk. Each bad request is a JSON 4xx that changes nothing: the thread's detail (``latest_seq`` too) and
its approvals are the same before and after, and the pending approval can still be allowed.
"""

from __future__ import annotations

import json
import signal
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.conftest import E2E_LIMIT, LiveServer
from tests.e2e.helpers import api_error, collect_until, start_tool_server, turn_of, wait_turn_end
from tests.e2e.process import ServerProcess
from web.client import ApiError, AsyncClient

NOTE = {"name": "hello", "text": "hi there"}
WRITE_NOTE = f"/tool write_note {json.dumps(NOTE)}"
WROTE = "Wrote note 'hello' (8 characters) to notes/{tid}/hello.txt"


@pytest.fixture
async def server(nursery, tmp_path):
    live = await start_tool_server(nursery, tmp_path / "data")
    yield live
    live.shutdown.set()


def note_path(server: LiveServer, tid: str, name: str = "hello") -> Path:
    return server.data_dir / "notes" / tid / f"{name}.txt"


async def start(client: AsyncClient, prompt: str = WRITE_NOTE, **thread_fields) -> tuple[str, str, int]:
    """A new thread and a turn on it: (thread id, turn id, latest_seq before the turn)."""
    tid = (await client.create_thread(**thread_fields))["id"]
    since = (await client.get_thread(tid))["latest_seq"]
    turn = await client.start_turn(tid, prompt)
    return tid, turn["id"], since


async def requested(client: AsyncClient, tid: str, since: int) -> dict:
    """The approval.requested event of the turn started after ``since``, read from the SSE stream."""
    return (await collect_until(client, tid, lambda e: e["event"] == "approval.requested", since_seq=since))[-1]


async def turn_events(client: AsyncClient, tid: str, turn_id: str, since: int) -> list[dict]:
    """Every event of the turn up to its turn.completed, as the SSE stream gives them."""
    events = await collect_until(client, tid, lambda e: e["event"] == "turn.completed" and e["turn_id"] == turn_id,
                                 since_seq=since)
    return [e for e in events if e["turn_id"] == turn_id]


def tool_item(detail: dict, turn_id: str) -> dict:
    (item,) = [i for i in detail["items"] if i["turn_id"] == turn_id and i["kind"] == "tool_call"]
    return item


def answer(detail: dict, turn_id: str) -> str:
    return "".join(i["detail"] for i in detail["items"] if i["turn_id"] == turn_id and i["kind"] == "agent_message")


def seconds_between(earlier: str, later: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


# ---- allow, deny, remember -----------------------------------------------------------------------


async def test_allow_runs_write_note_once_and_the_turn_completes_with_its_result(server, client):
    tid, turn_id, since = await start(client)
    event = await requested(client, tid, since)
    (pending,) = await client.list_approvals(tid, status="pending")
    assert event["turn_id"] == turn_id and event["item_id"] == pending["item_id"]
    assert event["payload"] == {"approval_id": pending["id"], "turn_id": turn_id, "item_id": pending["item_id"],
                                "tool": "write_note", "input": NOTE, "expires_at": pending["expires_at"]}
    assert pending == {"id": pending["id"], "thread_id": tid, "turn_id": turn_id, "item_id": pending["item_id"],
                       "tool": "write_note", "input": NOTE, "status": "pending", "created_at": pending["created_at"],
                       "expires_at": pending["expires_at"], "resolved_at": None, "decided_by": None, "message": None}
    assert seconds_between(pending["created_at"], pending["expires_at"]) == 300.0  # the default --approval-timeout
    waiting = await client.get_thread(tid)
    assert turn_of(waiting, turn_id)["status"] == "awaiting_approval"
    assert tool_item(waiting, turn_id)["status"] == "awaiting_approval"
    assert not note_path(server, tid).exists()  # nothing runs before the decision

    decided = await client.decide_approval(tid, pending["id"], "allow")
    assert decided == {**pending, "status": "allowed", "decided_by": "client", "resolved_at": decided["resolved_at"]}
    assert decided["resolved_at"] >= pending["created_at"]
    events = await turn_events(client, tid, turn_id, since)
    resolved = [e for e in events if e["event"] == "approval.resolved"]
    assert [e["payload"] for e in resolved] == [{"approval_id": pending["id"], "decision": "allow",
                                                 "decided_by": "client"}]
    assert resolved[0]["item_id"] == pending["item_id"]
    tool_events = [e["event"] for e in events if e.get("item_id") == pending["item_id"]]
    assert tool_events == ["item.started", "approval.requested", "approval.resolved", "item.completed"]
    assert events[-1]["payload"]["status"] == "completed"

    detail = await client.get_thread(tid)
    assert turn_of(detail, turn_id)["status"] == "completed"
    item = tool_item(detail, turn_id)
    result = WROTE.format(tid=tid)
    assert item["status"] == "completed" and item["detail"] == result
    assert item["metadata"]["result"] == result and item["metadata"]["is_error"] is False
    assert answer(detail, turn_id) == f"Tool write_note returned: {result}"
    assert note_path(server, tid).read_text() == "hi there"
    assert await client.list_approvals(tid) == [decided]
    assert await client.list_approvals(tid, status="allowed") == [decided]
    assert await client.list_approvals(tid, status="pending") == []


async def test_deny_with_a_message_gives_the_model_an_error_result_and_writes_nothing(server, client):
    tid, turn_id, since = await start(client)
    event = await requested(client, tid, since)
    approval_id = event["payload"]["approval_id"]

    decided = await client.decide_approval(tid, approval_id, "deny", message="not today")
    assert (decided["status"], decided["decided_by"], decided["message"]) == ("denied", "client", "not today")
    events = await turn_events(client, tid, turn_id, since)
    assert [e["payload"] for e in events if e["event"] == "approval.resolved"] == [
        {"approval_id": approval_id, "decision": "deny", "decided_by": "client"}]
    assert events[-1]["payload"]["status"] == "completed"  # a denial does not end the turn

    detail = await client.get_thread(tid)
    item = tool_item(detail, turn_id)
    assert item["detail"] == "denied by user: not today"
    assert item["metadata"]["is_error"] is True
    assert answer(detail, turn_id) == "Tool write_note returned: denied by user: not today"
    assert not note_path(server, tid).exists() and not (server.data_dir / "notes" / tid).exists()
    assert await client.list_approvals(tid, status="denied") == [decided]


async def test_deny_without_a_message_says_denied_by_user(client):
    tid, turn_id, since = await start(client)
    approval_id = (await requested(client, tid, since))["payload"]["approval_id"]
    assert (await client.decide_approval(tid, approval_id, "deny"))["message"] is None
    await wait_turn_end(client, tid, turn_id)
    assert answer(await client.get_thread(tid), turn_id) == "Tool write_note returned: denied by user"


async def test_remember_allows_the_tool_for_the_rest_of_the_thread(server, client):
    tid, first, since = await start(client)
    approval_id = (await requested(client, tid, since))["payload"]["approval_id"]
    await client.decide_approval(tid, approval_id, "allow", remember=True)
    await wait_turn_end(client, tid, first)
    assert (await client.get_thread(tid))["thread"]["allowed_tools"] == ["write_note"]

    since = (await client.get_thread(tid))["latest_seq"]
    second = (await client.start_turn(tid, '/tool write_note {"name": "again", "text": "no question"}'))["id"]
    events = await turn_events(client, tid, second, since)
    assert "approval.requested" not in [e["event"] for e in events]
    (policy,) = [e["payload"] for e in events if e["event"] == "approval.resolved"]
    assert policy["decision"] == "allow" and policy["decided_by"] == "policy"
    assert note_path(server, tid, "again").read_text() == "no question"
    records = await client.list_approvals(tid)
    assert [(a["turn_id"], a["status"], a["decided_by"]) for a in records] == [
        (first, "allowed", "client"), (second, "allowed", "policy")]
    assert records[1]["id"] == policy["approval_id"] and records[1]["resolved_at"] == records[1]["created_at"]

    # Another tool that needs approval still asks, and another thread is not affected.
    since = (await client.get_thread(tid))["latest_seq"]
    third = (await client.start_turn(tid, '/tool wait {"seconds": 0}'))["id"]
    waiting = await requested(client, tid, since)
    assert waiting["payload"]["tool"] == "wait" and waiting["turn_id"] == third
    await client.decide_approval(tid, waiting["payload"]["approval_id"], "allow")
    await wait_turn_end(client, tid, third)
    other, _, other_since = await start(client)
    assert (await requested(client, other, other_since))["payload"]["tool"] == "write_note"
    assert (await client.get_thread(other))["thread"]["allowed_tools"] == []


# ---- policies ------------------------------------------------------------------------------------


async def test_policy_auto_runs_without_asking_and_records_a_policy_approval(server, client):
    tid, turn_id, since = await start(client, approval_policy="auto")
    assert (await client.get_thread(tid))["thread"]["approval_policy"] == "auto"
    events = await turn_events(client, tid, turn_id, since)
    assert "approval.requested" not in [e["event"] for e in events]
    (record,) = await client.list_approvals(tid)
    assert [e["payload"] for e in events if e["event"] == "approval.resolved"] == [
        {"approval_id": record["id"], "decision": "allow", "decided_by": "policy"}]
    assert (record["status"], record["decided_by"], record["tool"], record["input"]) == (
        "allowed", "policy", "write_note", NOTE)
    assert record["created_at"] == record["resolved_at"] == record["expires_at"]
    assert note_path(server, tid).read_text() == "hi there"
    assert answer(await client.get_thread(tid), turn_id) == f"Tool write_note returned: {WROTE.format(tid=tid)}"


@pytest.mark.parametrize("how", ["POST", "PATCH"])
async def test_policy_deny_denies_every_call_that_needs_approval(server, client, how):
    if how == "POST":
        tid = (await client.create_thread(approval_policy="deny"))["id"]
    else:
        tid = (await client.create_thread())["id"]
        assert (await client.update_thread(tid, approval_policy="deny"))["approval_policy"] == "deny"
    assert (await client.get_thread(tid))["thread"]["approval_policy"] == "deny"
    since = (await client.get_thread(tid))["latest_seq"]
    turn_id = (await client.start_turn(tid, WRITE_NOTE))["id"]
    events = await turn_events(client, tid, turn_id, since)
    assert "approval.requested" not in [e["event"] for e in events]
    (record,) = await client.list_approvals(tid)
    assert [e["payload"] for e in events if e["event"] == "approval.resolved"] == [
        {"approval_id": record["id"], "decision": "deny", "decided_by": "policy"}]
    assert (record["status"], record["decided_by"]) == ("denied", "policy")
    detail = await client.get_thread(tid)
    assert turn_of(detail, turn_id)["status"] == "completed"
    assert tool_item(detail, turn_id)["metadata"]["is_error"] is True
    assert answer(detail, turn_id) == "Tool write_note returned: denied by policy"
    assert not note_path(server, tid).exists()

    # A tool that needs no approval still runs, and leaves no approval record.
    turn_id = (await client.start_turn(tid, "/tool get_time"))["id"]
    await wait_turn_end(client, tid, turn_id)
    assert answer(await client.get_thread(tid), turn_id).startswith("Tool get_time returned: ")
    assert len(await client.list_approvals(tid)) == 1


async def test_policy_deny_set_later_wins_over_a_remembered_tool(server, client):
    """The thread's policy comes first (API.md): ``deny`` denies every call that needs approval, also one
    of a tool allowed earlier with ``remember``; back on ``ask`` the remembered tool runs again unasked."""
    tid, first, since = await start(client)
    approval_id = (await requested(client, tid, since))["payload"]["approval_id"]
    await client.decide_approval(tid, approval_id, "allow", remember=True)
    await wait_turn_end(client, tid, first)
    note_path(server, tid).unlink()
    await client.update_thread(tid, approval_policy="deny")
    assert (await client.get_thread(tid))["thread"]["allowed_tools"] == ["write_note"]

    denied = (await client.start_turn(tid, WRITE_NOTE))["id"]
    await wait_turn_end(client, tid, denied)
    assert answer(await client.get_thread(tid), denied) == "Tool write_note returned: denied by policy"
    assert not note_path(server, tid).exists()

    await client.update_thread(tid, approval_policy="ask")
    allowed = (await client.start_turn(tid, WRITE_NOTE))["id"]
    await wait_turn_end(client, tid, allowed)
    assert note_path(server, tid).read_text() == "hi there"
    assert [(a["status"], a["decided_by"]) for a in await client.list_approvals(tid)] == [
        ("allowed", "client"), ("denied", "policy"), ("allowed", "policy")]


async def test_a_bad_policy_is_400_and_changes_nothing(client):
    with pytest.raises(ApiError) as info:
        await client.create_thread(approval_policy="sometimes")
    assert (info.value.status, info.value.code) == (400, "invalid_input")
    assert "approval_policy" in info.value.message
    tid = (await client.create_thread())["id"]
    before = await client.get_thread(tid)
    for bad in ("never", 1, True):
        await api_error(client.update_thread(tid, approval_policy=bad), 400, "invalid_input", "approval_policy")
    assert await client.get_thread(tid) == before


# ---- expiry and interrupt ------------------------------------------------------------------------


async def test_an_unanswered_approval_expires_as_a_denial_on_a_serve_process(tmp_path):
    """``serve --tools demo --approval-timeout 0.5``: the real flags, in a real process."""
    proc = await ServerProcess(tmp_path / "data", "--tools", "demo", "--approval-timeout", "0.5").start()
    try:
        async with AsyncClient(proc.url, proc.token) as client:
            tid, turn_id, since = await start(client)
            approval_id = (await requested(client, tid, since))["payload"]["approval_id"]
            events = await turn_events(client, tid, turn_id, since)
            assert [e["payload"] for e in events if e["event"] == "approval.resolved"] == [
                {"approval_id": approval_id, "decision": "deny", "decided_by": "timeout"}]
            (record,) = await client.list_approvals(tid, status="expired")
            assert (record["id"], record["decided_by"], record["message"]) == (approval_id, "timeout", None)
            assert seconds_between(record["created_at"], record["expires_at"]) == 0.5
            assert record["resolved_at"] >= record["expires_at"]
            detail = await client.get_thread(tid)
            assert turn_of(detail, turn_id)["status"] == "completed"
            assert tool_item(detail, turn_id)["metadata"]["is_error"] is True
            assert answer(detail, turn_id) == "Tool write_note returned: denied: the approval expired"
            assert not (tmp_path / "data" / "notes" / tid).exists()
            await api_error(client.decide_approval(tid, approval_id, "allow"), 409, "conflict", "expired")
    finally:
        proc.kill()
        await proc.wait()


async def test_a_graceful_shutdown_parks_a_waiting_turn_and_a_restart_carries_it_on(tmp_path):
    """SIGTERM while an approval is pending: the turn is not interrupted, it stays awaiting_approval; the
    restarted server has the same approval (id, deadline) and deciding it finishes the turn."""
    data = tmp_path / "data"
    proc = await ServerProcess(data, "--tools", "demo").start()
    try:
        async with AsyncClient(proc.url, proc.token) as client:
            tid, turn_id, since = await start(client)
            approval_id = (await requested(client, tid, since))["payload"]["approval_id"]
            (before,) = await client.list_approvals(tid)
        proc.process.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
    finally:
        proc.kill()
    again = await ServerProcess(data, "--tools", "demo").start()
    try:
        async with AsyncClient(again.url, again.token) as client:
            detail = await client.get_thread(tid)
            assert turn_of(detail, turn_id)["status"] == "awaiting_approval"
            assert tool_item(detail, turn_id)["status"] == "awaiting_approval"
            assert await client.list_approvals(tid, status="pending") == [before]
            seen = detail["latest_seq"]
            await client.decide_approval(tid, approval_id, "allow")
            events = await turn_events(client, tid, turn_id, seen)
            assert [e["event"] for e in events][0] == "approval.resolved"
            assert events[-1]["payload"]["status"] == "completed"
            assert answer(await client.get_thread(tid), turn_id) == f"Tool write_note returned: {WROTE.format(tid=tid)}"
            assert (data / "notes" / tid / "hello.txt").read_text() == "hi there"
    finally:
        again.kill()
        await again.wait()


async def test_interrupt_while_pending_cancels_the_approval_and_the_turn_ends_interrupted(server, client):
    tid, turn_id, since = await start(client)
    approval_id = (await requested(client, tid, since))["payload"]["approval_id"]
    assert (await client.interrupt(tid, turn_id))["status"] == "interrupted"
    events = await turn_events(client, tid, turn_id, since)
    (resolved,) = [e for e in events if e["event"] == "approval.resolved"]
    assert resolved["payload"] == {"approval_id": approval_id, "decision": "cancel", "decided_by": "interrupt"}
    assert events[-1]["payload"]["status"] == "interrupted"
    (record,) = await client.list_approvals(tid)
    # Like every approval.resolved, it names the tool call's item (a client finds the card to close by it).
    assert resolved.get("item_id") == record["item_id"]
    assert (record["status"], record["decided_by"]) == ("canceled", "interrupt")
    assert record["resolved_at"] is not None
    assert await client.list_approvals(tid, status="canceled") == [record]
    detail = await client.get_thread(tid)
    assert turn_of(detail, turn_id)["status"] == "interrupted"
    assert tool_item(detail, turn_id)["status"] == "interrupted"
    await api_error(client.decide_approval(tid, approval_id, "allow"), 409, "conflict", "canceled")
    assert not note_path(server, tid).exists()
    # The thread goes on: the next turn asks again.
    since = (await client.get_thread(tid))["latest_seq"]
    again = (await client.start_turn(tid, WRITE_NOTE))["id"]
    assert (await requested(client, tid, since))["turn_id"] == again


# ---- errors change nothing -----------------------------------------------------------------------


async def state(client: AsyncClient, tid: str) -> tuple[dict, list[dict], list[dict]]:
    return await client.get_thread(tid), await client.list_approvals(tid), await client.list_approvals()


async def test_deciding_twice_is_409_and_changes_nothing(client):
    tid, turn_id, since = await start(client)
    approval_id = (await requested(client, tid, since))["payload"]["approval_id"]
    await client.decide_approval(tid, approval_id, "allow")
    await wait_turn_end(client, tid, turn_id)
    before = await state(client, tid)
    for decision in ("allow", "deny"):
        await api_error(client.decide_approval(tid, approval_id, decision), 409, "conflict", approval_id, "allowed")
    assert await state(client, tid) == before


async def test_unknown_approval_another_threads_approval_and_unknown_thread_are_404(client):
    tid, turn_id, since = await start(client)
    approval_id = (await requested(client, tid, since))["payload"]["approval_id"]
    other = (await client.create_thread())["id"]
    before, other_before = await state(client, tid), await client.get_thread(other)

    await api_error(client.decide_approval(tid, "appr_nope", "allow"), 404, "not_found", "appr_nope", tid)
    await api_error(client.decide_approval(other, approval_id, "allow"), 404, "not_found", approval_id, other)
    await api_error(client.decide_approval("thr_nope", approval_id, "allow"), 404, "not_found", "thr_nope")
    await api_error(client.list_approvals("thr_nope"), 404, "not_found", "thr_nope")
    assert await state(client, tid) == before and await client.get_thread(other) == other_before

    await client.decide_approval(tid, approval_id, "allow")  # still pending, still decidable
    assert (await wait_turn_end(client, tid, turn_id))["payload"]["status"] == "completed"


BAD_BODIES = [
    (b'{"decision": "maybe"}', 'decision'),
    (b'{"decision": "ALLOW"}', 'decision'),
    (b'{}', 'decision'),
    (b'{"decision": 1}', 'decision'),
    (b'{"decision": "allow", "remember": "yes"}', 'remember'),
    (b'{"decision": "deny", "message": 5}', 'message'),
    (b'{"decision": "allow", "always": true}', 'always'),
    (b'["allow"]', 'object'),
    (b'{"decision": "allow"', 'Malformed JSON'),
]


async def test_bad_bodies_are_400_and_change_nothing(server, client):
    tid, turn_id, since = await start(client)
    approval_id = (await requested(client, tid, since))["payload"]["approval_id"]
    before = await state(client, tid)
    url = f"{server.url}/v1/threads/{tid}/approvals/{approval_id}"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {server.token}"}, timeout=E2E_LIMIT) as http:
        for body, fragment in BAD_BODIES:
            response = await http.post(url, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert (error["status"], error["code"]) == (400, "invalid_input"), body
            assert fragment in error["message"], (body, error["message"])
        for status in ("waiting", "PENDING"):
            response = await http.get(f"{server.url}/v1/approvals", params={"status": status})
            assert response.status_code == 400 and "status" in response.json()["error"]["message"]
            response = await http.get(f"{server.url}/v1/threads/{tid}/approvals", params={"status": status})
            assert response.status_code == 400
    # Steering a turn that waits for a decision is refused too (nothing would read the steer).
    await api_error(client.steer(tid, turn_id, "hurry up"), 409, "conflict", "waiting for an approval")
    await api_error(client.start_turn(tid, "another"), 409, "conflict", turn_id)
    assert await state(client, tid) == before

    await client.decide_approval(tid, approval_id, "allow")
    assert (await wait_turn_end(client, tid, turn_id))["payload"]["status"] == "completed"
    assert note_path(server, tid).read_text() == "hi there"


async def test_a_decision_retried_with_its_idempotency_key_gets_the_first_answer(client):
    tid, turn_id, since = await start(client)
    approval_id = (await requested(client, tid, since))["payload"]["approval_id"]
    first = await client.decide_approval(tid, approval_id, "deny", message="no", idempotency_key="decide-1")
    again = await client.decide_approval(tid, approval_id, "deny", message="no", idempotency_key="decide-1")
    assert again == first and first["status"] == "denied"
    await wait_turn_end(client, tid, turn_id)
    # The same key with another body is refused, not replayed.
    await api_error(client.decide_approval(tid, approval_id, "allow", idempotency_key="decide-1"), 422,
                   "idempotency_key_reused")


# ---- listing -------------------------------------------------------------------------------------


async def test_lists_filter_by_status_and_thread_oldest_first(client):
    a, a_turn, a_since = await start(client)
    a_id = (await requested(client, a, a_since))["payload"]["approval_id"]
    await client.decide_approval(a, a_id, "deny")
    await wait_turn_end(client, a, a_turn)
    b, _, b_since = await start(client)
    b_id = (await requested(client, b, b_since))["payload"]["approval_id"]

    everything = await client.list_approvals()
    assert [x["id"] for x in everything] == [a_id, b_id]
    assert [x["id"] for x in await client.list_approvals(status="pending")] == [b_id]
    assert [x["id"] for x in await client.list_approvals(status="denied")] == [a_id]
    assert await client.list_approvals(status="allowed") == []
    assert [x["id"] for x in await client.list_approvals(a)] == [a_id]
    assert await client.list_approvals(a, status="pending") == []
    assert [x["id"] for x in await client.list_approvals(b, status="pending")] == [b_id]
    assert [x["id"] for x in await client.list_approvals(limit=1)] == [a_id]
    assert await client.list_approvals(status="expired") == await client.list_approvals(status="canceled") == []


async def test_openapi_lists_the_approval_routes_with_their_answers(server):
    async with httpx.AsyncClient(timeout=E2E_LIMIT) as http:
        doc = (await http.get(f"{server.url}/openapi.json")).json()
    paths = doc["paths"]
    assert set(paths["/v1/approvals"]) == {"get"}
    assert set(paths["/v1/threads/{thread_id}/approvals"]) == {"get"}
    assert set(paths["/v1/threads/{thread_id}/approvals/{approval_id}"]) == {"post"}
    decide = paths["/v1/threads/{thread_id}/approvals/{approval_id}"]["post"]
    assert {"200", "400", "404", "409"} <= set(decide["responses"])
    body = doc["components"]["schemas"]["DecideApprovalBody"]
    assert body["required"] == ["decision"] and body["additionalProperties"] is False
    assert body["properties"]["decision"]["enum"] == ["allow", "deny"]
    status = next(p for p in paths["/v1/approvals"]["get"]["parameters"] if p["name"] == "status")
    assert status["schema"]["enum"] == ["pending", "allowed", "denied", "expired", "canceled"]
