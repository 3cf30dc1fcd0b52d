"""Clients that stop reading, on a real ``trio-runtime serve`` process and real sockets (issue 11, defect 2).

The stalled client is a raw socket with a 4 KiB receive buffer that sends its request and never reads.
The thread it subscribes to holds a 2 MiB ``turn.started`` frame, far more than the kernel buffers on both
sides hold (16 KiB send, 8 KiB receive here), so once that frame's first bytes are in the client's buffer
(seen with MSG_PEEK, which leaves the window closed) the server is blocked writing it: without a bound on
writes, forever. Every wait has a deadline (E2E_LIMIT); waits on the subprocess poll a condition.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import AsyncIterator

import pytest
import trio

from tests.e2e.helpers import collect_until, wait_turn_end
from tests.e2e.process import ServerProcess
from tests.support import E2E_LIMIT
from web.client import AsyncClient

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads socket tables from /proc (Linux)")

# Far beyond what the kernel buffers of one loopback connection hold (tcp_wmem max is 4 MiB, but the send
# buffer only grows with acknowledged data, and a client with a 4 KiB receive buffer acknowledges little).
BIG_FRAME = 2 * 1024 * 1024
STALLED_RCVBUF = 4096
POLL = 0.02  # seconds between looks at a subprocess's state (a poll on a condition, under a deadline)


async def _thread_with_a_big_frame(client: AsyncClient) -> tuple[dict, int]:
    """A thread whose second event (``turn.started``, it carries the prompt) is bigger than BIG_FRAME."""
    thread = await client.create_thread()
    turn = await client.start_turn(thread["id"], "big " + "x" * BIG_FRAME)
    await wait_turn_end(client, thread["id"], turn["id"])
    return thread, (await client.get_thread(thread["id"]))["latest_seq"]


@contextlib.asynccontextmanager
async def stalled_subscriber(url: str, token: str, thread_id: str) -> AsyncIterator[trio.socket.SocketType]:
    """Subscribe to the thread's events, then never read; yields once the server is blocked writing the big
    frame to this client."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    raw = socket.socket()
    # Before connect, so the window the client advertises from the start is small.
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF)
    sock = trio.socket.from_stdlib_socket(raw)  # wraps ``raw`` itself: both name the same socket
    try:
        with trio.fail_after(E2E_LIMIT):
            await sock.connect((host, int(port)))
            await sock.send(f"GET /v1/threads/{thread_id}/events HTTP/1.1\r\nHost: {host}\r\n"
                            f"Authorization: Bearer {token}\r\n\r\n".encode())
            while b"event: turn.started" not in (peeked := _peek(raw)):
                await trio.sleep(POLL)
        assert peeked.startswith(b"HTTP/1.1 200 ") and b"event: thread.started" in peeked
        yield sock
    finally:
        sock.close()


def _peek(raw: socket.socket) -> bytes:
    """What the client has received and not read, left unread (the advertised window stays closed)."""
    try:
        return raw.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


async def _read_to_eof(sock: trio.socket.SocketType) -> bytes:
    """Everything the server sent, once the client reads again; returns at end of stream."""
    received = bytearray()
    with trio.fail_after(E2E_LIMIT):
        while chunk := await sock.recv(65536):
            received += chunk
    return bytes(received)


def _holds_connection(pid: int, server_port: int, client_port: int) -> bool:
    """Whether process ``pid`` still has a socket open on the connection server_port <-> client_port.
    (A socket the process closed may linger in the kernel while it flushes; it then has no owner, inode 0.)"""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            inodes.add(inode)
    fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    return any(inode != "0" and f"socket:[{inode}]" in fds for inode in inodes)


async def _subscribers(client: AsyncClient) -> int:
    return (await client.info())["subscribers"]


async def _wait_for(predicate, what: str) -> None:
    with trio.move_on_after(E2E_LIMIT):
        while not await predicate():
            await trio.sleep(POLL)
        return
    raise AssertionError(f"no {what} within {E2E_LIMIT} s")


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(tmp_path):
    send_timeout = 4.0
    proc = await ServerProcess(tmp_path / "data", "--sse-send-timeout", str(send_timeout)).start()
    try:
        async with AsyncClient(proc.url, proc.token) as client:
            thread, latest = await _thread_with_a_big_frame(client)
            connected = time.monotonic()
            async with stalled_subscriber(proc.url, proc.token, thread["id"]) as sock:
                client_port = sock.getsockname()[1]
                assert _holds_connection(proc.process.pid, _port(proc.url), client_port)
                # Meanwhile everyone else is served: a turn on the same thread streams to another subscriber.
                turn = await client.start_turn(thread["id"], "still here")
                events = await collect_until(client, thread["id"], lambda e: e["event"] == "turn.completed"
                                             and e.get("turn_id") == turn["id"], since_seq=latest)
                assert "".join(e["payload"]["delta"] for e in events if e["event"] == "item.delta") == \
                    "You said: still here"
                assert (await client.health())["status"] == "ok"

                async def other_stream_closed() -> bool:
                    return await _subscribers(client) <= 1

                await _wait_for(other_stream_closed, "end of the other subscription")
                # The stalled one, still waiting on its write (the few events of that turn fit in its bus
                # buffer, 1024 by default, so it was not detached to catch up later).
                assert await _subscribers(client) == 1

                async def dropped() -> bool:
                    return await _subscribers(client) == 0

                await _wait_for(dropped, "drop of the stalled subscriber")
                assert time.monotonic() - connected >= send_timeout
                assert not _holds_connection(proc.process.pid, _port(proc.url), client_port)

                # The client reads again: a prefix of the stream (the big frame cut short), then the end.
                received = await _read_to_eof(sock)
                assert received.startswith(b"HTTP/1.1 200 ") and b"event: thread.started" in received
                assert b"event: turn.started" in received and len(received) < BIG_FRAME
                assert b"event: turn.completed" not in received

            # Nothing leaked, nothing changed: the server answers, the thread is whole.
            assert await _subscribers(client) == 0
            detail = await client.get_thread(thread["id"])
            assert [t["status"] for t in detail["turns"]] == ["completed", "completed"]
            assert detail["latest_seq"] == events[-1]["seq"]
    finally:
        proc.kill()
    assert f"it took no data for {send_timeout:g} s (--sse-send-timeout)" in await proc.drain()


async def test_sigterm_exits_within_the_grace_period_despite_a_stalled_client(tmp_path):
    graceful = 1.0
    # A send timeout far beyond the test: only the shutdown's cut-off can end the stalled write.
    proc = await ServerProcess(tmp_path / "data", "--graceful-timeout", str(graceful),
                               "--sse-send-timeout", "600").start()
    try:
        async with AsyncClient(proc.url, proc.token) as client:
            thread, latest = await _thread_with_a_big_frame(client)
        async with stalled_subscriber(proc.url, proc.token, thread["id"]):
            signalled = time.monotonic()
            proc.process.send_signal(signal.SIGTERM)
            code = await proc.wait()
            elapsed = time.monotonic() - signalled
    finally:
        proc.kill()
    print(f"\nSIGTERM with a stalled SSE client, --graceful-timeout {graceful:g}: exit {code} after {elapsed:.2f} s")
    assert code == 0
    assert elapsed <= graceful + 2  # the contract (API.md v1.1 hardening rules)

    again = await ServerProcess(tmp_path / "data").start()
    try:
        async with AsyncClient(again.url, again.token) as client:
            detail = await client.get_thread(thread["id"])
            assert [t["status"] for t in detail["turns"]] == ["completed"] and detail["latest_seq"] == latest
            replayed = await collect_until(client, thread["id"], lambda e: e["seq"] == latest)
            assert [e["seq"] for e in replayed] == sorted({e["seq"] for e in replayed})
    finally:
        again.kill()


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)])
async def test_a_second_signal_exits_at_once_while_shutdown_waits(tmp_path, first, second):
    # Shutdown is stuck for a minute: the grace and the send timeout both outlast the test.
    proc = await ServerProcess(tmp_path / "data", "--graceful-timeout", "60", "--sse-send-timeout", "600",
                               "--log-level", "info").start()
    try:
        async with AsyncClient(proc.url, proc.token) as client:
            thread, latest = await _thread_with_a_big_frame(client)
        async with stalled_subscriber(proc.url, proc.token, thread["id"]):
            proc.process.send_signal(first)
            await proc.read_until(f"received {first.name}, shutting down")
            assert proc.process.returncode is None  # shutting down, and waiting on the stalled client
            signalled = time.monotonic()
            proc.process.send_signal(second)
            code = await proc.wait()
            elapsed = time.monotonic() - signalled
    finally:
        proc.kill()
    print(f"\nsecond signal ({second.name}) during a stuck shutdown: exit {code} after {elapsed:.2f} s")
    assert code == 128 + second
    assert elapsed < 5  # "at once": the stuck shutdown had a minute to go
    assert f"received {second.name} again during shutdown: exiting at once with code {128 + second}" in \
        await proc.drain()

    # Exiting at once is as safe as a kill: the next start finds the thread whole.
    again = await ServerProcess(tmp_path / "data").start()
    try:
        async with AsyncClient(again.url, again.token) as client:
            detail = await client.get_thread(thread["id"])
            assert [t["status"] for t in detail["turns"]] == ["completed"] and detail["latest_seq"] == latest
            assert (await client.health())["status"] == "ok"
    finally:
        again.kill()
