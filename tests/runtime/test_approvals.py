"""Tools and approvals through the Runtime (API.md v1.1, "Tools and approvals").

The engine runs every tool call a backend makes (``ModelRequest.run_tool``): the thread's policy, a stored
approval with a wall-clock deadline, the tool's start committed before it runs. A small backend here makes
the tool calls (a prompt line ``/tool NAME {json}``), and a small registry counts runs, so each test can
say exactly how many times a tool ran. Deadlines run on the MockClock's virtual time.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import sqlite3
import threading
from typing import Any

import pytest
import trio
import trio.testing

from runtime import Conflict, InvalidInput, NotFound
from runtime.models.base import ModelRequest, TextDelta, ToolCall, ToolOutcome, ToolResult, ToolSpec, Usage
from runtime.store import OUTCOME_UNKNOWN
from tests.support import clock_ticking

from .helpers import collect_events, crash_image, run_turn, stored_events, wait_turn_end


@dataclasses.dataclass(frozen=True)
class FakeTool:
    name: str
    needs_approval: bool


class CountingTools:
    """get_time (no approval), write_note and wait (approval); ``runs`` counts each tool's runs."""

    def __init__(self) -> None:
        self.runs: collections.Counter[str] = collections.Counter()
        self.started = trio.Event()
        self._tools = {t.name: t for t in (FakeTool("get_time", False), FakeTool("write_note", True),
                                           FakeTool("wait", True))}

    def __len__(self) -> int:
        return len(self._tools)

    def get(self, name: str) -> FakeTool | None:
        return self._tools.get(name)

    def spec(self) -> tuple[ToolSpec, ...]:
        return tuple(ToolSpec(t.name, t.name, {"type": "object"}) for t in self._tools.values())

    async def call(self, name: str, arguments: dict[str, Any], context: Any) -> ToolOutcome:
        self.runs[name] += 1
        self.started.set()
        if name == "wait":
            await trio.sleep(arguments.get("seconds", 0))
        return ToolOutcome(f"{name} ran with {json.dumps(arguments, sort_keys=True)}")


class ToolModel:
    """``/tool NAME {json}``: call the tool, then answer ``Tool NAME returned: <result>``; a continuation
    (``prompt=None``) answers from the last tool result in the history."""

    name = "tool-model"

    async def stream(self, request: ModelRequest):
        if request.prompt is None:
            result = next(b for b in reversed(request.history[-1]["content"]) if b["type"] == "tool_result")
            use = next(b for m in request.history for b in m["content"]
                       if b["type"] == "tool_use" and b["id"] == result["tool_use_id"])
            yield TextDelta(f"Tool {use['name']} returned: {result['content']}")
            yield Usage(1, 1)
            return
        line = request.prompt.splitlines()[0]
        if not line.startswith("/tool "):
            yield TextDelta(f"You said: {request.prompt}")
            return
        _, name, *rest = line.split(" ", 2)
        call = ToolCall("call_1", name, json.loads(rest[0]) if rest else {})
        yield call
        assert request.run_tool is not None and {t.name for t in request.tools} == {"get_time", "write_note", "wait"}
        outcome = await request.run_tool(call)
        yield ToolResult(call.id, outcome.content, outcome.is_error)
        yield TextDelta(f"Tool {name} returned: {outcome.content}")
        yield Usage(2, 3)


@pytest.fixture
def tools():
    return CountingTools()


@pytest.fixture
def opener(open_runtime, tools):
    return functools.partial(open_runtime, tools=tools, model_factory=ToolModel, approval_timeout=300.0)


async def approvals(rt, thread_id, status=None):
    return await rt.list_approvals(thread_id=thread_id, status=status)


async def wait_for(rt, thread_id, name, since_seq=0):
    return (await collect_events(rt, thread_id, lambda e: e.event == name, since_seq=since_seq))[-1]


async def ask(rt, thread_id, prompt):
    """Start a turn whose tool call needs approval; returns (the turn, its pending approval)."""
    turn = await rt.start_turn(thread_id, prompt)
    await wait_for(rt, thread_id, "approval.requested")
    (pending,) = await approvals(rt, thread_id, "pending")
    return turn, pending


async def turn_row(rt, thread_id, turn_id, include_rewound=False):
    detail = await rt.get_thread(thread_id, include_rewound=include_rewound)
    return next(t for t in detail["turns"] if t["id"] == turn_id), detail


async def test_ask_waits_for_an_allow_then_runs_the_tool_once_and_the_turn_completes(opener, tools):
    async with opener() as rt:
        tid = (await rt.create_thread())["id"]
        turn = await rt.start_turn(tid, '/tool write_note {"name": "n1", "text": "hi"}')
        requested = await wait_for(rt, tid, "approval.requested")
        (pending,) = await approvals(rt, tid, "pending")
        assert requested.payload == {"approval_id": pending["id"], "turn_id": turn["id"], "item_id": pending["item_id"],
                                     "tool": "write_note", "input": {"name": "n1", "text": "hi"},
                                     "expires_at": pending["expires_at"]}
        row, detail = await turn_row(rt, tid, turn["id"])
        assert row["status"] == "awaiting_approval"
        assert next(i for i in detail["items"] if i["id"] == pending["item_id"])["status"] == "awaiting_approval"
        assert tools.runs["write_note"] == 0

        decided = await rt.decide_approval(tid, pending["id"], "allow")

        assert (decided["status"], decided["decided_by"], decided["resolved_at"] is not None) == ("allowed", "client", True)
        await wait_turn_end(rt, tid, turn["id"])
        row, detail = await turn_row(rt, tid, turn["id"])
        assert row["status"] == "completed" and tools.runs["write_note"] == 1
        tool_item = next(i for i in detail["items"] if i["kind"] == "tool_call")
        assert tool_item["metadata"]["result"] == 'write_note ran with {"name": "n1", "text": "hi"}'
        assert tool_item["metadata"]["started_at"]
        answer = next(i for i in detail["items"] if i["kind"] == "agent_message")
        assert answer["detail"] == 'Tool write_note returned: write_note ran with {"name": "n1", "text": "hi"}'
        resolved = [e for e in await stored_events(rt, tid) if e.event == "approval.resolved"]
        assert [e.payload for e in resolved] == [{"approval_id": pending["id"], "decision": "allow", "decided_by": "client"}]
        with pytest.raises(Conflict, match="already allowed"):
            await rt.decide_approval(tid, pending["id"], "deny")
        snapshot = await rt.get_session_snapshot(tid)
        assert [b["type"] for m in snapshot.messages for b in m["content"]] == [
            "text", "tool_use", "tool_result", "text"]


async def test_deny_with_a_message_is_the_tool_result_and_the_turn_goes_on(opener, tools):
    async with opener() as rt:
        tid = (await rt.create_thread())["id"]
        turn, pending = await ask(rt, tid, '/tool wait {"seconds": 1}')
        denied = await rt.decide_approval(tid, pending["id"], "deny", message="not now")
        assert (denied["status"], denied["message"]) == ("denied", "not now")
        await wait_turn_end(rt, tid, turn["id"])
        _, detail = await turn_row(rt, tid, turn["id"])
        tool_item = next(i for i in detail["items"] if i["kind"] == "tool_call")
        assert (tool_item["metadata"]["result"], tool_item["metadata"]["is_error"]) == ("denied by user: not now", True)
        assert tools.runs["wait"] == 0
        snapshot = await rt.get_session_snapshot(tid)
        result = next(b for m in snapshot.messages for b in m["content"] if b["type"] == "tool_result")
        assert result == {"type": "tool_result", "tool_use_id": "call_1", "content": "denied by user: not now",
                          "is_error": True}


async def test_remember_allows_that_tool_for_the_rest_of_the_thread(opener, tools):
    async with opener() as rt:
        tid = (await rt.create_thread())["id"]
        turn, pending = await ask(rt, tid, '/tool write_note {"name": "a", "text": "1"}')
        await rt.decide_approval(tid, pending["id"], "allow", remember=True)
        await wait_turn_end(rt, tid, turn["id"])
        assert (await rt.thread_record(tid))["allowed_tools"] == ["write_note"]
        second = await run_turn(rt, tid, '/tool write_note {"name": "b", "text": "2"}')
        assert second["status"] == "completed" and tools.runs["write_note"] == 2
        records_ = await approvals(rt, tid)
        assert [(a["status"], a["decided_by"]) for a in records_] == [("allowed", "client"), ("allowed", "policy")]
        # Another tool still asks.
        third = await rt.start_turn(tid, '/tool wait {"seconds": 0}')
        await wait_for(rt, tid, "approval.requested", since_seq=(await stored_events(rt, tid))[-1].seq - 1)
        assert [a["tool"] for a in await approvals(rt, tid, "pending")] == ["wait"]
        await rt.interrupt_turn(tid, third["id"])


@pytest.mark.parametrize("policy, runs, result", [
    ("auto", 1, 'write_note ran with {"name": "x", "text": "y"}'),
    ("deny", 0, "denied by policy"),
])
async def test_auto_and_deny_policies_decide_without_asking(opener, tools, policy, runs, result):
    async with opener() as rt:
        tid = (await rt.create_thread(approval_policy=policy))["id"]
        turn = await run_turn(rt, tid, '/tool write_note {"name": "x", "text": "y"}')
        assert turn["status"] == "completed" and tools.runs["write_note"] == runs
        _, detail = await turn_row(rt, tid, turn["id"])
        assert next(i for i in detail["items"] if i["kind"] == "tool_call")["metadata"]["result"] == result
        (record,) = await approvals(rt, tid)
        assert (record["status"], record["decided_by"]) == ("allowed" if runs else "denied", "policy")
        assert not [e for e in await stored_events(rt, tid) if e.event == "approval.requested"]


async def test_a_tool_without_approval_runs_at_once(opener, tools):
    async with opener() as rt:
        tid = (await rt.create_thread())["id"]
        turn = await run_turn(rt, tid, "/tool get_time")
        assert turn["status"] == "completed" and tools.runs["get_time"] == 1
        assert await approvals(rt, tid) == []


async def test_an_unanswered_approval_expires_as_a_denial(open_runtime, tools, autojump_clock):
    async with open_runtime(tools=tools, model_factory=ToolModel, approval_timeout=30.0) as rt:
        tid = (await rt.create_thread())["id"]
        turn = await rt.start_turn(tid, '/tool wait {"seconds": 1}')
        start = trio.current_time()
        await wait_turn_end(rt, tid, turn["id"])
        assert trio.current_time() - start == pytest.approx(30.0, abs=1.0)
        (record,) = await approvals(rt, tid)
        assert (record["status"], record["decided_by"]) == ("expired", "timeout")
        _, detail = await turn_row(rt, tid, turn["id"])
        assert next(i for i in detail["items"] if i["kind"] == "tool_call")["metadata"]["result"] == \
            "denied: the approval expired"
        assert tools.runs["wait"] == 0


async def test_an_approvals_expiry_is_its_creation_stamp_plus_the_timeout_however_the_clock_moves(opener, tools,
                                                                                                  monkeypatch):
    """The wall clock moves 7 ms at every reading: an expiry read from the clock again would come out 7 ms
    late (an e2e test once saw 0.501 s for a 0.5 s timeout)."""
    import datetime as real

    from runtime import clock

    clock_ticking(monkeypatch, milliseconds=7)
    async with opener() as rt:
        tid = (await rt.create_thread())["id"]
        await rt.start_turn(tid, '/tool write_note {"name": "n1", "text": "hi"}')
        requested = await wait_for(rt, tid, "approval.requested")
        (pending,) = await approvals(rt, tid, "pending")
        assert requested.payload["expires_at"] == pending["expires_at"]
        assert clock.parse_utc(pending["expires_at"]) - clock.parse_utc(pending["created_at"]) == \
            real.timedelta(seconds=300)  # the default approval timeout, to the millisecond
        await rt.decide_approval(tid, pending["id"], "deny")


async def test_interrupting_a_turn_that_waits_cancels_its_approval(opener, tools):
    async with opener() as rt:
        tid = (await rt.create_thread())["id"]
        turn = await rt.start_turn(tid, '/tool write_note {"name": "n", "text": "t"}')
        await wait_for(rt, tid, "approval.requested")
        with pytest.raises(Conflict, match="waiting for an approval"):
            await rt.steer_turn(tid, turn["id"], "more")
        ended = await rt.interrupt_turn(tid, turn["id"])
        assert ended["status"] == "interrupted"
        (record,) = await approvals(rt, tid)
        assert (record["status"], record["decided_by"]) == ("canceled", "interrupt")
        with pytest.raises(Conflict, match="already canceled"):
            await rt.decide_approval(tid, record["id"], "allow")
        assert tools.runs["write_note"] == 0


async def test_bad_decisions_unknown_and_foreign_approvals(opener):
    async with opener() as rt:
        tid = (await rt.create_thread())["id"]
        other = (await rt.create_thread())["id"]
        turn, pending = await ask(rt, tid, '/tool write_note {"name": "n", "text": "t"}')
        with pytest.raises(InvalidInput, match='decision must be "allow" or "deny"'):
            await rt.decide_approval(tid, pending["id"], "maybe")
        with pytest.raises(NotFound, match="Approval 'appr_nope' not found"):
            await rt.decide_approval(tid, "appr_nope", "allow")
        with pytest.raises(NotFound, match=f"not found in thread '{other}'"):
            await rt.decide_approval(other, pending["id"], "allow")
        with pytest.raises(NotFound, match="Thread 'thr_nope' not found"):
            await rt.decide_approval("thr_nope", pending["id"], "allow")
        with pytest.raises(InvalidInput, match="status must be one of"):
            await rt.list_approvals(status="odd")
        with pytest.raises(InvalidInput, match="approval_policy must be one of"):
            await rt.create_thread(approval_policy="sometimes")
        assert [a["status"] for a in await approvals(rt, tid)] == ["pending"]
        assert [a["id"] for a in await rt.list_approvals(status="pending")] == [pending["id"]]
        await rt.interrupt_turn(tid, turn["id"])


async def test_a_pending_approval_survives_a_restart_and_the_turn_completes_once_decided(opener, tools, tmp_path):
    async with opener() as rt:
        tid = (await rt.create_thread())["id"]
        turn = await rt.start_turn(tid, '/tool write_note {"name": "n", "text": "t"}')
        await wait_for(rt, tid, "approval.requested")
        (before,) = await approvals(rt, tid)
    # The runtime closed (a shutdown): the turn was parked, not interrupted.
    async with opener() as rt:
        row, _ = await turn_row(rt, tid, turn["id"])
        assert row["status"] == "awaiting_approval"
        (after,) = await approvals(rt, tid)
        assert after == before  # same id, same expires_at, still pending
        await rt.decide_approval(tid, after["id"], "allow")
        await wait_turn_end(rt, tid, turn["id"])
        row, detail = await turn_row(rt, tid, turn["id"])
        assert row["status"] == "completed" and tools.runs["write_note"] == 1
        assert detail["items"][-1]["detail"].startswith("Tool write_note returned: write_note ran")


async def test_a_turn_waiting_after_a_boundary_state_is_carried_on_after_a_restart(opener, tools, monkeypatch):
    """records.engine_state looks for a turn that has not ended only after the boundary state (it covers only
    finished turns): a parked turn after one is still found and carried on, not folded into the history."""
    from runtime.store import records

    monkeypatch.setattr(records, "BOUNDARY_EVERY_ITEMS", 2)
    async with opener() as rt:
        tid = (await rt.create_thread())["id"]
        for n in range(3):
            await run_turn(rt, tid, f"plain {n}")
        turn = await rt.start_turn(tid, '/tool write_note {"name": "n", "text": "t"}')
        await wait_for(rt, tid, "approval.requested")
        through = await rt.store.read(lambda conn: conn.execute(
            "SELECT through_turn_ord FROM thread_states WHERE thread_id = ?", (tid,)).fetchone())
        assert through is not None and through[0] == 3  # the three plain turns; the waiting one (ord 4) after it
    async with opener() as rt:
        state = await rt.store.read(functools.partial(records.engine_state, thread_id=tid, use_boundary=True))
        assert state["boundary_turn_ord"] == 3 and state["active_turn"]["turn"]["id"] == turn["id"]
        assert state["items"] == [] and len(state["boundary_messages"]) == 6
        (pending,) = await approvals(rt, tid, "pending")
        await rt.decide_approval(tid, pending["id"], "allow")
        await wait_turn_end(rt, tid, turn["id"])
        row, detail = await turn_row(rt, tid, turn["id"])
        assert row["status"] == "completed" and tools.runs["write_note"] == 1
        snapshot = await rt.get_session_snapshot(tid)
        # The three plain turns, then the tool turn: prompt, tool use, tool result, answer.
        assert [m["role"] for m in snapshot.messages] == ["user", "assistant"] * 5
        assert snapshot.messages[6]["content"][0]["text"].startswith("/tool write_note")
        assert snapshot.messages[-1]["content"][-1]["text"].startswith("Tool write_note returned: write_note ran")


@pytest.mark.sqlite_only(reason="a crash is an SQLite backup taken mid-turn; on PostgreSQL a thread is recovered at a lease takeover")
async def test_a_tool_running_when_the_process_died_is_never_run_again(opener, tools, tmp_path):
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    async with opener(data_dir=live) as rt:
        tid = (await rt.create_thread(approval_policy="auto"))["id"]
        turn = await rt.start_turn(tid, '/tool wait {"seconds": 50}')
        await tools.started.wait()
        crash_image(live, crashed)  # the database as a kill -9 leaves it: the start recorded, no result
        await rt.interrupt_turn(tid, turn["id"])
    assert tools.runs["wait"] == 1
    async with opener(data_dir=crashed) as rt:
        await wait_turn_end(rt, tid, turn["id"])
        row, detail = await turn_row(rt, tid, turn["id"])
        assert row["status"] == "completed"
        tool_item = next(i for i in detail["items"] if i["kind"] == "tool_call")
        assert (tool_item["status"], tool_item["metadata"]["result"]) == ("failed", OUTCOME_UNKNOWN)
        assert detail["items"][-1]["detail"] == f"Tool wait returned: {OUTCOME_UNKNOWN}"
    assert tools.runs["wait"] == 1  # not run again


async def test_deleting_a_thread_removes_its_pending_approvals(opener):
    async with opener() as rt:
        tid = (await rt.create_thread())["id"]
        await rt.start_turn(tid, '/tool write_note {"name": "n", "text": "t"}')
        await wait_for(rt, tid, "approval.requested")
        await rt.delete_thread(tid, if_busy="interrupt")
        assert await rt.list_approvals() == []


async def test_the_deny_policy_also_denies_a_remembered_tool(opener, tools):
    async with opener() as rt:
        tid = (await rt.create_thread())["id"]
        turn, pending = await ask(rt, tid, '/tool write_note {"name": "a", "text": "1"}')
        await rt.decide_approval(tid, pending["id"], "allow", remember=True)
        await wait_turn_end(rt, tid, turn["id"])
        await rt.update_thread(tid, {"approval_policy": "deny"})
        second = await run_turn(rt, tid, '/tool write_note {"name": "b", "text": "2"}')
        _, detail = await turn_row(rt, tid, second["id"])
        assert [i["metadata"]["result"] for i in detail["items"] if i["kind"] == "tool_call"][-1] == "denied by policy"
        assert tools.runs["write_note"] == 1


async def test_a_saved_and_resumed_thread_keeps_the_tool_blocks_denials_included(opener, tools):
    async with opener() as rt:
        tid = (await rt.create_thread())["id"]
        turn, pending = await ask(rt, tid, '/tool write_note {"name": "n", "text": "t"}')
        await rt.decide_approval(tid, pending["id"], "deny", message="no notes")
        await wait_turn_end(rt, tid, turn["id"])
        saved = await rt.sessions.save(thread_id=tid, timeout=10)
        resumed = await rt.sessions.resume(saved["session_id"])
        blocks = [b for m in (await rt.get_session_snapshot(resumed["thread_id"])).messages for b in m["content"]]
        assert [b["type"] for b in blocks] == ["text", "tool_use", "tool_result", "text"]
        assert blocks[1] == {"type": "tool_use", "id": "call_1", "name": "write_note", "input": {"name": "n", "text": "t"}}
        assert blocks[2] == {"type": "tool_result", "tool_use_id": "call_1", "content": "denied by user: no notes",
                             "is_error": True}
        # The resumed thread's next turn sends that history to the model.
        nxt = await run_turn(rt, resumed["thread_id"], "and now?")
        assert nxt["status"] == "completed"


class HeldStart(sqlite3.Connection):
    """The writer's connection: the COMMIT of a tool's start (``UPDATE items SET metadata`` with a
    ``started_at``) waits on ``release``; ``held`` is set while it waits."""

    held = threading.Event()
    release = threading.Event()
    _holding = False

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:  # type: ignore[override]
        if sql.startswith("UPDATE items SET metadata") and "started_at" in str(parameters):
            HeldStart._holding = True
        if sql.startswith("COMMIT") and HeldStart._holding:
            HeldStart._holding = False
            HeldStart.held.set()
            HeldStart.release.wait(20)
        return super().execute(sql, parameters)


@pytest.mark.sqlite_only(reason="holds the COMMIT through the SQLite connection factory seam")
async def test_an_interrupt_while_the_tools_start_commits_means_the_tool_never_runs(opener, tools):
    HeldStart.held.clear()
    HeldStart.release.clear()
    async with opener(sqlite_connection_factory=HeldStart) as rt:
        tid = (await rt.create_thread(approval_policy="auto"))["id"]
        turn = await rt.start_turn(tid, '/tool wait {"seconds": 0}')
        with trio.fail_after(20):
            await trio.to_thread.run_sync(HeldStart.held.wait)

        async def interrupt() -> None:
            await rt.interrupt_turn(tid, turn["id"], timeout=20)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(interrupt)
            await trio.testing.wait_all_tasks_blocked()
            HeldStart.release.set()
        row, detail = await turn_row(rt, tid, turn["id"])
        assert row["status"] == "interrupted"
        assert tools.runs["wait"] == 0  # its start committed, but the interrupt came first: never run
        item = next(i for i in detail["items"] if i["kind"] == "tool_call")
        assert item["status"] == "interrupted" and item["metadata"]["started_at"]
