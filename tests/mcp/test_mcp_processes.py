"""MCP server processes through the Runtime (issue 17): the stderr log of a stdio server is bounded; a
streamable-HTTP server that dies is noticed and reconnected. Real servers (tests/mcp/servers/toolbox.py),
real clock, every wait bounded by LIMIT; nothing sleeps to synchronise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from runtime.mcp import launcher, supervisor
from tests.mcp.test_mcp_runtime import (LIMIT, SERVER, entry, free_port, results, wait_listening, wait_status,
                                        write_file)
from tests.runtime.helpers import run_turn
from tests.support import open_runtime


async def http_toolbox(port: int, marks: Path) -> trio.Process:
    proc = await trio.lowlevel.open_process([sys.executable, str(SERVER), "--http", str(port)],
                                            env={**os.environ, "TOOLBOX_MARKS": str(marks)},
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await wait_listening(port, proc)
    return proc


async def stop(proc: trio.Process) -> None:
    proc.kill()
    with trio.fail_after(LIMIT):
        await proc.wait()


async def test_a_chatty_servers_stderr_log_is_rotated_at_its_cap(tmp_path: Path):
    data, marks = tmp_path / "data", tmp_path / "marks"
    data.mkdir(), marks.mkdir()
    box = entry(marks, approval="auto")
    box["env"]["TOOLBOX_SHOUT"] = str(3 * launcher.LOG_MAX_BYTES)
    write_file(data, {"box": box})
    async with open_runtime(data) as rt:
        assert rt.mcp.server("box")["status"] == "ready"
        # Ready: the server wrote its 3 MiB before answering, so its launcher has copied all but at most a
        # pipe's worth (64 KiB): the log was rotated at least twice. Checked while the launcher runs (a
        # shutdown SIGKILLs it, maybe between a rotation and the next write).
        log = data / "mcp-logs" / "box.stderr.log"
        older = Path(f"{log}.1")
        assert launcher.LOG_MAX_BYTES - launcher.READ_CHUNK < older.stat().st_size <= launcher.LOG_MAX_BYTES
        assert set(older.read_bytes()) == {ord("x")}
        assert log.stat().st_size <= launcher.LOG_MAX_BYTES
        assert sorted(p.name for p in log.parent.iterdir()) == ["box.stderr.log", "box.stderr.log.1"]

async def test_a_dead_http_server_is_noticed_without_a_call_then_reconnected(tmp_path: Path, monkeypatch):
    # Short intervals so the test takes no seconds of waiting; the logic is the production one.
    monkeypatch.setattr(supervisor, "HTTP_PING_SECONDS", 0.05)
    monkeypatch.setattr(supervisor, "RESTART_BACKOFF_FIRST", 0.05)
    monkeypatch.setattr(supervisor, "RESTART_BACKOFF_MAX", 0.2)
    # Every status change kept: at a 0.2 s backoff, a toolbox that takes seconds to start again (a loaded
    # machine) means more failed/starting rounds than the 20 kept by default, which pushed the first ones
    # (ready, failed) out of the deque checked below.
    monkeypatch.setattr(supervisor, "TRANSITIONS_KEPT", 10_000)
    data, marks = tmp_path / "data", tmp_path / "marks"
    data.mkdir(), marks.mkdir()
    port = free_port()
    proc = await http_toolbox(port, marks)
    try:
        write_file(data, {"web": {"url": f"http://127.0.0.1:{port}/mcp", "approval": "auto",
                                  "startup_timeout": LIMIT}})
        async with open_runtime(data) as rt:
            first = rt.mcp.state("web")
            assert first.status == "ready" and len(first.tools) == 9
            await stop(proc)
            # No call is made: the supervisor's ping notices the dead server.
            view = await wait_status(rt, "web", "failed")
            # Refused (httpx's words); or a ping was in flight when the server died: cut off before its answer's
            # headers (httpx's words), reset while it was sent or read (the OS's words, seen on a loaded
            # machine), or within its SSE answer, which the SDK swallows, so the ping times out.
            assert (view["error"] in (f"all attempts to connect to 127.0.0.1:{port} failed",
                                      "Server disconnected without sending a response.",
                                      "the server did not answer a ping within 10 s; reconnecting")
                    or view["error"].endswith("Connection reset by peer")), view["error"]
            assert view["tools_count"] == 0 and not [t for t in rt.mcp.tools()]
            assert rt.mcp.state("web") is first  # the same supervised start: its backoff loop reconnects
            proc = await http_toolbox(port, marks)
            view = await wait_status(rt, "web", "ready")
            assert view["tools_count"] == 9 and first.restarts >= 1
            statuses = [status for status, _ in first.transitions]
            assert statuses[:3] == ["ready", "failed", "starting"] and statuses[-1] == "ready"
            thread = await rt.create_thread()
            await run_turn(rt, thread["id"], '/tool web__echo {"text": "back"}')
            assert await results(rt, thread["id"]) == [("back", False)]
    finally:
        await stop(proc)


async def test_an_http_server_that_stops_answering_pings_is_failed(tmp_path: Path, monkeypatch):
    """A server that accepts connections but never answers (wedged): the ping's timeout fails it."""
    monkeypatch.setattr(supervisor, "HTTP_PING_SECONDS", 0.05)
    monkeypatch.setattr(supervisor, "HTTP_PING_TIMEOUT", 0.5)
    monkeypatch.setattr(supervisor, "RESTART_BACKOFF_FIRST", LIMIT)  # no reconnect during the test
    data, marks = tmp_path / "data", tmp_path / "marks"
    data.mkdir(), marks.mkdir()
    port = free_port()
    proc = await http_toolbox(port, marks)
    try:
        write_file(data, {"web": {"url": f"http://127.0.0.1:{port}/mcp", "startup_timeout": LIMIT}})
        async with open_runtime(data) as rt:
            # Its first status was ready (read from the history: with a 0.5 s ping timeout a stalled moment
            # of a loaded machine may already have failed it, with the same error as below).
            assert rt.mcp.state("web").transitions[0] == ("ready", None)
            proc.send_signal(signal.SIGSTOP)  # alive, its socket open, answering nothing
            view = await wait_status(rt, "web", "failed")
            assert view["error"] == "the server did not answer a ping within 0.5 s; reconnecting"
    finally:
        proc.send_signal(signal.SIGCONT)
        await stop(proc)
