"""The durable store: the write path, the schema and the read model over it.

- ``sqlite.py`` — SQLite (WAL) behind one group-committing writer task: the default, one process.
- ``postgres.py`` — PostgreSQL (issue 15): the same API and writer, for several hosts on one database.
- ``migrations.py`` — both schemas and their numbered migrations, applied at open.
- ``records.py`` — the read model: the queries that turn stored rows into the API's records.

The rest of the runtime imports the names below from ``runtime.store``, never from a backend module, and
opens the configured backend with ``open_store``. Code that runs inside a store transaction (``fn(conn)``)
is shared by both backends: portable SQL with ``?`` placeholders (see docs/design.md, "PostgreSQL store").
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable

import psycopg

from .sqlite import (
    MAX_BATCH, NOT_INLINE, OUTCOME_UNKNOWN, PUBLISH_SLICE, RESTART_ERROR, STREAMED_KINDS, Event, EventDraft, Statement,
    Store, WithEvents, WriteLane, WriteRequest, append_event, is_disk_full, read_snapshot, recover_thread,
    encode_payload, insert_rows_sql, row_to_event, storage_error,
)

# What a storage failure raised inside a store transaction is, on either backend: catch this in shared code
# (never sqlite3.Error, which a PostgreSQL store never raises).
DatabaseError: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)


def is_postgres_url(url: str | None) -> bool:
    """``--store`` names PostgreSQL (a ``postgresql://`` or ``postgres://`` URL); None or "sqlite": SQLite."""
    return url is not None and url.split("://", 1)[0] in ("postgresql", "postgres")


def open_store(config: Any, publish: Callable[[list[Event]], None]):
    """``config``: a RuntimeConfig (not imported here: runtime.config imports the store's users).
    The configured backend's store as an async context manager (``async with open_store(...) as store``):
    SQLite at ``config.db_path`` unless ``config.store_url`` is a PostgreSQL URL."""
    if is_postgres_url(config.store_url):
        from .postgres import PostgresStore

        return PostgresStore.open(config.store_url, publish, config.write_queue,  # type: ignore[arg-type]
                                  host_id=config.host_id, stalled_after=config.lease_ttl)
    return Store.open(config.db_path, publish, config.write_queue, config.sqlite_connection_factory)


__all__ = [
    "MAX_BATCH", "OUTCOME_UNKNOWN", "PUBLISH_SLICE", "RESTART_ERROR", "STREAMED_KINDS", "DatabaseError", "Event",
    "EventDraft", "Statement", "Store", "WithEvents", "WriteLane", "WriteRequest", "append_event", "encode_payload",
    "insert_rows_sql",
    "is_disk_full", "is_postgres_url", "open_store", "read_snapshot", "recover_thread", "row_to_event",
    "storage_error",
]
