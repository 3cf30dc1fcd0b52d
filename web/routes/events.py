from __future__ import annotations

from quart import Blueprint, Response, current_app, request

from runtime.errors import InvalidInput

from ..api import QueryParam, query_int, route, runtime, settings
from ..sse import render_stored

bp = Blueprint("events", __name__, url_prefix="/v1/threads")
MAX_SEQ = 2**63 - 1


def _since_seq() -> int:
    since = query_int("since_seq", 0) or 0
    header = request.headers.get("Last-Event-ID")
    if header:
        try:
            since = max(since, int(header))
        except ValueError as exc:
            raise InvalidInput("Last-Event-ID must be an event seq (an integer)") from exc
    if since < 0:
        raise InvalidInput("since_seq must not be negative")
    # seqs are SQLite integers: anything larger than the largest one means "nothing stored yet".
    return min(since, MAX_SEQ)


@route(bp, "/<thread_id>/events", "GET",
       summary="Server-sent events: stored events after since_seq (or Last-Event-ID), then live ones",
       query=(QueryParam("since_seq", "integer", "Replay events with a greater seq (default 0: all)", minimum=0),),
       content_type="text/event-stream", errors=(400, 404))
async def stream_events(thread_id: str):
    # 404 before any byte is sent; stored events come as pages of frames rendered in the reader's thread
    stream = await runtime().subscribe(thread_id, _since_seq(), render=render_stored)
    registry = current_app.config["TRIO_RUNTIME_STREAMS"]
    response = Response(registry.frames(stream, settings().sse_keepalive), content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None  # a stream lasts as long as the client wants it
    return response
