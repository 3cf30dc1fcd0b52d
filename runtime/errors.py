"""Typed errors of the runtime, grouped by how a caller reacts to them.

`web/errors.py` maps each class to an HTTP status in one table; nothing else in the runtime knows
about HTTP. Translate lower-level errors at the boundary with ``raise X(...) from exc`` so the cause
is never lost.
"""

from __future__ import annotations


class RuntimeFailure(Exception):
    """Base of every error the runtime raises on purpose. ``code`` is a stable machine name."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(RuntimeFailure):
    """The caller named a thread, turn or session that does not exist."""

    code = "not_found"


class InvalidInput(RuntimeFailure):
    """The caller's input is malformed: a bad id, a blank prompt, a wrong type."""

    code = "invalid_input"


class InvalidData(RuntimeFailure):
    """Stored data could not be understood (for example an unparseable session file)."""

    code = "invalid_data"


class Conflict(RuntimeFailure):
    """The request clashes with current state: a turn already running, a session busy."""

    code = "conflict"


class IdempotencyKeyInProgress(Conflict):
    """A request with this Idempotency-Key is still running."""

    code = "idempotency_key_in_progress"


class IdempotencyKeyReused(RuntimeFailure):
    """The Idempotency-Key was already used for a different request (method, path or body)."""

    code = "idempotency_key_reused"


class PreconditionFailed(RuntimeFailure):
    """An ``If-Match`` revision did not match what is stored."""

    code = "precondition_failed"


class PayloadTooLarge(RuntimeFailure):
    """The request body is larger than the configured limit."""

    code = "payload_too_large"


class EngineUnavailable(RuntimeFailure):
    """The thread's engine stopped (shutdown, crash) before it could answer."""

    code = "engine_unavailable"


class EngineTimeout(RuntimeFailure):
    """The engine did not accept or answer a request before the caller's deadline."""

    code = "timeout"


class NotOwner(RuntimeFailure):
    """Another live host holds the thread's lease (several hosts on one PostgreSQL): the request must be
    served by that host. Raised BEFORE anything changed; the HTTP layer forwards the request to
    ``advertise_url`` (web/forward.py), or answers 503 when it cannot."""

    code = "not_owner"

    def __init__(self, owner_host_id: str, advertise_url: str = "", thread_id: str | None = None) -> None:
        what = f"thread '{thread_id}'" if thread_id else "this thread"
        super().__init__(f"Host '{owner_host_id}' ({advertise_url}) owns {what}; send the request there")
        self.owner_host_id = owner_host_id
        self.advertise_url = advertise_url
        self.thread_id = thread_id


# The caller's request was refused for what it asked (not for how the disk behaved): raised inside a
# store write, it undoes that write only and never fails the writer's lane (see store.WriteLane).
REJECTIONS = (NotFound, InvalidInput, Conflict, PreconditionFailed, IdempotencyKeyReused, NotOwner)


class StorageError(RuntimeFailure):
    """Reading or writing durable state failed (permissions, a directory in the way, a full disk)."""

    code = "storage_error"


class StorageFull(StorageError):
    """The disk is full: nothing was written."""

    code = "insufficient_storage"


class LeaseLost(StorageError):
    """A write of a thread's engine was refused because this host no longer holds the thread's lease at the
    engine's epoch (PostgreSQL store, issue 15): another host took the thread over; nothing of it was stored."""

    code = "lease_lost"
