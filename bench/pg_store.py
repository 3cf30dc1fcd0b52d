"""``python -m bench.pg_store [N]``: the store backends side by side, in process (issue 15): a Runtime on
SQLite and one on PostgreSQL (the tests' throwaway cluster, tests/support_pg.py), the same work on each:

- create: ``Runtime.create_thread`` one after another (a store write and its commit each), p50 ms;
- turn: a thread's turn with the scripted model from ``start_turn`` to its ``turn.completed`` event, p50 ms;
- create x16: 16 concurrent creators (group commit folds them), threads per second.

Not a row of ``make bench`` (that runs servers in their own processes); a quick in-process comparison of
the two stores only. Prints one line per backend.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime import Runtime, RuntimeConfig  # noqa: E402
from tests.support_pg import start_cluster  # noqa: E402

CONCURRENCY = 16


async def measure(config: RuntimeConfig, n: int) -> dict[str, float]:
    async with Runtime.open(config) as rt:
        creates = []
        for _ in range(n):
            t0 = time.perf_counter()
            await rt.create_thread()
            creates.append(time.perf_counter() - t0)
        tid = (await rt.create_thread())["id"]
        turns = []
        for i in range(n):
            t0 = time.perf_counter()
            stream = await rt.subscribe(tid, since_seq=(await rt.get_thread(tid))["latest_seq"])
            turn = await rt.start_turn(tid, f"hello {i}")
            async for event in stream:
                if event.event == "turn.completed" and event.turn_id == turn["id"]:
                    break
            await stream.aclose()
            turns.append(time.perf_counter() - t0)
        done = 0
        t0 = time.perf_counter()

        async def creator() -> None:
            nonlocal done
            for _ in range(n):
                await rt.create_thread()
                done += 1

        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(creator)
        rate = done / (time.perf_counter() - t0)
    return {"create_p50_ms": statistics.median(creates) * 1000, "turn_p50_ms": statistics.median(turns) * 1000,
            "create_x16_per_s": rate}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    cluster = start_cluster()
    try:
        url = cluster.url(cluster.create_database())
        # Said on every run: the cluster is the tests' own, started as tests/support_pg.py starts it (durable).
        with psycopg.connect(url) as conn:
            settings = ", ".join(f"{name}={conn.execute(f'SHOW {name}').fetchone()[0]}"
                                 for name in ("fsync", "synchronous_commit", "wal_sync_method"))
        print(f"postgresql: the throwaway cluster of tests/support_pg.py, unchanged ({settings})")
        with tempfile.TemporaryDirectory() as d:
            sqlite = trio.run(measure, RuntimeConfig(data_dir=Path(d) / "s"), n)
            pg = trio.run(measure, RuntimeConfig(data_dir=Path(d) / "p", store_url=url), n)
    finally:
        cluster.stop()
    for name, got in (("sqlite", sqlite), ("postgresql", pg)):
        print(f"{name:10s} create p50 {got['create_p50_ms']:.2f} ms | turn p50 {got['turn_p50_ms']:.2f} ms | "
              f"create x{CONCURRENCY} {got['create_x16_per_s']:.0f}/s")
    print(f"postgresql/sqlite: create x{CONCURRENCY} throughput {pg['create_x16_per_s'] / sqlite['create_x16_per_s']:.2f}x, "
          f"turn p50 {pg['turn_p50_ms'] / sqlite['turn_p50_ms']:.2f}x")


if __name__ == "__main__":
    main()
