"""Benchmark mcp (issue 17), each against a baseline of the same run, with the SDK test server
tests/mcp/servers/toolbox.py (stdio):

mcp-a: an MCP tool round trip through the runtime (``manager.tools.call("box__echo")``: name lookup, input
schema check, the SDK call, the result turned into a ToolOutcome) against the same call made directly with
the SDK's ClientSession to a server of its own. Calls alternate, so both see the same machine.

mcp-b: ``Runtime.open`` with 5 configured stdio servers (it returns once each is ready) against the
slowest of the 5 servers' own start-ups (spawn, initialize, tools/list with the SDK), measured one at a time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import trio

from bench.util import median, pct, temp_dir

TOOLBOX = Path(__file__).resolve().parents[1] / "tests" / "mcp" / "servers" / "toolbox.py"
SERVERS = 5  # the number
RATIO_CALL = 3.0  # the targets
RATIO_START = 1.5


def _entry() -> dict:
    return {"command": sys.executable, "args": [str(TOOLBOX)], "approval": "auto", "startup_timeout": 120}


async def _sdk_start() -> float:
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    t0 = time.perf_counter()
    async with stdio_client(StdioServerParameters(command=sys.executable, args=[str(TOOLBOX)])) as (r, w):
        async with ClientSession(r, w) as session:
            await session.initialize()
            await session.list_tools()
            return time.perf_counter() - t0


def bench_mcp(sz) -> list:
    from bench.cases import Row
    from runtime import RuntimeConfig
    from runtime.core import Runtime
    from runtime.models.tools import ToolContext

    calls = sz.pick(400, 100)

    async def round_trips(d: Path) -> tuple[list[float], list[float]]:
        from mcp import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        (d / "mcp.json").write_text(json.dumps({"mcpServers": {"box": _entry()}}))
        direct, ours = [], []
        async with Runtime.open(RuntimeConfig(data_dir=d)) as rt:
            tools = rt.manager.tools
            context = ToolContext("bench", d)
            async with stdio_client(StdioServerParameters(command=sys.executable, args=[str(TOOLBOX)])) as (r, w):
                async with ClientSession(r, w) as session:
                    await session.initialize()
                    for i in range(calls + 10):  # the first 10 of each warm up
                        t0 = time.perf_counter()
                        result = await session.call_tool("echo", {"text": f"x{i}"})
                        t1 = time.perf_counter()
                        outcome = await tools.call("box__echo", {"text": f"x{i}"}, context)
                        t2 = time.perf_counter()
                        if result.content[0].text != f"x{i}" or outcome.content != f"x{i}" or outcome.is_error:
                            raise RuntimeError(f"unexpected answers: {result!r} / {outcome!r}")
                        if i >= 10:
                            direct.append(t1 - t0)
                            ours.append(t2 - t1)
        return direct, ours

    async def startups(d: Path) -> tuple[list[float], float]:
        alone = [await _sdk_start() for _ in range(SERVERS)]
        (d / "mcp.json").write_text(json.dumps({"mcpServers": {f"s{i}": _entry() for i in range(SERVERS)}}))
        t0 = time.perf_counter()
        async with Runtime.open(RuntimeConfig(data_dir=d)) as rt:
            opened = time.perf_counter() - t0
            states = [v["status"] for v in rt.mcp.servers()]
        if states != ["ready"] * SERVERS:
            raise RuntimeError(f"servers not ready: {states}")
        return alone, opened

    with temp_dir("mcp-calls") as d:
        direct, ours = trio.run(round_trips, d)
    with temp_dir("mcp-start") as d:
        alone, opened = trio.run(startups, d)
    ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
    return [
        Row("mcp-a", "MCP tool round trip, stdio echo (p50)", "same call, SDK ClientSession p50", median(ms(direct)),
            median(ms(ours)), "ms", RATIO_CALL, False, generator="in-process",
            notes=f"{calls} calls each, alternating; p99 SDK {pct(ms(direct), 99):.2f} ms, ours {pct(ms(ours), 99):.2f} ms"),
        Row("mcp-b", f"Runtime.open with {SERVERS} stdio MCP servers", "slowest server's own start-up",
            max(alone) * 1000, opened * 1000, "ms", RATIO_START, False, generator="in-process",
            notes=f"own start-ups {[round(a * 1000) for a in alone]} ms (one at a time); the runtime starts them in"
                  " parallel on the machine's cores"),
    ]
