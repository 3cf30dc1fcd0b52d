"""A stdio MCP server for the tests, written with the official SDK (FastMCP), one tool per behaviour the
runtime must handle: an echo, a read-only tool (``readOnlyHint``), a writing tool, one that sleeps (past
``tool_timeout``), one that exits the process (a crash), one that records its own cancellation, and one
that fails. Marker files go to the directory named by ``TOOLBOX_MARKS`` (a test's tmp dir).

Run as ``python toolbox.py`` (stdio) or ``python toolbox.py --http PORT`` (streamable HTTP on 127.0.0.1:PORT,
path ``/mcp``). With ``TOOLBOX_STUBBORN=1`` the server ignores SIGTERM and, once its stdin ends, stays
alive instead of exiting (only SIGKILL ends it: the runtime must not rely on either). With
``TOOLBOX_SHOUT=N`` it writes N bytes ("x") to stderr before serving (a chatty server's log). ``TOOLBOX_SECRET`` is read only to prove the runtime passed ``env``
through; no tool ever prints it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import anyio
from mcp.server.fastmcp import Context, FastMCP
from mcp.types import ToolAnnotations

server = FastMCP("toolbox")
MARKS = Path(os.environ.get("TOOLBOX_MARKS") or ".")


def _mark(name: str, text: str = "") -> None:
    (MARKS / name).write_text(text, encoding="utf-8")


@server.tool(description="Returns its text.")
def echo(text: str) -> str:
    return text


@server.tool(description="Reads nothing, changes nothing.", annotations=ToolAnnotations(readOnlyHint=True))
def peek() -> str:
    return "peeked"


@server.tool(description="Writes a marker file.", annotations=ToolAnnotations(readOnlyHint=False))
def write_mark(name: str) -> str:
    _mark(f"{name}.written")
    return f"wrote {name}"


@server.tool(description="Sleeps, then returns.")
async def sleep(seconds: float) -> str:
    await anyio.sleep(seconds)
    return f"slept {seconds}"


@server.tool(description="Exits the server process at once.")
def crash() -> str:
    os._exit(3)


@server.tool(description="Waits until cancelled; records its start and its cancellation.")
async def wait_cancel(name: str) -> str:
    _mark(f"{name}.started")
    try:
        await anyio.sleep(3600)
    except anyio.get_cancelled_exc_class():
        _mark(f"{name}.cancelled")
        raise
    return "never"


@server.tool(description="Always fails.")
def fail() -> str:
    raise ValueError("the fail tool failed on purpose")


@server.tool(description="Says whether TOOLBOX_SECRET reached the server (never its value).")
def has_secret() -> str:
    return "yes" if os.environ.get("TOOLBOX_SECRET") else "no"


@server.tool(description="Says whether the HTTP request carried an X-Toolbox-Secret header (never its value).")
def has_header(ctx: Context) -> str:
    request = getattr(ctx.request_context, "request", None)
    headers = getattr(request, "headers", None) or {}
    return "yes" if headers.get("x-toolbox-secret") else "no"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--http"]:
        server.settings.host, server.settings.port = "127.0.0.1", int(sys.argv[2])
        server.settings.log_level = "WARNING"
        server.run(transport="streamable-http")
    else:
        stubborn = os.environ.get("TOOLBOX_STUBBORN") == "1"
        if stubborn:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        shout = int(os.environ.get("TOOLBOX_SHOUT") or 0)
        for start in range(0, shout, 65536):
            sys.stderr.write("x" * min(65536, shout - start))
        sys.stderr.flush()
        server.run()
        while stubborn:  # stdin ended: a well-behaved server exits here; this one waits for SIGKILL
            signal.pause()
