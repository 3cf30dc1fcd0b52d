"""PostgreSQL's trigram index of the session search text (issue 16) on the real cluster.

A database at the schema version before the index, or before the search text moved to ``session_texts``
(PG migration 4, issue 16 bench row 9), holding sessions, migrates to the current one: pg_trgm is created
(the test cluster's role is its superuser), the GIN index ``session_texts_search`` covers the rows already
there, the service's own search SQL can be answered from it (EXPLAIN, with the other plans off: at
a few rows the planner rightly prefers them), and the answers are the scan's.
"""

from __future__ import annotations

import psycopg
import pytest

from runtime.sessions.docs import index_text, index_values, upsert_index
from runtime.store import migrations
from runtime.store.postgres import connect

# The service's search (runtime/sessions/service.py ``list`` with include_archived, on PostgreSQL).
SEARCH = ("SELECT id FROM sessions WHERE id IN (SELECT id FROM session_texts WHERE search_text LIKE ? ESCAPE '\\')"
          " ORDER BY updated_at DESC, id LIMIT ?")
TEXTS = {"a": "Review the BUDGET", "b": "100% done_now", "c": "c:\\temp and Straße", "d": "nothing here"}


# The PostgreSQL schema version that adds the index (found by content, wherever it lands among others).
SEARCH_VERSION = next(n for n, script in enumerate(migrations.PG_MIGRATIONS, 1) if "gin_trgm_ops" in script)
# The one that moves the search text to ``session_texts``.
TEXTS_VERSION = next(n for n, script in enumerate(migrations.PG_MIGRATIONS, 1)
                     if "CREATE TABLE session_texts" in script)


def version_before(dsn: str, version: int) -> None:
    """A database as migrate_pg left it at ``version``."""
    with psycopg.connect(dsn, autocommit=True) as raw:
        raw.execute("CREATE TABLE trio_runtime_schema (version BIGINT NOT NULL)")
        raw.execute("INSERT INTO trio_runtime_schema (version) VALUES (%s)", (version,))
        for script in migrations.PG_MIGRATIONS[:version]:
            raw.execute(script)


def document(sid: str, text: str, n: int) -> dict:
    return {"metadata": {"id": sid, "title": f"title {sid}", "created_at": "2030", "updated_at": f"2030-{n:02d}",
                         "revision": 1},
            "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}


def add_session(conn, sid: str, text: str, n: int) -> None:
    conn.execute("BEGIN")
    upsert_index(conn, document(sid, text, n), 10, 0, None)
    conn.execute("COMMIT")


def add_old_session(conn, sid: str, text: str, n: int) -> None:
    """As the index row was written before PG migration 4: the search text in the ``sessions`` row."""
    doc = document(sid, text, n)
    values = index_values(doc, 10, 0)
    conn.execute("BEGIN")
    conn.execute(f"INSERT INTO sessions ({', '.join(values)}, search_text) VALUES ({', '.join('?' for _ in values)},"
                 " CAST(? AS TEXT))", (*values.values(), index_text(doc["metadata"]["title"], doc["messages"])
                                       .decode("utf-8")))
    conn.execute("COMMIT")


def search(conn, term: str, sql: str = SEARCH) -> list[str]:
    pattern = "%" + term.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return [row[0] for row in conn.execute(sql, (pattern, 50))]


# The search before PG migration 4, on the text in the ``sessions`` row.
OLD_SEARCH = "SELECT id FROM sessions WHERE search_text LIKE ? ESCAPE '\\' ORDER BY updated_at DESC, id LIMIT ?"


@pytest.mark.parametrize("before", ["the index", "the text table"])
def test_the_migration_indexes_the_sessions_already_stored(pg_dsn, before):
    version_before(pg_dsn, (SEARCH_VERSION if before == "the index" else TEXTS_VERSION) - 1)
    parts = dict(item.split("=", 1) for item in pg_dsn.split())
    url = f"postgresql://{parts['user']}@{parts['host']}:{parts['port']}/{parts['dbname']}"
    conn = connect(url)
    try:
        for n, (sid, text) in enumerate(TEXTS.items()):
            add_old_session(conn, sid, text, n)
        before = {term: search(conn, term, OLD_SEARCH) for term in ("budget", "%", "_", "\\", "straße", "o", "zzz", "e")}
        assert before["budget"] == ["a"] and before["%"] == ["b"] and before["\\"] == ["c"]
        assert before["zzz"] == [] and before["e"] == ["d", "c", "b", "a"]
        before = dict(before)

        with psycopg.connect(pg_dsn, autocommit=True) as raw:
            migrations.migrate_pg(raw)
            current = migrations.PG_SCHEMA_VERSION
            assert raw.execute("SELECT version FROM trio_runtime_schema").fetchone()[0] == current
            assert raw.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'").fetchone() is not None
            (definition,) = raw.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'session_texts_search'"
                                        ).fetchone()
            assert raw.execute("SELECT 1 FROM pg_indexes WHERE indexname = 'sessions_search'").fetchone() is None
            assert raw.execute("SELECT 1 FROM information_schema.columns WHERE table_name = 'sessions' AND"
                               " column_name = 'search_text'").fetchone() is None
            assert "USING gin (search_text gin_trgm_ops)" in definition
            migrations.migrate_pg(raw)  # a second start migrates nothing
            assert raw.execute("SELECT version FROM trio_runtime_schema").fetchone()[0] == current

        conn.execute("SET enable_seqscan = off")  # and plain index scans: a bitmap of an index is left
        conn.execute("SET enable_indexscan = off")
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + SEARCH, ("%needle%", 50)))
        assert "Bitmap Index Scan on session_texts_search" in plan, plan
        assert {term: search(conn, term) for term in before} == before
        add_session(conn, "e", "a new BUDGET line", 9)  # written after the migration: indexed as well
        assert search(conn, "budget") == ["e", "a"]
        conn.execute("BEGIN")
        conn.execute("DELETE FROM sessions WHERE id = 'a'")  # its text goes with it
        conn.execute("COMMIT")
        assert search(conn, "budget") == ["e"]
        assert conn.execute("SELECT COUNT(*) FROM session_texts").fetchone()[0] == 4
    finally:
        conn.close()
