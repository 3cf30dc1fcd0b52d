"""History control in the store: fork, rewind, retry, restore and delete, each as one writer-thread step.

Every function here is the ``fn`` of exactly one store write (``WriteRequest.fn``), so it runs in the
writer thread inside that write's savepoint. It checks everything the change depends on against the rows
as they are *in that transaction* (the anchor exists, belongs to the thread, is finished and live), so no
check can go stale between validation and change. A check that fails raises a rejection (NotFound,
Conflict, InvalidInput): the savepoint is undone and nothing changed. Otherwise the whole change is
applied, the idempotency record (if any) is written beside it, and the function returns what the engine
adopts once the write committed. A storage failure anywhere undoes the lot (one transaction).

A rewound turn is never deleted: it keeps its rows (flag ``rewound``) and its events, so the event log
stays append-only and no seq is reused; the live history (what GET shows by default, what the engine and
a rebuild fold into messages) simply leaves it out (``records.LIVE_ITEMS``).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from typing import Any, Sequence

from ..clock import new_ids
from ..errors import Conflict, NotFound
from ..idempotency import Claim
from ..store import Event, EventDraft, WithEvents, append_event, records
from ..transcript import Message, build_messages, preview

ACTIVE = records.ACTIVE_TURN_STATUSES
FINISHED = records.FINISHED_TURN_STATUSES


@dataclasses.dataclass
class LiveState:
    """What an engine adopts after a history change: its messages and token total, and the thread
    fields the change moved."""

    messages: list[Message]
    total_tokens: int
    thread: dict[str, Any]
    base: list[Message]


@dataclasses.dataclass
class Change:
    """The committed result of a history change: the caller's answer and, for a change of the
    thread's own history, the state its engine adopts."""

    result: dict[str, Any]
    state: LiveState | None = None
    prompt: str | None = None  # retry: the prompt of the new turn


def _anchor(conn: sqlite3.Connection, thread_id: str, turn_id: str, action: str) -> sqlite3.Row:
    """The anchor turn, checked: of this thread (else NotFound, like an unknown one), still in the live
    history and finished (else Conflict)."""
    row = conn.execute("SELECT id, thread_id, ord, status, rewound FROM turns WHERE id = ?", (turn_id,)).fetchone()
    if row is None or row["thread_id"] != thread_id:
        raise NotFound(f"Turn '{turn_id}' not found in thread '{thread_id}'")
    if row["rewound"]:
        raise Conflict(f"Cannot {action} at turn '{turn_id}': it was rewound and is no longer in the history of "
                       f"thread '{thread_id}'")
    if row["status"] not in FINISHED:
        raise Conflict(f"Cannot {action} at turn '{turn_id}': it is {row['status']}; only a finished turn "
                       f"(completed, failed or interrupted) can be an anchor")
    return row


def _thread_row(conn: sqlite3.Connection, thread_id: str) -> sqlite3.Row:
    row = records.get_thread_row(conn, thread_id)
    if row is None:
        raise NotFound(f"Thread '{thread_id}' not found")
    return row


def _live_state(conn: sqlite3.Connection, thread_id: str, base: list[Message]) -> LiveState:
    """The engine state of the thread's live history as this transaction sees it: ``base`` (the resumed or
    restored messages, which the engine already holds) and the live turns' items folded in, exactly as
    a freshly restored engine (``records.engine_state``) would build it."""
    items = records.thread_items(conn, thread_id)
    row = _thread_row(conn, thread_id)
    (tokens,) = conn.execute(
        "SELECT COALESCE(SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)), 0) FROM turns"
        " WHERE thread_id = ? AND rewound = 0", (thread_id,)).fetchone()
    return LiveState(build_messages(base, items), row["base_tokens"] + tokens, records.thread_record(row), base)


def _rewind(conn: sqlite3.Connection, thread_id: str, from_ord: int, now: str) -> list[str]:
    """Flag every live turn from ``from_ord`` on as rewound; returns their ids in order. Refuses (Conflict)
    when one of them is still queued or running (the engine interrupts first when asked to)."""
    rows = conn.execute("SELECT id, status FROM turns WHERE thread_id = ? AND rewound = 0 AND ord >= ? ORDER BY ord",
                        (thread_id, from_ord)).fetchall()
    for row in rows:
        if row["status"] in ACTIVE:
            raise Conflict(f"Thread '{thread_id}' has a turn in progress ('{row['id']}')")
    removed = [row["id"] for row in rows]
    conn.execute("UPDATE turns SET rewound = 1 WHERE thread_id = ? AND rewound = 0 AND ord >= ?", (thread_id, from_ord))
    # The engine's boundary state may fold a turn just rewound (and a restore replaces the base it starts
    # from): gone with the change, so no later start folds from it (records.engine_state).
    conn.execute("DELETE FROM thread_states WHERE thread_id = ?", (thread_id,))
    latest = conn.execute("SELECT id FROM turns WHERE thread_id = ? AND rewound = 0 ORDER BY ord DESC LIMIT 1",
                          (thread_id,)).fetchone()
    conn.execute("UPDATE threads SET latest_turn_id = ?, updated_at = ? WHERE id = ?",
                 (latest["id"] if latest else None, now, thread_id))
    return removed


def _finish(conn: sqlite3.Connection, change: Change, claim: Claim | None, appended: list[Event],
            events: Sequence[EventDraft] = ()) -> WithEvents:
    """The change's answer is final: store it under the request's idempotency key, in this transaction."""
    if claim is not None:
        claim.record(conn, change.result)
    return WithEvents(change, events=events, appended=appended)


# ---- fork ------------------------------------------------------------------------------------


def fork(conn: sqlite3.Connection, *, thread_id: str, through_turn_id: str | None, new_thread_id: str,
         title: str | None, now: str, claim: Claim | None = None) -> WithEvents:
    """A new thread whose history is copies (new ids) of the source's live turns up to and including
    ``through_turn_id`` (default: the latest finished live turn; none: an empty fork), with their items
    and the source's resumed base messages. The source is not changed (only ``thread.forked`` is logged
    on it), so a turn running there runs on. Conflict when ``new_thread_id`` is taken."""
    source = _thread_row(conn, thread_id)
    if conn.execute("SELECT 1 FROM threads WHERE id = ?", (new_thread_id,)).fetchone() is not None:
        raise Conflict(f"Thread '{new_thread_id}' already exists")
    if through_turn_id is not None:
        last_ord = _anchor(conn, thread_id, through_turn_id, "fork")["ord"]
    else:
        row = conn.execute(
            f"SELECT id, ord FROM turns WHERE thread_id = ? AND rewound = 0 AND status IN ({','.join('?' * len(FINISHED))})"
            " ORDER BY ord DESC LIMIT 1", (thread_id, *FINISHED)).fetchone()
        through_turn_id, last_ord = (row["id"], row["ord"]) if row else (None, 0)
    forked_from = {"thread_id": thread_id, "through_turn_id": through_turn_id}
    conn.execute(
        "INSERT INTO threads (id, created_at, updated_at, model, workspace, mode, archived, title, system_prompt,"
        " latest_turn_id, session_id, base_messages, base_tokens, forked_from, approval_policy, allowed_tools)"
        " SELECT ?, ?, ?, model, workspace, mode, 0, ?, system_prompt, NULL, NULL, base_messages, base_tokens, ?,"
        " approval_policy, allowed_tools FROM threads WHERE id = ?",
        (new_thread_id, now, now, title if title is not None else source["title"], json.dumps(forked_from), thread_id))
    turns = conn.execute("SELECT * FROM turns WHERE thread_id = ? AND rewound = 0 AND ord <= ? ORDER BY ord",
                         (thread_id, last_ord)).fetchall()
    copies = dict(zip((row["id"] for row in turns), new_ids("turn", len(turns))))
    for row in turns:
        conn.execute(
            "INSERT INTO turns (id, thread_id, ord, status, input_summary, created_at, started_at, ended_at,"
            " duration_ms, input_tokens, output_tokens, error, steer_count, rewound, retry_of)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
            (copies[row["id"]], new_thread_id, row["ord"], row["status"], row["input_summary"], row["created_at"],
             row["started_at"], row["ended_at"], row["duration_ms"], row["input_tokens"], row["output_tokens"],
             row["error"], row["steer_count"], copies.get(row["retry_of"])))
    if turns:
        items = conn.execute(
            "SELECT * FROM items WHERE thread_id = ? AND turn_id IN (SELECT value FROM json_each(?)) ORDER BY ord",
            (thread_id, json.dumps(list(copies)))).fetchall()
        conn.executemany(
            "INSERT INTO items (id, turn_id, thread_id, ord, kind, status, summary, detail, metadata, started_at,"
            " ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(item_id, copies[row["turn_id"]], new_thread_id, row["ord"], row["kind"], row["status"],
              row["summary"], row["detail"], row["metadata"], row["started_at"], row["ended_at"])
             for item_id, row in zip(new_ids("item", len(items)), items)])
        conn.execute("UPDATE threads SET latest_turn_id = ? WHERE id = ?", (copies[through_turn_id], new_thread_id))
    record = records.thread_record(_thread_row(conn, new_thread_id))
    appended = [
        append_event(conn, EventDraft(new_thread_id, "thread.started", {"thread": record, "forked_from": forked_from},
                                      timestamp=now)),
        append_event(conn, EventDraft(thread_id, "thread.forked",
                                      {"thread_id": new_thread_id, "through_turn_id": through_turn_id}, timestamp=now)),
    ]
    change = Change({"thread": record, "forked_from": forked_from, "turn_ids": list(copies.values())})
    return _finish(conn, change, claim, appended)


# ---- rewind and retry --------------------------------------------------------------------------


def rewind(conn: sqlite3.Connection, *, thread_id: str, before_turn_id: str, base: list[Message], now: str,
           claim: Claim | None = None) -> WithEvents:
    """``before_turn_id`` and every later live turn leave the live history (flagged, never deleted)."""
    anchor = _anchor(conn, thread_id, before_turn_id, "rewind")
    removed = _rewind(conn, thread_id, anchor["ord"], now)
    event = append_event(conn, EventDraft(thread_id, "thread.rewound",
                                          {"before_turn_id": before_turn_id, "removed_turn_ids": removed},
                                          timestamp=now))
    state = _live_state(conn, thread_id, base)
    change = Change({"thread": state.thread, "removed_turn_ids": removed, "latest_seq": event.seq}, state)
    return _finish(conn, change, claim, [event])


def latest_turn_id(conn: sqlite3.Connection, thread_id: str) -> str | None:
    row = conn.execute("SELECT id FROM turns WHERE thread_id = ? AND rewound = 0 ORDER BY ord DESC LIMIT 1",
                       (thread_id,)).fetchone()
    return row["id"] if row else None


def retry(conn: sqlite3.Connection, *, thread_id: str, turn_id: str | None, base: list[Message], now: str,
          new_turn: dict[str, Any], claim: Claim | None = None) -> WithEvents:
    """Rewind before ``turn_id`` (default: the latest live turn) and start a new turn with its prompt, in
    this one transaction. ``new_turn`` holds what the engine allocated for it: ``id``, ``ord``, ``model``,
    ``mode``, ``user_item_id``, ``user_item_ord`` and ``record`` (a function prompt -> TurnRecord, so the
    answer is the engine's own record of the turn)."""
    if turn_id is None:
        turn_id = latest_turn_id(conn, thread_id)
        if turn_id is None:
            _thread_row(conn, thread_id)
            raise Conflict(f"Thread '{thread_id}' has no turn to retry")
    anchor = _anchor(conn, thread_id, turn_id, "retry")
    prompt_row = conn.execute(
        "SELECT detail FROM items WHERE turn_id = ? AND kind = 'user_message' ORDER BY ord LIMIT 1", (turn_id,)
    ).fetchone()
    if prompt_row is None or not (prompt_row["detail"] or "").strip():
        raise Conflict(f"Turn '{turn_id}' has no prompt to retry (it is a compaction)")
    prompt = prompt_row["detail"]
    removed = _rewind(conn, thread_id, anchor["ord"], now)
    rewound = append_event(conn, EventDraft(thread_id, "thread.rewound",
                                            {"before_turn_id": turn_id, "removed_turn_ids": removed}, timestamp=now))
    state = _live_state(conn, thread_id, base)
    conn.execute(
        "INSERT INTO turns (id, thread_id, ord, status, input_summary, created_at, started_at, retry_of)"
        " VALUES (?, ?, ?, 'in_progress', ?, ?, ?, ?)",
        (new_turn["id"], thread_id, new_turn["ord"], preview(prompt), now, now, turn_id))
    conn.execute(
        "INSERT INTO items (id, turn_id, thread_id, ord, kind, status, summary, detail, metadata, started_at,"
        " ended_at) VALUES (?, ?, ?, ?, 'user_message', 'completed', ?, ?, NULL, ?, ?)",
        (new_turn["user_item_id"], new_turn["id"], thread_id, new_turn["user_item_ord"], preview(prompt), prompt,
         now, now))
    conn.execute("UPDATE threads SET latest_turn_id = ?, updated_at = ? WHERE id = ?", (new_turn["id"], now, thread_id))
    events = [
        EventDraft(thread_id, "turn.started", {"prompt": prompt, "model": new_turn["model"], "mode": new_turn["mode"],
                                               "retry_of": turn_id}, turn_id=new_turn["id"], timestamp=now),
        EventDraft(thread_id, "item.started", {"kind": "user_message"}, new_turn["id"], new_turn["user_item_id"], now),
        EventDraft(thread_id, "item.completed", {"kind": "user_message", "text": prompt}, new_turn["id"],
                   new_turn["user_item_id"], now),
    ]
    state.thread["latest_turn_id"] = new_turn["id"]
    change = Change(new_turn["record"](prompt, turn_id), state, prompt)
    return _finish(conn, change, claim, [rewound], events)


# ---- restore -------------------------------------------------------------------------------------


def restore(conn: sqlite3.Connection, *, thread_id: str, session_id: str, revision: int,
            safety_session_id: str, messages: list[Message], messages_json: bytes | None, total_tokens: int,
            system_prompt: str | None, now: str, claim: Claim | None = None) -> WithEvents:
    """Replace the live history with a saved session's messages: every live turn becomes rewound, the
    session's messages become the thread's base (as a resume stores them), its system prompt the
    thread's, and the thread is linked to it. The safety session is written by the caller's part of the
    same write (see SessionService.restore)."""
    _thread_row(conn, thread_id)
    if conn.execute("SELECT 1 FROM turns WHERE thread_id = ? AND status IN ('queued', 'in_progress')",
                    (thread_id,)).fetchone() is not None:
        raise Conflict(f"Thread '{thread_id}' has a turn in progress")
    _rewind(conn, thread_id, 0, now)
    conn.execute("UPDATE threads SET base_messages = CAST(? AS TEXT), base_tokens = ?, system_prompt = ?,"
                 " session_id = ?, updated_at = ? WHERE id = ?",
                 (messages_json, total_tokens, system_prompt, session_id, now, thread_id))
    event = append_event(conn, EventDraft(thread_id, "thread.restored",
                                          {"session_id": session_id, "revision": revision,
                                           "safety_session_id": safety_session_id}, timestamp=now))
    state = _live_state(conn, thread_id, messages)
    change = Change({"thread": state.thread, "session_id": session_id, "revision": revision,
                     "message_count": len(messages), "safety_session_id": safety_session_id}, state)
    return _finish(conn, change, claim, [event])


# ---- delete --------------------------------------------------------------------------------------


def delete(conn: sqlite3.Connection, *, thread_id: str, now: str) -> WithEvents:
    """Delete the thread with its turns, items, events and approvals. ``thread.deleted`` is appended (it takes the next
    seq, so no seq is ever reused: the log's AUTOINCREMENT remembers the highest one) and removed again in
    the same transaction: it is published to open streams, which end with it, and stored nowhere.
    Sessions linked to the thread stay (they are documents of their own)."""
    _thread_row(conn, thread_id)
    for table in ("items", "turns", "events", "approvals", "thread_states"):
        conn.execute(f"DELETE FROM {table} WHERE thread_id = ?", (thread_id,))
    conn.execute("DELETE FROM threads WHERE id = ?", (thread_id,))
    event = append_event(conn, EventDraft(thread_id, "thread.deleted", {"thread_id": thread_id}, timestamp=now))
    conn.execute("DELETE FROM events WHERE seq = ?", (event.seq,))
    return WithEvents(Change({"thread_id": thread_id}), appended=[event])
