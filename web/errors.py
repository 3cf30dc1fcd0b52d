"""The one map from runtime errors (and Quart's own HTTP errors) to HTTP statuses and JSON bodies.

Every error a client can see is ``{"error": {"status", "code", "message"}}``. Anything unmapped is a
500 with a generic message; its details go to the log only (never secrets or file contents).
"""

from __future__ import annotations

import logging

from quart import Quart, Response, jsonify
from werkzeug.exceptions import HTTPException

from runtime import errors as rt

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[rt.RuntimeFailure], int] = {
    rt.NotFound: 404,
    rt.InvalidInput: 400,
    rt.InvalidData: 400,
    rt.Conflict: 409,
    rt.PreconditionFailed: 412,
    rt.IdempotencyKeyReused: 422,  # the key already answered a different request
    rt.PayloadTooLarge: 413,
    rt.StorageError: 500,
    rt.StorageFull: 507,  # RFC 4918 Insufficient Storage: the disk is full, nothing was written
    rt.EngineUnavailable: 503,
    rt.EngineTimeout: 504,
    rt.NotOwner: 503,  # only when forwarding is impossible (web/forward.py)
}

# Codes for HTTP errors raised by Quart/Werkzeug before a route runs.
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large",
              415: "unsupported_media_type", 422: "unprocessable_entity", 500: "internal"}


def error_response(status: int, code: str, message: str) -> Response:
    response = jsonify({"error": {"status": status, "code": code, "message": message}})
    response.status_code = status
    return response


def status_for(exc: rt.RuntimeFailure) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def install(app: Quart) -> None:
    @app.errorhandler(rt.NotOwner)
    async def not_owner(exc: rt.NotOwner) -> Response:
        # Several hosts on one PostgreSQL: served by the thread's owner (forwarded), or here after a takeover.
        from .forward import not_owner as forward

        return await forward(exc)

    @app.errorhandler(rt.RuntimeFailure)
    async def runtime_failure(exc: rt.RuntimeFailure) -> Response:
        status = status_for(exc)
        if status >= 500:
            log.error("%s: %s", type(exc).__name__, exc.message, exc_info=exc.__cause__ is not None)
        return error_response(status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = {404: "No such route", 405: "Method not allowed for this route",
                   413: "Request body is larger than the configured limit"}.get(status, exc.description or exc.name)
        response = error_response(status, HTTP_CODES.get(status, "http_error"), message)
        if status in (408, 413):
            # The rest of the body is never read (too slow, or too big), so this connection cannot carry
            # another request.
            response.headers["Connection"] = "close"
        if status == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return error_response(500, "internal", "Internal server error")
