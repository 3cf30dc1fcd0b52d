"""Hostile input against a real ``trio-runtime serve`` process: every bad request gets a clear 4xx,
nothing is written outside the data dir, and the server keeps answering everyone else at its normal
latency.

Already covered elsewhere (not repeated): bad JSON, wrong field types, unknown fields and 100,000-deep
arrays (tests/e2e/test_http_errors.py); invalid and traversal session ids on every session route,
in the path and in the PUT body (tests/sessions/test_http.py); an oversize body with a small
``--max-body``. This file adds: traversal and over-long ids on the thread routes, ids and URLs far past
any limit, NUL bytes and lone surrogates, deeply nested objects, a 100 MB body at the default limit
(declared and chunked), slowloris clients (headers and bodies trickled), an idle keep-alive connection,
huge ``limit``/``since_seq``/``Last-Event-ID``/``If-Match`` values, and unicode titles and searches.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import E2E_LIMIT
from tests.e2e.helpers import wait_turn_end
from web.client import AsyncClient

from .support import SEED, serving, session_files, tree, unexpected_data_files

TOKEN = "proc-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
KEEP_ALIVE_TIMEOUT = 5.0  # hypercorn's default keep_alive_timeout; the server does not change it
REQUEST_TIMEOUT = 2.0  # --request-timeout for these servers: also Quart's body timeout
MARGIN = 3.0  # slack on a busy 2-core machine


@pytest.fixture
async def proc(tmp_path):
    """The server runs in an empty working directory with its data dir inside it, so anything it wrote
    outside the data dir would show up in ``tmp_path``."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    async with serving(cwd / "data", "--request-timeout", str(REQUEST_TIMEOUT), "--sse-keepalive", "0.2",
                       cwd=cwd) as server:
        yield server


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _clear_4xx(response: httpx.Response, *, json_body: bool = True) -> str | None:
    """None if ``response`` is a clear client error, else what is wrong with it."""
    if not 400 <= response.status_code < 500:
        return f"status {response.status_code}: {response.text[:200]}"
    if not json_body:
        return None
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"status {response.status_code} without a JSON error: {response.text[:200]}"
    if error.get("status") != response.status_code or not error.get("code") or not error.get("message"):
        return f"incomplete error {error}"
    return None


def _no_server_errors(server) -> None:
    """A 500 or a stream that died mid-response is logged by the server: there must be none."""
    output = "".join(server.output)
    for marker in ("unhandled error", "Error in ASGI Framework", "Traceback"):
        assert marker not in output, f"server logged {marker!r}:\n{output[-5000:]}"


async def _read_sse_until_keepalive(http: httpx.AsyncClient, path: str, **kwargs: Any) -> list[str]:
    """Open an SSE stream; return its lines up to the first keepalive comment (proves it is alive)."""
    lines = []
    with trio.fail_after(E2E_LIMIT):
        async with http.stream("GET", path, **kwargs) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                lines.append(line)
                if line.startswith(": keepalive"):
                    return lines
    raise AssertionError(f"stream ended without a keepalive: {lines}")


async def test_hostile_ids_bodies_and_queries_get_clear_4xx_and_write_nothing_outside_the_data_dir(
        proc, tmp_path):
    data_dir = proc.data_dir
    before = tree(tmp_path, skip=data_dir)
    wrong: list[tuple[str, str]] = []

    def expect_4xx(what: str, response: httpx.Response, *, json_body: bool = True) -> None:
        problem = _clear_4xx(response, json_body=json_body)
        if problem:
            wrong.append((what, problem))

    async with httpx.AsyncClient(base_url=proc.url, headers=HEADERS, timeout=E2E_LIMIT) as http:
        thread = (await http.post("/v1/threads", json={"title": "target"})).json()
        tid = thread["id"]

        # Traversal, NUL, unicode and over-long thread ids on every thread route: 404, nothing else.
        for raw in ("..%2F..%2Fetc%2Fpasswd", "%2E%2E", "..%5C..%5Cwindows", "a%00b", "%C3%BC", "%FF%FE",
                    "x" * 10_000, "thr_" + "0" * 4096, f"{tid}%2F..%2F{tid}"):
            for method, suffix, body in (("GET", "", None), ("PATCH", "", {"title": "x"}),
                                         ("POST", "/turns", {"prompt": "hi"}), ("POST", "/compact", {}),
                                         ("GET", "/events", None),
                                         ("POST", "/turns/turn_x/interrupt", {}),
                                         ("POST", "/turns/..%2F..%2Fx/steer", {"prompt": "hi"})):
                expect_4xx(f"{method} thread {raw[:20]}{suffix}",
                           await http.request(method, f"/v1/threads/{raw}{suffix}", json=body))
        # A URL or header past hypercorn's limit on a request head (16 KiB): refused before the app (431).
        expect_4xx("20 KB URL", await http.get("/v1/threads/" + "y" * 20_000), json_body=False)
        expect_4xx("64 KiB header", await http.get("/health", headers={"X-Big": "z" * 65536}), json_body=False)
        # Over-long ids in bodies: refused, and the error does not echo a megabyte back.
        response = await http.put("/v1/sessions", json={"thread_id": tid, "session_id": "s" * 1_000_000})
        expect_4xx("1 MB session id", response)
        assert len(response.content) < 1000, "the error echoed the whole id"
        expect_4xx("1 MB thread id", await http.put("/v1/sessions", json={"thread_id": "t" * 1_000_000}))
        expect_4xx("20 KB turn id", await http.post(f"/v1/threads/{tid}/turns/{'u' * 20_000}/steer",
                                                    json={"prompt": "x"}), json_body=False)

        # The resume URL takes POST only: other methods are 405, not "invalid session id" (they used to
        # reach the GET/PATCH/DELETE routes with "x/resume-thread" as the id).
        for method in ("GET", "PATCH", "DELETE", "PUT"):
            response = await http.request(method, "/v1/sessions/x/resume-thread", json={"title": "t"})
            expect_4xx(f"{method} resume-thread", response)
            assert response.status_code == 405 and response.headers["Allow"] == "POST", (method, response.text)

        # NUL bytes are data, stored and returned intact; in an enum or number they are a 400.
        nul = (await http.post("/v1/threads", json={"title": "a\x00b", "system_prompt": "\x00"})).json()
        assert (await http.get(f"/v1/threads/{nul['id']}")).json()["thread"]["title"] == "a\x00b"
        for query in ({"sort": "\x00"}, {"limit": "\x00"}, {"include_archived": "\x00"}):
            expect_4xx(f"NUL in {query}", await http.get("/v1/sessions", params=query))
        assert (await http.get("/v1/sessions", params={"search": "\x00"})).status_code == 200

        # Lone surrogates (legal JSON escapes, not storable text): 400 and nothing stored. They used to
        # reach SQLite: a 500, and a turn start left its thread unsaveable for good.
        threads_before = len((await http.get("/v1/threads", params={"limit": 500})).json())
        for path, body in (("/v1/threads", b'{"title": "\\ud800"}'),
                           (f"/v1/threads/{tid}/turns", b'{"prompt": "hi \\udfff there"}'),
                           ("/v1/sessions", b'{"thread_id": "' + tid.encode() + b'", "title": "\\ud83d"}')):
            response = await http.post(path, content=body, headers={"Content-Type": "application/json"})
            expect_4xx(f"lone surrogate to {path}", response)
            assert response.status_code == 400 and "surrogate" in response.text, response.text
        assert len((await http.get("/v1/threads", params={"limit": 500})).json()) == threads_before
        assert (await http.get(f"/v1/threads/{tid}")).json()["turns"] == []
        assert (await http.put("/v1/sessions", json={"thread_id": tid})).status_code == 200

        # Deep nesting: objects a million deep, and arrays deep inside a known field.
        for what, body in (("1e6-deep objects", b'{"a":' * 1_000_000 + b"1" + b"}" * 1_000_000),
                           ("50k-deep array in a field", b'{"title": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")):
            expect_4xx(what, await http.post("/v1/threads", content=body,
                                             headers={"Content-Type": "application/json"}))

        # Huge numbers: limit is clamped; since_seq/Last-Event-ID beyond SQLite's integers used to kill
        # the stream after its 200 (OverflowError); If-Match with a digit int() refuses used to be a 500.
        huge = 10**30
        listed = await http.get("/v1/threads", params={"limit": huge, "include_archived": "true"})
        assert listed.status_code == 200 and 1 <= len(listed.json()) <= 500
        assert len((await http.get("/v1/threads", params={"limit": -huge})).json()) == 1
        expect_4xx("limit 1e3", await http.get("/v1/threads", params={"limit": "1e3"}))
        assert await _read_sse_until_keepalive(http, f"/v1/threads/{tid}/events", params={"since_seq": huge}) == [
            ": keepalive"]
        assert await _read_sse_until_keepalive(http, f"/v1/threads/{tid}/events",
                                               headers={"Last-Event-ID": str(huge)}) == [": keepalive"]
        expect_4xx("since_seq -1", await http.get(f"/v1/threads/{tid}/events", params={"since_seq": -1}))
        expect_4xx("Last-Event-ID x", await http.get(f"/v1/threads/{tid}/events", headers={"Last-Event-ID": "x"}))
        for value in (b"\xb2", b"1\xb2", b"W/\xb9", b'"\xbd"', str(huge).encode()):
            response = await http.put("/v1/sessions", json={"thread_id": tid, "session_id": "im"},
                                      headers={"If-Match": value})
            expect_4xx(f"If-Match {value!r}", response)

        # Unicode titles and searches: stored whole (cut to 50 characters), found case-insensitively,
        # and wildcards in a search are literal.
        title = "Ünïcødé 🧪 テスト İstanbul straße שלום e\u0301"
        async with AsyncClient(proc.url, TOKEN) as client:
            turn = await client.start_turn(tid, "grüße aus ÅRHUS 你好")
            assert (await wait_turn_end(client, tid, turn["id"]))["payload"]["status"] == "completed"
        saved = (await http.post("/v1/sessions", json={"thread_id": tid, "title": title})).json()
        long_title = "🧪" * 80
        other = (await http.post("/v1/sessions", json={"thread_id": tid, "title": long_title})).json()
        assert other["title"] == "🧪" * 50
        one, both = {saved["session_id"]}, {saved["session_id"], other["session_id"]}
        for search, expected in (("ünïcødé", one), ("ÜNÏCØDÉ", one), ("テスト", one), ("İSTANBUL", one),
                                 ("🧪", both), ("grüße", both), ("你好", both), ("GRÜSSE", set()),
                                 ("%", set()), ("_", set()), ("x" * 10_000, set())):
            response = await http.get("/v1/sessions", params={"search": search, "limit": 500})
            assert response.status_code == 200, (search, response.text)
            assert {s["id"] for s in response.json()["sessions"]} == expected, search
        got = (await http.get(f"/v1/sessions/{saved['session_id']}")).json()
        assert got["metadata"]["title"] == title

        assert (await http.get("/health")).status_code == 200

    assert wrong == [], "\n".join(f"{what}: {problem}" for what, problem in wrong)
    _no_server_errors(proc)
    docs, temps, broken = session_files(data_dir)
    assert temps == [] and broken == [] and len(docs) >= 3
    assert unexpected_data_files(data_dir) == []
    assert tree(tmp_path, skip=data_dir) == before, "something was written outside the data dir"


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


async def _send_big_body(url: str, head: bytes, chunk: bytes, total: int) -> tuple[bytes, int]:
    """Send ``head`` then up to ``total`` bytes of ``chunk``s while reading the answer; stop sending as
    soon as the server answered. Returns (the whole answer, up to the server's close; bytes of body sent)."""
    stream = await trio.open_tcp_stream(*_host_port(url))
    answer = bytearray()
    sent = 0
    answered = trio.Event()

    async def send() -> None:
        nonlocal sent
        try:
            await stream.send_all(head)
            while sent < total and not answered.is_set():
                await stream.send_all(chunk)
                sent += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    with trio.fail_after(E2E_LIMIT * 2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            try:
                while data := await stream.receive_some(65536):  # until the server closes (it says it will)
                    answer.extend(data)
                    if b"\r\n\r\n" in answer:
                        answered.set()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            answered.set()
    await stream.aclose()
    return bytes(answer), sent


async def test_a_100_mb_body_is_refused_without_being_read(proc):
    pid = proc.process.pid
    rss_before = _rss_kib(pid, "VmRSS")
    total = 100 * 1024 * 1024
    host = _host_port(proc.url)[0]
    common = f"Host: {host}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
    # Declared length: refused on the header alone, at once.
    started = time.monotonic()
    answer, sent = await _send_big_body(
        proc.url, f"POST /v1/threads HTTP/1.1\r\n{common}Content-Length: {total}\r\n\r\n".encode(),
        b"x" * (1024 * 1024), total)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"payload_too_large"' in answer and b"connection: close" in answer.lower()
    assert sent < total // 2 and time.monotonic() - started < 5, (sent, time.monotonic() - started)
    # Chunked (no length): read up to the limit (8 MiB by default), then refused.
    chunk = b"100000\r\n" + b"x" * 0x100000 + b"\r\n"
    answer, sent_chunked = await _send_big_body(
        proc.url, f"POST /v1/threads HTTP/1.1\r\n{common}Transfer-Encoding: chunked\r\n\r\n".encode(), chunk, total)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent_chunked < total // 2
    peak_growth = _rss_kib(pid, "VmHWM") - rss_before
    print(f"\n100 MB bodies: {sent / 2**20:.0f} MiB sent before the 413 (declared length), "
          f"{sent_chunked / 2**20:.0f} MiB (chunked); server peak RSS grew {peak_growth / 1024:.0f} MiB")
    assert peak_growth < 80 * 1024, f"the server buffered far more than its limit: +{peak_growth} KiB"
    async with httpx.AsyncClient(base_url=proc.url, headers=HEADERS, timeout=E2E_LIMIT) as http:
        assert (await http.get("/v1/threads")).json() == []
        assert (await http.get("/health")).status_code == 200
    _no_server_errors(proc)


async def _latencies(url: str, count: int, pace: float = 0.0) -> list[float]:
    """``count`` sequential ``GET /health`` on one keep-alive connection, paced ``pace`` s apart."""
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=E2E_LIMIT) as http:
        for _ in range(count):
            start = time.perf_counter()
            response = await http.get("/health")
            out.append(time.perf_counter() - start)
            assert response.status_code == 200
            if pace:
                await trio.sleep(pace)  # load pacing, not synchronisation
    return out


async def slowloris(proc, *, connections: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    host, port = _host_port(proc.url)
    baseline = await _latencies(proc.url, 40)
    cut_off: list[float] = []  # seconds from connect until the server closed each slowloris socket
    results: dict[str, Any] = {}
    head = (f"GET /v1/threads HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            + "".join(f"X-Pad-{i}: {'p' * 20}\r\n" for i in range(200)) + "\r\n").encode()

    async def trickle_headers(delays: list[float]) -> None:
        stream = await trio.open_tcp_stream(host, port)
        start = time.monotonic()

        async def watch() -> None:
            try:
                while await stream.receive_some(1024):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            cut_off.append(time.monotonic() - start)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            try:
                for index in range(len(head)):  # never finishes the head in the time allowed
                    await stream.send_all(head[index:index + 1])
                    await trio.sleep(delays[index % len(delays)])  # the attack's pacing (seeded)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await trio.sleep_forever()  # the watcher records the close and ends this
        await stream.aclose()

    async def trickle_body() -> None:
        """Whole head, then a body one byte at a time: Quart's body timeout (the request timeout) ends it."""
        stream = await trio.open_tcp_stream(host, port)
        start = time.monotonic()
        await stream.send_all(f"POST /v1/threads HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                              f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{".encode())
        answer = bytearray()

        async def drip() -> None:
            try:
                for _ in range(999):
                    await trio.sleep(0.1)  # the attack's pacing
                    await stream.send_all(b" ")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drip)
            try:
                while data := await stream.receive_some(65536):
                    answer.extend(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()
        results["slow body answer"] = bytes(answer[:12]).decode(errors="replace")
        results["slow body ended after"] = round(time.monotonic() - start, 2)
        await stream.aclose()

    async def idle_keep_alive() -> None:
        """One request, then silence: hypercorn's keep-alive timeout must close the connection."""
        stream = await trio.open_tcp_stream(host, port)
        start = time.monotonic()
        await stream.send_all(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        answer = bytearray()
        try:
            while data := await stream.receive_some(65536):
                answer.extend(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        assert answer.startswith(b"HTTP/1.1 200")
        results["idle keep-alive closed after"] = round(time.monotonic() - start, 2)
        await stream.aclose()

    during: list[float] = []
    with trio.fail_after(KEEP_ALIVE_TIMEOUT + REQUEST_TIMEOUT + MARGIN * 3):
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(trickle_headers, [rng.uniform(0.05, 0.3) for _ in range(16)])
            nursery.start_soon(trickle_body)
            nursery.start_soon(idle_keep_alive)

            async def measure() -> None:
                # Sample while the attack runs (the first slowloris cut-off comes at the keep-alive timeout).
                during.extend(await _latencies(proc.url, int(KEEP_ALIVE_TIMEOUT / 0.05) - 10, pace=0.05))

            nursery.start_soon(measure)
    results.update({
        "slowloris connections": connections,
        "cut off after (s, min..max)": (round(min(cut_off), 2), round(max(cut_off), 2)),
        "health p50 ms (alone -> under attack)": (round(statistics.median(baseline) * 1000, 2),
                                                   round(statistics.median(during) * 1000, 2)),
        "health max ms (alone -> under attack)": (round(max(baseline) * 1000, 2), round(max(during) * 1000, 2)),
    })
    assert len(cut_off) == connections
    assert max(cut_off) < KEEP_ALIVE_TIMEOUT + MARGIN, results
    assert results["slow body answer"].startswith("HTTP/1.1 408"), results
    assert results["slow body ended after"] < REQUEST_TIMEOUT + MARGIN, results
    assert results["idle keep-alive closed after"] < KEEP_ALIVE_TIMEOUT + MARGIN, results
    base50, under50 = statistics.median(baseline), statistics.median(during)
    assert under50 < 3 * base50 + 0.01, results
    assert max(during) < 0.5, results
    _no_server_errors(proc)
    return results


async def test_slowloris_clients_are_cut_off_and_do_not_slow_other_clients(proc):
    results = await slowloris(proc, connections=30, seed=SEED)
    print(f"\nslowloris (seed {SEED}): {results}")


@pytest.mark.reliability
async def test_reliability_slowloris_300(proc):
    results = await slowloris(proc, connections=300, seed=SEED)
    print(f"\nslowloris (seed {SEED}): {results}")


async def _read_answer(stream: trio.SocketStream, buffer: bytearray) -> tuple[bytes, dict[str, str], bytes]:
    """One whole response (Content-Length framed) from ``stream``: (status line, headers, body). What came
    after it stays in ``buffer``."""
    with trio.fail_after(E2E_LIMIT):
        while b"\r\n\r\n" not in buffer:
            data = await stream.receive_some(65536)
            assert data, f"the connection ended before a whole response head: {bytes(buffer)!r}"
            buffer.extend(data)
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
        length = int(headers["content-length"])
        while len(rest) < length:
            data = await stream.receive_some(65536)
            assert data, f"the connection ended inside a response: {head + rest!r}"
            rest += data
    buffer[:] = rest[length:]
    return status.encode(), headers, rest[:length]


async def _closed_by_server(stream: trio.SocketStream, buffer: bytearray) -> bool:
    """True once the server ends the connection without sending anything more (bounded by E2E_LIMIT)."""
    with trio.fail_after(E2E_LIMIT):
        try:
            while data := await stream.receive_some(65536):
                buffer.extend(data)
        except trio.BrokenResourceError:
            pass
    return not buffer


async def test_a_response_sent_before_the_request_body_arrived_keeps_the_connection_it_declared_reusable(proc):
    """The app answers 401/404/405 without reading the body. A client sends the body right after the head,
    so it usually arrives after the answer; hypercorn then closed the connection although the answer did
    not say ``Connection: close``, and httpx, which had already reused it for its next request, failed with
    "Server disconnected without sending a response" (about 1 run in 4 of the test above). Here the body is
    sent only once the whole answer is read, so the close, if any, is certain: a keep-alive answer must be
    followed by a connection that serves the next request. (Before that it hung: hypercorn's recycle step
    was cancelled by quart-trio.)"""
    host, port = _host_port(proc.url)
    body = json.dumps({"title": "late body"}).encode()
    for name, head in (
        ("401", f"POST /v1/threads HTTP/1.1\r\nHost: {host}\r\n"),
        ("404", f"POST /v1/nothing HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"),
        ("404", f"POST /v1/threads/..%2F..%2Fx/turns/y/steer HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {TOKEN}\r\n"),
        ("405", f"TRACE /v1/threads HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"),
        ("405", f"DELETE /v1/sessions/x/resume-thread HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {TOKEN}\r\n"),
    ):
        stream = await trio.open_tcp_stream(host, port)
        buffer = bytearray()
        await stream.send_all(f"{head}Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        status, headers, answer = await _read_answer(stream, buffer)
        assert status.startswith(f"HTTP/1.1 {name} ".encode()) and json.loads(answer)["error"]["status"] == int(name)
        assert headers.get("connection") != "close", f"a {name} before a {len(body)}-byte body gave up the connection"
        await stream.send_all(body + f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        status, headers, answer = await _read_answer(stream, buffer)
        assert status.startswith(b"HTTP/1.1 200 ") and json.loads(answer)["status"] == "ok", (name, head, answer)
        await stream.aclose()

    # A body too big to wait for, or of unknown length: the answer says it closes the connection, and it does.
    for what, framing in (("1 MiB", "Content-Length: 1048576"), ("chunked", "Transfer-Encoding: chunked")):
        stream = await trio.open_tcp_stream(host, port)
        buffer = bytearray()
        await stream.send_all(f"POST /v1/nothing HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                              f"{framing}\r\n\r\n".encode())
        status, headers, _ = await _read_answer(stream, buffer)
        assert status.startswith(b"HTTP/1.1 404 ") and headers.get("connection") == "close", (what, headers)
        assert await _closed_by_server(stream, buffer), what
        await stream.aclose()

    # A small body that never comes: the answer is whole at once, the connection ends at the request timeout
    # (its client still owes the rest of that request, so it cannot have sent another one).
    stream = await trio.open_tcp_stream(host, port)
    buffer = bytearray()
    await stream.send_all(f"POST /v1/nothing HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode())
    status, headers, _ = await _read_answer(stream, buffer)
    assert status.startswith(b"HTTP/1.1 404 ") and headers.get("connection") != "close"
    assert await _closed_by_server(stream, buffer)
    await stream.aclose()
    async with httpx.AsyncClient(base_url=proc.url, timeout=E2E_LIMIT) as http:
        assert (await http.get("/health")).json()["status"] == "ok"
    _no_server_errors(proc)
