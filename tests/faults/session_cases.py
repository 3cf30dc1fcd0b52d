"""The session operations of the fault-at-every-step and kill-at-every-step suites, and their drivers.

Shared by tests/faults/test_session_faults.py (the short version, in ``make test``) and
tests/reliability/test_disk_faults.py (every kind and every operation, ``make reliability``). Each run
is judged from the database and the files (tests/cancellation/harness.capture and check_invariants),
never from the answer alone:

- nothing changed, or all of it is durable: the file, its index row, the thread link and the
  ``session.saved`` event agree, and the answer says which (an error means nothing was saved);
- an error is a StorageError naming the action (StorageFull for ENOSPC and SQLITE_FULL);
- no temp or undo file is left once the session changed again, no lock is left, and a clean save
  right after gets the very next revision.

A kill -9 is simulated by copying the data directory at the k-th step of either layer, as the process
would leave it (page cache included, hard links kept), then opening a Runtime on the copy: it must
show exactly the state before the operation or exactly the state after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from runtime import Runtime, StorageError, StorageFull
from tests.cancellation.harness import (
    State, assert_claimed, capture, check_invariants, claim, ensure_idle, finished_turn_ids, rebuild, settle,
)
from tests.support import open_runtime

from .harness import FaultRun, every_step
from .crash import CrashAt
from .seam import FaultPlan

LIMIT = 10.0
SESSION = "kept"
FULL_KINDS = ("enospc", "sqlite_full")
KINDS = ("enospc", "eio", "erofs", "sqlite_full", "sqlite_full+rollback", "sqlite_ioerr")


@contextlib.asynccontextmanager
async def faulty_runtime(data_dir: Path, plan: FaultPlan) -> AsyncIterator[Runtime]:
    """A Runtime whose store connections and session file operations all report to ``plan``."""
    async with open_runtime(data_dir, sqlite_connection_factory=plan.connection_factory(),
                            session_fs=plan.file_system()) as rt:
        yield rt


async def thread_with_history(rt: Runtime, *prompts: str) -> str:
    thread = await rt.create_thread(title="faults")
    for prompt in prompts:
        await rt.start_turn(thread["id"], prompt, timeout=LIMIT)
        await rt.get_session_snapshot(thread["id"], wait_for_idle=True, timeout=LIMIT)
    return thread["id"]


def step_of(plan: FaultPlan, name: str) -> int:
    """The k (counted in ``name``'s layer) at which the last run reached step ``name`` first."""
    layer = name.split(":", 1)[0]
    steps = [entry for entry in plan.log if entry.startswith(layer + ":")]
    return steps.index(name) + 1


def doc_of(state: State, session_id: str) -> dict[str, Any] | None:
    data = state.files.get(f"{session_id}.json")
    return json.loads(data) if data is not None else None


def _events(before: State, after: State, name: str) -> int:
    return after.event_counts.get(name, 0) - before.event_counts.get(name, 0)


def assert_unchanged(before: State, after: State) -> None:
    assert after.files == before.files
    assert after.sessions == before.sessions
    assert after.threads == before.threads
    assert after.event_counts == before.event_counts


def _only_changed(before: State, after: State, session_id: str) -> None:
    """Every other session's file and index row is as it was."""
    name = f"{session_id}.json"
    assert {k: v for k, v in after.files.items() if k != name} == {
        k: v for k, v in before.files.items() if k != name}
    assert {k: v for k, v in after.sessions.items() if k != session_id} == {
        k: v for k, v in before.sessions.items() if k != session_id}


# ---- fault at every step of every session operation -------------------------------------------


@dataclasses.dataclass
class Ctx:
    rt: Runtime
    data_dir: Path
    thread_id: str
    n: int = 0  # counts runs, so each run's new names are unique
    memo: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Case:
    name: str
    action: Callable[[Ctx], Awaitable[Any]]
    # before, after, ctx, value -> the session the run changed (None: nothing changed). Asserts that it
    # changed all or nothing.
    check: Callable[[State, State, Ctx, Any], str | None]
    # Message prefixes an error may carry, formatted with ctx.memo.
    errors: tuple[str, ...]
    setup: Callable[[Ctx], Awaitable[None]] | None = None
    # The session the operation targets: a clean save goes into it right after a run that left it
    # unchanged (after a change, into the changed one).
    target: Callable[[Ctx], str] = lambda ctx: SESSION


async def _ensure_hanging(ctx: Ctx) -> None:
    engine = ctx.rt.manager.engine(ctx.thread_id)
    if engine is None or engine.active is None:
        await ctx.rt.start_turn(ctx.thread_id, "/hang", timeout=LIMIT)


async def _ensure_session(ctx: Ctx, session_id: str) -> None:
    if f"{session_id}.json" not in capture(ctx.data_dir).files:  # its file, or its row in the store
        await ctx.rt.sessions.save(thread_id=ctx.thread_id, session_id=session_id, timeout=LIMIT)


async def _idle_with_session(ctx: Ctx) -> None:
    await ensure_idle(ctx)
    await _ensure_session(ctx, SESSION)


async def _hanging_with_session(ctx: Ctx) -> None:
    await _idle_with_session(ctx)
    await _ensure_hanging(ctx)


async def _create_setup(ctx: Ctx) -> None:
    await ensure_idle(ctx)
    ctx.memo["sid"] = f"new-{ctx.n}"


async def _delete_setup(ctx: Ctx) -> None:
    await ensure_idle(ctx)
    await _ensure_session(ctx, "doomed")


def _check_saved(before: State, after: State, ctx: Ctx, session_id: str, revision: int) -> None:
    """The whole save is there: file, index row, thread link, one session.saved event."""
    doc = doc_of(after, session_id)
    assert doc["metadata"]["revision"] == revision == after.sessions[session_id]["revision"]
    assert after.sessions[session_id]["size"] == len(after.files[f"{session_id}.json"])
    assert after.threads[ctx.thread_id]["session_id"] == session_id
    assert _events(before, after, "session.saved") == 1
    _only_changed(before, after, session_id)


def _check_update(before: State, after: State, ctx: Ctx, value: Any) -> str | None:
    old, new = doc_of(before, SESSION), doc_of(after, SESSION)
    if new == old:
        assert_unchanged(before, after)
        return None
    assert new["metadata"]["created_at"] == old["metadata"]["created_at"]
    _check_saved(before, after, ctx, SESSION, old["metadata"]["revision"] + 1)
    return SESSION


def _check_create(before: State, after: State, ctx: Ctx, value: Any) -> str | None:
    session_id = ctx.memo["sid"]
    if doc_of(after, session_id) is None:
        assert_unchanged(before, after)
        return None
    _check_saved(before, after, ctx, session_id, 1)
    return session_id


def _check_rebuild(before: State, after: State, ctx: Ctx, value: Any) -> str | None:
    added = sorted(set(after.files) - set(before.files))
    if not added:
        assert_unchanged(before, after)
        return None
    assert len(added) == 1
    session_id = added[0][:-5]
    _check_saved(before, after, ctx, session_id, 1)
    ctx.memo["sid"] = session_id
    return session_id


def _check_patch(before: State, after: State, ctx: Ctx, value: Any) -> str | None:
    old, new = doc_of(before, SESSION), doc_of(after, SESSION)
    if new == old:
        assert_unchanged(before, after)
        return None
    assert new["metadata"]["revision"] == old["metadata"]["revision"] + 1 == after.sessions[SESSION]["revision"]
    assert new["metadata"]["title"] == f"title {ctx.n}" == after.sessions[SESSION]["title"]
    assert new["messages"] == old["messages"]
    assert after.threads == before.threads and after.event_counts == before.event_counts
    _only_changed(before, after, SESSION)
    return SESSION


def _check_delete(before: State, after: State, ctx: Ctx, value: Any) -> str | None:
    if "doomed.json" in after.files:
        assert_unchanged(before, after)
        return None
    assert "doomed" not in after.sessions
    assert {tid: t["session_id"] for tid, t in after.threads.items()} == {
        tid: None if t["session_id"] == "doomed" else t["session_id"] for tid, t in before.threads.items()}
    _only_changed(before, after, "doomed")
    return "doomed"


async def _import_setup(ctx: Ctx) -> None:
    await _idle_with_session(ctx)
    ctx.memo["sid"] = f"imported-{ctx.n}"
    ctx.memo["doc"] = capture(ctx.data_dir).files[f"{SESSION}.json"]


def _check_import(before: State, after: State, ctx: Ctx, value: Any) -> str | None:
    """All of it (file, index row at revision 1) or nothing; no thread link and no event either way."""
    session_id = ctx.memo["sid"]
    doc = doc_of(after, session_id)
    if doc is None:
        assert_unchanged(before, after)
        return None
    expected = json.loads(ctx.memo["doc"])
    expected["metadata"].update(id=session_id, revision=1)
    assert doc == expected
    assert after.sessions[session_id]["revision"] == 1
    assert after.sessions[session_id]["size"] == len(after.files[f"{session_id}.json"])
    assert after.threads == before.threads and after.event_counts == before.event_counts
    _only_changed(before, after, session_id)
    return session_id


def _check_resume(before: State, after: State, ctx: Ctx, value: Any) -> str | None:
    added = [t for tid, t in after.threads.items() if tid not in before.threads]
    assert after.files == before.files and after.sessions == before.sessions
    if not added:
        assert_unchanged(before, after)
        return None
    assert len(added) == 1 and added[0]["session_id"] == SESSION
    assert _events(before, after, "thread.started") == 1
    return SESSION


async def _restore_setup(ctx: Ctx) -> None:
    await _idle_with_session(ctx)
    # A turn of this run's own: the state the restore replaces (and saves) differs from the last run's.
    await ctx.rt.start_turn(ctx.thread_id, f"before restore {ctx.n}", timeout=LIMIT)
    await ctx.rt.get_session_snapshot(ctx.thread_id, wait_for_idle=True, timeout=LIMIT)


def _live(state: State, thread_id: str) -> list[dict[str, Any]]:
    return sorted((t for t in state.turns.values() if t["thread_id"] == thread_id and not t["rewound"]),
                  key=lambda t: t["ord"])


def _check_restore(before: State, after: State, ctx: Ctx, value: Any) -> str | None:
    """All of it (the safety session saved with the state replaced, the thread restored from 'kept', its
    turns rewound, one thread.restored) or none of it."""
    tid = ctx.thread_id
    added = sorted(set(after.files) - set(before.files))
    assert len(added) <= 1 and _events(before, after, "thread.restored") == len(added)
    assert _events(before, after, "session.saved") == 0  # the safety session is not a save of the thread
    if not added:
        assert_unchanged(before, after)
        assert after.turns == before.turns and after.items == before.items
        return None
    safety_id = added[0][:-5]
    safety, kept = doc_of(after, safety_id), doc_of(before, SESSION)
    messages, tokens = rebuild(before, tid, finished_turn_ids(before, tid))
    assert (safety["messages"], safety["metadata"]["total_tokens"]) == (messages, tokens)
    assert safety["metadata"]["title"].startswith("Before restore: ") and safety["metadata"]["revision"] == 1
    assert after.sessions[safety_id]["revision"] == 1
    assert after.sessions[safety_id]["size"] == len(after.files[added[0]])
    _only_changed(before, after, safety_id)
    thread = after.threads[tid]
    assert (json.loads(thread["base_messages"]), thread["session_id"]) == (kept["messages"], SESSION)
    assert _live(after, tid) == [] and {t["id"] for t in _live(before, tid)} == {
        t for t, row in after.turns.items() if row["rewound"] and not before.turns[t]["rewound"]}
    assert value is None or value["safety_session_id"] == safety_id
    return safety_id


def _check_restore_claimed(before: State, after: State, ctx: Ctx, value: Any) -> str | None:
    changed = _check_restore(before, after, ctx, value)
    assert_claimed(before, after, f"key {ctx.n}", changed is not None, value)
    return changed


CASES = [
    Case("PUT create", lambda c: c.rt.sessions.save(thread_id=c.thread_id, session_id=c.memo["sid"], timeout=LIMIT),
         _check_create, ("Failed to save session '{sid}'", "Failed to load session '{sid}'"), _create_setup,
         target=lambda c: c.memo["sid"]),
    Case("PUT update", lambda c: c.rt.sessions.save(thread_id=c.thread_id, session_id=SESSION, timeout=LIMIT),
         _check_update, ("Failed to save session 'kept'", "Failed to load session 'kept'"), _idle_with_session),
    Case("PUT mid-turn", lambda c: c.rt.sessions.save(thread_id=c.thread_id, session_id=SESSION, timeout=LIMIT),
         _check_update, ("Failed to save session 'kept'", "Failed to load session 'kept'"), _hanging_with_session),
    Case("POST rebuild", lambda c: c.rt.sessions.rebuild(thread_id=c.thread_id, timeout=LIMIT),
         _check_rebuild, ("Failed to save session '",), _idle_with_session),
    Case("PATCH", lambda c: c.rt.sessions.patch(SESSION, title=f"title {c.n}", timeout=LIMIT),
         _check_patch, ("Failed to update session 'kept'", "Failed to load session 'kept'"), _idle_with_session),
    Case("DELETE", lambda c: c.rt.sessions.delete("doomed", timeout=LIMIT),
         _check_delete, ("Failed to delete session 'doomed'",), _delete_setup, target=lambda c: "doomed"),
    Case("import", lambda c: c.rt.sessions.import_document(c.memo["doc"], session_id=c.memo["sid"], timeout=LIMIT),
         _check_import, ("Failed to import session '{sid}'",), _import_setup, target=lambda c: c.memo["sid"]),
    # Resume changes no file; its store write is the thread's creation (its errors name the store).
    Case("resume", lambda c: c.rt.sessions.resume(SESSION), _check_resume,
         ("Failed to load session 'kept'", "Failed to "), _idle_with_session),
    # Restore: the safety session's file and the thread's change in one store write (SessionService.restore).
    Case("restore", lambda c: c.rt.restore_thread(c.thread_id, SESSION, timeout=LIMIT, claim=claim(f"key {c.n}")),
         _check_restore_claimed,
         ("Failed to load session 'kept'", "Failed to restore thread '"),
         _restore_setup),
]


def _arm(kind: str) -> tuple[str, dict[str, Any]]:
    """A KINDS entry -> the seam's kind and its arm() options."""
    if kind.endswith("+rollback"):
        return kind.split("+")[0], {"rollback": True}
    return kind, {"rollback": False}


def store_kinds(kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The kinds that reach sessions kept in the store (session_storage="store"): SQLite's; a session
    change there makes no file operation to fail."""
    return tuple(kind for kind in kinds if kind.startswith("sqlite"))


async def run_every_step(tmp_path: Path, case: Case, kinds: tuple[str, ...]) -> dict[str, int]:
    data_dir, plan = tmp_path / "data", FaultPlan()
    counts: dict[str, int] = {}
    async with faulty_runtime(data_dir, plan) as rt:
        ctx = Ctx(rt, data_dir, await thread_with_history(rt, "/think weighing it\nfirst question",
                                                            "second question"))
        for kind in kinds:
            seam_kind, options = _arm(kind)
            outcomes = {"changed": 0, "unchanged": 0}
            before_box: list[State] = []

            async def action() -> Any:
                # The setup's own I/O is not the operation's: count (and fail) from the action on.
                fail_at = plan.fail_at
                plan.disarm()
                ctx.n += 1
                if case.setup:
                    await case.setup(ctx)
                await settle(rt)
                before_box[:] = [capture(data_dir)]
                plan.arm(fail_at, seam_kind, rollback=options["rollback"])
                return await case.action(ctx)

            async def judge(run: FaultRun) -> None:
                where = f"{case.name}, {kind} at step k={run.k} ({run.fired or 'not reached'})"
                try:
                    await _judge(ctx, case, kind, run, before_box[0], outcomes)
                except AssertionError as exc:
                    raise AssertionError(f"{where}: {exc}") from exc

            n = await every_step(plan, action, seam_kind, judge, rollback=options["rollback"])
            assert n >= 1, f"{case.name}: {kind} reached no step: the seam is not counting"
            assert outcomes["unchanged"] >= 1 and outcomes["changed"] >= 1, outcomes
            counts[kind] = n
    print(f"\n{case.name}: N per kind {counts}")
    return counts


async def _judge(ctx: Ctx, case: Case, kind: str, run: FaultRun, before: State, outcomes: dict[str, int]) -> None:
    rt, data_dir = ctx.rt, ctx.data_dir
    await settle(rt)
    mid = capture(data_dir)
    changed = case.check(before, mid, ctx, run.value)
    outcomes["changed" if changed else "unchanged"] += 1
    # The answer matches the durable outcome: success means it happened, an error that it did not.
    assert (changed is not None) == (run.error is None), f"answered {run.error!r}, changed {changed}"
    if run.error is not None:
        assert run.fired is not None, f"failed without a fault: {run.error!r}"
        assert isinstance(run.error, StorageError), repr(run.error)
        assert isinstance(run.error, StorageFull) == (kind.split("+")[0] in FULL_KINDS), repr(run.error)
        prefixes = tuple(p.format(**ctx.memo) for p in case.errors)
        assert run.error.message.startswith(prefixes), run.error.message
    # A fault after the COMMIT (dropping the undo file) cannot undo a committed change: the undo file
    # stays until the session's next change. Nothing else may be left.
    if mid.temp_files:
        assert run.error is None and run.fired == "file:discard", mid.temp_files
        assert all(name.startswith(f".{changed}.") for name in mid.temp_files), mid.temp_files
    # The service still works: a clean save right after gets the very next revision (and settles
    # whatever the run left for that session first).
    probe = changed or case.target(ctx)
    current = doc_of(mid, probe)
    saved = await rt.sessions.save(thread_id=ctx.thread_id, session_id=probe, timeout=LIMIT)
    assert saved["session"]["metadata"]["revision"] == (current["metadata"]["revision"] + 1 if current else 1)
    await check_invariants(rt, data_dir)


SHORT_KINDS = {  # make test: one file kind and one SQLite kind per operation, rotating over the kinds
    "PUT create": ("enospc", "sqlite_full"),
    "PUT update": ("eio", "sqlite_full+rollback"),
    "PUT mid-turn": ("erofs", "sqlite_ioerr"),
    "POST rebuild": ("eio", "sqlite_full"),
    "PATCH": ("enospc", "sqlite_ioerr"),
    "DELETE": ("erofs", "sqlite_full"),
    "resume": ("eio", "sqlite_full+rollback"),
    "import": KINDS,  # every kind: the newest operation
    "restore": ("enospc", "eio", "erofs", "sqlite_full+rollback"),
}


# ---- kill -9 at every step --------------------------------------------------------------------


HISTORY_EVENTS = ("session.saved", "thread.started", "thread.restored", "thread.rewound", "thread.forked")


def _durable(state: State) -> tuple[Any, ...]:
    """What a restart must find either before or after the operation, never in between: files and index,
    each thread's session link and base messages, which turns are rewound, and the history events."""
    return (state.files, state.sessions,
            {tid: (t["session_id"], t["base_messages"], t["latest_turn_id"]) for tid, t in state.threads.items()},
            {tid: t["rewound"] for tid, t in state.turns.items()},
            [state.event_counts.get(name, 0) for name in HISTORY_EVENTS])


async def run_every_crash(tmp_path: Path, case: Case) -> dict[str, int]:
    data_dir, plan = tmp_path / "data", FaultPlan()
    crash = CrashAt(plan, data_dir, tmp_path)
    seen = {"before": 0, "after": 0}
    async with faulty_runtime(data_dir, plan) as rt:
        ctx = Ctx(rt, data_dir, await thread_with_history(rt, "hello there"))
        k, n = 1, None
        while n is None or k <= n + 1:  # n + 1: killed right after the operation returned
            ctx.n += 1
            if case.setup:
                await case.setup(ctx)
            await settle(rt)
            before = capture(data_dir)
            crash.reset(at=k)
            plan.arm(None, "eio")
            value = await case.action(ctx)
            plan.disarm()
            n = crash.total
            if k > n:
                crash.after_the_end(k)
            await settle(rt)
            after = capture(data_dir)
            assert case.check(before, after, ctx, value) is not None
            copy = crash.copy_path(k)
            async with open_runtime(copy) as restarted:
                # No undo or temp file, index == files; the thread's engine, restored, agrees with the store.
                found = await check_invariants(restarted, copy, (ctx.thread_id,))
            outcome = [name for name, state in (("before", before), ("after", after))
                       if _durable(found) == _durable(state)]
            assert outcome, f"{case.name}: a kill -9 before step {k} ({crash.where}) of {n} restarts in between"
            seen[outcome[0]] += 1
            shutil.rmtree(copy)
            k += 1
    assert seen["before"] >= 1 and seen["after"] >= 1, seen
    print(f"\n{case.name}: kill -9 before each of {n} steps and after the last: {seen}")
    return seen


CRASH_SHORT = ("PUT create", "PUT update", "PATCH", "DELETE", "import", "restore")


# History changes that touch no file, for the kill -9 loop only (their SQLite faults are in
# tests/faults/test_engine_faults.py): one store write each, so a kill finds all of it or none.
async def _rewind_setup(ctx: Ctx) -> None:
    await ensure_idle(ctx)
    while len(turns := (await ctx.rt.get_thread(ctx.thread_id))["turns"]) < 3:
        await ctx.rt.start_turn(ctx.thread_id, f"turn {ctx.n}.{len(turns)}", timeout=LIMIT)
        await ctx.rt.get_session_snapshot(ctx.thread_id, wait_for_idle=True, timeout=LIMIT)
    ctx.memo["anchor"] = turns[-2]["id"]


def _check_rewind(before: State, after: State, ctx: Ctx, value: Any) -> str | None:
    flipped = sorted(t for t, row in after.turns.items() if row["rewound"] and not before.turns[t]["rewound"])
    if not _events(before, after, "thread.rewound"):
        assert flipped == [] and after.threads == before.threads
        return None
    assert flipped == sorted(value["removed_turn_ids"]) and len(flipped) == 2
    return ctx.thread_id


async def _doomed_setup(ctx: Ctx) -> None:
    ctx.memo["doomed"] = await thread_with_history(ctx.rt, f"doomed {ctx.n}")


def _check_delete_thread(before: State, after: State, ctx: Ctx, value: Any) -> str | None:
    doomed = ctx.memo["doomed"]
    if doomed in after.threads:
        assert after.threads == before.threads and after.turns == before.turns
        return None
    assert not [t for t in after.turns.values() if t["thread_id"] == doomed]
    assert doomed not in after.thread_events and after.max_seq > before.max_seq
    return doomed


CRASH_ONLY = [
    Case("rewind", lambda c: c.rt.rewind_thread(c.thread_id, c.memo["anchor"], timeout=LIMIT), _check_rewind, (),
         _rewind_setup),
    Case("delete thread", lambda c: c.rt.delete_thread(c.memo["doomed"], timeout=LIMIT), _check_delete_thread, (),
         _doomed_setup),
]
