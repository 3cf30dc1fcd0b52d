"""Durable state in SQLite (WAL): threads, turns, items, the event log and the session index.

All writes go through one writer task that group-commits: it takes every write request queued while
the previous transaction ran and applies them in one thread hop and one transaction, each inside its
own savepoint so one failing request never undoes another. A streaming turn therefore pays neither a
thread hop nor a commit per token. Reads use a second connection (WAL lets it read while the writer
writes) and never wait for the writer.

Events are published to the EventBus only after their transaction committed, so a client that saw
``seq`` N will find N after any crash.

A storage failure (any SQLite error at any statement, at BEGIN or at COMMIT; a full disk; an I/O error)
fails the requests it touched and never the writer: each of them gets a StorageError (StorageFull for a
full disk) naming its action, none of them is reported committed, none of their events is published,
and the next batch starts on a clean connection. When SQLite rolls a whole transaction back by itself
(it may on SQLITE_FULL / SQLITE_IOERR, and always does when COMMIT fails that way), the requests whose
savepoints had already succeeded are lost with it, so they fail too; requests not yet applied go on in
a new transaction. A ``WriteLane`` keeps one producer's writes (an engine's) a prefix: after one of
them fails, the later ones fail without running, and the producer hears of it once (``on_failure``).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import math
import sqlite3
from pathlib import Path
from typing import Any, Callable, Sequence

import orjson
import outcome
import trio

from . import migrations
from ..clock import utc_now
from ..transcript import preview
from ..errors import REJECTIONS, RuntimeFailure, StorageError, StorageFull

log = logging.getLogger(__name__)

# Requests folded into one transaction at most; bounds the latency a huge backlog adds to the first one.
MAX_BATCH = 512
# What ``Store.read_inline`` answers when it did not read (no inline connection, or SQLite was busy).
NOT_INLINE: Any = object()
# Requests published between two yields to the scheduler after a big batch committed.
PUBLISH_SLICE = 64
# Rows of one multi-row event INSERT at most (``_append_lone``): 6 parameters a row stays under 999, the
# smallest SQLITE_MAX_VARIABLE_NUMBER any SQLite build has had (3.32 raised the default to 32,766).
ROWS_PER_INSERT = 128
RESTART_ERROR = "interrupted by process restart"
# The result of a tool that was running when the process died (API.md, "Tools and approvals"): it is never
# run again by itself, and the model is told so.
OUTCOME_UNKNOWN = "outcome unknown: the server restarted while the tool ran"
# PostgreSQL's SQLSTATE for a full disk (class 53, "insufficient resources": disk_full).
PG_DISK_FULL = "53100"
# Items whose text arrives as item.delta events (and is written to the item row when it closes).
STREAMED_KINDS = ("agent_message", "agent_reasoning")


# What orjson must hand back (TypeError) instead of encoding, because the stdlib encodes it differently or
# refuses it: dataclasses and datetimes (the stdlib raises), subclasses of str, int, dict and list (the
# stdlib may call their own methods).
FAST_JSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS


def fast_json(value: Any) -> bytes | None:
    """``value`` as compact UTF-8 JSON made by orjson (~10x faster than ``json.dumps`` on an event), or None
    where that would not mean what the stdlib's ``json.dumps(value, ensure_ascii=False, separators=(",",
    ":"))`` means: what orjson refuses (a lone surrogate, an int beyond 64 bits, a non-str key; see
    FAST_JSON_OPTIONS), and any result holding ``null``, because orjson writes NaN and the infinities as
    null where the stdlib writes ``NaN``/``Infinity`` (a ``null`` that is a real None, or text, takes the
    stdlib's way too; rare in events). Otherwise the same bytes (some floats spelled differently, ``1e-05``
    as ``0.00001``: the same number)."""
    try:
        data = orjson.dumps(value, option=FAST_JSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError
        return None
    return None if b"null" in data else data


@dataclasses.dataclass(frozen=True)
class Event:
    seq: int
    timestamp: str
    thread_id: str
    turn_id: str | None
    item_id: str | None
    event: str
    payload: dict[str, Any]
    # The payload's JSON as the writer stored it (``fast_json``), when it made it that way: ``envelope_json``
    # reuses it instead of encoding the payload again (issue 16: an event is encoded once).
    payload_json: bytes | None = dataclasses.field(default=None, compare=False, repr=False)

    def envelope(self) -> dict[str, Any]:
        env: dict[str, Any] = {"seq": self.seq, "timestamp": self.timestamp, "thread_id": self.thread_id}
        if self.turn_id is not None:
            env["turn_id"] = self.turn_id
        if self.item_id is not None:
            env["item_id"] = self.item_id
        env["event"] = self.event
        env["payload"] = self.payload
        return env

    @functools.cached_property
    def envelope_json(self) -> bytes | None:
        """``envelope()`` as compact UTF-8 JSON (``fast_json``), made once however many subscribers send the
        event (the bus hands them all this object), its payload part the stored bytes when there are some.
        None when ``fast_json`` declines: the caller encodes ``envelope()`` the stdlib's way."""
        env = self.envelope()
        if self.payload_json is not None:
            env["payload"] = orjson.Fragment(self.payload_json)
        return fast_json(env)


@dataclasses.dataclass
class EventDraft:
    """An event not yet in the log; the writer gives it its ``seq``."""

    thread_id: str
    event: str
    payload: dict[str, Any]
    turn_id: str | None = None
    item_id: str | None = None
    timestamp: str = dataclasses.field(default_factory=utc_now)


Statement = tuple[str, Sequence[Any]]


@dataclasses.dataclass
class WithEvents:
    """What a write's ``fn`` returns when its events depend on what it found: ``value`` becomes the
    request's result, and ``events`` are appended to the log before the request's own ``events``.
    ``appended``: events ``fn`` already put in the log itself with ``append_event`` (it needed their seq,
    or removed them again in the same transaction); they are published with the others."""

    value: Any
    events: Sequence[EventDraft] = ()
    appended: Sequence["Event"] = ()


@dataclasses.dataclass(eq=False)
class WriteLane:
    """One producer's writes in submission order (an engine's): a write of the lane is applied only
    if every earlier one committed, so the store always holds a prefix of them, never a later write
    without an earlier one (an item's end without its start, a turn's end after a lost item).

    The writer sets ``failed`` at the lane's first failure; every later write of the lane then fails
    at once without running (``WriteRequest.skipped``). ``on_failure(error)`` is called once, on the
    event loop, before the failed write's ``done`` is set: whoever waits on that write finds the
    producer already told. A lane never recovers; its producer is expected to retire."""

    on_failure: Callable[[RuntimeFailure], None] | None = None
    failed: RuntimeFailure | None = None
    notified: bool = False
    # (thread_id, epoch) of the lease the producer writes under (PostgreSQL, issue 15): the writer checks it
    # before each write of the lane and refuses the write with LeaseLost once the epoch is no longer the
    # lease's. The SQLite store ignores it (one process owns the whole file).
    fence: tuple[str, int] | None = None


@dataclasses.dataclass(eq=False)
class WriteRequest:
    statements: Sequence[Statement] = ()
    events: Sequence[EventDraft] = ()
    # Runs first inside the request's savepoint, in the writer thread; its return value is the result
    # (a ``WithEvents`` adds events). Raising one of ``errors.REJECTIONS`` (NotFound, Conflict, ...)
    # refuses the request: its savepoint is undone and the caller gets that error, and the request's
    # lane does not fail (nothing diverged: the request simply did not happen).
    fn: Callable[[sqlite3.Connection], Any] | None = None
    # What the request does, for error messages: "Failed to <action>: <cause>".
    action: str = "write to the store"
    lane: WriteLane | None = None
    # ``fn`` returns EventDrafts (events that depend on what it found); they are appended after it.
    fn_events: bool = False
    result: outcome.Outcome | None = None
    # The events it appended, set by the writer when the request ran (a list then; empty when it failed).
    committed: Sequence[Event] = ()
    # Failed without running because an earlier write of its lane had failed (nothing of it happened).
    skipped: bool = False
    # ``done``'s event, made on first use, and whether the writer finished the request (``finish``). A
    # streamed delta's request is never waited on: without its own trio.Event (2 objects the cyclic
    # collector tracks) and list, a queued delta is 4 such objects instead of 7, and a streaming turn
    # triggers fewer young collections, each of which lands in some op's round trip (bench row 2).
    _done: trio.Event | None = dataclasses.field(default=None, init=False, repr=False)
    _finished: bool = dataclasses.field(default=False, init=False, repr=False)

    @property
    def done(self) -> trio.Event:
        """Set once the writer finished the request (committed or failed; ``result`` says which)."""
        if self._done is None:
            self._done = trio.Event()
            if self._finished:
                self._done.set()
        return self._done

    @property
    def finished(self) -> bool:
        """The writer is done with the request (``done`` is set, without making its trio.Event)."""
        return self._finished

    def finish(self) -> None:
        """The writer is done with the request: ``done`` is set now, or made set when first asked for."""
        self._finished = True
        if self._done is not None:
            self._done.set()


def is_disk_full(exc: BaseException) -> bool:
    """A full disk: SQLITE_FULL (any extended code), ENOSPC, EDQUOT, or EFBIG (a file size limit)."""
    if isinstance(exc, StorageFull):
        return True
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_FULL
    if getattr(exc, "sqlstate", None) == PG_DISK_FULL:
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def storage_error(action: str, cause: BaseException, how: str | None = None) -> StorageError:
    """The one translation of a low-level storage failure met while doing ``action``: StorageFull for
    a full disk, StorageError otherwise; the message names the action, and ``cause`` is kept."""
    detail = cause.message if isinstance(cause, RuntimeFailure) else str(cause)
    cls = StorageFull if is_disk_full(cause) else StorageError
    error = cls(f"Failed to {action}: {how} ({detail})" if how else f"Failed to {action}: {detail}")
    error.__cause__ = cause
    return error


def _connect(path: Path, factory: type[sqlite3.Connection] = sqlite3.Connection) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a batch is exactly one transaction.
    # ``factory`` is the fault-injection seam (RuntimeConfig.sqlite_connection_factory): a subclass of
    # sqlite3.Connection whose ``execute`` can fail the k-th statement the way a full or broken disk does.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=factory)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: every COMMIT syncs the WAL, so events are on disk before they are published and a seq a client
    # saw is never reused, even after an OS crash (NORMAL synced only at checkpoints). Cost measured in
    # docs/design.md (Store, "Events are durable before they are published"); paid once per batch.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class Store:
    """Open with ``async with Store.open(path, publish=...) as store``.

    The writer below is shared with the PostgreSQL store (postgres.py subclasses this class): what differs
    is behind the hooks ``_begin``, ``_request_mark``/``_request_undo``, ``_check_fence`` and
    ``_before_commit`` and the error classes in ``db_errors``."""

    kind = "sqlite"
    # The driver's error classes: a failure of one of these is a storage failure (StorageError).
    db_errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    # A failed statement is undone alone and the transaction goes on (SQLite's statement journal), unless
    # the backend rolls the whole transaction back (seen as ``in_transaction`` False). Then a request that is
    # one event append needs no savepoint, and a run of them can be one multi-row INSERT (issue 16: per
    # event, 3 statements and 3 GIL hand-offs in the writer thread became a fraction of one). PostgreSQL
    # aborts the whole transaction on any failed statement: False there.
    statement_undone_alone = True

    def __init__(self, path: Path, publish: Callable[[list[Event]], None], write_queue: int,
                 connection_factory: type[sqlite3.Connection] = sqlite3.Connection) -> None:
        self.path = path
        self._connection_factory = connection_factory
        self._publish = publish
        # Unbounded so that submission never awaits: an engine can queue writes and mutate its state in
        # one synchronous step, which keeps their order. Producers that stream (turns) call
        # ``throttle`` so the backlog stays near ``write_queue`` (backpressure, bounded memory).
        self._write_tx, self._write_rx = trio.open_memory_channel[WriteRequest](math.inf)
        self._write_queue = write_queue
        # Requests queued and not yet taken by the writer: ``throttle`` runs twice per streamed word, and
        # the channel's ``statistics()`` built an object each time (~1 us of a word's ~14 us, bench row 2).
        self._queued = 0
        self._batch_done = trio.Event()
        self._read_limiter = trio.CapacityLimiter(1)
        self._write_limiter = trio.CapacityLimiter(1)  # see write_limiter
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._iconn: sqlite3.Connection | None = None  # inline reads, on the event loop's thread only
        self.recovered_turns = 0

    @property
    def where(self) -> str:
        """The store's location for messages and logs."""
        return str(self.path)

    @classmethod
    def open(cls, path: Path, publish: Callable[[list[Event]], None], write_queue: int = 4096,
             connection_factory: type[sqlite3.Connection] = sqlite3.Connection):
        return _StoreContext(cls(path, publish, write_queue, connection_factory))

    # ---- lifecycle -------------------------------------------------------------------------

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wconn = _connect(self.path, self._connection_factory)
        migrations.migrate(self._wconn)
        self.recovered_turns = self._recover(self._wconn)
        self._rconn = _connect(self.path, self._connection_factory)
        self._iconn = _connect(self.path, self._connection_factory)
        # Never sleep on a lock on the event loop: a busy inline read falls back to a worker thread.
        self._iconn.execute("PRAGMA busy_timeout=0")

    @staticmethod
    def _recover(conn: sqlite3.Connection) -> int:
        """Settle, at open, what a crash left running in every thread (``recover_thread`` for each thread
        with a queued or in-progress turn or item), in one transaction. Returns the number of turns
        interrupted. Only the SQLite store does this globally: one process owns the whole file; on
        PostgreSQL other hosts' turns are running, and a thread is recovered when its lease is taken over."""
        now = utc_now()
        conn.execute("BEGIN IMMEDIATE")
        try:
            thread_ids = [row[0] for row in conn.execute(
                "SELECT thread_id FROM items WHERE status IN ('queued', 'in_progress')"
                " UNION SELECT thread_id FROM turns WHERE status IN ('queued', 'in_progress') ORDER BY 1")]
            counts = [_recover_thread(conn, thread_id, now) for thread_id in thread_ids]
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back by itself (a full disk at COMMIT always does): a second
            # ROLLBACK would raise "no transaction is active" and hide the real error.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        interrupted = sum(count for count, _ in counts)
        going_on = sum(count for _, count in counts)
        if interrupted:
            log.warning("marked %d turn(s) interrupted after an unclean stop", interrupted)
        if going_on:
            log.warning("%d turn(s) go on after a tool whose outcome is unknown (the process stopped while it ran)",
                        going_on)
        return interrupted

    def _close_sync(self) -> None:
        for conn in (self._rconn, self._iconn, self._wconn):
            if conn is not None:
                conn.close()

    # ---- writes ----------------------------------------------------------------------------

    def submit(self, request: WriteRequest) -> WriteRequest:
        """Queue a write without waiting (never a scheduling point). Once queued, the write happens."""
        try:
            self._write_tx.send_nowait(request)
        except trio.ClosedResourceError as exc:
            raise StorageError(f"Failed to {request.action}: the store is closed") from exc
        self._queued += 1
        return request

    async def throttle(self) -> None:
        """Wait while the writer's backlog exceeds the configured queue size (backpressure)."""
        while self._queued > self._write_queue:
            await self._batch_done.wait()

    async def write(
        self,
        statements: Sequence[Statement] = (),
        events: Sequence[EventDraft] = (),
        fn: Callable[[sqlite3.Connection], Any] | None = None,
        *,
        action: str = "write to the store",
        fn_events: bool = False,
    ) -> tuple[Any, list[Event]]:
        """Queue a write and wait until it committed; returns ``(fn result, committed events)``.

        Raises StorageError (StorageFull for a full disk) naming ``action`` when it did not commit;
        nothing of it is then in the store. A cancellation after queuing does not undo the write:
        callers that must know the outcome wait under a shield (see ``write_shielded``).
        """
        request = self.submit(WriteRequest(statements, events, fn, action=action, fn_events=fn_events))
        await request.done.wait()
        assert request.result is not None
        return request.result.unwrap(), request.committed

    async def write_shielded(
        self,
        statements: Sequence[Statement] = (),
        events: Sequence[EventDraft] = (),
        fn: Callable[[sqlite3.Connection], Any] | None = None,
        *,
        timeout: float,
        action: str = "write to the store",
        fn_events: bool = False,
    ) -> tuple[Any, list[Event]]:
        """``write`` that a cancellation cannot interrupt: the caller always learns the outcome.

        The shield is safe because the writer never blocks on anything but SQLite and the file
        system; ``timeout`` bounds it anyway, and expiry raises StorageError (outcome unknown).
        """
        with trio.CancelScope(shield=True):
            with trio.move_on_after(timeout):
                return await self.write(statements, events, fn, action=action, fn_events=fn_events)
        raise StorageError(f"Failed to {action}: the store did not commit within {timeout:g} s")

    async def _writer(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        # Shielded: the writer stops when the store closes its queue (always, on leaving the store's
        # context), never by an outside cancellation, because shielded waiters (a turn recording its
        # end, a save's commit) rely on it until then. Bounded: each batch only waits on SQLite.
        with trio.CancelScope(shield=True):
            await self._write_loop()

    async def _write_loop(self) -> None:
        async with self._write_rx:
            async for first in self._write_rx:
                batch = [first]
                del first  # the batch holds the requests alone (freed slice by slice below)
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._write_rx.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                self._queued -= len(batch)
                # Never raises: every storage failure becomes the result of the requests it touched.
                await self._apply_batch_async(batch)
                while batch:
                    # A big batch is published in slices so other tasks (snapshots, replies) run in
                    # between; order is kept, and the slice cannot be cancelled. Each slice's requests
                    # are let go of in the slice's own step: freeing a whole batch of 512 streamed deltas
                    # at once (their drafts, events, payloads) was one step of up to ~0.4 ms (issue 16,
                    # bench row 2), longer than publishing them.
                    piece = batch[:PUBLISH_SLICE]
                    del batch[:PUBLISH_SLICE]
                    for request in piece:
                        if request.committed:
                            try:
                                self._publish(request.committed)
                            except Exception:  # a subscriber bug must not stop durability
                                log.exception("event publication failed")
                        elif isinstance(request.result, outcome.Error):
                            self._notify_lane(request)
                        request.finish()
                    del piece, request
                    if batch:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                self._batch_done.set()
                self._batch_done = trio.Event()

    async def _apply_batch_async(self, batch: list[WriteRequest]) -> None:
        """Apply ``batch`` (``_apply_batch``) from the writer task: in a worker thread, as SQLite's calls block
        (the PostgreSQL store awaits a plain batch's one query on the loop instead). Never raises."""
        await trio.to_thread.run_sync(self._apply_batch, batch)

    @staticmethod
    def _notify_lane(request: WriteRequest) -> None:
        """Tell a lane's producer of its first failure, before anyone waiting on the write wakes."""
        lane = request.lane
        if lane is None or lane.notified or lane.on_failure is None or lane.failed is None:
            return
        lane.notified = True
        try:
            lane.on_failure(lane.failed)
        except Exception:  # a producer's bug must not stop the writer
            log.exception("a write lane's failure handler failed")

    def _apply_batch(self, batch: list[WriteRequest]) -> None:
        """Apply ``batch`` in one transaction, or in several when SQLite rolls one back by itself mid-batch
        (the requests not yet applied go on in a new one). Runs in a worker thread and never raises: every
        request ends with a result, and the write connection is left outside any transaction."""
        pending = batch
        while pending:
            try:
                pending = self._apply_transaction(pending)
            except Exception as exc:  # not an SQLite error (a bug): fail what is left, start clean
                log.exception("the store's writer failed unexpectedly; failing %d write(s)", len(pending))
                for request in pending:
                    self._fail(request, storage_error(request.action, exc, "the store's writer failed"))
                self._drop_connection()
                pending = []

    def _apply_transaction(self, requests: list[WriteRequest]) -> list[WriteRequest]:
        """One transaction, each request in its own savepoint. Returns the requests not attempted
        because the transaction was lost before their turn (empty when all were settled)."""
        try:
            conn = self._writer_connection()
            self._begin(conn)
        except self.db_errors as exc:
            self._abort()
            for request in requests:
                self._fail(request, storage_error(request.action, exc, "the store could not begin a transaction"))
            return []
        applied: list[WriteRequest] = []
        appended_until = 0  # requests[:appended_until] were appended by one multi-row INSERT (``_append_lone``)
        one_by_one_until = 0  # ... or are to be applied one at a time (that INSERT failed and was undone alone)
        for index, request in enumerate(requests):
            if index < appended_until:
                continue
            lane = request.lane
            if lane is not None and lane.failed is not None:
                request.skipped = True
                self._fail(request, storage_error(request.action, lane.failed, "an earlier write of its thread failed"))
                continue
            lone = self.statement_undone_alone and _lone_event(request)
            if lone and index >= one_by_one_until:
                end = index + 1
                while end < len(requests) and end - index < ROWS_PER_INSERT and _lone_event(requests[end]) \
                        and (requests[end].lane is None or requests[end].lane.failed is None):
                    end += 1
                if end - index > 1:
                    run = requests[index:end]
                    try:
                        _append_lone(conn, run)
                    except Exception as exc:
                        if not conn.in_transaction:  # SQLite rolled the transaction back by itself
                            self._abort()
                            for failed in run:
                                self._fail(failed, storage_error(failed.action, exc)
                                           if isinstance(exc, self.db_errors) else exc)
                            for earlier in applied:
                                self._fail(earlier, storage_error(
                                    earlier.action, exc, "the transaction was rolled back after another write failed"))
                            return requests[end:]
                        # The INSERT was undone alone: the run one request at a time, so that a failure
                        # stays with its own request (below).
                        one_by_one_until = end
                    else:
                        applied += run
                        appended_until = end
                        continue
            savepoint = False
            mark = None
            try:
                if lone:
                    # One statement needs no savepoint: SQLite undoes a failed statement alone (the except
                    # below fails only this request), or the whole transaction (handled there too).
                    request.committed = [append_event(conn, request.events[0])]
                    request.result = outcome.Value(None)
                    applied.append(request)
                    continue
                conn.execute("SAVEPOINT req")
                savepoint = True
                mark = self._request_mark(conn)
                self._check_fence(conn, request)
                value = request.fn(conn) if request.fn is not None else None
                appended: Sequence[Event] = ()
                if isinstance(value, WithEvents):
                    drafts = [*value.events, *request.events]
                    appended, value = value.appended, value.value
                else:
                    drafts = [*request.events, *(value or ())] if request.fn_events else request.events
                for sql, params in request.statements:
                    conn.execute(sql, params)
                request.committed = [*appended, *(append_event(conn, draft) for draft in drafts)]
                conn.execute("RELEASE req")
                request.result = outcome.Value(value)
                applied.append(request)
            except Exception as exc:
                error = storage_error(request.action, exc) if isinstance(exc, self.db_errors) else exc
                if conn.in_transaction and (not savepoint or self._rollback_savepoint(conn)):
                    if savepoint:
                        self._request_undo(conn, mark)
                    self._fail(request, error)  # only this request is undone; the others go on
                    continue
                # The transaction is gone: SQLite rolled it back by itself (it may on SQLITE_FULL or
                # SQLITE_IOERR), or the savepoint could not be undone. Everything applied in it is lost.
                self._abort()
                self._fail(request, error)
                for earlier in applied:
                    self._fail(earlier, storage_error(
                        earlier.action, exc, "the transaction was rolled back after another write failed"))
                return requests[index + 1:]
        try:
            self._before_commit(conn)
            conn.execute("COMMIT")
        except self.db_errors as exc:
            # On SQLITE_FULL / SQLITE_IOERR at COMMIT SQLite has already rolled back; _abort checks
            # ``in_transaction`` instead of assuming (a blind ROLLBACK raised and killed the writer).
            log.error("store commit failed: %s", exc)
            self._abort()
            for request in applied:
                self._fail(request, storage_error(request.action, exc, "the store could not commit"))
        return []

    @staticmethod
    def _fail(request: WriteRequest, error: Exception) -> None:
        request.result = outcome.Error(error)
        request.committed = []
        if isinstance(error, REJECTIONS):
            return  # refused, not failed: the lane's producer decided nothing on it (see WriteRequest.fn)
        if request.lane is not None and request.lane.failed is None:
            request.lane.failed = error if isinstance(error, RuntimeFailure) else storage_error(request.action, error)

    # ---- backend hooks (the PostgreSQL store overrides them) --------------------------------------

    def _begin(self, conn: Any) -> None:
        """Open the batch's transaction; IMMEDIATE takes SQLite's write lock now, not at the first write."""
        conn.execute("BEGIN IMMEDIATE")

    def _request_mark(self, conn: Any) -> Any:
        """What the backend tracks per transaction, before a request runs (restored if it is undone)."""
        return None

    def _request_undo(self, conn: Any, mark: Any) -> None:
        """The request's savepoint was rolled back: forget what it added since ``mark``."""

    def _check_fence(self, conn: Any, request: WriteRequest) -> None:
        """Refuse a write of a fenced lane whose lease epoch is gone (PostgreSQL only; see WriteLane.fence)."""

    def _before_commit(self, conn: Any) -> None:
        """Last statements of the batch's transaction (PostgreSQL: NOTIFY the threads written)."""

    def _rollback_savepoint(self, conn: Any) -> bool:
        """Undo the current request's savepoint; False when that is impossible (the transaction is lost)."""
        try:
            conn.execute("ROLLBACK TO req")
            conn.execute("RELEASE req")
        except self.db_errors as exc:
            log.error("store savepoint rollback failed: %s", exc)
            return False
        return True

    def _writer_connection(self) -> sqlite3.Connection:
        if self._wconn is None:  # dropped after a failure it could not recover from: open a fresh one
            self._wconn = _connect(self.path, self._connection_factory)
        return self._wconn

    def _abort(self) -> None:
        """Leave the write connection outside any transaction, whatever state a failure left it in."""
        conn = self._wconn
        if conn is None:
            return
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if not conn.in_transaction:
                return
        except self.db_errors as exc:
            log.error("store rollback failed: %s", exc)
        self._drop_connection()

    def _drop_connection(self) -> None:
        """Close the write connection (which rolls back whatever it holds); the next batch opens a new one."""
        conn, self._wconn = self._wconn, None
        if conn is not None:
            try:
                conn.close()
            except self.db_errors as exc:
                log.error("closing the store's write connection failed: %s", exc)

    # ---- reads -----------------------------------------------------------------------------

    def version(self) -> tuple[int, int] | None:
        """A token that changes whenever anything is committed to the database, by any connection or process
        (SQLite's ``PRAGMA data_version`` on the inline connection, which counts the others' commits, and
        that connection's own ``total_changes``): equal tokens read at two moments mean the database did not
        change in between (runtime/threads_detail.py keeps encoded answers on it). None when it cannot say:
        the store is not open (or is PostgreSQL's, which has no inline connection), the inline connection is
        inside a transaction (its view is pinned), or SQLite failed to answer."""
        conn = self._iconn
        if conn is None or conn.in_transaction:
            return None
        try:
            return conn.execute("PRAGMA data_version").fetchone()[0], conn.total_changes
        except sqlite3.Error:
            return None

    @property
    def read_limiter(self) -> trio.CapacityLimiter:
        """The limiter store reads hop through (tests that drive a MockClock watch it)."""
        return self._read_limiter

    @property
    def write_limiter(self) -> trio.CapacityLimiter:
        """Held while the writer waits on the database other than in a worker thread (PostgreSQL's batch
        query awaited on the loop); a worker thread holds trio's default limiter instead. Tests that drive a
        MockClock watch it: virtual time must not jump past a query the database is still answering."""
        return self._write_limiter

    async def read(self, fn: Callable[[sqlite3.Connection], Any], *, inline: bool = False) -> Any:
        """Run ``fn(conn)`` on the read connection in a worker thread (one hop), inside one read
        transaction: every SELECT ``fn`` makes sees the same snapshot of the database, so a read that
        combines tables (a thread's items and its ``latest_seq``, a rebuild's items, token totals and
        active-turn check) can never see a write that landed between two of its statements.

        ``inline=True`` is for small indexed reads whose result the caller encodes on the event loop
        anyway (one row, one thread's detail, one bounded page): it runs ``fn`` right here on its own
        connection. Under load the thread hop costs far more than such a read (GIL hand-offs on every
        SQLite step and syscall: GET /v1/threads/{id} went from ~470 to ~1,100 req/s). A WAL reader
        never waits for the writer; if SQLite still reports the database busy, the read goes to a
        worker thread instead of sleeping on the loop (its transaction is rolled back first, and
        ``fn`` runs again from the start there).

        A cancellation never leaves a transaction open: the inline read is synchronous, and the worker
        thread always runs to its end (trio does not abandon it), ending the transaction itself.
        """
        if inline and self._iconn is not None:
            await trio.lowlevel.checkpoint_if_cancelled()
            result = self.read_inline(fn)
            if result is not NOT_INLINE:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return result
        assert self._rconn is not None
        return await trio.to_thread.run_sync(read_snapshot, self._rconn, fn, limiter=self._read_limiter)

    def read_inline(self, fn: Callable[[sqlite3.Connection], Any], *, one_statement: bool = False) -> Any:
        """``fn(conn)`` now, on the event loop's own connection (the inline read of ``read``), without a
        schedule point; ``NOT_INLINE`` when it did not read: there is no such connection (PostgreSQL, whose
        reads are network round trips; a closed store) or SQLite reported the database busy. Then the caller
        awaits ``read``. For a caller whose next step is a schedule point anyway (the idempotency lookup
        before a keyed request's change: one reschedule less per request under load).

        ``one_statement``: ``fn`` runs a single SELECT, which SQLite reads on a snapshot of its own
        (autocommit), so no BEGIN and ROLLBACK around it: the lookup's 3 statements become 1 (~35k of the
        keyed request's ~270k extra instructions on the loop, callgrind, 50 connections). The statement is
        reset when its rows are fetched (or its cursor is dropped), so no read transaction outlives it.
        Synchronous: a cancellation cannot reach it, and it never leaves a transaction open."""
        conn = self._iconn
        if conn is None:
            return NOT_INLINE
        try:
            if one_statement and not conn.in_transaction:
                return fn(conn)
            return read_snapshot(conn, fn)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            return NOT_INLINE


def recover_thread(conn: Any, thread_id: str, now: str) -> int:
    """Settle what a stopped owner left running in one thread, with an event for each change, inside the
    caller's transaction (portable SQL: the SQLite store runs it for every thread at open, the PostgreSQL
    store's hosts when they take a thread's lease over from a dead owner):

    - a tool call whose start was recorded but not its result ran, or did not, when the owner stopped:
      it is never run again; its item ends ``failed`` with OUTCOME_UNKNOWN, which is also the tool's
      result the model gets, and its turn goes on (it stays ``in_progress``; its engine carries it on);
    - a turn waiting for an approval keeps waiting (the approval and its deadline are stored);
    - every other queued or in-progress turn and item becomes ``interrupted``.
    Returns the number of turns interrupted."""
    return _recover_thread(conn, thread_id, now)[0]


def _recover_thread(conn: Any, thread_id: str, now: str) -> tuple[int, int]:
    """``recover_thread``, also counting the turns that go on after a tool of unknown outcome."""
    items = conn.execute(
        "SELECT id, turn_id, thread_id, kind, metadata FROM items WHERE thread_id = ?"
        " AND status IN ('queued', 'in_progress') ORDER BY ord", (thread_id,)
    ).fetchall()
    going_on: set[str] = set()
    for item in items:
        meta = json.loads(item["metadata"]) if item["metadata"] else {}
        if item["kind"] == "tool_call" and meta.get("started_at") and "result" not in meta:
            meta.update(result=OUTCOME_UNKNOWN, is_error=True)
            conn.execute("UPDATE items SET status = 'failed', summary = ?, detail = ?, metadata = ?,"
                         " ended_at = ? WHERE id = ?",
                         (OUTCOME_UNKNOWN, OUTCOME_UNKNOWN, json.dumps(meta), now, item["id"]))
            append_event(conn, EventDraft(
                item["thread_id"], "item.failed", {"kind": item["kind"], "text": OUTCOME_UNKNOWN,
                                                   "metadata": meta},
                turn_id=item["turn_id"], item_id=item["id"], timestamp=now))
            going_on.add(item["turn_id"])
            continue
        # The text streamed so far is in the item's deltas (the item row gets its text when it
        # closes, which a crash prevented): the item keeps it, so its deltas still concatenate to
        # its stored text and the live history has the partial reply, as after an interrupt.
        if item["kind"] in STREAMED_KINDS:
            text = "".join(json.loads(row[0]).get("delta", "") for row in conn.execute(
                "SELECT payload FROM events WHERE item_id = ? AND event = 'item.delta' ORDER BY seq",
                (item["id"],)))
            conn.execute("UPDATE items SET summary = ?, detail = ? WHERE id = ?",
                         (preview(text), text, item["id"]))
        conn.execute(
            "UPDATE items SET status = 'interrupted', ended_at = ? WHERE id = ?", (now, item["id"])
        )
        append_event(conn, EventDraft(
            item["thread_id"], "item.interrupted", {"kind": item["kind"], "reason": RESTART_ERROR},
            turn_id=item["turn_id"], item_id=item["id"], timestamp=now))
    rows = [row for row in conn.execute(
        "SELECT id, thread_id, input_tokens, output_tokens FROM turns"
        " WHERE thread_id = ? AND status IN ('queued', 'in_progress') ORDER BY ord", (thread_id,)
    ).fetchall() if row["id"] not in going_on]
    for row in rows:
        conn.execute(
            "UPDATE turns SET status = 'interrupted', error = ?, ended_at = ? WHERE id = ?",
            (RESTART_ERROR, now, row["id"]),
        )
        append_event(conn, EventDraft(
            row["thread_id"], "turn.completed",
            {"status": "interrupted", "error": RESTART_ERROR,
             "usage": {"input_tokens": row["input_tokens"] or 0,
                       "output_tokens": row["output_tokens"] or 0}},
            turn_id=row["id"], timestamp=now))
    return len(rows), len(going_on)


def read_snapshot(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> Any:
    """``fn(conn)`` inside one read transaction (``BEGIN`` ... ``ROLLBACK``; the connections run with
    isolation_level=None, where each bare SELECT would be its own snapshot). In WAL mode the snapshot is
    taken at the first SELECT and held until the end. A read has nothing to commit, so it always ends
    with ROLLBACK, which also works after an error (and never looks like a write's COMMIT to the
    store's fault seams). Whatever ``fn`` does or raises, the connection leaves here outside any
    transaction, so no later read is pinned to an old snapshot."""
    if conn.in_transaction:  # never expected; a stale snapshot must not outlive whatever left it
        conn.execute("ROLLBACK")
    conn.execute("BEGIN")
    try:
        return fn(conn)
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def append_event(conn: sqlite3.Connection, draft: EventDraft) -> Event:
    """Append one event to the log inside the caller's transaction (the writer thread); it gets its seq now.
    On PostgreSQL the connection adapter does it (it first locks the thread's lease row: the seq rule)."""
    backend_append = getattr(conn, "append_event", None)
    if backend_append is not None:
        return backend_append(draft)
    data, payload = encode_payload(draft.payload)
    cur = conn.execute(
        "INSERT INTO events (thread_id, turn_id, item_id, event, timestamp, payload) VALUES (?, ?, ?, ?, ?, ?)",
        (draft.thread_id, draft.turn_id, draft.item_id, draft.event, draft.timestamp, payload),
    )
    return Event(cur.lastrowid, draft.timestamp, draft.thread_id, draft.turn_id, draft.item_id,
                 draft.event, draft.payload, data)


def encode_payload(payload: dict[str, Any]) -> tuple[bytes | None, str]:
    """An event payload's JSON: ``fast_json``'s bytes (None where it declines) and the text to store, the
    same JSON, or else the stdlib's (ASCII, as every payload was stored before issue 16: a lone surrogate
    is stored escaped, as ``\\ud83d``). Both read back as the same payload."""
    data = fast_json(payload)
    return data, data.decode() if data is not None else json.dumps(payload, separators=(",", ":"))


def _lone_event(request: WriteRequest) -> bool:
    """The request is one event append and nothing else (a streamed delta, most writes of a turn)."""
    return request.fn is None and not request.statements and len(request.events) == 1


@functools.lru_cache(maxsize=ROWS_PER_INSERT)
def insert_rows_sql(rows: int) -> str:
    """``INSERT INTO events`` of ``rows`` rows (the same text for the same count: sqlite3's statement cache)."""
    return ("INSERT INTO events (thread_id, turn_id, item_id, event, timestamp, payload) VALUES "
            + ", ".join(["(?, ?, ?, ?, ?, ?)"] * rows))


def _append_lone(conn: sqlite3.Connection, run: Sequence[WriteRequest]) -> None:
    """Append the one event of each request of ``run`` (``_lone_event``) with one INSERT, in order, and set
    each request's result. One statement: SQLite applies it whole or undoes it alone (or, on a full disk,
    may roll the whole transaction back), and the writer thread takes the GIL back once instead of once
    per event. The seqs are consecutive and end at ``lastrowid``: under the write lock AUTOINCREMENT gives
    each row max(largest seq, sqlite_sequence) + 1, so row k+1 gets row k's seq + 1
    (tests/runtime/test_store_durability.py checks them against the stored rows). Writes nothing of
    ``run``'s results when it raises."""
    drafts = [request.events[0] for request in run]
    encoded = [encode_payload(draft.payload) for draft in drafts]
    params: list[Any] = []
    for draft, (_, text) in zip(drafts, encoded):
        params += (draft.thread_id, draft.turn_id, draft.item_id, draft.event, draft.timestamp, text)
    last = conn.execute(insert_rows_sql(len(run)), params).lastrowid
    assert last is not None
    seq = last - len(run)
    for request, draft, (data, _) in zip(run, drafts, encoded):
        seq += 1
        request.committed = [Event(seq, draft.timestamp, draft.thread_id, draft.turn_id, draft.item_id,
                                   draft.event, draft.payload, data)]
        request.result = outcome.Value(None)


def row_to_event(row: sqlite3.Row) -> Event:
    return Event(row["seq"], row["timestamp"], row["thread_id"], row["turn_id"], row["item_id"],
                 row["event"], json.loads(row["payload"]))


class _StoreContext:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._nursery_cm = trio.open_nursery()

    async def __aenter__(self) -> Store:
        try:
            await trio.to_thread.run_sync(self._store._open_sync)
        except (*self._store.db_errors, OSError) as exc:
            self._store._close_sync()
            raise StorageError(f"Failed to open the store at {self._store.where}: {exc}") from exc
        nursery = await self._nursery_cm.__aenter__()
        await nursery.start(self._store._writer)
        return self._store

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        # Closing the send side lets the writer drain everything already queued, then stop.
        self._store._write_tx.close()
        try:
            return await self._nursery_cm.__aexit__(*exc_info)
        finally:
            with trio.CancelScope(shield=True):  # closing connections is quick and must happen
                await trio.to_thread.run_sync(self._store._close_sync)
