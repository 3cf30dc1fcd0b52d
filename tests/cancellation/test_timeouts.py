"""Timeouts on trio's MockClock (tests request ``autojump_clock`` themselves: pytest-trio picks the clock
from the test's own arguments): exact virtual times, and the engine keeps serving afterwards.

The runtime is opened with ``tests.support.open_runtime``, which keeps autojump from leaping while a
worker thread (SQLite, file I/O) is busy.
"""

from __future__ import annotations

import errno
import threading

import outcome
import pytest
import trio

from runtime import EngineTimeout, EngineUnavailable, Runtime, RuntimeConfig, StorageError
from runtime.engine import ops
from tests.support import open_runtime


@pytest.fixture
async def rt(tmp_path):
    async with open_runtime(tmp_path, inbox_capacity=1, reply_send_seconds=30) as runtime:
        yield runtime


async def _hanging(rt: Runtime) -> tuple[str, str]:
    thread = await rt.create_thread()
    turn = await rt.start_turn(thread["id"], "/hang", timeout=5)
    return thread["id"], turn["id"]


async def test_busy_engine_times_out_at_the_deadline_and_serves_the_next_op(rt, autojump_clock):
    thread_id, turn_id = await _hanging(rt)
    start = trio.current_time()
    with pytest.raises(EngineTimeout, match="answer a session snapshot"):
        await rt.get_session_snapshot(thread_id, wait_for_idle=True, timeout=3)
    assert trio.current_time() - start == 3
    snapshot = await rt.get_session_snapshot(thread_id, timeout=1)
    assert snapshot.turn_in_progress and trio.current_time() - start == 3
    ended = await rt.interrupt_turn(thread_id, turn_id, timeout=1)
    assert ended["status"] == "interrupted"


async def test_a_full_inbox_becomes_engine_timeout_under_the_callers_deadline(rt, autojump_clock):
    thread = await rt.create_thread()
    thread_id = thread["id"]
    handle = await rt.manager.handle(thread_id)
    # Stall the engine: it answers this snapshot inline and blocks sending it, because nobody reads.
    stalled_tx, stalled_rx = trio.open_memory_channel[outcome.Outcome](0)
    await handle.submit(ops.GetSessionSnapshot(reply=stalled_tx))
    await trio.testing.wait_all_tasks_blocked()
    filler_tx, filler_rx = trio.open_memory_channel[outcome.Outcome](0)
    await handle.submit(ops.GetSessionSnapshot(reply=filler_tx))  # fills the one inbox slot
    start = trio.current_time()
    with pytest.raises(EngineTimeout):
        await rt.get_session_snapshot(thread_id, timeout=2)
    assert trio.current_time() - start == 2
    # The stalled requester gives up: the engine drops that reply and serves the queue again.
    stalled_rx.close()
    filler_rx.close()
    snapshot = await rt.get_session_snapshot(thread_id, timeout=1)
    assert snapshot.thread_id == thread_id and trio.current_time() - start == 2


async def test_engine_crash_fails_waiting_requests_at_once(rt, monkeypatch, autojump_clock):
    thread_id, _ = await _hanging(rt)
    engine = rt.manager.engine(thread_id)
    errors = []

    async def waiter():
        with pytest.raises(EngineUnavailable) as info:
            await rt.get_session_snapshot(thread_id, wait_for_idle=True, timeout=60)
        errors.append((info.value, trio.current_time()))

    def crash(op):
        raise RuntimeError("bug in an op handler")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        monkeypatch.setattr(engine, "_on_compact", crash)
        with pytest.raises(EngineUnavailable):
            await rt.compact(thread_id, timeout=60)
    assert errors and errors[0][1] == start  # no timeout was waited out
    # The next request waits for the crashed engine to finish its cleanup and gets a fresh engine.
    assert not (await rt.get_session_snapshot(thread_id, timeout=1)).turn_in_progress
    assert engine.crashed and rt.manager.engine(thread_id) is not engine
    detail = await rt.get_thread(thread_id)
    assert detail["turns"][-1]["status"] == "failed" and detail["turns"][-1]["error"] == "engine crashed"


async def test_shutdown_fails_waiting_requests_at_once(rt, autojump_clock):
    thread_id, turn_id = await _hanging(rt)
    seen = []

    async def waiter():
        with pytest.raises(EngineUnavailable):
            await rt.get_session_snapshot(thread_id, wait_for_idle=True, timeout=60)
        seen.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await rt.shutdown_thread(thread_id, timeout=5)
    assert seen == [start]
    detail = await rt.get_thread(thread_id)
    assert detail["turns"][-1]["id"] == turn_id and detail["turns"][-1]["status"] == "interrupted"


async def test_a_reply_after_the_requester_gave_up_is_dropped_quietly(rt, autojump_clock):
    thread_id, turn_id = await _hanging(rt)
    with pytest.raises(EngineTimeout):
        await rt.get_session_snapshot(thread_id, wait_for_idle=True, timeout=1)
    # The turn ends now: the engine tries to answer the abandoned waiter and must not stall or crash.
    await rt.interrupt_turn(thread_id, turn_id, timeout=1)
    engine = rt.manager.engine(thread_id)
    assert engine is not None and not engine.crashed
    snapshot = await rt.get_session_snapshot(thread_id, timeout=1)
    assert not snapshot.turn_in_progress


async def test_wait_for_idle_save_that_times_out_writes_nothing(rt, tmp_path, autojump_clock):
    thread_id, _ = await _hanging(rt)
    with pytest.raises(EngineTimeout):
        await rt.sessions.save(thread_id=thread_id, session_id="never", wait_for_idle=True, timeout=2)
    assert list((tmp_path / "sessions").iterdir()) == []
    assert (await rt.thread_record(thread_id))["session_id"] is None


# ---- slow disk: real threads, real clock (the seam blocks a worker thread, not the loop) -----


async def test_slow_disk_during_the_commit_still_completes_the_save(tmp_path):
    async with Runtime.open(RuntimeConfig(data_dir=tmp_path)) as rt:
        thread = await rt.create_thread(title="slow disk")
        fs = rt.sessions.files.fs
        entered, release = trio.Event(), threading.Event()
        token = trio.lowlevel.current_trio_token()
        real_write = type(fs).write_data

        def slow_write(self, f, data):
            trio.from_thread.run_sync(entered.set, trio_token=token)
            release.wait(timeout=30)
            real_write(self, f, data)

        fs.write_data = slow_write.__get__(fs)
        results = []

        async def save():
            with trio.CancelScope() as scope:
                results.append(scope)
                results.append(await rt.sessions.save(thread_id=thread["id"], session_id="slow", timeout=0.5))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(save)
            with trio.fail_after(30):
                await entered.wait()
            results[0].cancel()  # a client disconnect or timeout lands during the commit
            release.set()
        assert results[1]["session"]["metadata"]["revision"] == 1  # the save reported success
        assert (tmp_path / "sessions" / "slow.json").exists()
        assert (await rt.thread_record(thread["id"]))["session_id"] == "slow"


async def test_the_shielded_commit_has_its_own_bound(tmp_path):
    async with Runtime.open(RuntimeConfig(data_dir=tmp_path)) as rt:
        thread = await rt.create_thread()
        rt.sessions.commit_timeout = 0.2
        release = threading.Event()
        fs = rt.sessions.files.fs
        real_write = type(fs).write_data

        def stuck_write(self, f, data):
            release.wait(timeout=30)
            real_write(self, f, data)

        fs.write_data = stuck_write.__get__(fs)
        try:
            with trio.fail_after(30):
                with pytest.raises(StorageError, match="did not finish writing within 0.2 s; nothing was saved"):
                    await rt.sessions.save(thread_id=thread["id"], session_id="stuck", timeout=5)
        finally:
            release.set()


async def test_a_full_disk_during_the_commit_is_a_storage_error_and_keeps_the_old_file(tmp_path):
    async with Runtime.open(RuntimeConfig(data_dir=tmp_path)) as rt:
        thread = await rt.create_thread(title="disk")
        await rt.sessions.save(thread_id=thread["id"], session_id="kept", timeout=5)
        before = (tmp_path / "sessions" / "kept.json").read_bytes()

        def full(self, f, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        rt.sessions.files.fs.write_data = full.__get__(rt.sessions.files.fs)
        with pytest.raises(StorageError, match="Failed to save session 'kept': no space left on device"):
            await rt.sessions.save(thread_id=thread["id"], session_id="kept", timeout=5)
        assert (tmp_path / "sessions" / "kept.json").read_bytes() == before
        assert sorted(p.name for p in (tmp_path / "sessions").iterdir()) == ["kept.json"]
        listed = await rt.sessions.list(limit=10)
        assert [s["revision"] for s in listed] == [1]
