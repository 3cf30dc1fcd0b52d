"""A change of mcp.json and its idempotency record are one all-or-nothing change (runtime/mcp/changes.py):
a kill -9 before any step of it, or a storage failure at any step, ends with the old file and no record or
the new file and its record, never one without the other (before the journal, a crash between the file
write and the record's own write made a keyed retry answer 409 "already exists" instead of the replay).

The kill is simulated as tests/faults/test_session_faults.py does it: before the k-th I/O step of the change
(every SQLite statement of the store's writer, every file operation of the mcp.json seam) the data dir is
copied as a kill -9 at that instant leaves it (hard links kept: the undo file is one), and a runtime is
started on the copy. Its servers are disabled, so no process starts and a run costs milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import trio
import trio.testing

from runtime.errors import StorageError
from runtime.mcp import config as mcp_config
from runtime.mcp.changes import McpFileSystem
from tests.cancellation.harness import claim
from tests.faults.crash import CrashAt
from tests.faults.seam import FaultPlan
from tests.support import open_runtime

from .test_mcp_runtime import entry, write_file

KEY = "crash-key"
# No change has anywhere near this many steps; reaching it means the loop never ends.
MAX_STEPS = 200


class SteppedFiles(McpFileSystem):
    """The mcp.json file seam reporting each operation to ``plan`` as a step of the ``file`` layer (a fault
    there raises OSError EIO, like the session seam)."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan

    def _step(self, name: str) -> None:
        if self.plan.step("file", name):
            raise OSError(5, os.strerror(5))

    def create(self, path, data):
        self._step("create")
        super().create(path, data)

    def link(self, src, dst):
        self._step("link")
        super().link(src, dst)

    def replace(self, src, dst):
        self._step("replace")
        super().replace(src, dst)

    def remove(self, path):
        self._step("remove")
        super().remove(path)

    def fsync_dir(self, directory):
        self._step("fsync_dir")
        super().fsync_dir(directory)


@dataclasses.dataclass
class Case:
    name: str
    action: Callable[[Any, Path], Awaitable[Any]]
    setup: Callable[[Any, Path], Awaitable[None]]
    keyed: bool = False


def _off(marks: Path, **extra: Any) -> dict[str, Any]:
    return {**entry(marks), "enabled": False, **extra}


async def _reset(rt, marks: Path) -> None:
    """One disabled server 'box' (approval ask), no 'new', no stored answer."""
    configs = mcp_config.load(rt.mcp.data_dir)
    if "new" in configs:
        await rt.mcp.delete("new")
    if "box" not in configs:
        await rt.mcp.add("box", _off(marks))
    elif configs["box"].approval != "ask":
        await rt.mcp.update("box", {"approval": "ask"})
    await rt.store.write([("DELETE FROM idempotency", ())])


CASES = [
    Case("add (keyed)", lambda rt, marks: rt.mcp.add("new", _off(marks), claim=claim(KEY)), _reset, keyed=True),
    Case("patch", lambda rt, marks: rt.mcp.update("box", {"approval": "auto"}), _reset),
    Case("delete", lambda rt, marks: rt.mcp.delete("box"), _reset),
]


def _state(data_dir: Path) -> dict[str, Any]:
    return json.loads((data_dir / "mcp.json").read_bytes())


async def _judge_restart(copy: Path, before: dict[str, Any], after: dict[str, Any], keyed: bool) -> str:
    """Start a runtime on ``copy``: the file is exactly before or after, no work file is left, the journal
    is empty, the API shows the file, and a keyed change has its record exactly when the file is after."""
    async with open_runtime(copy) as rt:
        now = _state(copy)
        assert now in (before, after), now
        assert sorted(p.name for p in copy.iterdir() if p.name.startswith(".mcp.json")) == []
        assert await rt.store.read(lambda conn: conn.execute("SELECT COUNT(*) FROM mcp_commits").fetchone()[0]) == 0
        assert [v["name"] for v in rt.mcp.servers()] == list(now["mcpServers"])
        outcome = "after" if now == after and now != before else "before"
        if keyed:
            stored = await rt.idempotency.lookup(KEY, claim(KEY).fingerprint)
            assert (stored is not None) == (outcome == "after"), (outcome, stored)
            if stored is not None:
                assert json.loads(stored.body)["name"] == "new"
    return outcome


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_a_kill_before_every_step_of_a_change_restarts_before_or_after(tmp_path, case: Case):
    data_dir, marks = tmp_path / "data", tmp_path / "marks"
    data_dir.mkdir()
    marks.mkdir()
    write_file(data_dir, {"box": _off(marks)})
    plan = FaultPlan(kind="sqlite_ioerr")
    crash = CrashAt(plan, data_dir, tmp_path)
    seen = {"before": 0, "after": 0}
    wheres = []
    async with open_runtime(data_dir, sqlite_connection_factory=plan.connection_factory()) as rt:
        rt.mcp.files.fs = SteppedFiles(plan)
        k, n = 1, None
        while n is None or k <= n + 1:  # n + 1: killed right after the change returned
            assert k < MAX_STEPS
            await case.setup(rt, marks)
            before = _state(data_dir)
            crash.reset(at=k)
            plan.arm(None, "sqlite_ioerr")
            await case.action(rt, marks)
            plan.disarm()
            n = crash.total
            if k > n:
                crash.after_the_end(k)
            after = _state(data_dir)
            assert after != before
            copy = crash.copy_path(k)
            outcome = await _judge_restart(copy, before, after, case.keyed)
            seen[outcome] += 1
            wheres.append(f"{crash.where}->{outcome}")
            shutil.rmtree(copy)
            k += 1
    print(f"\n{case.name}: kill -9 before each of {n} steps and after the last: {seen}\n  {wheres}", end="")
    assert seen["before"] >= 1 and seen["after"] >= 1, seen
    # The commit point is the COMMIT: every kill before it restarts before, every kill after it after.
    commit = next(i for i, w in enumerate(wheres) if w.startswith("sqlite:COMMIT"))
    assert all(w.endswith("before") for w in wheres[:commit + 1]) and all(
        w.endswith("after") for w in wheres[commit + 1:]), wheres


@pytest.mark.parametrize("kind", ["sqlite_ioerr", "eio"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_a_storage_failure_at_every_step_changes_all_or_nothing(tmp_path, case: Case, kind: str):
    """A failed step (SQLite's or the file's) before the COMMIT fails the change with a StorageError and
    leaves the old file, no record and no work file; a failed step after it (removing the undo file)
    cannot undo a committed change."""
    data_dir, marks = tmp_path / "data", tmp_path / "marks"
    data_dir.mkdir()
    marks.mkdir()
    write_file(data_dir, {"box": _off(marks)})
    plan = FaultPlan(kind=kind)
    layer = "sqlite" if kind.startswith("sqlite") else "file"
    failed = succeeded = 0
    async with open_runtime(data_dir, sqlite_connection_factory=plan.connection_factory()) as rt:
        rt.mcp.files.fs = SteppedFiles(plan)
        for k in range(1, MAX_STEPS):
            await case.setup(rt, marks)
            before = _state(data_dir)
            plan.arm(k, kind)
            error = None
            try:
                await case.action(rt, marks)
            except StorageError as exc:
                error = exc
            plan.disarm()
            fired = plan.fired
            now = _state(data_dir)
            leftovers = sorted(p.name for p in data_dir.iterdir() if p.name.startswith(".mcp.json"))
            stored = await rt.idempotency.lookup(KEY, claim(KEY).fingerprint) if case.keyed else None
            views = [v["name"] for v in rt.mcp.servers()]
            if isinstance(error, StorageError):
                failed += 1
                assert now == before and leftovers == [] and stored is None, (k, fired, now, leftovers)
                assert views == list(before["mcpServers"])
            else:
                assert now != before and views == list(now["mcpServers"]), (k, fired, error)
                if case.keyed:
                    assert stored is not None
                succeeded += 1
                if fired is None:
                    break
                # The fault hit step 3 (the undo file's removal): the change is committed and answered; its
                # leftover undo file is settled by the next change (the next setup) or the next start.
    print(f"\n{case.name} [{kind}]: {k - 1} {layer} steps: {failed} failed whole, {succeeded} committed", end="")
    assert failed >= 1


async def test_a_change_whose_write_outlives_its_bound_keeps_its_key_and_is_settled_before_the_next(
        tmp_path, mock_clock):
    """The store's writer held past COMMIT_TIMEOUT (virtual time, jumped by hand once the change waits on its
    write): the add fails with the outcome unknown, its Idempotency-Key stays in progress while the write is
    queued, nothing follows in the processes; once the writer goes on, the write commits, the key's record
    is there, and the next change settles the file first and makes the servers follow it."""
    from runtime.mcp import supervisor
    from tests.support import held_writer

    data_dir, marks = tmp_path / "data", tmp_path / "marks"
    data_dir.mkdir()
    marks.mkdir()
    write_file(data_dir, {"box": _off(marks)})
    async with open_runtime(data_dir) as rt:
        c = claim(KEY)
        errors: list[StorageError] = []
        with held_writer(rt) as release:
            with rt.idempotency.hold(KEY, c.fingerprint) as slot:
                c = slot.claim(201, c.encode)

                async def add() -> None:
                    try:
                        await rt.mcp.add("new", _off(marks), claim=c)
                    except StorageError as exc:
                        errors.append(exc)

                submitted = trio.Event()
                submit = rt.store.submit

                def submit_and_tell(request):
                    submitted.set()
                    return submit(request)

                rt.store.submit = submit_and_tell
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(add)
                    await submitted.wait()  # after the file was re-read (a real thread: not timed)
                    rt.store.submit = submit
                    await trio.testing.wait_all_tasks_blocked()  # the change waits on its write
                    assert c.pending is not None and not c.pending.done.is_set()
                    mock_clock.jump(supervisor.COMMIT_TIMEOUT)
            assert [str(e) for e in errors] == [
                "Failed to add MCP server 'new': the store did not commit within 60 s; the change is settled"
                " before the next one"]
            assert rt.idempotency.in_progress(KEY)  # a retry now is a 409 "in progress", never a second add
            assert [v["name"] for v in rt.mcp.servers()] == ["box"]
            release.set()
        await c.pending.done.wait()  # the writer was let go: bounded by its (tiny) write
        assert not rt.idempotency.in_progress(KEY)
        stored = await rt.idempotency.lookup(KEY, c.fingerprint)
        assert stored is not None and json.loads(stored.body)["name"] == "new"
        await rt.mcp.update("box", {"approval": "auto"})
        assert list(_state(data_dir)["mcpServers"]) == ["box", "new"]
        assert [(v["name"], v["config"]["approval"]) for v in rt.mcp.servers()] == [("box", "auto"), ("new", "ask")]
        assert sorted(p.name for p in data_dir.iterdir() if p.name.startswith(".mcp.json")) == []
