"""Shared bench helpers: statistics, RSS, a tiny HTTP/1.1 client on raw trio sockets, the load
generators (wrk when installed, a Python fallback otherwise) and server subprocesses.

Everything here talks to 127.0.0.1 only, and every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import trio

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HOST = "127.0.0.1"
TOKEN = "bench-token"
# BENCH_NO_WRK=1 forces the Python load generator even when wrk is installed.
WRK = None if os.environ.get("BENCH_NO_WRK") else shutil.which("wrk")


# ---- statistics --------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size right now (not the peak), from /proc."""
    with open(f"/proc/{pid or 'self'}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"trio-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---- a minimal HTTP/1.1 keep-alive client ---------------------------------------------------------


def build_request(method: str, path: str, *, body: bytes | None = None, token: str | None = TOKEN,
                  headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class Conn:
    """One keep-alive connection; ``request`` sends raw bytes and returns (status, body)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def open(cls, port: int) -> "Conn":
        stream = await trio.open_tcp_stream(HOST, port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(stream)

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(262144)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    async def _send(self, raw: bytes) -> tuple[int, str]:
        """Send one request and read its response head: (status, head text); the body stays buffered."""
        await self.stream.send_all(raw)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            await self._fill()
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[:end + 4]
        return int(head.split(" ", 2)[1]), head

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        status, head = await self._send(raw)
        m = re.search(r"(?im)^content-length:\s*(\d+)", head)
        if m:
            n = int(m.group(1))
            while len(self.buf) < n:
                await self._fill()
            body = bytes(self.buf[:n])
            del self.buf[:n]
            return status, body
        if re.search(r"(?im)^transfer-encoding:\s*chunked", head):
            out = bytearray()
            while True:
                while (e := self.buf.find(b"\r\n")) < 0:
                    await self._fill()
                size = int(bytes(self.buf[:e]).split(b";")[0], 16)
                del self.buf[:e + 2]
                while len(self.buf) < size + 2:
                    await self._fill()
                out += self.buf[:size]
                del self.buf[:size + 2]
                if size == 0:
                    return status, bytes(out)
        return status, b""


    async def request_discarding(self, raw: bytes) -> tuple[int, int]:
        """``request`` that reads a Content-Length body without keeping it: returns (status, body size).
        For load generators that move megabytes per request and must not eat the CPU they measure."""
        status, head = await self._send(raw)
        m = re.search(r"(?im)^content-length:\s*(\d+)", head)
        if not m:
            raise RuntimeError(f"no Content-Length in {head!r}")
        size = int(m.group(1))
        left = size - len(self.buf)
        self.buf.clear()
        while left > 0:
            chunk = await self.stream.receive_some(min(left, 1 << 20))
            if not chunk:
                raise ConnectionError("server closed the connection")
            left -= len(chunk)
        return status, size


async def call(port: int, method: str, path: str, payload: Any = None, *, token: str | None = TOKEN,
               expect: int | tuple[int, ...] = (200, 201, 204)) -> Any:
    """One request on a fresh connection; JSON in, JSON out."""
    conn = await Conn.open(port)
    try:
        body = json.dumps(payload).encode() if payload is not None else None
        status, data = await conn.request(build_request(method, path, body=body, token=token))
    finally:
        await conn.aclose()
    expected = (expect,) if isinstance(expect, int) else expect
    if status not in expected:
        raise RuntimeError(f"{method} {path}: HTTP {status}: {data[:300]!r}")
    return json.loads(data) if data else None


async def latencies(port: int, raw: bytes, count: int, seconds: float, expect: int = 200) -> list[float]:
    """Sequential requests on one keep-alive connection: per-request latency in seconds."""
    out: list[float] = []
    conn = await Conn.open(port)
    try:
        await conn.request(raw)  # warm-up
        deadline = time.perf_counter() + seconds
        while len(out) < count and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            status, _ = await conn.request(raw)
            out.append(time.perf_counter() - t0)
            if status != expect:
                raise RuntimeError(f"unexpected HTTP {status}")
    finally:
        await conn.aclose()
    return out


# ---- load generators ----------------------------------------------------------------------------


@dataclass
class Load:
    rps: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    generator: str
    extra: dict[str, Any] = field(default_factory=dict)


def generator_name(connections: int) -> str:
    return f"wrk -t2 -c{connections}" if WRK else f"python (trio, {connections} conns)"


# The value a Python-generated request carries where ``unique_header`` asks for a per-request value.
UNIQUE_PLACEHOLDER = "UNIQUE-VALUE-PLACEHOLDER"


def _wrk_lua(method: str, bodies: list[bytes] | None, paths: list[str] | None,
             unique_header: str | None = None, unique_prefix: str = "") -> str:
    def lua_str(b: bytes | str) -> str:
        s = b.decode() if isinstance(b, bytes) else b
        return "[==[" + s + "]==]"

    lines = [f'wrk.method = "{method}"', f'wrk.headers["Authorization"] = "Bearer {TOKEN}"',
             'wrk.headers["Content-Type"] = "application/json"']
    items = []
    n = max(len(bodies or []), len(paths or []), 1)
    for i in range(n):
        p = (paths or ["/"])[i % len(paths)] if paths else None
        b = (bodies or [b""])[i % len(bodies)] if bodies else None
        items.append("{" + (lua_str(p) if p else "nil") + "," + (lua_str(b) if b is not None else "nil") + "}")
    lines.append("local reqs = {" + ",".join(items) + "}")
    lines.append("local i = 0")
    if unique_header is None:
        lines.append("request = function()\n  i = i + 1\n  local r = reqs[(i % #reqs) + 1]\n"
                     "  return wrk.format(nil, r[1], nil, r[2])\nend")
    else:
        # A value no other request of the run has: this run's prefix, wrk's thread number (set in the main
        # Lua state by setup; each thread has a state of its own) and the thread's request count.
        # wrk.format replaces wrk.headers by the table it is given, so the table repeats them.
        lines.append("local threads = 0\nfunction setup(thread)\n  threads = threads + 1\n"
                     "  thread:set(\"thread_no\", threads)\nend")
        lines.append("request = function()\n  i = i + 1\n  local r = reqs[(i % #reqs) + 1]\n"
                     "  local h = {}\n  for k, v in pairs(wrk.headers) do h[k] = v end\n"
                     f"  h[ {lua_str(unique_header)} ] = {lua_str(unique_prefix)} .. thread_no .. \"-\" .. i\n"
                     "  return wrk.format(nil, r[1], h, r[2])\nend")
    lines.append("done = function(summary, latency, requests)\n"
                 "  io.write(string.format('BENCH %d %d %d %f %f\\n', summary.requests,"
                 " summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write"
                 " + summary.errors.timeout, summary.duration, latency:percentile(50), latency:percentile(99)))\n"
                 "end")
    return "\n".join(lines)


def run_wrk(port: int, method: str, path: str, *, bodies: list[bytes] | None = None,
            paths: list[str] | None = None, connections: int = 50, seconds: float = 5.0,
            unique_header: str | None = None) -> Load:
    assert WRK is not None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_wrk_lua(method, bodies, paths or [path], unique_header, f"{os.getpid()}-{time.time_ns()}-"))
        script = f.name
    try:
        cmd = [WRK, "-t2", f"-c{connections}", f"-d{max(1, int(round(seconds)))}s", "--timeout", "10s",
               "-s", script, f"http://{HOST}:{port}{path}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    finally:
        os.unlink(script)
    m = re.search(r"^BENCH (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+)", out, re.M)
    if not m:
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    requests, errors, duration_us = int(m.group(1)), int(m.group(2)), int(m.group(3))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    return Load(requests / (duration_us / 1e6), requests, errors, float(m.group(4)) / 1000,
                float(m.group(5)) / 1000, generator_name(connections))


async def _py_load(port: int, method: str, raws: list[bytes], connections: int, seconds: float,
                   max_requests: int, unique: bool = False) -> Load:
    lat: list[float] = []
    errors = 0
    counter = 0
    prefix = f"{os.getpid()}-{time.time_ns()}-"  # unique across runs too (a data dir may be reused)
    t_start = time.perf_counter()
    deadline = t_start + seconds

    async def worker(idx: int) -> None:
        nonlocal errors, counter
        conn = await Conn.open(port)
        try:
            i = idx
            while time.perf_counter() < deadline and counter < max_requests:
                counter += 1
                raw = raws[i % len(raws)]
                if unique:  # the placeholder becomes a value no other request of the run has
                    raw = raw.replace(UNIQUE_PLACEHOLDER.encode(), f"{prefix}{i}".encode())
                i += connections
                t0 = time.perf_counter()
                status, _ = await conn.request(raw)
                lat.append(time.perf_counter() - t0)
                if status >= 400:
                    errors += 1
        finally:
            await conn.aclose()

    with trio.fail_after(seconds + 60):
        async with trio.open_nursery() as nursery:
            for idx in range(connections):
                nursery.start_soon(worker, idx)
    elapsed = time.perf_counter() - t_start
    return Load(len(lat) / elapsed, len(lat), errors, pct(lat, 50) * 1000, pct(lat, 99) * 1000,
                generator_name(connections))


def load(port: int, method: str, path: str, *, bodies: list[bytes] | None = None, paths: list[str] | None = None,
         connections: int = 50, seconds: float = 5.0, force_python: bool = False,
         unique_header: str | None = None) -> Load:
    """Closed-loop load: ``connections`` keep-alive connections for ``seconds``. Runs wrk when
    installed, else a Python generator on trio (this process; the server is another process).
    ``unique_header``: every request carries this header with a value of its own (an Idempotency-Key)."""
    if WRK and not force_python:
        return run_wrk(port, method, path, bodies=bodies, paths=paths, connections=connections, seconds=seconds,
                       unique_header=unique_header)
    ps = paths or [path]
    n = max(len(bodies or []), len(ps))
    extra = {unique_header: UNIQUE_PLACEHOLDER} if unique_header else None
    raws = [build_request(method, ps[i % len(ps)], body=(bodies[i % len(bodies)] if bodies else None),
                          headers=extra) for i in range(n)]
    return trio.run(_py_load, port, method, raws, connections, seconds, 10_000_000, unique_header is not None)


# ---- server subprocesses ------------------------------------------------------------------------


class ServerProcess:
    """A server in its own process (``trio-runtime serve`` or the bare baseline server)."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.errors = 0
        self.log_path = Path(tempfile.gettempdir()) / f"trio-bench-server-{os.getpid()}.log"

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        seen = []
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(r"listening on http://[^:]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                # keep draining output so the server never blocks on a full pipe
                import threading

                threading.Thread(target=self._drain, daemon=True).start()
                return self
        self.stop()
        raise RuntimeError("server did not start:\n" + "".join(seen[-40:]))

    def _drain(self) -> None:
        """Keep the server's output (in a log file; errors are counted) so it never blocks on a pipe."""
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "a") as log:
            for line in self.proc.stdout:
                log.write(line)
                if " ERROR " in line:
                    self.errors += 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class HealthProbe:
    """``with HealthProbe(port) as probe:`` runs bench/probe.py (its own process) for the block; then
    ``probe.latencies`` holds every /health latency in seconds, from each request's scheduled time."""

    def __init__(self, port: int, interval_ms: float = 5.0) -> None:
        self.argv = [PYTHON, "-m", "bench.probe", str(port), str(interval_ms)]
        self.latencies: list[float] = []
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "HealthProbe":
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise RuntimeError(f"health probe did not start: {line!r}")
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            out, _ = self.proc.communicate(timeout=60)  # closes stdin: the probe stops and reports
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise
        if self.proc.returncode != 0:
            raise RuntimeError(f"health probe failed with exit code {self.proc.returncode}")
        self.latencies = json.loads(out.strip().splitlines()[-1])["latencies"]


def ours_argv(data_dir: Path, port: int = 0, *extra: str) -> list[str]:
    return [PYTHON, "-m", "web.cli", "serve", "--host", HOST, "--port", str(port), "--data-dir", str(data_dir),
            "--auth-token", TOKEN, "--log-level", "warning", "--graceful-timeout", "1", *extra]


def ours(data_dir: Path, *extra: str) -> ServerProcess:
    return ServerProcess(ours_argv(data_dir, 0, *extra))


def bare(*extra: str) -> ServerProcess:
    return ServerProcess([PYTHON, "-m", "bench.bare_server", "--port", "0", *extra])


@dataclass
class Sizes:
    """Full or ``--quick`` sizes of one run (bench.run and bench.peer.run)."""

    quick: bool

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    @property
    def load_seconds(self) -> float:
        return self.pick(5.0, 2.0)


def fmt(value: float) -> str:
    """A figure for the printed tables: thousands separated, three significant digits below 100."""
    if value != value:  # nan
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def selected(parser: argparse.ArgumentParser, only: str, known: dict) -> list[str]:
    """The benchmark names of ``--only`` (every one when empty); an unknown name is a usage error."""
    names = [n.strip() for n in only.split(",") if n.strip()] or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(known)}")
    return names
