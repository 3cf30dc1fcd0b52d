"""Ops: the messages an engine receives on its inbox, and the snapshot it answers with.

Request ops carry ``reply``: the send side of ``trio.open_memory_channel(0)`` (a oneshot). Ownership
of ``reply`` moves to the engine with the op; the engine sends exactly one ``outcome.Outcome`` on it
and closes it, or closes it unanswered when it stops (the requester then sees EngineUnavailable).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import outcome
import trio

from .idempotency import Claim

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
