"""Cancel an operation at the k-th scheduling step of one of three targets, and check the runtime's
invariants afterwards.

``StepCanceller`` is a trio Instrument that counts ``before_task_step`` for the tasks a target picks and
cancels that target's scope when the count reaches k (and records that it did: a k past the last step
would otherwise pass without cancelling anything). Running an operation once uncancelled gives N;
running it again for every k in 1..N proves the wait/commit split at every point where a timeout, a
client disconnect, an engine's death or a shutdown could land. The targets:

- ``requester``: the task that called the operation (a timeout, a client disconnect);
- ``engine``: any task of the thread's engine (its op loop, its turn, its reply helpers); the cancel is
  the engine's nursery scope, which is what an engine crash or a stop from outside does. The engine goes;
  the next request restores a successor from the store, and the two must agree;
- ``writer``: the store's writer task. Trio cancels a task only through a scope around it, and the one
  around the writer is the whole runtime's, so this is a shutdown by cancellation (of the server task)
  landing at that step of the writer. The writer is shielded: everything queued before must commit, the
  runtime closes cleanly, and a runtime reopened on the same files finds nothing to repair.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio
import trio.testing

from runtime import Runtime, RuntimeConfig
from runtime.errors import RuntimeFailure
from runtime.idempotency import Claim
from runtime.models.base import ModelRequest, TextDelta
from runtime.models.scripted import ScriptedModel
from runtime.sessions.undo import wait_for_undo_files
from runtime.transcript import build_messages
from tests import support

# Real-clock bound on any one wait of the harness: a hang fails the case instead of the suite.
LIMIT = 20.0
TARGETS = ("requester", "engine", "writer")


class StepCanceller(trio.abc.Instrument):
    """Counts the steps of the tasks ``picks`` accepts; at the ``cancel_at``-th it calls ``cancel`` (which
    returns the scope it cancelled) once, and records the step in ``fired_at``."""

    def __init__(self) -> None:
        self.picks: Callable[[trio.lowlevel.Task], bool] | None = None
        self.cancel: Callable[[str], trio.CancelScope | None] | None = None
        self.cancel_at: int | None = None
        self.steps = 0
        self.fired_at: int | None = None
        self.cancelled: trio.CancelScope | None = None

    def arm(self, picks: Callable[[trio.lowlevel.Task], bool], cancel: Callable[[str], trio.CancelScope | None],
            cancel_at: int | None) -> None:
        self.picks, self.cancel, self.cancel_at = picks, cancel, cancel_at
        self.steps, self.fired_at, self.cancelled = 0, None, None

    def disarm(self) -> None:
        self.picks = self.cancel = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.picks is None or not self.picks(task):
            return
        self.steps += 1
        if self.steps == self.cancel_at and self.fired_at is None:
            assert self.cancel is not None
            self.fired_at = self.steps
            self.cancelled = self.cancel(f"harness: cancelled at step {self.steps}")


def descends_from(task: trio.lowlevel.Task, root: trio.lowlevel.Task) -> bool:
    current: trio.lowlevel.Task | None = task
    while current is not None:
        if current is root:
            return True
        nursery = current.parent_nursery
        current = nursery.parent_task if nursery is not None else None
    return False


def find_task(suffix: str) -> trio.lowlevel.Task:
    """The one live task whose name ends with ``suffix``."""

    def walk(task: trio.lowlevel.Task):
        yield task
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                yield from walk(child)

    [found] = [t for t in walk(trio.lowlevel.current_root_task()) if t.name.endswith(suffix)]
    return found


# ---- the model and the runtime under test ---------------------------------------------------

HELD = "/held"
PARTIAL = "Partial answer so far. "


class HeldModel:
    """The scripted model, plus one directive of the harness's own: a prompt whose first line is ``/held``
    streams PARTIAL at once, waits for ``release_now()`` (or an interrupt), then answers the rest of the
    prompt as the scripted model does. So a running turn always has streamed text that is in no finished
    turn: a snapshot that leaked it would differ from the store's finished turns."""

    name = "held-scripted"

    def __init__(self) -> None:
        self.inner = ScriptedModel()
        self._release = trio.Event()

    def release_now(self) -> None:
        self._release.set()
        self._release = trio.Event()

    async def stream(self, request: ModelRequest):
        # A turn carried on after a restart continues without a prompt (``prompt=None``).
        first, _, rest = (request.prompt or "").partition("\n")
        if first.strip() == HELD:
            release = self._release
            yield TextDelta(PARTIAL)
            await release.wait()
            request = dataclasses.replace(request, prompt=rest)
        async for event in self.inner.stream(request):
            yield event


class ReleaseWhenParked(trio.abc.Instrument):
    """Releases the held turn of ``thread_id`` in the step in which a ``wait_for_idle`` snapshot request
    (whose requester still waits) is parked on its engine: a wait-for-idle save then always waits for a
    turn end, at the same point of every run, without a timer."""

    def __init__(self, model: HeldModel) -> None:
        self.model = model
        self.rt: Runtime | None = None
        self.thread_id: str | None = None

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.rt is None:
            return
        engine = self.rt.manager.engine(self.thread_id)
        if engine is not None and engine.active is not None and any(
                w.reply is not None and w.reply.statistics().open_receive_channels for w in engine._idle_waiters):
            self.rt = None
            self.model.release_now()


class Server:
    """A Runtime in a task of its own, as ``serve`` runs it: operations run in ``nursery`` inside it, so
    cancelling ``scope`` cancels the whole server (requesters, engines, and the scope around the writer)."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.scope = trio.CancelScope()
        self.closed = trio.Event()
        self.rt: Runtime | None = None
        self.nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                async with Runtime.open(self.config) as rt:
                    async with trio.open_nursery() as nursery:
                        self.rt, self.nursery = rt, nursery
                        task_status.started(self)
                        await trio.sleep_forever()
        finally:
            self.closed.set()

    def cancel(self, reason: str) -> trio.CancelScope:
        self.scope.cancel(reason=reason)
        return self.scope

    async def close(self) -> None:
        self.scope.cancel(reason="harness: closing the runtime")
        with trio.fail_after(LIMIT):
            await self.closed.wait()


async def start_server(nursery: trio.Nursery, config: RuntimeConfig) -> Server:
    return await nursery.start(Server(config).run)


# ---- running one operation ------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    steps: int = 0
    value: Any = None
    error: RuntimeFailure | None = None
    # The operation did not finish: its own scope, or the server's, was cancelled.
    cancelled: bool = False
    fired_at: int | None = None
    cancelled_scope: trio.CancelScope | None = None
    engine: Any = None  # the engine whose nursery was cancelled (engine target)


async def run_op(server: Server, canceller: StepCanceller, target: str, thread_id: str,
                 action: Callable[[], Awaitable[Any]], cancel_at: int | None = None) -> RunResult:
    """Run ``action`` in a requester task inside the server, cancelling ``target`` at its ``cancel_at``-th
    step (None: never). Returns once everything the operation set going is done: for the writer target,
    when the cancelled runtime has closed."""
    rt = server.rt
    assert rt is not None and server.nursery is not None
    result = RunResult()
    scope = trio.CancelScope()
    done = trio.Event()

    def cancel_engine(reason: str) -> trio.CancelScope | None:
        engine = rt.manager.engine(thread_id)
        if engine is None or engine._nursery is None:
            return None
        result.engine = engine
        engine._nursery.cancel_scope.cancel(reason=reason)
        return engine._nursery.cancel_scope

    def engine_tasks(task: trio.lowlevel.Task) -> bool:
        engine = rt.manager.engine(thread_id)
        return engine is not None and engine._nursery is not None and descends_from(
            task, engine._nursery.parent_task)

    async def requester() -> None:
        if target == "requester":
            me = trio.lowlevel.current_task()

            def cancel_me(reason: str) -> trio.CancelScope:
                scope.cancel(reason=reason)
                return scope

            canceller.arm(lambda task: task is me, cancel_me, cancel_at)
        try:
            with scope:
                try:
                    # Step 1 is the step in which the action starts: a cancel before its first checkpoint.
                    await trio.lowlevel.checkpoint()
                    result.value = await action()
                except RuntimeFailure as exc:
                    result.error = exc
            result.cancelled = scope.cancelled_caught
        except trio.Cancelled:
            result.cancelled = True  # the server's scope: a shutdown
            raise
        finally:
            if target == "requester":
                canceller.disarm()
            done.set()

    if target == "engine":
        canceller.arm(engine_tasks, cancel_engine, cancel_at)
    elif target == "writer":
        writer = find_task("Store._writer")
        canceller.arm(lambda task: task is writer, server.cancel, cancel_at)
    try:
        server.nursery.start_soon(requester)
        with trio.fail_after(LIMIT):
            await done.wait()
            if target == "engine":
                await settle(rt)
            elif target == "writer":
                await quiesce(server)
                if canceller.fired_at is not None:
                    await server.closed.wait()
    finally:
        result.steps, result.fired_at, result.cancelled_scope = canceller.steps, canceller.fired_at, canceller.cancelled
        canceller.disarm()
    return result


# ---- idempotency records --------------------------------------------------------------------


def claim(key: str) -> Claim:
    """A request's Idempotency-Key claim as the routes make it; the answer is stored as JSON."""
    return Claim(key=key, fingerprint=f"fingerprint of {key}", status=200,
                 encode=lambda result: json.dumps(result, sort_keys=True, default=str).encode())


def assert_claimed(before: "State", after: "State", key: str, changed: bool, value: Any = None) -> None:
    """The change and its idempotency record committed together or not at all; a caller that got the
    answer gets the stored one."""
    added = set(after.idempotency) - set(before.idempotency)
    assert added == ({key} if changed else set()), (key, changed, added)
    assert {k: after.idempotency[k] for k in before.idempotency} == before.idempotency
    if changed and value is not None:
        assert json.loads(after.idempotency[key]) == json.loads(json.dumps(value, sort_keys=True, default=str))


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
    # turn id -> {"turn.started": n, "turn.completed": n}
    turn_events: dict[str, dict[str, int]]
    # The highest event seq ever handed out (sqlite_sequence): it only grows, even when a delete removes
    # the events that had the highest seqs, so no seq is reused.
    max_seq: int = 0
    # thread id -> events stored for it
    thread_events: dict[str, int] = dataclasses.field(default_factory=dict)
    # Idempotency-Key -> the stored answer's body (written in the change's own transaction)
    idempotency: dict[str, bytes] = dataclasses.field(default_factory=dict)
    # approval id -> its row (a pending one survives a clean stop as it is)
    approvals: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def durable(self) -> tuple[Any, ...]:
        """What a restart must find unchanged after a clean stop."""
        return (self.files, self.threads, self.turns, self.items, self.sessions, self.event_counts, self.max_seq,
                self.idempotency, self.approvals)


def capture(data_dir: Path) -> State:
    """Everything durable, read with a separate connection (what a restart would see). A change answers
    before its undo file is dropped (runtime/sessions/undo.py): that removal is waited for first."""
    wait_for_undo_files()
    sessions_dir = data_dir / "sessions"
    files, temps = {}, []
    for entry in sorted(sessions_dir.iterdir()) if sessions_dir.exists() else ():  # none: sessions in the store
        if entry.name.startswith("."):
            temps.append(entry.name)
        else:
            files[entry.name] = entry.read_bytes()
    with support.store_connection(data_dir) as conn:
        if not support.on_postgresql():
            conn.row_factory = sqlite3.Row
        # Documents kept in the store (session_storage="store") count as the session's file.
        files.update({f"{row[0]}.json": bytes(row[1]) for row in conn.execute("SELECT id, document FROM session_docs")})
        def table(name: str) -> dict[str, dict[str, Any]]:
            return {row["id"]: dict(row) for row in conn.execute(f"SELECT * FROM {name}")}

        counts = {row[0]: row[1] for row in conn.execute("SELECT event, COUNT(*) FROM events GROUP BY event")}
        turn_events: dict[str, dict[str, int]] = {}
        for row in conn.execute("SELECT turn_id, event, COUNT(*) FROM events WHERE event IN"
                                " ('turn.started', 'turn.completed') GROUP BY turn_id, event"):
            turn_events.setdefault(row[0], {})[row[1]] = row[2]
        row = conn.execute("SELECT COALESCE(pg_sequence_last_value('events_seq_seq'), 0)" if support.on_postgresql()
                           else "SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return State(files, temps, table("threads"), table("turns"), table("items"), table("sessions"), counts,
                     turn_events, row[0] if row else 0,
                     dict(conn.execute("SELECT thread_id, COUNT(*) FROM events GROUP BY thread_id").fetchall()),
                     dict(conn.execute("SELECT key, body FROM idempotency").fetchall()), table("approvals"))


# Tasks an operation may legitimately add or end: a turn it started or interrupted; and hypercorn's
# per-connection tasks, which live as long as the client's socket (or until hypercorn's 5 s keep-alive
# timeout closes an idle one). The app's request handlers run under those connection tasks, so they are
# not counted here: tests/reliability/support.app_tasks counts them.
LEGITIMATE = ("Engine._run_turn", "serve_listeners._run_handler")


def task_count(root: trio.lowlevel.Task | None = None) -> int:
    """Tasks alive in the whole run (or under ``root``), minus turn tasks (starting or ending one is an
    op's purpose)."""

    def walk(task: trio.lowlevel.Task) -> int:
        if task.name.endswith(LEGITIMATE):
            return 0
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return walk(root or trio.lowlevel.current_root_task())


def engine_task_count(rt: Runtime, thread_id: str) -> int:
    """The tasks of the thread's live engine (none: 0): what a thread delete legitimately ends."""
    engine = rt.manager.engine(thread_id)
    return task_count(engine._nursery.parent_task) if engine is not None and engine._nursery is not None else 0


async def ensure_idle(ctx: Any) -> None:
    """Case setup shared by the cancel and fault suites: interrupt the running turn of ``ctx.thread_id``
    (``ctx`` is any suite's context with ``rt`` and ``thread_id``), so the operation meets an idle thread."""
    engine = ctx.rt.manager.engine(ctx.thread_id)
    if engine is not None and engine.active is not None:
        await ctx.rt.interrupt_turn(ctx.thread_id, engine.active.id, timeout=10)


async def settle(rt: Runtime) -> None:
    """Wait until every queued write committed and every task is blocked (no sleeps involved).

    A task waiting for a worker thread counts as blocked, so "every task blocked" alone can come while
    the writer still commits (an engine op a cancelled requester left behind may be one write into a
    chain of them): each round also waits until the writer waits for work and no worker thread runs."""
    limiters = support.worker_limiters(rt)
    for _ in range(2):
        await rt.store.write()
        while True:
            await trio.testing.wait_all_tasks_blocked(cushion=0.002)
            stats = rt.store._write_rx.statistics()
            if (stats.tasks_waiting_receive and not stats.current_buffer_used
                    and not any(limiter.borrowed_tokens for limiter in limiters)):
                break


async def quiesce(server: Server) -> None:
    """``settle`` without writing anything (an empty write would add writer steps of its own): wait until
    every task is blocked, no worker thread runs and the writer waits for work; or the server closed."""
    rt = server.rt
    assert rt is not None
    limiters = support.worker_limiters(rt)
    while not server.closed.is_set():
        await trio.testing.wait_all_tasks_blocked(cushion=0.002)
        stats = rt.store._write_rx.statistics()
        if (stats.tasks_waiting_receive and not stats.current_buffer_used
                and not any(limiter.borrowed_tokens for limiter in limiters)):
            return


# ---- invariants ----------------------------------------------------------------------------

FINISHED = ("completed", "failed", "interrupted")


def finished_turn_ids(state: State, thread_id: str) -> set[str]:
    """The finished turns of the thread's live history (a rewound turn stays stored but is out of it)."""
    return {tid for tid, t in state.turns.items()
            if t["thread_id"] == thread_id and t["status"] in FINISHED and not t["rewound"]}


def live_turns(state: State, thread_id: str) -> list[dict[str, Any]]:
    """The thread's live (not rewound) turns in order, finished or not."""
    return sorted((t for t in state.turns.values() if t["thread_id"] == thread_id and not t["rewound"]),
                  key=lambda t: t["ord"])


def rebuild(state: State, thread_id: str, turn_ids: set[str]) -> tuple[list[dict[str, Any]], int]:
    """The messages and total tokens of ``thread_id`` made from the stored items of ``turn_ids`` only."""
    thread = state.threads[thread_id]
    items = sorted((dict(i) for i in state.items.values() if i["thread_id"] == thread_id and i["turn_id"] in turn_ids),
                   key=lambda i: i["ord"])
    for item in items:
        item["metadata"] = json.loads(item["metadata"]) if item["metadata"] else None
    base = json.loads(thread["base_messages"]) if thread["base_messages"] else []
    tokens = thread["base_tokens"] + sum((state.turns[t]["input_tokens"] or 0) + (state.turns[t]["output_tokens"] or 0)
                                         for t in turn_ids)
    return build_messages(base, items), tokens


def check_stored(state: State) -> None:
    """What must hold of the files and the database alone: files and index agree, links resolve, and no
    turn is half-recorded (a finished turn has no open item and exactly one ``turn.completed``)."""
    assert state.temp_files == [], f"temp files left behind: {state.temp_files}"
    on_disk = {name[:-5] for name in state.files}
    assert on_disk == set(state.sessions), f"index {set(state.sessions)} != files {on_disk}"
    for name, data in state.files.items():
        doc = json.loads(data)
        assert state.sessions[name[:-5]]["revision"] == doc["metadata"]["revision"], name
    for thread in state.threads.values():
        if thread["session_id"] is not None:
            assert thread["session_id"] in on_disk, f"thread {thread['id']} links a missing session"
    for thread_id, thread in state.threads.items():
        # A rewind moves latest_turn_id back to the last live turn: never a rewound or foreign turn.
        latest = state.turns.get(thread["latest_turn_id"]) if thread["latest_turn_id"] is not None else None
        assert thread["latest_turn_id"] is None or (
            latest is not None and latest["thread_id"] == thread_id and not latest["rewound"]), (
            f"thread {thread_id} names latest turn {thread['latest_turn_id']}: {latest}")
    for turn_id, turn in state.turns.items():
        events = state.turn_events.get(turn_id, {})
        assert turn["thread_id"] in state.threads, f"turn {turn_id} outlived its thread"
        if turn["rewound"]:
            assert turn["status"] in FINISHED, f"turn {turn_id} was rewound while {turn['status']}"
        if turn["status"] in FINISHED:
            open_items = [i["id"] for i in state.items.values() if i["turn_id"] == turn_id
                          and i["status"] in ("queued", "in_progress")]
            assert open_items == [], f"turn {turn_id} is {turn['status']} with open items {open_items}"
            if events.get("turn.started"):
                assert events.get("turn.completed") == 1, f"turn {turn_id} is {turn['status']}: events {events}"
        else:
            assert not events.get("turn.completed"), f"turn {turn_id} is {turn['status']}: events {events}"
    for approval_id, approval in state.approvals.items():
        # A pending approval is one its turn waits for (one write sets both); a resolved one says how.
        turn, item = state.turns.get(approval["turn_id"]), state.items.get(approval["item_id"])
        assert turn is not None and item is not None, f"approval {approval_id} outlived its turn or item"
        if approval["status"] == "pending":
            assert (turn["status"], item["status"]) == ("awaiting_approval", "awaiting_approval"), (
                f"approval {approval_id} is pending, its turn {turn['status']}, its item {item['status']}")
            assert approval["resolved_at"] is None and approval["decided_by"] is None
        else:
            assert approval["resolved_at"] is not None and approval["decided_by"] is not None, approval


async def check_invariants(rt: Runtime, data_dir: Path, thread_ids: tuple[str, ...] = ()) -> State:
    """What must hold after any operation, cancelled or not. Each thread with a live engine, and each of
    ``thread_ids`` (its engine restored from the store if it is gone), must agree with the store: its
    snapshot, taken while a turn runs or not, equals the rebuild from the finished turns only."""
    await settle(rt)
    state = capture(data_dir)
    check_stored(state)
    assert rt.sessions._locks == {}, "a per-session lock outlived its operation"
    for thread_id in state.threads:
        engine = rt.manager.engine(thread_id)
        active = [t for t, row in state.turns.items() if row["thread_id"] == thread_id and row["status"] not in FINISHED]
        if engine is None:
            assert active == [], f"no engine runs thread {thread_id}, but the store has turns {active} running"
            if thread_id not in thread_ids:
                continue
        else:
            assert ([engine.active.id] if engine.active else []) == active, (
                f"engine and store disagree on {thread_id}: engine runs {engine.active and engine.active.id}, store "
                f"{[(t, state.turns[t]['status'], state.turns[t]['input_summary'], state.turns[t]['retry_of']) for t in active]}"
                f" (events {[state.turn_events.get(t) for t in active]})")
        snapshot = await rt.get_session_snapshot(thread_id, timeout=LIMIT)
        assert snapshot.active_turn_id == (active[0] if active else None)
        assert snapshot.turn_in_progress == bool(active)
        messages, tokens = rebuild(state, thread_id, finished_turn_ids(state, thread_id))
        assert list(snapshot.messages) == messages, (
            f"engine messages of {thread_id} differ from the store's finished turns"
            + (" while a turn runs" if active else ""))
        assert snapshot.total_tokens == tokens
        row = state.threads[thread_id]
        assert (snapshot.title, snapshot.model, snapshot.mode, snapshot.system_prompt, snapshot.workspace) == (
            row["title"], row["model"], row["mode"], row["system_prompt"], row["workspace"])
    return state
