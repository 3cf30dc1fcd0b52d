"""A real, commonly used MCP server from PyPI on a real ``trio-runtime serve``: the reference "time" server
(``mcp-server-time``, pinned in the [test] extra), the README's example. It runs offline (its time zone data
comes from the ``tzdata`` package), so it can be part of the default suite.

Added over HTTP like the README shows, it becomes ready with its two tools under our naming, and a turn with
the scripted model's ``/tool`` directive calls it: the tool_result carries today's UTC date. The date is
compared with the test's own clock read before and after the turn (a turn that straddles midnight UTC sees
one of the two).
"""

from __future__ import annotations

import json
import signal
import sys
from datetime import datetime, timezone

from tests.e2e.helpers import collect_until
from tests.e2e.process import ServerProcess
from tests.e2e.test_mcp_http import Http
from tests.procs import alive, children_of
from tests.conftest import E2E_LIMIT
from web.client import AsyncClient

# The README's API form of the example, with the test's own interpreter (the venv's python has the package).
TIME_SERVER = {"name": "time", "command": sys.executable,
               "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"], "startup_timeout": E2E_LIMIT}


def utc_date() -> str:
    return datetime.now(timezone.utc).date().isoformat()


async def test_the_reference_time_server_answers_a_turn_with_the_current_utc_date(tmp_path):
    data = tmp_path / "data"
    proc = await ServerProcess(data).start()
    try:
        http = Http(proc.url, proc.token)
        try:
            status, view = await http("POST", "/v1/mcp/servers", TIME_SERVER)
            assert status == 201, view
            assert (view["name"], view["transport"], view["status"], view["tools_count"]) == (
                "time", "stdio", "ready", 2)
            assert view.get("error") is None
            (child,) = children_of(proc.process.pid)
            on_file = json.loads((data / "mcp.json").read_text())["mcpServers"]["time"]
            assert (on_file["command"], on_file["args"]) == (sys.executable, TIME_SERVER["args"])

            status, tools = await http("GET", "/v1/mcp/tools")
            by_name = {t["name"]: t for t in tools["tools"]}
            assert status == 200 and sorted(by_name) == ["time__convert_time", "time__get_current_time"]
            current = by_name["time__get_current_time"]
            assert current["server"] == "time" and current["input_schema"]["required"] == ["timezone"]
        finally:
            await http.http.aclose()

        async with AsyncClient(proc.url, proc.token) as client:
            tid = (await client.create_thread(approval_policy="auto"))["id"]
            before = utc_date()
            turn = await client.start_turn(tid, '/tool time__get_current_time {"timezone": "UTC"}')
            await collect_until(client, tid, lambda e: e["event"] == "turn.completed" and e["turn_id"] == turn["id"])
            after = utc_date()
            detail = await client.get_thread(tid)
            saved = await client.save_session(thread_id=tid)
        assert next(t for t in detail["turns"] if t["id"] == turn["id"])["status"] == "completed"
        (call,) = [i for i in detail["items"] if i["turn_id"] == turn["id"] and i["kind"] == "tool_call"]
        assert call["metadata"]["is_error"] is False, call
        answer = json.loads(call["metadata"]["result"])
        assert answer["timezone"] == "UTC"
        assert answer["datetime"][:10] in {before, after}
        assert answer["datetime"].endswith("+00:00")
        # The model was given the same answer as the tool_result block of the conversation.
        results = [b for m in saved["session"]["messages"] for b in m["content"] if b["type"] == "tool_result"]
        assert [(b["content"], b.get("is_error", False)) for b in results] == [(call["metadata"]["result"], False)]

        proc.process.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
        assert not alive(child)  # a graceful stop reaps the server before the runtime exits
    finally:
        proc.kill()
        await proc.wait()
