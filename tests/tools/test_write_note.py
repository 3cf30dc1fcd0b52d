"""``write_note``: the first tool that touches the disk. Names are checked by the schema and again by
the code, the thread id by the thread-id rule before any path is built, the write is atomic (temp file,
fsync, rename, fsync of the directory) and nothing can land outside ``<data-dir>/notes/<thread_id>/``.
Real files in ``tmp_path``; a disk fault comes through ``os.fsync`` (the seam the write goes through)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from runtime.models.base import ToolOutcome
from runtime.models.tools import MAX_NOTE_CHARS, ToolContext, ToolError, demo_registry, write_note_file


def files_under(root: Path) -> list[str]:
    """Every file and directory under ``root``, relative, sorted (symlinks listed, not followed)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


async def write(data_dir: Path, arguments, thread_id: str = "thr_1") -> ToolOutcome:
    registry = demo_registry()
    return await registry.call("write_note", arguments, ToolContext(thread_id, data_dir))


async def test_a_note_is_written_under_the_threads_directory(data_dir):
    outcome = await write(data_dir, {"name": "shopping-list_2", "text": "milk\neggs ✓"})

    assert outcome == ToolOutcome("Wrote note 'shopping-list_2' (11 characters) to notes/thr_1/shopping-list_2.txt")
    assert (data_dir / "notes" / "thr_1" / "shopping-list_2.txt").read_text("utf-8") == "milk\neggs ✓"
    assert files_under(data_dir) == ["notes", "notes/thr_1", "notes/thr_1/shopping-list_2.txt"]


async def test_writing_again_replaces_the_note_whole_and_leaves_no_temp_file(data_dir):
    await write(data_dir, {"name": "n", "text": "first version, longer than the second"})
    await write(data_dir, {"name": "n", "text": "second"})
    await write(data_dir, {"name": "n", "text": "second"}, thread_id="thr_2")

    assert (data_dir / "notes" / "thr_1" / "n.txt").read_text() == "second"
    assert files_under(data_dir) == ["notes", "notes/thr_1", "notes/thr_1/n.txt", "notes/thr_2", "notes/thr_2/n.txt"]


async def test_the_write_is_synced_before_the_rename_and_the_directory_after(data_dir, monkeypatch):
    """The order that makes it atomic and durable: file data fsynced, then renamed over the note, then
    the directory fsynced (a crash sees the old note or the new one, whole)."""
    steps: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        steps.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src, dst, **kwargs):
        steps.append(f"replace {src.split('.')[1]} -> {dst}")
        real_replace(src, dst, **kwargs)

    await write(data_dir, {"name": "a", "text": "old"})
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    await write(data_dir, {"name": "a", "text": "new"})

    assert steps == ["fsync file", "replace a -> a.txt", "fsync dir"]


async def test_a_disk_fault_leaves_the_old_note_whole_and_removes_the_temp_file(data_dir, monkeypatch):
    await write(data_dir, {"name": "a", "text": "old note"})

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    outcome = await write(data_dir, {"name": "a", "text": "new note that never lands"})

    assert outcome == ToolOutcome("Tool 'write_note' failed: could not write note 'a' of thread 'thr_1':"
                                  " Input/output error", is_error=True)
    assert (data_dir / "notes" / "thr_1" / "a.txt").read_text() == "old note"
    assert files_under(data_dir) == ["notes", "notes/thr_1", "notes/thr_1/a.txt"]


@pytest.mark.parametrize("name, reason", [
    ("..", "'..' does not match '^[A-Za-z0-9_-]{1,64}$'"),
    ("../escape", "'../escape' does not match '^[A-Za-z0-9_-]{1,64}$'"),
    ("/etc/passwd", "'/etc/passwd' does not match '^[A-Za-z0-9_-]{1,64}$'"),
    ("a/b", "'a/b' does not match '^[A-Za-z0-9_-]{1,64}$'"),
    ("nul\x00byte", "'nul\\x00byte' does not match '^[A-Za-z0-9_-]{1,64}$'"),
    ("", "'' does not match '^[A-Za-z0-9_-]{1,64}$'"),
    ("x" * 65, f"'{'x' * 65}' does not match '^[A-Za-z0-9_-]{{1,64}}$'"),
    ("note.txt", "'note.txt' does not match '^[A-Za-z0-9_-]{1,64}$'"),
    ("café", "'café' does not match '^[A-Za-z0-9_-]{1,64}$'"),
    (7, "7 is not of type 'string'"),
])
async def test_a_bad_name_is_refused_by_the_schema_and_nothing_is_written(data_dir, name, reason):
    outcome = await write(data_dir, {"name": name, "text": "x"})

    assert outcome == ToolOutcome(f"Invalid input for tool 'write_note': $.name: {reason}", is_error=True)
    assert files_under(data_dir.parent) == ["data"]


async def test_a_name_with_a_trailing_newline_passes_the_schema_but_not_the_code(data_dir):
    """Python's ``$`` matches before a final newline, so the schema's pattern lets ``"a\\n"`` through:
    the code's own full-match check is what refuses it."""
    outcome = await write(data_dir, {"name": "a\n", "text": "x"})

    assert outcome == ToolOutcome(
        "Tool 'write_note' failed: note name 'a\\n' must be 1 to 64 letters, digits, '_' or '-'", is_error=True)
    assert files_under(data_dir.parent) == ["data"]


@pytest.mark.parametrize("arguments, reason", [
    ({"name": "a"}, "$: 'text' is a required property"),
    ({"name": "a", "text": None}, "$.text: None is not of type 'string'"),
    ({"name": "a", "text": "x", "path": "/tmp/x"},
     "$: Additional properties are not allowed ('path' was unexpected)"),
])
async def test_other_bad_inputs_are_refused(data_dir, arguments, reason):
    outcome = await write(data_dir, arguments)

    assert outcome == ToolOutcome(f"Invalid input for tool 'write_note': {reason}", is_error=True)
    assert files_under(data_dir.parent) == ["data"]


async def test_a_note_longer_than_the_limit_is_refused(data_dir):
    outcome = await write(data_dir, {"name": "big", "text": "x" * (MAX_NOTE_CHARS + 1)})

    assert outcome.is_error and outcome.content.startswith("Invalid input for tool 'write_note': $.text: 'xxx")
    assert outcome.content.endswith("…") or outcome.content.endswith("is too long")
    assert files_under(data_dir.parent) == ["data"]


@pytest.mark.parametrize("thread_id", ["..", "../x", "/abs", "a/b", "nul\x00", "", "-lead", "x" * 129, "a\n"])
async def test_a_bad_thread_id_is_refused_before_any_path_is_built(data_dir, thread_id):
    outcome = await write(data_dir, {"name": "a", "text": "x"}, thread_id=thread_id)

    assert outcome == ToolOutcome(f"Tool 'write_note' failed: thread id {thread_id!r} is not a valid thread id",
                                  is_error=True)
    assert files_under(data_dir.parent) == ["data"]


async def test_a_symlinked_notes_directory_is_not_followed(data_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (data_dir / "notes").symlink_to(outside)

    outcome = await write(data_dir, {"name": "a", "text": "x"})

    assert outcome == ToolOutcome("Tool 'write_note' failed: refusing to write into 'notes': it is a symbolic link"
                                  " or not a directory", is_error=True)
    assert files_under(outside) == []


async def test_a_symlinked_thread_directory_is_not_followed(data_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (data_dir / "notes").mkdir()
    (data_dir / "notes" / "thr_1").symlink_to(outside)

    outcome = await write(data_dir, {"name": "a", "text": "x"})

    assert outcome == ToolOutcome("Tool 'write_note' failed: refusing to write into 'thr_1': it is a symbolic link"
                                  " or not a directory", is_error=True)
    assert files_under(outside) == []


async def test_a_notes_path_that_is_a_file_is_refused(data_dir):
    (data_dir / "notes").write_text("not a directory")

    outcome = await write(data_dir, {"name": "a", "text": "x"})

    assert outcome.is_error and "refusing to write into 'notes'" in outcome.content
    assert (data_dir / "notes").read_text() == "not a directory"


async def test_a_note_that_is_a_symlink_is_replaced_not_written_through(data_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (data_dir / "notes" / "thr_1").mkdir(parents=True)
    (data_dir / "notes" / "thr_1" / "a.txt").symlink_to(victim)

    outcome = await write(data_dir, {"name": "a", "text": "note"})

    assert not outcome.is_error
    assert victim.read_text() == "precious"
    note = data_dir / "notes" / "thr_1" / "a.txt"
    assert not note.is_symlink() and note.read_text() == "note"


def test_the_resolved_path_check_catches_what_the_fds_would_not_see(data_dir, tmp_path, monkeypatch):
    """The second guard: even if the directory fds were somehow fine, a resolved path outside
    ``<data_dir>/notes`` is refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    real_resolve = Path.resolve

    def resolve(self, strict=False):
        if self.name == "thr_1":
            return outside
        return real_resolve(self, strict)

    monkeypatch.setattr(Path, "resolve", resolve)
    with pytest.raises(ToolError, match="refusing to write note 'a': its directory resolves outside"):
        write_note_file(data_dir, "thr_1", "a", "x")
    assert files_under(outside) == []


async def test_an_interrupt_during_the_write_takes_effect_once_the_note_is_whole(data_dir, monkeypatch):
    """The write runs in a worker thread that is not abandoned: an interrupt that arrives while the
    thread writes waits for the write, and the call reports what was done (the note was written, so
    the engine can record it); the turn stops at its next checkpoint. The note is whole, no temp file."""
    registry = demo_registry()
    in_fsync, release = trio.Event(), threading.Event()
    real_fsync = os.fsync
    token = trio.lowlevel.current_trio_token()

    def slow_fsync(fd):
        if not release.is_set():
            trio.from_thread.run_sync(in_fsync.set, trio_token=token)
            release.wait(timeout=10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    outcomes: list[ToolOutcome] = []
    interrupt = trio.CancelScope()

    async def call() -> None:
        with interrupt:
            outcomes.append(await registry.call("write_note", {"name": "a", "text": "whole"},
                                                ToolContext("thr_1", data_dir)))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await in_fsync.wait()  # the worker is inside the write, before the rename
            interrupt.cancel(reason="turn interrupted by test")
            await trio.testing.wait_all_tasks_blocked()
            assert not (data_dir / "notes" / "thr_1" / "a.txt").exists()  # the call still waits for the thread
            release.set()

    assert interrupt.cancel_called
    assert outcomes == [ToolOutcome("Wrote note 'a' (5 characters) to notes/thr_1/a.txt")]
    assert (data_dir / "notes" / "thr_1" / "a.txt").read_text() == "whole"
    assert files_under(data_dir) == ["notes", "notes/thr_1", "notes/thr_1/a.txt"]
