"""The fault-injection seam: fail the k-th I/O step of an operation the way a broken disk does.

``FaultPlan`` counts I/O steps while it is armed and raises at step ``fail_at``. Two layers report
steps to it:

- ``plan.connection_factory()``: a ``sqlite3.Connection`` subclass for
  ``RuntimeConfig.sqlite_connection_factory``. Every ``execute`` on every store connection is a step.
  A SQLite fault raises ``sqlite3.OperationalError`` with the real message and ``sqlite_errorcode``.
  Like SQLite itself on SQLITE_FULL / SQLITE_IOERR, a fault at ``COMMIT`` rolls the whole transaction
  back before raising (so a second ``ROLLBACK`` raises "no transaction is active", as it does for real);
  ``rollback=True`` does the same for a fault at any statement (SQLite may do that too).
- ``plan.file_system()``: a ``FileSystem`` (runtime/sessions/files.py) for ``RuntimeConfig.session_fs``.
  Every file operation method is a step; a fault raises ``OSError`` with ENOSPC, EIO or EROFS.

Running an operation once armed with ``fail_at=None`` gives its N; running it again for every
k in 1..N is the I/O twin of the cancel-at-every-step harness (tests/cancellation/harness.py).
``plan.log`` records every step's name, so a test can also assert the order of file operations
(write -> fsync file -> replace -> fsync dir).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sqlite3
from typing import Any

from runtime.sessions.files import FileSystem

# kind -> (SQLite message, SQLite result code): the errors SQLite raises for a full, broken or
# read-only disk.
SQLITE_FAULTS = {
    "sqlite_full": ("database or disk is full", sqlite3.SQLITE_FULL),
    "sqlite_ioerr": ("disk I/O error", sqlite3.SQLITE_IOERR),
    "sqlite_readonly": ("attempt to write a readonly database", sqlite3.SQLITE_READONLY),
}
SQLITE_NAMES = {sqlite3.SQLITE_FULL: "SQLITE_FULL", sqlite3.SQLITE_IOERR: "SQLITE_IOERR",
                sqlite3.SQLITE_READONLY: "SQLITE_READONLY"}
FILE_FAULTS = {"enospc": errno.ENOSPC, "eio": errno.EIO, "erofs": errno.EROFS}
# The FileSystem methods that touch the disk; each call is one step.
FILE_STEPS = ("read_bytes", "write_data", "fsync_file", "link", "replace", "fsync_dir", "remove", "discard")


@dataclasses.dataclass
class FaultPlan:
    kind: str = "sqlite_full"  # a key of SQLITE_FAULTS or FILE_FAULTS
    fail_at: int | None = None
    rollback: bool = False  # SQLite faults at a statement also roll the transaction back
    sql_only_writes: bool = True  # count only statements of the writer connection (not reads)
    armed: bool = False
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: {"sqlite": 0, "file": 0})
    fired: str | None = None  # the step that failed, once it did
    fired_sql: str | None = None  # the SQL statement that failed, when the step was one
    log: list[str] = dataclasses.field(default_factory=list)

    def arm(self, fail_at: int | None, kind: str | None = None, *, rollback: bool | None = None) -> None:
        self.fail_at, self.fired, self.fired_sql, self.armed = fail_at, None, None, True
        self.counts = {"sqlite": 0, "file": 0}
        self.log = []
        if kind is not None:
            self.kind = kind
        if rollback is not None:
            self.rollback = rollback

    def disarm(self) -> None:
        self.armed = False

    @property
    def layer(self) -> str:
        return "sqlite" if self.kind in SQLITE_FAULTS else "file"

    @property
    def count(self) -> int:
        """Steps of the fault's own layer so far (``fail_at`` counts these)."""
        return self.counts[self.layer]

    def step(self, layer: str, name: str) -> bool:
        """Count one step of ``layer``; True when this step must fail."""
        if not self.armed:
            return False
        self.counts[layer] += 1
        self.log.append(f"{layer}:{name}")
        if layer == self.layer and self.counts[layer] == self.fail_at:
            self.fired = f"{layer}:{name}"
            return True
        return False

    # ---- SQLite -------------------------------------------------------------------------------

    def connection_factory(self) -> type[sqlite3.Connection]:
        plan = self

        class FaultyConnection(sqlite3.Connection):
            # The store's writer is the only connection that opens write transactions; with
            # ``sql_only_writes`` only its statements are steps (reads change nothing).
            writer = False

            def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:  # type: ignore[override]
                verb = sql.split(None, 1)[0].upper() if sql.strip() else ""
                if sql.upper().startswith("BEGIN IMMEDIATE"):
                    self.writer = True
                if plan.sql_only_writes and not self.writer:
                    return super().execute(sql, parameters)
                if plan.step("sqlite", verb):
                    plan.fired_sql = sql
                    message, code = SQLITE_FAULTS[plan.kind]
                    if (verb == "COMMIT" or plan.rollback) and self.in_transaction:
                        super().execute("ROLLBACK")  # what SQLite does by itself on SQLITE_FULL/IOERR
                    exc = sqlite3.OperationalError(message)
                    exc.sqlite_errorcode = code  # type: ignore[attr-defined]
                    exc.sqlite_errorname = SQLITE_NAMES[code]  # type: ignore[attr-defined]
                    raise exc
                return super().execute(sql, parameters)

        return FaultyConnection

    # ---- files --------------------------------------------------------------------------------

    def file_system(self, base: type[FileSystem] = FileSystem) -> FileSystem:
        plan = self
        overrides: dict[str, Any] = {}
        for name in FILE_STEPS:
            original = getattr(base, name)

            def wrapper(self: FileSystem, *args: Any, _name: str = name, _original: Any = original) -> Any:
                if plan.step("file", _name):
                    code = FILE_FAULTS[plan.kind]
                    raise OSError(code, os.strerror(code))
                return _original(self, *args)

            overrides[name] = wrapper
        return type("FaultyFileSystem", (base,), overrides)()

