"""MCP servers and their tools (API.md v1.1, "Tools from MCP servers"): list, add, change, delete and
reconnect servers; list the tools they offer. Every change re-reads ``<data-dir>/mcp.json`` and rewrites it
all-or-nothing with its idempotency record (runtime/mcp/changes.py) before the processes follow (runtime/mcp/supervisor.py); ``config`` is always redacted."""

from __future__ import annotations

from quart import Blueprint, Response, jsonify

from ..api import read_body, route, runtime
from ..idempotency import claim, idempotent, respond
from ..schemas import McpServerBody, McpServerList, McpServerRecord, McpToolList, UpdateMcpServerBody, provided

bp = Blueprint("mcp", __name__, url_prefix="/v1/mcp")


async def _claimed(made, value, status: int) -> Response:
    """Store the idempotency record of a reconnect (it changes no file and no row: a retry after a crash
    between the restart and this write restarts the server once more, which is what it asked for)."""
    if made is not None:
        from runtime.idempotency import record_claim

        await runtime().store.write(record_claim(made, value), action="record an MCP server change's answer")
    return respond(made, value, status)


@route(bp, "/servers", "GET", summary="MCP servers with their status (config redacted), and what is wrong with"
       " mcp.json if anything", response=McpServerList)
async def list_servers():
    file_error = await runtime().mcp.file_error()  # re-read: a hand edit that broke the file shows at once
    return jsonify({"servers": runtime().mcp.servers(), "file_error": file_error})


@route(bp, "/servers", "POST", summary="Add an MCP server (written to mcp.json, then started)", body=McpServerBody,
       response=McpServerRecord, status=201, errors=(400, 409, 500))
@idempotent
async def add_server():
    body = provided(await read_body(McpServerBody))
    name = body.pop("name")
    made = claim(201)
    # The claim's record is written with the mcp.json change (runtime/mcp/changes.py), not after it.
    view = await runtime().mcp.add(name, body, claim=made)
    return respond(made, view, 201)


@route(bp, "/servers/<name>", "PATCH", summary="Change an MCP server (rewrites mcp.json, restarts it)",
       body=UpdateMcpServerBody, response=McpServerRecord, errors=(400, 404, 409, 500))
async def update_server(name: str):
    body = provided(await read_body(UpdateMcpServerBody))
    return jsonify(await runtime().mcp.update(name, body))


@route(bp, "/servers/<name>", "DELETE", summary="Stop and remove an MCP server", status=204,
       errors=(400, 404, 409, 500))
async def delete_server(name: str):
    await runtime().mcp.delete(name)
    return Response("", status=204)


@route(bp, "/servers/<name>/reconnect", "POST", summary="Restart an MCP server", response=McpServerRecord,
       errors=(400, 404, 409))
@idempotent
async def reconnect_server(name: str):
    made = claim(200)
    view = await runtime().mcp.reconnect(name)
    return await _claimed(made, view, 200)


@route(bp, "/tools", "GET", summary="Tools of the ready MCP servers, as offered to the model",
       response=McpToolList)
async def list_tools():
    return jsonify({"tools": [tool.view() for tool in runtime().mcp.tools()]})
