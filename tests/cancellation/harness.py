"""Cancel an operation at its k-th scheduling step, and check the runtime's invariants afterwards.

``StepCanceller`` is a trio Instrument that counts ``before_task_step`` for one task and cancels that
task's scope when the count reaches k. Running an operation once uncancelled gives N; running it again
for every k in 1..N proves the wait/commit split at every point where a timeout, a client disconnect
or a shutdown could land.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio
import trio.testing

from runtime import Runtime
from runtime.errors import RuntimeFailure
from runtime.transcript import build_messages


class StepCanceller(trio.abc.Instrument):
    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.steps = 0
        self.cancel_at: int | None = None
        self.scope: trio.CancelScope | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1
            if self.steps == self.cancel_at and self.scope is not None:
                self.scope.cancel(reason=f"cancelled at step {self.steps}")


@dataclasses.dataclass
class RunResult:
    steps: int
    value: Any = None
    error: RuntimeFailure | None = None
    cancelled: bool = False


async def run_op(canceller: StepCanceller, action: Callable[[], Awaitable[Any]],
                 cancel_at: int | None = None) -> RunResult:
    """Run ``action`` in a task of its own, cancelled at its ``cancel_at``-th step (None: never)."""
    result = RunResult(steps=0)
    scope = trio.CancelScope()

    async def body() -> None:
        canceller.task = trio.lowlevel.current_task()
        canceller.steps = 0
        canceller.cancel_at = cancel_at
        canceller.scope = scope
        with scope:
            try:
                result.value = await action()
            except RuntimeFailure as exc:
                result.error = exc
        result.cancelled = scope.cancelled_caught
        result.steps = canceller.steps
        canceller.task = None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(body)
    return result


# ---- state capture -------------------------------------------------------------------------


@dataclasses.dataclass
class State:
    files: dict[str, bytes]
    temp_files: list[str]
    threads: dict[str, dict[str, Any]]
    turns: dict[str, dict[str, Any]]
    items: dict[str, dict[str, Any]]
    sessions: dict[str, dict[str, Any]]
    event_counts: dict[str, int]


def capture(data_dir: Path) -> State:
    """Everything durable, read with a separate connection (what a restart would see)."""
    sessions_dir = data_dir / "sessions"
    files, temps = {}, []
    for entry in sorted(sessions_dir.iterdir()):
        if entry.name.startswith("."):
            temps.append(entry.name)
        else:
            files[entry.name] = entry.read_bytes()
    conn = sqlite3.connect(data_dir / "runtime.sqlite3")
    conn.row_factory = sqlite3.Row
    try:
        def table(name: str) -> dict[str, dict[str, Any]]:
            return {row["id"]: dict(row) for row in conn.execute(f"SELECT * FROM {name}")}

        counts = {row[0]: row[1] for row in conn.execute("SELECT event, COUNT(*) FROM events GROUP BY event")}
        return State(files, temps, table("threads"), table("turns"), table("items"), table("sessions"), counts)
    finally:
        conn.close()


# Tasks an operation may legitimately add or end: a turn it started or interrupted; and hypercorn's
# per-connection tasks, which live as long as the client's socket (or until hypercorn's 5 s keep-alive
# timeout closes an idle one). The app's request handlers run under those connection tasks, so they are
# not counted here: tests/reliability/support.app_tasks counts them.
LEGITIMATE = ("Engine._run_turn", "serve_listeners._run_handler")


def task_count() -> int:
    """Tasks alive in the whole run, minus turn tasks (starting or ending one is an op's purpose)."""

    def walk(task: trio.lowlevel.Task) -> int:
        if task.name.endswith(LEGITIMATE):
            return 0
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return walk(trio.lowlevel.current_root_task())


async def settle(rt: Runtime) -> None:
    """Wait until every queued write committed and every task is blocked (no sleeps involved)."""
    await rt.store.write()
    await trio.testing.wait_all_tasks_blocked(cushion=0.002)
    await rt.store.write()
    await trio.testing.wait_all_tasks_blocked(cushion=0.002)


async def check_invariants(rt: Runtime, data_dir: Path) -> State:
    """What must hold after any operation, cancelled or not."""
    await settle(rt)
    state = capture(data_dir)
    assert state.temp_files == [], f"temp files left behind: {state.temp_files}"
    assert rt.sessions._locks == {}, "a per-session lock outlived its operation"
    on_disk = {name[:-5] for name in state.files}
    assert on_disk == set(state.sessions), f"index {set(state.sessions)} != files {on_disk}"
    for name, data in state.files.items():
        doc = json.loads(data)
        assert state.sessions[name[:-5]]["revision"] == doc["metadata"]["revision"], name
    for thread in state.threads.values():
        if thread["session_id"] is not None:
            assert thread["session_id"] in on_disk, f"thread {thread['id']} links a missing session"
    for thread_id, thread in state.threads.items():
        engine = rt.manager.engine(thread_id)
        active = [t for t in state.turns.values() if t["thread_id"] == thread_id and t["status"] == "in_progress"]
        if engine is None:
            continue
        assert (engine.active is not None) == bool(active), f"engine and store disagree on {thread_id}"
        snapshot = await rt.get_session_snapshot(thread_id, timeout=10)
        if not snapshot.turn_in_progress:
            items = sorted((i for i in state.items.values() if i["thread_id"] == thread_id), key=lambda i: i["ord"])
            for item in items:
                item["metadata"] = json.loads(item["metadata"]) if item["metadata"] else None
            base = json.loads(thread["base_messages"]) if thread["base_messages"] else []
            assert list(snapshot.messages) == build_messages(base, items), "engine messages diverged from store"
            tokens = thread["base_tokens"] + sum((t["input_tokens"] or 0) + (t["output_tokens"] or 0)
                                                 for t in state.turns.values() if t["thread_id"] == thread_id)
            assert snapshot.total_tokens == tokens
    return state

