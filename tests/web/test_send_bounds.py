"""``SendBounds``: the deadline on every write to a client (web/server.py), on MockClock with exact times.

The stream stands in for a client socket: each ``send_all`` call returns only when the test lets it (the
client "takes" that slice). The end-to-end behaviour with real sockets is in tests/e2e/test_slow_clients.py.
"""

from __future__ import annotations

import pytest
import trio
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio.tcp_server import TCPServer

from web import server
from web.server import SEND_SLICE, SendBounds


class Client(trio.abc.SendStream):
    """Takes a slice when given a permit; records what it took, and when."""

    def __init__(self) -> None:
        self.permits_in, self._permits = trio.open_memory_channel[None](100)
        self.taken: list[tuple[float, int]] = []

    async def send_all(self, data) -> None:
        await self._permits.receive()
        self.taken.append((trio.current_time(), len(data)))

    async def wait_send_all_might_not_block(self) -> None:  # pragma: no cover - not used
        raise NotImplementedError

    async def aclose(self) -> None:  # pragma: no cover - not used
        pass


async def test_a_client_that_takes_nothing_is_given_up_at_the_timeout(autojump_clock):
    bounds, client = SendBounds(10.0), Client()
    start = trio.current_time()
    assert await bounds.send_all(client, b"frame") is False
    assert trio.current_time() - start == 10.0 and client.taken == []


async def test_the_bound_is_per_slice_so_a_slow_reader_gets_a_big_response(autojump_clock):
    bounds, client = SendBounds(10.0), Client()
    size = 3 * SEND_SLICE + 10

    async def read_slowly() -> None:
        for _ in range(4):
            await trio.sleep(9.0)  # each slice just inside the bound; 36 s in all
            client.permits_in.send_nowait(None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_slowly)
        assert await bounds.send_all(client, b"x" * size) is True
    assert client.taken == [(9.0, SEND_SLICE), (18.0, SEND_SLICE), (27.0, SEND_SLICE), (36.0, 10)]
    assert bounds._waiting == set()


async def test_shutdown_cuts_a_waiting_write_and_every_later_one(autojump_clock):
    bounds, client = SendBounds(600.0), Client()
    results = []

    async def write() -> None:
        results.append((await bounds.send_all(client, b"frame"), trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        await trio.sleep(1.0)
        bounds.cut_off(trio.current_time() + 2.0)  # the grace ends at t=3
    assert results == [(False, 3.0)]
    # A write that starts after the cut-off gets what is left of the grace, not the send timeout.
    bounds.cut_off(trio.current_time() + 5.0)  # a later, longer cut-off never extends the first one
    assert await bounds.send_all(client, b"frame") is False and trio.current_time() == 3.0


async def test_empty_data_is_still_one_write(autojump_clock):
    # hypercorn relies on send_all(b"") raising on a closed socket; slicing must not skip the call.
    bounds, client = SendBounds(10.0), Client()
    client.permits_in.send_nowait(None)
    assert await bounds.send_all(client, b"") is True
    assert client.taken == [(0.0, 0)]


def test_install_refuses_a_hypercorn_it_does_not_know(monkeypatch):
    monkeypatch.setattr(hypercorn_run, "TCPServer", type("OtherServer", (), {}))
    with pytest.raises(RuntimeError, match="writes to clients cannot be bounded"):
        server.install()


def test_install_bounds_hypercorns_trio_worker(monkeypatch):
    monkeypatch.setattr(hypercorn_run, "TCPServer", TCPServer)
    server.install()
    assert hypercorn_run.TCPServer is server.BoundedTCPServer
    server.install()  # idempotent
    assert hypercorn_run.TCPServer is server.BoundedTCPServer


# The same bounds on a real socket (``SendBounds._send_to_socket``, every client without TLS), with the kernel's
# buffers made as small as it allows so that the writer sees the reader's pace.
def _small_socketpair() -> tuple[trio.SocketStream, trio.socket.SocketType]:
    import socket as stdlib_socket

    a, b = trio.socket.socketpair()
    a.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_SNDBUF, 1)
    b.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, 1)
    return trio.SocketStream(a), b


async def _read(sock, size: int) -> None:
    with trio.fail_after(100):  # MockClock time: a write that never comes fails the test instead of hanging it
        while size > 0:
            size -= len(await sock.recv(min(size, 65536)))


async def test_on_a_socket_the_bound_is_still_per_slice(autojump_clock):
    stream, reader = _small_socketpair()
    bounds = SendBounds(10.0)
    size = 3 * SEND_SLICE + 10
    ends = []

    async def read_slowly() -> None:
        for _ in range(3):
            await trio.sleep(9.0)  # each slice just inside the bound; 27 s in all
            await _read(reader, SEND_SLICE)
        await _read(reader, 10)

    with reader:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_slowly)
            assert await bounds.send_all(stream, b"x" * size) is True
            ends.append(trio.current_time())
        # A reader that takes one slice and then stops: dropped one timeout after that slice was taken.
        stream, stopped = _small_socketpair()
        with stopped:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: _read(stopped, SEND_SLICE))
                assert await bounds.send_all(stream, b"x" * size) is False
                ends.append(trio.current_time())
    assert ends == [27.0, 37.0] and bounds._waiting == set()


async def test_a_write_to_a_socket_gives_it_all_that_is_left_not_one_slice_at_a_time():
    # One scope and one socket write for what the socket takes at once (issue 16 fifth pass: a replay page
    # was ten scopes and ten send_all calls, half of the loop's CPU per replayed event).
    a, b = trio.socket.socketpair()
    stream = trio.SocketStream(a)
    given: list[int] = []
    send = a.send

    async def counted_send(data, *args):
        given.append(len(data))
        return await send(data, *args)

    a.send = counted_send
    size = 4 * SEND_SLICE
    with b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read, b, size)
            assert await SendBounds(10.0).send_all(stream, b"x" * size) is True
    assert given[0] == size and len(given) < 4


async def test_a_write_to_a_closed_or_broken_socket_raises_as_the_stream_does():
    a, b = trio.socket.socketpair()
    stream = trio.SocketStream(a)
    b.close()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first writes may land in the buffer before the peer's close shows
            await SendBounds(10.0).send_all(stream, b"x" * SEND_SLICE)
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await SendBounds(10.0).send_all(stream, b"x")


async def test_on_a_socket_a_cancel_from_outside_waits_for_the_write_and_shutdown_cuts_it(autojump_clock):
    stream, reader = _small_socketpair()
    bounds = SendBounds(600.0)
    size = 2 * SEND_SLICE
    results = []

    async def write() -> None:
        with trio.CancelScope() as outer:
            scopes.append(outer)
            results.append((await bounds.send_all(stream, b"x" * size), trio.current_time()))

    scopes: list[trio.CancelScope] = []
    with reader:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            await trio.sleep(1.0)
            scopes[0].cancel()  # the client went away, say: the write goes on (shielded) while it is taken
            await _read(reader, SEND_SLICE)
            await trio.sleep(1.0)
            bounds.cut_off(trio.current_time() + 2.0)  # the grace ends at t=4: the rest is never read
    assert results == [(False, 4.0)] and bounds._waiting == set()
