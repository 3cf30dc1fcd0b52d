"""MCP servers through the Runtime (API.md "Tools from MCP servers"), with a real stdio server written with
the SDK (tests/mcp/servers/toolbox.py) as a child process, on the real clock: every wait is bounded by
``LIMIT`` (a bug fails the test instead of hanging it); nothing sleeps to synchronise (tests wait on the
server's status events, the turn's end, or marker files the server writes after an event we wait for).
"""

from __future__ import annotations

import json
import socket
import subprocess
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from runtime.mcp import config as mcp_config
from tests.runtime.helpers import collect_events, run_turn, turn_record, wait_turn_end
from tests.support import open_runtime

SERVER = Path(__file__).parent / "servers" / "toolbox.py"
# Real-clock bound on any one wait: a child Python process importing the SDK takes about a second alone,
# several on a loaded 2-core machine.
LIMIT = 60.0
SECRET = "sk-test-3c1f0e9a-never-shown"


def entry(marks: Path, **extra: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": [str(SERVER)],
            "env": {"TOOLBOX_MARKS": str(marks), "TOOLBOX_SECRET": SECRET},
            "startup_timeout": LIMIT, **extra}


def write_file(data_dir: Path, servers: dict[str, dict[str, Any]]) -> None:
    (data_dir / "mcp.json").write_text(json.dumps({"mcpServers": servers}), encoding="utf-8")


def children() -> set[int]:
    """Pids of this process's live (not zombie) children, from /proc."""
    me, found = os.getpid(), set()
    for entry_ in os.listdir("/proc"):
        if not entry_.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry_}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z":
            found.add(int(entry_))
    return found


async def wait_status(rt, name: str, status: str) -> dict[str, Any]:
    with trio.fail_after(LIMIT):
        while True:
            server = rt.mcp.state(name)
            if server is not None and server.status == status:
                return rt.mcp.server(name)
            if server is None:
                await trio.sleep(0)  # only between a stop and a start, never two checkpoints long
                continue
            await server.changed.wait()


async def wait_file(path: Path) -> None:
    """The marker the server writes: polled, because it comes from another process (bounded)."""
    with trio.fail_after(LIMIT):
        while not path.exists():
            await trio.sleep(0.02)


async def results(rt, thread_id: str) -> list[tuple[str, bool]]:
    """(result, is_error) of every tool call of the thread, oldest first."""
    detail = await rt.get_thread(thread_id)
    return [(i["metadata"].get("result"), i["metadata"].get("is_error")) for i in detail["items"]
            if i["kind"] == "tool_call"]


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    path = tmp_path / "marks"
    path.mkdir()
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


async def test_servers_start_with_the_runtime_and_their_tools_are_offered(data_dir, marks):
    before = children()
    write_file(data_dir, {"box": entry(marks, approval="auto"), "off": {**entry(marks), "enabled": False}})
    async with open_runtime(data_dir) as rt:
        views = {v["name"]: v for v in rt.mcp.servers()}
        assert views["box"]["status"] == "ready" and views["box"]["tools_count"] == 9
        assert views["off"]["status"] == "disabled" and views["off"]["tools_count"] == 0
        assert views["box"]["config"]["env"] == {"TOOLBOX_MARKS": "<redacted>", "TOOLBOX_SECRET": "<redacted>"}
        assert SECRET not in json.dumps(rt.mcp.servers())
        names = {spec.name for spec in rt.manager.tools.spec()}
        assert {"box__echo", "box__peek", "box__write_mark", "box__crash"} <= names
        assert not any(n.startswith("off__") for n in names)
        assert rt.mcp.tool("box__peek").read_only is True and rt.mcp.tool("box__echo").read_only is False
        assert len(children() - before) == 1

        thread = await rt.create_thread()
        turn = await run_turn(rt, thread["id"], '/tool box__echo {"text": "héllo"}')
        assert turn["status"] == "completed"
        assert await results(rt, thread["id"]) == [("héllo", False)]
        await run_turn(rt, thread["id"], "/tool box__has_secret {}")
        assert (await results(rt, thread["id"]))[-1] == ("yes", False)
    assert children() - before == set()


async def test_invalid_input_is_refused_before_the_call(data_dir, marks):
    write_file(data_dir, {"box": entry(marks, approval="auto")})
    async with open_runtime(data_dir) as rt:
        thread = await rt.create_thread()
        turn = await run_turn(rt, thread["id"], '/tool box__write_mark {"name": 5}')
        assert turn["status"] == "completed"
        [(result, is_error)] = await results(rt, thread["id"])
        assert result.startswith("Invalid input for tool 'box__write_mark': $.name:") and is_error
        assert list(marks.iterdir()) == []


async def test_a_server_error_and_a_timeout_are_error_results_and_the_turn_goes_on(data_dir, marks):
    # Only the sleep goes to the server with the short timeout: a loaded machine may take longer than 0.5 s
    # for any call, but never 600 s for the sleep.
    write_file(data_dir, {"box": entry(marks, approval="auto"), "slow": entry(marks, approval="auto", tool_timeout=0.5)})
    async with open_runtime(data_dir) as rt:
        thread = await rt.create_thread()
        turn = await run_turn(rt, thread["id"], "/tool box__fail {}")
        assert turn["status"] == "completed"
        turn = await run_turn(rt, thread["id"], '/tool slow__sleep {"seconds": 600}')
        assert turn["status"] == "completed"
        done = await results(rt, thread["id"])
        assert "the fail tool failed on purpose" in done[0][0] and done[0][1] is True
        assert done[1] == ("Tool 'slow__sleep' did not finish within 0.5 s (tool_timeout of MCP server 'slow')", True)
        # The server is still there and answers the next call.
        await run_turn(rt, thread["id"], '/tool box__echo {"text": "after"}')
        assert (await results(rt, thread["id"]))[-1] == ("after", False)
        assert rt.mcp.server("slow")["status"] == "ready"


async def test_an_interrupt_cancels_the_call_and_the_server_hears_it(data_dir, marks):
    write_file(data_dir, {"box": entry(marks, approval="auto")})
    async with open_runtime(data_dir) as rt:
        thread = await rt.create_thread()
        turn = await rt.start_turn(thread["id"], '/tool box__wait_cancel {"name": "w1"}')
        await wait_file(marks / "w1.started")
        await rt.interrupt_turn(thread["id"], turn["id"])
        with trio.fail_after(LIMIT):
            await wait_turn_end(rt, thread["id"], turn["id"])
        assert (await turn_record(rt, thread["id"], turn["id"]))["status"] == "interrupted"
        await wait_file(marks / "w1.cancelled")
        assert rt.mcp.server("box")["status"] == "ready"


async def test_a_crash_is_a_failed_status_then_a_restart(data_dir, marks):
    write_file(data_dir, {"box": entry(marks, approval="auto")})
    async with open_runtime(data_dir) as rt:
        first = rt.mcp.state("box")
        thread = await rt.create_thread()
        turn = await run_turn(rt, thread["id"], "/tool box__crash {}")
        assert turn["status"] == "completed"
        [(result, is_error)] = await results(rt, thread["id"])
        assert result.startswith("Tool 'box__crash' failed: MCP server 'box' exited during the call") and is_error
        with trio.fail_after(LIMIT):
            while first.restarts < 1 or first.status != "ready":
                await first.changed.wait()
        statuses = [s for s, _ in first.transitions]
        assert statuses[:4] == ["ready", "failed", "starting", "ready"]
        assert first.transitions[1][1] == "the server closed its connection (it exited); restarting"
        await run_turn(rt, thread["id"], '/tool box__echo {"text": "back"}')
        assert (await results(rt, thread["id"]))[-1] == ("back", False)


async def test_a_server_that_cannot_start_fails_alone(data_dir, marks):
    write_file(data_dir, {"bad": {"command": str(data_dir / "no-such-program"), "startup_timeout": 5},
                          "box": entry(marks)})
    async with open_runtime(data_dir) as rt:
        views = {v["name"]: v for v in rt.mcp.servers()}
        assert views["box"]["status"] == "ready"
        assert views["bad"]["status"] == "failed" and "No such file or directory" in views["bad"]["error"]


@pytest.mark.parametrize(("approval", "tool", "asks"), [
    ("ask", "peek", True), ("auto", "write_mark", False), ("writes", "peek", False), ("writes", "write_mark", True)])
async def test_approval_per_server_mode(data_dir, marks, approval, tool, asks):
    write_file(data_dir, {"box": entry(marks, approval=approval)})
    async with open_runtime(data_dir) as rt:
        thread = await rt.create_thread()
        turn = await rt.start_turn(thread["id"], f'/tool box__{tool} {{"name": "m"}}' if tool == "write_mark"
                                   else f"/tool box__{tool} {{}}")
        if asks:
            with trio.fail_after(LIMIT):
                await collect_events(rt, thread["id"], lambda e: e.event == "approval.requested")
            pending = await rt.list_approvals(thread_id=thread["id"], status="pending")
            assert pending[0]["tool"] == f"box__{tool}"
            await rt.decide_approval(thread["id"], pending[0]["id"], "allow", timeout=LIMIT)
        with trio.fail_after(LIMIT):
            await wait_turn_end(rt, thread["id"], turn["id"])
        approvals = await rt.list_approvals(thread_id=thread["id"])
        assert [a["decided_by"] for a in approvals] == ["client" if asks else "policy"]
        assert (marks / "m.written").exists() == (tool == "write_mark")


async def test_thread_policy_deny_wins_over_server_auto(data_dir, marks):
    write_file(data_dir, {"box": entry(marks, approval="auto")})
    async with open_runtime(data_dir) as rt:
        thread = await rt.create_thread(approval_policy="deny")
        await run_turn(rt, thread["id"], '/tool box__write_mark {"name": "d"}')
        assert not (marks / "d.written").exists()
        approvals = await rt.list_approvals(thread_id=thread["id"])
        assert [(a["status"], a["decided_by"]) for a in approvals] == [("denied", "policy")]


async def test_api_changes_rewrite_the_file_and_the_processes_follow(data_dir, marks):
    before = children()
    async with open_runtime(data_dir) as rt:
        view = await rt.mcp.add("box", entry(marks))
        assert view["status"] == "ready" and len(children() - before) == 1
        on_file = json.loads((data_dir / "mcp.json").read_text())
        assert on_file["mcpServers"]["box"]["env"]["TOOLBOX_SECRET"] == SECRET
        assert oct((data_dir / "mcp.json").stat().st_mode & 0o777) == "0o600"

        view = await rt.mcp.update("box", {"enabled": False})
        assert view["status"] == "disabled" and children() - before == set()
        view = await rt.mcp.update("box", {"enabled": True, "env": {"TOOLBOX_MARKS": "<redacted>",
                                                                    "TOOLBOX_SECRET": "<redacted>"}})
        assert view["status"] == "ready"
        assert mcp_config.load(data_dir)["box"].env["TOOLBOX_SECRET"] == SECRET
        old = children() - before
        view = await rt.mcp.reconnect("box")
        assert view["status"] == "ready" and len(children() - before) == 1 and children() - before != old

        await rt.mcp.delete("box")
        assert children() - before == set()
        assert json.loads((data_dir / "mcp.json").read_text()) == {"mcpServers": {}}
        assert rt.mcp.servers() == [] and not any("__" in s.name for s in rt.manager.tools.spec())


def free_port() -> int:
    """A port nothing listens on now (the OS picks it; the toolbox binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_listening(port: int, proc: trio.Process) -> None:
    """Until the HTTP toolbox accepts connections (polled: it is another process), bounded."""
    with trio.fail_after(LIMIT):
        while True:
            assert proc.returncode is None, "the HTTP toolbox exited before listening"
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def test_a_streamable_http_server_gets_its_headers_and_they_are_never_shown(data_dir, marks):
    port = free_port()
    proc = await trio.lowlevel.open_process([sys.executable, str(SERVER), "--http", str(port)],
                                            env={**os.environ, "TOOLBOX_MARKS": str(marks)},
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_listening(port, proc)
        write_file(data_dir, {"web": {"url": f"http://127.0.0.1:{port}/mcp", "approval": "auto",
                                      "headers": {"X-Toolbox-Secret": SECRET}, "startup_timeout": LIMIT}})
        async with open_runtime(data_dir) as rt:
            view = rt.mcp.server("web")
            assert (view["transport"], view["status"], view["tools_count"]) == ("http", "ready", 9)
            assert view["config"]["headers"] == {"X-Toolbox-Secret": "<redacted>"}
            thread = await rt.create_thread()
            await run_turn(rt, thread["id"], '/tool web__echo {"text": "over http"}')
            await run_turn(rt, thread["id"], "/tool web__has_header {}")
            assert await results(rt, thread["id"]) == [("over http", False), ("yes", False)]
            assert SECRET not in json.dumps(rt.mcp.servers())
    finally:
        proc.kill()
        with trio.fail_after(LIMIT):
            await proc.wait()
