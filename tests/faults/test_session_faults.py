"""Session files stay all-or-nothing under every storage failure, and under a kill -9 at any step.

Real SQLite and real files; the faults come through the seam (tests/faults/seam.py): the k-th SQLite
statement of the store's writer fails like a full or broken disk (at COMMIT SQLite has already rolled
back; with ``rollback`` it has at any statement), or the k-th file operation fails with ENOSPC, EIO or
EROFS. The operations and how each run is judged: tests/faults/session_cases.py. Here: the defects
this suite was built on, the order of file operations (the fsyncs a kill -9 cannot see), failures
while settling, and the short every-step runs (two fault kinds per operation, a kill before every
step of the file-changing operations). The full runs are in tests/reliability/test_disk_faults.py.
Run with ``-s`` to see each case's N. A change answers once it committed, and a worker thread drops its
undo file after that (runtime/sessions/undo.py): ``rt.sessions.cleaned()`` before a fault plan is armed
or disarmed keeps that removal inside the steps of the change it belongs to.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import threading
from typing import Iterator

import pytest
import trio
import trio.testing

from runtime import StorageError, StorageFull
from runtime.sessions.files import FileSystem
from tests.cancellation.harness import capture, check_invariants
from tests import support
from tests.support import open_runtime

from .seam import FaultPlan
from .session_cases import (
    CASES, CRASH_ONLY, CRASH_SHORT, LIMIT, SESSION, SHORT_KINDS, Case, assert_unchanged, faulty_runtime, run_every_crash,
    run_every_step, step_of, store_kinds, thread_with_history,
)


@pytest.fixture(params=support.SESSION_STORAGES)
def storage(request) -> Iterator[str]:
    """Run the test with session files and with sessions in the store (RuntimeConfig.session_storage);
    only the tests whose faults reach both take it (a file fault needs files)."""
    with support.session_storage(request.param):
        yield request.param


# ---- defect 1, session side: the file changed before the COMMIT that failed -------------------


async def test_a_failed_commit_of_a_save_keeps_the_previous_file(tmp_path, storage):
    """The save renamed its file into place inside the writer's transaction: when COMMIT then failed
    (SQLite rolled back by itself, as on a full disk), the client heard "nothing was saved" while the
    file on disk was the new one, neither indexed nor linked."""
    data_dir, plan = tmp_path / "data", FaultPlan()
    async with faulty_runtime(data_dir, plan) as rt:
        tid = await thread_with_history(rt, "hello there")
        await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
        # A clean save of new messages (its search text is written: a save that keeps it runs fewer
        # statements), to find the step of its COMMIT.
        await rt.start_turn(tid, "a turn", timeout=LIMIT)
        await rt.get_session_snapshot(tid, wait_for_idle=True, timeout=LIMIT)
        await rt.sessions.cleaned()
        plan.arm(None, "sqlite_full")
        await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
        await rt.sessions.cleaned()
        plan.disarm()
        commit_at = step_of(plan, "sqlite:COMMIT")
        await rt.start_turn(tid, "one more turn", timeout=LIMIT)
        await rt.get_session_snapshot(tid, wait_for_idle=True, timeout=LIMIT)
        before = capture(data_dir)

        await rt.sessions.cleaned()
        plan.arm(commit_at, "sqlite_full")
        with pytest.raises(StorageFull) as info:
            await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
        await rt.sessions.cleaned()
        plan.disarm()
        assert plan.fired == "sqlite:COMMIT"

        after = await check_invariants(rt, data_dir)
        assert_unchanged(before, after)
        assert info.value.message == "Failed to save session 'kept': database or disk is full"
        again = await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
        assert again["session"]["metadata"]["revision"] == 3
        await check_invariants(rt, data_dir)


async def test_a_failed_commit_of_a_delete_keeps_the_file(tmp_path, storage):
    """DELETE unlinked the file inside the writer's transaction: a failing COMMIT left the session
    indexed and linked with no file behind it."""
    data_dir, plan = tmp_path / "data", FaultPlan()
    async with faulty_runtime(data_dir, plan) as rt:
        tid = await thread_with_history(rt, "hello there")
        for session_id in ("probe", "doomed"):
            await rt.sessions.save(thread_id=tid, session_id=session_id, timeout=LIMIT)
        await rt.sessions.cleaned()
        plan.arm(None, "sqlite_ioerr")
        await rt.sessions.delete("probe", timeout=LIMIT)
        await rt.sessions.cleaned()
        plan.disarm()
        commit_at = step_of(plan, "sqlite:COMMIT")
        before = capture(data_dir)

        await rt.sessions.cleaned()
        plan.arm(commit_at, "sqlite_ioerr")
        with pytest.raises(StorageError) as info:
            await rt.sessions.delete("doomed", timeout=LIMIT)
        await rt.sessions.cleaned()
        plan.disarm()
        assert plan.fired == "sqlite:COMMIT" and not isinstance(info.value, StorageFull)

        after = await check_invariants(rt, data_dir)
        assert_unchanged(before, after)
        assert info.value.message == "Failed to delete session 'doomed': disk I/O error"
        assert (await rt.thread_record(tid))["session_id"] == "doomed"
        await rt.sessions.delete("doomed", timeout=LIMIT)
        assert "doomed.json" not in capture(data_dir).files  # neither a file nor a row in the store
        await check_invariants(rt, data_dir)


async def test_a_failed_safety_file_of_a_restore_names_the_restore(tmp_path):
    """The restore's safety session could not be written (a full disk): the client heard "Failed to save
    session '<uuid>'", naming a session it never asked for and that does not exist, instead of the
    restore it asked for. Nothing changed either way."""
    data_dir, plan = tmp_path / "data", FaultPlan()
    async with faulty_runtime(data_dir, plan) as rt:
        tid = await thread_with_history(rt, "hello there")
        await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
        await rt.start_turn(tid, "one more turn", timeout=LIMIT)
        await rt.get_session_snapshot(tid, wait_for_idle=True, timeout=LIMIT)
        before = capture(data_dir)

        await rt.sessions.cleaned()
        plan.arm(2, "enospc")  # step 1 reads 'kept'; step 2 writes the safety file's data
        with pytest.raises(StorageFull) as info:
            await rt.restore_thread(tid, SESSION, timeout=LIMIT)
        await rt.sessions.cleaned()
        plan.disarm()
        assert plan.fired == "file:write_data"

        after = await check_invariants(rt, data_dir, (tid,))
        assert_unchanged(before, after)
        assert after.turns == before.turns
        message = info.value.message
        assert message.startswith(f"Failed to restore thread '{tid}' from session 'kept': ") and message.endswith(
            "no space left on device"), message
        restored = await rt.restore_thread(tid, SESSION, timeout=LIMIT)
        assert restored["session_id"] == SESSION and restored["safety_session_id"] in capture(data_dir).sessions


# ---- the order of file operations (what a kill -9 cannot see: the fsyncs) ---------------------


def _file_order(plan: FaultPlan) -> list[str]:
    """The run's file operations, and where the store's COMMIT fell among them."""
    return [entry for entry in plan.log if entry.startswith("file:") or entry == "sqlite:COMMIT"]


# Each change: the new content is written and fsynced, the undo file made and the directory fsynced
# (so the undo file survives a power loss before the session's file can change), the file replaced
# and the directory fsynced again (the rename is durable before the COMMIT that makes it official),
# and only after the COMMIT the undo file goes.
STAGE_AND_PUBLISH = ["file:write_data", "file:fsync_file", "file:link", "file:fsync_dir",
                     "file:replace", "file:fsync_dir", "sqlite:COMMIT", "file:discard"]


async def test_every_change_writes_fsyncs_replaces_fsyncs_the_directory_then_commits(tmp_path):
    data_dir, plan = tmp_path / "data", FaultPlan()
    async with faulty_runtime(data_dir, plan) as rt:
        tid = await thread_with_history(rt, "hello there")
        orders = {}
        for name, action in (
            ("PUT create", lambda: rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)),
            ("PUT update", lambda: rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)),
            ("POST rebuild", lambda: rt.sessions.rebuild(thread_id=tid, timeout=LIMIT)),
            ("PATCH", lambda: rt.sessions.patch(SESSION, title="renamed", timeout=LIMIT)),
            ("import", lambda: rt.sessions.import_document((data_dir / "sessions" / f"{SESSION}.json").read_bytes(),
                                                           session_id="imported", timeout=LIMIT)),
            ("DELETE", lambda: rt.sessions.delete(SESSION, timeout=LIMIT)),
        ):
            await rt.sessions.cleaned()
            plan.arm(None, "eio")
            await action()
            await rt.sessions.cleaned()
            plan.disarm()
            orders[name] = _file_order(plan)
        assert orders == {
            "PUT create": ["file:read_bytes", *STAGE_AND_PUBLISH],  # read: is there a session to update?
            "PUT update": ["file:read_bytes", *STAGE_AND_PUBLISH],
            "POST rebuild": STAGE_AND_PUBLISH,
            "PATCH": ["file:read_bytes", *STAGE_AND_PUBLISH],
            "import": STAGE_AND_PUBLISH,  # "does it exist?" is a stat, not a read
            # The file is renamed aside (gone, and kept for a rollback), the directory fsynced, COMMIT,
            # then the set-aside file is removed.
            "DELETE": ["file:replace", "file:fsync_dir", "sqlite:COMMIT", "file:discard"],
        }
        await check_invariants(rt, data_dir)


async def test_a_rollback_restores_durably_before_dropping_its_undo_file(tmp_path):
    """After a failed COMMIT: an update puts the previous file back (one rename) and fsyncs the
    directory; a create removes its file and fsyncs the directory before it drops the marker that
    would tell a restart to remove it; a delete renames the file back and fsyncs."""
    data_dir, plan = tmp_path / "data", FaultPlan()
    async with faulty_runtime(data_dir, plan) as rt:
        tid = await thread_with_history(rt, "hello there")
        await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
        orders = {}
        for name, action in (
            ("update", lambda: rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)),
            ("create", lambda: rt.sessions.save(thread_id=tid, session_id="fresh", timeout=LIMIT)),
            ("delete", lambda: rt.sessions.delete(SESSION, timeout=LIMIT)),
        ):
            await rt.sessions.cleaned()
            plan.arm(None, "sqlite_full")
            with contextlib.suppress(StorageError):
                await action()
            commit_at = step_of(plan, "sqlite:COMMIT")
            # The clean run changed the state: undo it through the API so the faulty run meets the same.
            if name == "create":
                await rt.sessions.delete("fresh", timeout=LIMIT)
            elif name == "delete":
                await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
            before = capture(data_dir)
            await rt.sessions.cleaned()
            plan.arm(commit_at, "sqlite_full")
            with pytest.raises(StorageFull):
                await action()
            await rt.sessions.cleaned()
            plan.disarm()
            orders[name] = _file_order(plan)[_file_order(plan).index("sqlite:COMMIT"):]
            assert_unchanged(before, await check_invariants(rt, data_dir))
        assert orders == {
            "update": ["sqlite:COMMIT", "file:replace", "file:fsync_dir"],
            "create": ["sqlite:COMMIT", "file:remove", "file:fsync_dir", "file:discard"],
            "delete": ["sqlite:COMMIT", "file:replace", "file:fsync_dir"],
        }


# ---- a failure while settling: the session is settled before it changes again ----------------


async def test_a_rollback_that_fails_is_finished_before_the_next_change_and_at_restart(tmp_path):
    """The COMMIT fails, and so does putting the previous file back: the client hears the COMMIT's
    error; the session's next change (or the next start) settles it from the journal first, so the
    store and the files agree again and the save gets the very next revision."""
    data_dir, plan = tmp_path / "data", FaultPlan()
    for restart in (False, True):
        async with faulty_runtime(data_dir, plan) as rt:
            tid = await thread_with_history(rt, "hello there")
            await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
            await rt.sessions.cleaned()
            plan.arm(None, "sqlite_full")
            saved = await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
            await rt.sessions.cleaned()
            plan.disarm()
            revision = saved["session"]["metadata"]["revision"]
            commit_at = step_of(plan, "sqlite:COMMIT")
            before = capture(data_dir)
            fs = rt.sessions.files.fs
            real_replace = type(fs).replace

            def replace(self, src, dst):
                if plan.fired:  # the rollback's rename, after the COMMIT failed
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                real_replace(self, src, dst)

            fs.replace = replace.__get__(fs)
            await rt.sessions.cleaned()
            plan.arm(commit_at, "sqlite_full")
            with pytest.raises(StorageFull, match="Failed to save session 'kept': database or disk is full"):
                await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
            await rt.sessions.cleaned()
            plan.disarm()
            del fs.replace
            stuck = capture(data_dir)
            assert stuck.temp_files and stuck.sessions == before.sessions  # not settled yet
            assert rt.sessions._unsettled == {SESSION}
            if not restart:
                again = await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
                assert again["session"]["metadata"]["revision"] == revision + 1
                await check_invariants(rt, data_dir)
        if restart:
            async with open_runtime(data_dir) as rt:
                restored = await check_invariants(rt, data_dir)
                assert restored.files == before.files and restored.sessions == before.sessions
                again = await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
                assert again["session"]["metadata"]["revision"] == revision + 1


async def test_a_save_abandoned_on_a_stuck_disk_is_settled_before_the_session_changes_again(tmp_path):
    """The staging thread outlives its request (commit_timeout): the next change of that session waits
    for it and settles what it left, so two changes of one session never overlap on disk. Real clock
    (the stuck thread is real); every wait is bounded."""
    data_dir = tmp_path / "data"
    async with open_runtime(data_dir) as rt:
        tid = await thread_with_history(rt, "hello there")
        await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
        rt.sessions.commit_timeout = 0.2
        release, entered = threading.Event(), threading.Event()
        fs = rt.sessions.files.fs

        def stuck_fsync(self, f):
            entered.set()
            release.wait(timeout=30)
            FileSystem.fsync_file(self, f)

        fs.fsync_file = stuck_fsync.__get__(fs)
        with trio.fail_after(30):
            with pytest.raises(StorageError, match="did not finish writing within 0.2 s; nothing was saved"):
                await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
        assert entered.is_set() and SESSION in rt.sessions._staging
        del fs.fsync_file
        rt.sessions.commit_timeout = LIMIT
        async with trio.open_nursery() as nursery:
            results = []

            async def save_again():
                results.append(await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT))

            nursery.start_soon(save_again)
            await trio.testing.wait_all_tasks_blocked()
            assert results == []  # waiting for the abandoned thread, not racing it
            release.set()
        assert results[0]["session"]["metadata"]["revision"] == 2
        assert rt.sessions._staging == {} and rt.sessions._unsettled == set()
        await check_invariants(rt, data_dir)


async def test_a_change_the_busy_writer_never_began_is_refused_and_cleaned_up(tmp_path, storage):
    """The writer is stuck on an earlier request past the commit bound: the save gives up, the writer
    refuses it when it gets there, and nothing of it is left (real clock; every wait bounded)."""
    data_dir = tmp_path / "data"
    async with open_runtime(data_dir) as rt:
        tid = await thread_with_history(rt, "hello there")
        await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
        before = capture(data_dir)
        release = threading.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(rt.store.write, fn=lambda conn: release.wait(timeout=30)))
            rt.sessions.commit_timeout = 0.3
            with trio.fail_after(30):
                with pytest.raises(StorageError, match="did not begin the change within 0.3 s; nothing was saved"):
                    await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
            assert capture(data_dir).temp_files == []  # cleaned up at once
            release.set()
        rt.sessions.commit_timeout = LIMIT
        assert_unchanged(before, await check_invariants(rt, data_dir))
        again = await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
        assert again["session"]["metadata"]["revision"] == 2


async def test_a_change_whose_commit_outlives_the_bound_is_settled_from_the_journal_first(tmp_path):
    """The writer is stuck inside the change itself (its COMMIT, after the file went in place and its
    directory was fsynced): the outcome is unknown when the request gives up, so nothing is undone then.
    The session's next change waits for the writer, finds the change committed in the journal and builds
    on it."""
    data_dir, plan = tmp_path / "data", FaultPlan()
    release, entered = threading.Event(), threading.Event()
    counted_step = plan.step

    def step(layer: str, name: str) -> bool:
        if plan.armed and name == "COMMIT" and "file:replace" in plan.log:
            entered.set()
            release.wait(timeout=30)
        return counted_step(layer, name)

    plan.step = step  # type: ignore[method-assign]
    async with faulty_runtime(data_dir, plan) as rt:
        tid = await thread_with_history(rt, "hello there")
        await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
        rt.sessions.commit_timeout = 0.3
        await rt.sessions.cleaned()
        plan.arm(None, "eio")
        with trio.fail_after(30):
            with pytest.raises(StorageError, match="did not finish within 0.3 s; the change is kept or undone"):
                await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
        assert entered.is_set() and rt.sessions._unsettled == {SESSION}
        release.set()
        await rt.sessions.cleaned()
        plan.disarm()
        rt.sessions.commit_timeout = LIMIT
        again = await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
        assert again["session"]["metadata"]["revision"] == 3  # the unknown one committed: 2, then 3
        assert rt.sessions._unsettled == set()
        state = await check_invariants(rt, data_dir)
        assert state.event_counts["session.saved"] == 3


async def test_a_change_in_the_store_whose_commit_outlives_the_bound_is_waited_for_by_the_next(tmp_path):
    """Sessions in the store: the writer is stuck at the change's own COMMIT past the commit bound, so the
    outcome is unknown when the request gives up. The session's next change, started while the writer is
    still stuck, must wait for it (an empty write behind it) before it reads the session: read earlier, it
    saw revision 1 and wrote revision 2 over the one that then committed (a lost update, two saves with one
    revision)."""
    data_dir, plan = tmp_path / "data", FaultPlan()
    release, entered = threading.Event(), threading.Event()
    counted_step = plan.step

    def step(layer: str, name: str) -> bool:
        if plan.armed and name == "COMMIT":
            entered.set()
            release.wait(timeout=30)
        return counted_step(layer, name)

    plan.step = step  # type: ignore[method-assign]
    with support.session_storage("store"):
        async with faulty_runtime(data_dir, plan) as rt:
            tid = await thread_with_history(rt, "hello there")
            await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
            rt.sessions.commit_timeout = 0.3
            await rt.sessions.cleaned()
            plan.arm(None, "sqlite_ioerr")
            with trio.fail_after(30):
                with pytest.raises(StorageError, match="did not finish within 0.3 s; the change is saved whole or not"):
                    await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT)
            assert entered.is_set() and rt.sessions._unsettled == {SESSION}
            await rt.sessions.cleaned()
            plan.disarm()
            rt.sessions.commit_timeout = LIMIT
            results: list[dict] = []
            async with trio.open_nursery() as nursery:
                async def next_save() -> None:
                    results.append(await rt.sessions.save(thread_id=tid, session_id=SESSION, timeout=LIMIT))

                nursery.start_soon(next_save)
                with trio.fail_after(30):
                    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert results == []  # waiting behind the stuck change, not racing it
                release.set()
            assert results[0]["session"]["metadata"]["revision"] == 3  # the unknown one committed: 2, then 3
            assert rt.sessions._unsettled == set()
            state = await check_invariants(rt, data_dir)
            assert state.event_counts["session.saved"] == 3
            assert sorted(e.payload["revision"] for e in await _saved_events(rt, tid)) == [1, 2, 3]
            assert not (data_dir / "sessions").exists()  # no file, no directory: the store holds it all


async def _saved_events(rt, thread_id: str) -> list:
    from runtime.store import records
    return [e for e in await rt.store.read(functools.partial(records.events_after, thread_id=thread_id, since_seq=0))
            if e.event == "session.saved"]


# ---- fault at every step, kill at every step (short versions) ---------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_a_fault_at_every_step_changes_all_or_nothing(tmp_path, case: Case, storage: str):
    kinds = SHORT_KINDS[case.name]
    await run_every_step(tmp_path, case, kinds if storage == "files" else store_kinds(kinds))


@pytest.mark.parametrize("case", [c for c in CASES if c.name in CRASH_SHORT] + CRASH_ONLY,
                         ids=[*CRASH_SHORT, *(c.name for c in CRASH_ONLY)])
async def test_a_kill_at_every_step_restarts_before_or_after(tmp_path, case: Case, storage: str):
    await run_every_crash(tmp_path, case)
