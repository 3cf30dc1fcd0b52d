"""A response's head and a small body of known length go out in one write (web/server.py ``HeadWithBody``,
issue 16: the /health floor), while a stream's head, a HEAD answer's head and a large body's head are
written as before, in order, and never held back waiting for something that may not come."""

from __future__ import annotations

import json

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, RawData
from hypercorn.protocol.events import Body, EndBody, Response, StreamClosed
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import WorkerContext

from web import server as web_server
from web.server import HEAD_WITH_BODY_MAX, HeadWithBody, SendBounds

STREAM = 1


async def _protocol(request: bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") -> tuple[HeadWithBody, list]:
    """The protocol of one connection that has read ``request``, and the list its writes go to (the bytes of
    each write; any other event for the connection, such as its close, as itself)."""
    writes: list = []

    async def send(event) -> None:
        writes.append(bytes(event.data) if isinstance(event, RawData) else event)

    protocol = HeadWithBody(None, Config(), WorkerContext(None), TaskGroup(), None, False, None, None, send)
    protocol.connection.receive_data(request)
    assert isinstance(protocol.connection.next_event(), h11.Request)
    return protocol, writes


def _response(length: int | None) -> Response:
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return Response(stream_id=STREAM, headers=headers, status_code=200)


async def test_a_small_body_of_known_length_goes_out_with_its_head_in_one_write():
    protocol, writes = await _protocol()
    body = b'{"status":"ok"}\n'
    await protocol.stream_send(_response(len(body)))
    assert writes == []  # the head waits for its body, which the app sends right after the start
    await protocol.stream_send(Body(stream_id=STREAM, data=body))
    await protocol.stream_send(EndBody(stream_id=STREAM))
    assert len(writes[0]) > len(body) and writes[0].startswith(b"HTTP/1.1 200 ") and writes[0].endswith(body)
    assert writes[1:] == [b""]  # the end of a fixed-length body: no bytes (web/server.py writes none)
    assert protocol.connection.our_state is h11.DONE


async def test_a_stream_has_its_head_written_at_once():
    # No Content-Length (SSE): the first event may be far off, and the client must see the stream open.
    protocol, writes = await _protocol()
    await protocol.stream_send(_response(None))
    assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200 ") and writes[0].endswith(b"\r\n\r\n")
    await protocol.stream_send(Body(stream_id=STREAM, data=b"data: 1\n\n"))
    assert writes[1] == b"9\r\ndata: 1\n\n\r\n"


async def test_a_head_answer_writes_its_head_when_the_response_ends():
    # HEAD: Content-Length says 56, but no body comes; the end of the response writes the waiting head.
    protocol, writes = await _protocol(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    await protocol.stream_send(_response(56))
    assert writes == []
    await protocol.stream_send(EndBody(stream_id=STREAM))
    assert writes[0].startswith(b"HTTP/1.1 200 ") and writes[0].endswith(b"\r\n\r\n")
    assert b"content-length: 56" in writes[0] and writes[1:] == [b""]


async def test_a_large_body_is_written_after_its_head_without_joining_them():
    protocol, writes = await _protocol()
    body = b"x" * (HEAD_WITH_BODY_MAX + 1)
    await protocol.stream_send(_response(len(body)))
    assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\n")  # not held: no copy of a big body to join it
    await protocol.stream_send(Body(stream_id=STREAM, data=body))
    assert writes[1] == body


async def test_a_response_that_ends_without_its_body_still_writes_its_head_first():
    # The app failed after starting its answer: hypercorn closes the stream; the head goes out first, as
    # it did before (then the connection is closed for the missing body).
    protocol, writes = await _protocol()
    await protocol.stream_send(_response(10))
    await protocol.stream_send(StreamClosed(stream_id=STREAM))
    assert writes[0].startswith(b"HTTP/1.1 200 ") and writes[0].endswith(b"\r\n\r\n")
    assert writes[1:] == [Closed()]


async def test_the_server_answers_health_in_one_socket_write(server, monkeypatch):
    # Over a real socket: every non-empty bounded write of the server (web/server.py SendBounds, which every
    # write to a client goes through) for one GET /health.
    writes: list[bytes] = []
    send_all = SendBounds.send_all

    async def recording(bounds, stream, data):
        if data:
            writes.append(bytes(data))
        return await send_all(bounds, stream, data)

    monkeypatch.setattr(SendBounds, "send_all", recording)
    port = int(server.url.rsplit(":", 1)[1])
    client = await trio.open_tcp_stream("127.0.0.1", port)
    async with client:
        await client.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while not got.endswith(b"}\n"):
            got += await client.receive_some()
    assert len(writes) == 1 and writes[0] == got
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["status"] == "ok"


async def test_an_event_stream_opens_before_its_first_event(server):
    # The head of an SSE answer is written while no event exists yet (a held head would never come).
    thread = await server.runtime.create_thread()
    port = int(server.url.rsplit(":", 1)[1])
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    async with sock:
        await sock.send_all(f"GET /v1/threads/{thread['id']}/events?since_seq=999999999 HTTP/1.1\r\nHost: x\r\n"
                            f"Authorization: Bearer {server.token}\r\n\r\n".encode())
        got = b""
        with trio.fail_after(10):  # a guard against hanging, not a synchronisation
            while b"\r\n\r\n" not in got:
                got += await sock.receive_some()
    assert got.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in got


def test_install_uses_the_protocol_for_every_http11_connection(monkeypatch):
    import hypercorn.protocol as hypercorn_protocol
    from hypercorn.protocol.h11 import H11Protocol

    monkeypatch.setattr(hypercorn_protocol, "H11Protocol", H11Protocol)
    web_server.install()
    assert hypercorn_protocol.H11Protocol is HeadWithBody
    monkeypatch.setattr(hypercorn_protocol, "H11Protocol", type("Other", (), {}))
    try:
        web_server.install()
    except RuntimeError as exc:
        assert "H11Protocol" in str(exc)
    else:
        raise AssertionError("install accepted a hypercorn protocol it does not know")
