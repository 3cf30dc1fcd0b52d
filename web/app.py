"""``create_app``: wires blueprints, auth, CORS and the error map around an open Runtime."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import trio
from flask.json.provider import DefaultJSONProvider
from quart import Response
from quart.helpers import _split_blueprint_path
from quart.utils import encode_headers
from quart.wrappers.response import DataBody
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers.request import TrioRequest

from runtime import Runtime

from . import auth, cors, errors, forward, pages
from .routes import approvals, events, health, mcp, sessions, threads, turns
from . import openapi
from .settings import ServerSettings
from .sse import StreamRegistry


# A request body the app did not read (a 401, 404 or 405 is sent before it) is waited for, up to this
# declared size, so that the connection can serve the client's next request; past it the answer says
# Connection: close. Origin: Go's net/http server, which reads and discards up to 256 KiB of a body its
# handler left unread for the same reason (maxPostHandlerReadBytes). What is waited for is held in the
# request's body buffer until the request ends, so an unauthenticated client can make the server take
# at most this much, not --max-body.
UNREAD_BODY_LIMIT = 256 * 1024


class HTTPConnection(TrioASGIHTTPConnection):
    """quart-trio's HTTP connection, with every ``send`` to the server shielded from cancellation, and
    the end of a response held until the request body is in.

    Shielded sends: hypercorn recycles a keep-alive connection (or closes it) inside the ``send`` of a
    response's last message, and that same step hands the app ``http.disconnect``, on which quart-trio
    cancels the request's nursery. The cancel used to land in the middle of the recycle: the keep-alive
    timer was never restarted (an idle client's connection stayed open for good), and a connection whose
    request body arrived after the response was neither closed nor reusable, so the client's next request
    on it hung. hypercorn already shields the socket write; what the shield adds is its bookkeeping, which
    does not block.

    The end of a response: in that same last ``send``, hypercorn closes the connection if the request body
    is not all in yet, although the response did not say ``Connection: close``. A 401, 404 or 405 is sent
    before the body is read, and clients send the body just after the head, so the body was usually still
    on its way: the client got a keep-alive answer, the connection was closed under it, and a client that
    reused it before the close reached it had its next request dropped ("Server disconnected without
    sending a response"). So when the answer starts before the body is in, either the body is small
    (declared, at most UNREAD_BODY_LIMIT): the whole answer is sent at once but its end message waits for
    the body, up to the request timeout; or the answer says ``Connection: close``. If a small body does not
    come in time, the end is sent anyway and hypercorn closes the connection: its client still owes the
    rest of that request, so it has no other request on it. A cancelled wait (the client went away) sends
    no end; hypercorn ends the stream itself.
    """

    def __init__(self, app, scope) -> None:  # type: ignore[no-untyped-def]
        super().__init__(app, scope)
        self.body_received = trio.Event()  # hypercorn passed on the request body's last message
        if _declared_length(scope["headers"]) == 0:
            # A head that declares no body is the whole request: nothing of it can still be on its way.
            # Without this every GET waited for its empty body message, which quart-trio reads in a task of
            # its own that runs after the answer is ready (one more send and a task switch per request:
            # issue 16, the /health floor).
            self.body_received.set()

    async def __call__(self, receive, send) -> None:  # type: ignore[no-untyped-def, override]
        """quart-trio's, with the request handled in this task rather than a second child: the same
        nursery, so the same cancellation (a disconnect cancels the nursery, this body included) and the
        same errors (an exception here cancels ``handle_messages`` and leaves as an ExceptionGroup, as
        from a child), one task spawn less per request (issue 16, the /health floor)."""
        request = self._create_request_from_scope(send)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.handle_messages, nursery, request, receive)
            await self.handle_request(nursery, request, send)

    async def handle_messages(self, nursery, request, receive):  # type: ignore[override]
        if self.body_received.is_set():  # a request without a body: nothing to watch for
            await super().handle_messages(nursery, request, receive)
            return

        async def watch_receive():
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                self.body_received.set()
            return message

        await super().handle_messages(nursery, request, watch_receive)

    async def _send_response(self, send, response) -> None:  # type: ignore[no-untyped-def, override]
        """Quart's, except that a body of fixed bytes (every JSON answer) goes in one message that also ends
        the response, where Quart sends it with ``more_body`` and then an empty last message: one send, and
        one pass through hypercorn, less per request (issue 16, the /health floor). hypercorn writes the
        same bytes either way. Streamed bodies (SSE, pages) are Quart's own path."""
        body = getattr(response, "response", None)
        if type(body) is not DataBody:
            await super()._send_response(send, response)
            return
        start = {"type": "http.response.start", "status": response.status_code,
                 "headers": encode_headers(response.headers)}
        end = {"type": "http.response.body", "body": body.data[body.begin:body.end], "more_body": False}
        if self.body_received.is_set():
            # What ``send_whole`` does with each of the two messages once the request body is in (every
            # request without a body): send it shielded. One shielded scope for both instead of one each
            # (issue 16, the floor). Safe: bounded by the socket writes under it, which web/server.py gives a
            # deadline (the send timeout, or the end of the grace at shutdown).
            with trio.CancelScope(shield=True):
                await self._asgi_send(start)
                await self._asgi_send(end)
            return
        await send(start)
        await send(end)

    async def handle_request(self, nursery, request, send):  # type: ignore[override]
        wait_for_body = False
        self._asgi_send = send  # the server's own send, for _send_response

        async def send_shielded(message):
            # Safe: bounded by the socket write under it, which web/server.py gives a deadline (the send
            # timeout, or the end of the grace at shutdown); a client that stopped reading is dropped.
            with trio.CancelScope(shield=True):
                await send(message)

        # Not recursive (it used to call itself for the body of an answer that waits for its request's
        # body): a closure that refers to itself is a reference cycle, which kept this connection, hypercorn's
        # stream and its channels alive after every request until the cyclic garbage collector found them
        # (issue 16, the /health floor under load).
        async def send_whole(message):
            nonlocal wait_for_body
            if message["type"] == "http.response.start" and not self.body_received.is_set():
                if _says_close(message["headers"]):
                    pass  # its connection ends with it, read or not (413, 408)
                elif _small_body(self.scope["headers"]):
                    wait_for_body = True
                else:
                    message = {**message, "headers": [*message["headers"], (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False) and wait_for_body:
                if message.get("body"):
                    await send_shielded({**message, "more_body": True})
                    message = {**message, "body": b""}
                # Not shielded: a cancel here means the client is gone (or the grace ran out), and then
                # there is no connection left to keep.
                with trio.move_on_after(self.app.config["BODY_TIMEOUT"] or math.inf):
                    await self.body_received.wait()
            await send_shielded(message)

        await super().handle_request(nursery, request, send_whole)


def _says_close(headers) -> bool:  # type: ignore[no-untyped-def]
    return any(name.lower() == b"connection" and b"close" in value.lower() for name, value in headers)


def _small_body(headers) -> bool:  # type: ignore[no-untyped-def]
    """True if the request's body has a declared length of at most UNREAD_BODY_LIMIT."""
    length = _declared_length(headers)
    return length is not None and length <= UNREAD_BODY_LIMIT


def _declared_length(headers) -> int | None:  # type: ignore[no-untyped-def]
    """The body length the request's head declares: no length and no Transfer-Encoding is an empty body;
    None for a chunked body (its length is unknown until its end) or a Content-Length that is no number."""
    length = 0
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
    return length


class Request(TrioRequest):
    """quart-trio's request, with ``blueprints`` read from the matched rule's endpoint in one step.

    Quart reads ``request.blueprints`` six times per request (hooks, context processors, error handlers,
    URL defaults), each through ``blueprint`` and ``endpoint``, which read the endpoint twice more: ~40
    Python calls of every request in a blueprint, that is every route of ours (issue 16, the floor). The
    value is the same (Quart's cached ``_split_blueprint_path`` of the endpoint's blueprint part, the same
    list object), and it follows ``url_rule`` as Quart's does."""

    @property
    def blueprints(self) -> list[str]:
        rule = self.url_rule
        if rule is None:
            return []
        blueprint, dot, _ = rule.endpoint.rpartition(".")
        return _split_blueprint_path(blueprint) if dot else []


# What orjson hands to the provider's ``default`` instead of encoding itself: a date (Quart writes an HTTP
# date, orjson would write ISO 8601) and a dataclass (Quart uses dataclasses.asdict), so every answer has
# the same JSON as with Quart's own provider.
ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


class JSONProvider(DefaultJSONProvider):
    """Quart's JSON provider with orjson for ``jsonify``: every JSON answer, the small ones included, is
    encoded several times faster (issue 16: the /health floor and ``GET /v1/threads/{id}``). The same
    compact JSON and trailing newline, except that non-ASCII text is sent as UTF-8 rather than as ``\\u``
    escapes (the same JSON value). What orjson refuses (an integer beyond 64 bits, a non-string key) goes
    to the standard library as before."""

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        try:
            body = orjson.dumps(obj, default=self.default, option=ORJSON_OPTIONS | orjson.OPT_APPEND_NEWLINE)
        except TypeError:  # orjson.JSONEncodeError
            body = (json.dumps(obj, default=self.default, ensure_ascii=False, separators=(",", ":"))
                    + "\n").encode()
        return self._app.response_class(body, mimetype=self.mimetype)


# Distinct (host, path, method) answers StaticRoutes keeps: far more than the API's fixed paths times their
# methods and slash variants (~200), so that any number of clients cannot make it grow without end.
STATIC_ROUTES_LIMIT = 1024


class StaticRoutes:
    """werkzeug's route matcher (``Map._matcher``) with the answers for rules without variables remembered.

    Why: every request was routed by ``StateMachineMatcher.match``, which builds a recursive closure per
    call: a reference cycle of 8 objects per request left for the cyclic garbage collector, and the walk of
    the rule tree itself (issue 16, the floor under load). A rule without variables answers one path, so
    its match is a pure function of (host, path, method, websocket) while the rules stay the same: adding a
    rule forgets every answer. Only successful matches are kept; 404, 405 and redirects are werkzeug's every
    time, and each hit returns a new empty ``values`` dict (Quart's URL preprocessors may change it)."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher
        self._rules: dict[tuple[str, str, str, bool], Any] = {}

    @property
    def merge_slashes(self) -> bool:
        return self._matcher.merge_slashes

    @merge_slashes.setter
    def merge_slashes(self, value: bool) -> None:
        self._matcher.merge_slashes = value
        self._rules.clear()

    def add(self, rule: Any) -> None:
        self._rules.clear()
        self._matcher.add(rule)

    def update(self) -> None:
        self._rules.clear()
        self._matcher.update()

    def match(self, domain: str, path: str, method: str, websocket: bool) -> tuple[Any, dict[str, Any]]:
        key = (domain, path, method, websocket)
        rule = self._rules.get(key)
        if rule is not None:
            return rule, {}
        rule, values = self._matcher.match(domain, path, method, websocket)
        if not values and not rule.arguments and len(self._rules) < STATIC_ROUTES_LIMIT:
            self._rules[key] = rule
        return rule, values


def create_app(rt: Runtime, settings: ServerSettings, token: str | None) -> QuartTrio:
    """``token`` None means no auth (only with ``--insecure-no-auth``)."""
    # static_folder=None: Quart's own /static route served the folder 'static' under the working directory
    # the server was started from, to anyone, without the token. web/pages.py serves the package's files.
    app = QuartTrio("trio_runtime", static_folder=None)
    app.json = JSONProvider(app)
    app.asgi_http_class = HTTPConnection
    app.request_class = Request
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body,
        RESPONSE_TIMEOUT=None,  # SSE streams are long-lived; engine waits carry their own timeouts
        BODY_TIMEOUT=settings.request_timeout,
        JSON_SORT_KEYS=False,
        PROVIDE_AUTOMATIC_OPTIONS=False,
        TRIO_RUNTIME=rt,
        TRIO_RUNTIME_SETTINGS=settings,
        TRIO_RUNTIME_STREAMS=StreamRegistry(),
    )
    app.json.sort_keys = False
    app.url_map.strict_slashes = False
    app.url_map._matcher = StaticRoutes(app.url_map._matcher)  # before any rule: see StaticRoutes
    preflight = cors.install(app, settings.cors_origins)
    check_auth = auth.install(app, token, settings.cors_origins)

    # One hook for both, in this order (a preflight is answered before auth, which it never carries):
    # Quart pays for every before-request hook on every request (an inspect.iscoroutinefunction check and
    # a coroutine each), and most requests need neither (issue 16: the /health floor).
    @app.before_request
    async def guard():
        answer = preflight()
        return check_auth() if answer is None else answer

    errors.install(app)
    for module in (health, threads, turns, events, sessions, approvals, mcp, auth, openapi):
        app.register_blueprint(module.bp)
    pages.install(app)
    openapi.install(app)

    @app.after_serving
    async def close_forward_client() -> None:
        await forward.aclose(app)

    return app
