"""What every request pays (issue 16, the /health floor), at the ASGI boundary on MockClock: a request
without a body does not wait for its empty body message, a JSON answer goes out as one body message that
ends the response, JSON answers are encoded by orjson with the same values as before, and a write to a
client is shielded from cancellation from outside while its deadline still bounds it (web/server.py).
"""

from __future__ import annotations

import datetime
import gc
import json

import pytest
import trio
import trio.testing
from hypercorn.events import Closed, RawData
from quart_trio.wrappers.request import TrioRequest
from werkzeug.routing import Rule

from tests.support import open_runtime
from tests.web.test_send_bounds import Client
from tests.web.test_unread_body import AT_ONCE, BODY, REQUEST_TIMEOUT, SMALL, TOKEN, Exchange, _scope
from web.app import STATIC_ROUTES_LIMIT, HTTPConnection, Request, StaticRoutes, create_app
from web.server import BoundedTCPServer, SendBounds, ServerConfig
from web.settings import ServerSettings


@pytest.fixture
async def app(tmp_path):
    async with open_runtime(tmp_path) as runtime:
        yield create_app(runtime, ServerSettings(data_dir=tmp_path, auth_token=TOKEN,
                                                 request_timeout=REQUEST_TIMEOUT), TOKEN)


async def _exchange(nursery: trio.Nursery, app, scope: dict) -> Exchange:
    exchange = Exchange()
    nursery.start_soon(app, scope, exchange.receive, exchange.send)
    await trio.testing.wait_all_tasks_blocked()
    return exchange


@pytest.mark.parametrize("headers", [[], [(b"content-length", b"0")]], ids=["no length", "length 0"])
async def test_a_request_without_a_body_is_answered_whole_without_its_body_message(app, headers, autojump_clock):
    # The empty http.request message is never delivered here: the head already said there is no body, so
    # nothing is waited for (before: the end of the answer waited for it, up to the request timeout).
    async with trio.open_nursery() as nursery:
        exchange = await _exchange(nursery, app, _scope("GET", "/health", headers))
        with trio.fail_after(1):
            await exchange.ended.wait()
        nursery.cancel_scope.cancel()
    assert exchange.ended_at < AT_ONCE
    assert exchange.start["status"] == 200 and exchange.header(b"connection") is None
    assert json.loads(exchange.body) == {"status": "ok", "service": "trio-runtime", "mode": "local"}


async def test_a_json_answer_is_one_body_message_that_ends_the_response(app, autojump_clock):
    async with trio.open_nursery() as nursery:
        exchange = await _exchange(nursery, app, _scope("GET", "/health", []))
        await exchange.incoming_in.send({"type": "http.request", "body": b"", "more_body": False})
        with trio.fail_after(1):
            await exchange.ended.wait()
        nursery.cancel_scope.cancel()
    body = b'{"status":"ok","service":"trio-runtime","mode":"local"}\n'
    assert [m["type"] for _, m in exchange.sent] == ["http.response.start", "http.response.body"]
    assert exchange.sent[1][1] == {"type": "http.response.body", "body": body, "more_body": False}
    assert exchange.header(b"content-length") == str(len(body)).encode()


async def test_a_json_answer_has_non_ascii_text_as_utf8_and_the_same_value(app, autojump_clock):
    title = "Grüße ✓ 日本 😀"
    body = json.dumps({"title": title}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    async with trio.open_nursery() as nursery:
        exchange = await _exchange(nursery, app, _scope("POST", "/v1/threads", headers))
        await exchange.incoming_in.send({"type": "http.request", "body": body, "more_body": False})
        with trio.fail_after(5):
            await exchange.ended.wait()
        nursery.cancel_scope.cancel()
    assert exchange.start["status"] == 201
    assert f'"title":"{title}"'.encode() in exchange.body  # UTF-8, not \\u escapes
    assert json.loads(exchange.body)["title"] == title
    assert exchange.header(b"content-type") == b"application/json"


async def _one_request(app, method, path, headers, auth):
    """One whole request through the app (its small body sent when it has headers for one); its exchange."""
    async with trio.open_nursery() as nursery:
        exchange = await _exchange(nursery, app, _scope(method, path, headers, auth=auth))
        if headers:
            await exchange.incoming_in.send({"type": "http.request", "body": BODY, "more_body": False})
        with trio.fail_after(1):
            await exchange.ended.wait()
    return exchange


@pytest.mark.parametrize("method,path,headers,auth,status", [
    ("GET", "/health", [], True, 200),
    ("POST", "/v1/threads", SMALL, False, 401),  # the answer whose end waits for the request's small body
], ids=["GET /health", "401 before its body"])
async def test_a_request_leaves_no_reference_cycle_behind(app, method, path, headers, auth, status, autojump_clock):
    # A request's connection object (and with it hypercorn's stream and channels) is freed by reference
    # counting when the request ends. Before, the closure that sends the answer referred to itself: every
    # request left a cycle of ~20 objects for the cyclic collector (31 garbage objects per /health request
    # against the bare quart-trio app's 10), whose collections cost most under load (issue 16, the floor).
    gc.collect()
    gc.disable()  # only what reference counting frees is gone after the request
    try:
        exchange = await _one_request(app, method, path, headers, auth)
        left = [type(o).__name__ for o in gc.get_objects() if isinstance(o, HTTPConnection)]
    finally:
        gc.enable()
    assert exchange.start["status"] == status
    assert left == []


@pytest.mark.parametrize("method,path,headers,auth,status", [
    ("GET", "/health", [], True, 200),
    ("POST", "/v1/threads", SMALL, False, 401),
    ("GET", "/v1/threads", [], True, 200),
], ids=["GET /health", "401 before its body", "GET /v1/threads"])
async def test_a_request_to_a_path_without_variables_leaves_no_garbage(app, method, path, headers, auth, status,
                                                                       autojump_clock):
    # werkzeug's matcher builds a recursive closure on every match: 8 objects of cyclic garbage per request
    # (the bare quart-trio app pays them too). A path without variables is routed once (web/app.py
    # StaticRoutes); the requests after the first leave nothing for the cyclic collector.
    for attempt in ("first", "second"):
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage, not freed
        try:
            exchange = await _one_request(app, method, path, headers, auth)
            gc.collect()
            garbage = [type(o).__name__ for o in gc.garbage]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert exchange.start["status"] == status
    assert garbage == []


ROUTED = [("GET", "/health"), ("GET", "/health/"), ("GET", "/v1/threads"), ("POST", "/v1/threads"),
          ("GET", "/v1/threads/t1"), ("PATCH", "/v1/threads/t1"), ("GET", "/v1/threads/t1/events"),
          ("DELETE", "/health"), ("GET", "/v1/nothing"), ("GET", "/"), ("GET", "/openapi.json"),
          ("PUT", "/v1/sessions/s1"), ("GET", "/v1/sessions"), ("OPTIONS", "/v1/threads")]


def _route(adapter, method: str, path: str) -> tuple:
    try:
        rule, values = adapter.match(path, method, return_rule=True)
    except Exception as exc:  # werkzeug's NotFound, MethodNotAllowed, RequestRedirect
        return type(exc).__name__, getattr(exc, "code", None)
    values["changed"] = True  # Quart's URL preprocessors may change the dict: the next answer is unaffected
    return rule.rule, rule.endpoint, sorted(rule.methods or ()), {k: v for k, v in values.items() if k != "changed"}


async def test_paths_without_variables_are_routed_as_werkzeug_routes_them(app):
    # The same answers as werkzeug's own matcher, 404, 405 and variable paths included, asked twice (the
    # second time from what StaticRoutes kept for paths without variables).
    assert isinstance(app.url_map._matcher, StaticRoutes)
    plain = app.url_map._matcher._matcher
    ours = app.url_map.bind("127.0.0.1")
    expected = []
    app.url_map._matcher = plain
    try:
        expected = [_route(app.url_map.bind("127.0.0.1"), m, p) for m, p in ROUTED]
    finally:
        app.url_map._matcher = ours.map._matcher = StaticRoutes(plain)
    for _ in range(2):
        assert [_route(ours, m, p) for m, p in ROUTED] == expected
    assert expected[0] == ("/health", "health.health", ["GET", "HEAD"], {})
    assert expected[4][3] == {"thread_id": "t1"} and expected[8] == ("NotFound", 404)
    assert expected[7] == ("MethodNotAllowed", 405)
    # Kept: the successful matches of paths without variables, nothing else.
    assert sorted(k[1:3] for k in app.url_map._matcher._rules) == [
        ("/", "GET"), ("/health", "GET"), ("/health/", "GET"), ("/openapi.json", "GET"), ("/v1/sessions", "GET"),
        ("/v1/threads", "GET"), ("/v1/threads", "POST")]


def test_static_routes_forget_their_answers_when_a_rule_is_added_and_stay_bounded():
    from werkzeug.routing import Map, Rule

    url_map = Map([Rule("/a", endpoint="a")], strict_slashes=False)
    url_map._matcher = StaticRoutes(url_map._matcher)
    adapter = url_map.bind("127.0.0.1")
    assert adapter.match("/a", "GET", return_rule=True)[0].endpoint == "a"
    assert len(url_map._matcher._rules) == 1
    url_map.add(Rule("/b", endpoint="b"))
    assert url_map._matcher._rules == {}
    assert url_map.bind("127.0.0.1").match("/b", "GET", return_rule=True)[0].endpoint == "b"
    assert STATIC_ROUTES_LIMIT == 1024
    for i in range(STATIC_ROUTES_LIMIT + 10):
        url_map.add(Rule(f"/p{i}", endpoint=f"p{i}"))
    adapter = url_map.bind("127.0.0.1")
    for i in range(STATIC_ROUTES_LIMIT + 10):
        assert adapter.match(f"/p{i}", "GET", return_rule=True)[0].endpoint == f"p{i}"
    assert len(url_map._matcher._rules) == STATIC_ROUTES_LIMIT


async def test_the_json_provider_keeps_quarts_output_for_what_orjson_would_write_otherwise(app):
    async with app.app_context():
        big = app.json.response({"n": 2**70, "neg": -(2**65)})
        assert await big.get_data() == b'{"n":1180591620717411303424,"neg":-36893488147419103232}\n'
        when = app.json.response({"at": datetime.datetime(2026, 12, 3, 6, 0, tzinfo=datetime.timezone.utc)})
        assert await when.get_data() == b'{"at":"Thu, 03 Dec 2026 06:00:00 GMT"}\n'
        keys = app.json.response({1: "a"})  # a non-string key: the standard library turns it into "1"
        assert await keys.get_data() == b'{"1":"a"}\n'


async def test_a_write_is_shielded_from_a_cancel_from_outside_but_not_from_its_deadline(autojump_clock):
    bounds, client = SendBounds(10.0), Client()
    results: list[tuple[bool, float]] = []

    async def write(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as outer:
            task_status.started(outer)
            results.append((await bounds.send_all(client, b"frame"), trio.current_time()))
            await trio.sleep(0)  # where the cancel from outside lands: after the whole write
            results.append((None, -1))  # never reached

    async with trio.open_nursery() as nursery:
        outer = await nursery.start(write)
        await trio.sleep(1.0)
        outer.cancel()  # e.g. the client disconnected; the write must not stop half-way
        await trio.sleep(1.0)
        client.permits_in.send_nowait(None)
    assert results == [(True, 2.0)] and client.taken == [(2.0, 5)]
    # The deadline still cuts a write that is shielded: a client that takes nothing is given up at 10 s.
    with trio.CancelScope() as outer:
        outer.cancel()
        assert await bounds.send_all(client, b"frame") is False
    assert trio.current_time() == 12.0 and bounds._waiting == set()


async def test_an_empty_write_to_a_closed_socket_still_raises():
    # hypercorn relies on send_all(b"") raising on a closed socket (web/server.py's fast path for b"").
    a, b = trio.socket.socketpair()
    stream = trio.SocketStream(a)
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await SendBounds(10.0).send_all(stream, b"")
    b.close()
    c, d = trio.socket.socketpair()
    with c, d:
        assert await SendBounds(10.0).send_all(trio.SocketStream(c), b"") is True


def test_a_body_class_has_its_type_hints_resolved_once_not_per_request(monkeypatch):
    """parse_body answers from hints made once per class (web/schemas._body_fields): resolving them again on
    every request cost ~1.5% of the main thread (issue 16). The answers stay the same, errors included."""
    import typing

    from runtime.errors import InvalidInput
    from web import schemas

    schemas._body_fields.cache_clear()
    calls = []
    real = typing.get_type_hints
    monkeypatch.setattr(typing, "get_type_hints", lambda cls, *a, **k: calls.append(cls) or real(cls, *a, **k))
    for i in range(5):
        parsed = schemas.parse_body(schemas.UpdateThreadBody, {"title": f"t{i}"})
        assert parsed.title == f"t{i}"
    with pytest.raises(InvalidInput, match="Unknown field 'nope'"):
        schemas.parse_body(schemas.UpdateThreadBody, {"nope": 1})
    assert calls == [schemas.UpdateThreadBody]


async def test_a_json_answer_to_a_request_without_a_body_is_sent_under_one_shielded_scope(app, monkeypatch,
                                                                                         autojump_clock):
    # Each of the two messages went under a shielded scope of its own; once the request body is in, both go
    # under one (issue 16, the floor: a scope costs ~30 Python calls). Still shielded: see the test above.
    real, shields = trio.CancelScope, []
    monkeypatch.setattr(trio, "CancelScope", lambda *a, **k: shields.append(k.get("shield", False)) or real(*a, **k))
    exchange = await _one_request(app, "GET", "/health", [], True)
    monkeypatch.undo()
    assert exchange.start["status"] == 200 and json.loads(exchange.body)["status"] == "ok"
    assert [m["type"] for _, m in exchange.sent] == ["http.response.start", "http.response.body"]
    assert shields.count(True) == 1


def _endpoint_request(endpoint: str | None) -> Request:
    request = Request.__new__(Request)  # only url_rule is read
    request.url_rule = None if endpoint is None else Rule("/x", endpoint=endpoint)
    return request


@pytest.mark.parametrize("endpoint", [None, "health.health", "threads.get_thread", "plain", "a.b.c", ".x", "a."])
def test_a_requests_blueprints_are_quarts_own_read_in_one_step(endpoint):
    # Quart computes request.blueprints through request.blueprint and request.endpoint, six times per request;
    # ours reads the rule's endpoint once and must give the same list (the same cached object).
    request = _endpoint_request(endpoint)
    quarts = TrioRequest.blueprints.fget(request)
    assert request.blueprints == quarts and (request.blueprints is quarts or quarts == [])
    assert request.blueprints == {None: [], "health.health": ["health"], "threads.get_thread": ["threads"],
                                  "plain": [], "a.b.c": ["a.b", "a"], ".x": [""], "a.": ["a"]}[endpoint]


async def test_the_app_builds_its_requests_with_blueprints_read_in_one_step(app):
    assert app.request_class is Request
    for rule in app.url_map.iter_rules():
        request = _endpoint_request(rule.endpoint)
        assert request.blueprints == TrioRequest.blueprints.fget(request)


class _Protocol:
    def __init__(self) -> None:
        self.events: list = []

    async def handle(self, event) -> None:  # type: ignore[no-untyped-def]
        self.events.append(event)


def _tcp_server(stream, read_timeout=None) -> BoundedTCPServer:  # type: ignore[no-untyped-def]
    config = ServerConfig()
    config.send_bounds, config.read_timeout = SendBounds(10.0), read_timeout
    server = BoundedTCPServer(None, config, None, None, stream)  # type: ignore[arg-type]
    server.protocol = _Protocol()  # type: ignore[assignment]
    return server


def _events(server: BoundedTCPServer) -> list:
    return [(type(e).__name__, getattr(e, "data", None)) for e in server.protocol.events]  # type: ignore[attr-defined]


async def test_the_empty_end_of_a_response_is_no_write_yet_a_gone_client_still_ends_the_connection():
    # h11 ends a fixed-length body with no bytes: the write of b"" took the send lock, a shielded scope and a
    # checkpoint on every request. Now nothing, unless the socket is closed or shut down for writing: then
    # hypercorn's protocol is told the connection is gone, as the write's ClosedResourceError led to before.
    a, b = trio.socket.socketpair()
    with b:
        server = _tcp_server(trio.SocketStream(a))
        with trio.testing.assert_no_checkpoints():
            await server.protocol_send(RawData(b""))
        assert _events(server) == []
        await server.stream.send_eof()
        await server.protocol_send(RawData(b""))
        assert _events(server) == [("Closed", None)]
        await server.stream.aclose()
        await server.protocol_send(RawData(b""))
        assert _events(server) == [("Closed", None), ("Closed", None)]
    # A write that waits holds the lock: the end waits for it (hypercorn's order), through the write path.
    c, d = trio.socket.socketpair()
    with c, d:
        server = _tcp_server(trio.SocketStream(c))
        release, ended = trio.Event(), trio.Event()

        async def hold() -> None:
            async with server.send_lock:
                await release.wait()

        async def end() -> None:
            await server.protocol_send(RawData(b""))
            ended.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(end)
            await trio.testing.wait_all_tasks_blocked()
            assert not ended.is_set()
            release.set()
        assert ended.is_set() and _events(server) == []


async def test_reads_without_a_read_timeout_enter_no_scope_and_with_one_keep_hypercorns(monkeypatch):
    # hypercorn entered fail_after(read_timeout or inf) around every read: a scope (and a context manager)
    # per request that can never fire when there is no read timeout, as in our config.
    real, timeouts = trio.fail_after, []
    monkeypatch.setattr(trio, "fail_after", lambda seconds: timeouts.append(seconds) or real(seconds))
    for read_timeout in (None, 30):
        a, b = trio.socket.socketpair()
        with b:
            server = _tcp_server(trio.SocketStream(a), read_timeout)
            await b.send(b"GET / HTTP/1.1\r\n\r\n")
            b.shutdown(trio.socket.SHUT_WR)
            await server._read_data()
            await server.stream.aclose()
        assert _events(server) == [("RawData", b"GET / HTTP/1.1\r\n\r\n"), ("RawData", b""), ("Closed", None)]
    assert timeouts == [30, 30]  # only hypercorn's loop, with a read timeout: one per read


async def test_a_keep_alive_connection_is_read_only_once_it_has_bytes(monkeypatch):
    # The next request of a keep-alive connection is never there right after an answer: reading first was one
    # recv that failed with EAGAIN (and an exception inside trio) per request. The read loop waits until the
    # socket is readable, so every read it makes finds bytes (or the end): checked with a real select().
    import select

    ready_at_read: list[bool] = []
    receive_some = trio.SocketStream.receive_some

    async def recording(stream, max_bytes=None):
        ready_at_read.append(bool(select.select([stream.socket.fileno()], [], [], 0)[0]))
        return await receive_some(stream, max_bytes)

    monkeypatch.setattr(trio.SocketStream, "receive_some", recording)
    a, b = trio.socket.socketpair()
    with b:
        server = _tcp_server(trio.SocketStream(a))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._read_data)
            for request in (b"GET /1 HTTP/1.1\r\n\r\n", b"GET /2 HTTP/1.1\r\n\r\n"):
                await trio.testing.wait_all_tasks_blocked()  # the loop waits for the next request
                await b.send(request)
            await trio.testing.wait_all_tasks_blocked()
            b.shutdown(trio.socket.SHUT_WR)
        await server.stream.aclose()
    assert _events(server) == [("RawData", b"GET /1 HTTP/1.1\r\n\r\n"), ("RawData", b"GET /2 HTTP/1.1\r\n\r\n"),
                               ("RawData", b""), ("Closed", None)]
    assert ready_at_read == [True, True, True]
