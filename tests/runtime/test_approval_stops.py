"""An engine that stops while the runtime goes on, around an approval (issue 13): the two moments the
cancel-at-every-step suite found (tests/cancellation, "decide approval" cases, engine target), pinned here.

- Stopped while its turn waits for an approval: the turn is parked (left as stored); a successor carries
  it on at once, so the approval's wall-clock deadline keeps running with no request to the thread.
- Stopped after a decision was taken but before the turn task woke up to it: the approval is resolved in
  the store, so the turn is not parked as if it still waited (a successor would continue a turn whose tool
  call has no result); it ends like any stopped turn, with exactly one ``approval.resolved``.

Deadlines run on the MockClock (``autojump_clock``).
"""

from __future__ import annotations

import pytest
import trio

from runtime.engine import ops
from runtime.models.tools import demo_registry

from .helpers import collect_events, stored_events, wait_turn_end


@pytest.fixture
def tools():
    return demo_registry()


async def _awaiting(rt, prompt='/tool wait {"seconds": 0}'):
    thread_id = (await rt.create_thread())["id"]
    turn = await rt.start_turn(thread_id, prompt)
    await collect_events(rt, thread_id, lambda e: e.event == "approval.requested")
    (pending,) = await rt.list_approvals(thread_id=thread_id, status="pending")
    return thread_id, turn, pending


async def test_a_turn_parked_by_a_stopped_engine_is_carried_on_and_its_approval_expires_on_time(
        open_runtime, tools, autojump_clock):
    async with open_runtime(tools=tools, approval_timeout=30.0) as rt:
        thread_id, turn, pending = await _awaiting(rt)
        first = rt.manager.engine(thread_id)
        start = trio.current_time()
        await rt.shutdown_thread(thread_id)
        # No request to the thread from here on: only the event stream is read.
        ended = await wait_turn_end(rt, thread_id, turn["id"])
        successor = rt.manager.engine(thread_id)
        assert successor is not None and successor is not first
        assert ended.payload["status"] == "completed"
        (record,) = await rt.list_approvals(thread_id=thread_id)
        assert (record["id"], record["status"], record["decided_by"]) == (pending["id"], "expired", "timeout")
        # At its deadline (virtual time; the stored wall-clock times do not move under the MockClock).
        assert trio.current_time() - start == pytest.approx(30.0, abs=1.0)
        detail = await rt.get_thread(thread_id)
        assert detail["items"][-1]["detail"] == "Tool wait returned: denied: the approval expired"
        assert tools.runs["wait"] == 0


async def test_a_stop_right_after_a_decision_does_not_park_the_turn(open_runtime, tools):
    async with open_runtime(tools=tools) as rt:
        thread_id, turn, pending = await _awaiting(rt)
        engine = rt.manager.engine(thread_id)
        # The decision is taken by the engine and, in the same step (before the turn task wakes up to it),
        # the engine is told to stop.
        engine._on_decide(ops.DecideApproval(approval_id=pending["id"], decision="allow"))
        await rt.shutdown_thread(thread_id)
        ended = await wait_turn_end(rt, thread_id, turn["id"])
        assert (ended.payload["status"], ended.payload["error"]) == ("interrupted", "engine shut down")
        (record,) = await rt.list_approvals(thread_id=thread_id)
        assert (record["status"], record["decided_by"]) == ("allowed", "client")
        resolved = [e.payload for e in await stored_events(rt, thread_id) if e.event == "approval.resolved"]
        assert resolved == [{"approval_id": pending["id"], "decision": "allow", "decided_by": "client"}]
        detail = await rt.get_thread(thread_id)
        assert [t["status"] for t in detail["turns"]] == ["interrupted"]
        assert all(i["status"] not in ("in_progress", "awaiting_approval") for i in detail["items"])
        assert tools.runs["wait"] <= 1
        # The thread goes on: the next turn runs.
        second = await rt.start_turn(thread_id, "after the stop")
        assert (await wait_turn_end(rt, thread_id, second["id"])).payload["status"] == "completed"
