"""Benchmark mcp (issue 17), each against a baseline of the same run, with the SDK test server
tests/mcp/servers/toolbox.py (stdio):

mcp-a: an MCP tool round trip through the runtime (``manager.tools.call("box__echo")``: name lookup, input
schema check, the SDK call, the result turned into a ToolOutcome) against the same call made directly with
the SDK's ClientSession to a server of its own. Calls alternate, so both see the same machine.

mcp-b: ``Runtime.open`` with 5 configured stdio servers (it returns once each is ready) against the same 5
servers started in parallel directly with the SDK (spawn, initialize, tools/list; no runtime), the slowest of
the five: the fair baseline, since five Python servers starting together compete for the machine's cores
(on 2 cores each takes ~2.5x as long as alone), which is not the runtime's doing. The ratio against ONE server
started alone is reported too (notes, extra). Rounds alternate (parallel SDK, then the runtime) so both see
the same machine; medians over the rounds.
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
ROUNDS_QUICK, ROUNDS_FULL = 3, 7  # start-up rounds (each starts 10 servers: ~2-4 s on 2 cores)


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

    async def parallel_sdk() -> float:
        """The 5 servers started at once with the SDK alone; the slowest one's start-up."""
        took: list[float] = []

        async def one() -> None:
            took.append(await _sdk_start())

        async with trio.open_nursery() as nursery:
            for _ in range(SERVERS):
                nursery.start_soon(one)
        return max(took)

    async def startups(d: Path) -> tuple[list[float], list[float], list[float]]:
        alone = [await _sdk_start() for _ in range(SERVERS)]
        (d / "mcp.json").write_text(json.dumps({"mcpServers": {f"s{i}": _entry() for i in range(SERVERS)}}))
        together, opened = [], []
        for _ in range(sz.pick(ROUNDS_FULL, ROUNDS_QUICK)):
            together.append(await parallel_sdk())
            t0 = time.perf_counter()
            async with Runtime.open(RuntimeConfig(data_dir=d)) as rt:
                opened.append(time.perf_counter() - t0)
                states = [v["status"] for v in rt.mcp.servers()]
            if states != ["ready"] * SERVERS:
                raise RuntimeError(f"servers not ready: {states}")
        return alone, together, opened

    ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
    with temp_dir("mcp-calls") as d:
        direct, ours = trio.run(round_trips, d)
    with temp_dir("mcp-start") as d:
        alone, together, opened = trio.run(startups, d)
    fair, ours_open, one_alone = median(ms(together)), median(ms(opened)), max(ms(alone))
    return [
        Row("mcp-a", "MCP tool round trip, stdio echo (p50)", "same call, SDK ClientSession p50", median(ms(direct)),
            median(ms(ours)), "ms", RATIO_CALL, False, generator="in-process",
            notes=f"{calls} calls each, alternating; p99 SDK {pct(ms(direct), 99):.2f} ms, ours {pct(ms(ours), 99):.2f} ms"),
        Row("mcp-b", f"Runtime.open with {SERVERS} stdio MCP servers (median of {len(opened)})",
            f"slowest of the same {SERVERS} started in parallel with the SDK alone (median)",
            fair, ours_open, "ms", RATIO_START, False, generator="in-process",
            notes=f"vs ONE server started alone ({one_alone:.0f} ms, slowest of {[round(a * 1000) for a in alone]}):"
                  f" {ours_open / one_alone:.2f}x; parallel SDK rounds {[round(t) for t in ms(together)]} ms, runtime"
                  f" rounds {[round(t) for t in ms(opened)]} ms",
            extra={"one_alone_ms": one_alone, "ratio_vs_one_alone": ours_open / one_alone,
                   "parallel_sdk_ms": ms(together), "runtime_ms": ms(opened)}),
    ]
