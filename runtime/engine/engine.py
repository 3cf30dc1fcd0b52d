"""The engine: one long-lived trio task per live thread that owns the thread's state.

Only the engine mutates a thread's messages, usage, model, mode and system prompt. It reads ops from
its inbox and handles each one synchronously: it changes its state and queues the matching store
writes in the same step (``Store.submit`` never awaits), so state and log can never be reordered.
Replies that must be read-your-writes consistent are sent by a small helper task once the writes
committed, and a turn streams in a child task; so the op loop itself never waits on I/O and keeps
answering snapshots, steers and interrupts while a turn runs.

The store is the truth. Every write goes through the engine's ``WriteLane``, so the store holds a
prefix of them; when one fails (a full disk, an I/O error) the engine's memory has run ahead of the
store, so the engine retires at once: its running turn ends ``failed`` with the storage error (written
by one idempotent write that does not depend on the lost ones, retried by the manager until it commits),
ops it had not handled go to a successor restored from the store, and nothing is answered from the
stale memory meanwhile. A snapshot waits until the last write that moved what it shows has committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import sqlite3
from typing import Any, Callable

import outcome
import trio

from . import history, ops
from .handle import EngineEvicted
from ..clock import new_id, seconds_until, utc_after, utc_now
from ..config import RuntimeConfig
from ..errors import (
    Conflict, EngineTimeout, EngineUnavailable, InvalidInput, LeaseLost, RuntimeFailure, StorageError,
)
from ..idempotency import record_claim
from ..models.base import (
    ItemBreak, ModelBackend, ModelError, ModelRequest, ReasoningDelta, Retrying, TextDelta, ToolCall, ToolOutcome,
    ToolResult, Truncated, Usage, ValidText,
)
from ..store import EventDraft, Store, WithEvents, WriteLane, WriteRequest, records
from ..transcript import apply_items, build_messages, preview as _preview, summarize

log = logging.getLogger(__name__)

UPDATABLE_FIELDS = ("archived", "model", "mode", "title", "system_prompt", "approval_policy")
# The error of a turn whose engine was cancelled from outside without a stop reason (the runtime around
# it cancelled): the turn ends interrupted, as at a shutdown; "engine crashed" is kept for real crashes.
STOPPED = "engine stopped"
# An engine still handling an op when its idle deadline comes (a history change waiting for its write, which
# is bounded by final_write_seconds) is asked again this much later (at most one idle period): the deadline
# counts from the op's arrival, as it did when the op loop's own timer fired right after a long op.
BUSY_RECHECK_SECONDS = 1.0


@dataclasses.dataclass(eq=False)
class _Item:
    id: str
    kind: str
    ord: int
    started_at: str
    status: str = "in_progress"
    parts: list[str] = dataclasses.field(default_factory=list)
    metadata: dict[str, Any] | None = None

    def record(self, turn_id: str, ended_at: str | None = None) -> dict[str, Any]:
        text = "".join(self.parts)
        return {"id": self.id, "turn_id": turn_id, "kind": self.kind, "status": self.status,
                "summary": _preview(text), "detail": text, "metadata": self.metadata,
                "started_at": self.started_at, "ended_at": ended_at}


@dataclasses.dataclass(eq=False)
class _Turn:
    id: str
    ord: int
    prompt: str
    model: str
    mode: str
    created_at: str
    started_at: str
    started_clock: float
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    steer_tx: trio.MemorySendChannel[str] | None = None
    steer_rx: trio.MemoryReceiveChannel[str] | None = None
    items: list[_Item] = dataclasses.field(default_factory=list)
    open_item: _Item | None = None
    steer_count: int = 0
    usage: Usage | None = None
    retries: int = 0
    # Why the turn's scope was cancelled: decides its final status and error.
    end_status: str = "interrupted"
    end_error: str | None = None
    interrupt_waiters: list[ops.Interrupt] = dataclasses.field(default_factory=list)
    record: dict[str, Any] | None = None
    retry_of: str | None = None
    # Set once the turn's end is queued (``self.active`` is None again): a history op waits for it.
    ended: trio.Event = dataclasses.field(default_factory=trio.Event)
    # Approvals of this turn still pending (ids): an interrupt cancels them with the turn's end.
    # Approval id -> the id of its tool_call item (the approval.resolved of a cancel names the item too).
    pending_approvals: dict[str, str] = dataclasses.field(default_factory=dict)
    # Stopped (shutdown) while waiting for an approval: left as stored, carried on at the next start.
    parked: bool = False
    # A turn that outlived the process, carried on by this engine (see _resume).
    resume: dict[str, Any] | None = None


@dataclasses.dataclass(eq=False)
class _Waiter:
    """A turn waiting for a client's decision on one approval."""

    record: dict[str, Any]
    turn: "_Turn"
    item: _Item
    decided: trio.Event = dataclasses.field(default_factory=trio.Event)
    decision: str | None = None  # "allow" | "deny"
    message: str | None = None


class Engine:
    # One per live thread (issue 16, bench row 6): slots, as an instance dict stops sharing its keys past 30
    # attributes in CPython 3.11 and then costs ~1.3 KiB more per engine. "__dict__" stays for what is not
    # listed (a test's monkeypatch); a new attribute belongs in this list.
    __slots__ = (
        "_backend", "_base", "_boundary", "_carried", "_config", "_end_later", "_fence", "_gone", "_idle_since",
        "_idle_waiters", "_inbox", "_item_ord", "_lane_made", "_nursery", "_retire", "_retrying", "_stopping",
        "_store", "_turn_ord", "_unfolded", "_waiters", "active", "crashed", "diverged", "messages", "parked",
        "thread", "thread_id", "tools", "total_tokens", "unconfirmed", "__dict__",
    )

    def __init__(
        self,
        state: dict[str, Any],
        *,
        store: Store,
        backend: ModelBackend,
        config: RuntimeConfig,
        inbox: trio.MemoryReceiveChannel[ops.Op],
        retire: Callable[["Engine", bool], bool],
        end_later: Callable[[str, str, Callable[[sqlite3.Connection], list[EventDraft]]], None] | None = None,
        fence: tuple[str, int] | None = None,
    ) -> None:
        self.thread: dict[str, Any] = state["thread"]
        self.thread_id: str = self.thread["id"]
        # The resumed (or restored) messages the live history starts from; turns' items fold in after.
        self._base: list[dict[str, Any]] = state["base_messages"]
        # From the boundary state when there is one (records.engine_state): only the items after it are folded.
        boundary = state.get("boundary_messages")
        self.messages = build_messages(self._base if boundary is None else boundary, state["items"])
        # Items folded into ``messages`` since the stored boundary state: from BOUNDARY_EVERY_ITEMS on, a new one
        # is written (_keep_boundary), so a successor's start folds few.
        self._unfolded = len(state["items"])
        self.total_tokens: int = state["base_tokens"] + state["turn_tokens"]
        self._turn_ord: int = state["turn_count"]
        self._item_ord: int = state["item_count"]
        self._store = store
        self._backend = backend
        self._config = config
        self._inbox = inbox
        # Asks the manager to stop routing requests here: (engine, idle) -> accepted. An idle retirement
        # is refused while ops are queued; a stopping engine is always retired.
        self._retire = retire
        # Hands the manager the write that ends a turn whose end could not be recorded: (thread id,
        # turn id, idempotent closing fn); the manager retries it until it commits.
        self._end_later = end_later
        # Every write of this engine, in order (``_lane``, made at the first write: an engine that only
        # answers snapshots never needs one, ~0.3 KiB); the writer stops the lane at its first failure.
        self._lane_made: WriteLane | None = None
        # (thread id, epoch) of the lease this engine writes under (PostgreSQL): the writer refuses a write of
        # an older epoch with LeaseLost, which retires the engine like any failed write, without another write.
        self._fence = fence
        # The first storage failure of the lane: from then on the engine only winds down.
        self.diverged: RuntimeFailure | None = None
        self._nursery: trio.Nursery | None = None
        self.active: _Turn | None = None
        self._idle_waiters: list[ops.GetSessionSnapshot] = []
        # The last write that moved what a snapshot shows (turn start and end, compaction, update):
        # snapshots wait for it to commit, so a snapshot never runs ahead of the store.
        self._boundary: WriteRequest | None = None
        self._idle_since = trio.current_time()
        self._stopping: str | None = None
        self.crashed = False
        # The thread was deleted: ops still queued go to a successor, which finds no thread (404).
        self._gone = False
        # A history write whose outcome this engine could not wait for: a successor restores only once it
        # is done (ThreadManager), so it never starts from the store as it was before that write.
        self.unconfirmed: WriteRequest | None = None
        self._retrying: _Turn | None = None  # a retry's new turn, between allocation and commit
        # Set by the manager when the runtime has more tools than the config's built-ins (MCP servers).
        self.tools: Any = None
        # Approvals pending in this engine, by id: the turn task waits, DecideApproval answers.
        self._waiters: dict[str, _Waiter] = {}
        # A turn that outlived the process (waiting for an approval, or going on after a tool whose
        # outcome is unknown): started with the engine, see ``_resume_turn``.
        self._carried: dict[str, Any] | None = state.get("active_turn")
        # The turn this engine parked (left waiting for an approval as stored) when it stopped: the
        # manager carries it on in a successor if the runtime goes on.
        self.parked: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Serve ops until the inbox closes (eviction, ``request_stop``). Never raises: a crash is logged,
        the running turn fails, and every queued requester sees EngineUnavailable at once."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                # trio's task status keeps the temporary nursery of ``nursery.start`` (~1 KiB): not for the
                # engine's whole life.
                del task_status
                if self._carried is not None:
                    self._resume_turn(self._carried)
                    self._carried = None
                else:
                    self._keep_boundary()  # restored from many items: store a boundary for the next start
                try:
                    await self._op_loop()
                except Exception:
                    if self.active is not None:
                        self._cancel_turn("failed", "engine crashed")
                    raise
                finally:
                    # New requests now wait for this engine to exit and go to its successor,
                    # instead of queueing behind an engine that will never serve them.
                    self._retire(self, False)
                    self.request_stop(STOPPED)  # a turn not ended above (stopped, cancelled) is interrupted
        except Exception:
            self.crashed = True
            log.exception("engine for thread %s crashed", self.thread_id)
        finally:
            self._close_inbox()

    def request_stop(self, reason: str) -> None:
        """Called by the manager at shutdown (and by the engine itself when it is going away): interrupt the
        turn and stop after the ops queued so far. The first reason given is the one recorded."""
        if self._stopping is None:
            self._stopping = reason
        if self.active is not None:
            if self.active.pending_approvals and self.diverged is None and not self.active.scope.cancel_called:
                # Waiting for a client's decision: the turn is parked, not ended. Its approval and its
                # status stay stored as they are, and the next start carries it on (API.md: a pending
                # approval survives a restart).
                self.active.parked = True
            self._cancel_turn("interrupted", self._stopping)

    def _write_failed(self, error: RuntimeFailure) -> None:
        """The lane's first failed write (called by the store's writer, on the event loop, before anyone
        waiting on that write wakes). Memory has run ahead of the store: retire now, so new requests
        wait for a successor restored from the store, and end the running turn ``failed`` with the error.
        Ops still queued are handed to the successor unhandled (see ``_op_loop``)."""
        if self.diverged is not None:
            return
        self.diverged = error
        # A lost lease is expected in a cluster (another host took the thread over): a warning, not an error.
        log.log(logging.WARNING if isinstance(error, LeaseLost) else logging.ERROR,
                "thread %s: a write failed, the engine retires and a successor restores from the store: %s",
                self.thread_id, error)
        self._retire(self, False)
        if self.active is not None:
            self._cancel_turn("failed", str(error), reason="a write of the turn failed")

    def lease_lost(self, error: LeaseLost) -> None:
        """This host no longer knows it holds the thread's lease (PostgreSQL): stop like after a failed write,
        but write NOTHING more (another host may own the thread now; its takeover recovery ends the turn).
        Writes still queued on the lane fail without running."""
        if self._lane.failed is None:
            self._lane.failed = error
            self._lane.notified = True
        self._write_failed(error)

    @property
    def _lane(self) -> WriteLane:
        if self._lane_made is None:
            self._lane_made = WriteLane(on_failure=self._write_failed, fence=self._fence)
        return self._lane_made

    def _failure(self) -> RuntimeFailure:
        """A fresh copy of the lane's failure, to raise in a requester (one instance per raise)."""
        assert self.diverged is not None
        copy = type(self.diverged)(self.diverged.message)
        copy.__cause__ = self.diverged.__cause__
        return copy

    def _keep_boundary(self) -> None:
        """Store the engine's boundary state (records.boundary_write) once BOUNDARY_EVERY_ITEMS items were folded
        since the last one, between turns. On the lane: after the turn end it covers, before any later
        change (a rewind deletes it in its own transaction). The messages are a copy of the list (its
        messages are never changed in place), encoded in the writer thread."""
        if (self._unfolded < records.BOUNDARY_EVERY_ITEMS or self.active is not None or self._retrying is not None
                or self.diverged is not None or self._stopping is not None):
            return
        self._unfolded = 0
        self._store.submit(WriteRequest(
            fn=records.boundary_write(self.thread_id, self._turn_ord, self.total_tokens, tuple(self.messages)),
            action=f"store the boundary state of thread '{self.thread_id}'", lane=self._lane))

    def _submit(self, action: str, statements: list[tuple[str, tuple[Any, ...]]] | tuple[()] = (),
                events: list[EventDraft] | tuple[()] = ()) -> WriteRequest:
        """Queue one write on the engine's lane (never awaits, so state and log keep their order)."""
        return self._store.submit(WriteRequest(statements, events, action=action, lane=self._lane))

    @staticmethod
    def _claimed(op: ops.Op, request: WriteRequest) -> None:
        """``request`` carries ``op``'s idempotency record: its key stays in progress until it is done."""
        if op.claim is not None and not op.claim.abandoned:
            op.claim.pending = request

    def _close_inbox(self) -> None:
        """Close every reply still queued, so each requester sees EngineUnavailable now, not at its deadline."""
        while True:
            try:
                op = self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if op.reply is not None:
                op.reply.close()
        for waiter in self._idle_waiters:
            if waiter.reply is not None:
                waiter.reply.close()
        self._idle_waiters.clear()
        self._inbox.close()

    async def _op_loop(self) -> None:
        while True:
            # Drop the last op before parking: an idle engine would otherwise keep it (its closed reply
            # channel with its buffer, its arguments) alive until the next op arrives.
            op = None
            # No deadline here: the manager's one idle timer calls ``idle_due`` (a cancel scope per parked
            # engine cost ~0.8 KiB of it, issue 16).
            try:
                op = await self._inbox.receive()
            except trio.EndOfChannel:
                return
            self._idle_since = trio.current_time()
            if self._stopping is not None:
                if op.reply is not None:
                    op.reply.close()
                return
            if self.diverged is not None or self._gone:
                # Not handled: this engine's memory is ahead of the store (or its thread is gone). The
                # requester retries on the successor (EngineEvicted means "nothing happened"), which
                # restores from the store (or finds no thread: 404).
                await self._send_reply(op.reply, outcome.Error(EngineEvicted()))
                continue
            if isinstance(op, ops.HistoryOp):
                await self._history(op)
                continue
            if (isinstance(op, ops.GetSessionSnapshot) and not (op.wait_for_idle and self.active)
                    and (self._boundary is None or self._boundary.done.is_set())):
                # The hot path: answered inline. The requester is already waiting on the oneshot, so
                # this send completes in one scheduling round (bounded by reply_send_seconds anyway).
                await self._send_reply(op.reply, outcome.Value(self.snapshot()))
                continue
            self._dispatch(op)
            # Yield so a flood of ops cannot starve the turn task and the reply helpers.
            await trio.lowlevel.cancel_shielded_checkpoint()

    @property
    def idle_deadline(self) -> float:
        """When this engine is due for eviction if nothing moves it (trio clock)."""
        return self._idle_since + self._config.idle_evict_seconds

    def idle_due(self) -> float | None:
        """Called by the manager's idle timer once ``idle_deadline`` as it was has passed: an engine with no
        op, no running turn and no snapshot waiting for one for ``idle_evict_seconds`` retires (the manager
        forgets it and closes its inbox; ops already queued are still served). Returns the deadline to check
        next, or None once retired."""
        now = trio.current_time()
        deadline = self.idle_deadline
        if now < deadline:
            return deadline  # an op or a turn's end moved it: wait out the rest
        if not self._inbox.statistics().tasks_waiting_receive:
            # Handling an op, not parked on the inbox: never retired in the middle of one.
            return now + min(BUSY_RECHECK_SECONDS, self._config.idle_evict_seconds)
        if self.active is None and not self._idle_waiters and self._retire(self, True):
            return None
        self._idle_since = now
        return self.idle_deadline

    def _dispatch(self, op: ops.Op) -> None:
        if op.claim is not None and op.claim.abandoned:
            # Its keyed requester gave up (cancelled, timed out) before this op was taken: nothing of it
            # happens, so a retry with the same key runs it exactly once (runtime/idempotency.py).
            if op.reply is not None:
                op.reply.close()
            return
        try:
            if isinstance(op, ops.GetSessionSnapshot):
                self._on_snapshot(op)
            elif isinstance(op, ops.StartTurn):
                self._on_start_turn(op)
            elif isinstance(op, ops.Steer):
                self._on_steer(op)
            elif isinstance(op, ops.Interrupt):
                self._on_interrupt(op)
            elif isinstance(op, ops.Compact):
                self._on_compact(op)
            elif isinstance(op, ops.UpdateThread):
                self._on_update(op)
            elif isinstance(op, ops.DecideApproval):
                self._on_decide(op)
            else:
                raise InvalidInput(f"unknown op {type(op).__name__}")
        except RuntimeFailure as exc:
            self._spawn_reply(op.reply, outcome.Error(exc))
        except BaseException:
            # A bug: the engine is about to crash. This op already left the inbox, so close its
            # oneshot here or its requester would wait out its whole deadline.
            if op.reply is not None:
                op.reply.close()
            raise

    # ---- replies ---------------------------------------------------------------------------

    async def _send_reply(self, reply: ops.Reply | None, result: outcome.Outcome) -> None:
        """Send one reply and close the channel. A requester that gave up is normal, not an error."""
        if reply is None:
            return
        # The requester is normally already waiting on the oneshot: hand the reply over without a
        # scheduling round or a timer. Otherwise wait for it, bounded.
        try:
            reply.send_nowait(result)
        except trio.WouldBlock:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reply.close()
            return
        else:
            reply.close()
            return
        try:
            with trio.move_on_after(self._config.reply_send_seconds):
                async with reply:
                    await reply.send(result)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _spawn_reply(self, reply: ops.Reply | None, result: outcome.Outcome,
                     after: WriteRequest | None = None, *, if_failed: str = "own") -> None:
        """Reply from a helper task, once ``after`` committed (so the caller can read its own write).

        If ``after`` failed, ``if_failed`` says what the requester gets instead of ``result``:
        ``"own"`` (it was the op's own write): its storage error, or EngineEvicted if it never ran
        (``skipped``: an earlier write had failed, so nothing of the op happened and the successor
        can do it); ``"successor"`` (a snapshot waiting for a boundary, answered from memory the store
        does not have): EngineEvicted, so the requester asks the successor; ``"lane"`` (an interrupt
        waiting for the turn's end, which then ended failed): the storage failure that ended it."""
        if reply is None:
            return
        assert self._nursery is not None
        self._nursery.start_soon(self._reply_when_committed, reply, result, after, if_failed)

    async def _reply_when_committed(self, reply: ops.Reply, result: outcome.Outcome,
                                    after: WriteRequest | None, if_failed: str = "own") -> None:
        # Shielded: the op was applied and its write queued, so its requester must hear how that ended even
        # when the engine is torn down meanwhile (a crash, a cancelled runtime); EngineUnavailable would say
        # that nothing happened. Bounded by final_write_seconds (the writer only waits on SQLite) and by
        # reply_send_seconds (in _send_reply).
        with trio.CancelScope(shield=True):
            try:
                if after is not None:
                    with trio.move_on_after(self._config.final_write_seconds):
                        await after.done.wait()
                    if not after.done.is_set():
                        result = outcome.Error(StorageError(
                            f"the store did not commit within {self._config.final_write_seconds:g} s"))
                    elif isinstance(after.result, outcome.Error):
                        if if_failed == "lane" and self.diverged is not None:
                            result = outcome.Error(self._failure())
                        elif if_failed == "own" and not after.skipped:
                            result = after.result
                        else:
                            result = outcome.Error(EngineEvicted())
                await self._send_reply(reply, result)
            finally:
                reply.close()

    # ---- snapshot --------------------------------------------------------------------------

    def snapshot(self) -> ops.SessionSnapshot:
        return ops.SessionSnapshot(
            thread_id=self.thread_id,
            title=self.thread.get("title"),
            messages=tuple(self.messages),
            system_prompt=self.thread.get("system_prompt"),
            model=self.thread["model"],
            mode=self.thread["mode"],
            workspace=self.thread.get("workspace"),
            total_tokens=self.total_tokens,
            turn_in_progress=self.active is not None,
            active_turn_id=self.active.id if self.active else None,
        )

    def _on_snapshot(self, op: ops.GetSessionSnapshot) -> None:
        if op.wait_for_idle and self.active is not None:
            # Forget waiters whose requester already gave up, so abandoned waits cannot pile up.
            self._idle_waiters = [w for w in self._idle_waiters
                                  if w.reply is not None and w.reply.statistics().open_receive_channels]
            self._idle_waiters.append(op)
            return
        self._spawn_reply(op.reply, outcome.Value(self.snapshot()), after=self._boundary, if_failed="successor")

    # ---- thread updates --------------------------------------------------------------------

    def _touch(self, now: str) -> tuple[str, tuple[Any, ...]]:
        self.thread["updated_at"] = now
        return ("UPDATE threads SET updated_at = ? WHERE id = ?", (now, self.thread_id))

    def _on_update(self, op: ops.UpdateThread) -> None:
        changes = {k: v for k, v in op.changes.items() if k in UPDATABLE_FIELDS}
        if not changes:
            raise InvalidInput("Nothing to update: give at least one of " + ", ".join(UPDATABLE_FIELDS))
        now = utc_now()
        self.thread.update(changes)
        columns = ", ".join(f"{name} = ?" for name in changes)
        values = tuple(int(v) if isinstance(v, bool) else v for v in changes.values())
        request = self._submit(
            f"update thread '{self.thread_id}'",
            statements=[(f"UPDATE threads SET {columns} WHERE id = ?", (*values, self.thread_id)), self._touch(now)],
            events=[EventDraft(self.thread_id, "thread.updated", {"changes": changes})],
        )
        self._boundary = request
        self._spawn_reply(op.reply, outcome.Value(None), after=request)

    # ---- turns -----------------------------------------------------------------------------

    def _next_item(self, turn: _Turn, kind: str) -> _Item:
        self._item_ord += 1
        item = _Item(new_id("item"), kind, self._item_ord, utc_now())
        turn.items.append(item)
        return item

    @staticmethod
    def _insert_item(turn: _Turn, item: _Item, thread_id: str, *, detail: str | None = None,
                     ended_at: str | None = None) -> tuple[str, tuple[Any, ...]]:
        return (
            "INSERT INTO items (id, turn_id, thread_id, ord, kind, status, summary, detail, metadata,"
            " started_at, ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (item.id, turn.id, thread_id, item.ord, item.kind, item.status, _preview(detail or ""), detail,
             json.dumps(item.metadata) if item.metadata else None, item.started_at, ended_at),
        )

    def _turn_record(self, turn: _Turn, status: str) -> dict[str, Any]:
        return {
            "id": turn.id, "thread_id": self.thread_id, "status": status, "input_summary": _preview(turn.prompt),
            "created_at": turn.created_at, "started_at": turn.started_at, "ended_at": None, "duration_ms": None,
            "usage": None, "error": None, "item_ids": [i.id for i in turn.items], "steer_count": turn.steer_count,
            "rewound": False, "retry_of": turn.retry_of,
        }

    def _on_start_turn(self, op: ops.StartTurn) -> None:
        if self.active is not None:
            raise Conflict(f"Thread '{self.thread_id}' already has a turn in progress ('{self.active.id}')")
        if not op.prompt.strip():
            raise InvalidInput("prompt must not be empty")
        now = utc_now()
        self._turn_ord += 1
        turn = _Turn(
            id=new_id("turn"), ord=self._turn_ord, prompt=op.prompt,
            model=op.model or self.thread["model"], mode=op.mode or self.thread["mode"],
            created_at=now, started_at=now, started_clock=trio.current_time(),
        )
        turn.steer_tx, turn.steer_rx = trio.open_memory_channel[str](float("inf"))
        user = self._next_item(turn, "user_message")
        user.status = "completed"
        user.parts.append(op.prompt)
        self.thread["latest_turn_id"] = turn.id
        record = self._turn_record(turn, "in_progress")
        request = self._submit(
            f"start a turn on thread '{self.thread_id}'",
            statements=[
                ("INSERT INTO turns (id, thread_id, ord, status, input_summary, created_at, started_at)"
                 " VALUES (?, ?, ?, 'in_progress', ?, ?, ?)",
                 (turn.id, self.thread_id, turn.ord, _preview(op.prompt), now, now)),
                self._insert_item(turn, user, self.thread_id, detail=op.prompt, ended_at=now),
                ("UPDATE threads SET latest_turn_id = ? WHERE id = ?", (turn.id, self.thread_id)),
                self._touch(now),
                *record_claim(op.claim, record),
            ],
            events=[
                EventDraft(self.thread_id, "turn.started",
                           {"prompt": op.prompt, "model": turn.model, "mode": turn.mode}, turn_id=turn.id),
                EventDraft(self.thread_id, "item.started", {"kind": "user_message"}, turn.id, user.id, now),
                EventDraft(self.thread_id, "item.completed", {"kind": "user_message", "text": op.prompt},
                           turn.id, user.id, now),
            ],
        )
        self._claimed(op, request)
        self.active = turn
        self._boundary = request  # a snapshot shows this turn only once the store has it
        self._spawn_reply(op.reply, outcome.Value(record), after=request)
        assert self._nursery is not None
        self._nursery.start_soon(self._run_turn, turn, request)

    def _require_active(self, turn_id: str, action: str) -> _Turn:
        if self.active is None or self.active.id != turn_id:
            raise Conflict(f"Cannot {action} turn '{turn_id}': it is not in progress")
        return self.active

    def _on_steer(self, op: ops.Steer) -> None:
        turn = self._require_active(op.turn_id, "steer")
        if turn.pending_approvals:
            raise Conflict(f"Cannot steer turn '{turn.id}': it is waiting for an approval")
        if not op.prompt.strip():
            raise InvalidInput("prompt must not be empty")
        self._close_open_item(turn, "completed")
        item = self._next_item(turn, "user_message")
        item.status = "completed"
        item.parts.append(op.prompt)
        item.metadata = {"steer": True}
        turn.steer_count += 1
        now = utc_now()
        record = self._turn_record(turn, "in_progress")
        request = self._submit(
            f"steer turn '{turn.id}'",
            statements=[
                self._insert_item(turn, item, self.thread_id, detail=op.prompt, ended_at=now),
                ("UPDATE turns SET steer_count = ? WHERE id = ?", (turn.steer_count, turn.id)),
                *record_claim(op.claim, record),
            ],
            events=[EventDraft(self.thread_id, "turn.steered",
                               {"prompt": op.prompt, "steer_count": turn.steer_count}, turn.id, item.id, now)],
        )
        assert turn.steer_tx is not None
        turn.steer_tx.send_nowait(op.prompt)
        self._claimed(op, request)
        self._spawn_reply(op.reply, outcome.Value(record), after=request)

    def _on_interrupt(self, op: ops.Interrupt) -> None:
        turn = self._require_active(op.turn_id, "interrupt")
        if not turn.interrupt_waiters:
            self._submit(f"record the interrupt request of turn '{turn.id}'", events=[EventDraft(
                self.thread_id, "turn.interrupt_requested", {}, turn_id=turn.id)])
        turn.interrupt_waiters.append(op)
        self._cancel_turn("interrupted", None, reason="turn interrupted by client")

    def _cancel_turn(self, status: str, error: str | None, reason: str | None = None) -> None:
        turn = self.active
        assert turn is not None
        if not turn.scope.cancel_called:
            turn.end_status, turn.end_error = status, error
            turn.scope.cancel(reason=reason or error or status)

    def _on_compact(self, op: ops.Compact) -> None:
        if self.active is not None:
            raise Conflict(f"Cannot compact thread '{self.thread_id}' while turn '{self.active.id}' is in progress")
        if not self.messages:
            raise InvalidInput(f"Thread '{self.thread_id}' has no messages to compact")
        now = utc_now()
        summary = summarize(self.messages)
        self._turn_ord += 1
        turn = _Turn(id=new_id("turn"), ord=self._turn_ord, prompt="", model=self.thread["model"],
                     mode=self.thread["mode"], created_at=now, started_at=now, started_clock=trio.current_time())
        item = self._next_item(turn, "context_compaction")
        item.status = "completed"
        item.parts.append(summary)
        item.metadata = {"reason": op.reason, "replaced_messages": len(self.messages)}
        input_summary = f"compact: {op.reason}" if op.reason else "compact"
        result = {"turn_id": turn.id, "item": item.record(turn.id, now), "summary": summary}
        request = self._submit(
            f"compact thread '{self.thread_id}'",
            statements=[
                ("INSERT INTO turns (id, thread_id, ord, status, input_summary, created_at, started_at, ended_at,"
                 " duration_ms) VALUES (?, ?, ?, 'completed', ?, ?, ?, ?, 0)",
                 (turn.id, self.thread_id, turn.ord, input_summary, now, now, now)),
                self._insert_item(turn, item, self.thread_id, detail=summary, ended_at=now),
                self._touch(now),
                *record_claim(op.claim, result),
            ],
            events=[
                EventDraft(self.thread_id, "item.started", {"kind": "context_compaction"}, turn.id, item.id, now),
                EventDraft(self.thread_id, "item.completed", {"kind": "context_compaction", "text": summary},
                           turn.id, item.id, now),
            ],
        )
        apply_items(self.messages, [item.record(turn.id, now)])
        self._boundary = request
        self._claimed(op, request)
        self._spawn_reply(op.reply, outcome.Value(result), after=request)

    # ---- history control -------------------------------------------------------------------

    async def _history(self, op: ops.HistoryOp) -> None:
        """Fork, rewind, retry, restore or delete (runtime.engine.history): check, apply as one store write,
        adopt the result, answer.

        The op loop itself waits for the change (bounded by final_write_seconds for each of: the turn
        ``if_busy="interrupt"`` ends, the engine's earlier writes, the change's write), so no other op of
        this thread runs in between: the checks made inside the write and the state adopted after it
        cannot go stale. The write is not on the engine's lane: it starts only once every earlier write
        of the engine committed, and its failure changes nothing at all (one transaction; the engine
        adopts nothing), so the engine serves on. Only a write whose outcome is unknown (not done within
        the bound) retires the engine; its successor restores once that write is done."""
        if op.claim is not None and op.claim.abandoned:  # as in _dispatch: nothing of it happens
            if op.reply is not None:
                op.reply.close()
            return
        try:
            result = await self._apply_history(op)
        except (RuntimeFailure, EngineEvicted) as exc:
            self._spawn_reply(op.reply, outcome.Error(exc))
        except BaseException:
            if op.reply is not None:  # the engine is going away: its requester must not wait its deadline out
                op.reply.close()
            raise
        else:
            self._spawn_reply(op.reply, outcome.Value(result))

    async def _apply_history(self, op: ops.HistoryOp) -> dict[str, Any]:
        if op.if_busy not in ops.IF_BUSY:
            raise InvalidInput(f"if_busy must be one of: {', '.join(ops.IF_BUSY)}")
        if self.active is not None and not isinstance(op, ops.Fork):  # a fork leaves the source's turn running
            if op.if_busy != "interrupt":
                raise Conflict(f"Thread '{self.thread_id}' has a turn in progress ('{self.active.id}'); "
                               f"send if_busy \"interrupt\" to interrupt it first")
            await self._interrupt_for_history(self.active)
        await self._settle_boundary()
        if op.claim is not None and op.claim.abandoned:
            # Its keyed requester gave up while this op waited (see _dispatch): nothing happens, and in the
            # same step as this check the write is either dropped or queued with the claim pending.
            raise EngineUnavailable("the request was abandoned before its change was made")
        now = utc_now()
        fn, action = self._history_write(op, now)
        # Fenced like the lane (PostgreSQL), on a lane of its own: its failure must not fail the engine's lane
        # (a refusal changes nothing), but a paused owner's history change must be refused after a takeover.
        fence = self._lane.fence
        request = self._store.submit(WriteRequest(fn=fn, action=action,
                                                  lane=None if fence is None else WriteLane(fence=fence)))
        self._claimed(op, request)
        # Shielded: the engine must know whether its thread changed before it serves another op (an engine
        # cancelled meanwhile is being torn down and waits for this anyway). Bounded: the writer only
        # waits on SQLite and the file system, and final_write_seconds caps even that.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self._config.final_write_seconds):
                await request.done.wait()
        if not request.done.is_set():
            error = StorageError(f"Failed to {action}: the store did not commit within "
                                 f"{self._config.final_write_seconds:g} s; the change is applied whole or not at all")
            self.unconfirmed = request
            self._write_failed(error)  # memory may now be behind the store: a successor restores from it
            raise error
        assert request.result is not None
        if isinstance(request.result, outcome.Error) and isinstance(request.result.error, LeaseLost):
            self.lease_lost(request.result.error)  # another host owns the thread now: retire, write nothing
        change: history.Change = request.result.unwrap()  # a rejection or a storage error: nothing changed
        self._boundary = request
        self._idle_since = trio.current_time()
        return self._adopt(op, change, request)

    async def _interrupt_for_history(self, turn: _Turn) -> None:
        """``if_busy="interrupt"``: interrupt the running turn as a client interrupt would, and wait until its
        end is queued (it ends ``interrupted``; the change's write comes after it)."""
        if not turn.scope.cancel_called:
            self._submit(f"record the interrupt request of turn '{turn.id}'", events=[EventDraft(
                self.thread_id, "turn.interrupt_requested", {"reason": "history change"}, turn_id=turn.id)])
        self._cancel_turn("interrupted", None, reason="turn interrupted for a history change")
        with trio.move_on_after(self._config.final_write_seconds):
            await turn.ended.wait()
        if not turn.ended.is_set():
            raise EngineTimeout(f"Timed out interrupting turn '{turn.id}' of thread '{self.thread_id}' "
                                f"before changing its history")

    async def _settle_boundary(self) -> None:
        """Wait until every earlier write of this engine has committed (the last boundary write: when no
        turn runs, nothing was queued after it), so the change's checks see the store as the engine does.
        EngineEvicted when one of them failed (the successor, restored from the store, takes the op)."""
        boundary = self._boundary
        if boundary is not None and not boundary.done.is_set():
            # Shielded and bounded like the change's own write (see _apply_history).
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self._config.final_write_seconds):
                    await boundary.done.wait()
            if not boundary.done.is_set():
                raise StorageError(f"Failed to change the history of thread '{self.thread_id}': its earlier writes "
                                   f"did not commit within {self._config.final_write_seconds:g} s; nothing was changed")
        if self.diverged is not None:
            raise EngineEvicted()

    def _history_write(self, op: ops.HistoryOp, now: str) -> tuple[Callable[[sqlite3.Connection], WithEvents], str]:
        """The writer-thread function that checks and applies ``op`` (runtime.engine.history), and its action."""
        tid = self.thread_id
        if isinstance(op, ops.Fork):
            return functools.partial(history.fork, thread_id=tid, through_turn_id=op.through_turn_id,
                                     new_thread_id=op.new_thread_id, title=op.title, now=now,
                                     claim=op.claim), f"fork thread '{tid}'"
        if isinstance(op, ops.Rewind):
            return functools.partial(history.rewind, thread_id=tid, before_turn_id=op.before_turn_id, base=self._base,
                                     now=now, claim=op.claim), f"rewind thread '{tid}'"
        if isinstance(op, ops.Retry):
            return functools.partial(history.retry, thread_id=tid, turn_id=op.turn_id, base=self._base, now=now,
                                     new_turn=self._retry_turn(op, now), claim=op.claim), f"retry a turn of thread '{tid}'"
        if isinstance(op, ops.Restore):
            safety = op.safety(self.snapshot())  # the live state being replaced, saved in the same write
            restore = functools.partial(
                history.restore, thread_id=tid, session_id=op.session_id, revision=op.revision,
                safety_session_id=op.safety_session_id, messages=op.messages, messages_json=op.messages_json,
                total_tokens=op.total_tokens, system_prompt=op.system_prompt, now=now, claim=op.claim)

            def restore_with_safety(conn: sqlite3.Connection) -> WithEvents:
                safety(conn)
                return restore(conn)

            return restore_with_safety, f"restore thread '{tid}' from session '{op.session_id}'"
        if isinstance(op, ops.DeleteThread):
            return functools.partial(history.delete, thread_id=tid, now=now), f"delete thread '{tid}'"
        raise InvalidInput(f"unknown history op {type(op).__name__}")

    def _retry_turn(self, op: ops.Retry, now: str) -> dict[str, Any]:
        """Allocate the retry's new turn (ids and ords; the prompt comes from the store, in the write)."""
        self._turn_ord += 1
        turn = _Turn(id=new_id("turn"), ord=self._turn_ord, prompt="", model=op.model or self.thread["model"],
                     mode=op.mode or self.thread["mode"], created_at=now, started_at=now,
                     started_clock=trio.current_time())
        user = self._next_item(turn, "user_message")
        user.status = "completed"

        def record(prompt: str, retry_of: str) -> dict[str, Any]:  # runs in the writer thread; reads only
            return {**self._turn_record(turn, "in_progress"), "input_summary": _preview(prompt), "retry_of": retry_of}

        self._retrying = turn
        return {"id": turn.id, "ord": turn.ord, "model": turn.model, "mode": turn.mode, "user_item_id": user.id,
                "user_item_ord": user.ord, "record": record}

    def _adopt(self, op: ops.HistoryOp, change: history.Change, request: WriteRequest) -> dict[str, Any]:
        """Take over the state the committed change computed (in the same step: nothing runs in between)."""
        state = change.state
        if state is not None:
            self._base = state.base
            self.messages = state.messages
            self.total_tokens = state.total_tokens
            self.thread.update(state.thread)
            # The change deleted the boundary state (history._rewind) or made a new thread: the next start
            # folds the whole live history, of about this many items at least.
            self._unfolded = len(state.messages)
        if isinstance(op, ops.Retry):
            turn, self._retrying = self._retrying, None
            assert turn is not None and change.prompt is not None
            turn.prompt = change.prompt
            turn.retry_of = change.result["retry_of"]
            turn.items[0].parts.append(change.prompt)
            turn.steer_tx, turn.steer_rx = trio.open_memory_channel[str](float("inf"))
            self.active = turn
            self.thread["latest_turn_id"] = turn.id
            assert self._nursery is not None
            self._nursery.start_soon(self._run_turn, turn, request)
        elif isinstance(op, ops.DeleteThread):
            self._gone = True
            self._retire(self, False)  # new requests wait for this engine's exit, then find no thread
        return change.result

    # ---- tools and approvals ---------------------------------------------------------------
    #
    # Every tool call a backend makes goes through ``_run_tool`` (ModelRequest.run_tool): the thread's
    # policy, a durable approval when one is needed, the tool's start recorded (committed) before it runs,
    # then the run. A pending approval is a stored record with a wall-clock deadline: the turn task waits on
    # it here, a DecideApproval op answers it, and after a restart ``_resume_turn`` waits on it again.

    def _tools(self) -> Any:
        """The tools offered to the model: ``tools`` given by the runtime (built-ins and MCP servers' tools
        behind one registry-like object), else the config's built-in registry."""
        return self.tools if self.tools is not None else getattr(self._config, "tools", None)

    def _tool_specs(self) -> tuple[Any, ...]:
        registry = self._tools()
        return tuple(registry.spec()) if registry is not None and len(registry) else ()

    async def _run_tool(self, turn: _Turn, call: ToolCall) -> ToolOutcome:
        """Decide, record the start, run. Cancelled (an interrupt), the turn's end cancels what is pending."""
        registry = self._tools()
        tool = registry.get(call.name) if registry is not None else None
        if tool is None:
            return ToolOutcome(f"Tool '{call.name}' is not available", is_error=True)
        item = self._tool_item(turn, call.id)
        if tool.needs_approval:
            denial = await self._approval(turn, item, call.name, call.input,
                                          asks=getattr(tool, "asks_under_ask", True))
            if denial is not None:
                return ToolOutcome(denial, is_error=True)
        return await self._start_tool(turn, item, call.name, call.input)

    def _tool_item(self, turn: _Turn, use_id: str) -> _Item:
        item = next((i for i in reversed(turn.items) if i.kind == "tool_call"
                     and (i.metadata or {}).get("tool_use_id") == use_id), None)
        if item is None:
            raise ModelError(f"tool call {use_id!r} was not announced before it was run")
        return item

    async def _start_tool(self, turn: _Turn, item: _Item, name: str, tool_input: dict[str, Any]) -> ToolOutcome:
        """At most once: the start is committed before the tool runs, so a process that dies while it runs
        never runs it again (restart recovery ends the item "outcome unknown")."""
        from ..models.tools import ToolContext  # the tool layer sits above the engine's own modules

        item.metadata = {**(item.metadata or {}), "started_at": utc_now()}
        request = self._submit(f"record the start of tool '{name}' in turn '{turn.id}'", statements=[
            ("UPDATE items SET metadata = ? WHERE id = ?", (json.dumps(item.metadata), item.id))])
        # Not shielded: an interrupt while the start commits means the tool never runs (the start may still
        # commit; the turn's end then closes the item interrupted, so a restart does not call it unknown).
        # Bounded by final_write_seconds (the writer only waits on SQLite).
        with trio.move_on_after(self._config.final_write_seconds):
            await request.done.wait()
        if not isinstance(request.result, outcome.Value):
            # Not recorded: the tool does not run (its start could not be made durable). A failed write has
            # retired the engine and is ending this turn failed; a slow one ends it here.
            raise ModelError(f"the start of tool '{name}' could not be recorded, so it was not run")
        return await self._tools().call(name, tool_input, ToolContext(self.thread_id, self._config.data_dir))

    async def _approval(self, turn: _Turn, item: _Item, name: str, tool_input: dict[str, Any], *,
                        asks: bool = True) -> str | None:
        """None when the call may run; else the denial the model gets as the tool's (error) result.
        ``asks``: under the thread policy "ask", whether this tool asks the client (an MCP server's own
        ``approval`` mode may let it run: it is then recorded as decided by policy)."""
        policy = self.thread.get("approval_policy") or "ask"
        now = utc_now()
        if policy in ("auto", "deny") or not asks or name in (self.thread.get("allowed_tools") or ()):
            # The thread's policy comes first (API.md): "deny" denies every call that needs approval, a tool
            # allowed earlier with ``remember`` included; remembered tools only skip the question under "ask".
            status = "denied" if policy == "deny" else "allowed"
            record = self._approval_row(turn, item, name, tool_input, now, now, status=status, decided_by="policy",
                                        resolved_at=now)
            self._submit(f"record the approval of tool '{name}' in turn '{turn.id}'",
                         statements=[self._insert_approval(record)],
                         events=[EventDraft(self.thread_id, "approval.resolved", {
                             "approval_id": record["id"], "decision": "allow" if status == "allowed" else "deny",
                             "decided_by": "policy"}, turn.id, item.id, now)])
            return None if status == "allowed" else "denied by policy"
        # The expiry is the creation stamp plus the timeout, exactly (not a second reading of the clock).
        record = self._approval_row(turn, item, name, tool_input, now,
                                    utc_after(self._config_approval_timeout(), start=now))
        item.status = "awaiting_approval"
        self._submit(f"request approval of tool '{name}' in turn '{turn.id}'", statements=[
            self._insert_approval(record),
            ("UPDATE items SET status = 'awaiting_approval' WHERE id = ?", (item.id,)),
            ("UPDATE turns SET status = 'awaiting_approval' WHERE id = ?", (turn.id,)),
        ], events=[EventDraft(self.thread_id, "approval.requested", {
            "approval_id": record["id"], "turn_id": turn.id, "item_id": item.id, "tool": name, "input": tool_input,
            "expires_at": record["expires_at"]}, turn.id, item.id, now)])
        return await self._await_decision(turn, item, record)

    def _config_approval_timeout(self) -> float:
        return float(getattr(self._config, "approval_timeout", 300.0))

    def _approval_row(self, turn: _Turn, item: _Item, name: str, tool_input: dict[str, Any], created_at: str,
                      expires_at: str, *, status: str = "pending", decided_by: str | None = None,
                      resolved_at: str | None = None) -> dict[str, Any]:
        return {"id": new_id("appr"), "thread_id": self.thread_id, "turn_id": turn.id, "item_id": item.id,
                "tool": name, "input": tool_input, "status": status, "created_at": created_at,
                "expires_at": expires_at, "resolved_at": resolved_at, "decided_by": decided_by, "message": None}

    @staticmethod
    def _insert_approval(record: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
        return ("INSERT INTO approvals (id, thread_id, turn_id, item_id, tool, input, status, created_at, expires_at,"
                " resolved_at, decided_by, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record["id"], record["thread_id"], record["turn_id"], record["item_id"], record["tool"],
                 json.dumps(record["input"]), record["status"], record["created_at"], record["expires_at"],
                 record["resolved_at"], record["decided_by"], record["message"]))

    async def _await_decision(self, turn: _Turn, item: _Item, record: dict[str, Any]) -> str | None:
        """Wait for the client's decision until the stored wall-clock deadline (it keeps running across
        restarts: the time left is taken from the wall clock now). Unanswered, the approval expires and
        counts as a denial. Cancelled (an interrupt, a shutdown), the approval stays pending here: the
        turn's end cancels it (``_finish_turn``), or, if the process stops, it is still pending after a restart."""
        waiter = self._waiters.get(record["id"])
        if waiter is None:
            waiter = self._waiters[record["id"]] = _Waiter(record, turn, item)
        turn.pending_approvals[record["id"]] = item.id
        try:
            with trio.move_on_after(max(0.0, seconds_until(record["expires_at"]))):
                await waiter.decided.wait()
        finally:
            if self._waiters.get(record["id"]) is waiter:
                del self._waiters[record["id"]]
        turn.pending_approvals.pop(record["id"], None)
        if waiter.decision is None:  # expired: recorded like a decision, by the deadline
            now = utc_now()
            self._resolve(waiter, "expired", "timeout", None, now)
            return "denied: the approval expired"
        if waiter.decision == "deny":
            return "denied by user" + (f": {waiter.message}" if waiter.message else "")
        return None

    def _resolve(self, waiter: _Waiter, status: str, decided_by: str, message: str | None, now: str,
                 extra: list[tuple[str, tuple[Any, ...]]] | tuple[()] = (), claim_statements: list[Any] | tuple[()] = ()
                 ) -> WriteRequest:
        """Record a pending approval's end and put its turn and item back in progress (one write)."""
        record = waiter.record
        record.update(status=status, decided_by=decided_by, message=message, resolved_at=now)
        waiter.item.status = "in_progress"
        decision = "allow" if status == "allowed" else "deny"
        return self._submit(f"resolve approval '{record['id']}'", statements=[
            ("UPDATE approvals SET status = ?, decided_by = ?, message = ?, resolved_at = ? WHERE id = ?"
             " AND status = 'pending'", (status, decided_by, message, now, record["id"])),
            ("UPDATE items SET status = 'in_progress' WHERE id = ? AND status = 'awaiting_approval'",
             (waiter.item.id,)),
            ("UPDATE turns SET status = 'in_progress' WHERE id = ? AND status = 'awaiting_approval'",
             (waiter.turn.id,)),
            *extra, *claim_statements,
        ], events=[EventDraft(self.thread_id, "approval.resolved", {
            "approval_id": record["id"], "decision": decision, "decided_by": decided_by},
            waiter.turn.id, waiter.item.id, now)])

    def _on_decide(self, op: ops.DecideApproval) -> None:
        if op.decision not in ("allow", "deny"):
            raise InvalidInput('decision must be "allow" or "deny"')
        waiter = self._waiters.get(op.approval_id)
        if waiter is None or waiter.decided.is_set():
            raise Conflict(f"Approval '{op.approval_id}' is not pending (already resolved)")
        now = utc_now()
        extra: list[tuple[str, tuple[Any, ...]]] = []
        if op.remember and op.decision == "allow":
            allowed = sorted({*(self.thread.get("allowed_tools") or ()), waiter.record["tool"]})
            self.thread["allowed_tools"] = allowed
            extra.append(("UPDATE threads SET allowed_tools = ? WHERE id = ?", (json.dumps(allowed), self.thread_id)))
        status = "allowed" if op.decision == "allow" else "denied"
        record = {**waiter.record, "status": status, "decided_by": "client", "message": op.message,
                  "resolved_at": now}
        request = self._resolve(waiter, status, "client", op.message, now, extra,
                                record_claim(op.claim, record))
        self._claimed(op, request)
        waiter.decision, waiter.message = op.decision, op.message
        waiter.decided.set()
        # Decided now, not when the turn task wakes: a stop in between must not park the turn as if it still
        # waited (the store has it resolved), nor its end cancel the approval with a second approval.resolved.
        waiter.turn.pending_approvals.pop(op.approval_id, None)
        self._spawn_reply(op.reply, outcome.Value(dict(waiter.record)), after=request)

    def _cancel_pending_approvals(self, turn: _Turn, now: str) -> tuple[list[Any], list[EventDraft]]:
        """A turn that ends while approvals are pending (interrupt, shutdown, failure) cancels them."""
        statements, events = [], []
        for approval_id, item_id in sorted(turn.pending_approvals.items()):
            statements.append(("UPDATE approvals SET status = 'canceled', decided_by = 'interrupt', resolved_at = ?"
                               " WHERE id = ? AND status = 'pending'", (now, approval_id)))
            events.append(EventDraft(self.thread_id, "approval.resolved", {
                "approval_id": approval_id, "decision": "cancel", "decided_by": "interrupt"}, turn_id=turn.id,
                item_id=item_id, timestamp=now))
        turn.pending_approvals.clear()
        return statements, events

    # ---- a turn that outlived the process ------------------------------------------------------

    def _park(self, turn: _Turn) -> None:
        """Leave a turn that waits for an approval as the store has it (turn and item ``awaiting_approval``,
        the approval pending with its deadline): the engine goes away, the turn does not end."""
        log.info("turn %s parked while it waits for an approval", turn.id)
        self.parked = turn.id
        self.active = None
        turn.ended.set()
        for waiter in self._idle_waiters:
            if waiter.reply is not None:
                waiter.reply.close()
        self._idle_waiters.clear()
        for waiter in turn.interrupt_waiters:
            if waiter.reply is not None:
                waiter.reply.close()

    def _resume_turn(self, carried: dict[str, Any]) -> None:
        """Carry on a turn the store shows unended at spawn (restart recovery left it: it waits for an
        approval, or goes on after a tool whose outcome is unknown). Its items so far become the turn's;
        the model continues from the history plus them (``prompt=None``)."""
        row = carried["turn"]
        items = carried["items"]
        prompt = next((i["detail"] or "" for i in items if i["kind"] == "user_message"), "")
        now = utc_now()
        turn = _Turn(id=row["id"], ord=self._turn_ord, prompt=prompt,
                     model=self.thread["model"], mode=self.thread["mode"], created_at=row["created_at"],
                     started_at=row["started_at"] or now, started_clock=trio.current_time())
        for stored in items:
            item = _Item(stored["id"], stored["kind"], 0, stored["started_at"] or now, status=stored["status"],
                         parts=[stored["detail"] or ""], metadata=stored["metadata"])
            turn.items.append(item)
            if stored["status"] in ("in_progress", "awaiting_approval"):
                turn.open_item = item
        turn.steer_tx, turn.steer_rx = trio.open_memory_channel[str](float("inf"))
        turn.resume = carried
        record = carried.get("approval")
        if record is not None:
            # Registered now, before any op is taken, so a decision that arrives first finds it pending.
            item = next(i for i in turn.items if i.id == record["item_id"])
            self._waiters[record["id"]] = _Waiter(record, turn, item)
            turn.pending_approvals[record["id"]] = item.id
        self.active = turn
        assert self._nursery is not None
        done = WriteRequest()
        done.result = outcome.Value(None)
        done.done.set()
        self._nursery.start_soon(self._run_turn, turn, done)

    async def _carry_on(self, turn: _Turn) -> None:
        """The part of a resumed turn before its model continues: a pending approval is waited for again
        (its deadline is the stored one), then the tool runs (allowed) or is denied, and its result recorded."""
        carried = turn.resume or {}
        record = carried.get("approval")
        if record is None:
            return
        item = next(i for i in turn.items if i.id == record["item_id"])
        turn.open_item = item
        denial = await self._await_decision(turn, item, record)
        meta = item.metadata or {}
        if denial is not None:
            result = ToolOutcome(denial, is_error=True)
        else:
            result = await self._start_tool(turn, item, record["tool"], record["input"])
        self._tool_result(turn, ToolResult(meta.get("tool_use_id") or item.id, result.content, result.is_error))

    # ---- the turn task ---------------------------------------------------------------------

    def _open_item(self, turn: _Turn, kind: str, metadata: dict[str, Any] | None = None) -> _Item:
        if turn.open_item is not None and turn.open_item.kind == kind and metadata is None:
            return turn.open_item
        self._close_open_item(turn, "completed")
        item = self._next_item(turn, kind)
        if turn.retries:
            metadata = {**(metadata or {}), "retries": turn.retries}
        item.metadata = metadata
        turn.open_item = item
        self._submit(
            f"record the output of turn '{turn.id}'",
            statements=[self._insert_item(turn, item, self.thread_id)],
            events=[EventDraft(self.thread_id, "item.started", {"kind": kind, **(metadata or {})}, turn.id, item.id,
                               item.started_at)],
        )
        return item

    def _tool_call(self, turn: _Turn, call: ToolCall) -> None:
        self._open_item(turn, "tool_call", {"tool_use_id": call.id, "name": call.name, "input": call.input})

    def _tool_result(self, turn: _Turn, result: ToolResult) -> None:
        item = turn.open_item
        if item is None or item.kind != "tool_call" or (item.metadata or {}).get("tool_use_id") != result.id:
            item = next((i for i in reversed(turn.items) if i.kind == "tool_call"
                         and (i.metadata or {}).get("tool_use_id") == result.id), None)
            if item is None:
                raise ModelError(f"tool result for unknown call {result.id!r}")
            turn.open_item = item
        item.metadata = {**(item.metadata or {}), "result": result.content, "is_error": result.is_error}
        item.parts[:] = [result.content]
        self._close_open_item(turn, "completed")

    def _close_open_item(self, turn: _Turn, status: str) -> None:
        item = turn.open_item
        if item is None:
            return
        turn.open_item = None
        item.status = status
        now = utc_now()
        text = "".join(item.parts)
        event = {"completed": "item.completed", "interrupted": "item.interrupted"}.get(status, "item.failed")
        payload: dict[str, Any] = {"kind": item.kind, "text": text}
        if item.metadata:
            payload["metadata"] = item.metadata
        self._submit(
            f"record the output of turn '{turn.id}'",
            statements=[("UPDATE items SET status = ?, summary = ?, detail = ?, metadata = ?, ended_at = ?"
                         " WHERE id = ?",
                         (status, _preview(text), text, json.dumps(item.metadata) if item.metadata else None, now,
                          item.id))],
            events=[EventDraft(self.thread_id, event, payload, turn.id, item.id, now)],
        )

    async def _run_turn(self, turn: _Turn, started: WriteRequest) -> None:
        """Stream the model's answer. Cancelling ``turn.scope`` (interrupt, shutdown) ends it promptly;
        whatever streamed so far is kept, marked with the turn's final status."""
        with trio.CancelScope(shield=True):  # a commit is bounded by SQLite's own work
            await started.done.wait()
        if isinstance(started.result, outcome.Error):
            # The turn was never recorded (the requester gets the storage error, and the lane's failure
            # has retired this engine): forget it. Whoever waits on it asks the successor instead,
            # which knows from the store that there is no such turn.
            log.error("turn %s was not recorded: %s", turn.id, started.result.error)
            self.active = None
            turn.ended.set()
            for waiter in [*turn.interrupt_waiters, *self._idle_waiters]:
                self._spawn_reply(waiter.reply, outcome.Error(EngineEvicted()))
            self._idle_waiters.clear()
            return
        status, error = "completed", None
        history = list(self.messages)
        assert turn.steer_rx is not None
        specs = self._tool_specs()
        request = ModelRequest(
            thread_id=self.thread_id, turn_id=turn.id, model=turn.model, mode=turn.mode,
            system_prompt=self.thread.get("system_prompt"), history=history, prompt=turn.prompt,
            steers=turn.steer_rx, tools=specs,
            run_tool=functools.partial(self._run_tool, turn) if specs else None,
        )
        # Every text the backend sends passes ValidText: valid Unicode before it is stored or sent.
        stream = ValidText(self._continued(turn, request) if turn.resume is not None else self._backend.stream(request))
        try:
            with turn.scope:
                async with contextlib.aclosing(stream):
                    async for event in stream:
                        if isinstance(event, TextDelta):
                            self._delta(turn, "agent_message", event.text)
                        elif isinstance(event, ReasoningDelta):
                            self._delta(turn, "agent_reasoning", event.text)
                        elif isinstance(event, ItemBreak):
                            self._close_open_item(turn, "completed")
                        elif isinstance(event, ToolCall):
                            self._tool_call(turn, event)
                        elif isinstance(event, ToolResult):
                            self._tool_result(turn, event)
                        elif isinstance(event, Retrying):
                            turn.retries = event.attempt
                            self._submit(f"record the output of turn '{turn.id}'", events=[EventDraft(
                                self.thread_id, "turn.retrying", {"attempt": event.attempt, "reason": event.reason},
                                turn_id=turn.id)])
                        elif isinstance(event, Truncated):
                            if turn.open_item is not None:  # written with the item when it closes
                                item = turn.open_item
                                item.metadata = {**(item.metadata or {}), "truncated": True}
                        elif isinstance(event, Usage):
                            turn.usage = event
                        await self._store.throttle()
            if turn.scope.cancelled_caught:
                status, error = turn.end_status, turn.end_error
        except ModelError as exc:
            status, error = "failed", str(exc) or "model error"
        except Exception as exc:
            log.exception("model backend failed on turn %s", turn.id)
            status, error = "failed", f"model backend error: {type(exc).__name__}"
        except BaseException:
            # Cancelled from outside the turn (the engine's nursery, or a cancelled runtime around it),
            # possibly before run() could say why, which it does in the same scheduling batch: the engine
            # is going away and the turn did not finish, so it ends as run() would end it, never "completed".
            self.request_stop(STOPPED)
            raise
        finally:
            # Shielded: the turn's end must be recorded even while the engine is being cancelled.
            # Bounded by final_write_seconds; the writer only ever waits on SQLite.
            with trio.CancelScope(shield=True):
                if turn.parked and self.diverged is None:
                    self._park(turn)
                    return
                if status == "completed" and turn.scope.cancel_called:
                    status, error = turn.end_status, turn.end_error
                held = stream.flush()  # half a surrogate pair the interrupt or failure cut off: U+FFFD
                if held is not None:
                    self._delta(turn, "agent_message" if isinstance(held, TextDelta) else "agent_reasoning",
                                held.text)
                await self._finish_turn(turn, status, error)

    async def _continued(self, turn: _Turn, request: ModelRequest) -> Any:
        """A resumed turn's model stream: first what the turn still waits for (``_carry_on``), then the
        model continues from the history and the turn's items so far (its prompt already among them)."""
        await self._carry_on(turn)
        history = list(self.messages)
        apply_items(history, [item.record(turn.id) for item in turn.items])
        continued = dataclasses.replace(request, history=history, prompt=None)
        async with contextlib.aclosing(self._backend.stream(continued)) as events:
            async for event in events:
                yield event

    def _delta(self, turn: _Turn, kind: str, text: str) -> None:
        item = self._open_item(turn, kind)
        item.parts.append(text)
        self._submit(f"record the output of turn '{turn.id}'", events=[EventDraft(
            self.thread_id, "item.delta", {"delta": text, "kind": kind}, turn.id, item.id)])

    async def _finish_turn(self, turn: _Turn, status: str, error: str | None) -> None:
        """Record the turn's end in one write and answer whoever waits for it; runs shielded, bounded by
        ``final_write_seconds``.

        After a failed write of the lane (now or earlier) the normal end cannot be trusted to fit what
        the store holds, so the turn ends ``failed`` with the storage error through
        ``end_unrecorded_turn`` (idempotent, outside the lane). Whenever the end is not known to have
        committed, the manager gets that same write to retry until it does; if the process stops first,
        restart recovery ends the turn ``interrupted``."""
        now = utc_now()
        usage = turn.usage or Usage(0, 0)
        usage_json = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}
        duration_ms = int(round((trio.current_time() - turn.started_clock) * 1000))
        if self.diverged is None:
            item_status = "completed" if status == "completed" else (
                "interrupted" if status == "interrupted" else "failed")
            self._close_open_item(turn, item_status)
            statements = []
            events = []
            if status == "failed":
                err = self._next_item(turn, "error")
                err.status = "failed"
                err.parts.append(error or "")
                statements.append(self._insert_item(turn, err, self.thread_id, detail=error, ended_at=now))
                events.append(EventDraft(self.thread_id, "item.failed", {"kind": "error", "text": error},
                                         turn.id, err.id, now))
            ended = {**self._turn_record(turn, status), "ended_at": now, "duration_ms": duration_ms,
                     "usage": usage_json, "error": error}
            cancel_statements, cancel_events = self._cancel_pending_approvals(turn, now)
            statements += cancel_statements
            events += cancel_events
            statements += [
                ("UPDATE turns SET status = ?, ended_at = ?, duration_ms = ?, input_tokens = ?, output_tokens = ?,"
                 " error = ?, steer_count = ? WHERE id = ?",
                 (status, now, duration_ms, usage.input_tokens, usage.output_tokens, error, turn.steer_count,
                  turn.id)),
                self._touch(now),
                # Each keyed interrupt's answer is this end (the waiters whose requester gave up get none).
                *[statement for waiter in turn.interrupt_waiters if waiter.claim and not waiter.claim.abandoned
                  for statement in record_claim(waiter.claim, ended)],
            ]
            events.append(EventDraft(self.thread_id, "turn.completed",
                                     {"status": status, "usage": usage_json, "error": error}, turn_id=turn.id))
            request = self._submit(f"record the end of turn '{turn.id}'", statements=statements, events=events)
            for waiter in turn.interrupt_waiters:
                self._claimed(waiter, request)
            # The engine's committed state moves to the new boundary in the same step as the write is queued.
            apply_items(self.messages, [item.record(turn.id, now) for item in turn.items])
            self.total_tokens += usage.input_tokens + usage.output_tokens
        elif isinstance(self.diverged, LeaseLost):
            # Not ours any more: nothing is written (it would be refused, or race the new owner); the new
            # owner's takeover recovery ends the turn ``interrupted``. Waiters get the LeaseLost error.
            status, error = "failed", str(self.diverged)
            request = WriteRequest(action=f"record the end of turn '{turn.id}'")
            request.result = outcome.Error(self._failure())
            request.done.set()
        else:
            status, error = "failed", str(self.diverged)
            request = self._store.submit(self._end_after_failure(turn, error, now, usage, duration_ms))
        self.active = None
        turn.ended.set()
        self._boundary = request
        self._idle_since = trio.current_time()
        if self.diverged is None:
            self._unfolded += len(turn.items)
            self._keep_boundary()
        record = {**self._turn_record(turn, status), "ended_at": now, "duration_ms": duration_ms,
                  "usage": usage_json, "error": error}
        for waiter in turn.interrupt_waiters:
            # After a storage failure the turn ends failed, not interrupted: the interrupt did not
            # happen as asked, and its requester learns why.
            answer = outcome.Value(record) if self.diverged is None else outcome.Error(self._failure())
            self._spawn_reply(waiter.reply, answer, after=request, if_failed="lane")
        snapshot = self.snapshot()
        for waiter in self._idle_waiters:
            if self.diverged is not None:
                # Memory is ahead of the store: the successor answers, from the store (also when the
                # engine is stopping by now: its retirement after the failed write is what stops it).
                self._spawn_reply(waiter.reply, outcome.Error(EngineEvicted()))
            elif self._stopping is not None:
                # The engine is going away: a wait for idle is not answered with a turn cut short.
                if waiter.reply is not None:
                    waiter.reply.close()
            else:
                self._spawn_reply(waiter.reply, outcome.Value(snapshot), after=request, if_failed="successor")
        self._idle_waiters.clear()
        with trio.move_on_after(self._config.final_write_seconds) as bound:
            await request.done.wait()
        if isinstance(request.result, outcome.Value):
            return
        if bound.cancelled_caught:
            log.error("turn %s: final state not committed within %s s", turn.id, self._config.final_write_seconds)
        else:
            log.error("turn %s: failed to record its end: %s", turn.id, request.result.error)
        if self._end_later is not None and not isinstance(self.diverged, LeaseLost):
            # A failed write has made this engine diverge (its lane told it before ``done``); an
            # unfinished one may still commit, and then the retried end finds the turn ended and does nothing.
            reason = str(self.diverged) if self.diverged is not None else (
                f"the store did not record the end of turn '{turn.id}' within {self._config.final_write_seconds:g} s")
            self._end_later(self.thread_id, turn.id, self._ending(turn, reason, now, usage, duration_ms))

    def _ending(self, turn: _Turn, error: str, now: str, usage: Usage,
                duration_ms: int) -> Callable[[sqlite3.Connection], list[EventDraft]]:
        """``end_unrecorded_turn`` bound to ``turn`` and what the engine knows of it."""
        texts = {item.id: (_preview(text), text) for item in turn.items for text in ["".join(item.parts)]}
        return functools.partial(end_unrecorded_turn, thread_id=self.thread_id, turn_id=turn.id, error=error,
                                 now=now, usage=usage, duration_ms=duration_ms, texts=texts)

    def _end_after_failure(self, turn: _Turn, error: str, now: str, usage: Usage, duration_ms: int) -> WriteRequest:
        """The write that ends ``turn`` ``failed`` with ``error`` whatever of its writes were lost; outside
        the lane, so a failed lane does not stop it."""
        return WriteRequest(fn=self._ending(turn, error, now, usage, duration_ms), fn_events=True,
                            action=f"record the end of turn '{turn.id}' after a storage error")


def end_unrecorded_turn(conn: sqlite3.Connection, *, thread_id: str, turn_id: str, error: str, now: str,
                        usage: Usage, duration_ms: int, texts: dict[str, tuple[str, str]]) -> list[EventDraft]:
    """End a turn whose engine could not record its end: ``failed`` with ``error``, like a turn that
    failed normally (its open items ``failed`` with the text the engine had streamed, an ``error``
    item, the turn's usage), and return the events that say so. Runs in the store's writer thread.

    Idempotent: a turn already ended (its normal end committed after all, or an earlier attempt did)
    is left alone and no event is written, so retries and races never end a turn twice. Only rows the
    store has are touched: an item whose start was lost is not invented."""
    row = conn.execute("SELECT status FROM turns WHERE id = ?", (turn_id,)).fetchone()
    if row is None or row["status"] not in ("queued", "in_progress", "awaiting_approval"):
        return []
    events = []
    for approval in conn.execute("SELECT id, item_id FROM approvals WHERE turn_id = ? AND status = 'pending'",
                                 (turn_id,)).fetchall():
        conn.execute("UPDATE approvals SET status = 'canceled', decided_by = 'interrupt', resolved_at = ? WHERE id = ?",
                     (now, approval["id"]))
        events.append(EventDraft(thread_id, "approval.resolved", {
            "approval_id": approval["id"], "decision": "cancel", "decided_by": "interrupt"}, turn_id,
            approval["item_id"], now))
    open_items = conn.execute(
        "SELECT id, kind, summary, detail FROM items WHERE turn_id = ? AND status IN ('queued', 'in_progress',"
        " 'awaiting_approval') ORDER BY ord", (turn_id,)).fetchall()
    for item in open_items:
        summary, text = texts.get(item["id"], (item["summary"], item["detail"] or ""))
        conn.execute("UPDATE items SET status = 'failed', summary = ?, detail = ?, ended_at = ? WHERE id = ?",
                     (summary, text, now, item["id"]))
        events.append(EventDraft(thread_id, "item.failed", {"kind": item["kind"], "text": text}, turn_id,
                                 item["id"], now))
    (last_ord,) = conn.execute("SELECT COALESCE(MAX(ord), 0) FROM items WHERE thread_id = ?", (thread_id,)).fetchone()
    error_id = new_id("item")
    conn.execute(
        "INSERT INTO items (id, turn_id, thread_id, ord, kind, status, summary, detail, metadata, started_at,"
        " ended_at) VALUES (?, ?, ?, ?, 'error', 'failed', ?, ?, NULL, ?, ?)",
        (error_id, turn_id, thread_id, last_ord + 1, _preview(error), error, now, now))
    events.append(EventDraft(thread_id, "item.failed", {"kind": "error", "text": error}, turn_id, error_id, now))
    conn.execute("UPDATE turns SET status = 'failed', ended_at = ?, duration_ms = ?, input_tokens = ?,"
                 " output_tokens = ?, error = ? WHERE id = ?",
                 (now, duration_ms, usage.input_tokens, usage.output_tokens, error, turn_id))
    conn.execute("UPDATE threads SET updated_at = ? WHERE id = ?", (now, thread_id))
    usage_json = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}
    events.append(EventDraft(thread_id, "turn.completed", {"status": "failed", "usage": usage_json, "error": error},
                             turn_id=turn_id, timestamp=now))
    return events
