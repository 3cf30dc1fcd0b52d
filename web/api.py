"""Route registration that records each route's contract, plus body and query parsing.

``route`` registers a Quart view and remembers its method, path, body and response dataclasses so
``/openapi.json`` is generated from exactly what the routes validate with.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable

from quart import Blueprint, current_app, g, request

from runtime.errors import InvalidInput

from .schemas import parse_body


@dataclasses.dataclass(frozen=True)
class QueryParam:
    name: str
    kind: str  # "integer" | "boolean" | "string"
    description: str
    enum: tuple[str, ...] = ()
    minimum: int | None = None
    pattern: str | None = None  # a string's regular expression (every match must be accepted)


@dataclasses.dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str
    summary: str
    tag: str
    body: type | None
    response: Any
    status: int
    query: tuple[QueryParam, ...]
    errors: tuple[int, ...]
    content_type: str | tuple[str, ...] = "application/json"  # several: the response schema is the first's
    public: bool = False
    headers: tuple[tuple[str, ...], ...] = ()  # (name, description[, pattern])
    idempotent: bool = False  # takes an Idempotency-Key (web/idempotency.py); success may be a replay


ROUTES: list[RouteSpec] = []


def openapi_path(path: str) -> str:
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", path)


def route(bp: Blueprint, path: str, method: str, *, summary: str, body: type | None = None, response: Any = None,
          status: int = 200, query: tuple[QueryParam, ...] = (), errors: tuple[int, ...] = (),
          content_type: str | tuple[str, ...] = "application/json", public: bool = False,
          headers: tuple[tuple[str, ...], ...] = ()) -> Callable:
    def decorator(fn: Callable) -> Callable:
        prefix = bp.url_prefix or ""
        # A view wrapped by web.idempotency.idempotent documents its header and its 409/422 itself.
        extra_headers, extra_errors = getattr(fn, "openapi_headers", ()), getattr(fn, "openapi_errors", ())
        ROUTES.append(RouteSpec(method, openapi_path(prefix + path), summary, bp.name, body, response, status,
                                query, tuple(sorted({*errors, *extra_errors})), content_type, public,
                                (*headers, *extra_headers), idempotent=getattr(fn, "idempotent", False)))
        return bp.route(path, methods=[method])(fn)

    return decorator


async def read_body(cls: type) -> Any:
    """Decode and validate the JSON body. An empty body counts as ``{}``. Oversize bodies raise 413
    from Quart before they are read in full (Content-Length is checked first). A body the
    ``idempotent`` wrapper already read (to fingerprint it) is reused, never read twice."""
    raw = g.pop("raw_body", None)
    if raw is None:
        raw = await request.get_data(cache=False)
        g.request_body = raw  # kept for a forward to the thread's owner (web/forward.py)
    if not raw.strip():
        return parse_body(cls, {})
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"Malformed JSON body: {exc}") from exc
    except RecursionError as exc:
        raise InvalidInput("Malformed JSON body: nested too deeply") from exc
    return parse_body(cls, data)


def query_int(name: str, default: int | None = None) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise InvalidInput(f"Query parameter '{name}' must be an integer") from exc


def query_bool(name: str) -> bool:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return False
    lowered = raw.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise InvalidInput(f"Query parameter '{name}' must be true or false")


def settings():
    return current_app.config["TRIO_RUNTIME_SETTINGS"]


def runtime():
    return current_app.config["TRIO_RUNTIME"]


LIMIT = QueryParam("limit", "integer", "How many to return (default 50, clamped to 1..500)")
