"""Cancel every mutating operation at each scheduling step of its requester, of the thread's engine and
of the store's writer (see harness.py for what each means); after each run, either nothing changed or the
whole change is durable and consistent, no temp file is left, the engine (or its successor, or a reopened
runtime) agrees with the store, and no task leaked.

Every k in 1..N must really cancel: the run at k must reach step k and the cancel must fire there, so a
step count that shrank (or a cancel that never landed) fails instead of passing silently.

Real worker threads and the real clock are used on purpose: the cancellation is injected by the
instrument, not by time, so the code under test is exactly the production path. Each case prints its
N per target so coverage is visible with ``pytest -s``.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import trio

from runtime import Runtime, RuntimeConfig, codec
from runtime.idempotency import Claim
from runtime.models.tools import demo_registry

from .harness import (
    FINISHED, HELD, TARGETS, assert_claimed, capture, check_invariants, check_stored, claim, engine_task_count,
    ensure_idle, finished_turn_ids, HeldModel, live_turns, rebuild, ReleaseWhenParked, run_op, RunResult, Server,
    settle, start_server, State, StepCanceller, task_count,
)

SESSION = "keep"


@dataclasses.dataclass
class Ctx:
    server: Server
    data_dir: Path
    thread_id: str
    model: HeldModel
    target: str
    k: int = 0
    run: int = 0  # counts runs, for names that must differ from one run to the next
    fired: bool = False  # the run's cancel landed (engine and writer targets end running turns)
    memo: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def rt(self) -> Runtime:
        assert self.server.rt is not None
        return self.server.rt


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
    # The operation asks the thread's engine for something (else the engine target has no step to cancel).
    uses_engine: bool = True
    # A wait-for-idle save: the held turn is released when the save's request is parked on the engine.
    release_when_parked: bool = False
    # The thread whose engine the op asks (the engine target cancels it); a delete's is not ctx.thread_id.
    thread: Callable[[Ctx], str] = lambda ctx: ctx.thread_id
    # More checks that ask the runtime (before, after): run after the invariants, before the task count.
    post: Callable[[Ctx, State, State], Awaitable[None]] | None = None
    # Writer target: tries per k (see WRITER_TRIES); an op that sets a turn going again (an approval's
    # decision: the tool, the model's answer, the turn's end) batches in more ways, so it needs more.
    writer_tries: int | None = None


# ---- helpers -------------------------------------------------------------------------------


async def _ensure_running(ctx: Ctx) -> None:
    """A held turn runs, with PARTIAL already streamed (so a snapshot that leaked it would show)."""
    engine = ctx.rt.manager.engine(ctx.thread_id)
    if engine is None or engine.active is None:
        turn = await ctx.rt.start_turn(ctx.thread_id, f"{HELD}\nheld answer {ctx.run}", timeout=10)
        ctx.memo["turn_id"] = turn["id"]
    else:
        ctx.memo["turn_id"] = engine.active.id


async def _ensure_session(ctx: Ctx, session_id: str = SESSION) -> None:
    if f"{session_id}.json" not in capture(ctx.data_dir).files:  # its file, or its row in the store
        await ensure_idle(ctx)
        await ctx.rt.sessions.save(thread_id=ctx.thread_id, session_id=session_id, timeout=10)


def _doc(state: State, session_id: str) -> dict[str, Any] | None:
    data = state.files.get(f"{session_id}.json")
    return json.loads(data) if data is not None else None


def _new_turns(before: State, after: State) -> list[dict[str, Any]]:
    return [t for tid, t in after.turns.items() if tid not in before.turns]


def _events(before: State, after: State, name: str) -> int:
    return after.event_counts.get(name, 0) - before.event_counts.get(name, 0)


def _ended_by_the_cancel(ctx: Ctx) -> set[tuple[str, str | None]]:
    """How a turn that was running may end when this run's cancel lands: (status, error)."""
    if not ctx.fired or ctx.target == "requester":
        return {("in_progress", None)}
    if ctx.target == "engine":
        return {("interrupted", "engine stopped")}
    # The cancelled runtime's shutdown and the cancel itself reach the engine in one step, in either order.
    return {("interrupted", "server shutting down"), ("interrupted", "engine stopped")}


def _assert_saved_content(doc: dict[str, Any], before: State, after: State, ctx: Ctx) -> None:
    """A save holds finished turns only: those finished before it, and a turn it waited for. Never any
    part of a turn still running (the held turn's PARTIAL), whatever ended that turn afterwards."""
    turn_ids = finished_turn_ids(before, ctx.thread_id) | {
        t for t in finished_turn_ids(after, ctx.thread_id) if after.turns[t]["status"] == "completed"}
    messages, tokens = rebuild(after, ctx.thread_id, turn_ids)
    assert doc["messages"] == messages
    assert doc["metadata"]["total_tokens"] == tokens
    assert doc["metadata"]["message_count"] == len(messages)


# ---- the cases -----------------------------------------------------------------------------


async def _save_setup(ctx: Ctx) -> None:
    await _ensure_session(ctx)


async def _save_idle_setup(ctx: Ctx) -> None:
    await _ensure_session(ctx)
    await ensure_idle(ctx)


async def _save_mid_turn_setup(ctx: Ctx) -> None:
    await _ensure_session(ctx)
    await _ensure_running(ctx)


def _check_save_update(before: State, after: State, ctx: Ctx) -> bool:
    old, new = _doc(before, SESSION), _doc(after, SESSION)
    if new["metadata"]["revision"] == old["metadata"]["revision"]:
        assert after.files == before.files and after.sessions == before.sessions
        assert _events(before, after, "session.saved") == 0
        return False
    assert new["metadata"]["revision"] == old["metadata"]["revision"] + 1
    assert new["metadata"]["created_at"] == old["metadata"]["created_at"]
    assert after.sessions[SESSION]["revision"] == new["metadata"]["revision"]
    assert after.threads[ctx.thread_id]["session_id"] == SESSION
    assert _events(before, after, "session.saved") == 1
    _assert_saved_content(new, before, after, ctx)
    return True


def _check_save_create(before: State, after: State, ctx: Ctx) -> bool:
    session_id = f"new-{ctx.run}"
    doc = _doc(after, session_id)
    if doc is None:
        assert session_id not in after.sessions and _events(before, after, "session.saved") == 0
        assert after.threads[ctx.thread_id]["session_id"] == before.threads[ctx.thread_id]["session_id"]
        return False
    assert doc["metadata"]["revision"] == 1 and after.sessions[session_id]["revision"] == 1
    assert after.threads[ctx.thread_id]["session_id"] == session_id
    assert _events(before, after, "session.saved") == 1
    _assert_saved_content(doc, before, after, ctx)
    return True


async def _rebuild_setup(ctx: Ctx) -> None:
    await ensure_idle(ctx)


def _check_rebuild(before: State, after: State, ctx: Ctx) -> bool:
    added = set(after.files) - set(before.files)
    assert len(added) <= 1 and set(before.files) <= set(after.files)
    assert _events(before, after, "session.saved") == len(added)
    if added:
        session_id = next(iter(added))[:-5]
        assert session_id in after.sessions and after.threads[ctx.thread_id]["session_id"] == session_id
        _assert_saved_content(json.loads(after.files[f"{session_id}.json"]), before, after, ctx)
    return bool(added)


def _check_patch(before: State, after: State, ctx: Ctx) -> bool:
    old, new = _doc(before, SESSION), _doc(after, SESSION)
    if new == old:
        assert after.sessions[SESSION] == before.sessions[SESSION]
        return False
    assert new["metadata"]["revision"] == old["metadata"]["revision"] + 1
    assert new["metadata"]["title"] == f"title {ctx.run}" == after.sessions[SESSION]["title"]
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


async def _import_setup(ctx: Ctx) -> None:
    await _ensure_session(ctx)
    ctx.memo["doc"] = capture(ctx.data_dir).files[f"{SESSION}.json"]


def _check_import(before: State, after: State, ctx: Ctx) -> bool:
    session_id = f"imported-{ctx.run}"
    doc = _doc(after, session_id)
    assert {k: v for k, v in after.files.items() if k != f"{session_id}.json"} == before.files
    assert {k: v for k, v in after.sessions.items() if k != session_id} == before.sessions
    assert _events(before, after, "session.saved") == 0
    assert all(t["session_id"] != session_id for t in after.threads.values())
    if doc is None:
        assert session_id not in after.sessions
        return False
    expected = json.loads(ctx.memo["doc"])
    expected["metadata"].update(id=session_id, revision=1)
    assert doc == expected and after.sessions[session_id]["revision"] == 1
    return True


def _check_create_thread(before: State, after: State, ctx: Ctx) -> bool:
    added = [t for tid, t in after.threads.items() if tid not in before.threads]
    assert len(added) <= 1 and _events(before, after, "thread.started") == len(added)
    if added:
        assert (added[0]["title"], added[0]["mode"], added[0]["session_id"]) == (f"created {ctx.run}", "plan", None)
    return bool(added)


def _check_update_thread(before: State, after: State, ctx: Ctx) -> bool:
    old, new = before.threads[ctx.thread_id], after.threads[ctx.thread_id]
    changed = _events(before, after, "thread.updated")
    assert changed in (0, 1)
    if not changed:
        assert (new["title"], new["mode"]) == (old["title"], old["mode"])
        return False
    assert (new["title"], new["mode"]) == (f"renamed {ctx.run}", "plan")
    return True


async def _start_setup(ctx: Ctx) -> None:
    await ensure_idle(ctx)


def _check_start(before: State, after: State, ctx: Ctx) -> bool:
    new = _new_turns(before, after)
    assert len(new) <= 1 and _events(before, after, "turn.started") == len(new)
    if new:
        user_items = [i for i in after.items.values() if i["turn_id"] == new[0]["id"] and i["kind"] == "user_message"]
        assert [i["detail"] for i in user_items] == [f"{HELD}\nstarted {ctx.run}"]
        assert (new[0]["status"], new[0]["error"]) in _ended_by_the_cancel(ctx)
    return bool(new)


def _check_running_turn(before: State, after: State, ctx: Ctx) -> dict[str, Any]:
    """The held turn the op acted on: still running, or ended the one way this run's cancel ends it."""
    turn = after.turns[ctx.memo["turn_id"]]
    assert before.turns[ctx.memo["turn_id"]]["status"] == "in_progress"
    # Interrupted by the client (no error), or not: then still running, or ended by this run's cancel.
    assert (turn["status"], turn["error"]) in _ended_by_the_cancel(ctx) | {("interrupted", None)}, (
        turn["status"], turn["error"])
    return turn


def _check_steer(before: State, after: State, ctx: Ctx) -> bool:
    turn_id = ctx.memo["turn_id"]
    _check_running_turn(before, after, ctx)
    steers = [i for i in after.items.values() if i["turn_id"] == turn_id and i["kind"] == "user_message"
              and i["metadata"] and json.loads(i["metadata"]).get("steer")]
    delta = after.turns[turn_id]["steer_count"] - before.turns[turn_id]["steer_count"]
    assert delta in (0, 1) and after.turns[turn_id]["steer_count"] == len(steers)
    assert _events(before, after, "turn.steered") == delta
    if delta:
        assert steers[-1]["detail"] == f"steer {ctx.run}"
    return delta == 1


def _check_interrupt(before: State, after: State, ctx: Ctx) -> bool:
    turn = _check_running_turn(before, after, ctx)
    assert _events(before, after, "turn.completed") == (turn["status"] != "in_progress")
    # Changed by the interrupt itself: ended "interrupted" by the client (no error).
    return (turn["status"], turn["error"]) == ("interrupted", None)


async def _compact_setup(ctx: Ctx) -> None:
    await ensure_idle(ctx)


def _check_compact(before: State, after: State, ctx: Ctx) -> bool:
    new = _new_turns(before, after)
    assert len(new) <= 1
    if new:
        kinds = [i["kind"] for i in after.items.values() if i["turn_id"] == new[0]["id"]]
        assert kinds == ["context_compaction"] and new[0]["status"] == "completed"
    return bool(new)


# ---- history control: fork, rewind, retry, restore, delete ---------------------------------------
#
# Each run's setup gives the thread a few finished live turns (a rewind takes some away, so the setup adds
# them back), and the ``interrupt`` variants a held turn running on top. Each check finds out from the
# store whether the change happened, then asserts that all of it did or none of it: every turn row,
# rewound flag, item and event of the thread, the files and index rows. The engine's messages and token
# total against the live history are check_invariants' part (and a successor's, for the engine and
# writer targets); a fork's new thread gets the same comparison from an engine restored for it.


async def _finished_turns(ctx: Ctx, count: int, thread_id: str | None = None) -> list[str]:
    """Runs short turns until ``thread_id`` has ``count`` finished live turns (after ending a held one);
    returns the live turn ids in order."""
    thread_id = thread_id or ctx.thread_id
    engine = ctx.rt.manager.engine(thread_id)
    if engine is not None and engine.active is not None:
        await ctx.rt.interrupt_turn(thread_id, engine.active.id, timeout=10)
    while True:
        turns = (await ctx.rt.get_thread(thread_id))["turns"]
        # The last one an ordinary completed turn (not a held one some cancel ended), so a retry of it runs
        # to completion.
        if len(turns) >= count and turns[-1]["status"] == "completed" and HELD not in turns[-1]["input_summary"]:
            return [t["id"] for t in turns]
        await ctx.rt.start_turn(thread_id, f"turn {ctx.run}.{len(turns)}", timeout=10)
        await ctx.rt.get_session_snapshot(thread_id, wait_for_idle=True, timeout=10)


async def _held(ctx: Ctx, thread_id: str | None = None) -> None:
    """A held turn runs on the thread (PARTIAL streamed): ``memo["held"]``."""
    thread_id = thread_id or ctx.thread_id
    turn = await ctx.rt.start_turn(thread_id, f"{HELD}\nheld answer {ctx.run}", timeout=10)
    await ctx.rt.get_session_snapshot(thread_id, timeout=10)
    ctx.memo["held"] = turn["id"]


def _held_end(before: State, after: State, ctx: Ctx) -> tuple[str, str | None] | None:
    """How the run's held turn (if any) ended: still running, interrupted by the op (no error), or by the
    run's cancel; None when the run had no held turn."""
    held = ctx.memo.get("held")
    if held is None:
        return None
    assert before.turns[held]["status"] == "in_progress"
    turn = after.turns[held]
    end = (turn["status"], turn["error"])
    assert end in _ended_by_the_cancel(ctx) | {("interrupted", None)}, end
    return end


def _thread_row(state: State, thread_id: str, ctx: Ctx) -> dict[str, Any]:
    """The thread's row; without ``updated_at`` in a run with a held turn (its end moves it)."""
    row = dict(state.threads[thread_id])
    if "held" in ctx.memo:
        row.pop("updated_at")
    return row


def _rows_of(state: State, thread_id: str, skip: str | None, table: str, *ignore: str) -> dict[str, Any]:
    """The thread's turn or item rows, without ``ignore`` fields and without those of turn ``skip``."""
    rows = getattr(state, table).items()
    key = "id" if table == "turns" else "turn_id"
    return {rid: {k: v for k, v in row.items() if k not in ignore} for rid, row in rows
            if row["thread_id"] == thread_id and row[key] != skip}


def _assert_rewound(before: State, after: State, ctx: Ctx, removed: list[str] | None) -> None:
    """Exactly ``removed`` (None: nothing) left the thread's live history; every other row is as it was
    (the held turn may have ended meanwhile, nothing else of it changed)."""
    tid, held = ctx.thread_id, ctx.memo.get("held")
    flipped = [t["id"] for t in sorted(before.turns.values(), key=lambda t: t["ord"])
               if t["thread_id"] == tid and not t["rewound"] and after.turns[t["id"]]["rewound"]]
    assert flipped == (removed or []), (flipped, removed)
    assert _rows_of(after, tid, held, "turns", "rewound") == _rows_of(before, tid, held, "turns", "rewound")
    assert _rows_of(after, tid, held, "items") == _rows_of(before, tid, held, "items")
    if held is not None:
        assert after.turns[held]["ord"] == before.turns[held]["ord"]
        if removed and held in removed:
            assert (after.turns[held]["status"], after.turns[held]["error"]) == ("interrupted", None)
    live = live_turns(after, tid)
    assert after.threads[tid]["latest_turn_id"] == (live[-1]["id"] if live else None)


def _key(ctx: Ctx) -> str:
    return f"key of run {ctx.run}"


def _claimed(check: Callable[[State, State, Ctx], bool]) -> Callable[[State, State, Ctx], bool]:
    """``check``, and the op's idempotency record committed with its change, or not at all."""

    def checked(before: State, after: State, ctx: Ctx) -> bool:
        changed = check(before, after, ctx)
        assert_claimed(before, after, _key(ctx), changed)
        return changed

    return checked


def _rewind(ctx: Ctx) -> Awaitable[Any]:
    busy = "held" in ctx.memo
    return ctx.rt.rewind_thread(ctx.thread_id, ctx.memo["anchor"], if_busy="interrupt" if busy else "reject",
                                timeout=10, claim=claim(_key(ctx)))


async def _rewind_setup(ctx: Ctx) -> None:
    turns = await _finished_turns(ctx, 3)
    ctx.memo["anchor"] = turns[-2]  # this turn and the last one go


async def _rewind_busy_setup(ctx: Ctx) -> None:
    await _rewind_setup(ctx)
    await _held(ctx)


def _check_rewind(before: State, after: State, ctx: Ctx) -> bool:
    _held_end(before, after, ctx)
    changed = _events(before, after, "thread.rewound")
    assert changed in (0, 1)
    if not changed:
        _assert_rewound(before, after, ctx, None)
        return False
    anchor = before.turns[ctx.memo["anchor"]]
    removed = [t["id"] for t in live_turns(before, ctx.thread_id) if t["ord"] >= anchor["ord"]]
    _assert_rewound(before, after, ctx, removed)
    assert len(removed) == 2 + ("held" in ctx.memo)
    return True


async def _retry_setup(ctx: Ctx) -> None:
    await _finished_turns(ctx, 2)
    ctx.memo["anchor"] = None  # the latest turn


async def _retry_busy_setup(ctx: Ctx) -> None:
    turns = await _finished_turns(ctx, 2)
    ctx.memo["anchor"] = turns[-1]  # the last finished one; the held turn after it goes too
    await _held(ctx)


def _retry(ctx: Ctx) -> Awaitable[Any]:
    busy = "held" in ctx.memo
    return ctx.rt.retry_turn(ctx.thread_id, ctx.memo["anchor"], if_busy="interrupt" if busy else "reject", timeout=10,
                             claim=claim(_key(ctx)))


def _check_retry(before: State, after: State, ctx: Ctx) -> bool:
    _held_end(before, after, ctx)
    new = _new_turns(before, after)
    assert len(new) <= 1 and _events(before, after, "thread.rewound") == len(new)
    assert _events(before, after, "turn.started") == len(new)
    if not new:
        _assert_rewound(before, after, ctx, None)
        return False
    live = [t for t in live_turns(before, ctx.thread_id) if t["id"] != ctx.memo.get("held")]
    anchor = before.turns[ctx.memo["anchor"] or live[-1]["id"]]
    removed = [t["id"] for t in live_turns(before, ctx.thread_id) if t["ord"] >= anchor["ord"]]
    # The old turns left the live history and the new one is its last turn, with the anchor's prompt.
    turn = new[0]
    assert (turn["retry_of"], turn["rewound"], turn["thread_id"]) == (anchor["id"], 0, ctx.thread_id)
    assert turn["ord"] > max(t["ord"] for t in before.turns.values() if t["thread_id"] == ctx.thread_id)
    flipped = [t["id"] for t in sorted(before.turns.values(), key=lambda t: t["ord"])
               if t["thread_id"] == ctx.thread_id and not t["rewound"] and after.turns[t["id"]]["rewound"]]
    assert flipped == removed
    assert after.threads[ctx.thread_id]["latest_turn_id"] == turn["id"]
    prompt = [i["detail"] for i in before.items.values() if i["turn_id"] == anchor["id"] and i["kind"] == "user_message"]
    items = sorted((i for i in after.items.values() if i["turn_id"] == turn["id"]), key=lambda i: i["ord"])
    assert items[0]["kind"] == "user_message" and items[0]["detail"] == prompt[0]
    if turn["status"] == "completed":
        assert [(i["kind"], i["detail"]) for i in items] == [
            ("user_message", prompt[0]), ("agent_message", f"You said: {prompt[0]}")]
    else:  # the run's cancel reached the new turn (engine or writer target)
        assert (turn["status"], turn["error"]) in _ended_by_the_cancel(ctx) - {("in_progress", None)}
    return True


async def _restore_setup(ctx: Ctx) -> None:
    await _ensure_session(ctx)
    await _finished_turns(ctx, 1)
    # A turn of this run's own, so the state a restore replaces differs from the last run's.
    await ctx.rt.start_turn(ctx.thread_id, f"before restore {ctx.run}", timeout=10)
    await ctx.rt.get_session_snapshot(ctx.thread_id, wait_for_idle=True, timeout=10)


async def _restore_busy_setup(ctx: Ctx) -> None:
    await _restore_setup(ctx)
    await _held(ctx)


def _restore(ctx: Ctx) -> Awaitable[Any]:
    busy = "held" in ctx.memo
    return ctx.rt.restore_thread(ctx.thread_id, SESSION, if_busy="interrupt" if busy else "reject", timeout=10,
                                 claim=claim(_key(ctx)))


def _check_restore(before: State, after: State, ctx: Ctx) -> bool:
    _held_end(before, after, ctx)
    tid = ctx.thread_id
    added = sorted(set(after.files) - set(before.files))
    assert set(before.files) <= set(after.files) and len(added) <= 1
    assert {k: after.files[k] for k in before.files} == before.files
    assert {k: after.sessions[k] for k in before.sessions} == before.sessions
    assert _events(before, after, "thread.restored") == len(added)
    if not added:
        assert after.sessions == before.sessions
        assert _thread_row(after, tid, ctx) == _thread_row(before, tid, ctx)
        _assert_rewound(before, after, ctx, None)
        return False
    safety_id = added[0][:-5]
    safety, kept = json.loads(after.files[added[0]]), _doc(before, SESSION)
    # The safety session holds the live state the restore replaced: the finished live turns, the held one
    # included once the restore's interrupt ended it (with what it had streamed), as the thread was then.
    replaced = dataclasses.replace(after, threads=before.threads)
    held = ctx.memo.get("held")
    messages, tokens = rebuild(replaced, tid, finished_turn_ids(before, tid) | ({held} if held else set()))
    assert safety["messages"] == messages and safety["metadata"]["total_tokens"] == tokens
    assert safety["metadata"]["title"].startswith("Before restore: ")
    assert (safety["metadata"]["revision"], safety["metadata"]["thread_id"]) == (1, tid)
    assert after.sessions[safety_id]["revision"] == 1
    # The thread now starts from the session's messages, linked to it; every earlier turn is rewound.
    thread = after.threads[tid]
    assert json.loads(thread["base_messages"]) == kept["messages"]
    assert (thread["session_id"], thread["system_prompt"]) == (SESSION, kept.get("system_prompt"))
    _assert_rewound(before, after, ctx, [t["id"] for t in live_turns(before, tid)])
    return True


async def _fork_setup(ctx: Ctx) -> None:
    turns = await _finished_turns(ctx, 2)
    ctx.memo["anchor"] = turns[0]


async def _fork_busy_setup(ctx: Ctx) -> None:
    await _finished_turns(ctx, 2)
    ctx.memo["anchor"] = None  # the latest finished turn: not the held one
    await _held(ctx)


def _fork(ctx: Ctx) -> Awaitable[Any]:
    return ctx.rt.fork_thread(ctx.thread_id, through_turn_id=ctx.memo["anchor"], title=f"fork {ctx.run}", timeout=10,
                              claim=claim(_key(ctx)))


def _fork_copied(before: State, ctx: Ctx) -> list[dict[str, Any]]:
    """The source's turns a fork copies: its finished live turns through the anchor."""
    finished = [t for t in live_turns(before, ctx.thread_id) if t["status"] in FINISHED]
    anchor = ctx.memo["anchor"] or finished[-1]["id"]
    return [t for t in finished if t["ord"] <= before.turns[anchor]["ord"]]


def _check_fork(before: State, after: State, ctx: Ctx) -> bool:
    end = _held_end(before, after, ctx)
    tid = ctx.thread_id
    # The source is not changed (only thread.forked is logged on it); its running turn runs on.
    assert end is None or end in _ended_by_the_cancel(ctx)
    assert _thread_row(after, tid, ctx) == _thread_row(before, tid, ctx)
    _assert_rewound(before, after, ctx, None)
    added = [t for t_id, t in after.threads.items() if t_id not in before.threads]
    assert len(added) <= 1
    assert _events(before, after, "thread.forked") == _events(before, after, "thread.started") == len(added)
    if not added:
        return False
    fork, copied = added[0], _fork_copied(before, ctx)
    assert json.loads(fork["forked_from"]) == {"thread_id": tid, "through_turn_id": copied[-1]["id"]}
    assert (fork["title"], fork["base_messages"], fork["session_id"]) == (
        f"fork {ctx.run}", before.threads[tid]["base_messages"], None)
    turns = sorted((t for t in after.turns.values() if t["thread_id"] == fork["id"]), key=lambda t: t["ord"])
    same = ("ord", "status", "input_summary", "input_tokens", "output_tokens", "error")
    assert [[t[k] for k in same] for t in turns] == [[t[k] for k in same] for t in copied]
    assert not set(t["id"] for t in turns) & set(before.turns) and fork["latest_turn_id"] == turns[-1]["id"]
    items = lambda state, thread, ids: sorted(  # noqa: E731
        ((i["ord"], i["kind"], i["status"], i["detail"]) for i in state.items.values()
         if i["thread_id"] == thread and i["turn_id"] in ids), key=lambda i: i[0])
    assert items(after, fork["id"], {t["id"] for t in turns}) == items(before, tid, {t["id"] for t in copied})
    ctx.memo["forked"] = (fork["id"], copied)
    return True


async def _fork_engine(ctx: Ctx, before: State, after: State) -> None:
    """An engine restored for the new thread holds the source's history through the anchor."""
    fork_id, copied = ctx.memo.pop("forked", (None, None))
    if fork_id is None:
        return
    snapshot = await ctx.rt.get_session_snapshot(fork_id, timeout=10)
    messages, tokens = rebuild(before, ctx.thread_id, {t["id"] for t in copied})
    assert (list(snapshot.messages), snapshot.total_tokens, snapshot.turn_in_progress) == (messages, tokens, False)
    await ctx.rt.shutdown_thread(fork_id)


async def _delete_thread_setup(ctx: Ctx) -> None:
    if "doomed" not in ctx.memo:  # the last run deleted it (or this is the first)
        ctx.memo["doomed"] = (await ctx.rt.create_thread(title=f"doomed {ctx.run}"))["id"]
    await _finished_turns(ctx, 2, ctx.memo["doomed"])


async def _delete_thread_busy_setup(ctx: Ctx) -> None:
    await _delete_thread_setup(ctx)
    await _held(ctx, ctx.memo["doomed"])


def _delete_thread(ctx: Ctx) -> Awaitable[Any]:
    busy = "held" in ctx.memo
    return ctx.rt.delete_thread(ctx.memo["doomed"], if_busy="interrupt" if busy else "reject", timeout=10)


def _check_delete_thread(before: State, after: State, ctx: Ctx) -> bool:
    doomed, held = ctx.memo["doomed"], ctx.memo.get("held")
    others = lambda state, table: {k: v for k, v in getattr(state, table).items()  # noqa: E731
                                   if v.get("thread_id", v.get("id")) != doomed}
    assert after.files == before.files and after.sessions == before.sessions
    for table in ("threads", "turns", "items"):
        assert others(after, table) == others(before, table), table
    assert {t: n for t, n in after.thread_events.items() if t != doomed} == {
        t: n for t, n in before.thread_events.items() if t != doomed}
    if doomed in after.threads:
        assert _thread_row(after, doomed, ctx) == _thread_row(before, doomed, ctx)
        if held is not None:
            end = (after.turns[held]["status"], after.turns[held]["error"])
            assert end in _ended_by_the_cancel(ctx) | {("interrupted", None)}, end
        assert _rows_of(after, doomed, held, "turns") == _rows_of(before, doomed, held, "turns")
        assert _rows_of(after, doomed, held, "items") == _rows_of(before, doomed, held, "items")
        return False
    # Gone with every turn, item and event; its thread.deleted took a seq that is never handed out again.
    assert not [t for t in after.turns.values() if t["thread_id"] == doomed]
    assert not [i for i in after.items.values() if i["thread_id"] == doomed]
    assert doomed not in after.thread_events and before.thread_events[doomed] > 0
    assert after.max_seq > before.max_seq
    ctx.memo.pop("doomed")
    return True


def _save(session_id: Callable[[Ctx], str], **kwargs: Any) -> Callable[[Ctx], Awaitable[Any]]:
    return lambda c: c.rt.sessions.save(thread_id=c.thread_id, session_id=session_id(c), timeout=10, **kwargs)


CASES = [
    Case("PUT session (update)", _save(lambda c: SESSION), _check_save_update, _save_setup, final_at_return=True),
    Case("PUT session (mid-turn)", _save(lambda c: SESSION), _check_save_update, _save_mid_turn_setup,
         final_at_return=True),
    Case("PUT session (create)", _save(lambda c: f"new-{c.run}"), _check_save_create, _rebuild_setup,
         final_at_return=True),
    Case("PUT session (wait_for_idle, idle)", _save(lambda c: SESSION, wait_for_idle=True), _check_save_update,
         _save_idle_setup, final_at_return=True),
    Case("PUT session (wait_for_idle, mid-turn)", _save(lambda c: SESSION, wait_for_idle=True), _check_save_update,
         _save_mid_turn_setup, final_at_return=True, release_when_parked=True),
    Case("POST session (rebuild)", lambda c: c.rt.sessions.rebuild(thread_id=c.thread_id, timeout=10),
         _check_rebuild, _rebuild_setup, final_at_return=True, uses_engine=False),
    Case("PATCH session", lambda c: c.rt.sessions.patch(SESSION, title=f"title {c.run}", timeout=10),
         _check_patch, _save_setup, final_at_return=True, uses_engine=False),
    Case("DELETE session", lambda c: c.rt.sessions.delete("doomed", timeout=10), _check_delete, _delete_setup,
         final_at_return=True, uses_engine=False),
    Case("resume-thread", lambda c: c.rt.sessions.resume(SESSION), _check_resume, _resume_setup,
         final_at_return=True, uses_engine=False),
    Case("import session", lambda c: c.rt.sessions.import_document(c.memo["doc"], session_id=f"imported-{c.run}",
                                                                  timeout=10),
         _check_import, _import_setup, final_at_return=True, uses_engine=False),
    Case("create thread", lambda c: c.rt.create_thread(title=f"created {c.run}", mode="plan"), _check_create_thread,
         uses_engine=False),
    Case("update thread", lambda c: c.rt.update_thread(c.thread_id, {"title": f"renamed {c.run}", "mode": "plan"},
                                                       timeout=10),
         _check_update_thread, ensure_idle),
    Case("start turn", lambda c: c.rt.start_turn(c.thread_id, f"{HELD}\nstarted {c.run}", timeout=10), _check_start,
         _start_setup),
    Case("steer turn", lambda c: c.rt.steer_turn(c.thread_id, c.memo["turn_id"], f"steer {c.run}", timeout=10),
         _check_steer, _ensure_running),
    Case("interrupt turn", lambda c: c.rt.interrupt_turn(c.thread_id, c.memo["turn_id"], timeout=10),
         _check_interrupt, _ensure_running),
    Case("compact", lambda c: c.rt.compact(c.thread_id, "cancel test", timeout=10), _check_compact,
         _compact_setup),
]


def _keyed(case: Case, call: Callable[[Ctx, Claim], Awaitable[Any]], *, exact: bool = True) -> Case:
    """``case`` made as web/idempotency.py makes a request with an Idempotency-Key: the key held, looked
    up (each run has a key of its own, so nothing is stored yet), its claim passed to the runtime. The
    check adds: the answer is stored exactly when the change was made (``exact``; else only if it was:
    an interrupt whose requester gave up still interrupts, and stores no answer), the stored bytes are
    whole JSON, and the key is free again once everything settled."""

    async def action(ctx: Ctx) -> Any:
        key = f"key-{ctx.run}"
        with ctx.rt.idempotency.hold(key, "fingerprint") as slot:
            assert await ctx.rt.idempotency.lookup(key, slot.fingerprint) is None
            return await call(ctx, slot.claim(200, lambda value: codec.dumps(
                {k: v for k, v in value.items() if k != "session"})))

    def check(before: State, after: State, ctx: Ctx) -> bool:
        changed = case.check(before, after, ctx)
        key = f"key-{ctx.run}"
        db = sqlite3.connect(ctx.data_dir / "runtime.sqlite3")
        try:
            bodies = [row[0] for row in db.execute("SELECT body FROM idempotency WHERE key = ?", (key,))]
        finally:
            db.close()
        assert len(bodies) == changed if exact else len(bodies) <= changed, (
            f"changed={changed} but {len(bodies)} stored answer(s)")
        assert all(isinstance(json.loads(body), dict) for body in bodies)
        assert not ctx.rt.idempotency.in_progress(key), "the key stayed in progress after everything settled"
        return changed

    return dataclasses.replace(case, name=f"{case.name} (keyed)", action=action, check=check)


_BY_NAME = {case.name: case for case in CASES}
CASES += [
    _keyed(_BY_NAME["create thread"], lambda c, claim: c.rt.create_thread(title=f"created {c.run}", mode="plan",
                                                                          claim=claim)),
    _keyed(_BY_NAME["start turn"], lambda c, claim: c.rt.start_turn(c.thread_id, f"{HELD}\nstarted {c.run}",
                                                                    timeout=10, claim=claim)),
    _keyed(_BY_NAME["interrupt turn"], lambda c, claim: c.rt.interrupt_turn(c.thread_id, c.memo["turn_id"],
                                                                            timeout=10, claim=claim), exact=False),
    _keyed(_BY_NAME["PUT session (update)"], lambda c, claim: c.rt.sessions.save(
        thread_id=c.thread_id, session_id=SESSION, timeout=10, claim=claim)),
]


HISTORY_CASES = [
    Case("fork", _fork, _claimed(_check_fork), _fork_setup, post=_fork_engine),
    Case("fork (source busy)", _fork, _claimed(_check_fork), _fork_busy_setup, post=_fork_engine),
    Case("rewind", _rewind, _claimed(_check_rewind), _rewind_setup),
    Case("rewind (if_busy interrupt)", _rewind, _claimed(_check_rewind), _rewind_busy_setup),
    Case("retry", _retry, _claimed(_check_retry), _retry_setup),
    Case("retry (if_busy interrupt)", _retry, _claimed(_check_retry), _retry_busy_setup),
    Case("restore", _restore, _claimed(_check_restore), _restore_setup, final_at_return=True),
    Case("restore (if_busy interrupt)", _restore, _claimed(_check_restore), _restore_busy_setup,
         final_at_return=True),
    Case("delete thread", _delete_thread, _check_delete_thread, _delete_thread_setup,
         thread=lambda c: c.memo["doomed"]),
    Case("delete thread (if_busy interrupt)", _delete_thread, _check_delete_thread, _delete_thread_busy_setup,
         thread=lambda c: c.memo["doomed"]),
]
CASES += HISTORY_CASES


# ---- approvals: deciding one (issue 13) -----------------------------------------------------------
#
# Each run starts a turn on a thread of its own (a remembered tool would otherwise never ask again) that
# calls ``wait`` and waits for its approval, then decides it. The check reads the store: the approval row
# and its one ``approval.resolved``, the tool item and the turn, ``allowed_tools``. A decision happened
# wholly (row resolved by the client, event, remembered tool) or not at all (all as before, the turn still
# waiting); ``post`` then decides a still-pending approval again and the turn completes, and counts the
# tool's runs: at most one per approval, exactly one for an allowed turn that completed.

APPROVAL_PROMPT = '/tool wait {"seconds": 0}'
# The writer's step count after a decision took three values in 8 runs (9, 12, 15): 80 tries per k leave
# about a 1 in 10^4 chance that the rarest is never reached.
APPROVAL_WRITER_TRIES = 80


async def _approval_setup(ctx: Ctx) -> None:
    if "athread" in ctx.memo:  # the last run's thread is done with (its turn ended in ``post``)
        await ctx.rt.shutdown_thread(ctx.memo["athread"])
    thread_id = (await ctx.rt.create_thread(title=f"approvals {ctx.run}"))["id"]
    turn = await ctx.rt.start_turn(thread_id, APPROVAL_PROMPT, timeout=10)
    await settle(ctx.rt)
    (pending,) = await ctx.rt.list_approvals(thread_id=thread_id, status="pending")
    assert pending["turn_id"] == turn["id"]
    ctx.memo.update(athread=thread_id, approval=pending, turn_id=turn["id"], runs=ctx.memo["tools"].runs["wait"])


def _decided(decision: str, remember: bool = False, message: str | None = None
             ) -> Callable[[State, State, Ctx], bool]:
    status = "allowed" if decision == "allow" else "denied"
    result = "Waited 0 s" if decision == "allow" else "denied by user" + (f": {message}" if message else "")

    def check(before: State, after: State, ctx: Ctx) -> bool:
        approval, turn_id, thread_id = ctx.memo["approval"], ctx.memo["turn_id"], ctx.memo["athread"]
        old, new = before.approvals[approval["id"]], after.approvals[approval["id"]]
        assert old["status"] == "pending" and before.turns[turn_id]["status"] == "awaiting_approval"
        turn, item = after.turns[turn_id], after.items[approval["item_id"]]
        resolved = _events(before, after, "approval.resolved")
        if new["status"] == "pending":  # not decided: nothing of it happened, the turn still waits
            assert new == old and resolved == 0
            assert after.threads[thread_id]["allowed_tools"] == before.threads[thread_id]["allowed_tools"]
            assert (turn["status"], item["status"]) == ("awaiting_approval", "awaiting_approval")
            return False
        assert (new["status"], new["decided_by"], new["message"]) == (status, "client", message), new
        assert {k: v for k, v in new.items() if k not in ("status", "decided_by", "message", "resolved_at")} == {
            k: v for k, v in old.items() if k not in ("status", "decided_by", "message", "resolved_at")}
        assert resolved == 1
        assert json.loads(after.threads[thread_id]["allowed_tools"] or "[]") == (
            ["wait"] if remember and decision == "allow" else [])
        if (turn["status"], turn["error"]) in _ended_by_the_cancel(ctx) - {("in_progress", None)}:
            return True  # the cancel (an engine's death, a shutdown) ended the turn after the decision
        assert turn["status"] == "completed", (turn["status"], turn["error"])
        meta = json.loads(item["metadata"])
        assert (item["status"], meta["result"], meta["is_error"]) == ("completed", result, decision == "deny")
        assert ("started_at" in meta) == (decision == "allow")
        return True

    return check


async def _decided_again(ctx: Ctx, before: State, after: State) -> None:
    """A decision that did not happen can still be made, and the turn then completes; the tool never ran
    more than once for the approval."""
    approval, turn_id = ctx.memo["approval"], ctx.memo["turn_id"]
    if after.approvals[approval["id"]]["status"] == "pending":
        decided = await ctx.rt.decide_approval(ctx.memo["athread"], approval["id"], "allow", timeout=10)
        assert decided["status"] == "allowed"
        await ctx.rt.get_session_snapshot(ctx.memo["athread"], wait_for_idle=True, timeout=10)
        await settle(ctx.rt)
        now = capture(ctx.data_dir)
        assert now.turns[turn_id]["status"] == "completed"
        assert json.loads(now.items[approval["item_id"]]["metadata"])["result"] == "Waited 0 s"
    else:
        now = after
    runs = ctx.memo["tools"].runs["wait"] - ctx.memo["runs"]
    final, status = now.approvals[approval["id"]]["status"], now.turns[turn_id]["status"]
    started = "started_at" in json.loads(now.items[approval["item_id"]]["metadata"])
    # Never run without its start recorded first, never twice; run once if it was allowed and the turn completed.
    assert runs <= started <= (final == "allowed"), (runs, started, final, status)
    if final == "allowed" and status == "completed":
        assert runs == 1, (runs, status)


def _decide(decision: str, remember: bool = False, message: str | None = None, keyed: bool = False
            ) -> Callable[[Ctx], Awaitable[Any]]:
    return lambda c: c.rt.decide_approval(c.memo["athread"], c.memo["approval"]["id"], decision, remember=remember,
                                          message=message, timeout=10, claim=claim(_key(c)) if keyed else None)


APPROVAL_CASES = [
    Case("decide approval (allow, keyed)", _decide("allow", keyed=True), _claimed(_decided("allow")), _approval_setup,
         thread=lambda c: c.memo["athread"], post=_decided_again, writer_tries=APPROVAL_WRITER_TRIES),
    Case("decide approval (deny, message)", _decide("deny", message="not now"), _decided("deny", message="not now"),
         _approval_setup, thread=lambda c: c.memo["athread"], post=_decided_again, writer_tries=APPROVAL_WRITER_TRIES),
    Case("decide approval (allow, remember)", _decide("allow", remember=True), _decided("allow", remember=True),
         _approval_setup, thread=lambda c: c.memo["athread"], post=_decided_again, writer_tries=APPROVAL_WRITER_TRIES),
]
CASES += APPROVAL_CASES
PARAMS = [pytest.param(case, target, "files", id=f"{case.name} [{target}]")
          for case in CASES for target in TARGETS if target != "engine" or case.uses_engine]
# The session operations once more with session_storage="store" (documents in the store's session_docs
# table): cancelled at any step, the database alone must leave the old document or the new one.
SESSION_CASES = [case for case in CASES if "session" in case.name or case.name.startswith(("resume", "restore"))]
PARAMS += [pytest.param(case, target, "store", id=f"{case.name} [{target}, store]")
           for case in SESSION_CASES for target in TARGETS if target != "engine" or case.uses_engine]


# Writer target only: group commit folds the writes an op sets going into one batch or two, depending on
# which of two tasks woken in one step trio runs first (it reverses a batch half of the time), so the
# writer's step count varies from run to run. N is the most steps of WRITER_PROBES uncancelled runs; a
# run that ends before its step k is checked like any other, then k is tried again: 20 tries leave a 1 in
# a million chance that a k is never reached.
WRITER_PROBES = 8
WRITER_TRIES = 20


async def _fresh_runtime(ctx: Ctx, nursery: trio.Nursery, closed: State) -> None:
    """After a shutdown: reopen on the same files. A clean stop leaves recovery nothing to repair."""
    ctx.server = await start_server(nursery, ctx.server.config)
    assert ctx.rt.store.recovered_turns == 0, "the shutdown left a turn for recovery to end"
    assert capture(ctx.data_dir).durable() == closed.durable(), "reopening changed what the shutdown left"


async def _run_and_check(ctx: Ctx, case: Case, canceller: StepCanceller, release: ReleaseWhenParked,
                         nursery: trio.Nursery, n: int | None) -> RunResult:
    """One run of ``case`` cancelled at step ``ctx.k`` of ``ctx.target`` (0: never), and every check."""
    k, target = ctx.k, ctx.target
    ctx.run += 1
    ctx.memo.pop("held", None)
    if case.setup:
        await case.setup(ctx)
    op_thread = case.thread(ctx)
    await ctx.rt.manager.handle(op_thread)  # a live engine for the engine target to cancel
    await settle(ctx.rt)
    tasks_before = task_count()
    op_engine_tasks = engine_task_count(ctx.rt, op_thread)
    before = capture(ctx.data_dir)
    if case.release_when_parked:
        release.rt, release.thread_id = ctx.rt, ctx.thread_id
    result = await run_op(ctx.server, canceller, target, op_thread, lambda: case.action(ctx),
                          cancel_at=k or None)
    release.rt = None
    ctx.fired = result.fired_at is not None
    where = f"{case.name} [{target}] cancelled at step k={k} of {n}"
    if ctx.fired:
        # The run at k really was cancelled, at its k-th step.
        assert result.steps >= k and result.fired_at == k, f"{where}: fired at {result.fired_at}"
        assert result.cancelled_scope is not None and result.cancelled_scope.cancel_called, where
    at_return = capture(ctx.data_dir)
    if target == "writer" and ctx.fired:
        assert ctx.server.closed.is_set(), f"{where}: the runtime did not close"
        after = capture(ctx.data_dir)
        try:
            check_stored(after)
        except AssertionError as exc:
            raise AssertionError(f"{where}: the shutdown left a torn store") from exc
        await _fresh_runtime(ctx, nursery, after)
        await check_invariants(ctx.rt, ctx.data_dir, (ctx.thread_id, op_thread))
    else:
        try:
            after = await check_invariants(ctx.rt, ctx.data_dir, (ctx.thread_id, op_thread))
        except AssertionError as exc:
            raise AssertionError(f"{where}: invariant broken") from exc
        if target == "engine" and ctx.fired:  # the cancelled engine is gone; a successor answered
            assert result.engine is not None and ctx.rt.manager.engine(ctx.thread_id) is not result.engine
    if case.final_at_return and target == "requester":
        assert (at_return.files, at_return.sessions, at_return.threads) == (
            after.files, after.sessions, after.threads), f"{where}: changed after returning"
    try:
        changed = case.check(before, after, ctx)
        # The caller's view matches the durable outcome: success means it happened, an error (a 503
        # from an engine that went away, say) means it did not; only a cancelled caller may not know.
        if not result.cancelled:
            assert changed == (result.error is None), f"reported {result.error!r}, changed={changed}"
        # No seq is ever handed out twice: the log's counter only grows.
        assert after.max_seq >= before.max_seq
        if case.post:
            await case.post(ctx, before, after)
    except AssertionError as exc:
        raise AssertionError(f"{where}: all-or-nothing broken") from exc
    await settle(ctx.rt)
    gone = op_engine_tasks if op_thread not in after.threads else 0  # a deleted thread's engine ended
    assert task_count() == tasks_before - gone, f"{where}: a task leaked"
    return result


@pytest.mark.parametrize("case,target,storage", PARAMS)
async def test_cancelled_at_every_step_changes_all_or_nothing(tmp_path, case: Case, target: str, storage: str):
    data_dir = tmp_path / "data"
    model = HeldModel()
    tools = demo_registry()  # the approval cases call ``wait``; no other case asks for a tool
    config = RuntimeConfig(data_dir=data_dir, model_factory=lambda: model, tools=tools, session_storage=storage)
    canceller = StepCanceller()
    release = ReleaseWhenParked(model)
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, config)
        assert server.rt is not None
        thread = await server.rt.create_thread(title="cancellation")
        ctx = Ctx(server, data_dir, thread["id"], model, target)
        ctx.memo["tools"] = tools
        # A history with thinking and two turns, so saves and compactions have real content.
        for prompt in ("/think weighing it\nfirst question", "second question"):
            turn = await ctx.rt.start_turn(ctx.thread_id, prompt, timeout=10)
            await ctx.rt.get_session_snapshot(ctx.thread_id, wait_for_idle=True, timeout=10)
            assert turn["status"] == "in_progress"
        trio.lowlevel.add_instrument(canceller)
        trio.lowlevel.add_instrument(release)
        try:
            counts = []
            for _ in range(WRITER_PROBES if target == "writer" else 1):
                result = await _run_and_check(ctx, case, canceller, release, nursery, None)
                assert result.error is None and not result.cancelled, result.error
                counts.append(result.steps)
            n = max(counts)
            shown = f" (most of {len(counts)} runs: {sorted(set(counts))})" if len(set(counts)) > 1 else ""
            print(f"\n{case.name} [{target}]: N={n} scheduling steps{shown}", end="")
            ctx.k, tries, retried = 1, 0, 0
            while ctx.k <= n:
                result = await _run_and_check(ctx, case, canceller, release, nursery, n)
                if result.fired_at is None:
                    # The op finished before step k: only the writer's count varies (see WRITER_TRIES).
                    assert target == "writer", (
                        f"{case.name} [{target}]: the run for k={ctx.k} took only {result.steps} steps "
                        f"of {n}; its cancel never landed")
                    if tries >= (case.writer_tries or WRITER_TRIES):
                        # A rare longest interleaving (seen once under a loaded machine, issue 14) was not
                        # met again in all those tries. Every step up to the shortest run's count must have
                        # been cancelled; the tail past it is the rare batching order, and every run made
                        # for it was still checked all-or-nothing above.
                        assert ctx.k > min(counts), (
                            f"{case.name} [{target}]: the run for k={ctx.k} took only {result.steps} steps "
                            f"of {n} in {tries} tries; its cancel never landed")
                        print(f", steps {ctx.k}..{n} not met again in {tries} tries")
                        break
                    n = max(n, result.steps)
                    tries, retried = tries + 1, retried + 1
                    continue
                ctx.k, tries = ctx.k + 1, 0
            else:
                print(f", every k cancelled{f' ({retried} runs ended before their k and were retried)' if retried else ''}")
            assert n >= (2 if target == "requester" else 1), f"{case.name} [{target}] passed only {n} steps"
        finally:
            trio.lowlevel.remove_instrument(canceller)
            trio.lowlevel.remove_instrument(release)
            await _ensure_closed(ctx)
        nursery.cancel_scope.cancel()


async def _ensure_closed(ctx: Ctx) -> None:
    if not ctx.server.closed.is_set():
        with trio.CancelScope(shield=True):  # closing the runtime is bounded by Server.close's own limit
            await ctx.server.close()
