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
