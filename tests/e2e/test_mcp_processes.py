"""MCP server processes and the runtime's death (issue 17): a kill -9 of a real ``trio-runtime serve`` leaves
no stdio server behind, even one that ignores the end of its stdin and SIGTERM (runtime/mcp/launcher.py).
Processes are counted from /proc; every wait is bounded (E2E_LIMIT)."""

from __future__ import annotations

import json
import os
import signal

from pathlib import Path

from tests.e2e.process import ServerProcess
from tests.e2e.test_mcp_http import TOOLBOX, Http, toolbox, wait_gone
from tests.procs import alive, descendants


def runs_toolbox(pid: int) -> bool:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return argv[1:2] == [str(TOOLBOX).encode()]


def ignores_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    raise AssertionError(f"no SigIgn line for {pid}")


async def test_kill9_of_the_runtime_kills_a_server_that_ignores_eof_and_sigterm(tmp_path):
    data, marks = tmp_path / "data", tmp_path / "marks"
    marks.mkdir()
    data.mkdir()
    entry = toolbox(marks)
    entry["env"]["TOOLBOX_STUBBORN"] = "1"
    (data / "mcp.json").write_text(json.dumps({"mcpServers": {"box": entry}}))
    proc = await ServerProcess(data).start()
    server: set[int] = set()
    try:
        http = Http(proc.url, proc.token)
        try:
            assert (await http.status("box", "ready"))["tools_count"] == 9
        finally:
            await http.http.aclose()
        tree = descendants(proc.process.pid)
        server = {pid for pid in tree if runs_toolbox(pid)}
        assert len(server) == 1
        (pid,) = server
        assert ignores_sigterm(pid)
        proc.process.send_signal(signal.SIGKILL)
        await proc.wait()
        for left in tree:  # the server and the launcher it runs under
            await wait_gone(left)
        assert not any(alive(left) for left in tree)
    finally:
        proc.kill()
        await proc.wait()
        for pid in server:  # a failure above must not leave the stubborn server running
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
