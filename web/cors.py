"""CORS: off by default; ``--cors-origin`` allows exactly the listed origins, preflight included."""

from __future__ import annotations

from typing import Callable

from quart import Quart, Response, request

from .errors import error_response

ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, If-Match, Last-Event-ID, Idempotency-Key"
EXPOSE_HEADERS = "ETag, Idempotent-Replayed"
PREFLIGHT_MAX_AGE = "600"  # seconds a browser may cache a preflight answer


def install(app: Quart, origins: tuple[str, ...]) -> Callable[[], Response | None]:
    """Returns the preflight check, which web/app.py runs in its one before-request hook (each hook Quart
    runs costs every request, ``/health`` included: issue 16). The after-request hook that adds
    ``Access-Control-Allow-Origin`` is installed only when there are origins to allow: without any it never
    added anything."""
    allowed = frozenset(origins)

    def preflight() -> Response | None:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        origin = request.headers.get("Origin")
        if origin not in allowed:
            return error_response(403, "forbidden", f"Origin {origin!r} is not allowed (see --cors-origin)")
        response = Response("", status=204)
        response.headers.update({
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
            "Vary": "Origin",
        })
        return response

    if not allowed:
        return preflight

    @app.after_request
    async def allow_origin(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin is not None and origin in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
            response.headers["Vary"] = "Origin"
        return response

    return preflight
