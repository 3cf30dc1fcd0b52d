"""A /health prober in its own process: ``python -m bench.probe PORT INTERVAL_MS``.

It prints ``ready`` once connected, then sends ``GET /health`` on a fixed schedule (one every INTERVAL_MS)
until its standard input closes, and prints the latencies as one JSON object on its last line. Each
request goes out at its time on a free keep-alive connection of a pool opened beforehand, and its latency
is counted from that scheduled time: a request due while the server's event loop is stalled waits for the
stall like any client arriving at that moment would (the coordinated-omission correction of wrk2), so the
latencies show how much of the time the loop was unavailable, and for how long. When every connection
is busy the next request waits for one (still timed from its schedule), so a stalled server is never
flooded with new connections.

A process of its own, so that the load generator's work (reading 12 MB bodies) never delays the probe.
Talks to 127.0.0.1 only; bounded by its input closing and by MAX_SECONDS.
"""

from __future__ import annotations

import json
import sys
import time

import trio

from bench.util import Conn, build_request

# Upper bound on one probe run, whatever the parent does: benchmarks load for a few seconds.
MAX_SECONDS = 300.0
# Connections opened before probing: at 5 ms a probe, 20 cover a 100 ms stall before requests queue.
POOL = 20


async def main(port: int, interval: float) -> None:
    raw = build_request("GET", "/health", token=None)
    send_free, free = trio.open_memory_channel[Conn](POOL)
    conns = [await Conn.open(port) for _ in range(POOL)]
    stop = trio.Event()
    out: list[float] = []

    async def watch_stdin() -> None:
        stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
        while await stdin.receive_some(4096):
            pass
        stop.set()

    async def probe(due: float) -> None:
        conn = await free.receive()
        status, _ = await conn.request(raw)
        out.append(time.perf_counter() - due)
        send_free.send_nowait(conn)
        if status != 200:
            raise RuntimeError(f"/health answered {status}")

    try:
        for conn in conns:
            status, _ = await conn.request(raw)  # warm-up, not counted
            assert status == 200, status
            send_free.send_nowait(conn)
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
        for conn in conns:
            await conn.aclose()
    print(json.dumps({"latencies": out}), flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), float(sys.argv[2]) / 1000)
