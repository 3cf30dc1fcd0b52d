from __future__ import annotations

from typing import AsyncIterator

from quart import Blueprint, Response, g, jsonify, request
from werkzeug.routing import PathConverter

from runtime import codec
from runtime.core import clamp_limit
from runtime.errors import InvalidInput

from ..api import LIMIT, QueryParam, query_bool, query_int, read_body, route, runtime, settings
from ..idempotency import claim, idempotent, respond
from ..schemas import (
    ImportResult, PatchSessionBody, PatchSessionResult, RebuildSessionBody, RebuildSessionResult, ResumeResult,
    ResumeSessionBody, SaveSessionBody, SaveSessionResult, SessionDocument, SessionList,
)

bp = Blueprint("sessions", __name__, url_prefix="/v1/sessions")
# Ids are matched as paths so that an id with an (encoded) slash reaches validate_session_id and gets
# a clear 400, instead of falling through to "no such route".
IF_MATCH = (("If-Match", "Optional revision precondition, e.g. \"3\" (412 when it differs)",
             r'^[ \t]*(\*|(W/)?"*[0-9]+"*)[ \t]*$'),)


# A response up to this size is joined into one body: each chunk is its own trip through quart, hypercorn,
# h11 and a socket write (~0.1 ms of the event loop each, profiled under row 3 of ``make bench``, where a
# 20-message PUT answer was three chunks), while joining 256 KiB is a ~20 µs copy. Bigger ones (a saved 12 MB
# session) go chunk by chunk, so the loop never copies megabytes in one call.
JOIN_BELOW = 256 * 1024


class SessionIdConverter(PathConverter):
    """A path (slashes included, for the 400 above) that does not end in ``/resume-thread`` or
    ``/export``: those URLs belong to the POST-only resume route and the GET-only export route, so
    a GET of ``x/export`` reaches the export and PATCH/DELETE on either is 405, not a bad id."""

    regex = r"[^/].*?(?<!/resume-thread)(?<!/export)"


bp.record_once(lambda state: state.app.url_map.converters.setdefault("session_id", SessionIdConverter))


def _json_around(fields: dict, key: str, raw: bytes) -> list[bytes]:
    """The chunks of ``fields`` as a JSON object with ``key`` set to ``raw``: JSON bytes spliced in as
    they are, never decoded and encoded again (a saved session's file is megabytes), and never copied
    into one buffer either (joining 12 MB held the event loop for ~20 ms)."""
    head = codec.dumps({name: value for name, value in fields.items() if name != key})
    return [head[:-1] + (b"," if len(head) > 2 else b"") + codec.dumps(key) + b":", raw, b"}"]


def _json_response(chunks: list[bytes], revision: int) -> Response:
    """A JSON response with its Content-Length and ETag: one body when it is small (JOIN_BELOW), else sent
    chunk by chunk, each one as it is."""
    size = sum(len(chunk) for chunk in chunks)
    if size <= JOIN_BELOW:
        response = Response(b"".join(chunks), content_type="application/json")
    else:
        async def body() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        response = Response(body(), content_type="application/json")
        response.headers["Content-Length"] = str(size)
    response.headers["ETag"] = f'"{revision}"'
    return response


def _if_match() -> int | str | None:
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    value = raw.strip(" \t")  # HTTP's optional whitespace
    if value == "*":
        return "*"
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"')
    # isascii: str.isdigit also accepts digits such as '²' that int() refuses.
    if not (value.isascii() and value.isdigit()):
        raise InvalidInput('If-Match must be a session revision such as "3"')
    return int(value)


@route(bp, "", "PUT", summary="Save a thread's live engine state as a session (create or update in place)",
       body=SaveSessionBody, response=SaveSessionResult, errors=(400, 404, 409, 412, 500, 503, 504), headers=IF_MATCH)
@idempotent
async def save_session():
    body = await read_body(SaveSessionBody)
    # With a key, the answer's bytes are joined once, in the commit's writer thread, and stored.
    made = claim(200, lambda r: b"".join(_json_around(r, "session", r["session"].encoded)),
                 headers_of=lambda r: {"ETag": f'"{r["session"]["metadata"]["revision"]}"'})
    result = await runtime().sessions.save(thread_id=body.thread_id, session_id=body.session_id,
                                           wait_for_idle=body.wait_for_idle, if_match=_if_match(),
                                           timeout=settings().request_timeout, claim=made)
    if made is not None and made.body is not None:
        return respond(made, None, 200)
    session = result["session"]
    # The session part of the answer is the file's own bytes, encoded once, in the commit's thread.
    return _json_response(_json_around(result, "session", session.encoded), session["metadata"]["revision"])


@route(bp, "", "POST", summary="Rebuild a new session from a thread's stored turn items",
       body=RebuildSessionBody, response=RebuildSessionResult, status=201, errors=(400, 404, 409, 500))
@idempotent
async def rebuild_session():
    body = await read_body(RebuildSessionBody)
    made = claim(201)
    result = await runtime().sessions.rebuild(thread_id=body.thread_id, title=body.title,
                                              timeout=settings().request_timeout, claim=made)
    return respond(made, result, 201)


@route(bp, "", "GET", summary="List saved sessions", response=SessionList,
       query=(LIMIT, QueryParam("search", "string", "Case-insensitive match on title and message text"),
              QueryParam("include_archived", "boolean", "Include archived sessions"),
              QueryParam("archived_only", "boolean", "Only archived sessions"),
              QueryParam("sort", "string", "Order", enum=("recent", "name", "size"))), errors=(400,))
async def list_sessions():
    sessions = await runtime().sessions.list(
        limit=clamp_limit(query_int("limit")), search=request.args.get("search") or None,
        include_archived=query_bool("include_archived"), archived_only=query_bool("archived_only"),
        sort=request.args.get("sort") or "recent")
    return jsonify({"sessions": sessions})


@route(bp, "/<session_id:session_id>", "GET", summary="A saved session (ETag: its revision)", response=SessionDocument,
       errors=(400, 404, 500))
async def get_session(session_id: str):
    # The file's bytes as they are (validated when the index cannot vouch for them): never decoded
    # and encoded again on the event loop. The body also carries the file's schema_version.
    data, revision = await runtime().sessions.read_document(session_id)
    return _json_response([data], revision)


@route(bp, "/<session_id:session_id>", "PATCH", summary="Rename or (un)archive a session", body=PatchSessionBody,
       response=PatchSessionResult, errors=(400, 404, 409, 412, 500), headers=IF_MATCH)
async def patch_session(session_id: str):
    body = await read_body(PatchSessionBody)
    result = await runtime().sessions.patch(session_id, title=body.title, archived=body.archived,
                                            if_match=_if_match(), timeout=settings().request_timeout)
    response = jsonify(result)
    response.headers["ETag"] = f'"{result["session"]["revision"]}"'
    return response


@route(bp, "/<session_id:session_id>", "DELETE", summary="Delete a session", status=204, errors=(400, 404, 409, 500))
async def delete_session(session_id: str):
    await runtime().sessions.delete(session_id, timeout=settings().request_timeout)
    return Response("", status=204)


@route(bp, "/<path:session_id>/resume-thread", "POST", summary="Start a new thread from a session's messages",
       body=ResumeSessionBody, response=ResumeResult, status=201, errors=(400, 404, 409, 500))
@idempotent
async def resume_thread(session_id: str):
    body = await read_body(ResumeSessionBody)
    made = claim(201)
    result = await runtime().sessions.resume(session_id, model=body.model, mode=body.mode,
                                             timeout=settings().request_timeout, claim=made)
    return respond(made, result, 201)


@route(bp, "/<path:session_id>/export", "GET", summary="Download a session as JSON (the stored document) or Markdown",
       query=(QueryParam("format", "string", "json (default): the stored document; markdown: a readable transcript",
                         enum=("json", "markdown")),),
       response=SessionDocument, content_type=("application/json", "text/markdown"), errors=(400, 404, 500))
async def export_session(session_id: str):
    data, content_type, filename = await runtime().sessions.export(
        session_id, request.args.get("format") or "json")
    response = Response(data, content_type=content_type)
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# A static segment, so werkzeug ranks it before ``/<session_id>``: only POST /v1/sessions/import is the
# import; GET, PATCH and DELETE of that URL still address a session called "import" (registered below,
# so that /openapi.json and a 405's ``Allow`` say the same about that URL).
@route(bp, "/import", "POST", summary="Import a session document (as a json export gives it) as a new session",
       query=(QueryParam("id", "string", "Import under this id instead of the document's metadata.id"),),
       body=SessionDocument, response=ImportResult, status=201, errors=(400, 409, 500))
@idempotent
async def import_session():
    # The body is decoded and checked in a worker thread (up to the server's body limit, 8 MiB by
    # default), never on the event loop; read_body is for small bodies. ``idempotent`` has read it.
    data = g.pop("raw_body", None)
    if data is None:
        data = await request.get_data(cache=False)
        g.request_body = data  # kept for a forward to the thread's owner (web/forward.py)
    made = claim(201)
    result = await runtime().sessions.import_document(data, session_id=request.args.get("id") or None,
                                                      timeout=settings().request_timeout, claim=made)
    return respond(made, result, 201)


SESSION_CALLED_IMPORT = "import"


@route(bp, "/import", "GET", summary='The session called "import" (as GET /v1/sessions/{session_id})',
       response=SessionDocument, errors=(400, 404, 500))
async def get_session_called_import():
    return await get_session(SESSION_CALLED_IMPORT)


@route(bp, "/import", "PATCH", summary='Rename or (un)archive the session called "import"', body=PatchSessionBody,
       response=PatchSessionResult, errors=(400, 404, 409, 412, 500), headers=IF_MATCH)
async def patch_session_called_import():
    return await patch_session(SESSION_CALLED_IMPORT)


@route(bp, "/import", "DELETE", summary='Delete the session called "import"', status=204,
       errors=(400, 404, 409, 500))
async def delete_session_called_import():
    return await delete_session(SESSION_CALLED_IMPORT)
