"""Benchmark 16: one huge thread (issue 16, part 2) against a small one and raw SQLite, in the same run.

The thread is written straight into the store's own schema by bench/datagen.py (one transaction): 10,000
completed turns and 1,000,000 events (``--quick``: 1,000 turns, 100,000 events), beside a 10-turn thread.

16a: ``GET /v1/threads/{id}`` p50 of the huge thread against the same request on the 10-turn one
     (one keep-alive connection, in turns, so both see the same server); target <= 2x.
16b: SSE replay of the huge thread from ``since_seq=0`` to its last stored event, in events/s, against
     reading the same rows (every column, in seq order) from SQLite directly in this process; target >= 0.5x.
16c: the server's RSS growth while 16b runs (VmRSS from /proc, sampled every 20 ms); target < 50 MB.
16d: engine spawn of the huge thread (the first op, a session snapshot, on a cold thread; the engine is
     shut down between samples so each one restores from the store), in process; target <= 50 ms. The
     baseline column is the same on the 10-turn thread. The thread is written without a boundary state
     (thread_states), as a store of an older version is: the first spawn folds every item and stores one,
     the later ones start from it (its time is in the notes).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import trio

from bench import datagen
from bench.util import HOST, Conn, build_request, median, ours, pct, temp_dir

TURNS = 10_000  # the thread size the issue names
EVENTS = 1_000_000
QUICK_TURNS, QUICK_EVENTS = 1_000, 100_000
SMALL_TURNS = 10
RSS_SAMPLE_SECONDS = 0.02


def vm_rss(pid: int) -> int:
    """VmRSS of ``pid`` in bytes (the figure the issue names)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raw_read_rate(db: Path, thread_id: str) -> tuple[float, int]:
    """Events/s reading every column of the thread's events in seq order straight from SQLite."""
    conn = sqlite3.connect(db)
    try:
        t0 = time.perf_counter()
        n = 0
        for _row in conn.execute("SELECT * FROM events WHERE thread_id = ? ORDER BY seq", (thread_id,)):
            n += 1
        return n / (time.perf_counter() - t0), n
    finally:
        conn.close()


async def replay(port: int, pid: int, thread_id: str, expected: int) -> dict:
    """Read the SSE stream from since_seq=0 until ``expected`` frames arrived, sampling the server's RSS."""
    rss = [vm_rss(pid)]
    done = trio.Event()

    async def sampler() -> None:
        while not done.is_set():
            rss.append(vm_rss(pid))
            with trio.move_on_after(RSS_SAMPLE_SECONDS):
                await done.wait()
        rss.append(vm_rss(pid))

    frames = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler)
        stream = await trio.open_tcp_stream(HOST, port)
        try:
            t0 = time.perf_counter()
            await stream.send_all(build_request("GET", f"/v1/threads/{thread_id}/events?since_seq=0",
                                                headers={"Accept": "text/event-stream"}))
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(65536)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"SSE replay: {head[:200]!r}")
            tail = head[head.index(b"\r\n\r\n") + 4:]
            frames = tail.count(b"\nevent: ")
            tail = tail[-8:]
            with trio.fail_after(600):
                while frames < expected:
                    chunk = await stream.receive_some(1 << 20)
                    if not chunk:
                        raise RuntimeError(f"SSE replay ended after {frames} of {expected} frames")
                    frames += (tail + chunk).count(b"\nevent: ") - tail.count(b"\nevent: ")
                    tail = chunk[-8:]
            elapsed = time.perf_counter() - t0
        finally:
            await stream.aclose()
            done.set()
    return {"rate": frames / elapsed, "frames": frames, "elapsed": elapsed, "rss_before": rss[0],
            "rss_peak": max(rss), "samples": len(rss)}


async def detail_latencies(port: int, huge: str, small: str, reps: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"huge": [], "small": []}
    conn = await Conn.open(port)
    try:
        requests = {"huge": build_request("GET", f"/v1/threads/{huge}"),
                    "small": build_request("GET", f"/v1/threads/{small}")}
        for raw in requests.values():  # warm-up
            status, _ = await conn.request(raw)
            assert status == 200, status
        for _ in range(reps):
            for name, raw in requests.items():
                t0 = time.perf_counter()
                status, body = await conn.request(raw)
                out[name].append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"GET thread {name}: HTTP {status}: {body[:200]!r}")
    finally:
        await conn.aclose()
    return out


async def spawn_times(data_dir: Path, huge: str, small: str, reps: int) -> dict[str, list[float]]:
    """The first op on a cold thread (its engine restores from the store), ``reps`` times each, in turns."""
    from runtime import Runtime, RuntimeConfig

    out: dict[str, list[float]] = {"huge": [], "small": []}
    async with Runtime.open(RuntimeConfig(data_dir=data_dir)) as rt:
        for _ in range(reps):
            for name, tid in (("huge", huge), ("small", small)):
                t0 = time.perf_counter()
                snap = await rt.get_session_snapshot(tid)
                out[name].append(time.perf_counter() - t0)
                if not snap.messages:
                    raise RuntimeError(f"thread {tid}: empty snapshot")
                await rt.shutdown_thread(tid)
    return out


def bench_huge(sz) -> list:
    from bench.cases import Row  # bench.cases imports this module for its table

    turns, events = sz.pick((TURNS, EVENTS), (QUICK_TURNS, QUICK_EVENTS))
    reps = sz.pick(30, 15)
    with temp_dir("huge") as d:
        conn = datagen.open_db(d)
        t0 = time.perf_counter()
        (huge,) = datagen.add_threads(conn, 1, turns=turns, events_per_thread=events, prefix="thr_huge_")
        (small,) = datagen.add_threads(conn, 1, turns=SMALL_TURNS, events_per_thread=events // turns * SMALL_TURNS,
                                       prefix="thr_small_")
        stored = conn.execute("SELECT COUNT(*) FROM events WHERE thread_id = ?", (huge,)).fetchone()[0]
        conn.close()
        built = time.perf_counter() - t0
        spawn = trio.run(spawn_times, d, huge, small, reps)
        raw_rate, raw_rows = raw_read_rate(d / "runtime.sqlite3", huge)
        with ours(d) as srv:
            detail = trio.run(detail_latencies, srv.port, huge, small, reps)
            sse = trio.run(replay, srv.port, srv.pid, huge, stored)
    if raw_rows != stored or sse["frames"] != stored:
        raise RuntimeError(f"expected {stored} events, raw read {raw_rows}, SSE {sse['frames']}")
    ms = {k: [v * 1000 for v in vs] for k, vs in detail.items()}
    spawn_ms = {k: [v * 1000 for v in vs] for k, vs in spawn.items()}
    growth_mb = (sse["rss_peak"] - sse["rss_before"]) / 1e6
    size = f"{turns:,} turns, {stored:,} events"
    return [
        Row("16a", f"GET /v1/threads/{{id}} p50, huge thread ({size})", f"same, {SMALL_TURNS}-turn thread",
            median(ms["small"]), median(ms["huge"]), "ms", 2.0, False, generator="python, 1 conn",
            notes=f"{reps} of each, in turns; p99 small {pct(ms['small'], 99):.1f} ms, huge {pct(ms['huge'], 99):.1f}"
                  f" ms; thread built in {built:.1f} s"),
        Row("16b", f"SSE replay from since_seq=0, huge thread ({stored:,} events)", "raw SQLite read of the rows",
            raw_rate, sse["rate"], "events/s", 0.5, True, generator="python SSE client (1)",
            notes=f"{sse['frames']:,} frames in {sse['elapsed']:.2f} s"),
        Row("16c", "Server RSS growth during the 16b replay", "limit", 50.0, growth_mb, "MB", 1.0, False,
            generator="python SSE client (1)", absolute_target=50.0,
            notes=f"VmRSS {sse['rss_before'] / 1e6:.0f} MB before, peak {sse['rss_peak'] / 1e6:.0f} MB"
                  f" ({sse['samples']} samples)"),
        Row("16d", "Engine spawn, huge thread (first op on a cold thread, p50)", f"same, {SMALL_TURNS}-turn thread",
            median(spawn_ms["small"]), median(spawn_ms["huge"]), "ms", 1.0, False, generator="in-process",
            absolute_target=50.0,
            notes=f"{reps} of each, in turns; p99 small {pct(spawn_ms['small'], 99):.1f} ms, huge"
                  f" {pct(spawn_ms['huge'], 99):.1f} ms; the first (no boundary state stored yet, as after an"
                  f" upgrade) {spawn_ms['huge'][0]:.0f} ms"),
    ]
