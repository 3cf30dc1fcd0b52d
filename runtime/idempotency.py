"""Idempotency records: the stored answer of a request made with an ``Idempotency-Key``.

A ``Claim`` travels with an operation into the one store write that makes its change, and adds its
record to that same transaction (``statement`` for writes built on the event loop, ``record`` inside a
writer-thread ``fn``): the change and its answer commit together or not at all. So a retry after any
failure either finds the answer (the change happened) or finds nothing and runs again (it did not).
The runtime never sees HTTP: ``status`` and ``encode`` are whatever the caller will answer with.

``Idempotency`` (one per Runtime) decides what a keyed request does before it runs. A key is taken in
an in-memory in-flight table first, synchronously (no checkpoint between the check and the set), so
two requests with one key can never both run: the second gets IdempotencyKeyInProgress. Only then is
the stored answer looked up (same request: replay it; different request: IdempotencyKeyReused). The
slot is given back when the request ends, however it ends, with one exception that closes the last
race: a request that gave up (cancelled, timed out) while the write carrying its claim was queued but
not yet committed keeps its key "in progress" until that write is done, and an op it queued that its
engine has not taken yet is dropped by the engine (``Claim.abandoned``). So a retry never runs beside
a change that may still commit: it waits for it (409) and then replays it, or it runs alone.

Expired records are deleted by purge writes of their own, one queued at a time, each spending the
allowance of the records claimed since the previous one (``Idempotency.claimed``); on SQLite only once a
record can have expired (each purge finds the earliest expiry left).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import sqlite3
from typing import TYPE_CHECKING, Any, Callable

import outcome

from .clock import parse_utc, utc_moment, utc_now, utc_stamp
from .errors import IdempotencyKeyInProgress, IdempotencyKeyReused, StorageError
from .store import NOT_INLINE, WriteRequest

if TYPE_CHECKING:
    from .store import Store

# How long an answer is kept (API.md: 24 hours). RuntimeConfig.idempotency_ttl overrides it (tests).
IDEMPOTENCY_TTL = 24 * 3600.0
# Expired records each new record may delete at most (its allowance, spent by ``Idempotency``'s purge
# writes). Every record allows up to this many, so expired rows drain faster than they are made.
PURGE_BATCH = 16
# Records whose allowance one purge write spends at most (PURGE_BATCH * this rows): no write pays for a
# big backlog at once; what is left is spent by the next purge.
PURGE_RECORDS_MAX = 64
# A stored answer bigger than this is read in a worker thread, not on the event loop (a replayed PUT of
# a 12 MB session); below it the inline read is cheaper than the thread hop (see Store.read).
INLINE_BODY_MAX = 256 * 1024

# The stored headers of an answer without any (most of them): ``json.dumps({})``, spelled once.
NO_HEADERS = "{}"

PURGE = ("DELETE FROM idempotency WHERE key IN (SELECT key FROM idempotency WHERE expires_at <= ?"
         " ORDER BY expires_at LIMIT ?)")


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
    # Headers that depend on the result (a saved session's ETag), merged into ``headers`` when encoded.
    headers_of: Callable[[Any], dict[str, str]] | None = None
    # The store's WriteRequest that carries this claim, once queued: until it is done its key stays in
    # progress, even if the request that made the claim is gone (see the module docstring).
    pending: Any = None
    # The request gave up before its change was made: an engine that has not taken the op yet drops it.
    abandoned: bool = False

    def statement(self, result: Any) -> tuple[str, tuple[Any, ...]]:
        """The INSERT that stores the answer for ``result`` (encoded now). ON CONFLICT replaces (portable on
        both stores, as INSERT OR REPLACE is not): a row still there for this key has expired
        (a live one is answered before any operation runs)."""
        self.body = self.encode(result)
        if self.headers_of is not None:
            self.headers = {**self.headers, **self.headers_of(result)}
        # The expiry is the creation moment plus the ttl exactly: one reading of the clock, not two.
        moment = utc_moment()
        created = utc_stamp(moment)
        return ("INSERT INTO idempotency (key, fingerprint, status, headers, body, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint,"
                " status = excluded.status, headers = excluded.headers, body = excluded.body,"
                " created_at = excluded.created_at, expires_at = excluded.expires_at",
                (self.key, self.fingerprint, self.status, json.dumps(self.headers) if self.headers else NO_HEADERS,
                 self.body, created, utc_stamp(moment + datetime.timedelta(seconds=self.ttl))))

    def record(self, conn: sqlite3.Connection, result: Any) -> None:
        """Store the answer inside a writer-thread ``fn`` (the change's own transaction)."""
        conn.execute(*self.statement(result))


def purge_statement(now: str | None = None, limit: int = PURGE_BATCH) -> tuple[str, tuple[Any, ...]]:
    """Delete at most ``limit`` records expired at ``now`` (default: the clock's now; oldest first, by the
    expiry index)."""
    return PURGE, (utc_now() if now is None else now, limit)


def purge_and_find_earliest(conn: sqlite3.Connection, now: str, limit: int) -> str | None:
    """The purge write's ``fn`` on SQLite: delete at most ``limit`` records expired at ``now`` (oldest first);
    when it deleted none, answer the earliest expiry left (None: no record), one step down the expiry
    index, else ``now`` (purge again: under a steady load records expire as steadily as they were made, and
    such a purge costs the writer what it did before, with no extra statement). Every record
    committed later is this process's own (one process owns the file), which expires no earlier than the
    service's start plus the ttl: so until the earlier of the two, no purge can delete anything."""
    if conn.execute(*purge_statement(now, limit)).rowcount:
        return now  # more may be expiring right behind (records expire as steadily as they were made)
    return conn.execute("SELECT min(expires_at) FROM idempotency").fetchone()[0]


def record_claim(claim: Claim | None, result: Any) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements to add to a change's write: none without a claim; with one, the claim's record
    (``Claim.statement``). Expired records are purged by writes of their own (``Idempotency.claimed``)."""
    return [] if claim is None else [claim.statement(result)]


@dataclasses.dataclass(frozen=True)
class Stored:
    """A stored answer, to be sent again byte for byte."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclasses.dataclass(eq=False)
class Slot:
    """A key held by a running request (``Idempotency.hold``); ``claim`` makes its Claim."""

    key: str
    fingerprint: str
    ttl: float
    made: Claim | None = None
    service: "Idempotency | None" = None

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.service is not None:
            self.service.release(self, finished=exc_type is None)

    def claim(self, status: int, encode: Callable[[Any], bytes], headers: dict[str, str] | None = None,
              headers_of: Callable[[Any], dict[str, str]] | None = None) -> Claim:
        self.made = Claim(self.key, self.fingerprint, status, encode, dict(headers or {}), self.ttl,
                          headers_of=headers_of)
        if self.service is not None:
            self.service.claimed()
        return self.made


class Idempotency:
    """The in-flight table and the stored answers of keyed requests (see the module docstring)."""

    def __init__(self, store: "Store", ttl: float = IDEMPOTENCY_TTL) -> None:
        self._store = store
        self.ttl = ttl
        self._running: dict[str, Slot] = {}
        # Keys whose request ended while the write carrying its claim was still queued: in progress
        # until that write is done. Only requests that gave up mid-write leave an entry here.
        self._settling: dict[str, Claim] = {}
        # The last purge write queued (``claimed``), and the records claimed since whose allowance of
        # PURGE_BATCH deletions no purge has spent yet.
        self._purge: WriteRequest | None = None
        self._owed = 0
        # SQLite only (one process owns the file): no record stored or still to come expires before this
        # moment, so a purge before it could delete nothing and none is queued. None (unknown, at first):
        # every claim may purge. Learned from each purge write that committed (the earliest expiry left
        # after its DELETE, ``purge_and_find_earliest``), and never later than this service's start plus
        # the ttl, before which none of its own records expire. On PostgreSQL other hosts add records with
        # ttls of their own: every claim's purge runs there, as before.
        self._learns = getattr(store, "kind", None) == "sqlite"
        self._quiet_until: datetime.datetime | None = None
        self._own_floor = utc_moment() + datetime.timedelta(seconds=ttl)

    def claimed(self) -> None:
        """A record is coming (a Claim was made): its allowance of PURGE_BATCH expired records joins the
        debt, and unless a purge write is still queued, one is queued now that spends it (at most
        PURGE_RECORDS_MAX records' worth; the rest waits for the next one).

        One purge write at a time, not a DELETE in every record's transaction: 50 keyed creates at once
        share the purge of their writer batch (row 15 of the benchmarks, docs/design.md "Idempotency").
        On SQLite none at all while no record can have expired (``_quiet_until``): the debt waits, and the
        first purge after that moment spends it (at most PURGE_RECORDS_MAX records' worth at a time).
        The purge is a write of its own: whether it commits, fails or runs before or after the record,
        nothing anyone can read changes (a lookup ignores an expired record), so it is all-or-nothing
        with nothing to undo. Synchronous (``Store.submit``): no schedule point, so a cancellation never
        lands between the debt's update and the queued purge."""
        self._owed += 1
        purge = self._purge
        if purge is not None:
            if not purge.finished:
                return
            self._purge = None
            if self._learns and isinstance(purge.result, outcome.Value):
                earliest = purge.result.value
                self._quiet_until = self._own_floor if earliest is None else min(parse_utc(earliest),
                                                                                 self._own_floor)
        if self._quiet_until is not None and utc_moment() < self._quiet_until:
            return  # nothing stored can have expired yet: the debt waits for the first purge that can delete
        now = utc_now()
        spent = min(self._owed, PURGE_RECORDS_MAX)
        try:
            if self._learns:
                request = WriteRequest(fn=functools.partial(purge_and_find_earliest, now=now,
                                                            limit=PURGE_BATCH * spent),
                                       action="purge expired idempotency records")
            else:
                request = WriteRequest([purge_statement(now, PURGE_BATCH * spent)],
                                       action="purge expired idempotency records")
            self._purge = self._store.submit(request)
        except StorageError:  # the store is closed: the record's own write fails the same way
            return
        self._owed -= spent

    def in_progress(self, key: str) -> bool:
        if key in self._running:
            return True
        claim = self._settling.get(key)
        return claim is not None and not claim.pending.done.is_set()

    def hold(self, key: str, fingerprint: str) -> Slot:
        """Hold ``key`` for a ``with`` block, ``with service.hold(key, fp) as slot:`` (IdempotencyKeyInProgress
        if a request holds it already). The check and the set happen in one step, with no checkpoint between
        them; leaving the block, however it is left, gives the key back (``Slot.__exit__``: a plain object's
        ``with``, not a generator's, which cost a keyed request ~5 more calls)."""
        for done in [k for k, c in self._settling.items() if c.pending.done.is_set()]:
            del self._settling[done]
        if self.in_progress(key):
            raise IdempotencyKeyInProgress(f"A request with Idempotency-Key '{key}' is still in progress; "
                                           f"retry once it has finished")
        slot = self._running[key] = Slot(key, fingerprint, self.ttl, service=self)
        return slot

    def release(self, slot: Slot, finished: bool) -> None:
        """``slot``'s block ended (``finished``: without an exception). The key is free again, unless the write
        carrying its claim is still queued: then it stays in progress until that write is done (see the
        module docstring), and a request that did not finish marks its claim abandoned."""
        del self._running[slot.key]
        claim = slot.made
        if claim is not None:
            if not finished:
                claim.abandoned = True
            if claim.pending is not None and not claim.pending.done.is_set():
                self._settling[slot.key] = claim

    async def lookup(self, key: str, fingerprint: str) -> Stored | None:
        """The unexpired stored answer for ``key``, or None. IdempotencyKeyReused when the key answered a
        different request. Expired records are ignored here (and purged by later records' writes). Read the
        awaited way (``Store.read``); a caller that can take the answer without a schedule point tries
        ``lookup_now`` first and comes here only when it did not read (it is not tried again here)."""
        row = await self._store.read(functools.partial(_stored_head, key=key, now=utc_now()), inline=True)
        stored = _answer(row, key, fingerprint)
        if stored is not NOT_READ:
            return stored
        body = await self._store.read(functools.partial(_stored_body, key=key))
        if body is None:  # expired and purged between the two reads: as if it had not been found
            return None
        return Stored(row["status"], json.loads(row["headers"]), bytes(body))

    def lookup_now(self, key: str, fingerprint: str) -> Stored | None | Any:
        """``lookup`` without a schedule point, for a caller whose next step is one (web/idempotency.py: the
        keyed request's change follows), one trio reschedule less per keyed request: ``NOT_READ`` when it
        cannot answer synchronously (PostgreSQL, SQLite busy, an answer too big to read on the loop); then
        await ``lookup``. One statement on the loop's own SQLite connection, no transaction around it
        (``Store.read_inline``). Synchronous: a cancellation cannot reach it, and it changes nothing."""
        row = self._store.read_inline(functools.partial(_stored_head, key=key, now=utc_now()), one_statement=True)
        return NOT_READ if row is NOT_INLINE else _answer(row, key, fingerprint)


# What Idempotency.lookup_now answers when it could not read (await Idempotency.lookup instead).
NOT_READ: Any = object()


def _answer(row: Any, key: str, fingerprint: str) -> Stored | None | Any:
    """The stored answer of a ``_stored_head`` row (None: no record), or ``NOT_READ`` when its body is too big
    to have come with the row. IdempotencyKeyReused when the record answered a different request."""
    if row is None:
        return None
    if row["fingerprint"] != fingerprint:
        raise IdempotencyKeyReused(f"Idempotency-Key '{key}' was already used for a different request "
                                   f"(method, path or body); use a new key for a new request")
    if row["size"] > INLINE_BODY_MAX:
        return NOT_READ
    return Stored(row["status"], json.loads(row["headers"]), bytes(row["body"]))


def _stored_head(conn: sqlite3.Connection, key: str, now: str) -> sqlite3.Row | None:
    """The record's metadata, with its body only when small (see INLINE_BODY_MAX)."""
    return conn.execute(
        "SELECT fingerprint, status, headers, length(body) AS size,"
        " CASE WHEN length(body) <= ? THEN body END AS body FROM idempotency WHERE key = ? AND expires_at > ?",
        (INLINE_BODY_MAX, key, now)).fetchone()


def _stored_body(conn: sqlite3.Connection, key: str) -> bytes | None:
    row = conn.execute("SELECT body FROM idempotency WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]
