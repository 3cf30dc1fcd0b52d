"""Idempotency records: the stored answer of a request made with an ``Idempotency-Key``.

A ``Claim`` travels with an operation into the one store write that makes its change, and adds its
record to that same transaction (``statement`` for writes built on the event loop, ``record`` inside a
writer-thread ``fn``): the change and its answer commit together or not at all. So a retry after any
failure either finds the answer (the change happened) or finds nothing and runs again (it did not).
The runtime never sees HTTP: ``status`` and ``encode`` are whatever the caller will answer with.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from typing import Any, Callable

from .clock import utc_after, utc_now

# How long an answer is kept (API.md: 24 hours).
IDEMPOTENCY_TTL = 24 * 3600.0


@dataclasses.dataclass(eq=False)
class Claim:
    key: str
    fingerprint: str
    status: int
    # The result of the operation -> the bytes of the answer. Called once, where the record is written.
    encode: Callable[[Any], bytes]
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    ttl: float = IDEMPOTENCY_TTL
    # The encoded answer, set when the record's statement is built; valid only if that write committed.
    body: bytes | None = None

    def statement(self, result: Any) -> tuple[str, tuple[Any, ...]]:
        """The INSERT that stores the answer for ``result`` (encoded now). OR REPLACE: a row still there
        for this key has expired (a live one is answered before any operation runs)."""
        self.body = self.encode(result)
        return ("INSERT OR REPLACE INTO idempotency (key, fingerprint, status, headers, body, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self.key, self.fingerprint, self.status, json.dumps(self.headers), self.body, utc_now(),
                 utc_after(self.ttl)))

    def record(self, conn: sqlite3.Connection, result: Any) -> None:
        """Store the answer inside a writer-thread ``fn`` (the change's own transaction)."""
        conn.execute(*self.statement(result))


def record_claim(claim: Claim | None, result: Any) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements to add to a change's write: none without a claim."""
    return [] if claim is None else [claim.statement(result)]
