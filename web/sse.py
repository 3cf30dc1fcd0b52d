"""Server-sent events: frames, keepalive comments, and closing every stream at shutdown."""

from __future__ import annotations

import json
from json.encoder import encode_basestring as _quote  # type: ignore[attr-defined]  # json.dumps's own
from typing import AsyncIterator

import trio

from runtime.events import EventStream
from runtime.store import Event
from runtime.store.records import EncodedEvents


def _frame_text(event: Event) -> str:
    data = json.dumps(event.envelope(), separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.seq}\nevent: {event.event}\ndata: {data}\n\n"


def _encode(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        # Defence in depth: the engine already repairs model text, but an event stored by an older
        # version may hold a lone surrogate. Repair it (never 'surrogatepass': invalid UTF-8) so no
        # stored event can make a frame, or every later replay of it, fail.
        from runtime.text import valid_text  # only this rare path needs it

        return valid_text(text).encode()


def frame(event: Event | EncodedEvents) -> bytes:
    """One SSE frame: ``id`` (the seq), ``event`` (the name) and ``data`` (the JSON envelope); ``item_schema``
    describes exactly this shape. A replay page (EncodedEvents) is already its frames (``render_stored``)."""
    if type(event) is EncodedEvents:
        return event.data
    data = event.envelope_json  # made once for every subscriber (orjson), or None: the stdlib's way below
    if data is not None:
        try:
            return b"".join((f"id: {event.seq}\nevent: {event.event}\ndata: ".encode(), data, b"\n\n"))
        except UnicodeEncodeError:
            pass  # a lone surrogate in the name: repaired below
    return _encode(_frame_text(event))


# The characters ``_quote`` leaves as they are, ASCII only (it also leaves the rest above 0x1f but quotes and
# backslashes): a string of only these is quoted by adding the quotes.
_BARE = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


def render_stored(thread_id: str, rows: list[tuple]) -> bytes:
    """The frames of stored events of ``thread_id`` (rows of records.ENCODED_COLUMNS), byte for byte what
    ``frame`` makes of each, in one pass (runs in the store reader's worker thread). The writers store a payload as
    ``runtime.store.encode_payload`` makes it: orjson's compact UTF-8 JSON, the text a live frame carries
    (``Event.envelope_json``), or, where orjson declines, ``json.dumps(payload, separators=(",", ":"))``
    (ASCII, as before issue 16). Either text without a backslash-u escape and without a line break is what the
    live frame wrote for the payload, and is spliced in as it is; decoding and encoding every payload again
    was most of a replay's cost (issue 16). Any other payload (an escaped character: old rows with non-ASCII
    text, control characters, a repaired lone surrogate) takes ``frame``'s stdlib path.

    The envelope's fields from ``thread_id`` to ``payload``'s key are quoted once for each run of events that
    share them (an item's deltas: most of a long history), not once per event: with an f-string instead of a
    ``%`` format, a frame costs about half the instructions it did (callgrind, issue 16 second pass)."""
    parts: list[str] = []
    append = parts.append
    thread = ',"thread_id":' + _quote(thread_id)
    # The fields ``middle`` was made of (None: not made yet; no stored event is None).
    last_turn = last_item = last_event = middle = None
    # Checked once for the whole page instead of three times per event: no payload has a backslash-u escape or
    # a line break (any hit sends the page through the checks per event), and no timestamp has a character
    # outside ``_BARE`` (the writers' ISO 8601 never has), so each is quoted by adding the quotes. Issue 16 third
    # pass (callgrind): render's instructions per event 6.4k -> 5.1k.
    payloads = "".join([row[5] for row in rows])
    plain = "\\u" not in payloads and "\n" not in payloads and "\r" not in payloads
    stamps = "".join([row[1] for row in rows])
    bare_stamps = stamps.isascii() and not stamps.encode("ascii").translate(None, _BARE)
    for seq, timestamp, turn_id, item_id, event, payload in rows:
        if not plain and ("\\u" in payload or "\n" in payload or "\r" in payload):
            append(_frame_text(Event(seq, timestamp, thread_id, turn_id, item_id, event, json.loads(payload))))
            continue
        if item_id != last_item or event != last_event or turn_id != last_turn:
            last_turn, last_item, last_event = turn_id, item_id, event
            middle = (thread + ("" if turn_id is None else ',"turn_id":' + _quote(turn_id))
                      + ("" if item_id is None else ',"item_id":' + _quote(item_id))
                      + ',"event":' + _quote(event) + ',"payload":')
        seq = str(seq)  # once, not once for each of its two places
        stamp = timestamp if bare_stamps else _quote(timestamp)[1:-1]
        append(f'id: {seq}\nevent: {event}\ndata: {{"seq":{seq},"timestamp":"{stamp}"{middle}{payload}}}\n\n')
    return _encode("".join(parts))


KEEPALIVE = b": keepalive\n\n"
# Bytes of frames sent as one body chunk at most (more stay for the next): web/server.py's SEND_SLICE, the
# most one socket write is given per send timeout.
CHUNK_BYTES = 64 * 1024

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

    @staticmethod
    def _chunk(stream: EventStream, first: bytes) -> bytes:
        """``first`` and the frames of every event the stream has ready now, up to CHUNK_BYTES: one body
        chunk (one ASGI message, one HTTP chunk, one socket write) for what a writer's batch published
        together, instead of one each. Only events already there are taken, so no frame waits for another."""
        ready = stream.next_nowait()
        if ready is None:
            return first
        parts = [first]
        size = len(first)
        while ready is not None:
            data = frame(ready)
            parts.append(data)
            size += len(data)
            if size >= CHUNK_BYTES:
                break
            ready = stream.next_nowait()
        return b"".join(parts)

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
                    # A replay page is one chunk already (one socket write per page, not per event).
                    yield self._chunk(stream, frame(event))
                elif not self.closed:
                    yield KEEPALIVE
        finally:
            stream.close()
