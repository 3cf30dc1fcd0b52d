"""Cancel every mutating operation at each of its scheduling steps; after each run, either nothing
changed or the whole change is durable and consistent, no temp file is left, the engine answers, and
no task leaked.

Real worker threads and the real clock are used on purpose: the cancellation is injected by the
instrument, not by time, so the code under test is exactly the production path. Each case prints its
N (the steps of one uncancelled run) so coverage is visible with ``pytest -s``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import trio

from runtime import Runtime, RuntimeConfig

from .harness import State, StepCanceller, capture, check_invariants, run_op, settle, task_count

SESSION = "keep"


@dataclasses.dataclass
class Ctx:
    rt: Runtime
    data_dir: Path
    thread_id: str
    k: int = 0
    memo: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Case:
    name: str
    action: Callable[[Ctx], Awaitable[Any]]
    # before, after, ctx -> changed? Asserts "nothing changed" or "everything changed" and says which.
    check: Callable[[State, State, Ctx], bool]
    setup: Callable[[Ctx], Awaitable[None]] | None = None
    # Session operations commit under a shield: whatever way they return, their effect is final by
    # then (nothing lands later, the per-session lock was held to the end). Engine ops may legitimately
    # go on after a cancelled requester: the op was queued and the engine carries it out.
    final_at_return: bool = False


# ---- helpers -------------------------------------------------------------------------------


async def _ensure_idle(ctx: Ctx) -> None:
    engine = ctx.rt.manager.engine(ctx.thread_id)
    if engine is not None and engine.active is not None:
        await ctx.rt.interrupt_turn(ctx.thread_id, engine.active.id, timeout=10)


async def _ensure_hanging(ctx: Ctx) -> None:
    engine = ctx.rt.manager.engine(ctx.thread_id)
    if engine is None or engine.active is None:
        turn = await ctx.rt.start_turn(ctx.thread_id, "/hang", timeout=10)
        ctx.memo["turn_id"] = turn["id"]
    else:
        ctx.memo["turn_id"] = engine.active.id


async def _ensure_session(ctx: Ctx, session_id: str = SESSION) -> None:
    if not (ctx.data_dir / "sessions" / f"{session_id}.json").exists():
        await _ensure_idle(ctx)
        await ctx.rt.sessions.save(thread_id=ctx.thread_id, session_id=session_id, timeout=10)


def _doc(state: State, session_id: str) -> dict[str, Any] | None:
    data = state.files.get(f"{session_id}.json")
    return json.loads(data) if data is not None else None


def _new_turns(before: State, after: State) -> list[dict[str, Any]]:
    return [t for tid, t in after.turns.items() if tid not in before.turns]


def _events(before: State, after: State, name: str) -> int:
    return after.event_counts.get(name, 0) - before.event_counts.get(name, 0)


# ---- the cases -----------------------------------------------------------------------------


async def _save_setup(ctx: Ctx) -> None:
    await _ensure_session(ctx)


async def _save_mid_turn_setup(ctx: Ctx) -> None:
    await _ensure_session(ctx)
    await _ensure_hanging(ctx)


def _check_save_update(before: State, after: State, ctx: Ctx) -> bool:
    old, new = _doc(before, SESSION), _doc(after, SESSION)
    if new["metadata"]["revision"] == old["metadata"]["revision"]:
        assert after.files == before.files and after.sessions == before.sessions
        assert _events(before, after, "session.saved") == 0
        return False
    else:
        assert new["metadata"]["revision"] == old["metadata"]["revision"] + 1
        assert new["metadata"]["created_at"] == old["metadata"]["created_at"]
        assert after.sessions[SESSION]["revision"] == new["metadata"]["revision"]
        assert after.threads[ctx.thread_id]["session_id"] == SESSION
        assert _events(before, after, "session.saved") == 1
        return True


def _check_save_create(before: State, after: State, ctx: Ctx) -> bool:
    session_id = f"new-{ctx.k}"
    doc = _doc(after, session_id)
    if doc is None:
        assert session_id not in after.sessions and _events(before, after, "session.saved") == 0
        assert after.threads[ctx.thread_id]["session_id"] == before.threads[ctx.thread_id]["session_id"]
        return False
    assert doc["metadata"]["revision"] == 1 and after.sessions[session_id]["revision"] == 1
    assert after.threads[ctx.thread_id]["session_id"] == session_id
    assert _events(before, after, "session.saved") == 1
    return True


async def _rebuild_setup(ctx: Ctx) -> None:
    await _ensure_idle(ctx)


def _check_rebuild(before: State, after: State, ctx: Ctx) -> bool:
    added = set(after.files) - set(before.files)
    assert len(added) <= 1 and set(before.files) <= set(after.files)
    assert _events(before, after, "session.saved") == len(added)
    if added:
        session_id = next(iter(added))[:-5]
        assert session_id in after.sessions and after.threads[ctx.thread_id]["session_id"] == session_id
    return bool(added)


def _check_patch(before: State, after: State, ctx: Ctx) -> bool:
    old, new = _doc(before, SESSION), _doc(after, SESSION)
    if new == old:
        assert after.sessions[SESSION] == before.sessions[SESSION]
        return False
    assert new["metadata"]["revision"] == old["metadata"]["revision"] + 1
    assert new["metadata"]["title"] == f"title {ctx.k}" == after.sessions[SESSION]["title"]
    return True


async def _delete_setup(ctx: Ctx) -> None:
    await _ensure_session(ctx, "doomed")


def _check_delete(before: State, after: State, ctx: Ctx) -> bool:
    if "doomed.json" in after.files:
        assert after.files["doomed.json"] == before.files["doomed.json"] and "doomed" in after.sessions
        return False
    assert "doomed" not in after.sessions
    assert all(t["session_id"] != "doomed" for t in after.threads.values())
    return True


async def _resume_setup(ctx: Ctx) -> None:
    await _ensure_session(ctx)


def _check_resume(before: State, after: State, ctx: Ctx) -> bool:
    added = [t for tid, t in after.threads.items() if tid not in before.threads]
    assert len(added) <= 1 and _events(before, after, "thread.started") == len(added)
    if added:
        doc = _doc(after, SESSION)
        assert json.loads(added[0]["base_messages"]) == doc["messages"]
        assert added[0]["session_id"] == SESSION
    return bool(added)


async def _start_setup(ctx: Ctx) -> None:
    await _ensure_idle(ctx)


def _check_start(before: State, after: State, ctx: Ctx) -> bool:
    new = _new_turns(before, after)
    assert len(new) <= 1 and _events(before, after, "turn.started") == len(new)
    if new:
        user_items = [i for i in after.items.values() if i["turn_id"] == new[0]["id"] and i["kind"] == "user_message"]
        assert [i["detail"] for i in user_items] == ["/hang"]
    return bool(new)


def _check_steer(before: State, after: State, ctx: Ctx) -> bool:
    turn_id = ctx.memo["turn_id"]
    steers = [i for i in after.items.values() if i["turn_id"] == turn_id and i["kind"] == "user_message"
              and i["metadata"] and json.loads(i["metadata"]).get("steer")]
    delta = after.turns[turn_id]["steer_count"] - before.turns[turn_id]["steer_count"]
    assert delta in (0, 1) and after.turns[turn_id]["steer_count"] == len(steers)
    assert _events(before, after, "turn.steered") == delta
    return delta == 1


def _check_interrupt(before: State, after: State, ctx: Ctx) -> bool:
    status = after.turns[ctx.memo["turn_id"]]["status"]
    assert status in ("in_progress", "interrupted")
    assert _events(before, after, "turn.completed") == (status == "interrupted")
    return status == "interrupted"


async def _compact_setup(ctx: Ctx) -> None:
    await _ensure_idle(ctx)


def _check_compact(before: State, after: State, ctx: Ctx) -> bool:
    new = _new_turns(before, after)
    assert len(new) <= 1
    if new:
        kinds = [i["kind"] for i in after.items.values() if i["turn_id"] == new[0]["id"]]
        assert kinds == ["context_compaction"]
    return bool(new)


CASES = [
    Case("PUT session (update)", lambda c: c.rt.sessions.save(thread_id=c.thread_id, session_id=SESSION, timeout=10),
         _check_save_update, _save_setup, final_at_return=True),
    Case("PUT session (mid-turn)", lambda c: c.rt.sessions.save(thread_id=c.thread_id, session_id=SESSION,
                                                                  timeout=10),
         _check_save_update, _save_mid_turn_setup, final_at_return=True),
    Case("PUT session (create)", lambda c: c.rt.sessions.save(thread_id=c.thread_id, session_id=f"new-{c.k}",
                                                               timeout=10),
         _check_save_create, _rebuild_setup, final_at_return=True),
    Case("POST session (rebuild)", lambda c: c.rt.sessions.rebuild(thread_id=c.thread_id, timeout=10),
         _check_rebuild, _rebuild_setup, final_at_return=True),
    Case("PATCH session", lambda c: c.rt.sessions.patch(SESSION, title=f"title {c.k}", timeout=10),
         _check_patch, _save_setup, final_at_return=True),
    Case("DELETE session", lambda c: c.rt.sessions.delete("doomed", timeout=10), _check_delete, _delete_setup,
         final_at_return=True),
    Case("resume-thread", lambda c: c.rt.sessions.resume(SESSION), _check_resume, _resume_setup,
         final_at_return=True),
    Case("start turn", lambda c: c.rt.start_turn(c.thread_id, "/hang", timeout=10), _check_start, _start_setup),
    Case("steer turn", lambda c: c.rt.steer_turn(c.thread_id, c.memo["turn_id"], f"steer {c.k}", timeout=10),
         _check_steer, _ensure_hanging),
    Case("interrupt turn", lambda c: c.rt.interrupt_turn(c.thread_id, c.memo["turn_id"], timeout=10),
         _check_interrupt, _ensure_hanging),
    Case("compact", lambda c: c.rt.compact(c.thread_id, "cancel test", timeout=10), _check_compact,
         _compact_setup),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_cancelled_at_every_step_changes_all_or_nothing(tmp_path, case: Case):
    data_dir = tmp_path / "data"
    canceller = StepCanceller()
    async with Runtime.open(RuntimeConfig(data_dir=data_dir)) as rt:
        thread = await rt.create_thread(title="cancellation")
        ctx = Ctx(rt, data_dir, thread["id"])
        # A history with thinking and two turns, so saves and compactions have real content.
        for prompt in ("/think weighing it\nfirst question", "second question"):
            turn = await rt.start_turn(ctx.thread_id, prompt, timeout=10)
            await rt.get_session_snapshot(ctx.thread_id, wait_for_idle=True, timeout=10)
            assert turn["status"] == "in_progress"
        trio.lowlevel.add_instrument(canceller)
        try:
            n = None
            k = 0
            while n is None or k <= n:
                ctx.k = k
                if case.setup:
                    await case.setup(ctx)
                await settle(rt)
                tasks_before = task_count()
                before = capture(data_dir)
                result = await run_op(canceller, lambda: case.action(ctx), cancel_at=k or None)
                at_return = capture(data_dir)
                if k == 0:
                    n = result.steps
                    assert result.error is None and not result.cancelled, result.error
                    print(f"\n{case.name}: N={n} scheduling steps")
                after = await check_invariants(rt, data_dir)
                if case.final_at_return:
                    assert (at_return.files, at_return.sessions, at_return.threads) == (
                        after.files, after.sessions, after.threads), f"{case.name}: changed after returning (k={k})"
                try:
                    changed = case.check(before, after, ctx)
                    # The caller's view matches the durable outcome: success means it happened, an
                    # error means it did not; only a cancelled caller may not know which.
                    if not result.cancelled:
                        assert changed == (result.error is None), f"reported {result.error!r}, changed={changed}"
                except AssertionError as exc:
                    raise AssertionError(f"{case.name}: invariant broken when cancelled at step k={k} of {n}") \
                        from exc
                await settle(rt)
                assert task_count() == tasks_before, f"{case.name}: a task leaked when cancelled at k={k}"
                k += 1
            assert n >= 2, f"{case.name} passed only {n} steps: the harness is not counting"
        finally:
            trio.lowlevel.remove_instrument(canceller)
