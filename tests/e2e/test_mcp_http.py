"""MCP servers over HTTP on a real ``trio-runtime serve`` process with a real stdio MCP server (the SDK test
server tests/mcp/servers/toolbox.py) as its child (API.md "Tools from MCP servers").

Every wait is bounded (E2E_LIMIT); turns are awaited on the SSE stream; a server's status is polled over
HTTP (another process's state: there is no event for it), each poll bounded. Child processes of the serve
process are counted from /proc, so "no process left" is checked, not assumed.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.conftest import E2E_LIMIT
from tests.e2e.helpers import collect_until
from tests.procs import alive, children_of
from tests.e2e.process import ServerProcess
from web.client import AsyncClient

TOOLBOX = Path(__file__).parents[1] / "mcp" / "servers" / "toolbox.py"
SECRET = "sk-e2e-5d2b7c41-never-in-a-response"
HEADER_SECRET = "Bearer hdr-9a8b7c6d-never-in-a-response"


async def wait_gone(pid: int) -> None:
    with trio.fail_after(E2E_LIMIT):
        while alive(pid):
            await trio.sleep(0.02)


async def wait_file(path: Path) -> None:
    with trio.fail_after(E2E_LIMIT):
        while not path.exists():
            await trio.sleep(0.02)


class Http:
    """Raw calls to the MCP routes; keeps every response body to check for secrets at the end."""

    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"},
                                      timeout=E2E_LIMIT)
        self.bodies: list[str] = []

    async def __call__(self, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
        response = await self.http.request(method, path, json=body, headers=headers)
        self.bodies.append(response.text)
        return response.status_code, (response.json() if response.content else None)

    async def status(self, name: str, want: str) -> dict[str, Any]:
        with trio.fail_after(E2E_LIMIT):
            while True:
                _, body = await self("GET", "/v1/mcp/servers")
                view = next(s for s in body["servers"] if s["name"] == name)
                if view["status"] == want:
                    return view
                await trio.sleep(0.05)


def toolbox(marks: Path, **extra: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": [str(TOOLBOX)],
            "env": {"TOOLBOX_MARKS": str(marks), "TOOLBOX_SECRET": SECRET}, "startup_timeout": E2E_LIMIT, **extra}


async def run(client: AsyncClient, tid: str, prompt: str) -> tuple[str, dict[str, Any]]:
    """Start a turn and wait for its end; (turn id, its tool_call item)."""
    since = (await client.get_thread(tid))["latest_seq"]
    turn = await client.start_turn(tid, prompt)
    await collect_until(client, tid, lambda e: e["event"] == "turn.completed" and e["turn_id"] == turn["id"],
                        since_seq=since)
    detail = await client.get_thread(tid)
    (item,) = [i for i in detail["items"] if i["turn_id"] == turn["id"] and i["kind"] == "tool_call"]
    return turn["id"], item


async def test_mcp_servers_over_http_add_call_patch_reconnect_crash_delete(tmp_path):
    data, marks = tmp_path / "data", tmp_path / "marks"
    marks.mkdir()
    proc = await ServerProcess(data, "--log-level", "debug").start()
    try:
        async with AsyncClient(proc.url, proc.token) as client:
            http = Http(proc.url, proc.token)
            try:
                last = await scenario(proc, client, http, data, marks)
            finally:
                await http.http.aclose()
        proc.process.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
        # A graceful stop kills and reaps each server before the runtime exits: nothing is left.
        assert not alive(last)
        output = await proc.drain()
    finally:
        proc.kill()
        await proc.wait()
    assert SECRET not in output and "hdr-9a8b7c6d" not in output


async def scenario(proc: ServerProcess, client: AsyncClient, http: Http, data: Path, marks: Path) -> int:
    """The whole life of two servers over HTTP; returns the pid of the server left running."""
    pid = proc.process.pid
    # ---- add ----
    status, view = await http("POST", "/v1/mcp/servers", {"name": "box", **toolbox(marks, approval="writes")},
                              **{"Idempotency-Key": "add-box-1"})
    assert status == 201, view
    assert (view["name"], view["transport"], view["enabled"], view["status"], view["tools_count"]) == (
        "box", "stdio", True, "ready", 9)
    assert view["config"]["env"] == {"TOOLBOX_MARKS": "<redacted>", "TOOLBOX_SECRET": "<redacted>"}
    (child,) = children_of(pid)
    # The same key again: the stored answer, and no second server.
    status, again = await http("POST", "/v1/mcp/servers", {"name": "box", **toolbox(marks, approval="writes")},
                               **{"Idempotency-Key": "add-box-1"})
    assert (status, again) == (201, view) and children_of(pid) == {child}
    status, body = await http("POST", "/v1/mcp/servers", {"name": "box", **toolbox(marks)})
    assert status == 409 and body["error"]["code"] == "conflict" and "already exists" in body["error"]["message"]
    status, body = await http("POST", "/v1/mcp/servers", {"name": "bad name", **toolbox(marks)})
    assert status == 400 and "Invalid MCP server name" in body["error"]["message"]
    status, body = await http("POST", "/v1/mcp/servers", {"name": "web", "url": "http://127.0.0.1:9/mcp",
                                                          "headers": {"Authorization": HEADER_SECRET},
                                                          "enabled": False})
    assert status == 201 and body["status"] == "disabled" and body["transport"] == "http"
    assert body["config"]["headers"] == {"Authorization": "<redacted>"}
    on_file = json.loads((data / "mcp.json").read_text())["mcpServers"]
    assert on_file["box"]["env"]["TOOLBOX_SECRET"] == SECRET and on_file["web"]["headers"]["Authorization"] == HEADER_SECRET

    status, tools = await http("GET", "/v1/mcp/tools")
    by_name = {t["name"]: t for t in tools["tools"]}
    assert status == 200 and by_name["box__peek"]["read_only"] is True and by_name["box__echo"]["read_only"] is False
    assert by_name["box__echo"]["server"] == "box" and by_name["box__echo"]["description"] == "Returns its text."
    assert by_name["box__echo"]["input_schema"]["required"] == ["text"]

    # ---- approvals under "writes": read-only runs, a writing tool asks ----
    tid = (await client.create_thread())["id"]
    _, item = await run(client, tid, "/tool box__peek {}")
    assert (item["metadata"]["result"], item["metadata"]["is_error"]) == ("peeked", False)
    since = (await client.get_thread(tid))["latest_seq"]
    turn = await client.start_turn(tid, '/tool box__write_mark {"name": "e"}')
    requested = (await collect_until(client, tid, lambda e: e["event"] == "approval.requested", since_seq=since))[-1]
    assert not (marks / "e.written").exists()
    await client.decide_approval(tid, requested["payload"]["approval_id"], "allow")
    await collect_until(client, tid, lambda e: e["event"] == "turn.completed" and e["turn_id"] == turn["id"],
                        since_seq=since)
    assert (marks / "e.written").exists()

    # ---- patch: approval auto restarts the server with the new config ----
    status, view = await http("PATCH", "/v1/mcp/servers/box", {"approval": "auto", "tool_timeout": 0.5})
    assert status == 200 and view["status"] == "ready" and view["config"]["approval"] == "auto"
    assert view["config"]["env"]["TOOLBOX_SECRET"] == "<redacted>"
    (child2,) = children_of(pid)
    assert child2 != child and not alive(child)
    # timeout: an error result, the turn completes, the server stays ready
    turn_id, item = await run(client, tid, '/tool box__sleep {"seconds": 600}')
    assert item["metadata"]["result"] == "Tool 'box__sleep' did not finish within 0.5 s (tool_timeout of MCP server 'box')"
    assert turn_id and (await http.status("box", "ready"))["tools_count"] == 9
    status, view = await http("PATCH", "/v1/mcp/servers/box", {"tool_timeout": 60})
    assert status == 200 and view["status"] == "ready"

    # ---- interrupt during a call: the server sees the cancellation, the turn ends interrupted ----
    turn = await client.start_turn(tid, '/tool box__wait_cancel {"name": "w"}')
    await wait_file(marks / "w.started")
    ended = await client.interrupt(tid, turn["id"])
    assert ended["status"] == "interrupted"
    await wait_file(marks / "w.cancelled")

    # ---- crash: an error result, failed status, then restarted ----
    (before_crash,) = children_of(pid)
    _, item = await run(client, tid, "/tool box__crash {}")
    assert item["metadata"]["is_error"] is True and "exited during the call" in item["metadata"]["result"]
    await http.status("box", "ready")
    (after_crash,) = children_of(pid)
    assert after_crash != before_crash
    _, item = await run(client, tid, '/tool box__echo {"text": "back"}')
    assert item["metadata"]["result"] == "back"
    _, item = await run(client, tid, "/tool box__has_secret {}")
    assert item["metadata"]["result"] == "yes"

    # ---- disable, enable, reconnect ----
    status, view = await http("PATCH", "/v1/mcp/servers/box", {"enabled": False})
    assert (status, view["status"], view["tools_count"]) == (200, "disabled", 0)
    assert children_of(pid) == set()
    status, body = await http("POST", "/v1/mcp/servers/box/reconnect")
    assert status == 409 and "disabled" in body["error"]["message"]
    status, tools = await http("GET", "/v1/mcp/tools")
    assert tools == {"tools": []}
    status, view = await http("PATCH", "/v1/mcp/servers/box", {"enabled": True})
    assert (status, view["status"]) == (200, "ready")
    (child3,) = children_of(pid)
    status, view = await http("POST", "/v1/mcp/servers/box/reconnect")
    assert (status, view["status"]) == (200, "ready")
    (child4,) = children_of(pid)
    assert child4 != child3 and not alive(child3)
    status, body = await http("PATCH", "/v1/mcp/servers/nope", {"enabled": False})
    assert status == 404 and body["error"]["message"] == "MCP server 'nope' not found"
    status, body = await http("PATCH", "/v1/mcp/servers/box", {"approval": "sometimes"})
    assert status == 400 and "approval must be one of" in body["error"]["message"]

    # ---- secrets: in no response and no event ----
    detail = await client.get_thread(tid)
    events = await collect_until(client, tid, lambda e: e["seq"] >= detail["latest_seq"], since_seq=0)
    everything = "\n".join(http.bodies) + json.dumps(detail) + json.dumps(events)
    assert len(events) == detail["latest_seq"] and SECRET not in everything and "hdr-9a8b7c6d" not in everything

    # ---- delete: 204, the process is gone, the file follows ----
    status, body = await http("DELETE", "/v1/mcp/servers/box")
    assert (status, body) == (204, None)
    assert children_of(pid) == set() and not alive(child4)
    status, body = await http("DELETE", "/v1/mcp/servers/box")
    assert status == 404
    assert list(json.loads((data / "mcp.json").read_text())["mcpServers"]) == ["web"]
    status, servers = await http("GET", "/v1/mcp/servers")
    assert [s["name"] for s in servers["servers"]] == ["web"]

    # ---- a server running at shutdown: SIGTERM leaves no child behind (the caller checks) ----
    status, view = await http("POST", "/v1/mcp/servers", {"name": "last", **toolbox(marks)})
    assert status == 201 and view["status"] == "ready"
    (last,) = children_of(pid)
    return last


async def test_kill9_of_the_runtime_leaves_no_mcp_server_behind(tmp_path):
    """The child's stdin is the runtime's pipe: when the runtime dies the server reads EOF and exits."""
    data, marks = tmp_path / "data", tmp_path / "marks"
    marks.mkdir()
    data.mkdir()
    (data / "mcp.json").write_text(json.dumps({"mcpServers": {"box": toolbox(marks)}}))
    proc = await ServerProcess(data).start()
    try:
        http = Http(proc.url, proc.token)
        try:
            view = await http.status("box", "ready")
            assert view["tools_count"] == 9
        finally:
            await http.http.aclose()
        (child,) = children_of(proc.process.pid)
        proc.process.send_signal(signal.SIGKILL)
        await proc.wait()
        await wait_gone(child)
    finally:
        proc.kill()
        await proc.wait()


async def test_a_call_pending_approval_survives_kill9_and_runs_once_after_the_restart(tmp_path):
    """Like a built-in tool: the turn waits for the approval across a kill -9; the restarted runtime starts
    the server before it carries the turn on, and allowing the call runs it once."""
    data, marks = tmp_path / "data", tmp_path / "marks"
    marks.mkdir()
    data.mkdir()
    (data / "mcp.json").write_text(json.dumps({"mcpServers": {"box": toolbox(marks, approval="ask")}}))
    proc = await ServerProcess(data).start()
    try:
        async with AsyncClient(proc.url, proc.token) as client:
            tid = (await client.create_thread())["id"]
            turn = await client.start_turn(tid, '/tool box__write_mark {"name": "k"}')
            requested = (await collect_until(client, tid, lambda e: e["event"] == "approval.requested"))[-1]
        (child,) = children_of(proc.process.pid)
        proc.process.send_signal(signal.SIGKILL)
        await proc.wait()
        await wait_gone(child)
    finally:
        proc.kill()
        await proc.wait()
    assert not (marks / "k.written").exists()
    again = await ServerProcess(data).start()
    try:
        async with AsyncClient(again.url, again.token) as client:
            detail = await client.get_thread(tid)
            assert next(t for t in detail["turns"] if t["id"] == turn["id"])["status"] == "awaiting_approval"
            seen = detail["latest_seq"]
            await client.decide_approval(tid, requested["payload"]["approval_id"], "allow")
            await collect_until(client, tid, lambda e: e["event"] == "turn.completed" and e["turn_id"] == turn["id"],
                                since_seq=seen)
            detail = await client.get_thread(tid)
            (item,) = [i for i in detail["items"] if i["turn_id"] == turn["id"] and i["kind"] == "tool_call"]
            assert (item["metadata"]["result"], item["metadata"]["is_error"]) == ("wrote k", False)
            assert (marks / "k.written").exists()
    finally:
        kids = children_of(again.process.pid)
        again.kill()
        await again.wait()
        for kid in kids:  # the server reads EOF and exits; none outlives the test
            await wait_gone(kid)


async def test_a_keyed_add_survives_kill9_and_its_retry_replays_the_first_answer(tmp_path):
    """The add's answer was committed with its mcp.json change: after a kill -9 of the runtime, the same
    request with the same Idempotency-Key replays it byte for byte (never 409 "already exists"), and the
    restarted runtime finds the file whole, no work file left, and the server listed."""
    data, marks = tmp_path / "data", tmp_path / "marks"
    marks.mkdir()
    data.mkdir()
    body = {"name": "off", **toolbox(marks, enabled=False)}
    proc = await ServerProcess(data).start()
    try:
        async with httpx.AsyncClient(base_url=proc.url, headers={"Authorization": f"Bearer {proc.token}"},
                                     timeout=E2E_LIMIT) as http:
            first = await http.post("/v1/mcp/servers", json=body, headers={"Idempotency-Key": "add-off"})
            assert first.status_code == 201, first.text
        proc.process.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        proc.kill()
        await proc.wait()
    on_file = (data / "mcp.json").read_bytes()
    again = await ServerProcess(data).start()
    try:
        async with httpx.AsyncClient(base_url=again.url, headers={"Authorization": f"Bearer {again.token}"},
                                     timeout=E2E_LIMIT) as http:
            replay = await http.post("/v1/mcp/servers", json=body, headers={"Idempotency-Key": "add-off"})
            assert (replay.status_code, replay.content) == (201, first.content)
            assert replay.headers["Idempotent-Replayed"] == "true"
            listed = (await http.get("/v1/mcp/servers")).json()
            assert [(s["name"], s["status"]) for s in listed["servers"]] == [("off", "disabled")]
            assert listed["file_error"] is None
    finally:
        again.kill()
        await again.wait()
    assert (data / "mcp.json").read_bytes() == on_file
    assert [p.name for p in data.iterdir() if p.name.startswith(".mcp.json")] == []
    assert SECRET not in first.text
