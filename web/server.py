"""Bounded writes to clients: hypercorn's trio worker with a deadline on every socket write.

Why this module exists. hypercorn writes each piece of a response with ``send_all`` inside a
``CancelScope(shield=True)`` (``hypercorn/trio/tcp_server.py``, ``TCPServer.protocol_send``), because a
write cut half-way tears the HTTP framing. The shield also means that nothing outside can stop a write to
a client that stopped reading: not the request's cancellation, not our SSE shutdown, not the worker's
graceful deadline. One EventSource that stopped reading held its connection forever and kept SIGTERM from
ever finishing (issue 11, defect 2). A blocked ``send_all`` is freed only by closing its socket (trio then
wakes the writer with ``ClosedResourceError``), and only the code that owns the socket can do that.

So ``BoundedTCPServer`` replaces hypercorn's ``protocol_send`` with one that writes in slices, each under
a deadline *inside* the shield. A slice the client does not take within ``SendBounds.timeout`` aborts the
connection: the socket is closed and hypercorn's protocol is told the connection is gone, which ends the
request exactly as a client disconnect does (quart-trio cancels the handler; an SSE stream closes its
subscription). At shutdown ``SendBounds.cut_off`` moves every write's deadline, waiting ones included, to
the end of the grace period, so the worker's graceful deadline holds whatever clients do.

What an aborted write leaves behind: the client got a prefix of the response (for SSE, whole frames and
perhaps part of the next one), then the end of the connection; nothing stays allocated on the server.
"""

from __future__ import annotations

import errno
import logging
import math
from typing import Any

import h11
import hypercorn.protocol as hypercorn_protocol
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import Body, Response
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

log = logging.getLogger("trio_runtime")

# Each write is sliced so that the bound measures progress, not the size of a response: a client is
# "still reading" while it takes 64 KiB per timeout (6.4 KB/s at the 10 s default, far below any real
# link), so a slow client can download a 12 MB session while one that stopped reading is dropped.
# 64 KiB is also hypercorn's own read size (``MAX_RECV``).
SEND_SLICE = 64 * 1024
# The errnos that mean the socket was closed under the write (trio's SocketStream raises ClosedResourceError).
_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})


class SendBounds:
    """The deadline of every write of one server: ``timeout`` per slice, and the shutdown cut-off."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.cutoff = math.inf
        self._waiting: set[trio.CancelScope] = set()

    def cut_off(self, deadline: float) -> None:
        """No write lasts past ``deadline`` (trio time), including the writes already waiting."""
        self.cutoff = min(self.cutoff, deadline)
        for scope in self._waiting:
            scope.deadline = min(scope.deadline, self.cutoff)

    async def send_all(self, stream: trio.abc.SendStream, data: bytes | bytearray | memoryview) -> bool:
        """Write ``data``; False when a slice was not taken in time. After False the stream is unusable
        (part of a slice may have been written) and must be closed. Connection errors propagate.

        Shielded from cancellation from outside, for hypercorn's reason (a write cancelled half-way tears
        the HTTP framing of a connection that would go on being used): each slice is written in one scope
        that is both the shield and the slice's deadline (a deadline cancels its own scope, shielded or
        not). One scope per write instead of two, and each costs every request (issue 16). To a plain socket the
        whole write is one scope whose deadline moves on per slice taken (``_send_to_socket``)."""
        if not data and isinstance(stream, trio.SocketStream):
            # hypercorn writes the empty end of every response. A SocketStream sends nothing then: it only
            # checks that the socket is open (hypercorn relies on send_all(b"") raising on a closed one)
            # and checkpoints, so there is nothing for a deadline to bound. Shielded like any write; safe,
            # as that one checkpoint does not wait.
            with trio.CancelScope(shield=True):
                await stream.send_all(data)
            return True
        if type(stream) is trio.SocketStream and data:
            return await self._send_to_socket(stream, data)
        with memoryview(data) as view:
            # One pass for empty data too: hypercorn relies on send_all(b"") raising on a closed socket.
            for start in range(0, max(len(view), 1), SEND_SLICE):
                # Safe to shield: the deadline inside the same scope bounds the write by the send timeout,
                # or by what is left of the grace at shutdown (cut_off).
                scope = trio.CancelScope(deadline=min(trio.current_time() + self.timeout, self.cutoff),
                                         shield=True)
                self._waiting.add(scope)
                try:
                    with scope:
                        await stream.send_all(view[start:start + SEND_SLICE])
                finally:
                    self._waiting.discard(scope)
                if scope.cancelled_caught:
                    return False
        return True

    async def _send_to_socket(self, stream: trio.SocketStream, data: bytes | bytearray | memoryview) -> bool:
        """``send_all`` to a plain socket (every client without TLS): the same bound, each SEND_SLICE bytes taken
        within the timeout of the slice before, but every socket write is given all that is left, not one slice:
        one scope for the whole write, whose deadline moves on each time the client has taken another slice.
        Slice by slice, a replay page of ~640 KB was ten scopes, ten ``send_all`` calls and the writes and
        scheduler passes of each; the loop's CPU per replayed event was 0.52-0.58 µs with 64 KiB slices and
        0.25-0.32 µs with 1 MiB ones (issue 16 fifth pass, bench row 16b). Errors as ``SocketStream.send_all``
        raises them; a False leaves the stream as the sliced write does (part of a slice may have been written)."""
        sock = stream.socket
        if sock.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        scope = trio.CancelScope(deadline=min(trio.current_time() + self.timeout, self.cutoff), shield=True)
        self._waiting.add(scope)
        try:
            with scope, memoryview(data) as view:
                total, sent = len(view), 0
                while sent < total:
                    try:
                        with view[sent:] as rest:
                            taken = await sock.send(rest)
                    except OSError as exc:
                        if exc.errno in _CLOSED_ERRNOS:
                            raise trio.ClosedResourceError("this socket was already closed") from None
                        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
                    if (sent + taken) // SEND_SLICE != sent // SEND_SLICE:
                        # A slice was taken in time: the next one gets the timeout from now (or the cut-off).
                        scope.deadline = min(trio.current_time() + self.timeout, self.cutoff)
                    sent += taken
        finally:
            self._waiting.discard(scope)
        return not scope.cancelled_caught


class ServerConfig(HyperConfig):
    """hypercorn's Config plus the write bounds that ``BoundedTCPServer`` applies."""

    send_bounds: SendBounds | None = None


class BoundedTCPServer(TCPServer):
    """hypercorn's connection handler, with every write bounded by ``config.send_bounds``.

    Also its reads: with no read timeout (ours) they are not wrapped in a scope that can never fire. With
    a config that has no ``send_bounds`` (another hypercorn server in the same process) it is hypercorn's
    handler unchanged."""

    async def protocol_send(self, event: Event) -> None:
        bounds: SendBounds | None = getattr(self.config, "send_bounds", None)
        if bounds is None or not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        if not event.data and isinstance(self.stream, trio.SocketStream) and not self.send_lock.locked():
            # The empty end of every response (h11 frames a fixed-length body with no end bytes): a
            # SocketStream writes nothing for it, and only raises if the socket is closed or shut down for
            # writing, which hypercorn relies on to notice a connection that went away. That check is made
            # here directly, without the lock, the shielded scope and the checkpoint of a write: each cost
            # every request (issue 16, the floor under load). With a write in progress (the lock held),
            # the end waits for it as before.
            socket = self.stream.socket
            if socket.fileno() == -1 or socket.did_shutdown_SHUT_WR:
                await self.protocol.handle(Closed())  # what a write to a closed socket leads to, below
            return
        async with self.send_lock:
            # SendBounds shields the write for hypercorn's reason, with a deadline inside the shield: the
            # write takes at most the send timeout or what is left of the grace.
            try:
                delivered = await bounds.send_all(self.stream, event.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                delivered = False  # the client went away: hypercorn's own handling, below
            else:
                if not delivered:
                    why = ("the server is shutting down" if trio.current_time() >= bounds.cutoff
                           else f"it took no data for {bounds.timeout:g} s (--sse-send-timeout)")
                    log.warning("dropped the connection of %s: %s", _peer(self), why)
                    # Shielded, so that a connection whose write failed is always closed. Safe: a close is
                    # one checkpoint, nothing that waits.
                    with trio.CancelScope(shield=True):
                        await self.stream.aclose()  # wakes this connection's reader with ClosedResourceError
            if not delivered:
                await self.protocol.handle(Closed())

    async def _read_data(self) -> None:
        """hypercorn's read loop, without its per-read ``fail_after(read_timeout or inf)`` when there is no
        read timeout (our config sets none: an idle keep-alive connection is closed by hypercorn's idle
        timer instead). A scope with an infinite deadline can never fire, yet was entered and left around
        every read, with its context manager: ~45 Python calls of each request (issue 16, the floor).
        With a read timeout it is hypercorn's loop unchanged."""
        if self.config.read_timeout is not None or getattr(self.config, "send_bounds", None) is None:
            await super()._read_data()
            return
        # A plain socket is waited on before it is read: on a keep-alive connection the next request is
        # never there yet right after an answer, so reading first cost every request one more system call
        # (a recv that fails with EAGAIN) and an exception raised and caught inside trio (issue 16, the
        # floor). TLS streams read as they are (their bytes may be buffered already).
        socket = self.stream.socket if isinstance(self.stream, trio.SocketStream) else None
        while True:
            try:
                if socket is not None and socket.fileno() != -1:  # closed: receive_some says so, below
                    await trio.lowlevel.wait_readable(socket)
                data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            else:
                await self.protocol.handle(RawData(bytes(data)))
                if data == b"":
                    break
        await self.protocol.handle(Closed())


# The largest response body whose head waits to go out with it (see HeadWithBody): one write of head and
# body instead of two; a larger body is written on its own, not copied to join its head.
HEAD_WITH_BODY_MAX = SEND_SLICE


def _body_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The Content-Length of a response's headers, or 0 when it has none (a stream) or it is not a number."""
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


class HeadWithBody(H11Protocol):
    """hypercorn's HTTP/1.1 protocol, writing a response's head and its body in one write when the body has
    a known length of at most ``HEAD_WITH_BODY_MAX``.

    Why: hypercorn writes the head when the app starts its response and the body when the app sends it, two
    socket writes for every JSON answer. Each write is a system call, a TCP segment and often one more
    wake-up of the client, and here one more bounded write (lock, shielded scope, checkpoint): with this,
    ``GET /health`` costs one write instead of two (issue 16, the floor). Only a head that announces a
    Content-Length waits: its body follows at once (the app has it whole, Quart sends it right after the
    start). A stream (SSE, no Content-Length) has its head written at once, as before, so a client sees the
    stream open before its first event. Any other event (the end of a HEAD answer's empty body, the stream
    closing after an app error) writes a waiting head first, so the order on the wire never changes.

    What a cancel leaves behind: a head that was waiting is dropped with the connection, as the client got
    nothing of that response (before, it could get the head alone)."""

    _head: bytes | None = None
    _hold_head = False

    async def stream_send(self, event: Any) -> None:
        if self._head is not None and not isinstance(event, Body):
            head, self._head = self._head, None
            await self.send(RawData(data=head))
        self._hold_head = (isinstance(event, Response) and event.status_code >= 200
                           and 0 < _body_length(event.headers) <= HEAD_WITH_BODY_MAX)
        try:
            await super().stream_send(event)
        finally:
            self._hold_head = False

    async def _send_h11_event(self, event: Any) -> None:
        if self._hold_head and isinstance(event, h11.Response):
            self._hold_head = False
            try:
                self._head = self.connection.send(event)
            except h11.LocalProtocolError:  # as hypercorn's: nothing to write once the client erred
                if self.connection.their_state != h11.ERROR:
                    raise
            return
        head, self._head = self._head, None
        if head is None:
            await super()._send_h11_event(event)
            return
        try:
            data = self.connection.send(event) or b""
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            data = b""
        await self.send(RawData(data=head + data))


def _peer(server: TCPServer) -> str:
    client = getattr(server.protocol, "client", None)
    return f"{client[0]}:{client[1]}" if client else "a client"


def install() -> None:
    """Make hypercorn's trio worker build its connections with ``BoundedTCPServer``, and their HTTP/1.1
    protocol with ``HeadWithBody``.

    ``hypercorn.trio.run.worker_serve`` creates each connection's handler from its module global
    ``TCPServer``, and ``hypercorn.protocol.ProtocolWrapper`` its protocol from the global ``H11Protocol``;
    neither offers a parameter, so this points those globals at the subclasses. Refuses (instead of silently
    serving unbounded) if hypercorn's layout is not the one this was written for."""
    if hypercorn_run.TCPServer is not BoundedTCPServer:
        if hypercorn_run.TCPServer is not TCPServer or not hasattr(TCPServer, "protocol_send"):
            raise RuntimeError("hypercorn's trio worker changed (hypercorn.trio.run.TCPServer): writes to "
                               "clients cannot be bounded; check web/server.py against the installed hypercorn")
        hypercorn_run.TCPServer = BoundedTCPServer
    if hypercorn_protocol.H11Protocol is not HeadWithBody:
        if hypercorn_protocol.H11Protocol is not H11Protocol or not hasattr(H11Protocol, "_send_h11_event"):
            raise RuntimeError("hypercorn's protocol wrapper changed (hypercorn.protocol.H11Protocol); check "
                               "web/server.py against the installed hypercorn")
        hypercorn_protocol.H11Protocol = HeadWithBody
