"""Session files on disk: id validation, the all-or-nothing change protocol, and loading with every
failure named.

A change of a session file (save, PATCH, DELETE) keeps the previous state beside the file until the
store's COMMIT has decided, so that a failed COMMIT, a failed file step or a kill -9 at any point ends in
"before" or "after", never in between (docs/design.md, "Sessions", has the whole protocol):

- ``.<id>.<token>.tmp``: the new content, written and fsynced before anything else changes;
- ``.<id>.<token>.bak``: the previous file (a hard link to it during a save, the file itself moved aside
  by a delete);
- ``.<id>.<token>.new``: there was no previous file (a save that creates); a hard link to the new
  content, so a rollback removes the session's file only if it is the one this change put there.

The token also names the change's row in the store's ``session_commits`` journal, written in the same
transaction as the index row and the thread link: a change whose row is committed is finished (its undo
file is dropped), any other is rolled back from its undo file (``settle``).

All functions here block; callers run them in a worker thread. ``FileSystem`` is the seam tests use
to inject failures (permission denied, a full disk, a slow write): CI runs as root, where ``chmod``
cannot produce them.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, Generator

from .. import codec
from ..errors import InvalidData, InvalidInput, NotFound, StorageError, StorageFull
from ..text import surrogate_path
from ..transcript import messages_problem

log = logging.getLogger(__name__)

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")
SESSION_SCHEMA_VERSION = 1
TEMP_SUFFIX = ".tmp"
BACKUP_SUFFIX = ".bak"
ABSENT_SUFFIX = ".new"
WORK_SUFFIXES = (TEMP_SUFFIX, BACKUP_SUFFIX, ABSENT_SUFFIX)

# What the steps of a change staged in a group (``SessionFiles.stage_steps``) wait for before they go on.
WRITTEN = "written"  # every change of the group has written its temp file
FSYNC_DIR = "fsync_dir"  # the directory fsynced once for the whole group


def run_steps(steps: Generator[str, None, Any]) -> Any:
    """Run the steps of one file write alone (``FileSystem.stage_steps``: nothing to wait for at ``WRITTEN``)."""
    try:
        while True:
            wanted = next(steps)
            if wanted != WRITTEN:  # a directory fsync is the group's (runtime/sessions/staging.py)
                steps.close()
                raise RuntimeError(f"run_steps cannot do {wanted!r}")
    except StopIteration as stop:
        return stop.value


# errno values that mean "the disk is full" (StorageFull, HTTP 507) rather than "the disk failed".
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


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


# A change's token (``new_token``): 16 random hex digits drawn once per process, then a counter. uuid4 drew
# 16 bytes from the kernel for every change, on the event loop: a system call that hands the GIL over
# and waits to get it back (~0.1-0.2 ms per save under row 3 of ``make bench``, cProfile). Tokens stay
# unique across restarts (another prefix; a journal row can outlive its process) and within one.
_TOKEN_PREFIX = os.urandom(8).hex()
_TOKEN_COUNT = itertools.count()


def new_token() -> str:
    """A token no other change has had: 32 hex digits, like the uuid4 hex it replaces."""
    return f"{_TOKEN_PREFIX}{next(_TOKEN_COUNT):016x}"


def is_work_file(name: str) -> bool:
    """True for the temp and undo files of an in-flight change (never a session's own file)."""
    return name.startswith(".") and name.endswith(WORK_SUFFIXES)


class FileSystem:
    """The file operations sessions need, one method per disk operation. Override a method in tests to
    inject a failure; the protocol in ``SessionFiles`` only calls these."""

    # Files are opened unbuffered (``buffering=0``): each whole document is one read or one write, and a
    # buffered file added two system calls per open (an ``isatty`` ioctl and an ``lseek``). In a worker
    # thread every system call hands the GIL back and forth with the event loop; under row 3 of
    # ``make bench`` (50 concurrent PUTs) that was ~200 futex calls per save (strace -c -f).

    def read_bytes(self, path: Path) -> bytes:
        with open(path, "rb", buffering=0) as f:
            return f.readall()

    def stage(self, path: Path, data: bytes, tmp: Path | None = None) -> Path:
        """Write ``data`` to a fresh temp file beside ``path`` (``tmp`` when given) and fsync it;
        returns the temp path. On failure the temp file is removed."""
        if tmp is None:
            tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
        return run_steps(self.stage_steps(tmp, data))

    def stage_steps(self, tmp: Path, data: bytes) -> Generator[str, None, Path]:
        """``stage`` as steps: it yields ``WRITTEN`` between the write and the fsync, so that a group of
        changes (runtime/sessions/staging.py) writes every temp file before it fsyncs any: the first fsync's
        journal commit then writes them all, where write, fsync, write, fsync waited for one commit each."""
        try:
            with open(tmp, "xb", buffering=0) as f:
                self.write_data(f, data)
                yield WRITTEN
                self.fsync_file(f)
        except BaseException:
            self.discard(tmp)
            raise
        return tmp

    def publish(self, tmp: Path, path: Path) -> None:
        """``os.replace`` a staged temp file over ``path``, then fsync the directory so the rename is
        durable (the caller commits only after that)."""
        self.replace(tmp, path)
        self.fsync_dir(path.parent)

    def discard(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def write_data(self, f: Any, data: bytes) -> None:
        """All of ``data`` to the unbuffered file ``f`` (a raw write may take only part of it)."""
        view = memoryview(data)
        while view:
            view = view[f.write(view):]

    def fsync_file(self, f: Any) -> None:
        os.fsync(f.fileno())

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def link(self, src: Path, dst: Path) -> None:
        os.link(src, dst)

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


def storage_error(action: str, session_id: str, exc: OSError) -> StorageError:
    """The error for a failed file operation, naming the action: StorageFull for a full disk."""
    cls = StorageFull if exc.errno in FULL_ERRNOS else StorageError
    error = cls(f"Failed to {action} session '{session_id}': {_describe(exc)}")
    error.__cause__ = exc
    return error


@dataclasses.dataclass(frozen=True)
class Change:
    """One change of one session file, named by ``token`` (its file names and its journal row)."""

    session_id: str
    token: str
    directory: Path
    undo: str = ""  # the suffix of the undo file this change made (BACKUP_SUFFIX or ABSENT_SUFFIX)
    size: int = 0  # of the staged file (a rename keeps size and mtime, so the index can hold them)
    mtime_ns: int = 0

    def _work(self, suffix: str) -> Path:
        return self.directory / f".{self.session_id}.{self.token}{suffix}"

    @property
    def path(self) -> Path:
        return self.directory / f"{self.session_id}.json"

    @property
    def tmp(self) -> Path:
        return self._work(TEMP_SUFFIX)

    @property
    def backup(self) -> Path:
        return self._work(BACKUP_SUFFIX)

    @property
    def absent(self) -> Path:
        return self._work(ABSENT_SUFFIX)

    @property
    def undo_path(self) -> Path:
        return self._work(self.undo)


def _with_undo(change: Change, replacing: bool) -> Change:
    """``change`` with the undo file it makes: a backup of the file it replaces, else the "absent" marker."""
    return dataclasses.replace(change, undo=BACKUP_SUFFIX if replacing else ABSENT_SUFFIX)


class SessionFiles:
    def __init__(self, directory: Path, fs: FileSystem | None = None) -> None:
        self.directory = directory
        self.fs = fs or FileSystem()

    def path(self, session_id: str) -> Path:
        return self.directory / f"{validate_session_id(session_id)}.json"

    def prepare(self) -> None:
        """Create the directory. Work files a crash left behind are settled by ``settle``."""
        self.directory.mkdir(parents=True, exist_ok=True)

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
            raise storage_error("load", session_id, exc) from exc

    def load(self, session_id: str) -> dict[str, Any] | None:
        """The parsed document, or None when there is no such file. Every other failure raises:
        InvalidData for a file that does not parse, StorageError for I/O."""
        found = self.read(session_id)
        return parse_document(session_id, found[0]) if found is not None else None

    def exists(self, session_id: str, action: str) -> bool:
        """Whether anything has the session's file name (a file, or anything else in the way). Any
        failure but "no such file" is a StorageError naming ``action``: never taken for "absent", so a
        create can never replace a file it could not see."""
        try:
            os.lstat(self.path(session_id))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise storage_error(action, session_id, exc) from exc
        return True

    def load_existing(self, session_id: str) -> dict[str, Any]:
        doc = self.load(session_id)
        if doc is None:
            raise NotFound(f"Session '{session_id}' not found")
        return doc

    # ---- the change protocol (docs/design.md, "Sessions") ------------------------------------

    def change(self, session_id: str) -> Change:
        """A new change of ``session_id`` (names only; nothing touches the disk)."""
        return Change(validate_session_id(session_id), new_token(), self.directory)

    def stage(self, change: Change, data: bytes, action: str, *, replacing: bool) -> Change:
        """Step 1, outside the store's writer: write and fsync the new content, keep the previous file
        (``replacing``: a hard link to it; else the "absent" marker, a hard link to the new content),
        fsync the directory so the undo file is durable before the session's file can change. Failing,
        it removes what it made (nothing changed); the caller settles the change anyway, in case that
        cleanup failed too."""
        try:
            change = self._write_and_keep(change, data, replacing)
            try:
                self.fs.fsync_dir(self.directory)
            except BaseException:
                self._unstage(change)
                raise
            return self._stat(change)
        except OSError as exc:
            raise storage_error(action, change.session_id, exc) from exc

    def stage_steps(self, change: Change, data: bytes, action: str, *,
                    replacing: bool) -> Generator[str, None, Change]:
        """``stage`` then ``publish``, as the steps of a group of changes staged together
        (runtime/sessions/staging.py). It yields what the group does before it goes on: ``WRITTEN`` (every
        change's temp file written, before any is fsynced) and ``FSYNC_DIR`` twice (the directory fsynced
        once for the whole group; a failed fsync is thrown in there). The same file operations in the same
        order as ``stage`` + ``publish``, and the same cleanup."""
        try:
            change = _with_undo(change, replacing)
            yield from self.fs.stage_steps(change.tmp, data)
            self._keep(change)
            try:
                yield FSYNC_DIR  # the undo file is durable before the session's file can change
            except BaseException:
                self._unstage(change)
                raise
            staged = self._stat(change)
            self.fs.replace(staged.tmp, staged.path)
            yield FSYNC_DIR  # the rename is durable before the COMMIT
        except OSError as exc:
            raise storage_error(action, change.session_id, exc) from exc
        return staged

    def _write_and_keep(self, change: Change, data: bytes, replacing: bool) -> Change:
        """The temp file written and fsynced, and the undo file linked; on failure neither is left."""
        change = _with_undo(change, replacing)
        self.fs.stage(change.path, data, change.tmp)
        self._keep(change)
        return change

    def _keep(self, change: Change) -> None:
        """Link the undo file of a change whose temp file is staged; on failure neither file is left."""
        try:
            if change.undo == BACKUP_SUFFIX:  # the previous file, kept (``_with_undo``)
                self.fs.link(change.path, change.backup)
            else:
                self.fs.link(change.tmp, change.absent)
        except BaseException:
            self._unstage(change)
            raise

    def _unstage(self, change: Change) -> None:
        self.fs.discard(change.undo_path)
        self.fs.discard(change.tmp)

    @staticmethod
    def _stat(change: Change) -> Change:
        st = os.stat(change.tmp)
        return dataclasses.replace(change, size=st.st_size, mtime_ns=st.st_mtime_ns)

    def publish(self, change: Change, action: str) -> None:
        """The end of step 1, in the staging thread, before the writer's request is sent: the staged file
        replaces the session's file, and the directory is fsynced (the COMMIT must never be durable before
        the rename). Not official until that COMMIT: settling without it puts the undo file back."""
        try:
            self.fs.publish(change.tmp, change.path)
        except OSError as exc:
            raise storage_error(action, change.session_id, exc) from exc

    def set_aside(self, change: Change, action: str = "delete") -> Change:
        """A delete's step, in the writer's transaction before COMMIT: the file is renamed to the
        change's backup name (one atomic step: gone, and kept for a rollback), then the directory is
        fsynced. NotFound when there is no file."""
        try:
            if os.path.isdir(change.path):  # rename would move a directory; unlink refuses it, so do we
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(change.path))
            self.fs.replace(change.path, change.backup)
        except FileNotFoundError as exc:
            raise NotFound(f"Session '{change.session_id}' not found") from exc
        except OSError as exc:
            raise storage_error(action, change.session_id, exc) from exc
        try:
            self.fs.fsync_dir(self.directory)
        except OSError as exc:
            raise storage_error(action, change.session_id, exc) from exc
        return dataclasses.replace(change, undo=BACKUP_SUFFIX)

    def finish(self, change: Change) -> None:
        """Step 3, after COMMIT: drop the undo file. Not fsynced: the journal row that makes a leftover
        undo file harmless is deleted only after a later directory fsync (SessionService._retired)."""
        try:
            self.fs.discard(change.undo_path)
        except OSError as exc:
            raise storage_error("clean up after changing", change.session_id, exc) from exc

    def pending(self, session_id: str | None = None) -> list[Change]:
        """Changes with work files on disk (of ``session_id``, or of every session), in name order."""
        found = set()
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            raise storage_error("recover", session_id or "*", exc) from exc
        for name in names:
            if not is_work_file(name):
                continue
            parts = name[1:].split(".")
            if len(parts) != 3 or not SESSION_ID_RE.match(parts[0]):
                continue
            if session_id is None or parts[0] == session_id:
                found.add((parts[0], parts[1]))
        return [Change(sid, token, self.directory) for sid, token in sorted(found)]

    def settle(self, change: Change, committed: bool) -> bool:
        """Finish a change the store committed, or roll back one it did not; idempotent, so a crash
        while settling is settled again at the next start. Returns True when the change had committed
        and its undo file is gone (its journal row may go after the next directory fsync).

        Rolling back: the backup goes back over the file in one rename (none is needed when the file
        was never replaced: both names are links to one inode), or, for a change that created the file,
        the file is removed if it is the one this change put there; the directory is fsynced before the
        undo files go, so a crash in between settles again the same way."""
        fs = self.fs
        try:
            if not committed:
                if change.backup.exists():
                    if not (change.path.exists() and os.path.samefile(change.backup, change.path)):
                        fs.replace(change.backup, change.path)
                        fs.fsync_dir(self.directory)
                elif change.absent.exists() and change.path.exists() and os.path.samefile(
                        change.absent, change.path):
                    fs.remove(change.path)
                    fs.fsync_dir(self.directory)
            for path in (change.tmp, change.backup, change.absent):
                if path.exists():
                    fs.discard(path)
        except OSError as exc:
            raise storage_error("recover", change.session_id, exc) from exc
        return committed


# A JSON escape of a UTF-16 surrogate (``\ud83d``). Files we write hold none (they are UTF-8 with
# ensure_ascii off), so finding one is rare and only then are the decoded strings searched.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Bytes searched for it per call of the regular expression (~1 ms), the GIL offered in between.
ESCAPE_SCAN_SLICE = 1 << 20


def has_surrogate_escape(data: bytes) -> bool:
    """Whether ``data`` holds a surrogate escape (``_SURROGATE_ESCAPE``). Data without a backslash holds
    no escape of any kind, and a ``memchr`` says so (~0.3 ms for 12 MB, where the search took 10-17 ms in
    one call, the GIL held: part of ``parse_document``'s cost over ``json.loads``, row 13a of ``make
    bench``, and a stall of the event loop while a big session was resumed, row 14c). Otherwise the search
    runs a megabyte at a time, the GIL offered in between (``codec.let_others_run``); the slices overlap by
    the length of a match less one, so a match across their border is found."""
    if b"\\" not in data:
        return False
    for start in range(0, len(data), ESCAPE_SCAN_SLICE):
        if start:
            codec.let_others_run()
        if _SURROGATE_ESCAPE.search(data, start, start + ESCAPE_SCAN_SLICE + 3):
            return True
    return False


def parse_document(session_id: str, data: bytes) -> dict[str, Any]:
    """The session document in ``data``, checked in depth (every message and block, see
    ``transcript.messages_problem``). Raises InvalidData naming the file and the first bad path."""
    try:
        doc = codec.loads(data)  # the stdlib decoder in slices; raises exactly what json.loads raises
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidData(f"Failed to parse session '{session_id}': {exc}") from exc
    problem = document_problem(doc, data, session_id)
    if problem:
        raise InvalidData(f"Failed to parse session '{session_id}': {problem}")
    return doc


def document_problem(doc: Any, data: bytes, session_id: str | None) -> str | None:
    """The first thing wrong with ``doc``, decoded from ``data``, as a session document (None: nothing).
    ``session_id``: the file's id, which ``metadata.id`` must equal; None for a document that is not a
    file yet (an import, whose id is checked by the importer)."""
    problem = _shape_problem(doc)
    if problem is None and session_id is not None and doc["metadata"]["id"] != session_id:
        # A copied or renamed file must never speak for (and overwrite) the session it came from.
        problem = f"metadata.id {doc['metadata']['id']!r} does not match the file name"
    if problem is None and has_surrogate_escape(data):
        # json.loads joins an escaped pair into its character; only a lone half survives as a surrogate.
        where = surrogate_path(doc)
        if where is not None:
            problem = f"{where}: holds a lone UTF-16 surrogate, which is not valid Unicode text"
    return problem


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
    if isinstance(meta["revision"], bool) or meta["revision"] < 1:  # bool is an int to isinstance
        return "metadata.revision must be a positive integer"
    for key in ("total_tokens", "message_count"):
        value = meta.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"metadata.{key} must be a non-negative integer"
    for key in ("model", "workspace", "mode"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            return f"metadata.{key} must be a string or null"
    if not isinstance(meta.get("archived", False), bool):
        return "metadata.archived must be a boolean"
    if doc.get("system_prompt") is not None and not isinstance(doc["system_prompt"], str):
        return "system_prompt must be a string or null"
    return messages_problem(doc.get("messages"))


def encode_document(doc: dict[str, Any]) -> bytes:
    return encode_document_with_span(doc)[0]


def encode_document_with_span(doc: dict[str, Any]) -> tuple[bytes, tuple[int, int] | None]:
    """A session document's bytes, and where its messages lie in them (start, end; None when unknown): a
    save compares them with the previous file's (runtime/sessions/filedocs.py)."""
    return codec.dumps_sliced_span(doc, "messages")  # orjson in slices: the stdlib held the GIL ~95 ms for 12 MB
