"""A response that ends before its request body arrived (web/app.py ``HTTPConnection``), at the ASGI
boundary on MockClock: no socket, so what the app sends and when is exact.

hypercorn decides a keep-alive connection's fate in the ``send`` of a response's last message: if the
request body is not all in by then, it closes the connection, whatever the response said. A 404, 405 or
401 is sent before the body is read, and a client sends the body right after the head, so the body was
usually still on its way: hypercorn closed a connection it had just declared reusable, and a client that
reused it before the close reached it had its next request dropped ("Server disconnected without sending
a response"; the flaky tests/reliability/test_hostile_input.py). So the end of such a response waits for
a small body (bounded by the request timeout), and a response that cannot wait says ``Connection: close``.
The same contract on a real server and real sockets is in tests/reliability/test_hostile_input.py.
"""

from __future__ import annotations

from urllib.parse import unquote

import pytest
import trio
import trio.testing

from tests.support import open_runtime
from web.app import UNREAD_BODY_LIMIT, create_app
from web.settings import ServerSettings

TOKEN = "t"
REQUEST_TIMEOUT = 7.0
# Virtual seconds: "at once" (the runtime's own short timers move the clock a few ms), far below the timeout.
AT_ONCE = 0.5


@pytest.fixture
async def app(tmp_path):
    async with open_runtime(tmp_path) as runtime:
        yield create_app(runtime, ServerSettings(data_dir=tmp_path, auth_token=TOKEN,
                                                 request_timeout=REQUEST_TIMEOUT), TOKEN)


class Exchange:
    """One request through the app: the test feeds ``http.request`` messages; ``sent`` records what the
    app sent (with the virtual seconds since the request began), ``ended`` is set by the response's last message."""

    def __init__(self) -> None:
        self.incoming_in, self._incoming = trio.open_memory_channel[dict](10)
        self.sent: list[tuple[float, dict]] = []
        self.ended = trio.Event()
        self.began = trio.current_time()

    async def receive(self) -> dict:
        return await self._incoming.receive()

    async def send(self, message: dict) -> None:
        self.sent.append((trio.current_time() - self.began, message))
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.ended.set()

    @property
    def start(self) -> dict:
        return next(message for _, message in self.sent if message["type"] == "http.response.start")

    def header(self, name: bytes) -> bytes | None:
        return dict(self.start["headers"]).get(name)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for _, m in self.sent if m["type"] == "http.response.body")

    @property
    def ended_at(self) -> float:
        return next(t for t, m in self.sent if m["type"] == "http.response.body" and not m.get("more_body"))


def _scope(method: str, raw_path: str, headers: list[tuple[bytes, bytes]], *, auth: bool = True) -> dict:
    """What hypercorn hands the app (it unquotes the path, as here)."""
    return {"type": "http", "http_version": "1.1", "asgi": {"spec_version": "2.1", "version": "3.0"},
            "method": method, "scheme": "http", "path": unquote(raw_path), "raw_path": raw_path.encode(),
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 7878),
            "extensions": {},
            "headers": [(b"host", b"127.0.0.1"),
                        *([(b"authorization", f"Bearer {TOKEN}".encode())] if auth else []), *headers]}


async def _start(nursery: trio.Nursery, app, scope: dict) -> Exchange:
    exchange = Exchange()
    nursery.start_soon(app, scope, exchange.receive, exchange.send)
    await trio.testing.wait_all_tasks_blocked()
    return exchange


BODY = b'{"title": "x"}'
SMALL = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


@pytest.mark.parametrize("method,path,status,auth", [
    ("POST", "/v1/nothing", 404, True),
    ("TRACE", "/v1/threads", 405, True),
    ("POST", "/v1/threads", 401, False),
    ("POST", "/v1/threads/..%2F..%2Fx/turns/y/steer", 404, True),
])
async def test_an_answer_sent_before_a_small_body_ends_only_once_the_body_is_in(app, method, path, status, auth,
                                                                                 autojump_clock):
    async with trio.open_nursery() as nursery:
        exchange = await _start(nursery, app, _scope(method, path, SMALL, auth=auth))
        # Everything but the end: the client has its whole answer (Content-Length), the connection is kept.
        assert exchange.start["status"] == status and exchange.header(b"connection") is None
        assert exchange.header(b"content-length") == str(len(exchange.body)).encode()
        assert f'"status":{status}'.encode() in exchange.body
        assert not exchange.ended.is_set(), "the response ended (hypercorn recycles there) before the body came"
        await exchange.incoming_in.send({"type": "http.request", "body": BODY[:5], "more_body": True})
        await trio.testing.wait_all_tasks_blocked()
        assert not exchange.ended.is_set()
        await exchange.incoming_in.send({"type": "http.request", "body": BODY[5:], "more_body": False})
        with trio.fail_after(1):  # virtual time: it ends without any timer running out
            await exchange.ended.wait()
        assert exchange.ended_at < AT_ONCE


async def test_a_small_body_that_never_comes_ends_the_answer_at_the_request_timeout(app, autojump_clock):
    async with trio.open_nursery() as nursery:
        exchange = await _start(nursery, app, _scope("POST", "/v1/nothing", SMALL))
        assert exchange.start["status"] == 404 and exchange.header(b"connection") is None
        await exchange.ended.wait()
    # The end is sent then (hypercorn closes the connection, whose client owes the rest of its request).
    assert REQUEST_TIMEOUT <= exchange.ended_at < REQUEST_TIMEOUT + AT_ONCE


@pytest.mark.parametrize("what,headers", [
    ("over the limit", [(b"content-length", str(UNREAD_BODY_LIMIT + 1).encode())]),
    ("chunked", [(b"transfer-encoding", b"chunked")]),
])
async def test_an_answer_before_a_big_or_unsized_body_says_close_and_ends_at_once(app, what, headers, autojump_clock):
    async with trio.open_nursery() as nursery:
        exchange = await _start(nursery, app, _scope("POST", "/v1/nothing", headers))
        assert exchange.start["status"] == 404 and exchange.header(b"connection") == b"close", what
        assert exchange.ended.is_set() and exchange.ended_at < AT_ONCE


async def test_a_body_that_is_too_slow_gets_a_408_that_says_close_without_a_second_wait(app, autojump_clock):
    async with trio.open_nursery() as nursery:
        exchange = await _start(nursery, app, _scope("POST", "/v1/threads", SMALL))
        await exchange.incoming_in.send({"type": "http.request", "body": BODY[:3], "more_body": True})
        await exchange.ended.wait()
    assert exchange.start["status"] == 408 and exchange.header(b"connection") == b"close"
    assert REQUEST_TIMEOUT <= exchange.ended_at < REQUEST_TIMEOUT + AT_ONCE


async def test_an_answer_after_the_whole_body_keeps_the_connection_and_ends_at_once(app, autojump_clock):
    async with trio.open_nursery() as nursery:
        exchange = await _start(nursery, app, _scope("POST", "/v1/threads", SMALL))
        await exchange.incoming_in.send({"type": "http.request", "body": BODY, "more_body": False})
        await exchange.ended.wait()
    assert exchange.start["status"] == 201 and exchange.header(b"connection") is None
    assert exchange.ended_at < AT_ONCE


async def test_a_request_without_a_body_is_never_held(app, autojump_clock):
    """No Content-Length and no Transfer-Encoding: an empty body (hypercorn still sends its one message)."""
    async with trio.open_nursery() as nursery:
        exchange = await _start(nursery, app, _scope("GET", "/health", []))
        await exchange.incoming_in.send({"type": "http.request", "body": b"", "more_body": False})
        await exchange.ended.wait()
    assert exchange.start["status"] == 200 and exchange.header(b"connection") is None
    assert exchange.ended_at < AT_ONCE
