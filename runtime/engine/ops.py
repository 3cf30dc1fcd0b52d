"""Ops: the messages an engine receives on its inbox, and the snapshot it answers with.

Request ops carry ``reply``: the send side of ``trio.open_memory_channel(0)`` (a oneshot). Ownership
of ``reply`` moves to the engine with the op; the engine sends exactly one ``outcome.Outcome`` on it
and closes it, or closes it unanswered when it stops (the requester then sees EngineUnavailable).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import outcome
import trio

from ..idempotency import Claim

Reply = trio.MemorySendChannel[outcome.Outcome]


@dataclasses.dataclass(eq=False, kw_only=True)
class Op:
    reply: Reply | None = None
    # The request's Idempotency-Key record: stored in the same write as the op's change (runtime.idempotency).
    claim: Claim | None = None


@dataclasses.dataclass(eq=False, kw_only=True)
class StartTurn(Op):
    prompt: str
    model: str | None = None
    mode: str | None = None


@dataclasses.dataclass(eq=False, kw_only=True)
class Steer(Op):
    turn_id: str
    prompt: str


@dataclasses.dataclass(eq=False, kw_only=True)
class Interrupt(Op):
    turn_id: str


@dataclasses.dataclass(eq=False, kw_only=True)
class Compact(Op):
    reason: str | None = None


@dataclasses.dataclass(eq=False, kw_only=True)
class GetSessionSnapshot(Op):
    # False: answer at once with the state at the last turn boundary. True: answer when the turn ends.
    wait_for_idle: bool = False


@dataclasses.dataclass(eq=False, kw_only=True)
class UpdateThread(Op):
    changes: dict[str, Any]


@dataclasses.dataclass(eq=False, kw_only=True)
class DecideApproval(Op):
    approval_id: str
    decision: str  # "allow" | "deny"
    remember: bool = False
    message: str | None = None


# ---- history control: each is checked and applied as one store write (runtime.engine.history) -------------

IF_BUSY = ("reject", "interrupt")


@dataclasses.dataclass(eq=False, kw_only=True)
class HistoryOp(Op):
    # A queued or running turn: "reject" (Conflict) or "interrupt" it first, then apply.
    if_busy: str = "reject"


@dataclasses.dataclass(eq=False, kw_only=True)
class Fork(HistoryOp):
    through_turn_id: str | None = None
    title: str | None = None
    new_thread_id: str


@dataclasses.dataclass(eq=False, kw_only=True)
class Rewind(HistoryOp):
    before_turn_id: str


@dataclasses.dataclass(eq=False, kw_only=True)
class Retry(HistoryOp):
    turn_id: str | None = None
    model: str | None = None
    mode: str | None = None


@dataclasses.dataclass(eq=False, kw_only=True)
class Restore(HistoryOp):
    session_id: str
    revision: int
    messages: list[dict[str, Any]]
    messages_json: bytes | None
    total_tokens: int
    system_prompt: str | None
    safety_session_id: str
    # Given the engine's live state at the moment of the change, the caller's part of the same write
    # (it saves that state as the safety session): a writer-thread function of the connection.
    safety: Callable[["SessionSnapshot"], Callable[[Any], Any]]


@dataclasses.dataclass(eq=False, kw_only=True)
class DeleteThread(HistoryOp):
    pass


@dataclasses.dataclass(frozen=True)
class SessionSnapshot:
    """An engine's committed state: consistent even when taken mid-turn (it excludes the running turn)."""

    thread_id: str
    title: str | None
    messages: tuple[dict[str, Any], ...]
    system_prompt: str | None
    model: str
    mode: str
    workspace: str | None
    total_tokens: int
    turn_in_progress: bool
    active_turn_id: str | None
