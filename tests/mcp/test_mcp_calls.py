"""``McpServers.call`` against a stand-in session (the seam is the SDK's ClientSession): the outcomes that
depend on which of two SDK tasks runs first are pinned down here, without a process."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import trio
import trio.testing
from mcp import types
from mcp.shared.exceptions import McpError

from runtime.mcp import McpServers
from runtime.mcp.config import parse
from runtime.mcp.supervisor import McpTool, _Server

EXITED = ("Tool 'box__echo' failed: MCP server 'box' exited during the call (it is being restarted; the call may"
          " or may not have had its effect)")


class Session:
    """Answers ``call_tool`` with ``answer`` (an exception is raised); counts requests like the SDK."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self._request_id = 7
        self.notes: list = []

    async def call_tool(self, name, arguments):
        self._request_id += 1
        await trio.lowlevel.checkpoint()
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    async def send_notification(self, note) -> None:
        self.notes.append(note)


def ready(servers: McpServers, session: Session, **config) -> McpTool:
    cfg = parse("box", {"command": "unused", **config})
    server = _Server(cfg)
    tool = McpTool(cfg, SimpleNamespace(name="echo", description="e", title=None, inputSchema={"type": "object"},
                                        annotations=None))
    server.session, server.tools, server.status = session, {"echo": tool}, "ready"
    servers._servers["box"] = server
    return tool


async def test_a_connection_closed_answer_is_the_server_exited_during_the_call(tmp_path: Path):
    # The SDK's reader answers pending calls "Connection closed" when the server's stream ends; that may
    # come before the supervisor notices the exit. Either way the model reads the same result.
    # The result waits until the status has left "ready" (a client that reads the result and then the status
    # never finds the dead start ready).
    servers = McpServers(tmp_path)
    closed = McpError(types.ErrorData(code=types.CONNECTION_CLOSED, message="Connection closed"))
    tool = ready(servers, Session(closed))
    order = []

    async def supervisor_notices() -> None:
        await trio.testing.wait_all_tasks_blocked()
        order.append("failed")
        servers._servers["box"].set("failed", "the server closed its connection (it exited); restarting")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor_notices)
            outcome = await servers.call(tool, {})
            order.append("result")
    assert (outcome.content, outcome.is_error) == (EXITED, True)
    assert order == ["failed", "result"]


async def test_another_protocol_error_is_quoted_with_secrets_removed(tmp_path: Path):
    servers = McpServers(tmp_path)
    error = McpError(types.ErrorData(code=-32602, message="bad key sk-123 for you"))
    tool = ready(servers, Session(error), env={"KEY": "sk-123"})
    outcome = await servers.call(tool, {})
    assert (outcome.content, outcome.is_error) == (
        "Tool 'box__echo' failed: MCP server 'box': bad key <redacted> for you", True)


async def test_results_text_joined_structured_as_json_and_is_error_kept(tmp_path: Path):
    servers = McpServers(tmp_path)
    answer = types.CallToolResult(content=[types.TextContent(type="text", text="a"),
                                           types.TextContent(type="text", text="b")], isError=True)
    outcome = await servers.call(ready(servers, Session(answer)), {})
    assert (outcome.content, outcome.is_error) == ("a\nb", True)
    answer = types.CallToolResult(content=[], structuredContent={"n": 1, "s": "é"})
    outcome = await servers.call(ready(servers, Session(answer)), {})
    assert (outcome.content, outcome.is_error) == ('{"n": 1, "s": "é"}', False)


async def test_a_timeout_sends_the_cancellation_for_the_calls_request_id(tmp_path: Path, autojump_clock):
    servers = McpServers(tmp_path)
    session = Session(None)

    async def never(name, arguments):
        session._request_id += 1
        await trio.sleep_forever()

    session.call_tool = never
    outcome = await servers.call(ready(servers, session, tool_timeout=2), {})
    assert (outcome.content, outcome.is_error) == (
        "Tool 'box__echo' did not finish within 2 s (tool_timeout of MCP server 'box')", True)
    [note] = session.notes
    assert note.root.method == "notifications/cancelled"
    assert (note.root.params.requestId, note.root.params.reason) == (7, "tool_timeout")
