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
# How long a thread's lease lasts unless its owner renews it (issue 15; API.md "Several hosts on one
# PostgreSQL": --lease-ttl, default 10 s): a dead host's threads move within this plus a renewal period.
DEFAULT_LEASE_TTL = 10.0
# The file in the data dir that keeps a generated host id across restarts.
HOST_ID_FILE = "host_id"


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
    # The store (issue 15): None (or "sqlite") is SQLite at ``db_path``; a ``postgresql://`` URL is PostgreSQL
    # shared by several hosts (CLI --store, env TRIO_RUNTIME_STORE). Never logged: it may hold a password.
    store_url: str | None = None
    # This host's name among the hosts of one PostgreSQL (lease owner): --host-id, else generated once and
    # kept in <data-dir>/host_id (resolve_host_id; Runtime.open fills it in, never None after open).
    host_id: str | None = None
    # The URL other hosts forward requests for this host's threads to (--advertise-url; default the bound URL).
    advertise_url: str | None = None
    # Seconds a thread lease lasts without renewal (--lease-ttl).
    lease_ttl: float = DEFAULT_LEASE_TTL
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


def resolve_host_id(data_dir: Path) -> str:
    """This host's id kept in ``<data-dir>/host_id``: read it, or generate one and write it (atomically, so
    two starts never see a half-written id). Kept so a restarted host keeps owning its leases' name."""
    import os
    import secrets
    import socket

    path = data_dir / HOST_ID_FILE
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        value = ""
    if value:
        return value
    data_dir.mkdir(parents=True, exist_ok=True)
    value = f"{socket.gethostname().split('.')[0] or 'host'}-{secrets.token_hex(4)}"
    tmp = path.with_name(f".{HOST_ID_FILE}.{os.getpid()}.tmp")
    tmp.write_text(value + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return value
