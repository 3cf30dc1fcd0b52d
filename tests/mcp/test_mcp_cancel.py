"""A server change (add, update, delete, reconnect) cancelled at each of its steps leaves ``mcp.json``, the
running processes and the API agreeing: not started (nothing changed), during the file write (a worker
thread that is not abandoned: the change completes), or after it (while the route waits for the start or
the stop). The write is held at the rename of the new file over mcp.json (inside the store's writer
transaction) through the file seam of runtime/mcp/changes.py (a threading gate), never by sleeping."""

from __future__ import annotations

import threading

import pytest
import trio

from runtime.mcp import config as mcp_config
from runtime.mcp.changes import McpFileSystem
from tests.support import open_runtime

from .test_mcp_runtime import LIMIT, children, entry, write_file


class HeldSave(McpFileSystem):
    """The file seam, whose rename of the new mcp.json tells the test when it runs (``point``: before or
    after the real rename) and waits for the test's go."""

    def __init__(self, point: str) -> None:
        self.point = point
        self.reached = trio.Event()
        self.go = threading.Event()
        self.token = trio.lowlevel.current_trio_token()

    def replace(self, src, dst) -> None:
        if self.point == "after_write":
            super().replace(src, dst)
        trio.from_thread.run_sync(self.reached.set, trio_token=self.token)
        assert self.go.wait(LIMIT), "the test never let the write go on"
        if self.point == "during_write":
            super().replace(src, dst)


async def settled(rt) -> None:
    with trio.fail_after(LIMIT):
        for view in rt.mcp.servers():
            await rt.mcp.state(view["name"]).settled.wait()


async def processes(want: int, before: set[int]) -> set[int]:
    """The runtime's server processes once there are ``want`` (a stopped one is reaped by its task, which a
    cancelled request no longer waits for), polled, bounded."""
    with trio.fail_after(LIMIT):
        while len(now := children() - before) != want:
            await trio.sleep(0.02)
    return now


CHANGES = {
    "add": lambda rt, marks: rt.mcp.add("new", entry(marks)),
    "update": lambda rt, marks: rt.mcp.update("box", {"approval": "auto"}),
    "delete": lambda rt, marks: rt.mcp.delete("box"),
    "reconnect": lambda rt, marks: rt.mcp.reconnect("box"),
}
# Servers (name -> approval) after each change, when it happened.
AFTER = {"add": {"box": "ask", "new": "ask"}, "update": {"box": "auto"}, "delete": {}, "reconnect": {"box": "ask"}}


@pytest.mark.parametrize("point", ["not_started", "during_write", "after_write"])
@pytest.mark.parametrize("change", list(CHANGES))
async def test_a_cancelled_change_leaves_the_file_the_processes_and_the_api_agreeing(
        tmp_path, monkeypatch, change, point):
    if change == "reconnect" and point != "not_started":
        pytest.skip("reconnect writes no file")
    data_dir, marks = tmp_path / "data", tmp_path / "marks"
    data_dir.mkdir()
    marks.mkdir()
    write_file(data_dir, {"box": entry(marks)})
    before = children()
    async with open_runtime(data_dir) as rt:
        (first,) = await processes(1, before)
        held = HeldSave(point)
        monkeypatch.setattr(rt.mcp.files, "fs", held)
        with trio.CancelScope() as scope:
            if point == "not_started":
                scope.cancel()
                await CHANGES[change](rt, marks)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(CHANGES[change], rt, marks)
                    with trio.fail_after(LIMIT):
                        await held.reached.wait()
                    scope.cancel()
                    held.go.set()
        assert scope.cancelled_caught
        monkeypatch.undo()

        happened = point != "not_started"
        expected = AFTER[change] if happened else {"box": "ask"}
        await settled(rt)
        on_file = mcp_config.load(data_dir)
        assert {n: c.approval for n, c in on_file.items()} == expected
        assert {v["name"]: (v["config"]["approval"], v["status"]) for v in rt.mcp.servers()} == {
            n: (a, "ready") for n, a in expected.items()}
        assert {n: rt.mcp.state(n).config for n in expected} == on_file
        now = await processes(len(expected), before)
        # A change that happened restarted (or stopped) the first process; one that did not left it alone.
        assert (first in now) == (not happened or change == "add")
        names = {s.name for s in rt.manager.tools.spec()}
        assert {n.split("__")[0] for n in names} == set(expected)
    assert children() - before == set()
