"""Session files on disk: id validation, atomic writes, and loading with every failure named.

All functions here block; callers run them in a worker thread. ``FileSystem`` is the seam tests use
to inject failures (permission denied, a full disk, a slow write): CI runs as root, where ``chmod``
cannot produce them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

from .errors import InvalidData, InvalidInput, NotFound, StorageError
from .text import surrogate_path
from .transcript import messages_problem

log = logging.getLogger(__name__)

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")
SESSION_SCHEMA_VERSION = 1
TEMP_SUFFIX = ".tmp"


def validate_session_id(session_id: object) -> str:
    """Checked before any path is built, so ``..``, slashes and NUL never reach the file system."""
    if not isinstance(session_id, str) or not SESSION_ID_RE.match(session_id):
        shown = repr(session_id)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        raise InvalidInput(
            f"Invalid session id {shown}: use 1-128 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return session_id


class FileSystem:
    """The file operations sessions need. Override a method in tests to inject a failure."""

    def read_bytes(self, path: Path) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    # An atomic write is ``stage`` (temp file in the same directory, fsync) then ``publish``
    # (``os.replace``, fsync the directory): a reader, or a crash, sees the old file or the new one,
    # never a torn one. Split so the slow half runs in parallel, outside the store's single writer.

    def stage(self, path: Path, data: bytes) -> Path:
        """Write ``data`` to a fresh temp file beside ``path`` and fsync it; returns the temp path."""
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
        try:
            with open(tmp, "xb") as f:
                self.write_data(f, data)
                f.flush()
                self.fsync_file(f)
        except BaseException:
            self.discard(tmp)
            raise
        return tmp

    def publish(self, tmp: Path, path: Path) -> os.stat_result:
        """``os.replace`` a staged temp file over ``path``, then fsync the directory."""
        try:
            self.replace(tmp, path)
        except BaseException:
            self.discard(tmp)
            raise
        try:
            self.fsync_dir(path.parent)
        except OSError as exc:
            # The new file is already in place and whole (the replace is atomic); failing here would
            # report "nothing changed" for a change that happened. Only the rename's durability
            # across a power loss is in doubt, so say so and go on.
            log.warning("could not fsync %s after replacing %s: %s", path.parent, path.name, exc)
        return os.stat(path)

    def discard(self, tmp: Path) -> None:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass

    def write_data(self, f: Any, data: bytes) -> None:
        f.write(data)

    def fsync_file(self, f: Any) -> None:
        os.fsync(f.fileno())

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def fsync_dir(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, path: Path) -> None:
        os.unlink(path)


def _describe(exc: OSError) -> str:
    if isinstance(exc, IsADirectoryError):
        return "a directory is in the way"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    return exc.strerror or type(exc).__name__


class SessionFiles:
    def __init__(self, directory: Path, fs: FileSystem | None = None) -> None:
        self.directory = directory
        self.fs = fs or FileSystem()

    def path(self, session_id: str) -> Path:
        return self.directory / f"{validate_session_id(session_id)}.json"

    def prepare(self) -> int:
        """Create the directory and remove temp files a crash left behind; returns how many."""
        self.directory.mkdir(parents=True, exist_ok=True)
        removed = 0
        for entry in self.directory.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX):
                entry.unlink(missing_ok=True)
                removed += 1
        return removed

    def read(self, session_id: str) -> tuple[bytes, os.stat_result] | None:
        """The file's bytes and stat, or None when there is no such file; any other failure is a
        StorageError naming it (never "treat as new")."""
        path = self.path(session_id)
        try:
            data = self.fs.read_bytes(path)
            return data, os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"Failed to load session '{session_id}': {_describe(exc)}") from exc

    def load(self, session_id: str) -> dict[str, Any] | None:
        """The parsed document, or None when there is no such file. Every other failure raises:
        InvalidData for a file that does not parse, StorageError for I/O."""
        found = self.read(session_id)
        return parse_document(session_id, found[0]) if found is not None else None

    def load_existing(self, session_id: str) -> dict[str, Any]:
        doc = self.load(session_id)
        if doc is None:
            raise NotFound(f"Session '{session_id}' not found")
        return doc

    def stage(self, session_id: str, data: bytes, action: str) -> Path:
        try:
            return self.fs.stage(self.path(session_id), data)
        except OSError as exc:
            raise StorageError(f"Failed to {action} session '{session_id}': {_describe(exc)}") from exc

    def publish(self, tmp: Path, session_id: str, action: str) -> os.stat_result:
        try:
            return self.fs.publish(tmp, self.path(session_id))
        except OSError as exc:
            raise StorageError(f"Failed to {action} session '{session_id}': {_describe(exc)}") from exc

    def delete(self, session_id: str) -> None:
        try:
            self.fs.remove(self.path(session_id))
        except FileNotFoundError as exc:
            raise NotFound(f"Session '{session_id}' not found") from exc
        except OSError as exc:
            raise StorageError(f"Failed to delete session '{session_id}': {_describe(exc)}") from exc


# A JSON escape of a UTF-16 surrogate (``\ud83d``). Files we write hold none (they are UTF-8 with
# ensure_ascii off), so finding one is rare and only then are the decoded strings searched.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_document(session_id: str, data: bytes) -> dict[str, Any]:
    """The session document in ``data``, checked in depth (every message and block, see
    ``transcript.messages_problem``). Raises InvalidData naming the file and the first bad path."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidData(f"Failed to parse session '{session_id}': {exc}") from exc
    problem = _shape_problem(doc)
    if problem is None and doc["metadata"]["id"] != session_id:
        # A copied or renamed file must never speak for (and overwrite) the session it came from.
        problem = f"metadata.id {doc['metadata']['id']!r} does not match the file name"
    if problem is None and _SURROGATE_ESCAPE.search(data):
        # json.loads joins an escaped pair into its character; only a lone half survives as a surrogate.
        where = surrogate_path(doc)
        if where is not None:
            problem = f"{where}: holds a lone UTF-16 surrogate, which is not valid Unicode text"
    if problem:
        raise InvalidData(f"Failed to parse session '{session_id}': {problem}")
    return doc


def _shape_problem(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return "the file does not hold a JSON object"
    if doc.get("schema_version") != SESSION_SCHEMA_VERSION:
        return f"unsupported schema_version {doc.get('schema_version')!r}"
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return "metadata is missing"
    for key, kind in (("id", str), ("title", str), ("created_at", str), ("updated_at", str), ("revision", int)):
        if not isinstance(meta.get(key), kind):
            return f"metadata.{key} is missing or not a {kind.__name__}"
    total = meta.get("total_tokens", 0)
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        return "metadata.total_tokens must be a non-negative integer"
    for key in ("model", "workspace", "mode"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            return f"metadata.{key} must be a string or null"
    if not isinstance(meta.get("archived", False), bool):
        return "metadata.archived must be a boolean"
    if doc.get("system_prompt") is not None and not isinstance(doc["system_prompt"], str):
        return "system_prompt must be a string or null"
    return messages_problem(doc.get("messages"))


def encode_document(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
