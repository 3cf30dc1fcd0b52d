"""Approvals: list them, and allow or deny a pending one (API.md v1.1, "Tools and approvals")."""

from __future__ import annotations

from quart import Blueprint, jsonify, request

from ..api import LIMIT, QueryParam, query_int, read_body, route, runtime, settings
from ..idempotency import claim, idempotent, respond
from ..schemas import ApprovalList, ApprovalRecord, DecideApprovalBody

bp = Blueprint("approvals", __name__, url_prefix="/v1")
STATUS = QueryParam("status", "string", "Only approvals in this status",
                    enum=("pending", "allowed", "denied", "expired", "canceled"))


@route(bp, "/approvals", "GET", summary="Approvals of every thread, oldest first", response=ApprovalList,
       query=(STATUS, LIMIT), errors=(400,))
async def list_all_approvals():
    approvals = await runtime().list_approvals(status=request.args.get("status") or None, limit=query_int("limit"))
    return jsonify({"approvals": approvals})


@route(bp, "/threads/<thread_id>/approvals", "GET", summary="A thread's approvals, oldest first",
       response=ApprovalList, query=(STATUS, LIMIT), errors=(400, 404))
async def list_thread_approvals(thread_id: str):
    approvals = await runtime().list_approvals(thread_id=thread_id, status=request.args.get("status") or None,
                                               limit=query_int("limit"))
    return jsonify({"approvals": approvals})


@route(bp, "/threads/<thread_id>/approvals/<approval_id>", "POST",
       summary="Allow or deny a pending approval (409 once resolved)", body=DecideApprovalBody,
       response=ApprovalRecord, errors=(400, 404, 409, 500, 503, 504))
@idempotent
async def decide_approval(thread_id: str, approval_id: str):
    body = await read_body(DecideApprovalBody)
    made = claim(200)
    record = await runtime().decide_approval(thread_id, approval_id, body.decision, remember=body.remember,
                                             message=body.message, timeout=settings().request_timeout, claim=made)
    return respond(made, record, 200)
