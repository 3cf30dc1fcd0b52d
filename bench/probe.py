"""A /health prober in its own process: ``python -m bench.probe PORT INTERVAL_MS``.

It prints ``ready`` once connected, then sends ``GET /health`` on a fixed schedule (one every INTERVAL_MS,
open loop: each request goes out at its time on a free keep-alive connection, a new one if all are busy)
until its standard input closes, and prints the latencies as one JSON object on its last line. So a
request due while the server's event loop is stalled waits for the stall like any client arriving at that
moment would, and the latencies show how much of the time the loop was unavailable, and for how long.

A process of its own, so that the load generator's work (reading 12 MB bodies) never delays the probe.
Talks to 127.0.0.1 only; bounded by its input closing and by MAX_SECONDS.
"""

from __future__ import annotations

import json
import sys
import time

import trio

from bench.util import Conn, build_request, raise_fd_limit

# Upper bound on one probe run, whatever the parent does: benchmarks load for a few seconds.
MAX_SECONDS = 300.0
# Upper bound on connections: at 5 ms a probe, 800 connections cover a 4 s stall.
MAX_CONNECTIONS = 800


async def main(port: int, interval: float) -> None:
    raise_fd_limit()
    raw = build_request("GET", "/health", token=None)
    free: list[Conn] = [await Conn.open(port)]
    opened = 1
    stop = trio.Event()
    out: list[float] = []

    async def watch_stdin() -> None:
        stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
        while await stdin.receive_some(4096):
            pass
        stop.set()

    async def probe(due: float) -> None:
        nonlocal opened
        if free:
            conn = free.pop()
        elif opened < MAX_CONNECTIONS:
            opened += 1
            conn = await Conn.open(port)
        else:
            raise RuntimeError(f"more than {MAX_CONNECTIONS} /health probes outstanding")
        status, _ = await conn.request(raw)
        out.append(time.perf_counter() - due)
        free.append(conn)
        if status != 200:
            raise RuntimeError(f"/health answered {status}")

    try:
        status, _ = await free[0].request(raw)  # warm-up, not counted
        assert status == 200, status
        print("ready", flush=True)
        with trio.move_on_after(MAX_SECONDS):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_stdin)
                due = time.perf_counter()
                while not stop.is_set():
                    nursery.start_soon(probe, due)
                    due += interval
                    await trio.sleep(max(0.0, due - time.perf_counter()))
                # the probes still out finish (or fail), bounded by MAX_SECONDS
    finally:
        for conn in free:
            await conn.aclose()
    print(json.dumps({"latencies": out}), flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), float(sys.argv[2]) / 1000)
