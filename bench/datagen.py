"""Bench data written straight into SQLite in the runtime's own schema (runtime/store/migrations.py), and session
files in the runtime's own format, so large stores take seconds to make instead of minutes through the
API. What is written is exactly what the runtime itself would have written for completed turns.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from runtime.store import migrations
from runtime.sessions.files import SESSION_SCHEMA_VERSION, encode_document
from runtime.sessions import upsert_index

TS = "2026-01-01T00:00:00.000Z"
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec"
         " romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def text(n_words: int, seed: int = 0) -> str:
    return " ".join(WORDS[(seed + i * 7) % len(WORDS)] for i in range(n_words))


def _payload(value: Any) -> str:
    """An event payload as the store's writers encode it (compact separators, ASCII escapes)."""
    return json.dumps(value, separators=(",", ":"))


def open_db(data_dir: Path) -> sqlite3.Connection:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "sessions").mkdir(exist_ok=True)
    conn = sqlite3.connect(data_dir / "runtime.sqlite3", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    migrations.migrate(conn)
    return conn


def add_threads(conn: sqlite3.Connection, count: int, *, turns: int = 1, events_per_thread: int = 8,
                words: int = 10, prefix: str = "thr_") -> list[str]:
    """``count`` threads, each with ``turns`` completed turns (a user and an agent item each, so
    2 × turns messages) and about ``events_per_thread`` events (deltas fill the rest)."""
    ids = []
    fixed = 1 + turns * 6  # thread.started; per turn: turn.started, 2 × item.started/completed, turn.completed
    deltas = max(0, events_per_thread - fixed)
    threads, turn_rows, items, events = [], [], [], []
    conn.execute("BEGIN")

    def flush() -> None:
        conn.executemany("INSERT INTO threads (id, created_at, updated_at, model, workspace, mode, archived, title,"
                         " system_prompt, latest_turn_id, session_id, base_messages, base_tokens)"
                         " VALUES (?, ?, ?, 'scripted', NULL, 'default', 0, ?, NULL, ?, NULL, NULL, 0)", threads)
        conn.executemany("INSERT INTO turns (id, thread_id, ord, status, input_summary, created_at, started_at,"
                         " ended_at, duration_ms, input_tokens, output_tokens, error, steer_count)"
                         " VALUES (?, ?, ?, 'completed', ?, ?, ?, ?, 5, ?, ?, NULL, 0)", turn_rows)
        conn.executemany("INSERT INTO items (id, turn_id, thread_id, ord, kind, status, summary, detail, metadata,"
                         " started_at, ended_at) VALUES (?, ?, ?, ?, ?, 'completed', ?, ?, NULL, ?, ?)", items)
        conn.executemany("INSERT INTO events (thread_id, turn_id, item_id, event, timestamp, payload)"
                         " VALUES (?, ?, ?, ?, ?, ?)", events)
        threads.clear(), turn_rows.clear(), items.clear(), events.clear()

    for n in range(count):
        tid = f"{prefix}{uuid.uuid4().hex}"
        ids.append(tid)
        updated = f"2026-01-01T00:00:{n % 60:02d}.{n % 1000:03d}Z"
        last_turn = None
        events.append((tid, None, None, "thread.started", TS, _payload({"thread": {"id": tid}})))
        item_ord = 0
        for t in range(turns):
            turn_id = f"turn_{uuid.uuid4().hex}"
            last_turn = turn_id
            prompt = text(words, n + t)
            reply = "You said: " + prompt
            turn_rows.append((turn_id, tid, t + 1, prompt[:120], TS, TS, TS, words, words + 2))
            u, a = f"item_{uuid.uuid4().hex}", f"item_{uuid.uuid4().hex}"
            items.append((u, turn_id, tid, item_ord + 1, "user_message", prompt[:120], prompt, TS, TS))
            items.append((a, turn_id, tid, item_ord + 2, "agent_message", reply[:120], reply, TS, TS))
            item_ord += 2
            events.append((tid, turn_id, None, "turn.started", TS, _payload({"prompt": prompt})))
            events.append((tid, turn_id, u, "item.started", TS, '{"kind":"user_message"}'))
            events.append((tid, turn_id, u, "item.completed", TS, _payload({"kind": "user_message", "text": prompt})))
            events.append((tid, turn_id, a, "item.started", TS, '{"kind":"agent_message"}'))
            per_turn = deltas // turns + (1 if t < deltas % turns else 0)
            for d in range(per_turn):
                events.append((tid, turn_id, a, "item.delta", TS,
                               _payload({"delta": " " + WORDS[d % len(WORDS)], "kind": "agent_message"})))
            events.append((tid, turn_id, a, "item.completed", TS, _payload({"kind": "agent_message", "text": reply})))
            events.append((tid, turn_id, None, "turn.completed", TS,
                           '{"status":"completed","usage":{"input_tokens":10,"output_tokens":12},"error":null}'))
        threads.append((tid, TS, updated, f"thread {n}", last_turn))
        if len(events) > 50_000:
            flush()
    flush()
    conn.execute("COMMIT")
    return ids


def set_base_messages(conn: sqlite3.Connection, thread_id: str, messages: list[dict[str, Any]]) -> None:
    conn.execute("UPDATE threads SET base_messages = ? WHERE id = ?", (json.dumps(messages), thread_id))


def big_messages(total_bytes: int, per_message: int = 5000) -> list[dict[str, Any]]:
    """Messages of ``per_message`` characters (a little non-ASCII in each) adding up to ``total_bytes``
    of text, alternating user and assistant: the shape of a long saved conversation."""
    count = total_bytes // per_message
    return [{"role": "user" if i % 2 == 0 else "assistant",
             "content": [{"type": "text", "text": ("café ☕ " + text(per_message // 6 + 10, i))[:per_message]}]}
            for i in range(count)]


def messages(count: int, words: int = 12) -> list[dict[str, Any]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": [{"type": "text", "text": text(words, i)}]}
            for i in range(count)]


def add_sessions(conn: sqlite3.Connection, data_dir: Path, count: int, *, message_count: int = 20,
                 needle_every: int = 0, words: int = 12) -> list[str]:
    """``count`` session files (no fsync: bench data) and their index rows, with the size and mtime
    the start-up reconcile compares, so the server indexes nothing again. Every ``needle_every``-th
    session mentions the word ``needle``; each message has ``words`` words (about 6 bytes each)."""
    ids = []
    directory = data_dir / "sessions"
    directory.mkdir(parents=True, exist_ok=True)
    conn.execute("BEGIN")
    base = messages(message_count, words)
    for n in range(count):
        sid = str(uuid.uuid4())
        msgs = base
        if needle_every and n % needle_every == 0:
            msgs = base[:-1] + [{"role": "assistant", "content": [{"type": "text", "text": f"the needle {n}"}]}]
        doc = {
            "schema_version": SESSION_SCHEMA_VERSION,
            "metadata": {"id": sid, "title": f"session {n}", "created_at": TS,
                         "updated_at": f"2026-01-01T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}.000Z",
                         "message_count": len(msgs), "total_tokens": 100, "model": "scripted", "workspace": None,
                         "mode": "default", "archived": False, "revision": 1, "thread_id": None},
            "messages": msgs,
            "system_prompt": None,
        }
        path = directory / f"{sid}.json"
        path.write_bytes(encode_document(doc))
        st = os.stat(path)
        upsert_index(conn, doc, st.st_size, st.st_mtime_ns)
        ids.append(sid)
    conn.execute("COMMIT")
    return ids
