"""All-or-nothing changes of ``<data-dir>/mcp.json``, committed with the store: the file change, its journal
row and (for a keyed POST) the request's idempotency record are one change, so a crash at any point leaves
the old file and no record, or the new file and its record (docs/design.md, "Tools from MCP servers").

The protocol mirrors the session files' (runtime/sessions/files.py), for one file:

1. *Stage* (inside the writer's transaction, in the writer thread): the new content to
   ``.mcp.json.<token>.tmp`` (0600: it holds secrets), fsynced; the previous state kept as an undo file,
   ``.mcp.json.<token>.bak`` (a hard link to the current file) or, when there is no file,
   ``.mcp.json.<token>.new`` (a hard link to the new content: "there was no file"); the directory fsynced.
2. *Commit*: in the same transaction, the journal row ``mcp_commits(token)`` (earlier rows deleted: their
   undo files are gone, made durable by this change's directory fsync), the idempotency record; last, the
   temp file renamed over ``mcp.json`` and the directory fsynced (the rename is durable before COMMIT).
3. *Settle* (after the write is done, from the journal, never from the exception): token committed -> drop
   the undo file; not committed -> put the undo file back (or remove the created file when it is the one
   this change put there), fsync the directory, drop the work files.

On start, before the file is read, every change with work files on disk is settled the same way, and the
journal emptied. All file functions here block (the writer thread or a worker thread runs them).
``McpFileSystem`` is the seam tests use to stop (copy the data dir: a kill -9) before any file step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import sqlite3
from pathlib import Path
from typing import Any

from .config import FILE_NAME, ServerConfig

WORK_RE = re.compile(r"\." + re.escape(FILE_NAME) + r"\.([0-9a-f]{1,64})\.(tmp|bak|new)\Z")


class McpFileSystem:
    """The file operations of the protocol, one method per disk operation (the test seam)."""

    def create(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def link(self, src: Path, dst: Path) -> None:
        os.link(src, dst, follow_symlinks=False)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def remove(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def fsync_dir(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclasses.dataclass(frozen=True)
class FileChange:
    """One change of mcp.json, named by ``token`` (its work files and its journal row)."""

    data_dir: Path
    token: str

    def _work(self, suffix: str) -> Path:
        return self.data_dir / f".{FILE_NAME}.{self.token}.{suffix}"

    @property
    def path(self) -> Path:
        return self.data_dir / FILE_NAME

    @property
    def tmp(self) -> Path:
        return self._work("tmp")

    @property
    def backup(self) -> Path:
        return self._work("bak")

    @property
    def absent(self) -> Path:
        return self._work("new")


def encode(servers: dict[str, ServerConfig]) -> bytes:
    return (json.dumps({"mcpServers": {name: cfg.to_file() for name, cfg in servers.items()}}, indent=2)
            + "\n").encode("utf-8")


class McpFile:
    """The protocol's steps for ``<data_dir>/mcp.json`` (see the module docstring)."""

    def __init__(self, data_dir: Path, fs: McpFileSystem | None = None) -> None:
        self.data_dir = data_dir
        self.fs = fs or McpFileSystem()

    def change(self) -> FileChange:
        return FileChange(self.data_dir, secrets.token_hex(8))

    def stage(self, change: FileChange, servers: dict[str, ServerConfig]) -> None:
        """Step 1. A failure leaves work files that ``settle`` (not committed) removes."""
        self.fs.create(change.tmp, encode(servers))
        if change.path.exists():
            self.fs.link(change.path, change.backup)
        else:
            self.fs.link(change.tmp, change.absent)
        self.fs.fsync_dir(self.data_dir)

    def publish(self, change: FileChange) -> None:
        """Step 2's last part: the new file in place, durably, before the COMMIT."""
        self.fs.replace(change.tmp, change.path)
        self.fs.fsync_dir(self.data_dir)

    def settle(self, change: FileChange, committed: bool) -> None:
        """Step 3 (and recovery). Committed: drop the undo file (not fsynced: the journal row stays until a
        later change's directory fsync made this durable). Not committed: the file as it was before."""
        if not committed:
            if change.backup.exists():
                if not _same_file(change.backup, change.path):
                    self.fs.replace(change.backup, change.path)
            elif change.absent.exists() and _same_file(change.absent, change.path):
                self.fs.remove(change.path)
            self.fs.fsync_dir(self.data_dir)
        for work in (change.tmp, change.backup, change.absent):
            if work.exists():
                self.fs.remove(work)

    def fsync_dir(self) -> None:
        self.fs.fsync_dir(self.data_dir)

    def pending(self) -> list[FileChange]:
        """Every change with work files on disk (an interrupted one), from the directory."""
        tokens = sorted({m.group(1) for name in os.listdir(self.data_dir) if (m := WORK_RE.fullmatch(name))})
        return [FileChange(self.data_dir, token) for token in tokens]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return False


def _host(conn: Any) -> str | None:
    """The host whose mcp.json this is, on a store several hosts share (PostgreSQL: the journal's rows are
    keyed by host, since each host has its own data dir and mcp.json); None on SQLite (one host)."""
    return getattr(conn, "host_id", None)


def journal(conn: sqlite3.Connection, change: FileChange) -> None:
    """Record ``change`` as committed (the row commits with the change or not at all). Earlier rows go: each
    earlier change was settled (its undo file removed) before this one began, and this change's staging
    fsynced the directory, so no removed undo file can come back while its row is gone."""
    host = _host(conn)
    if host is not None:
        conn.execute("DELETE FROM mcp_commits WHERE host_id = ?", (host,))
        conn.execute("INSERT INTO mcp_commits (host_id, token) VALUES (?, ?)", (host, change.token))
        return
    conn.execute("DELETE FROM mcp_commits")
    conn.execute("INSERT INTO mcp_commits (token) VALUES (?)", (change.token,))


def is_committed(conn: sqlite3.Connection, token: str) -> bool:
    host = _host(conn)
    if host is not None:
        return conn.execute("SELECT 1 FROM mcp_commits WHERE host_id = ? AND token = ?", (host, token)).fetchone() is not None
    return conn.execute("SELECT 1 FROM mcp_commits WHERE token = ?", (token,)).fetchone() is not None


def committed_tokens(conn: sqlite3.Connection) -> set[str]:
    host = _host(conn)
    if host is not None:
        return {row[0] for row in conn.execute("SELECT token FROM mcp_commits WHERE host_id = ?", (host,))}
    return {row[0] for row in conn.execute("SELECT token FROM mcp_commits")}


def writer_fn(files: McpFile, change: FileChange, servers: dict[str, ServerConfig], claim: Any,
              answer: Any, action: str) -> Any:
    """The store write (``fn``, in the writer thread) that makes the change: stage, journal, record, publish.
    An OSError becomes the StorageError naming ``action`` (StorageFull for a full disk)."""
    from ..store import storage_error

    def write(conn: sqlite3.Connection) -> None:
        try:
            files.stage(change, servers)
            journal(conn, change)
            if claim is not None:
                claim.record(conn, answer)
            files.publish(change)  # last: a failure before it changed no file
        except OSError as exc:
            raise storage_error(action, exc) from exc

    return write
