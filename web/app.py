"""``create_app``: wires blueprints, auth, CORS and the error map around an open Runtime."""

from __future__ import annotations

from quart_trio import QuartTrio

from runtime import Runtime

from . import auth, cors, errors
from .routes import events, health, sessions, threads, turns
from . import openapi
from .settings import ServerSettings
from .sse import StreamRegistry


def create_app(rt: Runtime, settings: ServerSettings, token: str | None) -> QuartTrio:
    """``token`` None means no auth (only with ``--insecure-no-auth``)."""
    app = QuartTrio("trio_runtime")
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
