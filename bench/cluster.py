"""Rows c1-c3 (issue 15): the server on PostgreSQL against the same server on SQLite, and a forwarded
request against a direct one, all in the same run (``python -m bench.run --only cluster``).

- c1: turn round trip (POST turn -> ``turn.completed`` on SSE, 50 words) p50, PostgreSQL vs SQLite;
  target: PostgreSQL within 2x (the issue's ">= 0.5x the SQLite figure").
- c2: ``POST /v1/threads`` req/s, 50 connections, PostgreSQL vs SQLite; target >= 0.5x.
- c3: ``POST /v1/threads/{id}/turns`` -> 201 p50 sent to a host that does not own the thread (forwarded to
  the owner) vs sent to the owner; target <= 1.5x. Each turn is waited for (on the owner's SSE) before the
  next request, untimed, so both sides time the same request on an idle thread.

The PostgreSQL cluster is the tests' throwaway one (tests/support_pg.py: fsync on, 127.0.0.1), the servers
run in their own processes like every other row.
"""

from __future__ import annotations

import json
import time

import trio

from bench import datagen
from bench.pg import cluster_db
from bench.util import Conn, build_request, call, load, ours, pct, temp_dir


async def _turns(port: int, sse_port: int, thread_id: str, reps: int, prompt: str, *,
                 until_completed: bool) -> list[float]:
    """POST ``reps`` turns on ``port``, one after the other, each waited for to its ``turn.completed`` on
    ``sse_port``'s stream. Seconds each: to that event (``until_completed``: the round trip) or to the 201."""
    from bench.cases import SSEReader

    completed = trio.Semaphore(0)

    def on_frame(frame: bytes) -> bool:
        if b"\nevent: turn.completed\n" in frame:
            completed.release()
        return False

    out: list[float] = []
    async with trio.open_nursery() as nursery:
        reader = SSEReader(sse_port, f"/v1/threads/{thread_id}/events?since_seq=1")
        nursery.start_soon(reader.run, on_frame)
        await reader.connected.wait()
        conn = await Conn.open(port)
        raw = build_request("POST", f"/v1/threads/{thread_id}/turns", body=json.dumps({"prompt": prompt}).encode())
        with trio.fail_after(180):
            for _ in range(reps):
                t0 = time.perf_counter()
                status, body = await conn.request(raw)
                if not until_completed:
                    out.append(time.perf_counter() - t0)
                assert status == 201, (status, body[:300])
                await completed.acquire()
                if until_completed:
                    out.append(time.perf_counter() - t0)
                    await trio.sleep(0.01)
        await conn.aclose()
        nursery.cancel_scope.cancel()
    return out


async def _round_trips(port: int, sse_port: int, thread_id: str, reps: int, prompt: str) -> list[float]:
    """POST a turn on ``port`` and wait for its ``turn.completed`` on ``sse_port``'s stream: seconds each."""
    return await _turns(port, sse_port, thread_id, reps, prompt, until_completed=True)


async def _post_latencies(port: int, owner_port: int, thread_id: str, reps: int) -> list[float]:
    """POST turn -> 201 on ``port`` (timed), then its end on the owner's stream (untimed)."""
    return await _turns(port, owner_port, thread_id, reps, "hello there", until_completed=False)


def bench_cluster(sz) -> list:
    from bench.cases import Row

    reps = sz.pick(40, 15)
    prompt = datagen.text(48)
    with cluster_db() as (cluster, db), temp_dir("cluster") as root:
        url = cluster.url(db)
        results: dict[str, dict[str, float]] = {}
        for label, extra in (("sqlite", ()), ("postgresql", ("--store", url))):
            with ours(root / f"{label}-rt", *extra) as srv:
                async def round_trip() -> list[float]:
                    tid = (await call(srv.port, "POST", "/v1/threads", {"title": "rt"}))["id"]
                    return await _round_trips(srv.port, srv.port, tid, reps, prompt)

                rt = trio.run(round_trip)
            with ours(root / f"{label}-create", *extra) as srv:
                created = load(srv.port, "POST", "/v1/threads", bodies=[b"{}"], seconds=sz.load_seconds)
            results[label] = {"rt_p50": pct(rt, 50) * 1000, "rt_p99": pct(rt, 99) * 1000, "create_rps": created.rps,
                              "create_errors": created.errors}

        # c3: two hosts on one database; h1 owns the thread (it ran a turn first).
        with ours(root / "h1", "--store", url, "--host-id", "h1") as h1, \
                ours(root / "h2", "--store", url, "--host-id", "h2") as h2:
            async def forwarded() -> tuple[list[float], list[float]]:
                tid = (await call(h1.port, "POST", "/v1/threads", {"title": "fwd"}))["id"]
                await _post_latencies(h1.port, h1.port, tid, 3)  # h1 takes the lease; warm-up of both paths
                await _post_latencies(h2.port, h1.port, tid, 3)
                direct, via = [], []
                for _ in range(reps // 5 or 1):  # interleaved blocks: both sides see the same machine load
                    direct += await _post_latencies(h1.port, h1.port, tid, 5)
                    via += await _post_latencies(h2.port, h1.port, tid, 5)
                return direct, via

            direct, via = trio.run(forwarded)
    s, p = results["sqlite"], results["postgresql"]
    return [
        Row("c1", "Turn round trip p50 on PostgreSQL", "same on SQLite", s["rt_p50"], p["rt_p50"], "ms", 2.0, False,
            generator="python, 1 conn + SSE",
            notes=f"p99 {p['rt_p99']:.1f} vs {s['rt_p99']:.1f} ms; {reps} turns of 50 words each"),
        Row("c2", "POST /v1/threads req/s on PostgreSQL", "same on SQLite", s["create_rps"], p["create_rps"], "req/s",
            0.5, True, generator="50 connections",
            notes=f"errors {p['create_errors']} / {s['create_errors']}"),
        Row("c3", "POST turn p50 forwarded to the owner", "sent to the owner", pct(direct, 50) * 1000,
            pct(via, 50) * 1000, "ms", 1.5, False, generator="python, 1 conn",
            notes=f"p99 {pct(via, 99) * 1000:.2f} vs {pct(direct, 99) * 1000:.2f} ms; n={len(via)} each"),
    ]
