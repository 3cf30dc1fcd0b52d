"""Server-sent events: frames, keepalive comments, and closing every stream at shutdown."""

from __future__ import annotations

import json
from typing import AsyncIterator

import trio

from runtime.events import EventStream
from runtime.store import Event
from runtime.store.records import EncodedEvent


def frame(event: Event | EncodedEvent) -> bytes:
    """One SSE frame: ``id`` (the seq), ``event`` (the name) and ``data`` (the JSON envelope); ``item_schema``
    describes exactly this shape. A replayed event comes with its envelope already encoded (the same bytes)."""
    if type(event) is EncodedEvent:
        return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.event.encode(), event.data)
    data = json.dumps(event.envelope(), separators=(",", ":"), ensure_ascii=False)
    text = f"id: {event.seq}\nevent: {event.event}\ndata: {data}\n\n"
    try:
        return text.encode()
    except UnicodeEncodeError:
        # Defence in depth: the engine already repairs model text, but an event stored by an older
        # version may hold a lone surrogate. Repair it (never 'surrogatepass': invalid UTF-8) so no
        # stored event can make a frame, or every later replay of it, fail.
        from runtime.text import valid_text  # only this rare path needs it

        return valid_text(text).encode()


KEEPALIVE = b": keepalive\n\n"
# Frames already read from the store (a replay page) go out in one body chunk of at most this many: one
# socket write per page instead of one per event (per-event writes were 56% of a replay's server time, issue 16).
# The store's replay page (records.EVENT_PAGE) is the natural size; this only bounds a chunk's memory.
FRAMES_PER_CHUNK = 500

# The JSON in each frame's ``data`` (runtime.store.Event.envelope). Names are not an enum: new events
# may be added (docs/API.md lists them), and a client should skip the ones it does not know.
ENVELOPE_SCHEMA = {
    "type": "object",
    "properties": {
        "seq": {"type": "integer", "minimum": 1, "description": "Global, strictly increasing; the frame's id"},
        "timestamp": {"type": "string", "format": "date-time"},
        "thread_id": {"type": "string", "minLength": 1},
        "turn_id": {"type": "string", "minLength": 1},
        "item_id": {"type": "string", "minLength": 1},
        "event": {"type": "string", "minLength": 1, "description": "The frame's event name, e.g. turn.completed"},
        "payload": {"type": "object"},
    },
    "required": ["seq", "timestamp", "thread_id", "event", "payload"],
}


def item_schema(components: dict) -> dict:
    """The schema of one event of the stream, for OpenAPI's ``itemSchema`` of ``text/event-stream`` (sequential
    media, OpenAPI 3.2): an object of the frame's fields, ``data`` being JSON described by ``contentSchema``.
    Adds the envelope to ``components`` as ``EventEnvelope``. Comments (``: keepalive``) are not events."""
    components["EventEnvelope"] = ENVELOPE_SCHEMA
    return {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[1-9][0-9]*$", "description": "The event's seq"},
            "event": {"type": "string", "minLength": 1},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": {"$ref": "#/components/schemas/EventEnvelope"}},
        },
        "required": ["id", "event", "data"],
    }


class StreamRegistry:
    """The cancel scopes of open streams, so shutdown can end them instead of waiting them out."""

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._scopes)

    def close_all(self) -> None:
        self.closed = True
        for scope in self._scopes:
            scope.cancel(reason="server shutting down")

    async def frames(self, stream: EventStream, keepalive: float) -> AsyncIterator[bytes]:
        """Yield frames until the client goes away (this generator is cancelled), the stream ends or shutdown.

        Each wait gets a fresh scope whose deadline is the keepalive and which shutdown can cancel;
        ``stream.next`` is cancellation-safe, so neither loses an event. No yield happens inside a
        cancel scope (that would leak the scope into the consumer's task).
        """
        try:
            while not self.closed:
                scope = trio.CancelScope(deadline=trio.current_time() + keepalive)
                self._scopes.add(scope)
                event = None
                try:
                    with scope:
                        event = await stream.next()
                except StopAsyncIteration:
                    # The stream ended (its thread was deleted after ``thread.deleted``): end the response
                    # cleanly. Letting it escape would be a RuntimeError in this generator (PEP 525), which
                    # aborts the chunked body and logs an ASGI error instead of closing the stream.
                    return
                finally:
                    self._scopes.discard(scope)
                if event is not None:
                    rest = stream.ready(FRAMES_PER_CHUNK - 1)
                    yield frame(event) if not rest else b"".join([frame(event), *map(frame, rest)])
                elif not self.closed:
                    yield KEEPALIVE
        finally:
            stream.close()
