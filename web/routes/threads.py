from __future__ import annotations

from quart import Blueprint, Response, jsonify, request

from runtime.store.records import TURNS_CURSOR_PATTERN

from ..api import LIMIT, QueryParam, query_bool, query_int, read_body, route, runtime, settings
from ..idempotency import claim, idempotent, respond
from ..schemas import (
    CreateThreadBody, ForkBody, ForkResult, RestoreBody, RestoreResult, RetryBody, RewindBody, RewindResult,
    ThreadDetail, ThreadRecord, TurnRecord, UpdateThreadBody, provided,
)
from .sessions import IF_MATCH, _if_match

bp = Blueprint("threads", __name__, url_prefix="/v1/threads")
HISTORY_ERRORS = (400, 404, 409, 500, 503, 504, 507)
IF_BUSY_QUERY = QueryParam("if_busy", "string", "A queued or running turn: reject (409) or interrupt it first",
                           enum=("reject", "interrupt"))


@route(bp, "", "POST", summary="Create a thread (with the caller's id when given: 409 if taken)",
       body=CreateThreadBody, response=ThreadRecord, status=201, errors=(400, 409, 500))
@idempotent
async def create_thread():
    fields = provided(await read_body(CreateThreadBody))
    thread_id = fields.pop("id", None)
    made = claim(201)
    record = await runtime().create_thread(**fields, thread_id=thread_id, claim=made)
    return respond(made, record, 201)


@route(bp, "", "GET", summary="List threads, most recently updated first", response=list[ThreadRecord],
       query=(LIMIT, QueryParam("include_archived", "boolean", "Include archived threads"),
              QueryParam("archived_only", "boolean", "Only archived threads")), errors=(400,))
async def list_threads():
    threads = await runtime().list_threads(limit=query_int("limit"), include_archived=query_bool("include_archived"),
                                           archived_only=query_bool("archived_only"))
    return jsonify(threads)


@route(bp, "/<thread_id>", "GET", summary="A thread with a page of its turns (default the latest), their items"
       " and the latest event seq", response=ThreadDetail,
       query=(QueryParam("include_rewound", "boolean", "Also list rewound turns and their items (rewound: true)"),
              QueryParam("turns_limit", "integer", "Turns per page (default 20, clamped to 1..1000)"),
              QueryParam("before", "string", "A page.next_before cursor: the turns before that page",
                         pattern=TURNS_CURSOR_PATTERN)),
       errors=(400, 404))
async def get_thread(thread_id: str):
    # The encoded answer (kept while the database is unchanged: runtime/threads_detail.py), with the newline
    # that jsonify ends every JSON answer with.
    body = await runtime().get_thread_json(
        thread_id, include_rewound=query_bool("include_rewound"), turns_limit=query_int("turns_limit"),
        before=request.args.get("before") or None)
    return Response(body + b"\n", content_type="application/json")


@route(bp, "/<thread_id>", "PATCH", summary="Update a thread (at least one field)", body=UpdateThreadBody,
       response=ThreadRecord, errors=(400, 404, 500, 503, 504))
async def update_thread(thread_id: str):
    body = await read_body(UpdateThreadBody)
    record = await runtime().update_thread(thread_id, provided(body), timeout=settings().request_timeout)
    return jsonify(record)


@route(bp, "/<thread_id>", "DELETE", summary="Delete a thread with its turns, items and events",
       status=204, query=(IF_BUSY_QUERY,), errors=(400, 404, 409, 500, 503, 504, 507))
async def delete_thread(thread_id: str):
    if_busy = request.args.get("if_busy") or "reject"
    await runtime().delete_thread(thread_id, if_busy=if_busy, timeout=settings().request_timeout)
    return Response("", status=204)


# ---- history control -------------------------------------------------------------------------


@route(bp, "/<thread_id>/fork", "POST", summary="A new thread with this one's history through a turn",
       body=ForkBody, response=ForkResult, status=201, errors=HISTORY_ERRORS)
@idempotent
async def fork_thread(thread_id: str):
    body = await read_body(ForkBody)
    made = claim(201)
    result = await runtime().fork_thread(thread_id, through_turn_id=body.through_turn_id, title=body.title,
                                         new_thread_id=body.id, timeout=settings().request_timeout, claim=made)
    return respond(made, result, 201)


@route(bp, "/<thread_id>/rewind", "POST", summary="Take a turn and every later one out of the live history",
       body=RewindBody, response=RewindResult, errors=HISTORY_ERRORS)
@idempotent
async def rewind_thread(thread_id: str):
    body = await read_body(RewindBody)
    made = claim(200)
    result = await runtime().rewind_thread(thread_id, body.before_turn_id, if_busy=body.if_busy,
                                           timeout=settings().request_timeout, claim=made)
    return respond(made, result, 200)


@route(bp, "/<thread_id>/retry", "POST", summary="Rewind before a turn and run its prompt again, as one change",
       body=RetryBody, response=TurnRecord, status=201, errors=HISTORY_ERRORS)
@idempotent
async def retry_turn(thread_id: str):
    body = await read_body(RetryBody)
    made = claim(201)
    result = await runtime().retry_turn(thread_id, body.turn_id, model=body.model, mode=body.mode,
                                        if_busy=body.if_busy, timeout=settings().request_timeout, claim=made)
    return respond(made, result, 201)


@route(bp, "/<thread_id>/restore", "POST",
       summary="Replace the live history with a saved session's (the current one is saved first)",
       body=RestoreBody, response=RestoreResult, errors=(*HISTORY_ERRORS, 412), headers=IF_MATCH)
@idempotent
async def restore_thread(thread_id: str):
    body = await read_body(RestoreBody)
    made = claim(200)
    result = await runtime().restore_thread(thread_id, body.session_id, if_busy=body.if_busy, if_match=_if_match(),
                                            timeout=settings().request_timeout, claim=made)
    return respond(made, result, 200)
