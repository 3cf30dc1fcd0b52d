"""Runtime configuration: one frozen dataclass with documented defaults."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Callable

from .idempotency import IDEMPOTENCY_TTL

# An op inbox holds this many queued ops before submitters wait (backpressure, never unbounded memory).
DEFAULT_INBOX_CAPACITY = 32
# Engines with no op and no running turn for this long are evicted; their state is durable.
DEFAULT_IDLE_EVICT_SECONDS = 600.0
# Bound on one engine reply send: the requester is already waiting, so this only trips on a bug.
DEFAULT_REPLY_SEND_SECONDS = 1.0
# Live events buffered per subscriber before it is detached and switched to catching up from the store.
DEFAULT_SUBSCRIBER_BUFFER = 1024
# Write requests the store's group-commit writer may hold before appenders wait.
DEFAULT_WRITE_QUEUE = 4096
# A terminal record (turn interrupted/failed) is written under shield; this bounds that wait.
DEFAULT_FINAL_WRITE_SECONDS = 10.0
# An approval nobody answers expires after this long and counts as a denial (API.md, "Tools and
# approvals": --approval-timeout, default 300 s): long enough for a person to read the request.
DEFAULT_APPROVAL_TIMEOUT = 300.0


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    data_dir: Path
    inbox_capacity: int = DEFAULT_INBOX_CAPACITY
    idle_evict_seconds: float = DEFAULT_IDLE_EVICT_SECONDS
    reply_send_seconds: float = DEFAULT_REPLY_SEND_SECONDS
    subscriber_buffer: int = DEFAULT_SUBSCRIBER_BUFFER
    write_queue: int = DEFAULT_WRITE_QUEUE
    final_write_seconds: float = DEFAULT_FINAL_WRITE_SECONDS
    # How long the answer of a request made with an Idempotency-Key is kept (tests shorten it to expire one).
    idempotency_ttl: float = IDEMPOTENCY_TTL
    # Factory for the model backend; None selects the offline scripted model.
    model_factory: Callable[[], object] | None = None
    default_model: str = "scripted"
    default_mode: str = "default"
    # The tools offered to the model, whatever the backend (a runtime.models.tools.ToolRegistry; typed
    # loosely to keep this module free of the models package). None: no tools (--tools none).
    tools: object | None = None
    # Seconds a pending approval waits for a decision before it expires (wall-clock, across restarts).
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT
    # Test seams for fault injection (tests/faults): the class of every SQLite connection the store
    # opens, and the file-operation layer of session files (None: the real one).
    sqlite_connection_factory: type[sqlite3.Connection] = sqlite3.Connection
    session_fs: object | None = None
    # Where session documents live: "files" (one JSON file each under sessions_dir, the default) or
    # "store" (a row of the store's ``session_docs`` table, written in the same transaction as the index
    # row; runtime/sessions/docs.py). A PostgreSQL store always uses "store" (issue 15).
    session_storage: str = "files"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "runtime.sqlite3"

    @property
    def sessions_dir(self) -> Path:
        return self.data_dir / "sessions"
