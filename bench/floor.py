"""Row 17 (issue 16, part 3): the floor under every request. ``GET /health`` req/s of ``trio-runtime serve``
against a bare quart-trio app on the same hypercorn worker (bench/bare_server.py), same body, same load
generator, same run. Both servers run at once (idle while the other is loaded) and are loaded in turns,
``ROUNDS`` times each, so that a burst of load from elsewhere on the machine hits both sides alike; the
row compares the medians. What is left between the two is what our request pipeline costs a request that
needs none of it (auth, CORS, the error map, the connection wrapper of web/app.py, the write bounds of
web/server.py).

The notes add each server's CPU time per request (user + system, from /proc): on a shared machine req/s
moves with whatever else runs, CPU time per request much less.

``python -m bench.run --only floor [--quick]``.
"""

from __future__ import annotations

import os

from bench.util import bare, median, ours, temp_dir, load

# Load runs per side, taken in turns (bare, ours, bare, ours, ...): the median of 3 drops one outlier run.
ROUNDS = 3
# Issue 16, part 3: "bring our /health to >= 0.9x of it".
TARGET = 0.9


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (fields 14 and 15 of /proc/PID/stat, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_floor(sz) -> list:
    from bench.cases import Row

    rounds = sz.pick(ROUNDS, 2)
    with temp_dir("floor") as d, ours(d) as mine, bare() as base:
        runs: dict[str, list] = {"bare": [], "ours": []}
        cpu: dict[str, list[float]] = {"bare": [], "ours": []}
        for _ in range(rounds):
            for name, srv in (("bare", base), ("ours", mine)):
                before = cpu_seconds(srv.proc.pid)
                got = load(srv.port, "GET", "/health", seconds=sz.load_seconds)
                runs[name].append(got)
                cpu[name].append((cpu_seconds(srv.proc.pid) - before) / max(got.requests, 1) * 1e6)
    b, o = runs["bare"], runs["ours"]
    errors = sum(r.errors for r in b + o)
    if errors:
        raise RuntimeError(f"/health answered errors under load: bare {[r.errors for r in b]}, "
                           f"ours {[r.errors for r in o]}")
    return [Row("17", "Floor: GET /health req/s (50 conns)", "bare quart-trio /health", median([r.rps for r in b]),
                median([r.rps for r in o]), "req/s", TARGET, True, generator=o[0].generator,
                notes=f"{rounds} runs each in turns, medians; bare {[round(r.rps) for r in b]}, ours"
                      f" {[round(r.rps) for r in o]}; p50 bare {median([r.p50_ms for r in b]):.1f} ms, ours"
                      f" {median([r.p50_ms for r in o]):.1f} ms; server CPU per request bare"
                      f" {median(cpu['bare']):.0f} us, ours {median(cpu['ours']):.0f} us")]
