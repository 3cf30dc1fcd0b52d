"""A hand-edited ``mcp.json`` (API.md "Tools from MCP servers"; docs/API.md): every change re-reads the file.
An invalid file shows in ``GET /v1/mcp/servers`` (``file_error``, naming the file and the parse error), and
every change that would rewrite it answers 409 with the same reason, leaving the user's bytes untouched;
once fixed by hand, the next change works without a restart, keeps the hand edits, and the running servers
follow the file. Through the app's in-process client on a real runtime (real files, real store); the
servers are disabled except where a process must start, so the tests cost milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from runtime import Runtime, RuntimeConfig
from web.app import create_app
from web.settings import ServerSettings

from .test_mcp_runtime import LIMIT, children, entry, write_file

AUTH = {"Authorization": "Bearer t"}
BROKEN = b'{"mcpServers": {"box": {"command": "python",}}}\n'  # a trailing comma: what a hand edit leaves


def _app(rt: Runtime, data: Path):
    return create_app(rt, ServerSettings(data_dir=data, auth_token="t"), "t").test_client()


async def test_a_file_broken_by_hand_is_shown_and_never_overwritten_and_a_fix_needs_no_restart(tmp_path):
    data, marks = tmp_path / "data", tmp_path / "marks"
    data.mkdir()
    marks.mkdir()
    write_file(data, {"box": {**entry(marks), "enabled": False}})
    path = data / "mcp.json"
    async with Runtime.open(RuntimeConfig(data_dir=data)) as rt:
        client = _app(rt, data)
        listed = await (await client.get("/v1/mcp/servers", headers=AUTH)).get_json()
        assert listed["file_error"] is None and [s["name"] for s in listed["servers"]] == ["box"]

        path.write_bytes(BROKEN)  # the user breaks the file while the runtime runs
        listed = await (await client.get("/v1/mcp/servers", headers=AUTH)).get_json()
        assert listed["file_error"].startswith(f"{path} is not valid JSON: Expecting property name")
        assert [s["name"] for s in listed["servers"]] == ["box"]  # what runs is still shown
        for method, url, body in (("POST", "/v1/mcp/servers", {"name": "new", **entry(marks), "enabled": False}),
                                  ("PATCH", "/v1/mcp/servers/box", {"approval": "auto"}),
                                  ("DELETE", "/v1/mcp/servers/box", None)):
            response = await client.open(url, method=method, headers=AUTH, json=body)
            error = (await response.get_json())["error"]
            assert (response.status_code, error["code"]) == (409, "conflict"), (method, error)
            assert error["message"] == (f"MCP servers cannot be changed while mcp.json is invalid"
                                        f" ({listed['file_error']}); fix the file (the API never overwrites it),"
                                        f" then retry")
            assert path.read_bytes() == BROKEN, f"{method} rewrote the user's file"
        assert sorted(p.name for p in data.iterdir() if p.name.startswith(".mcp.json")) == []

        # Fixed by hand, with an edit of its own (a second server, box's approval changed): the next change
        # works at once, keeps both edits, and the API shows the file.
        write_file(data, {"box": {**entry(marks), "enabled": False, "approval": "writes"},
                          "hand": {**entry(marks), "enabled": False}})
        listed = await (await client.get("/v1/mcp/servers", headers=AUTH)).get_json()
        assert listed["file_error"] is None
        response = await client.post("/v1/mcp/servers", headers=AUTH,
                                     json={"name": "new", **entry(marks), "enabled": False})
        assert response.status_code == 201, await response.get_json()
        on_file = json.loads(path.read_bytes())["mcpServers"]
        assert list(on_file) == ["box", "hand", "new"] and on_file["box"]["approval"] == "writes"
        listed = await (await client.get("/v1/mcp/servers", headers=AUTH)).get_json()
        assert [(s["name"], s["config"]["approval"]) for s in listed["servers"]] == [
            ("box", "writes"), ("hand", "ask"), ("new", "ask")]


async def test_a_runtime_started_on_a_broken_file_starts_its_servers_once_it_is_fixed(tmp_path):
    """No server starts from a broken file; after the fix, the first change makes the running servers
    follow the whole file (its enabled server starts), without a restart."""
    data, marks = tmp_path / "data", tmp_path / "marks"
    data.mkdir()
    marks.mkdir()
    (data / "mcp.json").write_bytes(BROKEN)
    before = children()
    async with Runtime.open(RuntimeConfig(data_dir=data)) as rt:
        client = _app(rt, data)
        listed = await (await client.get("/v1/mcp/servers", headers=AUTH)).get_json()
        assert listed["servers"] == [] and "is not valid JSON" in listed["file_error"]
        response = await client.post("/v1/mcp/servers", headers=AUTH, json={"name": "x", **entry(marks)})
        assert response.status_code == 409 and (data / "mcp.json").read_bytes() == BROKEN

        write_file(data, {"box": entry(marks)})
        response = await client.post("/v1/mcp/servers", headers=AUTH,
                                     json={"name": "off", **entry(marks), "enabled": False})
        assert response.status_code == 201
        with trio.fail_after(LIMIT):
            await rt.mcp.state("box").settled.wait()
        listed = await (await client.get("/v1/mcp/servers", headers=AUTH)).get_json()
        assert listed["file_error"] is None
        assert [(s["name"], s["status"]) for s in listed["servers"]] == [("box", "ready"), ("off", "disabled")]
        assert len(children() - before) == 1
    assert children() - before == set()
