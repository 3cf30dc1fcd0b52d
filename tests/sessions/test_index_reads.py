"""Reads of the session index never fetch its search text (issue 11, defect 7).

``session_texts.search_text`` (``sessions.search_text`` before SQLite migration 11) holds every message's text (1 MB for a 1 MB session). A ``SELECT *`` brought
it into Python for every listed row, on the event loop for a plain listing. The test records every
statement the store's read connections run and checks the columns each SELECT returns: search may still
match in SQL (``WHERE search_text LIKE``), but no row may carry the text back. On SQLite the trace
callback gives the statements with their values bound, and each runs again on a connection of its own
for its columns; on PostgreSQL the read connections' adapter (PgConnection.execute) and the one-statement
reads' query (``_query_on_loop``, its values bound client-side) are wrapped, and the columns are those of the
very result the read got.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Iterator

import pytest

from runtime.store import postgres
from runtime.store.postgres import PgConnection

from .conftest import LIMIT, run_turn

# A traced statement: its SQL with the values bound, and the names of the columns it returns (None: not
# known yet; on SQLite they are read after the trace by running the statement again).
Traced = tuple[str, "list[str] | None"]


def bind(sql: str, params) -> str:
    """``sql`` with each ``?`` replaced by its value as an SQL literal (as SQLite's trace shows it)."""
    for value in params or ():
        literal = "'" + value.replace("'", "''") + "'" if isinstance(value, str) else str(value)
        sql = sql.replace("?", literal, 1)
    return sql


@contextlib.contextmanager
def traced_reads(rt) -> Iterator[list[Traced]]:
    statements: list[Traced] = []
    if rt.store.kind == "postgresql":
        with pytest.MonkeyPatch.context() as patch:
            original = PgConnection.execute

            def execute(conn, sql, params=None):
                cursor = original(conn, sql, params)
                if conn is not rt.store._wconn:  # a read connection of the pool
                    columns = [d.name for d in cursor._cursor.description or ()]
                    statements.append((bind(sql, params), columns))
                return cursor

            original_on_loop = postgres._query_on_loop

            async def on_loop(conn, query):
                rows = await original_on_loop(conn, query)
                statements.append((query.decode(), list(rows.columns)))
                return rows

            patch.setattr(PgConnection, "execute", execute)
            patch.setattr(postgres, "_query_on_loop", on_loop)
            yield statements
        return
    connections = (rt.store._iconn, rt.store._rconn)
    for conn in connections:
        conn.set_trace_callback(lambda sql: statements.append((sql, None)))
    try:
        yield statements
    finally:
        for conn in connections:
            conn.set_trace_callback(None)


def selects(rt, statements: list[Traced], table: str) -> list[Traced]:
    """Each traced SELECT containing ``table`` with the names of the columns it returns (on SQLite: from
    running it again on a connection of its own)."""
    out = []
    for sql, columns in statements:
        if sql.lstrip().upper().startswith("SELECT") and table in sql:
            if columns is None:
                check = sqlite3.connect(rt.config.db_path)
                try:
                    columns = [d[0] for d in check.execute(sql).description]
                finally:
                    check.close()
            out.append((sql, columns))
    return out


def session_selects(rt, statements: list[Traced]) -> list[Traced]:
    return selects(rt, statements, " sessions")


async def test_listing_searching_and_saving_fetch_no_search_text(rt):
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "the haystack has a needle in it")
    with_needle = (await rt.sessions.save(thread_id=tid, session_id="with-needle", timeout=LIMIT))["session_id"]
    other = (await rt.create_thread())["id"]
    await run_turn(rt, other, "nothing to find here")
    plain = (await rt.sessions.save(thread_id=other, session_id="plain", timeout=LIMIT))["session_id"]

    operations = {}
    with traced_reads(rt) as statements:
        listed = await rt.sessions.list(limit=50)
        operations["list"] = session_selects(rt, statements)
        statements.clear()
        found = await rt.sessions.list(limit=50, search="NEEDLE")
        operations["search"] = session_selects(rt, statements)
        statements.clear()
        saved = await rt.sessions.save(thread_id=tid, session_id=with_needle, timeout=LIMIT)
        operations["save in place"] = session_selects(rt, statements)

    assert sorted(m["id"] for m in listed) == sorted([with_needle, plain])
    assert {m["id"]: m["message_count"] for m in listed} == {with_needle: 2, plain: 2}
    assert [m["id"] for m in found] == [with_needle]  # matched in the message text, not the title
    assert saved["session"]["metadata"]["revision"] == 2
    for name, selects in operations.items():
        if name == "save in place" and rt.sessions.storage == "files":
            # The index row its previous save committed is kept (test_save_costs.py): no read at all.
            assert selects == [], selects
            continue
        assert selects, f"{name}: no read of the session index was traced"
        for sql, columns in selects:
            assert "search_text" not in columns, f"{name} fetched the search text: {sql}"
    # The search still filters in SQL.
    assert any("search_text LIKE '%needle%'" in sql or "search_text FROM session_texts WHERE session_rowid ="
               " sessions.rowid) LIKE '%needle%'" in sql for sql, _ in operations["search"])


def thread_selects(rt, statements: list[Traced]) -> list[Traced]:
    return selects(rt, statements, " FROM threads")


async def test_thread_reads_on_the_event_loop_fetch_no_base_messages(rt):
    """A resumed thread's row holds the session's messages (12 MB for a 12 MB session); the thread
    detail, the thread list and the thread record run inline on the event loop and must leave them."""
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "hello there")
    sid = (await rt.sessions.save(thread_id=tid, session_id="base", timeout=LIMIT))["session_id"]
    resumed = (await rt.sessions.resume(sid))["thread_id"]

    with traced_reads(rt) as statements:
        detail = await rt.get_thread(resumed)
        listed = await rt.list_threads(limit=10)
        record = await rt.thread_record(resumed)
        selects = thread_selects(rt, statements)

    assert detail["thread"]["session_id"] == record["session_id"] == sid
    assert [t["id"] for t in listed] == [resumed, tid]
    assert len(selects) == 3
    for sql, columns in selects:
        assert "base_messages" not in columns, sql
        assert "session_id" in columns and "title" in columns
    # The engine's restore still reads them: the resumed thread's next turn sees the session's messages.
    snapshot = await rt.get_session_snapshot(resumed, timeout=LIMIT)
    assert [m["content"][0]["text"] for m in snapshot.messages] == ["hello there", "You said: hello there"]


async def test_a_search_reads_each_text_by_the_sessions_rowid(rt, monkeypatch):
    """SQLite migration 11 (issue 16, bench row 9): the search text is in ``session_texts``, keyed by the
    ``sessions`` row's rowid, and a search joins it by that key: one lookup by rowid per row it reaches,
    whichever plan runs (a scan of a short query, few trigram candidates, many). Keyed by the session id, a
    second B-tree descent per row made a search of row 8's 10,000 sessions 1.3-1.8x as slow."""
    if rt.store.kind != "sqlite":
        pytest.skip("SQLite's layout (PostgreSQL keys the text by id and finds the matching ids by its index)")
    import runtime.sessions.service as service

    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "the haystack has a needle in it")
    await rt.sessions.save(thread_id=tid, session_id="with-needle", timeout=LIMIT)

    async def plan_of(search: str) -> str:
        with traced_reads(rt) as statements:
            found = await rt.sessions.list(limit=50, search=search)
        assert [m["id"] for m in found] == ["with-needle"]
        (sql,) = [sql for sql, _ in statements if "session_texts" in sql and sql.lstrip().startswith("SELECT")]
        return await rt.store.read(lambda conn: "\n".join(
            row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)))

    for search in ("ne", "needle"):  # a scan; few candidates
        assert "SEARCH session_texts USING INTEGER PRIMARY KEY (rowid=?)" in await plan_of(search)
    monkeypatch.setattr(service, "FEW_CANDIDATES", 0)  # many candidates: the listing's index in order
    plan = await plan_of("needle")
    assert "SEARCH session_texts USING INTEGER PRIMARY KEY (rowid=?)" in plan
    assert "sessions_by_update" in plan
