"""Engines and storage failures: a turn whose writes failed never stays ``in_progress``, the engine's
memory never runs ahead of the store, and every thread operation survives a fault at each of its
SQLite steps (the fault-at-every-step suite, the twin of tests/cancellation/test_cancel_every_step.py).

The faults come from the seam (tests/faults/seam.py) on real SQLite: ``FaultPlan`` fails the k-th
statement of the store's writer; ``Disk`` below is a switch on the same connection class for states
that last (a disk that stays full, a COMMIT held on a ``threading.Event`` like a slow fsync).

Every run is judged from the database (``tests.cancellation.harness.capture`` and
``check_invariants``): nothing changed or all durable, no item open under an ended turn, no turn open
once the store writes again, the engine's messages equal to a rebuild from the store, the runtime
still serving (a new turn completes), and no task leaked. Timed waits run on the MockClock with
ThreadGuard (tests/support.py); the suite uses the real clock and waits only on events.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx
import pytest
import trio
import trio.testing

from runtime import Runtime, RuntimeConfig, StorageError, StorageFull
from runtime.store import records
from runtime.engine.manager import REPAIR_MAX_DELAY
from runtime.models.tools import demo_registry
from runtime.transcript import build_messages
from tests.cancellation.harness import (
    State, assert_claimed, capture, check_invariants, claim, ensure_idle, settle, task_count,
)
from tests.e2e.helpers import collect_until
from tests.runtime.helpers import collect_events, turn_completed, wait_turn_end
from tests.support import E2E_LIMIT, open_runtime
from web.client import AsyncClient

from .harness import FaultRun, every_step
from .seam import SQLITE_FAULTS, FaultPlan


# ---- a disk whose state lasts ----------------------------------------------------------------


@dataclasses.dataclass
class Disk:
    """Switches on the writer's connection, on top of a FaultPlan (whose step counting still works).

    ``full``: every COMMIT fails with SQLITE_FULL after SQLite's own rollback, as on a full disk.
    ``fail_next``: the next statement for which it returns True fails the same way (then it clears).
    ``hold``: every COMMIT waits on ``release`` (a slow fsync); ``held`` is set while one waits.
    """

    plan: FaultPlan = dataclasses.field(default_factory=FaultPlan)
    full: bool = False
    fail_next: Callable[[str, Any], bool] | None = None
    hold: bool = False
    held: threading.Event = dataclasses.field(default_factory=threading.Event)
    release: threading.Event = dataclasses.field(default_factory=threading.Event)

    def factory(self) -> type[sqlite3.Connection]:
        disk = self

        class DiskConnection(self.plan.connection_factory()):  # type: ignore[misc]
            def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:  # type: ignore[override]
                commit = sql.startswith("COMMIT") and self.in_transaction
                if commit and disk.hold:
                    disk.held.set()
                    disk.release.wait(E2E_LIMIT)
                    disk.held.clear()
                failing = disk.fail_next is not None and self.in_transaction and disk.fail_next(sql, parameters)
                if failing:
                    disk.fail_next = None
                if (commit and disk.full) or failing:
                    if commit:
                        super().execute("ROLLBACK")  # what SQLite does by itself on SQLITE_FULL at COMMIT
                    exc = sqlite3.OperationalError("database or disk is full")
                    exc.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
                    exc.sqlite_errorname = "SQLITE_FULL"  # type: ignore[attr-defined]
                    raise exc
                return super().execute(sql, parameters)

        return DiskConnection


def _open(tmp_path: Path, disk: Disk, **config):
    return open_runtime(tmp_path, sqlite_connection_factory=disk.factory(), **config)


def _rows(data_dir: Path, sql: str, *params: Any) -> list[dict[str, Any]]:
    db = sqlite3.connect(data_dir / "runtime.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in db.execute(sql, params)]
    finally:
        db.close()


def _open_items_under_ended_turns(data_dir: Path) -> list[dict[str, Any]]:
    return _rows(data_dir, "SELECT items.id, items.kind, turns.status FROM items JOIN turns ON turns.id = items.turn_id"
                           " WHERE items.status IN ('queued', 'in_progress')"
                           " AND turns.status NOT IN ('queued', 'in_progress')")


async def _rebuilt(rt: Runtime, thread_id: str) -> list[dict[str, Any]]:
    state = await rt.store.read(functools.partial(records.engine_state, thread_id=thread_id))
    return build_messages(state["base_messages"], state["items"])


async def _drain(rt: Runtime) -> None:
    """Wait until the writer has taken everything queued so far and every task is blocked (no sleeps;
    ``wait_all_tasks_blocked`` alone would not wait for the writer's thread). On a full disk the probe
    write fails like any other, which is fine: it still went through the writer."""
    for _ in range(2):
        try:
            await rt.store.write(action="probe the writer")
        except StorageError:
            pass
        await trio.testing.wait_all_tasks_blocked()


class HeldModel:
    """The scripted model, holding each turn after its reply's first word until ``go`` is set: a test
    can change the disk at an exact point of a streaming turn."""

    name = "held-scripted"

    def __init__(self) -> None:
        from runtime.models.scripted import ScriptedModel

        self.inner = ScriptedModel()
        self.streaming = trio.Event()
        self.go = trio.Event()

    async def stream(self, request):
        first = True
        async for event in self.inner.stream(request):
            yield event
            if first:
                first = False
                self.streaming.set()
                await self.go.wait()


# ---- the engine never runs ahead of the store -------------------------------------------------


async def test_a_refused_update_never_shows_in_a_snapshot(tmp_path):
    disk = Disk()
    async with _open(tmp_path, disk) as rt:
        tid = (await rt.create_thread(title="before"))["id"]
        await rt.get_session_snapshot(tid, timeout=10)
        first = rt.manager.engine(tid)
        disk.full = True
        with pytest.raises(StorageFull) as info:
            await rt.update_thread(tid, {"title": "after", "system_prompt": "be brief"}, timeout=10)
        disk.full = False
        snapshot = await rt.get_session_snapshot(tid, timeout=10)
        assert (snapshot.title, snapshot.system_prompt) == ("before", None)
        assert (await rt.thread_record(tid))["title"] == "before"
        assert info.value.message == (f"Failed to update thread '{tid}': the store could not commit "
                                      "(database or disk is full)")
        # The engine whose memory ran ahead retired; its successor was restored from the store.
        assert rt.manager.engine(tid) is not first
        await rt.update_thread(tid, {"title": "after"}, timeout=10)
        assert (await rt.get_session_snapshot(tid, timeout=10)).title == "after"


async def test_a_refused_compaction_never_shows_in_a_snapshot(tmp_path):
    disk = Disk()
    async with _open(tmp_path, disk) as rt:
        tid = (await rt.create_thread())["id"]
        await rt.start_turn(tid, "one two three", timeout=10)
        before = await rt.get_session_snapshot(tid, wait_for_idle=True, timeout=10)
        assert [m["role"] for m in before.messages] == ["user", "assistant"]
        disk.full = True
        with pytest.raises(StorageFull) as info:
            await rt.compact(tid, "too long", timeout=10)
        disk.full = False
        after = await rt.get_session_snapshot(tid, timeout=10)
        assert after.messages == before.messages == tuple(await _rebuilt(rt, tid))
        assert info.value.message.startswith(f"Failed to compact thread '{tid}': the store could not commit")
        assert [t["status"] for t in (await rt.get_thread(tid))["turns"]] == ["completed"]


async def test_a_snapshot_never_shows_a_turn_whose_start_is_not_committed(tmp_path):
    disk = Disk()
    async with _open(tmp_path, disk) as rt:
        tid = (await rt.create_thread())["id"]
        await rt.get_session_snapshot(tid, timeout=10)
        disk.hold = True
        outcomes: dict[str, Any] = {}

        async def start() -> None:
            with pytest.raises(StorageFull) as info:
                await rt.start_turn(tid, "never recorded", timeout=E2E_LIMIT)
            outcomes["start"] = info.value

        async def snapshot() -> None:
            outcomes["snapshot"] = await rt.get_session_snapshot(tid, timeout=E2E_LIMIT)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start)
            await trio.to_thread.run_sync(disk.held.wait, E2E_LIMIT)  # the turn's start is committing
            nursery.start_soon(snapshot)
            await trio.testing.wait_all_tasks_blocked()
            # The engine does not answer from a turn the store does not have yet...
            assert "snapshot" not in outcomes
            disk.hold, disk.full = False, True
            disk.release.set()  # ...and the store refuses it.
        disk.full = False
        assert outcomes["start"].message.startswith(f"Failed to start a turn on thread '{tid}': the store could not")
        assert outcomes["snapshot"].turn_in_progress is False and outcomes["snapshot"].active_turn_id is None
        assert (await rt.get_thread(tid))["turns"] == []


async def test_ops_queued_behind_a_failed_write_go_to_a_successor_restored_from_the_store(tmp_path):
    disk = Disk()
    async with _open(tmp_path, disk) as rt:
        tid = (await rt.create_thread(title="start"))["id"]
        await rt.get_session_snapshot(tid, timeout=10)
        disk.hold = True
        results: dict[str, Any] = {}

        async def update(name: str, changes: dict[str, Any]) -> None:
            try:
                await rt.update_thread(tid, changes, timeout=E2E_LIMIT)
                results[name] = "ok"
            except StorageError as exc:
                results[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(update, "refused", {"system_prompt": "from the refused update"})
            await trio.to_thread.run_sync(disk.held.wait, E2E_LIMIT)
            nursery.start_soon(update, "queued", {"title": "from the queued update"})
            await trio.testing.wait_all_tasks_blocked()
            disk.hold = False
            disk.fail_next = lambda sql, params: sql.startswith("COMMIT")
            disk.release.set()
        assert isinstance(results["refused"], StorageFull)
        assert results["queued"] == "ok"  # not handled by the failed engine: its successor applied it
        snapshot = await rt.get_session_snapshot(tid, timeout=10)
        record = await rt.thread_record(tid)
        assert (snapshot.title, snapshot.system_prompt) == ("from the queued update", None)
        assert (record["title"], record["system_prompt"]) == ("from the queued update", None)


# ---- a turn whose writes failed ends failed ---------------------------------------------------


async def test_a_turn_whose_output_write_failed_ends_failed_with_no_item_left_open(tmp_path, autojump_clock):
    disk = Disk()
    async with _open(tmp_path, disk) as rt:
        tid = (await rt.create_thread())["id"]
        # The agent message's closing write (status, text) fails; the turn's other writes would commit.
        disk.fail_next = lambda sql, params: sql.startswith("UPDATE items SET status")
        turn = await rt.start_turn(tid, "/slow 1\nfive words of reply here", timeout=10)
        end = await wait_turn_end(rt, tid, turn["id"])
        error = f"Failed to record the output of turn '{turn['id']}': database or disk is full"
        assert (end.payload["status"], end.payload["error"]) == ("failed", error)
        detail = await rt.get_thread(tid)
        assert [(i["kind"], i["status"]) for i in detail["items"]] == [
            ("user_message", "completed"), ("agent_message", "failed"), ("error", "failed")]
        assert detail["items"][1]["detail"] == "You said: five words of reply here"
        assert detail["turns"][0]["error"] == error and detail["items"][2]["detail"] == error
        assert _open_items_under_ended_turns(tmp_path) == []
        snapshot = await rt.get_session_snapshot(tid, timeout=10)
        assert list(snapshot.messages) == await _rebuilt(rt, tid)
        events = await collect_events(rt, tid, turn_completed(turn["id"]))
        assert [e.event for e in events].count("turn.completed") == 1
        # Still serving: the next turn completes.
        nxt = await rt.start_turn(tid, "again", timeout=10)
        assert (await wait_turn_end(rt, tid, nxt["id"])).payload["status"] == "completed"


async def _turn_ended_on_a_full_disk(rt: Runtime, disk: Disk, model: HeldModel,
                                     prompt: str) -> tuple[str, dict[str, Any]]:
    """A new thread whose turn streamed its reply's first word, then met a full disk for the rest and its
    end (the disk stays full). Returns (thread id, turn record)."""
    tid = (await rt.create_thread())["id"]
    turn = await rt.start_turn(tid, prompt, timeout=10)
    await model.streaming.wait()
    await _drain(rt)  # the reply's first word is stored; the disk fills before the rest
    disk.full = True
    model.go.set()
    await _drain(rt)
    return tid, turn


async def test_a_turn_whose_end_met_a_full_disk_ends_failed_once_the_disk_has_room(tmp_path, autojump_clock):
    disk, model = Disk(), HeldModel()
    async with _open(tmp_path, disk, model_factory=lambda: model) as rt:
        tid, turn = await _turn_ended_on_a_full_disk(rt, disk, model, "four words of reply")
        # The disk stays full: the turn cannot be ended, and no engine starts on the thread meanwhile.
        assert rt.manager.unended_turns == [turn["id"]] and rt.manager.engine(tid) is None
        with pytest.raises(StorageFull, match=f"^Failed to record the end of turn '{turn['id']}' after a storage "
                                              r"error: the store could not commit \(database or disk is full\)$"):
            await rt.start_turn(tid, "refused", timeout=10)
        assert [t["status"] for t in (await rt.get_thread(tid))["turns"]] == ["in_progress"]
        ended_at = trio.current_time()
        disk.full = False
        end = await wait_turn_end(rt, tid, turn["id"])  # retried by the manager, not by a request
        assert trio.current_time() - ended_at <= REPAIR_MAX_DELAY
        assert end.payload["status"] == "failed"
        assert end.payload["error"].startswith(f"Failed to record the output of turn '{turn['id']}': the store could "
                                               "not commit (database or disk is full)")
        assert rt.manager.unended_turns == []
        detail = await rt.get_thread(tid)
        assert [(i["kind"], i["status"]) for i in detail["items"]] == [
            ("user_message", "completed"), ("agent_message", "failed"), ("error", "failed")]
        assert detail["items"][1]["detail"] == "You said: four words of reply"  # what had streamed is kept
        assert _open_items_under_ended_turns(tmp_path) == []
        snapshot = await rt.get_session_snapshot(tid, timeout=10)
        assert list(snapshot.messages) == await _rebuilt(rt, tid)
        nxt = await rt.start_turn(tid, "again", timeout=10)
        assert (await wait_turn_end(rt, tid, nxt["id"])).payload["status"] == "completed"


async def test_a_turn_left_open_by_a_full_disk_is_ended_by_restart_recovery(tmp_path, autojump_clock):
    disk, model = Disk(), HeldModel()
    async with _open(tmp_path, disk, model_factory=lambda: model) as rt:
        tid, turn = await _turn_ended_on_a_full_disk(rt, disk, model, "three words here")
        assert rt.manager.unended_turns == [turn["id"]]
    # The process stopped before the disk had room: the next start ends the turn (the storage error
    # itself was never durable, so recovery says what it knows).
    async with open_runtime(tmp_path) as rt:
        assert rt.store.recovered_turns == 1
        record = next(t for t in (await rt.get_thread(tid))["turns"] if t["id"] == turn["id"])
        assert (record["status"], record["error"]) == ("interrupted", "interrupted by process restart")
        assert _open_items_under_ended_turns(tmp_path) == []


# ---- a fault at every SQLite step of every thread operation -----------------------------------

FAULT_TEXT = {kind: message for kind, (message, _code) in SQLITE_FAULTS.items()}
# (kind, rollback): a full disk at a statement with and without SQLite's own rollback of the whole
# transaction, and an I/O error. Each run's k also lands on BEGIN, SAVEPOINT, RELEASE and COMMIT.
FAULT_KINDS = {"full": ("sqlite_full", False), "full+rollback": ("sqlite_full", True), "ioerr": ("sqlite_ioerr", False)}
# `make test` runs the harshest kind (SQLite drops the whole transaction, every request in it is lost)
# for every operation; `make reliability` runs them all.
SHORT_KINDS = ("full+rollback",)
TURN_PROMPT = "/think pondering it deeply\nplease answer me"
REPLY = "You said: please answer me"


@dataclasses.dataclass
class Ctx:
    rt: Runtime
    data_dir: Path
    thread_id: str
    kind: str
    k: int = 0
    memo: dict[str, Any] = dataclasses.field(default_factory=dict)
    before: State | None = None
    tasks: int = 0


@dataclasses.dataclass
class Case:
    name: str
    action: Callable[[Ctx], Awaitable[Any]]
    # before, after, ctx, run -> changed? Asserts "nothing changed" or "all of it, durably", and which.
    check: Callable[[State, State, Ctx, FaultRun], bool]
    setup: Callable[[Ctx], Awaitable[None]] | None = None
    hanging: bool = False  # runs against a turn that hangs, which may still run afterwards
    # After the judge's checks, before the task count: put back what the run may legitimately leave.
    cleanup: Callable[[Ctx], Awaitable[None]] | None = None


def _events(before: State, after: State, name: str) -> int:
    return after.event_counts.get(name, 0) - before.event_counts.get(name, 0)


def _new(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for key, row in after.items() if key not in before]


def _assert_failed_by_the_fault(turn: dict[str, Any], ctx: Ctx) -> None:
    assert turn["status"] == "failed", turn
    assert turn["error"].startswith("Failed to ") and FAULT_TEXT[ctx.kind] in turn["error"], turn["error"]


async def _ensure_hanging(ctx: Ctx) -> None:
    engine = ctx.rt.manager.engine(ctx.thread_id)
    if engine is None or engine.active is None:
        ctx.memo["turn_id"] = (await ctx.rt.start_turn(ctx.thread_id, "/hang", timeout=10))["id"]
    else:
        ctx.memo["turn_id"] = engine.active.id


def _check_create(before: State, after: State, ctx: Ctx, run: FaultRun) -> bool:
    added = _new(before.threads, after.threads)
    assert len(added) <= 1 and _events(before, after, "thread.started") == len(added)
    if added:
        assert added[0]["title"] == f"created {ctx.k}"
        assert run.value is None or run.value["id"] == added[0]["id"]
    return bool(added)


async def _update(ctx: Ctx) -> Any:
    return await ctx.rt.update_thread(ctx.thread_id, {"title": f"title {ctx.k}", "system_prompt": f"prompt {ctx.k}"},
                                      timeout=10)


def _check_update(before: State, after: State, ctx: Ctx, run: FaultRun) -> bool:
    old, new = before.threads[ctx.thread_id], after.threads[ctx.thread_id]
    if new["title"] == f"title {ctx.k}":
        assert new["system_prompt"] == f"prompt {ctx.k}" and _events(before, after, "thread.updated") == 1
        return True
    assert new == old and _events(before, after, "thread.updated") == 0
    return False


async def _turn(ctx: Ctx) -> Any:
    turn = await ctx.rt.start_turn(ctx.thread_id, TURN_PROMPT, timeout=10)
    # The whole stream: a fault anywhere in it ends the turn; the wait goes to a successor if needed.
    await ctx.rt.get_session_snapshot(ctx.thread_id, wait_for_idle=True, timeout=10)
    return turn


def _check_turn(before: State, after: State, ctx: Ctx, run: FaultRun) -> bool:
    new = _new(before.turns, after.turns)
    assert len(new) <= 1 and _events(before, after, "turn.started") == len(new)
    if not new:
        return False
    turn = new[0]
    assert run.value is None or run.value["id"] == turn["id"]
    items = sorted((i for i in after.items.values() if i["turn_id"] == turn["id"]), key=lambda i: i["ord"])
    if run.fired is None or ctx.memo.get("absorbed"):
        # No fault, or one the writer absorbed: a multi-row INSERT of one-event requests (no savepoint) that
        # SQLite undid alone is applied again one request at a time (runtime/store/sqlite.py), and the plan
        # fires once, so every write committed. Then the turn is whole, as in a clean run.
        assert turn["status"] == "completed"
        assert [(i["kind"], i["status"], i["detail"]) for i in items] == [
            ("user_message", "completed", TURN_PROMPT), ("agent_reasoning", "completed", "pondering it deeply"),
            ("agent_message", "completed", REPLY)]
    else:  # a write of the turn failed: it ended failed, with the storage error, whatever had streamed kept
        _assert_failed_by_the_fault(turn, ctx)
        assert items[0]["kind"] == "user_message" and items[-1]["kind"] == "error"
        assert items[-1]["detail"] == turn["error"]
    return True


async def _steer(ctx: Ctx) -> Any:
    return await ctx.rt.steer_turn(ctx.thread_id, ctx.memo["turn_id"], f"steer {ctx.k}", timeout=10)


def _check_steer(before: State, after: State, ctx: Ctx, run: FaultRun) -> bool:
    turn_id = ctx.memo["turn_id"]
    steers = [i for i in after.items.values() if i["turn_id"] == turn_id and i["kind"] == "user_message"
              and i["metadata"] and json.loads(i["metadata"]).get("steer")]
    delta = after.turns[turn_id]["steer_count"] - before.turns[turn_id]["steer_count"]
    assert delta in (0, 1) and after.turns[turn_id]["steer_count"] == len(steers)
    assert _events(before, after, "turn.steered") == delta
    if delta == 0:  # the steer's write failed: the turn could not go on as the client asked
        _assert_failed_by_the_fault(after.turns[turn_id], ctx)
    else:
        assert after.turns[turn_id]["status"] == "in_progress"
    return delta == 1


async def _interrupt(ctx: Ctx) -> Any:
    return await ctx.rt.interrupt_turn(ctx.thread_id, ctx.memo["turn_id"], timeout=10)


def _check_interrupt(before: State, after: State, ctx: Ctx, run: FaultRun) -> bool:
    turn = after.turns[ctx.memo["turn_id"]]
    assert _events(before, after, "turn.completed") == 1  # it ended either way, exactly once
    if turn["status"] == "interrupted":
        assert turn["error"] is None
        return True
    _assert_failed_by_the_fault(turn, ctx)
    return False


async def _compact(ctx: Ctx) -> Any:
    return await ctx.rt.compact(ctx.thread_id, f"fault {ctx.k}", timeout=10)


def _check_compact(before: State, after: State, ctx: Ctx, run: FaultRun) -> bool:
    new = _new(before.turns, after.turns)
    assert len(new) <= 1 and _events(before, after, "item.completed") == len(new)
    if new:
        assert [i["kind"] for i in after.items.values() if i["turn_id"] == new[0]["id"]] == ["context_compaction"]
        assert new[0]["input_summary"] == f"compact: fault {ctx.k}"
    return bool(new)


# ---- history control: fork, rewind, retry, delete (restore: tests/faults/session_cases.py) ----------


async def _live_turns(ctx: Ctx, count: int, thread_id: str | None = None) -> list[str]:
    """At least ``count`` live turns on an idle thread (the judge's probe turn adds one per run, a rewind
    takes some away); returns their ids in order."""
    thread_id = thread_id or ctx.thread_id
    while len(turns := (await ctx.rt.get_thread(thread_id))["turns"]) < count:
        await ctx.rt.start_turn(thread_id, f"turn {ctx.k}.{len(turns)}", timeout=10)
        await ctx.rt.get_session_snapshot(thread_id, wait_for_idle=True, timeout=10)
    return [t["id"] for t in turns]


def _thread_rows(state: State, thread_id: str, table: str) -> dict[str, Any]:
    return {rid: row for rid, row in getattr(state, table).items() if row["thread_id"] == thread_id}


def _flipped(before: State, after: State, thread_id: str) -> list[str]:
    """The thread's turns that left its live history in this run, in order."""
    return [t["id"] for t in sorted(_thread_rows(before, thread_id, "turns").values(), key=lambda t: t["ord"])
            if not t["rewound"] and after.turns[t["id"]]["rewound"]]


def _assert_unrewound(before: State, after: State, ctx: Ctx) -> None:
    assert after.threads[ctx.thread_id] == before.threads[ctx.thread_id]
    for table in ("turns", "items"):
        assert _thread_rows(after, ctx.thread_id, table) == _thread_rows(before, ctx.thread_id, table), table
    assert after.thread_events.get(ctx.thread_id) == before.thread_events.get(ctx.thread_id)


async def _fork_setup(ctx: Ctx) -> None:
    await ensure_idle(ctx)
    ctx.memo["anchor"] = (await _live_turns(ctx, 2))[0]


def _check_fork(before: State, after: State, ctx: Ctx, run: FaultRun) -> bool:
    tid, anchor = ctx.thread_id, ctx.memo["anchor"]
    added = _new(before.threads, after.threads)
    assert len(added) <= 1 and _events(before, after, "thread.forked") == len(added)
    assert _thread_rows(after, tid, "turns") == _thread_rows(before, tid, "turns")  # the source is unchanged
    if not added:
        _assert_unrewound(before, after, ctx)
        assert after.turns == before.turns and after.items == before.items
        return False
    fork = added[0]
    assert json.loads(fork["forked_from"]) == {"thread_id": tid, "through_turn_id": anchor}
    assert run.value is None or run.value["thread"]["id"] == fork["id"]
    [copy] = _thread_rows(after, fork["id"], "turns").values()  # the anchor is the source's first turn
    assert (copy["ord"], copy["status"], copy["input_summary"]) == tuple(
        before.turns[anchor][k] for k in ("ord", "status", "input_summary"))
    kinds = lambda state, turn: [(i["kind"], i["detail"]) for i in sorted(  # noqa: E731
        state.items.values(), key=lambda i: i["ord"]) if i["turn_id"] == turn]
    assert kinds(after, copy["id"]) == kinds(before, anchor) and fork["latest_turn_id"] == copy["id"]
    ctx.memo["fork"] = fork["id"]
    return True


async def _fork_cleanup(ctx: Ctx) -> None:
    """The new thread's engine, restored from the store, holds the anchor's history; then it stops."""
    fork_id = ctx.memo.pop("fork", None)
    if fork_id is not None:
        snapshot = await ctx.rt.get_session_snapshot(fork_id, timeout=10)
        assert list(snapshot.messages) == await _rebuilt(ctx.rt, fork_id) != []
        await ctx.rt.shutdown_thread(fork_id)


async def _rewind_setup(ctx: Ctx) -> None:
    await ensure_idle(ctx)
    ctx.memo["anchor"] = (await _live_turns(ctx, 3))[-2]


def _check_rewind(before: State, after: State, ctx: Ctx, run: FaultRun) -> bool:
    tid = ctx.thread_id
    if not _events(before, after, "thread.rewound"):
        _assert_unrewound(before, after, ctx)
        return False
    live = sorted((t for t in _thread_rows(before, tid, "turns").values() if not t["rewound"]), key=lambda t: t["ord"])
    removed = [t["id"] for t in live if t["ord"] >= before.turns[ctx.memo["anchor"]]["ord"]]
    assert _flipped(before, after, tid) == removed and len(removed) == 2
    assert run.value is None or run.value["removed_turn_ids"] == removed
    assert after.threads[tid]["latest_turn_id"] == live[-3]["id"]
    assert _thread_rows(after, tid, "items") == _thread_rows(before, tid, "items")
    return True


async def _retry(ctx: Ctx) -> Any:
    turn = await ctx.rt.retry_turn(ctx.thread_id, timeout=10, claim=claim(_key(ctx)))
    # Its whole stream too: a fault there ends the new turn failed; the retry itself happened.
    await ctx.rt.get_session_snapshot(ctx.thread_id, wait_for_idle=True, timeout=10)
    return turn


async def _retry_setup(ctx: Ctx) -> None:
    await ensure_idle(ctx)
    ctx.memo["anchor"] = (await _live_turns(ctx, 2))[-1]


def _check_retry(before: State, after: State, ctx: Ctx, run: FaultRun) -> bool:
    tid, anchor = ctx.thread_id, ctx.memo["anchor"]
    new = _new(before.turns, after.turns)
    assert len(new) <= 1 and _events(before, after, "thread.rewound") == len(new)
    if not new:
        _assert_unrewound(before, after, ctx)
        return False
    turn = new[0]
    assert (turn["retry_of"], turn["thread_id"], turn["rewound"]) == (anchor, tid, 0)
    assert _flipped(before, after, tid) == [anchor]
    assert run.value is None or run.value["id"] == turn["id"]
    prompt = next(i["detail"] for i in before.items.values() if i["turn_id"] == anchor and i["kind"] == "user_message")
    items = sorted((i for i in after.items.values() if i["turn_id"] == turn["id"]), key=lambda i: i["ord"])
    if turn["status"] == "completed":
        assert [(i["kind"], i["detail"]) for i in items] == [("user_message", prompt),
                                                            ("agent_message", f"You said: {prompt}")]
    else:  # a later write of the new turn failed: the retry happened, its turn ended failed
        _assert_failed_by_the_fault(turn, ctx)
        assert items[0]["detail"] == prompt and items[-1]["kind"] == "error"
    return True


async def _delete_setup(ctx: Ctx) -> None:
    await ensure_idle(ctx)
    if "doomed" not in ctx.memo:
        ctx.memo["doomed"] = (await ctx.rt.create_thread(title=f"doomed {ctx.k}"))["id"]
        await _live_turns(ctx, 1, ctx.memo["doomed"])
    await ctx.rt.shutdown_thread(ctx.memo["doomed"])  # its engine is not counted in the task count


def _check_delete(before: State, after: State, ctx: Ctx, run: FaultRun) -> bool:
    doomed = ctx.memo["doomed"]
    keep = lambda state, table: {k: v for k, v in getattr(state, table).items()  # noqa: E731
                                 if v.get("thread_id", k) != doomed}
    for table in ("threads", "turns", "items"):
        assert keep(after, table) == keep(before, table), table
    if doomed in after.threads:
        assert after.threads[doomed] == before.threads[doomed]
        for table in ("turns", "items"):
            assert _thread_rows(after, doomed, table) == _thread_rows(before, doomed, table)
        assert after.thread_events[doomed] == before.thread_events[doomed]
        return False
    assert not _thread_rows(after, doomed, "turns") and not _thread_rows(after, doomed, "items")
    assert doomed not in after.thread_events and after.max_seq > before.max_seq  # no seq reused
    del ctx.memo["doomed"]
    return True


async def _delete_cleanup(ctx: Ctx) -> None:
    if "doomed" in ctx.memo:  # not deleted: its engine stops again, as before the run
        await ctx.rt.shutdown_thread(ctx.memo["doomed"])


def _key(ctx: Ctx) -> str:
    return f"key of run {ctx.k}"


def _claimed(check: Callable[[State, State, Ctx, FaultRun], bool]) -> Callable[[State, State, Ctx, FaultRun], bool]:
    """``check``, and the op's idempotency record committed in its change's transaction or not at all; the
    stored answer is the one the caller got."""

    def checked(before: State, after: State, ctx: Ctx, run: FaultRun) -> bool:
        changed = check(before, after, ctx, run)
        assert_claimed(before, after, _key(ctx), changed, run.value)
        return changed

    return checked


HISTORY_CASES = [
    Case("fork", lambda c: c.rt.fork_thread(c.thread_id, through_turn_id=c.memo["anchor"], timeout=10,
                                            claim=claim(_key(c))),
         _claimed(_check_fork), _fork_setup, cleanup=_fork_cleanup),
    Case("rewind", lambda c: c.rt.rewind_thread(c.thread_id, c.memo["anchor"], timeout=10, claim=claim(_key(c))),
         _claimed(_check_rewind), _rewind_setup),
    Case("retry", _retry, _claimed(_check_retry), _retry_setup),
    Case("delete thread", lambda c: c.rt.delete_thread(c.memo["doomed"], timeout=10), _check_delete, _delete_setup,
         cleanup=_delete_cleanup),
]

# ---- approvals: deciding one (issue 13) ----------------------------------------------------------
#
# Each run decides a fresh approval on a thread of its own (a remembered tool would never ask again), and
# waits for the turn that goes on from it: a fault can hit the decision's write, the tool's recorded start,
# the model's answer or the turn's end. The decision happened wholly (approval resolved by the client, its
# idempotency record, the remembered tool) or not at all (then the failed turn cancelled the approval); the
# tool never ran without its start recorded, and ran once for an allowed turn that completed.

APPROVAL_PROMPT = '/tool wait {"seconds": 0}'


async def _approval_setup(ctx: Ctx) -> None:
    thread_id = (await ctx.rt.create_thread(title=f"approvals {ctx.k}"))["id"]
    turn = await ctx.rt.start_turn(thread_id, APPROVAL_PROMPT, timeout=10)
    await collect_events(ctx.rt, thread_id, lambda e: e.event == "approval.requested")
    await settle(ctx.rt)
    (pending,) = await ctx.rt.list_approvals(thread_id=thread_id, status="pending")
    ctx.memo.update(athread=thread_id, approval=pending, turn_id=turn["id"], runs=ctx.memo["tools"].runs["wait"])


def _decide(decision: str, remember: bool = False, message: str | None = None) -> Callable[[Ctx], Awaitable[Any]]:
    async def action(ctx: Ctx) -> Any:
        record = await ctx.rt.decide_approval(ctx.memo["athread"], ctx.memo["approval"]["id"], decision,
                                              remember=remember, message=message, timeout=10, claim=claim(_key(ctx)))
        # The turn the decision set going, to its end (a successor answers if a fault retired the engine).
        await ctx.rt.get_session_snapshot(ctx.memo["athread"], wait_for_idle=True, timeout=10)
        return record

    return action


def _check_decide(decision: str, remember: bool = False, message: str | None = None
                  ) -> Callable[[State, State, Ctx, FaultRun], bool]:
    status = "allowed" if decision == "allow" else "denied"
    result = "Waited 0 s" if decision == "allow" else "denied by user" + (f": {message}" if message else "")

    def check(before: State, after: State, ctx: Ctx, run: FaultRun) -> bool:
        approval, turn_id, thread_id = ctx.memo["approval"], ctx.memo["turn_id"], ctx.memo["athread"]
        old, new = before.approvals[approval["id"]], after.approvals[approval["id"]]
        assert old["status"] == "pending" and before.turns[turn_id]["status"] == "awaiting_approval"
        turn, item = after.turns[turn_id], after.items[approval["item_id"]]
        meta = json.loads(item["metadata"])
        runs = ctx.memo["tools"].runs["wait"] - ctx.memo["runs"]
        assert runs <= ("started_at" in meta), (runs, meta)  # never run without its start recorded
        allowed = json.loads(after.threads[thread_id]["allowed_tools"] or "[]")
        assert _events(before, after, "approval.resolved") == 1, "one resolution: the decision or the cancel"
        if new["status"] != status:  # the decision's write failed: its turn failed, which cancelled it
            assert (new["status"], new["decided_by"]) == ("canceled", "interrupt"), new
            _assert_failed_by_the_fault(turn, ctx)
            assert item["status"] == "failed" and allowed == [] and runs == 0
            return False
        assert (new["decided_by"], new["message"]) == ("client", message), new
        assert run.value is None or run.value == {**old, **{k: new[k] for k in (
            "status", "decided_by", "message", "resolved_at")}, "input": json.loads(old["input"])}
        assert allowed == (["wait"] if remember and decision == "allow" else [])
        if turn["status"] != "completed":  # a later write of the turn failed
            _assert_failed_by_the_fault(turn, ctx)
            return True
        assert (item["status"], meta["result"], meta["is_error"]) == ("completed", result, decision == "deny")
        assert runs == (decision == "allow")
        return True

    return check


async def _approval_cleanup(ctx: Ctx) -> None:
    """The run's thread has a live engine again (a fault retired it; the task count is taken with one), and
    it serves: its next turn completes."""
    turn = await ctx.rt.start_turn(ctx.memo["athread"], "after the decision", timeout=10)
    await ctx.rt.get_session_snapshot(ctx.memo["athread"], wait_for_idle=True, timeout=10)
    assert capture(ctx.data_dir).turns[turn["id"]]["status"] == "completed"


APPROVAL_CASES = [
    Case("decide approval (allow)", _decide("allow"), _claimed(_check_decide("allow")), _approval_setup,
         cleanup=_approval_cleanup),
    Case("decide approval (deny, message)", _decide("deny", message="no"),
         _claimed(_check_decide("deny", message="no")), _approval_setup, cleanup=_approval_cleanup),
    Case("decide approval (allow, remember)", _decide("allow", remember=True),
         _claimed(_check_decide("allow", remember=True)), _approval_setup, cleanup=_approval_cleanup),
]

CASES = [
    Case("create thread", lambda c: c.rt.create_thread(title=f"created {c.k}"), _check_create),
    Case("update thread", _update, _check_update),
    Case("turn and its stream", _turn, _check_turn, ensure_idle),
    Case("steer", _steer, _check_steer, _ensure_hanging, hanging=True),
    Case("interrupt", _interrupt, _check_interrupt, _ensure_hanging, hanging=True),
    Case("compact", _compact, _check_compact, ensure_idle),
    *HISTORY_CASES,
    *APPROVAL_CASES,
]


def _ends_per_started_turn(data_dir: Path) -> dict[str, int]:
    """turn.completed events per turn that has a turn.started (compactions have neither)."""
    return {row["turn_id"]: row["n"] for row in _rows(
        data_dir, "SELECT turn_id, SUM(event = 'turn.completed') AS n FROM events"
                  " WHERE turn_id IN (SELECT turn_id FROM events WHERE event = 'turn.started') GROUP BY turn_id")}


@pytest.mark.parametrize("kind", [pytest.param(name, marks=() if name in SHORT_KINDS else pytest.mark.reliability)
                                  for name in FAULT_KINDS])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_a_fault_at_every_step_changes_all_or_nothing(tmp_path, case: Case, kind: str):
    fault, rollback = FAULT_KINDS[kind]
    plan, data_dir = FaultPlan(), tmp_path / "data"
    tools = demo_registry()  # the approval cases call ``wait``; no other case asks for a tool
    async with open_runtime(data_dir, sqlite_connection_factory=plan.connection_factory(), tools=tools) as rt:
        thread = await rt.create_thread(title="faults")
        ctx = Ctx(rt, data_dir, thread["id"], fault)
        ctx.memo["tools"] = tools
        for prompt in ("/think weighing it\nfirst question", "second question"):  # a history to compact
            await rt.start_turn(ctx.thread_id, prompt, timeout=10)
            await rt.get_session_snapshot(ctx.thread_id, wait_for_idle=True, timeout=10)

        async def prepare() -> None:
            ctx.k += 1  # the k of the next run (every_step counts from 1)
            if case.setup:
                await case.setup(ctx)
            await settle(rt)
            ctx.before = capture(data_dir)
            ctx.tasks = task_count()

        async def judge(run: FaultRun) -> None:
            assert run.k == ctx.k
            where = f"{case.name}, {kind} at step k={run.k} ({run.fired})"
            # A multi-row INSERT that failed alone, with the transaction kept (no rollback), is run again row
            # by row: nothing is lost, and nothing fails (checked in full by the case, as a clean run).
            ctx.memo["absorbed"] = (not rollback and plan.fired_sql is not None
                                    and plan.fired_sql.lstrip().upper().startswith("INSERT")
                                    and "), (" in plan.fired_sql)
            try:
                # The store writes again (the plan fires once per run). Asking the thread for a snapshot
                # restores a successor engine if the fault retired one, once its turn was ended.
                snapshot = await rt.get_session_snapshot(ctx.thread_id, timeout=10)
                after = await check_invariants(rt, data_dir)
                assert ctx.before is not None
                changed = case.check(ctx.before, after, ctx, run)
                if run.fired is None:
                    assert run.error is None and changed, f"a clean run failed: {run.error!r}"
                if run.error is not None:
                    assert isinstance(run.error, StorageError), repr(run.error)
                    assert run.error.message.startswith("Failed to "), run.error.message
                    assert FAULT_TEXT[fault] in run.error.message, run.error.message
                    assert isinstance(run.error, StorageFull) == (fault == "sqlite_full")
                # The caller's answer matches the durable outcome.
                assert changed == (run.error is None), f"answered {run.error!r} but changed={changed}"
                # No turn open but the engine's running one; no item open under an ended turn; one end each.
                engine = rt.manager.engine(ctx.thread_id)
                open_turns = [t["id"] for t in after.turns.values() if t["status"] in ("queued", "in_progress")]
                assert open_turns == ([engine.active.id] if engine is not None and engine.active else [])
                assert _open_items_under_ended_turns(data_dir) == []
                ends = _ends_per_started_turn(data_dir)
                assert ends == {t: 0 if t in open_turns else 1 for t in ends}, ends
                row = after.threads[ctx.thread_id]
                assert (snapshot.title, snapshot.system_prompt) == (row["title"], row["system_prompt"])
                if not case.hanging:  # still serving: a new turn completes
                    turn = await rt.start_turn(ctx.thread_id, "still serving", timeout=10)
                    await rt.get_session_snapshot(ctx.thread_id, wait_for_idle=True, timeout=10)
                    assert capture(data_dir).turns[turn["id"]]["status"] == "completed"
                if case.cleanup:
                    await case.cleanup(ctx)
                await settle(rt)
                assert task_count() == ctx.tasks, "a task leaked"
            except AssertionError as exc:
                raise AssertionError(f"{where}: {exc}") from exc
            await prepare()

        await prepare()
        n = await every_step(plan, lambda: case.action(ctx), fault, judge, rollback=rollback)
        print(f"\n{case.name} ({kind}): N={n} SQLite steps, each failed once")
        assert n >= 5, f"{case.name} took only {n} steps: the plan is not counting"


# ---- a slow disk never blocks the event loop --------------------------------------------------


async def test_health_and_reads_answer_while_each_operations_commit_is_held(tmp_path):
    """Every COMMIT parked on an Event (a disk that takes as long as the test wants to fsync): while
    each operation's commit waits, /health and the read routes answer over a real socket, and the
    operation itself completes once the disk goes on. Nothing here is timed."""
    from web.cli import run_server
    from web.settings import ServerSettings

    disk = Disk()
    config = RuntimeConfig(data_dir=tmp_path, sqlite_connection_factory=disk.factory())
    settings = ServerSettings(host="127.0.0.1", port=0, data_dir=tmp_path, auth_token="slow-disk")
    async with trio.open_nursery() as nursery:
        shutdown = trio.Event()
        running = await nursery.start(functools.partial(run_server, settings, config, shutdown=shutdown))
        headers = {"Authorization": "Bearer slow-disk"}
        async with httpx.AsyncClient(base_url=running.url, headers=headers, timeout=E2E_LIMIT) as http:
            tid = (await http.post("/v1/threads", json={"title": "slow"})).json()["id"]
            hanging = (await http.post(f"/v1/threads/{tid}/turns", json={"prompt": "/hang"})).json()["id"]

            async def held(method: str, path: str, body: dict[str, Any] | None, status: int) -> None:
                disk.release.clear()
                disk.hold = True
                answers: list[httpx.Response] = []

                async def operation() -> None:
                    answers.append(await http.request(method, path, json=body))

                async with trio.open_nursery() as inner:
                    inner.start_soon(operation)
                    await trio.to_thread.run_sync(disk.held.wait, E2E_LIMIT)
                    health = await http.get("/health")
                    detail = await http.get(f"/v1/threads/{tid}")
                    listed = await http.get("/v1/threads")
                    assert disk.held.is_set() and answers == [], f"{method} {path}: its commit was not held"
                    assert (health.status_code, health.json()["status"]) == (200, "ok")
                    assert detail.status_code == 200 and listed.status_code == 200
                    disk.hold = False
                    disk.release.set()
                assert answers[0].status_code == status, (method, path, answers[0].text)

            await held("POST", "/v1/threads", {"title": "created on a slow disk"}, 201)
            await held("PATCH", f"/v1/threads/{tid}", {"title": "renamed"}, 200)
            await held("POST", f"/v1/threads/{tid}/turns/{hanging}/steer", {"prompt": "and this"}, 200)
            await held("POST", f"/v1/threads/{tid}/turns/{hanging}/interrupt", None, 200)
            await held("POST", f"/v1/threads/{tid}/turns", {"prompt": "one two three"}, 201)
            async with AsyncClient(running.url, "slow-disk") as client:
                await collect_until(client, tid, lambda e: e["event"] == "turn.completed" and e["turn_id"] != hanging)
            await held("POST", f"/v1/threads/{tid}/compact", {"reason": "slow"}, 200)
            turns = (await http.get(f"/v1/threads/{tid}")).json()["turns"]
            assert [t["status"] for t in turns] == ["interrupted", "completed", "completed"]
        shutdown.set()
