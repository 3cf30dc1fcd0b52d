"""MCP server processes through the Runtime (issue 17): the stderr log of a stdio server is bounded; a
streamable-HTTP server that dies is noticed and reconnected. Real servers (tests/mcp/servers/toolbox.py),
real clock, every wait bounded by LIMIT; nothing sleeps to synchronise."""

from __future__ import annotations

from pathlib import Path

from runtime.mcp import launcher
from tests.mcp.test_mcp_runtime import entry, write_file
from tests.support import open_runtime


async def test_a_chatty_servers_stderr_log_is_rotated_at_its_cap(tmp_path: Path):
    data, marks = tmp_path / "data", tmp_path / "marks"
    data.mkdir(), marks.mkdir()
    box = entry(marks, approval="auto")
    box["env"]["TOOLBOX_SHOUT"] = str(3 * launcher.LOG_MAX_BYTES)
    write_file(data, {"box": box})
    async with open_runtime(data) as rt:
        assert rt.mcp.server("box")["status"] == "ready"
    # Closed: the server exited and its launcher copied all it wrote (3 MiB of "x" before serving).
    log = data / "mcp-logs" / "box.stderr.log"
    older = Path(f"{log}.1")
    assert 0 < log.stat().st_size <= launcher.LOG_MAX_BYTES
    assert launcher.LOG_MAX_BYTES - launcher.READ_CHUNK < older.stat().st_size <= launcher.LOG_MAX_BYTES
    assert set(older.read_bytes()) == {ord("x")}
    assert sorted(p.name for p in log.parent.iterdir()) == ["box.stderr.log", "box.stderr.log.1"]
