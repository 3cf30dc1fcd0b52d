"""Read queries and the JSON-ready records they return (ThreadRecord, TurnRecord, TurnItemRecord).

Every function here is synchronous and takes a connection: callers run them through
``Store.read`` so a whole query costs one thread hop.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3

import orjson
from typing import Any, Callable

from .. import codec
from ..errors import InvalidInput
from .sqlite import Event, row_to_event
from ..transcript import readable_messages

# A turn that has not ended: queued, streaming, or waiting for a client's decision on a tool call.
ACTIVE_TURN_STATUSES = ("queued", "in_progress", "awaiting_approval")
APPROVAL_STATUSES = ("pending", "allowed", "denied", "expired", "canceled")
# A thread row without ``base_messages`` (a resumed session's messages: 12 MB for a 12 MB session), which
# only an engine's restore reads. Thread reads run inline on the event loop.
THREAD_COLUMNS = ("id, created_at, updated_at, model, workspace, mode, archived, title, system_prompt,"
                  " latest_turn_id, session_id, base_tokens, forked_from, approval_policy, allowed_tools")
# A finished turn: the only kind that can anchor a history change (fork, rewind, retry).
FINISHED_TURN_STATUSES = ("completed", "failed", "interrupted")
# Items of the live history only: a rewound turn's items stay in the store but not in the history.
LIVE_ITEMS = ("SELECT * FROM items WHERE thread_id = ? AND turn_id NOT IN"
              " (SELECT id FROM turns WHERE thread_id = ? AND rewound = 1) ORDER BY ord")
# Replay reads the log in pages of this many events, so a long history never sits in memory at once.
EVENT_PAGE = 500
# The same for a replay whose pages are rendered to bytes in the reader's thread (``encoded_events_after``: an
# SSE replay, ~320 bytes of frames per event, so ~640 KB a page). Each page costs a thread hop, a read
# transaction and one pass through the web stack and its socket writes, ~250 us of the server's CPU whatever
# its size: at 500 events that was ~0.5 us of the ~2.4 us per replayed event (issue 16 fifth pass, bench row
# 16b, /proc CPU per event of the server: 2.31-2.40 us at 500, 2.02-2.14 at 1,000 to 3,000).
REPLAY_PAGE = 2000
# GET /v1/threads/{id} returns a page of turns (issue 16: a 10,000-turn thread as cheap to read as a small one):
# the latest TURNS_PAGE by default, at most MAX_TURNS_PAGE when asked (``turns_limit`` is clamped to 1..max,
# as ``limit`` is on lists). 20 turns (40 items of a plain chat) fill a screen or two of the dashboard; bench
# row 16a: a page must cost at most 2x a whole 10-turn thread.
TURNS_PAGE = 20
MAX_TURNS_PAGE = 1000
# A turns cursor: "t" and the ``ord`` of the oldest turn already seen (opaque to clients). Every string this
# pattern matches is a cursor this server accepts (the OpenAPI document publishes it: a fuzzer's valid
# cursors are accepted, anything else is a 400).
TURNS_CURSOR_PATTERN = "^t[1-9][0-9]{0,17}$"
_CURSOR = re.compile(TURNS_CURSOR_PATTERN)


def thread_record(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "model": row["model"],
        "workspace": row["workspace"],
        "mode": row["mode"],
        "archived": bool(row["archived"]),
        "title": row["title"],
        "system_prompt": row["system_prompt"],
        "latest_turn_id": row["latest_turn_id"],
        "session_id": row["session_id"],
        "forked_from": json.loads(row["forked_from"]) if row["forked_from"] else None,
        "approval_policy": row["approval_policy"],
        "allowed_tools": json.loads(row["allowed_tools"]) if row["allowed_tools"] else [],
    }


def turn_record(row: sqlite3.Row, item_ids: list[str]) -> dict[str, Any]:
    usage = None
    if row["input_tokens"] is not None or row["output_tokens"] is not None:
        usage = {"input_tokens": row["input_tokens"] or 0, "output_tokens": row["output_tokens"] or 0}
    return {
        "id": row["id"],
        "thread_id": row["thread_id"],
        "status": row["status"],
        "input_summary": row["input_summary"],
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "ended_at": row["ended_at"],
        "duration_ms": row["duration_ms"],
        "usage": usage,
        "error": row["error"],
        "item_ids": item_ids,
        "steer_count": row["steer_count"],
        "rewound": bool(row["rewound"]),
        "retry_of": row["retry_of"],
    }


def item_record(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "turn_id": row["turn_id"],
        "kind": row["kind"],
        "status": row["status"],
        "summary": row["summary"],
        "detail": row["detail"],
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
        "started_at": row["started_at"],
        "ended_at": row["ended_at"],
    }


def get_thread_row(conn: sqlite3.Connection, thread_id: str) -> sqlite3.Row | None:
    return conn.execute(f"SELECT {THREAD_COLUMNS} FROM threads WHERE id = ?", (thread_id,)).fetchone()


def list_threads(conn: sqlite3.Connection, limit: int, include_archived: bool, archived_only: bool):
    where = "WHERE archived = 1" if archived_only else ("" if include_archived else "WHERE archived = 0")
    rows = conn.execute(
        f"SELECT {THREAD_COLUMNS} FROM threads {where} ORDER BY updated_at DESC, id DESC LIMIT ?", (limit,)
    ).fetchall()
    return [thread_record(row) for row in rows]


def most_recent_thread_id(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT id FROM threads ORDER BY updated_at DESC, id DESC LIMIT 1").fetchone()
    return row["id"] if row else None


def thread_items(conn: sqlite3.Connection, thread_id: str, include_rewound: bool = False) -> list[dict[str, Any]]:
    """The thread's items in order: those of its live history, or every one with ``include_rewound``."""
    if include_rewound:
        rows = conn.execute("SELECT * FROM items WHERE thread_id = ? ORDER BY ord", (thread_id,)).fetchall()
    else:
        rows = conn.execute(LIVE_ITEMS, (thread_id, thread_id)).fetchall()
    return [item_record(row) for row in rows]


def thread_turns(conn: sqlite3.Connection, thread_id: str, items: list[dict[str, Any]],
                 include_rewound: bool = False):
    ids_by_turn: dict[str, list[str]] = {}
    for item in items:
        ids_by_turn.setdefault(item["turn_id"], []).append(item["id"])
    live = "" if include_rewound else " AND rewound = 0"
    rows = conn.execute(f"SELECT * FROM turns WHERE thread_id = ?{live} ORDER BY ord", (thread_id,)).fetchall()
    return [turn_record(row, ids_by_turn.get(row["id"], [])) for row in rows]


def get_turn(conn: sqlite3.Connection, turn_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM turns WHERE id = ?", (turn_id,)).fetchone()
    if row is None:
        return None
    ids = [r["id"] for r in conn.execute("SELECT id FROM items WHERE turn_id = ? ORDER BY ord", (turn_id,))]
    return turn_record(row, ids)


def turns_items(conn: sqlite3.Connection, turn_ids: list[str]) -> list[dict[str, Any]]:
    """The items of these turns, in order (index ``items_by_turn``)."""
    if not turn_ids:
        return []
    return [item_record(r) for r in conn.execute(
        "SELECT * FROM items WHERE turn_id IN (SELECT value FROM json_each(?)) ORDER BY ord", (json.dumps(turn_ids),))]


def turns_cursor(ord_: int) -> str:
    """The cursor that pages to the turns before the one of ``ord_`` (opaque to clients)."""
    return f"t{ord_}"


def parse_turns_cursor(cursor: str) -> int:
    """The turn ord a ``turns_cursor`` names; InvalidInput for anything this server did not give out."""
    if not _CURSOR.fullmatch(cursor):
        raise InvalidInput(f"Query parameter 'before' ({cursor[:40]!r}) is not a turns cursor: pass the"
                           f" page.next_before of an earlier answer, or leave it out for the latest turns")
    return int(cursor[1:])


def thread_detail(conn: sqlite3.Connection, thread_id: str, include_rewound: bool = False,
                  turns_limit: int | None = None, before: str | None = None) -> dict[str, Any] | None:
    """ThreadDetail: a page of the live history (turns, oldest first, and their items), or with
    ``include_rewound`` of every stored turn (rewound ones say ``rewound: true``). The page is the latest
    ``turns_limit`` turns (default TURNS_PAGE) before the cursor ``before`` (default: the latest turns);
    ``page.next_before`` pages on to older turns, null on the oldest page. Reads only the page's rows."""
    limit = min(max(TURNS_PAGE if turns_limit is None else turns_limit, 1), MAX_TURNS_PAGE)
    before_ord = parse_turns_cursor(before) if before is not None else None
    row = get_thread_row(conn, thread_id)
    if row is None:
        return None
    live = "" if include_rewound else " AND rewound = 0"
    older = "" if before_ord is None else " AND ord < ?"
    params = (thread_id,) if before_ord is None else (thread_id, before_ord)
    rows = conn.execute(f"SELECT * FROM turns WHERE thread_id = ?{live}{older} ORDER BY ord DESC LIMIT ?",
                        (*params, limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit][::-1]
    items = turns_items(conn, [r["id"] for r in rows])
    ids_by_turn: dict[str, list[str]] = {}
    for item in items:
        ids_by_turn.setdefault(item["turn_id"], []).append(item["id"])
    turns = [turn_record(r, ids_by_turn.get(r["id"], [])) for r in rows]
    latest = conn.execute("SELECT MAX(seq) AS s FROM events WHERE thread_id = ?", (thread_id,)).fetchone()
    page = {"turns_limit": limit, "before": before, "next_before": turns_cursor(rows[0]["ord"]) if more else None}
    return {"thread": thread_record(row), "turns": turns, "items": items, "latest_seq": latest["s"] or 0,
            "page": page}


def events_after(conn: sqlite3.Connection, thread_id: str, since_seq: int, limit: int = EVENT_PAGE) -> list[Event]:
    rows = conn.execute(
        "SELECT * FROM events WHERE thread_id = ? AND seq > ? ORDER BY seq LIMIT ?", (thread_id, since_seq, limit)
    ).fetchall()
    return [row_to_event(row) for row in rows]


@dataclasses.dataclass(frozen=True, slots=True)
class EncodedEvents:
    """Stored events in one encoded block, for a consumer that only sends them on (an SSE replay): ``data`` is
    what that consumer's ``render`` made of their rows, ``seq`` the last one's seq, ``count`` how many."""

    seq: int
    count: int
    data: bytes


# The columns ``render`` gets, in this order (one tuple per stored event, in seq order), after the thread's id:
# ``render(thread_id, rows)``. Not the thread_id column, which is the query's own (each column costs a GIL
# release and a tenth of a page's read: issue 16 second pass, callgrind).
ENCODED_COLUMNS = ("seq", "timestamp", "turn_id", "item_id", "event", "payload")
# What makes a page's bytes from the thread's id and its rows (web/sse.render_stored for an SSE replay).
Render = Callable[[str, list[tuple[Any, ...]]], bytes]
_ENCODED_PAGE = (f"SELECT {', '.join(ENCODED_COLUMNS)} FROM events WHERE thread_id = ? AND seq > ? ORDER BY seq"
                 " LIMIT ?")


def encoded_events_after(conn: sqlite3.Connection, thread_id: str, since_seq: int,
                         render: Render,
                         limit: int = REPLAY_PAGE) -> list[EncodedEvents]:
    """``events_after`` as one EncodedEvents (none when no event follows ``since_seq``), rendered in the reader's
    worker thread from the raw rows (ENCODED_COLUMNS; the payload as stored text, not decoded): a replay
    turns a page into bytes in one pass instead of decoding and encoding every event (issue 16)."""
    # SQLite's rows come as plain tuples (no sqlite3.Row, then no tuple() of each: a fifth of a page's cost);
    # PostgreSQL's adapter makes its own rows, and a fault seam's subclass (RuntimeConfig.sqlite_connection_factory)
    # keeps its own ``execute``.
    cursor = conn.cursor() if type(conn) is sqlite3.Connection else conn
    if cursor is not conn:
        cursor.row_factory = None
    rows = cursor.execute(_ENCODED_PAGE, (thread_id, since_seq, limit)).fetchall()
    if not rows:
        return []
    rows = [tuple(row) for row in rows] if type(rows[0]) is not tuple else rows
    return [EncodedEvents(rows[-1][0], len(rows), render(thread_id, rows))]


def approval_record(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"], "thread_id": row["thread_id"], "turn_id": row["turn_id"], "item_id": row["item_id"],
        "tool": row["tool"], "input": json.loads(row["input"]), "status": row["status"],
        "created_at": row["created_at"], "expires_at": row["expires_at"], "resolved_at": row["resolved_at"],
        "decided_by": row["decided_by"], "message": row["message"],
    }


def get_approval(conn: sqlite3.Connection, approval_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM approvals WHERE id = ?", (approval_id,)).fetchone()
    return approval_record(row) if row else None


def list_approvals(conn: sqlite3.Connection, thread_id: str | None, status: str | None,
                   limit: int) -> list[dict[str, Any]]:
    """Approvals, oldest first (the order they were asked in), of one thread or of every thread."""
    where, params = [], []
    if thread_id is not None:
        where.append("thread_id = ?")
        params.append(thread_id)
    if status is not None:
        where.append("status = ?")
        params.append(status)
    sql = f"SELECT * FROM approvals {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY created_at, id LIMIT ?"
    return [approval_record(row) for row in conn.execute(sql, (*params, limit))]


def threads_with_active_turns(conn: sqlite3.Connection) -> list[str]:
    """Threads whose turn outlived the process (waiting for an approval, or going on after a tool whose
    outcome is unknown): their engines start with the runtime and carry the turn on."""
    rows = conn.execute("SELECT DISTINCT thread_id FROM turns WHERE status IN ('in_progress', 'awaiting_approval')"
                        " AND rewound = 0").fetchall()
    return [row["thread_id"] for row in rows]


# An engine writes its boundary state (table thread_states) once it has folded at least this many items
# since the last one: its next start reads that and folds at most about this many items (plus a running
# turn's), whatever the thread's length (issue 16: a 10,000-turn thread restored in under 50 ms, bench 16d).
# Each boundary costs one write of the whole messages JSON (~150 bytes a message of a plain chat), so this is
# also the number of folded items that write is spread over: 3 MB per ~500 turns of a 10,000-turn thread.
BOUNDARY_EVERY_ITEMS = 1000
# A boundary state's messages are stored as lines of JSON arrays of at most this many messages each, decoded
# a line per call with let_others_run in between, so the GIL is never held for long (runtime.codec's sliced
# walk took ~230 ms for 20,000 messages, 3 MB, on a busy machine where this takes ~25-50 ms; one call for all
# of them would hold the GIL, and so the event loop, that long at once).
BOUNDARY_CHUNK = 256


# A boundary line that orjson would not read back exactly (an integer beyond 64 bits, NaN or an infinity) starts
# with this byte and is read by the stdlib; every other line by orjson (~2x faster on these many small objects).
STDLIB_LINE = "s"


def _boundary_messages(data: bytes) -> list[dict[str, Any]]:
    with codec.collector_paused():  # every container it makes stays alive: see codec.collector_paused
        return _decode_boundary(data)


def _decode_boundary(data: bytes) -> list[dict[str, Any]]:
    """The lines are found with ``bytes.find`` (memchr) and handed to orjson as views: ``bytes.split`` walked
    the 3 MB a byte at a time and copied every line, a tenth of the decode (callgrind, issue 16 second pass)."""
    messages: list[dict[str, Any]] = []
    view = memoryview(data)
    stdlib = ord(STDLIB_LINE)
    start, size = 0, len(data)
    while start < size:
        end = data.find(b"\n", start)
        if end < 0:
            end = size
        if data[start] == stdlib:
            messages.extend(json.loads(data[start + 1:end]))
        elif end > start:
            try:
                messages.extend(orjson.loads(view[start:end]))
            except orjson.JSONDecodeError:  # a lone surrogate's escape: the stdlib reads it as it was
                messages.extend(json.loads(data[start:end]))
        start = end + 1
        codec.let_others_run()
    return messages


def _boundary_line(chunk: list[dict[str, Any]]) -> str:
    line = json.dumps(chunk, separators=(",", ":"))  # ASCII escapes: any string is stored, read back exactly
    try:
        orjson.dumps(chunk)  # refuses integers beyond 64 bits (orjson.loads would turn them into floats)
    except TypeError:
        return STDLIB_LINE + line
    return STDLIB_LINE + line if "NaN" in line or "Infinity" in line else line


def engine_state(conn: sqlite3.Connection, thread_id: str, use_boundary: bool = False) -> dict[str, Any] | None:
    """Everything an engine needs to restore itself after a spawn or a process restart. Runs in a worker
    thread; the base messages come as bytes and are decoded in slices (see runtime.codec), so a 12 MB
    resumed session does not hold the GIL, and with it the event loop, for one long call.

    ``items`` are folded (runtime.transcript) onto ``boundary_messages`` when that is not None, else onto
    ``base_messages``. With ``use_boundary`` and a boundary state stored (thread_states), ``boundary_messages``
    are its messages and ``items`` only the items of the live turns after it (``boundary_turn_ord``): the same
    messages as folding every live item onto the base, since the boundary is deleted by every change of the
    turns it covers (history._rewind) and covers only finished turns, whose items no longer change."""
    row = get_thread_row(conn, thread_id)
    if row is None:
        return None
    (base,) = conn.execute("SELECT CAST(base_messages AS BLOB) FROM threads WHERE id = ?", (thread_id,)).fetchone()
    boundary = None
    if use_boundary:
        boundary = conn.execute("SELECT through_turn_ord, total_tokens, CAST(messages AS BLOB) AS m FROM thread_states"
                                " WHERE thread_id = ?", (thread_id,)).fetchone()
    if boundary is None:
        items = thread_items(conn, thread_id)
        through = 0
    else:
        through = boundary["through_turn_ord"]
        items = [item_record(r) for r in conn.execute(
            "SELECT * FROM items WHERE turn_id IN"
            " (SELECT id FROM turns WHERE thread_id = ? AND rewound = 0 AND ord > ?) ORDER BY ord", (thread_id, through))]
    # A turn that has not ended (it outlived the process: see threads_with_active_turns) is carried on by the
    # engine: its items are not history yet. Only a turn after the boundary can be one (a boundary covers only
    # finished turns, and later turns get higher ords): the index range of those turns, not all of the thread's
    # (~3 ms for 10,000 turns, issue 16 row 16d).
    active = conn.execute(
        f"SELECT * FROM turns WHERE thread_id = ? AND ord > ? AND rewound = 0"
        f" AND status IN ({','.join('?' * len(ACTIVE_TURN_STATUSES))}) ORDER BY ord DESC LIMIT 1",
        (thread_id, through, *ACTIVE_TURN_STATUSES)).fetchone()
    active_turn = None
    if active is not None:
        own = [item for item in items if item["turn_id"] == active["id"]]
        items = [item for item in items if item["turn_id"] != active["id"]]
        pending = conn.execute("SELECT * FROM approvals WHERE turn_id = ? AND status = 'pending' ORDER BY created_at"
                               " LIMIT 1", (active["id"],)).fetchone()
        active_turn = {"turn": turn_record(active, [item["id"] for item in own]), "items": own,
                       "approval": approval_record(pending) if pending else None}
    # Tokens of the live history (the boundary's total, then the later live turns'); ords over every turn and
    # item (rewound ones too), since ords only grow.
    (tokens,) = conn.execute(
        "SELECT COALESCE(SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)), 0) FROM turns"
        " WHERE thread_id = ? AND rewound = 0 AND ord > ?", (thread_id, through)).fetchone()
    if boundary is not None:
        tokens += boundary["total_tokens"] - row["base_tokens"]
    (turn_ord,) = conn.execute("SELECT COALESCE(MAX(ord), 0) FROM turns WHERE thread_id = ?", (thread_id,)).fetchone()
    (item_ord,) = conn.execute("SELECT COALESCE(MAX(ord), 0) FROM items WHERE thread_id = ?", (thread_id,)).fetchone()
    return {
        "thread": thread_record(row),
        # Stored by resume; an older version stored them without validation (see readable_messages).
        "base_messages": readable_messages(codec.loads(base), f"thread {thread_id}: base_messages") if base else [],
        "base_tokens": row["base_tokens"],
        # Written by an engine from valid messages (transcript's fold keeps them valid): read as they are.
        "boundary_messages": _boundary_messages(boundary["m"]) if boundary is not None else None,
        "boundary_turn_ord": through,
        "items": items,
        "turn_tokens": tokens,
        "turn_count": turn_ord,
        "item_count": item_ord,
        "active_turn": active_turn,
    }


def boundary_write(thread_id: str, through_turn_ord: int, total_tokens: int,
                   messages: tuple[dict[str, Any], ...]) -> Any:
    """The ``fn`` of the write that stores an engine's boundary state: its messages and token total once the
    live turns through ``through_turn_ord`` are folded in. Encodes in the writer thread, BOUNDARY_CHUNK messages
    a line (the stdlib's compact ASCII JSON: read back exactly, NaN and big integers included)."""
    def write(conn: sqlite3.Connection) -> None:
        lines = []
        for start in range(0, len(messages), BOUNDARY_CHUNK):
            lines.append(_boundary_line(list(messages[start:start + BOUNDARY_CHUNK])))
            codec.let_others_run()
        conn.execute(
            "INSERT INTO thread_states (thread_id, through_turn_ord, total_tokens, messages)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (thread_id) DO UPDATE SET"
            " through_turn_ord = excluded.through_turn_ord, total_tokens = excluded.total_tokens,"
            " messages = excluded.messages",
            (thread_id, through_turn_ord, total_tokens, "\n".join(lines)))

    return write


# Stands for the base messages' value in a thread's INSERT when they come in pieces (``write_base``).
BASE_PIECES = "<base messages in pieces>"


def write_base(conn: Any, insert: tuple[str, tuple[Any, ...]], pieces: list[bytes | memoryview]) -> None:
    """Run ``insert``, whose base messages (``BASE_PIECES`` in its SQL, the list ``pieces`` among its
    parameters) are the pieces of ``codec.dumps_parts``, in the writer thread.

    On SQLite the row gets a zero-filled TEXT of the pieces' total length, and the pieces are written
    into it by incremental blob I/O, which writes a TEXT value's bytes as they are. Binding 12 MB as a
    parameter copies it with the GIL held (the sqlite3 module binds with SQLITE_TRANSIENT: a malloc and
    a memcpy, page faults included), and joining the pieces first was one more 12 MB buffer; ``Blob.write``
    lets go of the GIL while SQLite copies (row 14c of ``make bench``: /health while a 12.7 MB session is
    resumed). The pieces are then dropped here, so their memory is freed in the writer thread, not on
    the event loop. Elsewhere (PostgreSQL) they are joined here and bound as bytes, and kept: its writer may
    apply a failed batch again, one request per savepoint. The SQLite writer never runs a request twice; if
    anything ever did, the emptied pieces raise here (the request fails, its transaction is undone) instead
    of storing an empty value."""
    sql, params = insert
    if not pieces:  # written (and dropped) already: a second run would store an empty value, never valid JSON
        raise RuntimeError("a thread's base messages were already written by this request")
    if isinstance(conn, sqlite3.Connection):
        cursor = conn.execute(sql.replace(BASE_PIECES, "CAST(zeroblob(?) AS TEXT)"),
                              [sum(map(len, pieces)) if value is pieces else value for value in params])
        with conn.blobopen("threads", "base_messages", cursor.lastrowid) as blob:
            for piece in pieces:
                blob.write(piece)
        pieces.clear()
        return
    conn.execute(sql.replace(BASE_PIECES, "CAST(? AS TEXT)"),
                 [b"".join(pieces) if value is pieces else value for value in params])
