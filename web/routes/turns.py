from __future__ import annotations

from quart import Blueprint

from ..api import read_body, route, runtime, settings
from ..idempotency import claim, idempotent, respond
from ..schemas import CompactBody, CompactResult, EmptyBody, StartTurnBody, SteerBody, TurnRecord

bp = Blueprint("turns", __name__, url_prefix="/v1/threads")
ENGINE_ERRORS = (400, 404, 409, 500, 503, 504)


@route(bp, "/<thread_id>/turns", "POST", summary="Start a turn (409 if one is already running)",
       body=StartTurnBody, response=TurnRecord, status=201, errors=ENGINE_ERRORS)
@idempotent
async def start_turn(thread_id: str):
    body = await read_body(StartTurnBody)
    made = claim(201)
    record = await runtime().start_turn(thread_id, body.prompt, model=body.model, mode=body.mode,
                                        timeout=settings().request_timeout, claim=made)
    return respond(made, record, 201)


@route(bp, "/<thread_id>/turns/<turn_id>/steer", "POST", summary="Add text to the running turn",
       body=SteerBody, response=TurnRecord, errors=ENGINE_ERRORS)
@idempotent
async def steer_turn(thread_id: str, turn_id: str):
    body = await read_body(SteerBody)
    made = claim(200)
    record = await runtime().steer_turn(thread_id, turn_id, body.prompt, timeout=settings().request_timeout,
                                        claim=made)
    return respond(made, record, 200)


@route(bp, "/<thread_id>/turns/<turn_id>/interrupt", "POST",
       summary="Interrupt the running turn; answers with the ended turn", body=EmptyBody, response=TurnRecord,
       errors=ENGINE_ERRORS)
@idempotent
async def interrupt_turn(thread_id: str, turn_id: str):
    await read_body(EmptyBody)
    made = claim(200)
    record = await runtime().interrupt_turn(thread_id, turn_id, timeout=settings().request_timeout, claim=made)
    return respond(made, record, 200)


@route(bp, "/<thread_id>/compact", "POST", summary="Replace the history with a summary item",
       body=CompactBody, response=CompactResult, errors=ENGINE_ERRORS)
@idempotent
async def compact(thread_id: str):
    body = await read_body(CompactBody)
    made = claim(200)
    result = await runtime().compact(thread_id, body.reason, timeout=settings().request_timeout, claim=made)
    return respond(made, result, 200)
