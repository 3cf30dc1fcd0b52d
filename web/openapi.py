"""``/openapi.json`` built from the route registry, and ``/docs``: Swagger UI over it, served from a pinned
package's files (no CDN)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from quart import Blueprint, current_app, jsonify

from runtime import __version__

from . import pages, sse
from .api import ROUTES, route
from .auth import STATE_CHANGING
from .schemas import PATH_PARAMS, ErrorResponse, json_schema, required_fields

bp = Blueprint("openapi", __name__)

ERROR_TEXT = {400: "Invalid input", 401: "Missing or wrong token",
              403: "Authenticated by the sign-in cookie, but the Origin is not this server's (forbidden_origin)",
              404: "Not found", 409: "Conflict with current state",
              412: "Revision precondition failed", 413: "Body too large",
              422: "Idempotency-Key already used for a different request", 500: "Storage or internal error",
              503: "Engine stopped", 504: "Timed out waiting for the engine",
              507: "The disk is full: nothing was written"}


def build_spec() -> dict[str, Any]:
    components: dict[str, Any] = {}
    error_ref = json_schema(ErrorResponse, components)
    paths: dict[str, Any] = {}
    for spec in ROUTES:
        op: dict[str, Any] = {"summary": spec.summary, "tags": [spec.tag],
                              "operationId": f"{spec.method.lower()}_{spec.path.strip('/').replace('/', '_')}"}
        params = [{"name": name, "in": "path", "required": True,
                   "schema": {"type": "string", "minLength": 1, **PATH_PARAMS.get(name, {})}}
                  for name in _path_params(spec.path)]
        for q in spec.query:
            schema: dict[str, Any] = {"type": q.kind}
            if q.enum:
                schema["enum"] = list(q.enum)
            if q.minimum is not None:
                schema["minimum"] = q.minimum
            if q.pattern is not None:
                schema["pattern"] = q.pattern
            # An empty value (``?sort=``) means "not given" for every query parameter.
            params.append({"name": q.name, "in": "query", "required": False, "description": q.description,
                           "allowEmptyValue": True, "schema": schema})
        for name, description, *pattern in spec.headers:
            params.append({"name": name, "in": "header", "required": False, "description": description,
                           "schema": {"type": "string", **({"pattern": pattern[0]} if pattern else {})}})
        if params:
            op["parameters"] = params
        if spec.body is not None:
            body_schema = json_schema(spec.body, components)
            # A body with nothing required may be left out, and JSON null counts as {} (see parse_body).
            needed = bool(required_fields(spec.body)) or getattr(spec.body, "at_least_one", False)
            if not needed:
                body_schema = {"anyOf": [body_schema, {"type": "null"}]}
            op["requestBody"] = {"required": needed, "content": {"application/json": {"schema": body_schema}}}
        ok: dict[str, Any] = {"description": "Success"}
        if spec.response is not None:
            # Several content types: the response schema is the first's; the others are text (an export
            # as Markdown, say).
            first, *others = (spec.content_type,) if isinstance(spec.content_type, str) else spec.content_type
            ok["content"] = {first: {"schema": json_schema(spec.response, components)},
                             **{other: {"schema": {"type": "string"}} for other in others}}
        elif spec.content_type == "text/event-stream":
            ok["content"] = {"text/event-stream": {"itemSchema": sse.item_schema(components)}}
        if spec.idempotent:
            ok["headers"] = {"Idempotent-Replayed": {
                "description": "true when this is the stored answer of an earlier request with the same "
                               "Idempotency-Key", "schema": {"type": "string", "enum": ["true"]}}}
        responses: dict[str, Any] = {str(spec.status): ok}
        codes = set(spec.errors) | ({413} if spec.body is not None else set())
        if 500 in codes:  # a route that can meet a storage failure can meet a full disk (StorageFull)
            codes.add(507)
        if not spec.public:
            codes.add(401)
            if spec.method in STATE_CHANGING:
                codes.add(403)  # the dashboard's cookie without this server's Origin (web/auth.py)
            op["security"] = [{"bearer": []}]
        for code in sorted(codes):
            responses[str(code)] = {"description": ERROR_TEXT.get(code, "Error"),
                                    "content": {"application/json": {"schema": error_ref}}}
        op["responses"] = responses
        paths.setdefault(spec.path, {})[spec.method.lower()] = op
    return {
        "openapi": "3.2.0",
        "info": {"title": "trio-runtime", "version": __version__,
                 "description": "Local agent runtime: threads, turns, items, events (SSE) and saved sessions."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


@route(bp, "/openapi.json", "GET", summary="This API's OpenAPI 3.2 description", public=True)
async def openapi_json():
    return jsonify(build_spec())


# Swagger UI's files, from the pinned package flask-swagger-ui (pyproject.toml): its dist/ folder, located
# without importing the package (its module imports Flask's blueprint machinery, which the server never uses).
SWAGGER_UI_DIR = Path(importlib.util.find_spec("flask_swagger_ui").submodule_search_locations[0]) / "dist"
# The page and its initializer (ours): web/apidocs/, package data like the dashboard's files.
APIDOCS_DIR = Path(__file__).with_name("apidocs")
# Swagger UI under the dashboard's policy: its script and styles are files of this origin; the React views
# set styles through the DOM (not inline style attributes in markup), and its icons are data: images.
DOCS_CSP = pages.CSP


def install(app) -> None:  # type: ignore[no-untyped-def]
    """The files /docs serves, read once (web/pages.py): Swagger UI's and ours (ours win a clash)."""
    app.config["TRIO_RUNTIME_DOCS"] = {**pages.load_dir(SWAGGER_UI_DIR), **pages.load_dir(APIDOCS_DIR)}


@route(bp, "/docs", "GET", summary="Interactive API explorer (Swagger UI) of /openapi.json", content_type="text/html",
       public=True)
async def docs():
    return await pages.serve_file(current_app.config["TRIO_RUNTIME_DOCS"], "index.html", csp=DOCS_CSP)


@bp.route("/docs/static/<path:name>", methods=["GET"])
async def docs_file(name: str):
    return await pages.serve_file(current_app.config["TRIO_RUNTIME_DOCS"], name, csp=DOCS_CSP)
