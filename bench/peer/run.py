"""``python -m bench.peer.run [--quick] [--only NAME,...]`` (``make bench-peer``): trio-runtime side by side
with LangGraph's API server (issue 16, part 3), same workloads, same load generators, same run.

The peer is ``langgraph dev`` (langgraph-cli[inmem] 0.4.40, langgraph-api 0.16.7; its threads and runs live
in memory) from its own venv, bench/peer/.venv, serving the one-node echo graphs of bench/peer/graph/. Ours
is ``trio-runtime serve`` with the scripted model and its durable SQLite store (``synchronous=FULL``),
started as bench/util.py ``ours()`` starts it. Every server runs in its own process and shares the cores
with the load generator (wrk when installed, else bench/util.py's Python generator); only one server is
under load at a time. Workloads:

1. turn round trip on an idle server, 50-word input, p50: ``POST /threads/{id}/runs/wait`` against ours
   ``POST /v1/threads/{id}/turns`` until ``turn.completed`` arrives on the thread's SSE stream; 1b the
   peer streaming the reply word by word (``runs/stream``, ``stream_mode=custom``), ours as in 1;
2. 20 clients, each on a thread of its own, running turns back to back for 10 s: turns/s (2a), p99 (2b);
3. ``POST /threads`` req/s, 50 connections, on a fresh server (3a) and after 15,000 threads (3b);
4. a 10-turn thread's state, 50 connections: ``GET /threads/{id}/state`` against ``GET /v1/threads/{id}``;
F. the floor under every request: LangGraph's ``/ok`` against our ``/health`` (F1), the same against a
   bare quart-trio app (bench/bare_server.py, F2), and that bare app against ``/ok`` (F3: the framework's
   share, hypercorn + Quart against uvicorn + Starlette).

Prints the table (bench/peer/report.py) and writes bench/peer-results.json (git-ignored; README's
Performance section keeps the measured table).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from bench import datagen
from bench.cases import SSEReader
from bench.peer.report import PeerRow, results_json, table
from bench.util import (
    HOST, WRK, Conn, Load, ServerProcess, bare, build_request, call, free_port, load, ours, pct,
    fmt, raise_fd_limit, selected, temp_dir,
)
from bench.util import Sizes as BaseSizes

HERE = Path(__file__).resolve().parent
GRAPH_DIR = HERE / "graph"
PEER_VENV = HERE / ".venv"
LANGGRAPH = PEER_VENV / "bin" / "langgraph"
RESULTS = HERE.parent / "peer-results.json"
# Analytics, version checks and tracing off (issue 16): the peer must not reach out, and must not spend
# time trying to.
PEER_ENV = {"LANGGRAPH_CLI_NO_ANALYTICS": "1", "LANGGRAPH_NO_VERSION_CHECK": "true", "LANGSMITH_TRACING": "false"}
PEER_VERSIONS = {"langgraph-cli[inmem]": "0.4.40", "langgraph-api": "0.16.7"}
# `langgraph dev` imports the API server and the graphs: ~3 s here, far more on a loaded machine.
PEER_START_TIMEOUT = 180.0
# Workload sizes from issue 16, part 3.
INPUT_WORDS = 50
CLIENTS = 20
CONNECTIONS = 50
THREADS_STORED = 15_000
STATE_TURNS = 10
# Turns per page when a check reads a whole thread of ours (the most `turns_limit` allows).
DETAIL_PAGE = 1000


class Sizes(BaseSizes):
    @property
    def rounds(self) -> int:
        """Load runs per side for the rows measured on a shared server (floor, state), taken in turns."""
        return self.pick(3, 1)


# ---- the peer server ---------------------------------------------------------------------------------


class PeerServer:
    """``langgraph dev`` in a process group of its own, run from a fresh copy of bench/peer/graph in a temp
    dir: the in-memory runtime saves its state to ``.langgraph_api/`` in its working dir and reloads it on
    start, so a copy per server is what makes a fresh server fresh (and keeps the repo clean)."""

    def __init__(self, jobs: int | None = None) -> None:
        self.jobs = jobs  # --n-jobs-per-worker; None: langgraph dev's default (1 run at a time)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.workdir: Path | None = None
        self.log_path: Path | None = None

    def start(self) -> "PeerServer":
        if not LANGGRAPH.exists():
            raise RuntimeError(f"{LANGGRAPH} is missing: run `make bench-peer`, which installs the peer's venv")
        self.workdir = Path(tempfile.mkdtemp(prefix="trio-bench-peer-"))
        graph = self.workdir / "graph"
        shutil.copytree(GRAPH_DIR, graph, ignore=shutil.ignore_patterns(".langgraph_api", "__pycache__"))
        self.port = free_port()
        self.log_path = self.workdir / "langgraph.log"
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(LANGGRAPH), "dev", "--no-browser", "--no-reload", "--host", HOST, "--port", str(self.port),
             *(["--n-jobs-per-worker", str(self.jobs)] if self.jobs else [])],
            cwd=graph, env={**os.environ, **PEER_ENV, "PYTHONUNBUFFERED": "1"}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + PEER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.ok():
                return self
            time.sleep(0.2)
        tail = self.log_path.read_text()[-3000:]
        self.stop()
        raise RuntimeError(f"langgraph dev did not answer /ok within {PEER_START_TIMEOUT:.0f} s:\n{tail}")

    def ok(self) -> bool:
        """GET /ok answers 200 (http.client, not urllib: no proxy from the environment may intercept)."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
        try:
            conn.request("GET", "/ok")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        """SIGTERM to the server's own process group (uvicorn and anything it started), SIGKILL after 15 s."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> "PeerServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---- the two sides of every workload -------------------------------------------------------------------


class Side:
    """What differs between the servers: their routes and how a turn is run and awaited."""

    name: str
    port: int
    create_path: str
    create_body: bytes
    floor_path: str

    async def new_thread(self) -> str:
        raise NotImplementedError

    def state_path(self, tid: str) -> str:
        raise NotImplementedError

    async def turn(self, conn: Conn, tid: str, text: str) -> None:
        """One turn on ``tid`` over ``conn``, returning when the reply is complete (and checked)."""
        raise NotImplementedError


class Peer(Side):
    name = "LangGraph"
    create_path = "/threads"
    create_body = b"{}"
    floor_path = "/ok"

    def __init__(self, port: int, *, stream: bool = False) -> None:
        self.port, self.stream = port, stream

    async def new_thread(self) -> str:
        return (await call(self.port, "POST", "/threads", {}))["thread_id"]

    def state_path(self, tid: str) -> str:
        return f"/threads/{tid}/state"

    async def turn(self, conn: Conn, tid: str, text: str) -> None:
        body = {"assistant_id": "echo_stream", "input": {"messages": [{"role": "user", "content": text}]}}
        if self.stream:
            body["stream_mode"] = ["custom"]
        path = f"/threads/{tid}/runs/{'stream' if self.stream else 'wait'}"
        status, data = await conn.request(build_request("POST", path, body=json.dumps(body).encode()))
        if status != 200:
            raise RuntimeError(f"POST {path}: HTTP {status}: {data[:300]!r}")
        expected = len(text.split()) + 2  # "You said:" + every word
        if self.stream:
            got = data.count(b"event: custom")
            if got != expected:
                raise RuntimeError(f"runs/stream sent {got} custom events, expected {expected}: {data[:300]!r}")
        elif json.loads(data)["messages"][-1]["content"] != f"You said: {text}":
            raise RuntimeError(f"runs/wait answered {data[-300:]!r}")


class Ours(Side):
    """Each thread's SSE stream is open (one reader per thread, started by ``watch``) before its turns
    start; a turn is awaited on its ``turn.completed`` frame, as a client of ours does."""

    name = "trio-runtime"
    create_path = "/v1/threads"
    create_body = b'{"title":"load"}'
    floor_path = "/health"

    def __init__(self, port: int, nursery: trio.Nursery | None = None) -> None:
        self.port, self.nursery = port, nursery
        self.completed: dict[str, trio.Semaphore] = {}

    async def new_thread(self) -> str:
        doc = await call(self.port, "POST", "/v1/threads", {"title": "peer-bench"})
        if self.nursery is not None:
            await self.watch(doc["id"])
        return doc["id"]

    async def watch(self, tid: str) -> None:
        assert self.nursery is not None
        done = self.completed[tid] = trio.Semaphore(0)
        since = (await call(self.port, "GET", f"/v1/threads/{tid}"))["latest_seq"]

        def on_frame(frame: bytes) -> bool:
            if b"\nevent: turn.completed\n" in frame:
                done.release()
            return False

        reader = SSEReader(self.port, f"/v1/threads/{tid}/events?since_seq={since}")
        self.nursery.start_soon(reader.run, on_frame)
        await reader.connected.wait()

    def state_path(self, tid: str) -> str:
        return f"/v1/threads/{tid}"

    async def turn(self, conn: Conn, tid: str, text: str) -> None:
        path = f"/v1/threads/{tid}/turns"
        status, data = await conn.request(build_request("POST", path, body=json.dumps({"prompt": text}).encode()))
        if status != 201:
            raise RuntimeError(f"POST {path}: HTTP {status}: {data[:300]!r}")
        await self.completed[tid].acquire()


async def check_ours_thread(port: int, tid: str, turns: int, text: str) -> None:
    """Every turn of ``tid`` completed with the scripted reply (our turns are awaited on SSE only). The detail
    pages its turns (the latest 20 by default, docs/API.md): every page is read, following ``next_before``."""
    statuses: list[str] = []
    pages: list[str] = []
    path = f"/v1/threads/{tid}?turns_limit={DETAIL_PAGE}"
    while True:
        doc = await call(port, "GET", path)
        statuses = [t["status"] for t in doc["turns"]] + statuses
        pages.append(json.dumps(doc))
        cursor = doc["page"]["next_before"]
        if cursor is None:
            break
        path = f"/v1/threads/{tid}?turns_limit={DETAIL_PAGE}&before={cursor}"
    if statuses != ["completed"] * turns:
        raise RuntimeError(f"thread {tid}: turn statuses {statuses}, expected {turns} completed")
    if not any(json.dumps(f"You said: {text}") in page for page in pages):
        raise RuntimeError(f"thread {tid}: no item holds the scripted reply")


async def with_ours(port: int, fn: Callable[[Ours], Awaitable[Any]]) -> Any:
    """Run ``fn`` with an ``Ours`` whose SSE readers live in a nursery that ends with ``fn``."""
    async with trio.open_nursery() as nursery:
        side = Ours(port, nursery)
        try:
            return await fn(side)
        finally:
            nursery.cancel_scope.cancel()


# ---- workloads -----------------------------------------------------------------------------------------


async def round_trips(side: Side, text: str, reps: int) -> list[float]:
    """``reps`` turns back to back on one thread and one keep-alive connection, idle server otherwise."""
    tid = await side.new_thread()
    conn = await Conn.open(side.port)
    out: list[float] = []
    try:
        await side.turn(conn, tid, text)  # warm-up: the graph's / engine's first run
        with trio.fail_after(60 + reps * 10):
            for _ in range(reps):
                t0 = time.perf_counter()
                await side.turn(conn, tid, text)
                out.append(time.perf_counter() - t0)
    finally:
        await conn.aclose()
    if isinstance(side, Ours):
        await check_ours_thread(side.port, tid, reps + 1, text)
    return out


async def concurrent_turns(side: Side, text: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` clients, each with its own thread and connection, running turns back to back until
    ``seconds`` have passed (a turn under way then is finished and counted)."""
    tids = [await side.new_thread() for _ in range(clients)]
    conns = [await Conn.open(side.port) for _ in range(clients)]
    lat: list[float] = []
    per_thread = [0] * clients
    t_start = time.perf_counter()
    deadline = t_start + seconds

    async def client(i: int) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await side.turn(conns[i], tids[i], text)
            lat.append(time.perf_counter() - t0)
            per_thread[i] += 1

    try:
        with trio.fail_after(seconds + 120):
            async with trio.open_nursery() as nursery:
                for i in range(clients):
                    nursery.start_soon(client, i)
        elapsed = time.perf_counter() - t_start
    finally:
        for c in conns:
            await c.aclose()
    if isinstance(side, Ours):
        for tid, n in zip(tids, per_thread):
            await check_ours_thread(side.port, tid, n, text)
    return {"turns": len(lat), "elapsed": elapsed, "rate": len(lat) / elapsed, "p50": pct(lat, 50) * 1000,
            "p99": pct(lat, 99) * 1000, "min_per_client": min(per_thread), "max_per_client": max(per_thread)}


async def create_threads(port: int, path: str, body: bytes, count: int, connections: int = CONNECTIONS) -> None:
    """``count`` creates over ``connections`` keep-alive connections (to fill a server before 3b)."""
    raw = build_request("POST", path, body=body)
    left = count

    async def worker() -> None:
        nonlocal left
        conn = await Conn.open(port)
        try:
            while left > 0:
                left -= 1
                status, data = await conn.request(raw)
                if status not in (200, 201):
                    raise RuntimeError(f"POST {path}: HTTP {status}: {data[:300]!r}")
        finally:
            await conn.aclose()

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for _ in range(min(connections, count)):
                nursery.start_soon(worker)


async def ten_turn_thread(side: Side, text: str) -> str:
    tid = await side.new_thread()
    conn = await Conn.open(side.port)
    try:
        with trio.fail_after(300):
            for _ in range(STATE_TURNS):
                await side.turn(conn, tid, text)
    finally:
        await conn.aclose()
    if isinstance(side, Ours):
        await check_ours_thread(side.port, tid, STATE_TURNS, text)
    return tid


def body_size(port: int, path: str) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": "Bearer bench-token"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status}: {data[:300]!r}")
        return len(data)
    finally:
        conn.close()


# ---- benchmarks (each returns rows) ----------------------------------------------------------------------


def rounds_of(sz: Sizes, runs: dict[str, Callable[[], Load]]) -> dict[str, tuple[Load, list[float]]]:
    """Each load of ``runs`` in turns, ``sz.rounds`` times (the machine's noise hits every side alike):
    per side, the run with the median req/s and every round's req/s."""
    got: dict[str, list[Load]] = {name: [] for name in runs}
    for _ in range(sz.rounds):
        for name, fn in runs.items():
            got[name].append(fn())
    out = {}
    for name, loads in got.items():
        ordered = sorted(loads, key=lambda x: x.rps)
        out[name] = (ordered[len(ordered) // 2], [x.rps for x in loads])
    return out


def spread(values: list[float]) -> str:
    return "/".join(f"{v:,.0f}" for v in values)


def bench_floor(sz: Sizes, peer: PeerServer, mine: ServerProcess, bare_srv: ServerProcess) -> list[PeerRow]:
    r = rounds_of(sz, {"peer": lambda: load(peer.port, "GET", "/ok", seconds=sz.load_seconds),
                       "ours": lambda: load(mine.port, "GET", "/health", seconds=sz.load_seconds),
                       "bare": lambda: load(bare_srv.port, "GET", "/health", seconds=sz.load_seconds)})
    (lp, sp), (lo, so), (lb, sb) = r["peer"], r["ours"], r["bare"]
    gen = lo.generator
    med = f"median of {sz.rounds} runs in turns"
    errors = f"errors peer {lp.errors}, ours {lo.errors}, bare {lb.errors}"
    return [
        PeerRow("F1", "Floor: LangGraph /ok vs our /health", "req/s", lp.rps, lo.rps, True, generator=gen,
                notes=f"{med} (peer {spread(sp)}, ours {spread(so)}); p50 {lp.p50_ms:.1f} vs {lo.p50_ms:.1f} ms; {errors}"),
        PeerRow("F2", "Floor: bare quart-trio /health vs our /health", "req/s", lb.rps, lo.rps, True,
                peer_label="bare quart-trio", generator=gen,
                notes=f"bench/bare_server.py ({spread(sb)}); issue 16 asks >= 0.9x"),
        PeerRow("F3", "Floor: LangGraph /ok vs bare quart-trio /health", "req/s", lp.rps, lb.rps, True,
                ours_label="bare quart-trio", generator=gen,
                notes="the frameworks alone: uvicorn + Starlette against hypercorn + Quart-Trio"),
    ]


def bench_round_trip(sz: Sizes, peer: PeerServer, mine: ServerProcess) -> list[PeerRow]:
    text = datagen.text(INPUT_WORDS)
    reps = sz.pick(30, 6)
    peer_wait = trio.run(round_trips, Peer(peer.port), text, reps)
    peer_stream = trio.run(round_trips, Peer(peer.port, stream=True), text, reps)
    ours_rt = trio.run(with_ours, mine.port, lambda side: round_trips(side, text, reps))
    p50 = lambda xs: pct(xs, 50) * 1000  # noqa: E731
    gen = "python, 1 conn (+ SSE for ours)"
    return [
        PeerRow("1", "Turn round trip, idle, 50-word input: runs/wait vs POST turn -> turn.completed (p50)", "ms",
                p50(peer_wait), p50(ours_rt), False, generator=gen,
                notes=f"p50 of {reps}; p99 {pct(peer_wait, 99) * 1000:.1f} vs {pct(ours_rt, 99) * 1000:.1f} ms"),
        PeerRow("1b", "Same, peer streaming every word: runs/stream (stream_mode=custom) (p50)", "ms",
                p50(peer_stream), p50(ours_rt), False, generator=gen,
                notes=f"p50 of {reps}; ours as in row 1 (our turn always streams its deltas on SSE)"),
    ]


def bench_concurrent(sz: Sizes, peer: PeerServer, mine: ServerProcess) -> list[PeerRow]:
    text = datagen.text(INPUT_WORDS)
    seconds = sz.pick(10.0, 3.0)
    rp = trio.run(concurrent_turns, Peer(peer.port), text, CLIENTS, seconds)
    ro = trio.run(with_ours, mine.port, lambda side: concurrent_turns(side, text, CLIENTS, seconds))
    gen = f"python, {CLIENTS} conns (+ {CLIENTS} SSE for ours)"
    per_client = (f"turns per client {rp['min_per_client']}-{rp['max_per_client']} vs "
                  f"{ro['min_per_client']}-{ro['max_per_client']}")
    return [
        PeerRow("2a", f"{CLIENTS} clients x {CLIENTS} threads, turns back to back {seconds:g} s: rate", "turns/s",
                rp["rate"], ro["rate"], True, generator=gen,
                notes=f"{rp['turns']} vs {ro['turns']} turns in {rp['elapsed']:.1f} / {ro['elapsed']:.1f} s; {per_client}"),
        PeerRow("2b", "Same: turn latency p99", "ms", rp["p99"], ro["p99"], False, generator=gen,
                notes=f"p50 {rp['p50']:.0f} vs {ro['p50']:.0f} ms"),
    ]


def bench_state(sz: Sizes, peer: PeerServer, mine: ServerProcess) -> list[PeerRow]:
    text = datagen.text(INPUT_WORDS)
    ptid = trio.run(ten_turn_thread, Peer(peer.port), text)
    otid = trio.run(with_ours, mine.port, lambda side: ten_turn_thread(side, text))
    ppath, opath = Peer(peer.port).state_path(ptid), Ours(mine.port).state_path(otid)
    sizes = body_size(peer.port, ppath), body_size(mine.port, opath)
    r = rounds_of(sz, {"peer": lambda: load(peer.port, "GET", ppath, seconds=sz.load_seconds),
                       "ours": lambda: load(mine.port, "GET", opath, seconds=sz.load_seconds)})
    (lp, sp), (lo, so) = r["peer"], r["ours"]
    return [PeerRow("4", "10-turn thread state, 50 conns: GET /threads/{id}/state vs GET /v1/threads/{id}", "req/s",
                    lp.rps, lo.rps, True, generator=lo.generator,
                    notes=f"median of {sz.rounds} runs in turns (peer {spread(sp)}, ours {spread(so)}); p50 "
                          f"{lp.p50_ms:.1f} vs {lo.p50_ms:.1f} ms; body {sizes[0]:,} vs {sizes[1]:,} bytes; "
                          f"errors {lp.errors}/{lo.errors}")]


def bench_create(sz: Sizes, peer_jobs: int | None = None) -> list[PeerRow]:
    """Each server fresh, alone: req/s of creates, then filled to ``stored`` threads, then again."""
    stored = sz.pick(THREADS_STORED, 2_000)
    figures: dict[str, tuple[Any, Any, float]] = {}
    for name in ("peer", "ours"):
        with ExitStack() as stack:
            if name == "peer":
                srv: Any = stack.enter_context(PeerServer(peer_jobs))
                side: Side = Peer(srv.port)
            else:
                srv = stack.enter_context(ours(stack.enter_context(temp_dir("peer-create"))))
                side = Ours(srv.port)
            fresh = load(srv.port, "POST", side.create_path, bodies=[side.create_body], seconds=sz.load_seconds)
            t0 = time.perf_counter()
            trio.run(create_threads, srv.port, side.create_path, side.create_body,
                     max(0, stored - (fresh.requests - fresh.errors)))
            fill = time.perf_counter() - t0
            full = load(srv.port, "POST", side.create_path, bodies=[side.create_body], seconds=sz.load_seconds)
            figures[name] = (fresh, full, fill)
    (pf, pb, pfill), (of, ob, ofill) = figures["peer"], figures["ours"]
    return [
        PeerRow("3a", "POST /threads, 50 conns, fresh server", "req/s", pf.rps, of.rps, True, generator=of.generator,
                notes=f"p50 {pf.p50_ms:.1f} vs {of.p50_ms:.1f} ms; errors {pf.errors}/{of.errors}"),
        PeerRow("3b", f"POST /threads, 50 conns, after {stored:,} threads", "req/s", pb.rps, ob.rps, True,
                generator=ob.generator,
                notes=f"p50 {pb.p50_ms:.1f} vs {ob.p50_ms:.1f} ms; errors {pb.errors}/{ob.errors}; "
                      f"fill {pfill:.0f} / {ofill:.0f} s on 50 conns"),
    ]


# In this order on one fresh peer and one fresh ours. The state read goes before the turn workloads: the
# peer's reads slow down as runs pile up in its in-memory store (41 req/s after them against 268 before,
# in quick runs here), and row 4 is about a 10-turn thread, not about what else the server has seen.
SHARED = ("floor", "state", "round_trip", "concurrent")
BENCHMARKS = (*SHARED, "create")  # create starts fresh servers of its own


def run(names: list[str], sz: Sizes, peer_jobs: int | None = None) -> tuple[list[PeerRow], dict[str, str]]:
    rows: list[PeerRow] = []
    failed: dict[str, str] = {}

    def attempt(name: str, fn: Callable[[], list[PeerRow]]) -> None:
        t0 = time.perf_counter()
        print(f"-- {name} ...", end=" ", flush=True)
        try:
            got = fn()
        except Exception:
            failed[name] = traceback.format_exc()
            print("FAILED", flush=True)
            print(failed[name], file=sys.stderr)
            return
        rows.extend(got)
        print(f"{time.perf_counter() - t0:.1f} s: " + "; ".join(
            f"{r.id} peer {fmt(r.peer)} ours {fmt(r.ours)} {r.unit} = {r.ratio:.2f}x ({r.ahead})" for r in got),
            flush=True)

    shared = [n for n in SHARED if n in names]
    if shared:
        with PeerServer(peer_jobs) as peer, temp_dir("peer-ours") as d, ours(d) as mine, bare() as bare_srv:
            for name in shared:
                if name == "floor":
                    attempt(name, lambda: bench_floor(sz, peer, mine, bare_srv))
                else:
                    fn = {"round_trip": bench_round_trip, "concurrent": bench_concurrent, "state": bench_state}[name]
                    attempt(name, lambda fn=fn: fn(sz, peer, mine))
    if "create" in names:
        attempt("create", lambda: bench_create(sz, peer_jobs))
    order = {"1": 0, "1b": 1, "2a": 2, "2b": 3, "3a": 4, "3b": 5, "4": 6, "F1": 7, "F2": 8, "F3": 9}
    rows.sort(key=lambda r: order.get(r.id, 99))
    return rows, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs and fewer threads (development only)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--peer-jobs", type=int, default=None,
                        help="langgraph dev --n-jobs-per-worker (default: its own, 1 run at a time; 20 measured"
                             " slower on workload 2 here, as every batch of runs waits for the queue's next poll)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args(argv)
    names = selected(parser, args.only, BENCHMARKS)
    raise_fd_limit()
    sz = Sizes(quick=args.quick)
    load_before = os.getloadavg()
    print(f"trio-runtime vs LangGraph ({'quick' if args.quick else 'full'}); load generator: "
          f"{'wrk (' + WRK + ')' if WRK else 'python (wrk not installed)'}; {os.cpu_count()} cores; "
          f"load average {load_before[0]:.2f}; peer: langgraph dev (in memory), ours: serve (durable SQLite)",
          flush=True)
    started = time.perf_counter()
    rows, failed = run(names, sz, args.peer_jobs)
    print()
    print(table(rows))
    for r in rows:
        if r.notes:
            print(f"  [{r.id}] {r.notes}")
    mine = [r for r in rows if r.ours_label == "trio-runtime"]  # F3 compares two baselines
    behind = [r.id for r in mine if r.ahead != "ours"]
    print(f"\nours ahead on {len(mine) - len(behind)} of {len(mine)} rows"
          + (f"; not ahead on {', '.join(behind)}" if behind else "")
          + (f"; {len(failed)} FAILED ({', '.join(failed)})" if failed else "")
          + f"; {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f}")
    meta = {"quick": args.quick, "generator": "wrk" if WRK else "python", "cores": os.cpu_count(),
            "python": platform.python_version(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "peer": {"server": "langgraph dev --no-browser --no-reload (in-memory runtime)", **PEER_VERSIONS,
                     "n_jobs_per_worker": args.peer_jobs or "default (1)"},
            "ours": {"server": "trio-runtime serve, scripted model, SQLite synchronous=FULL"}}
    args.output.write_text(results_json(rows, meta, failed))
    print(f"results written to {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
