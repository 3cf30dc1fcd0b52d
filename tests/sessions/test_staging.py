"""Saves that arrive while a group is being staged are staged together by one worker thread and share its
two directory fsyncs (runtime/sessions/staging.py); each change's failure stays its own, a failed shared
fsync fails (and cleans up) every change waiting on it, and a request that gave up while queued writes
nothing."""

from __future__ import annotations

import errno
import threading

import pytest
import trio

from runtime import StorageError, StorageFull
from runtime.sessions.files import FileSystem
from tests.sessions.conftest import LIMIT, dir_snapshot, run_turn, sessions_dir

pytestmark = pytest.mark.files_only


class GatedFs:
    """Wraps the runtime's FileSystem: counts directory fsyncs, holds the first write of a chosen session
    until released, and fails chosen steps."""

    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs
        self.fsync_dirs = 0
        self.hold_session: str | None = None
        self.entered, self.release = threading.Event(), threading.Event()
        self.fail_write_of: str | None = None
        self.fail_fsync_dir_at: int | None = None  # the n-th directory fsync from now (1-based)
        self.writes: list[str] = []
        self.order: list[str] = []  # write_data, fsync_file and fsync_dir, in the order they ran
        fs.write_data = self.write_data
        fs.fsync_dir = self.fsync_dir
        fs.fsync_file = self.fsync_file

    def write_data(self, f, data):
        session = f.name.split("/")[-1].split(".")[1]  # .<id>.<token>.tmp
        self.writes.append(session)
        self.order.append(f"write {session}")
        if session == self.hold_session:
            self.hold_session = None
            self.entered.set()
            self.release.wait(timeout=LIMIT)
        if session == self.fail_write_of:
            raise OSError(errno.ENOSPC, "No space left on device")
        FileSystem.write_data(self.fs, f, data)

    def fsync_file(self, f):
        self.order.append(f"fsync {f.name.split('/')[-1].split('.')[1]}")
        FileSystem.fsync_file(self.fs, f)

    def fsync_dir(self, directory):
        self.order.append("fsync_dir")
        self.fsync_dirs += 1
        if self.fail_fsync_dir_at is not None and self.fsync_dirs == self.fail_fsync_dir_at:
            raise OSError(errno.EIO, "Input/output error")
        FileSystem.fsync_dir(self.fs, directory)

    def undo(self) -> None:
        del self.fs.write_data, self.fs.fsync_dir, self.fs.fsync_file


async def _sessions(rt, n: int) -> list[str]:
    tids = []
    for i in range(n):
        tid = (await rt.create_thread())["id"]
        await run_turn(rt, tid, f"hello {i}")
        await rt.sessions.save(thread_id=tid, session_id=f"s{i}", timeout=LIMIT)
        tids.append(tid)
    await rt.sessions.cleaned()
    return tids


def _saver(rt, tids: list[str], results: dict[str, object]):
    """``save(i)``: save thread i as session s<i>; its result, or its StorageError, goes in ``results``."""

    async def save(i: int) -> None:
        try:
            results[f"s{i}"] = await rt.sessions.save(thread_id=tids[i], session_id=f"s{i}", timeout=LIMIT)
        except StorageError as exc:
            results[f"s{i}"] = exc

    return save


async def _save_all_while_s0_is_held(rt, gate: GatedFs, tids: list[str]) -> dict[str, object]:
    """Save s0 (its write held until the others queued), then s1.. while it is held; each save's result or
    error, by session."""
    results: dict[str, object] = {}
    save = _saver(rt, tids, results)
    gate.hold_session = "s0"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(save, 0)
        await trio.to_thread.run_sync(gate.entered.wait, LIMIT)
        for i in range(1, len(tids)):
            nursery.start_soon(save, i)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the others queued behind the held group
        gate.release.set()
    await rt.sessions.cleaned()
    return results


async def test_saves_queued_meanwhile_are_staged_as_one_group_with_two_directory_fsyncs(rt, monkeypatch):
    tids = await _sessions(rt, 4)
    gate = GatedFs(rt.sessions.files.fs)
    handoffs = []  # the staging thread's hand-offs to the event loop
    run_sync_soon = trio.lowlevel.TrioToken.run_sync_soon

    def counted(token, *args, **kwargs):
        if threading.current_thread().name == "session staging":
            handoffs.append(args[0])
        return run_sync_soon(token, *args, **kwargs)

    monkeypatch.setattr(trio.lowlevel.TrioToken, "run_sync_soon", counted)
    try:
        results = await _save_all_while_s0_is_held(rt, gate, tids)
    finally:
        gate.undo()
        monkeypatch.undo()
    assert len(handoffs) == 2  # one per group: s0's, then s1-s3's together
    assert all(r["session"]["metadata"]["revision"] == 2 for r in results.values()), results
    # s0 alone (two fsyncs), then s1-s3 together (two more); one thread per save would have made eight.
    assert gate.fsync_dirs == 4
    # The group wrote every temp file before it fsynced any (one journal commit for them all).
    assert gate.order[:4] == ["write s0", "fsync s0", "fsync_dir", "fsync_dir"], gate.order
    group = gate.order[4:]
    assert sorted(group[:3]) == ["write s1", "write s2", "write s3"], gate.order
    assert sorted(group[3:6]) == ["fsync s1", "fsync s2", "fsync s3"] and group[6:] == ["fsync_dir"] * 2, gate.order
    assert sorted(gate.writes) == ["s0", "s1", "s2", "s3"]
    assert sorted(dir_snapshot(sessions_dir(rt))) == [f"s{i}.json" for i in range(4)]
    for i in range(4):
        assert (await rt.sessions.get(f"s{i}"))["metadata"]["revision"] == 2


async def test_a_failed_write_in_a_group_fails_that_save_alone(rt):
    tids = await _sessions(rt, 4)
    before = dir_snapshot(sessions_dir(rt))
    gate = GatedFs(rt.sessions.files.fs)
    gate.fail_write_of = "s2"
    try:
        results = await _save_all_while_s0_is_held(rt, gate, tids)
    finally:
        gate.undo()
    assert isinstance(results["s2"], StorageFull), results
    assert [results[f"s{i}"]["session"]["metadata"]["revision"] for i in (0, 1, 3)] == [2, 2, 2]
    after = dir_snapshot(sessions_dir(rt))
    assert sorted(after) == [f"s{i}.json" for i in range(4)]  # no work file of s2 left
    assert after["s2.json"] == before["s2.json"]
    assert (await rt.sessions.get("s2"))["metadata"]["revision"] == 1
    assert (await rt.sessions.get("s3"))["metadata"]["revision"] == 2


@pytest.mark.parametrize("which", [1, 2], ids=["first fsync", "second fsync"])
async def test_a_failed_shared_directory_fsync_fails_every_save_of_the_group_and_changes_nothing(rt, which):
    """The group s1-s3 shares its fsyncs: the ``which``-th of them fails. Before the first one, nothing is in
    place (each change drops its temp and undo files); after the rename, each is put back from its undo
    file (settled as not committed). Either way all three fail, and their files are as before."""
    tids = await _sessions(rt, 4)
    before = dir_snapshot(sessions_dir(rt))
    gate = GatedFs(rt.sessions.files.fs)
    gate.fail_fsync_dir_at = 2 + which  # s0's group makes the first two
    try:
        results = await _save_all_while_s0_is_held(rt, gate, tids)
    finally:
        gate.undo()
    assert results["s0"]["session"]["metadata"]["revision"] == 2
    for i in (1, 2, 3):
        assert isinstance(results[f"s{i}"], StorageError) and "input/output error" in results[f"s{i}"].message.lower()
        assert (await rt.sessions.get(f"s{i}"))["metadata"]["revision"] == 1
    after = dir_snapshot(sessions_dir(rt))
    assert sorted(after) == [f"s{i}.json" for i in range(4)]
    assert {k: v for k, v in after.items() if k != "s0.json"} == {k: v for k, v in before.items() if k != "s0.json"}
    assert rt.sessions._unsettled == set()


async def test_a_save_that_gave_up_while_queued_writes_nothing(rt):
    """s1 waits in the queue behind s0's held group past its commit bound: it answers that nothing was saved,
    and when the group thread reaches it, it writes nothing at all."""
    tids = await _sessions(rt, 2)
    before = dir_snapshot(sessions_dir(rt))
    gate = GatedFs(rt.sessions.files.fs)
    rt.sessions.commit_timeout = 0.5
    gate.hold_session = "s0"
    results: dict[str, object] = {}
    save = _saver(rt, tids, results)

    try:
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(save, 0)
                await trio.to_thread.run_sync(gate.entered.wait, LIMIT)
                await save(1)  # times out in the queue (real clock, 0.5 s)
                gate.release.set()
        rt.sessions.commit_timeout = LIMIT
        await rt.sessions.cleaned()
        await rt.sessions._file_docs.stager._thread.idle()
    finally:
        gate.release.set()
        gate.undo()
    assert isinstance(results["s1"], StorageError) and "nothing was saved" in results["s1"].message, results
    assert gate.writes == ["s0"]  # s1's staging never wrote its temp file
    assert dir_snapshot(sessions_dir(rt))["s1.json"] == before["s1.json"]
    again = await rt.sessions.save(thread_id=tids[1], session_id="s1", timeout=LIMIT)
    assert again["session"]["metadata"]["revision"] == 2
