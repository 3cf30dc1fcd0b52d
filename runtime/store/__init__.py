"""The durable store: the write path, the schema and the read model over it.

- ``sqlite.py`` — the one backend today: SQLite (WAL) behind one group-committing writer task.
- ``migrations.py`` — the SQLite schema and its numbered migrations, applied at open.
- ``records.py`` — the read model: the queries that turn stored rows into the API's records.

The rest of the runtime imports the names below from ``runtime.store``, never from a backend module, so
a second backend (a ``postgres.py`` beside ``sqlite.py``, issue 15) can be chosen here without touching
its callers. There is no PostgreSQL code yet.
"""

from .sqlite import (
    MAX_BATCH, OUTCOME_UNKNOWN, PUBLISH_SLICE, RESTART_ERROR, STREAMED_KINDS, Event, EventDraft, Statement,
    Store, WithEvents, WriteLane, WriteRequest, append_event, is_disk_full, read_snapshot, row_to_event,
    storage_error,
)

__all__ = [
    "MAX_BATCH", "OUTCOME_UNKNOWN", "PUBLISH_SLICE", "RESTART_ERROR", "STREAMED_KINDS", "Event", "EventDraft",
    "Statement", "Store", "WithEvents", "WriteLane", "WriteRequest", "append_event", "is_disk_full",
    "read_snapshot", "row_to_event", "storage_error",
]
