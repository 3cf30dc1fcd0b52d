"""In-process measurements, each run in a fresh interpreter (``python -m bench.inproc NAME JSON``) so
that memory figures start clean; prints one JSON object on its last line.
"""

from __future__ import annotations

import gc
import json
import sys
import time

import outcome
import trio

from bench import datagen
from bench.util import pct, rss_bytes, temp_dir


# ---- 1/2: snapshot round trips ------------------------------------------------------------------


async def bare_oneshot(n: int) -> list[float]:
    """The baseline: a request over a capacity-32 channel, the reply over a fresh 0-buffer channel."""
    inbox_tx, inbox_rx = trio.open_memory_channel(32)
    out: list[float] = []

    async def server() -> None:
        async for value, reply in inbox_rx:
            async with reply:
                try:
                    await reply.send(outcome.Value(value))
                except trio.BrokenResourceError:
                    pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        for i in range(n):
            t0 = time.perf_counter()
            reply_tx, reply_rx = trio.open_memory_channel(0)
            with reply_rx:
                await inbox_tx.send((i, reply_tx))
                (await reply_rx.receive()).unwrap()
            out.append(time.perf_counter() - t0)
        inbox_tx.close()
    return out


async def snapshots(args: dict) -> dict:
    from runtime import Runtime, RuntimeConfig

    n = args["n"]
    rounds = args.get("rounds", 5)
    with temp_dir("snap") as d:
        conn = datagen.open_db(d)
        (tid,) = datagen.add_threads(conn, 1, turns=10, events_per_thread=80)
        conn.close()
        async with Runtime.open(RuntimeConfig(data_dir=d)) as rt:
            snap = await rt.get_session_snapshot(tid)
            assert len(snap.messages) == 20, len(snap.messages)
            base_means, ours_means, base_all, ours_all = [], [], [], []
            for _ in range(rounds):  # interleaved so both see the same machine state
                b = await bare_oneshot(n)
                o = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    await rt.get_session_snapshot(tid)
                    o.append(time.perf_counter() - t0)
                base_means.append(sum(b) / len(b))
                ours_means.append(sum(o) / len(o))
                base_all += b
                ours_all += o
            result = {
                "bare_mean_us": sorted(base_means)[len(base_means) // 2] * 1e6,
                "ours_mean_us": sorted(ours_means)[len(ours_means) // 2] * 1e6,
                "bare_p50_us": pct(base_all, 50) * 1e6, "ours_p50_us": pct(ours_all, 50) * 1e6,
            }
            # 2: idle p99, then p99 while a turn streams at full speed (no delay between words).
            idle = []
            for _ in range(n):
                t0 = time.perf_counter()
                await rt.get_session_snapshot(tid)
                idle.append(time.perf_counter() - t0)
            prompt = datagen.text(args["turn_words"])
            busy: list[float] = []
            turns = deltas = 0
            deadline = time.perf_counter() + args.get("seconds", 20)
            while len(busy) < n and time.perf_counter() < deadline:
                if rt.manager.engine(tid).active is None:
                    await rt.start_turn(tid, prompt)
                    turns += 1
                    await trio.sleep(0)
                t0 = time.perf_counter()
                s = await rt.get_session_snapshot(tid)
                dt = time.perf_counter() - t0
                if s.turn_in_progress:
                    busy.append(dt)
            deltas = rt.store._write_rx.statistics().current_buffer_used
            result.update({"idle_p99_us": pct(idle, 99) * 1e6, "idle_p50_us": pct(idle, 50) * 1e6,
                           "busy_p99_us": pct(busy, 99) * 1e6, "busy_p50_us": pct(busy, 50) * 1e6,
                           "busy_samples": len(busy), "turns": turns, "write_backlog_at_end": deltas})
    return result


# ---- 6: idle engines ------------------------------------------------------------------------------


async def settled_rss() -> int:
    """RSS once every task is parked and garbage is collected, so two readings differ only by what lives."""
    await trio.testing.wait_all_tasks_blocked()
    gc.collect()
    return rss_bytes()


async def bare_tasks(args: dict) -> dict:
    """The baseline: ``n`` idle trio tasks, each blocked on its own memory channel."""
    n = args["n"]

    async def idle(rx) -> None:
        async with rx:
            try:
                await rx.receive()
            except trio.EndOfChannel:
                pass

    channels = []
    async with trio.open_nursery() as nursery:

        async def spawn(count: int) -> int:
            """Start ``count`` idle tasks; the RSS once they are all parked."""
            for _ in range(count):
                tx, rx = trio.open_memory_channel(32)
                channels.append(tx)
                nursery.start_soon(idle, rx)
            return await settled_rss()

        before = await spawn(50)  # warm up allocator pools the same way as the measured run
        after = await spawn(n)
        for tx in channels:
            tx.close()
    return {"per_task_bytes": (after - before) / n, "n": n}


async def idle_engines(args: dict) -> dict:
    from runtime import Runtime, RuntimeConfig

    n = args["n"]
    with temp_dir("engines") as d:
        conn = datagen.open_db(d)
        ids = datagen.add_threads(conn, n + 50, turns=1, events_per_thread=8)
        conn.close()
        async with Runtime.open(RuntimeConfig(data_dir=d)) as rt:
            for tid in ids[:50]:  # warm-up: caches, pools, the read connection's page cache
                await rt.get_session_snapshot(tid)
            before = await settled_rss()
            t0 = time.perf_counter()
            for tid in ids[50:]:
                await rt.get_session_snapshot(tid)
            spawn_s = time.perf_counter() - t0
            after = await settled_rss()
            live = rt.manager.live_count
            # every engine still answers
            await rt.get_session_snapshot(ids[-1])
    return {"per_engine_bytes": (after - before) / n, "n": n, "live": live, "spawn_seconds": spawn_s}


import trio.testing  # noqa: E402  (after trio, used above)

COMMANDS = {"snapshots": snapshots, "bare_tasks": bare_tasks, "idle_engines": idle_engines}

if __name__ == "__main__":
    name, raw = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "{}"
    result = trio.run(COMMANDS[name], json.loads(raw))
    print(json.dumps(result))
