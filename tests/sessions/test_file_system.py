"""The real ``FileSystem`` does on disk what its steps are named for. The fault and order suites
(tests/faults) watch these steps through the seam, by name; this checks what each durable step really
asks of the kernel, so that a step whose body lost its ``fsync`` does not pass as one that has it."""

from __future__ import annotations

import os
import stat

from runtime.sessions.files import FileSystem


def _recorded_fsyncs(monkeypatch) -> list[os.stat_result]:
    """Every os.fsync from now on, as the stat of what it was called on (taken at the call, while the
    descriptor is open); the real fsync still runs."""
    seen: list[os.stat_result] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append(os.fstat(fd))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_a_staged_file_is_fsynced_with_its_content_before_stage_returns(tmp_path, monkeypatch):
    seen = _recorded_fsyncs(monkeypatch)
    data = b'{"hello": "world"}' * 1000
    tmp = FileSystem().stage(tmp_path / "s.json", data)
    assert tmp.read_bytes() == data
    [synced] = seen
    assert stat.S_ISREG(synced.st_mode) and synced.st_ino == tmp.stat().st_ino and synced.st_size == len(data)


def test_a_published_file_is_renamed_then_its_directory_fsynced(tmp_path, monkeypatch):
    fs = FileSystem()
    tmp = fs.stage(tmp_path / "s.json", b"{}")
    seen = _recorded_fsyncs(monkeypatch)
    fs.publish(tmp, tmp_path / "s.json")
    assert (tmp_path / "s.json").read_bytes() == b"{}" and not tmp.exists()
    [synced] = seen
    assert stat.S_ISDIR(synced.st_mode) and synced.st_ino == tmp_path.stat().st_ino
