"""A committed change's undo file is dropped after the change answered, by one worker thread at a time
(runtime/sessions/undo.py): the answer never waits for it, several changes share the thread, and a stop
that cannot wait for it is bounded and leaves nothing the next start does not settle."""

from __future__ import annotations

import logging
import threading

import pytest
import trio

from runtime.sessions.files import FileSystem
from tests.sessions.conftest import LIMIT, run_turn, sessions_dir

pytestmark = pytest.mark.files_only


def _undo_names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


async def _thread(rt, text: str = "hello there") -> str:
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, text)
    return tid


def _blocking_discard(fs, release: threading.Event, entered: list):
    """``fs.discard`` that, for an undo file (``.bak``), records its thread and waits for ``release``."""

    def discard(path):
        if path.name.endswith(".bak"):
            entered.append((threading.get_ident(), path.name))
            release.wait(timeout=LIMIT)
        FileSystem.discard(fs, path)

    return discard


def _hold_undo_removals(rt):
    """The runtime's FileSystem with undo file removals held (``_blocking_discard``): (fs, the sessions
    directory, the release Event, the list of removals entered)."""
    fs, release, entered = rt.sessions.files.fs, threading.Event(), []
    fs.discard = _blocking_discard(fs, release, entered)
    return fs, sessions_dir(rt), release, entered


async def test_a_save_answers_once_it_committed_and_its_undo_file_goes_after(rt):
    """The undo file (a link to the previous file) matters only until the COMMIT decided; after it the journal
    says to drop it, here or at the next start. So the save answers while the undo file is still there (its
    removal is held until after the answer here: a save that waited for it would wait until LIMIT and
    see it gone), and the file goes once released."""
    tid = await _thread(rt)
    await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
    await rt.sessions.cleaned()
    fs, directory, release, entered = _hold_undo_removals(rt)
    try:
        with trio.fail_after(LIMIT / 2):
            saved = await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
        still_there = _undo_names(directory)
    finally:
        release.set()
    assert saved["session"]["metadata"]["revision"] == 2
    assert len(still_there) == 1 and still_there[0].endswith(".bak")
    await rt.sessions.cleaned()
    del fs.discard
    assert len(entered) == 1
    assert sorted(p.name for p in directory.iterdir()) == ["s.json"]
    assert rt.sessions._unsettled == set()
    # The dropped change's token is retired: the next change's COMMIT forgets its journal row.
    assert rt.sessions._file_docs._retired
    again = await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
    assert again["session"]["metadata"]["revision"] == 3
    await rt.sessions.cleaned()
    assert sorted(p.name for p in directory.iterdir()) == ["s.json"]


async def test_undo_files_queued_meanwhile_go_in_the_thread_already_running(rt):
    """While the thread drops one undo file, the changes committed meanwhile queue theirs, and that same
    thread takes them before it ends: one thread's start and hand-off back for many saves under load."""
    tids = [await _thread(rt, f"hello {i}") for i in range(4)]
    for i, tid in enumerate(tids):
        await rt.sessions.save(thread_id=tid, session_id=f"s{i}", timeout=LIMIT)
    await rt.sessions.cleaned()
    fs, directory, release, entered = _hold_undo_removals(rt)
    try:
        with trio.fail_after(LIMIT / 2):
            for i, tid in enumerate(tids):  # the first one's removal holds the thread; three more queue
                await rt.sessions.save(thread_id=tid, session_id=f"s{i}", timeout=LIMIT)
        assert len(_undo_names(directory)) == 4
    finally:
        release.set()
    await rt.sessions.cleaned()
    del fs.discard
    assert len(entered) == 4
    assert len({ident for ident, _ in entered}) == 1, entered
    assert sorted(p.name for p in directory.iterdir()) == [f"s{i}.json" for i in range(4)]
    assert len(rt.sessions._file_docs._retired) >= 4


async def test_a_failed_undo_file_removal_is_settled_before_the_sessions_next_change(rt):
    """The removal fails (EIO): the save has answered already, so it is not the client's error; the session
    is settled (the journal says committed: the undo file goes) before its next change."""
    tid = await _thread(rt)
    await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
    await rt.sessions.cleaned()
    fs, directory = rt.sessions.files.fs, sessions_dir(rt)

    def discard(path):
        if path.name.endswith(".bak"):
            raise OSError(5, "Input/output error")
        FileSystem.discard(fs, path)

    fs.discard = discard
    saved = await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
    await rt.sessions.cleaned()
    del fs.discard
    assert saved["session"]["metadata"]["revision"] == 2
    assert rt.sessions._unsettled == {"s"}
    assert len(_undo_names(directory)) == 1
    again = await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
    await rt.sessions.cleaned()
    assert again["session"]["metadata"]["revision"] == 3
    assert rt.sessions._unsettled == set()
    assert sorted(p.name for p in directory.iterdir()) == ["s.json"]


async def test_a_stop_waits_for_a_stuck_removal_only_as_long_as_a_commit_and_the_next_start_drops_it(
        open_rt, caplog):
    """A stuck disk under the undo file's removal: the runtime's close waits for it at most commit_timeout,
    then says so; the next start finds a committed change's undo file (the journal says so) and drops it."""
    release, entered = threading.Event(), []
    try:
        async with open_rt() as rt:
            tid = await _thread(rt)
            await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
            await rt.sessions.cleaned()
            fs, directory = rt.sessions.files.fs, sessions_dir(rt)
            fs.discard = _blocking_discard(fs, release, entered)
            await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
            rt.sessions.commit_timeout = 0.3
            caplog.set_level(logging.WARNING, logger="runtime.core")
            closing = trio.current_time()  # leaving the block closes the runtime (real clock here)
        assert trio.current_time() - closing < LIMIT / 2  # the removal is held for LIMIT
        assert len(entered) == 1 and len(_undo_names(directory)) == 1
        assert "were not all dropped within 0.3 s" in caplog.text
        async with open_rt() as again:
            assert sorted(p.name for p in directory.iterdir()) == ["s.json"]
            assert (await again.sessions.get("s"))["metadata"]["revision"] == 2
    finally:
        release.set()


async def test_no_thread_to_start_fails_that_save_or_cleanup_alone_and_the_next_ones_work(rt, monkeypatch):
    """The process cannot start a thread (out of threads): the save that needed the staging thread fails
    having written nothing; one that committed but could not start the undo file's thread has its session
    settled before its next change. Neither queue is left waiting for a thread that never came."""
    tid = await _thread(rt)
    await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
    await rt.sessions.cleaned()
    directory = sessions_dir(rt)
    real = trio.lowlevel.start_thread_soon

    def no_thread(*args, **kwargs):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(trio.lowlevel, "start_thread_soon", no_thread)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
    monkeypatch.setattr(trio.lowlevel, "start_thread_soon", real)
    assert (await rt.sessions.get("s"))["metadata"]["revision"] == 1
    assert sorted(p.name for p in directory.iterdir()) == ["s.json"]
    with trio.fail_after(LIMIT / 2):
        saved = await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)  # the staging queue works
    assert saved["session"]["metadata"]["revision"] == 2
    await rt.sessions.cleaned()

    calls = []

    def no_undo_thread(fn, deliver, *, name=None):
        if name == "session undo files":
            calls.append(name)
            raise RuntimeError("can't start new thread")
        return real(fn, deliver, name=name)

    monkeypatch.setattr(trio.lowlevel, "start_thread_soon", no_undo_thread)
    saved = await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)  # committed all the same
    monkeypatch.setattr(trio.lowlevel, "start_thread_soon", real)
    assert calls and saved["session"]["metadata"]["revision"] == 3
    assert rt.sessions._unsettled == {"s"} and len(_undo_names(directory)) == 1
    with trio.fail_after(LIMIT / 2):
        await rt.sessions.cleaned()  # nothing left running
        again = await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
    await rt.sessions.cleaned()
    assert again["session"]["metadata"]["revision"] == 4 and rt.sessions._unsettled == set()
    assert sorted(p.name for p in directory.iterdir()) == ["s.json"]
