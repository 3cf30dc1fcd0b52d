"""Approvals and at-most-once tools across kill -9 (API.md v1.1, "Tools and approvals"; issue 13 "Proof"):
real ``trio-runtime serve --tools demo`` processes, SIGKILLed and restarted on the same data dir.

- an approval pending at the kill is still pending after the restart (same id, same ``expires_at``), the
  turn still ``awaiting_approval``; allowing it runs the tool once and the turn completes, and an SSE client
  that reconnects with ``Last-Event-ID`` sees the rest with no gap and no duplicate;
- the approval's deadline counts from its creation, not from the restart;
- a tool that was running at the kill is never run again: its item ends ``failed`` with "outcome unknown",
  the model gets that as the tool result, and the turn completes.

Runs are counted across processes with the test seam ``TRIO_RUNTIME_TEST_TOOL_RUN_LOG``
(runtime.models.tools.RUN_LOG_ENV): the demo registry appends ``NAME THREAD_ID PID`` to that file as each run starts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from runtime.clock import parse_utc, utc_now
from runtime.models.tools import RUN_LOG_ENV
from runtime.store import OUTCOME_UNKNOWN
from tests.conftest import E2E_LIMIT
from tests.e2e.helpers import collect_until, comparable, stream_from
from tests.e2e.process import ServerProcess
from tests.reliability.support import serving
from tests.support import store_connection
from web.client import AsyncClient, _q

POLL = 0.02  # seconds between looks at the run log (a poll on a condition, under a deadline)


@contextlib.asynccontextmanager
async def running(data_dir: Path, *extra: str) -> AsyncIterator[tuple[ServerProcess, AsyncClient]]:
    async with serving(data_dir, "--tools", "demo", *extra) as server:
        async with AsyncClient(server.url, server.token, timeout=E2E_LIMIT) as client:
            yield server, client


async def kill_9(server: ServerProcess) -> None:
    assert server.process is not None
    server.process.kill()
    with trio.fail_after(E2E_LIMIT):
        assert await server.process.wait() == -9


def runs(log: Path) -> list[tuple[str, int]]:
    """(tool, pid) of every tool run, in order, of every process that used ``log``."""
    if not log.exists():
        return []
    return [(name, int(pid)) for name, _, pid in (line.split() for line in log.read_text().splitlines())]


async def wait_for_run(log: Path, tool: str) -> int:
    """The pid of the process that started running ``tool`` (its start is committed before the line)."""
    with trio.fail_after(E2E_LIMIT):
        while not (found := [pid for name, pid in runs(log) if name == tool]):
            await trio.sleep(POLL)
    return found[0]


async def approvals(client: AsyncClient, thread_id: str, status: str | None = None) -> list[dict[str, Any]]:
    params = {"status": status} if status else None
    return (await client._call("GET", f"/v1/threads/{_q(thread_id)}/approvals", params=params))["approvals"]


async def decide(client: AsyncClient, thread_id: str, approval_id: str, **body: Any) -> dict[str, Any]:
    return await client._call("POST", f"/v1/threads/{_q(thread_id)}/approvals/{_q(approval_id)}", json_body=body)


async def replay(client: AsyncClient, thread_id: str, turn_id: str) -> list[dict[str, Any]]:
    return await collect_until(client, thread_id, lambda e: e["event"] == "turn.completed" and e["turn_id"] == turn_id)


async def detail(client: AsyncClient, thread_id: str) -> dict[str, Any]:
    return await client.get_thread(thread_id)


def tool_item(thread: dict[str, Any]) -> dict[str, Any]:
    (item,) = [i for i in thread["items"] if i["kind"] == "tool_call"]
    return item


@pytest.fixture
def run_log(tmp_path, monkeypatch) -> Path:
    log = tmp_path / "tool-runs.log"
    monkeypatch.setenv(RUN_LOG_ENV, str(log))  # ServerProcess passes its environment on
    return log


async def test_an_approval_pending_at_kill_9_is_decided_after_the_restart_and_the_stream_resumes(tmp_path, run_log):
    data_dir = tmp_path / "data"
    prompt = '/tool write_note {"name": "kept", "text": "written after a kill -9"}'
    async with running(data_dir) as (server, client):
        thread_id = (await client.create_thread())["id"]
        turn = await client.start_turn(thread_id, prompt)
        before = await collect_until(client, thread_id, lambda e: e["event"] == "approval.requested")
        (pending,) = await approvals(client, thread_id, "pending")
        assert before[-1]["payload"] == {
            "approval_id": pending["id"], "turn_id": turn["id"], "item_id": pending["item_id"], "tool": "write_note",
            "input": {"name": "kept", "text": "written after a kill -9"}, "expires_at": pending["expires_at"]}
        last_seen = before[-1]["seq"]
        await kill_9(server)
    assert runs(run_log) == []

    async with running(data_dir) as (server, client):
        thread = await detail(client, thread_id)
        assert [(t["id"], t["status"]) for t in thread["turns"]] == [(turn["id"], "awaiting_approval")]
        assert tool_item(thread)["status"] == "awaiting_approval"
        assert await approvals(client, thread_id) == [pending]  # same id, same expires_at, still pending
        assert thread["latest_seq"] == last_seen  # recovery had nothing to write for a waiting turn
        async with trio.open_nursery() as nursery:
            resumed: list[dict[str, Any]] = []

            async def listen() -> None:
                resumed.extend(await stream_from(server.url, server.token, thread_id, last_seen, turn["id"]))

            nursery.start_soon(listen)
            decided = await decide(client, thread_id, pending["id"], decision="allow")
        assert (decided["id"], decided["status"], decided["decided_by"]) == (pending["id"], "allowed", "client")
        assert decided["expires_at"] == pending["expires_at"] and decided["resolved_at"] >= pending["created_at"]
        # No gap, no duplicate: what the client saw before the kill plus the resumed stream is the replay.
        everything = await replay(client, thread_id, turn["id"])
        assert comparable(before + resumed) == comparable(everything)
        assert [e["seq"] for e in everything] == sorted({e["seq"] for e in everything})
        assert resumed[0]["seq"] > last_seen
        assert [e["event"] for e in resumed if e["event"].startswith(("approval.", "turn."))] == [
            "approval.resolved", "turn.completed"]
        assert resumed[-1]["payload"]["status"] == "completed"
        thread = await detail(client, thread_id)
        item = tool_item(thread)
        assert item["status"] == "completed" and item["metadata"]["is_error"] is False
        assert item["metadata"]["result"] == f"Wrote note 'kept' (23 characters) to notes/{thread_id}/kept.txt"
        assert thread["items"][-1]["detail"] == f"Tool write_note returned: {item['metadata']['result']}"
        assert (data_dir / "notes" / thread_id / "kept.txt").read_text() == "written after a kill -9"
        assert [name for name, _ in runs(run_log)] == ["write_note"]
        assert await approvals(client, thread_id, "pending") == []
        assert (await client.health())["status"] == "ok"


# The approval timeout of the deadline test: far longer than the test runs, so an approval whose deadline
# counted from the restart could not expire within E2E_LIMIT.
APPROVAL_TIMEOUT = 600.0
# How much of that timeout is left when the stopped server's approval has its downtime simulated: the test
# waits this long (real seconds) for the expiry, at most.
LEFT_AT_RESTART = 1.0


def stamp(moment: dt.datetime) -> str:
    """``moment`` in the stored format (runtime.clock.utc_now: milliseconds, ``Z``)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


async def test_an_approval_deadline_counts_from_its_creation_across_a_kill_9(tmp_path, run_log):
    """The server dies with an approval pending; while it is down, all but LEFT_AT_RESTART seconds of the
    approval's APPROVAL_TIMEOUT pass: its stored creation and deadline move back by the same amount (the
    wall clock is the seam: a stopped server's downtime is only those stored times, so this is what a long
    downtime leaves). The restarted server expires it at the stored deadline, about a second later; had it
    counted from the restart, nothing would expire within E2E_LIMIT. No real wait on a timeout, no bound
    that a slow restart can break (a restart slower than LEFT_AT_RESTART expires it at once, also right)."""
    data_dir = tmp_path / "data"
    timeout = ("--approval-timeout", str(APPROVAL_TIMEOUT))
    async with running(data_dir, *timeout) as (server, client):
        thread_id = (await client.create_thread())["id"]
        turn = await client.start_turn(thread_id, '/tool wait {"seconds": 1}')
        before = await collect_until(client, thread_id, lambda e: e["event"] == "approval.requested")
        (pending,) = await approvals(client, thread_id, "pending")
        created, expires = parse_utc(pending["created_at"]), parse_utc(pending["expires_at"])
        assert (expires - created).total_seconds() == pytest.approx(APPROVAL_TIMEOUT, abs=0.01)
        await kill_9(server)

    # The downtime: the deadline is now LEFT_AT_RESTART ahead, the creation a whole timeout before it.
    deadline = parse_utc(utc_now()) + dt.timedelta(seconds=LEFT_AT_RESTART)
    moved = (stamp(deadline - (expires - created)), stamp(deadline))
    with store_connection(data_dir) as conn:
        conn.execute("UPDATE approvals SET created_at = ?, expires_at = ? WHERE id = ? AND status = 'pending'",
                     (*moved, pending["id"]))
    restarted_at = parse_utc(utc_now())
    async with running(data_dir, *timeout) as (server, client):
        rest = await stream_from(server.url, server.token, thread_id, before[-1]["seq"], turn["id"])
        (record,) = await approvals(client, thread_id)
        assert (record["id"], record["status"], record["decided_by"]) == (pending["id"], "expired", "timeout")
        assert (record["created_at"], record["expires_at"]) == moved
        resolved = parse_utc(record["resolved_at"])
        # Expired at the stored deadline (creation + T), not T after the restart.
        assert deadline <= resolved < restarted_at + dt.timedelta(seconds=APPROVAL_TIMEOUT), (
            record, restarted_at.isoformat())
        assert [(e["event"], e["payload"]) for e in rest if e["event"] == "approval.resolved"] == [
            ("approval.resolved", {"approval_id": pending["id"], "decision": "deny", "decided_by": "timeout"})]
        assert rest[-1]["payload"]["status"] == "completed"
        thread = await detail(client, thread_id)
        item = tool_item(thread)
        assert (item["status"], item["metadata"]["result"], item["metadata"]["is_error"]) == (
            "completed", "denied: the approval expired", True)
        assert "started_at" not in item["metadata"]
        assert thread["items"][-1]["detail"] == "Tool wait returned: denied: the approval expired"
    assert runs(run_log) == []  # an expired approval never runs its tool


async def test_a_tool_running_at_kill_9_is_never_run_again_and_the_model_gets_outcome_unknown(tmp_path, run_log):
    data_dir = tmp_path / "data"
    async with running(data_dir) as (server, client):
        thread_id = (await client.create_thread(approval_policy="auto"))["id"]
        turn = await client.start_turn(thread_id, '/tool wait {"seconds": 30}')
        first_pid = await wait_for_run(run_log, "wait")
        assert first_pid == server.process.pid
        running_item = tool_item(await detail(client, thread_id))
        assert running_item["status"] == "in_progress" and running_item["metadata"]["started_at"]
        seen = (await detail(client, thread_id))["latest_seq"]
        await kill_9(server)

    async with running(data_dir) as (server, client):
        ended = await stream_from(server.url, server.token, thread_id, seen, turn["id"])
        assert ended[-1]["payload"]["status"] == "completed"
        assert all(e["seq"] > seen for e in ended)
        failed = [e for e in ended if e["event"] == "item.failed"]
        assert [(e["item_id"], e["payload"]["text"]) for e in failed] == [(running_item["id"], OUTCOME_UNKNOWN)]
        thread = await detail(client, thread_id)
        assert [(t["id"], t["status"]) for t in thread["turns"]] == [(turn["id"], "completed")]
        item = tool_item(thread)
        assert (item["id"], item["status"], item["detail"]) == (running_item["id"], "failed", OUTCOME_UNKNOWN)
        assert (item["metadata"]["result"], item["metadata"]["is_error"]) == (OUTCOME_UNKNOWN, True)
        assert item["metadata"]["started_at"] == running_item["metadata"]["started_at"]  # no second start
        # The model got it as the tool result (the scripted model echoes the result it was given).
        assert thread["items"][-1]["detail"] == f"Tool wait returned: {OUTCOME_UNKNOWN}"
        saved = await client.save_session(thread_id=thread_id)
        results = [b for m in saved["session"]["messages"] for b in m["content"] if b["type"] == "tool_result"]
        assert [(b["content"], b["is_error"]) for b in results] == [(OUTCOME_UNKNOWN, True)]
        assert (await client.health())["status"] == "ok"
    assert runs(run_log) == [("wait", first_pid)]  # run once, by the first process only
