"""``create_app``: wires blueprints, auth, CORS and the error map around an open Runtime."""

from __future__ import annotations

import trio
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection

from runtime import Runtime

from . import auth, cors, errors
from .routes import events, health, sessions, threads, turns
from . import openapi
from .settings import ServerSettings
from .sse import StreamRegistry


class HTTPConnection(TrioASGIHTTPConnection):
    """quart-trio's HTTP connection, with every ``send`` to the server shielded from cancellation.

    hypercorn recycles a keep-alive connection (or closes it) inside the ``send`` of a response's last
    message, and that same step hands the app ``http.disconnect``, on which quart-trio cancels the
    request's nursery. The cancel used to land in the middle of the recycle: the keep-alive timer was
    never restarted (an idle client's connection stayed open for good), and a connection whose request
    body arrived after the response (a 401, 404 or 405 sent before the body was read) was neither closed
    nor reusable, so the client's next request on it hung. hypercorn already shields the socket write;
    what the shield adds is its bookkeeping, which does not block.
    """

    async def handle_request(self, nursery, request, send):  # type: ignore[override]
        async def send_whole(message):
            # Safe: bounded by the socket write under it, which web/server.py gives a deadline (the send
            # timeout, or the end of the grace at shutdown); a client that stopped reading is dropped.
            with trio.CancelScope(shield=True):
                await send(message)

        await super().handle_request(nursery, request, send_whole)


def create_app(rt: Runtime, settings: ServerSettings, token: str | None) -> QuartTrio:
    """``token`` None means no auth (only with ``--insecure-no-auth``)."""
    app = QuartTrio("trio_runtime")
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
    auth.install(app, token)
    errors.install(app)
    for module in (health, threads, turns, events, sessions, openapi):
        app.register_blueprint(module.bp)
    return app
