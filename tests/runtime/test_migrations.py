"""Schema migration 9 (SQLite) / 3 (PostgreSQL), issue 16: ``items_by_turn`` and ``thread_states``, applied to a
store of the previous version that holds a thread, which reads and runs as before afterwards."""

from __future__ import annotations

import json
import sqlite3


from runtime.store import migrations
from tests import support

TS = "2026-01-01T00:00:00.000Z"


def _old_thread(conn, turns: int) -> list[str]:
    """A thread of ``turns`` finished turns written as the previous version did (rows only, no boundary state)."""
    conn.execute("INSERT INTO threads (id, created_at, updated_at, model, mode, archived, latest_turn_id, base_tokens)"
                 " VALUES ('thr_old', ?, ?, 'scripted', 'default', 0, NULL, 0)", (TS, TS))
    ids = []
    for n in range(1, turns + 1):
        ids.append(f"turn_{n}")
        conn.execute("INSERT INTO turns (id, thread_id, ord, status, input_summary, created_at, input_tokens,"
                     " output_tokens) VALUES (?, 'thr_old', ?, 'completed', 'p', ?, 1, 2)", (f"turn_{n}", n, TS))
        for k, (kind, text) in enumerate((("user_message", f"p{n}"), ("agent_message", f"You said: p{n}"))):
            conn.execute("INSERT INTO items (id, turn_id, thread_id, ord, kind, status, summary, detail)"
                         " VALUES (?, ?, 'thr_old', ?, ?, 'completed', ?, ?)",
                         (f"item_{n}_{k}", f"turn_{n}", 2 * n - 1 + k, kind, text, text))
    conn.execute("UPDATE threads SET latest_turn_id = ? WHERE id = 'thr_old'", (ids[-1],))
    return ids


async def test_sqlite_migration_9_from_version_8_keeps_the_data_and_adds_the_index_and_table(tmp_path):
    conn = sqlite3.connect(tmp_path / "runtime.sqlite3", isolation_level=None)
    for version, script in enumerate(migrations.MIGRATIONS[:8], start=1):
        conn.executescript(script)
        conn.execute(f"PRAGMA user_version = {version}")
    ids = _old_thread(conn, 25)
    conn.close()

    async with support.open_runtime(tmp_path, store_url=None) as rt:  # this test is of the SQLite schema
        detail = await rt.get_thread("thr_old")
        assert [t["id"] for t in detail["turns"]] == ids[5:]
        assert [i["detail"] for i in detail["items"]][:2] == ["p6", "You said: p6"]
        snapshot = await rt.get_session_snapshot("thr_old")
        assert len(snapshot.messages) == 50 and snapshot.total_tokens == 75

    conn = sqlite3.connect(tmp_path / "runtime.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.SCHEMA_VERSION == 11
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(items)")}
    assert "items_by_turn" in indexes
    columns = [row[1] for row in conn.execute("PRAGMA table_info(thread_states)")]
    assert columns == ["thread_id", "through_turn_ord", "total_tokens", "messages"]
    plan = " ".join(str(row) for row in conn.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM items WHERE turn_id IN (SELECT value FROM json_each(?)) ORDER BY ord",
        (json.dumps(ids),)))
    assert "items_by_turn" in plan
    conn.close()


def test_postgresql_migration_3_from_version_2_keeps_the_data_and_adds_the_index_and_table(pg_cluster):
    import psycopg

    name = f"mig_{id(pg_cluster)}"
    with pg_cluster.admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        with psycopg.connect(pg_cluster.url(name), autocommit=True) as conn:
            for script in migrations.PG_MIGRATIONS[:2]:
                conn.execute(script)
            conn.execute("CREATE TABLE trio_runtime_schema (version BIGINT NOT NULL)")
            conn.execute("INSERT INTO trio_runtime_schema (version) VALUES (2)")

            class Qmark:  # _old_thread's ``?`` placeholders on psycopg
                def execute(self, sql, params=()):
                    return conn.execute(sql.replace("?", "%s"), params)

            ids = _old_thread(Qmark(), 3)
            migrations.migrate_pg(conn)
            assert conn.execute("SELECT version FROM trio_runtime_schema").fetchone()[0] == \
                migrations.PG_SCHEMA_VERSION == 4
            assert conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'items' AND indexname ="
                                " 'items_by_turn'").fetchone() is not None
            columns = [row[0] for row in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'thread_states'"
                " ORDER BY ordinal_position")]
            assert columns == ["thread_id", "through_turn_ord", "total_tokens", "messages"]
            assert [row[0] for row in conn.execute("SELECT id FROM turns ORDER BY ord")] == ids
            assert conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 6
            migrations.migrate_pg(conn)  # again: nothing to do
            assert conn.execute("SELECT version FROM trio_runtime_schema").fetchone()[0] == migrations.PG_SCHEMA_VERSION
    finally:
        pg_cluster.drop_database(name)
