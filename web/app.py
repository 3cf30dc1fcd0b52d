"""``create_app``: wires blueprints, auth, CORS and the error map around an open Runtime."""

from __future__ import annotations

import math

import trio
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection

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

    async def handle_messages(self, nursery, request, receive):  # type: ignore[override]
        async def watch_receive():
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                self.body_received.set()
            return message

        await super().handle_messages(nursery, request, watch_receive)

    async def handle_request(self, nursery, request, send):  # type: ignore[override]
        wait_for_body = False

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
                    await send_whole({**message, "more_body": True})
                    message = {**message, "body": b""}
                # Not shielded: a cancel here means the client is gone (or the grace ran out), and then
                # there is no connection left to keep.
                with trio.move_on_after(self.app.config["BODY_TIMEOUT"] or math.inf):
                    await self.body_received.wait()
            # Safe: bounded by the socket write under it, which web/server.py gives a deadline (the send
            # timeout, or the end of the grace at shutdown); a client that stopped reading is dropped.
            with trio.CancelScope(shield=True):
                await send(message)

        await super().handle_request(nursery, request, send_whole)


def _says_close(headers) -> bool:  # type: ignore[no-untyped-def]
    return any(name.lower() == b"connection" and b"close" in value.lower() for name, value in headers)


def _small_body(headers) -> bool:  # type: ignore[no-untyped-def]
    """True if the request's body has a declared length of at most UNREAD_BODY_LIMIT (no length and no
    Transfer-Encoding is an empty body). A chunked body's length is unknown until its end."""
    length = 0
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding":
            return False
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return False
    return length <= UNREAD_BODY_LIMIT


def create_app(rt: Runtime, settings: ServerSettings, token: str | None) -> QuartTrio:
    """``token`` None means no auth (only with ``--insecure-no-auth``)."""
    # static_folder=None: Quart's own /static route served the folder 'static' under the working directory
    # the server was started from, to anyone, without the token. web/pages.py serves the package's files.
    app = QuartTrio("trio_runtime", static_folder=None)
    app.asgi_http_class = HTTPConnection
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
    cors.install(app, settings.cors_origins)
    auth.install(app, token, settings.cors_origins)
    errors.install(app)
    for module in (health, threads, turns, events, sessions, approvals, mcp, auth, openapi):
        app.register_blueprint(module.bp)
    pages.install(app)
    openapi.install(app)

    @app.after_serving
    async def close_forward_client() -> None:
        await forward.aclose(app)

    return app
