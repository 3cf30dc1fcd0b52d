"""Benchmark 15: history control on a 100-turn thread (issue 12), each against a baseline of the same run.

15a: ``POST /v1/threads/{id}/fork`` of the whole thread (copies of 100 turns and 200 items, one store
write) against ``GET /v1/threads/{id}`` of that thread (reads and sends the same turns and items). The
source never changes, so every fork does the same work; the two are sampled in turns on one
keep-alive connection, so both see the same server.

15b: ``POST /v1/threads/{id}/rewind`` before the last turn against ``PUT /v1/sessions`` of the same
thread. A rewind changes its thread, so every sample gets a fresh 100-turn copy (made by a fork first);
its engine is started by one unmeasured save, then one measured save and one measured rewind run on it.
"""

from __future__ import annotations

import json
import time

import trio

from bench import datagen
from bench.util import Conn, build_request, median, ours, pct, temp_dir

TURNS = 100  # the thread size the issue names
EVENTS = 1 + TURNS * 6  # thread.started; per turn: turn.started, 2 x item.started/completed, turn.completed


async def _timed(conn: Conn, raw: bytes, expect: int) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    status, body = await conn.request(raw)
    elapsed = time.perf_counter() - t0
    if status != expect:
        raise RuntimeError(f"unexpected HTTP {status}: {body[:300]!r}")
    return elapsed, body


def bench_history(sz) -> list:
    from bench.cases import Row  # bench.cases imports this module for its table

    reps = sz.pick(60, 20)
    with temp_dir("history") as d:
        conn = datagen.open_db(d)
        (tid,) = datagen.add_threads(conn, 1, turns=TURNS, events_per_thread=EVENTS)
        conn.close()
        with ours(d) as srv:
            async def main() -> dict[str, list[float]]:
                out: dict[str, list[float]] = {"get": [], "fork": [], "put": [], "rewind": []}
                c = await Conn.open(srv.port)
                try:
                    # all 100 turns (a page holds 50 by default): the same turns and items the fork copies
                    get = build_request("GET", f"/v1/threads/{tid}?turns_limit={TURNS}")
                    fork = build_request("POST", f"/v1/threads/{tid}/fork", body=b"{}")
                    _, body = await _timed(c, get, 200)
                    assert len(json.loads(body)["turns"]) == TURNS
                    await _timed(c, fork, 201)  # warm-up: starts the source's engine
                    for _ in range(reps):
                        out["get"].append((await _timed(c, get, 200))[0])
                        elapsed, body = await _timed(c, fork, 201)
                        assert len(json.loads(body)["turn_ids"]) == TURNS
                        out["fork"].append(elapsed)
                    for _ in range(reps):
                        _, body = await _timed(c, fork, 201)
                        copy = json.loads(body)
                        put = build_request("PUT", "/v1/sessions",
                                            body=json.dumps({"thread_id": copy["thread"]["id"]}).encode())
                        rewind = build_request("POST", f"/v1/threads/{copy['thread']['id']}/rewind",
                                               body=json.dumps({"before_turn_id": copy["turn_ids"][-1]}).encode())
                        await _timed(c, put, 200)  # starts the copy's engine
                        elapsed, body = await _timed(c, put, 200)
                        assert json.loads(body)["session"]["metadata"]["message_count"] == 2 * TURNS
                        out["put"].append(elapsed)
                        elapsed, body = await _timed(c, rewind, 200)
                        assert json.loads(body)["removed_turn_ids"] == copy["turn_ids"][-1:]
                        out["rewind"].append(elapsed)
                finally:
                    await c.aclose()
                return out

            r = trio.run(main)
    ms = {k: [v * 1000 for v in vs] for k, vs in r.items()}
    return [
        Row("15a", f"Fork of a {TURNS}-turn thread (p50)", "GET /v1/threads/{id} p50", median(ms["get"]),
            median(ms["fork"]), "ms", 3.0, False, generator="python, 1 conn",
            notes=f"{reps} of each, in turns; p99 GET {pct(ms['get'], 99):.1f} ms, fork {pct(ms['fork'], 99):.1f} ms"),
        Row("15b", f"Rewind of a {TURNS}-turn thread before its last turn (p50)", "PUT /v1/sessions p50",
            median(ms["put"]), median(ms["rewind"]), "ms", 2.0, False, generator="python, 1 conn",
            notes=f"{reps} fresh forked copies, warm engines; p99 PUT {pct(ms['put'], 99):.1f} ms, "
                  f"rewind {pct(ms['rewind'], 99):.1f} ms"),
    ]
