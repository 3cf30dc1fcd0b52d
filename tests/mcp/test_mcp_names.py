"""Exposed MCP tool names (API.md "Tools from MCP servers"; OpenAI's 64-character function-name limit):
``<server>__<tool>`` when it fits, else shortened with a stable hash; every exposed name unique."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from types import SimpleNamespace

from runtime.mcp.config import parse
from runtime.mcp.supervisor import MAX_TOOL_NAME, McpServers, McpTool, _Server, exposed_name
from tests.mcp.test_mcp_runtime import entry, results, write_file
from tests.runtime.helpers import run_turn
from tests.support import open_runtime


def test_short_names_are_kept_and_long_ones_shortened_stably_and_distinctly():
    assert exposed_name("box", "echo") == "box__echo"
    fits = "s" * 58 + "__echo"
    assert len(fits) == MAX_TOOL_NAME and exposed_name("s" * 58, "echo") == fits
    long_a, long_b = exposed_name("s" * 60, "echo"), exposed_name("s" * 60, "echo2")
    digest = hashlib.sha256(("s" * 60 + "__echo").encode()).hexdigest()[:8]
    # The server's name is cut, the tool's kept, a hash of the whole name added.
    assert long_a == "s" * 49 + "__echo_" + digest
    assert long_b.startswith("s" * 48 + "__echo2_") and long_b != long_a
    assert len(long_a) == len(long_b) == MAX_TOOL_NAME
    assert exposed_name("s" * 60, "echo") == long_a  # stable
    # A tool name too long by itself: both are cut, the server's to 8 characters.
    both = exposed_name("x" * 64, "t" * 128)
    assert both == "x" * 8 + "__" + "t" * 45 + "_" + hashlib.sha256(("x" * 64 + "__" + "t" * 128).encode()).hexdigest()[:8]
    assert len(exposed_name("x" * 64, "t" * 128)) == MAX_TOOL_NAME


def test_two_tools_with_the_same_exposed_name_are_offered_once_first_server_wins(tmp_path: Path):
    servers = McpServers(tmp_path)
    for server_name, tool_name in (("a", "b__c"), ("a__b", "c")):
        cfg = parse(server_name, {"command": "unused"})
        server = _Server(cfg)
        tool = McpTool(cfg, SimpleNamespace(name=tool_name, description="d", title=None,
                                            inputSchema={"type": "object"}, annotations=None))
        server.tools, server.status = {tool_name: tool}, "ready"
        servers._servers[server_name] = server
    offered = list(servers.tools())
    assert [(t.name, t.server, t.tool) for t in offered] == [("a__b__c", "a", "b__c")]
    found = servers.tool("a__b__c")
    assert (found.server, found.tool) == ("a", "b__c")


async def test_a_server_with_a_long_name_offers_every_tool_under_64_characters(tmp_path: Path):
    data, marks = tmp_path / "data", tmp_path / "marks"
    data.mkdir(), marks.mkdir()
    name = "a-rather-long-server-name-that-takes-most-of-the-64-characters"
    write_file(data, {name: entry(marks, approval="auto")})
    async with open_runtime(data) as rt:
        views = [tool.view() for tool in rt.mcp.tools()]
        names = [view["name"] for view in views]
        assert len(views) == 9 and len(set(names)) == 9
        assert all(len(n) <= MAX_TOOL_NAME and re.fullmatch(r"[A-Za-z0-9_-]+", n) for n in names)
        by_tool = {view["tool"]: view["name"] for view in views}
        # "<name>__echo" would be 68 characters: the server's name is cut, the tool's name kept.
        assert re.fullmatch(rf"{name[:49]}__echo_[0-9a-f]{{8}}", by_tool["echo"])
        assert by_tool["peek"].startswith(f"{name[:49]}__peek_")
        thread = await rt.create_thread()
        await run_turn(rt, thread["id"], f'/tool {by_tool["write_mark"]} {{"name": "n"}}')
        await run_turn(rt, thread["id"], f'/tool {by_tool["echo"]} {{"text": "long"}}')
        assert await results(rt, thread["id"]) == [("wrote n", False), ("long", False)]
        assert (marks / "n.written").exists()
        specs = {spec.name for spec in rt.manager.tools.spec()}
        assert set(names) <= specs and all(len(n) <= MAX_TOOL_NAME for n in specs)
