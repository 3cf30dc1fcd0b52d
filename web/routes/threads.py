from __future__ import annotations

from quart import Blueprint, jsonify

from ..api import LIMIT, QueryParam, query_bool, query_int, read_body, route, runtime, settings
from ..idempotency import claim, idempotent, respond
from ..schemas import CreateThreadBody, ThreadDetail, ThreadRecord, UpdateThreadBody, provided

bp = Blueprint("threads", __name__, url_prefix="/v1/threads")


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


@route(bp, "/<thread_id>", "GET", summary="A thread with its turns, items and latest event seq",
       response=ThreadDetail, errors=(404,))
async def get_thread(thread_id: str):
    return jsonify(await runtime().get_thread(thread_id))


@route(bp, "/<thread_id>", "PATCH", summary="Update a thread (at least one field)", body=UpdateThreadBody,
       response=ThreadRecord, errors=(400, 404, 500, 503, 504))
async def update_thread(thread_id: str):
    body = await read_body(UpdateThreadBody)
    record = await runtime().update_thread(thread_id, provided(body), timeout=settings().request_timeout)
    return jsonify(record)
