"""Durable state in PostgreSQL (issue 15): the SQLite store's API and writer on a database that several hosts
share.

What is the same as runtime/store/sqlite.py (this class subclasses it): one group-commit writer task with
one connection, a batch in one transaction with a savepoint per request, storage failures failing the
requests they touched and never the writer, lanes kept a prefix, events published only after COMMIT.
What differs, and why:

- The driver is psycopg 3's sync API, called from trio worker threads (docs/design.md, "PostgreSQL driver":
  its async API does not run on trio). Shared code (engine, history, sessions, idempotency, records) passes
  ``fn(conn)`` functions written for sqlite3; they get a ``PgConnection`` adapter that takes ``?``
  placeholders, returns rows indexable by name and by position, and maps bytes to BYTEA.
- A read runs on one of a small pool of read connections behind ``read_limiter``, on one snapshot: a read
  function of several statements in one ``REPEATABLE READ READ ONLY`` transaction (as a SQLite read
  transaction) in a worker thread; one seen running a single statement in autocommit mode, one round trip,
  awaited on the event loop without a thread when ``inline`` (``PostgresStore.read``). A blocking libpq call
  never runs on the loop.
- A transaction that writes events of a thread first locks the thread's lease row (created with epoch 0 and
  no owner if missing), then takes seqs from the sequence (docs/design.md "seq on PostgreSQL": a thread's
  seqs become visible in order). A lane with ``fence = (thread_id, epoch)`` has that lock taken at its epoch
  before each of its writes; no such row means another host took the thread over, and the write fails with
  LeaseLost (a StorageError: the lane fails, the engine retires) with nothing of it stored.
- Before COMMIT the writer sends ``pg_notify('trio_runtime_events', thread_id)`` once per thread written;
  PostgreSQL delivers notifications only when the transaction commits, never after a rollback.
- There is no recovery at open: other hosts' turns are running. A thread is settled by ``recover_thread``
  when a host takes its lease over (runtime/cluster, helper C).
- A lost connection (server restart, ``pg_terminate_backend``, network) fails the requests of the batch it
  was in, exactly as a failed COMMIT does on SQLite, and the next batch opens a new connection. A read on a
  lost connection fails (the driver's error) and its connection is replaced for the next read.
"""

from __future__ import annotations

import decimal
import functools
import logging
import re
from typing import Any, Callable, Iterator, Sequence

import orjson
import outcome
import psycopg
import psycopg.adapt
import psycopg.conninfo
import psycopg.pq
import trio

from . import migrations
from .sqlite import Event, EventDraft, Store, WriteRequest, encode_payload, storage_error
from ..errors import LeaseLost

log = logging.getLogger(__name__)

# The channel every host LISTENs on (docs/design.md, "Events across hosts"); the payload is a thread id.
NOTIFY_CHANNEL = "trio_runtime_events"
# Read connections, each used by one read at a time. Reads are short (indexed, one snapshot); 4 keeps two
# cores busy while a round trip waits, and is few enough that many hosts stay far below max_connections
# (PostgreSQL's default is 100). Measured in docs/design.md ("PostgreSQL store").
READ_POOL_SIZE = 4
# Seconds a writer transaction may wait on this host (between two statements) before the server ends its
# session (see PostgresStore._connect_writer); open_store passes the lease TTL: a host stalled that long has
# lost its leases anyway. This default is for stores opened without a config (tests, tools).
STALLED_TRANSACTION_SECONDS = 10.0
# Seconds a new connection may take (libpq's connect_timeout) unless the store URL sets its own.
CONNECT_TIMEOUT = 10

_TXN = psycopg.pq.TransactionStatus
# A read's transaction (PostgresStore.read): one snapshot for all its statements.
READ_BEGIN = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
# The seq rule's lock (docs/design.md "seq on PostgreSQL"): the thread's lease row, created with epoch 0 and
# no owner when missing.
LOCK_LEASE_ROW = ("WITH created AS (INSERT INTO thread_leases (thread_id) VALUES (%s) ON CONFLICT (thread_id)"
                  " DO NOTHING RETURNING 1) SELECT 1 FROM thread_leases WHERE thread_id = %s FOR UPDATE")

# LOCK_LEASE_ROW for several threads in one statement (the batch of PostgresStore._apply_transaction): the
# thread ids as an array, sorted (the index scan of ``= ANY`` locks them in that order too).
LOCK_LEASE_ROWS = ("WITH created AS (INSERT INTO thread_leases (thread_id) SELECT unnest(CAST(? AS text[]))"
                   " ON CONFLICT (thread_id) DO NOTHING RETURNING 1)"
                   " SELECT 1 FROM thread_leases WHERE thread_id = ANY(CAST(? AS text[])) FOR UPDATE")
# The fence (PgConnection.check_fence) inside a one-query batch, which must stop the query before its COMMIT
# when the lease is gone: the same lock (READ COMMITTED re-checks the epoch after a wait), and no row makes the
# third parameter (a message) the value cast to an integer, an error (22P02) that aborts the transaction.
FENCE_OR_FAIL = ("SELECT CAST(COALESCE((SELECT '1' FROM thread_leases WHERE thread_id = ? AND epoch = ?"
                 " FOR UPDATE), ?) AS integer)")
# An event's INSERT (PgConnection.append_event) and the NOTIFY of the threads a batch wrote
# (PostgresStore._before_commit), in the shared ``?`` style.
INSERT_EVENT = ("INSERT INTO events (thread_id, turn_id, item_id, event, timestamp, payload)"
                " VALUES (?, ?, ?, ?, ?, ?) RETURNING seq")
NOTIFY_THREADS = "SELECT pg_notify(?, thread_id) FROM unnest(CAST(? AS text[])) AS t (thread_id)"
# Several events in one INSERT (PostgresStore._apply_transaction: a run of event-only requests, or a request's
# events): their rows as one JSON array of arrays (bound client-side ~10x cheaper than six text arrays or a
# statement per row: docs/design.md "PostgreSQL driver"), inserted in array order (ORDER BY
# the ordinality: each row's seq is taken as it leaves the sort, so seqs follow the array and RETURNING gives
# them in that order). As jsonb, parsed once: each ``->>`` of a json (text) element parses it again, six times a
# row (issue 16 third pass, EXPLAIN ANALYZE of 100 rows: server execution 0.54 -> 0.26-0.30 ms).
INSERT_EVENT_ROWS = ("INSERT INTO events (thread_id, turn_id, item_id, event, timestamp, payload)"
                     " SELECT r.e->>0, r.e->>1, r.e->>2, r.e->>3, r.e->>4, r.e->>5"
                     " FROM jsonb_array_elements(CAST(? AS jsonb)) WITH ORDINALITY AS r (e, n)"
                     " ORDER BY r.n RETURNING seq")
# INSERT_EVENT_ROWS prepared once per writer connection (``PgConnection.prepare_event_rows``), at SQL level
# (PREPARE), so a batch stays ONE simple query: ``EXECUTE`` skips the statement's parse, analysis and plan
# on every batch (issue 16 seventh pass: BEGIN, 100 rows and COMMIT in one query, p50 0.71-0.83 -> 0.57-0.60
# ms on the bench cluster). A prepared statement lives as long as its session; a new connection prepares it
# again. Not for a transaction-mode connection pooler, which would hand the next batch another session.
EVENT_ROWS_STATEMENT = "trio_runtime_event_rows"
PREPARE_EVENT_ROWS = (f"PREPARE {EVENT_ROWS_STATEMENT} (jsonb) AS "
                      + INSERT_EVENT_ROWS.replace("CAST(? AS jsonb)", "$1"))
EXECUTE_EVENT_ROWS = f"EXECUTE {EVENT_ROWS_STATEMENT} (?)"


class PgRow(tuple):
    """A row like sqlite3.Row: indexable by position and by column name; ``keys()`` for ``dict(row)``."""

    __slots__ = ()
    _index: dict[str, int] = {}

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


@functools.lru_cache(maxsize=256)
def _row_class(names: tuple[str, ...]) -> type[PgRow]:
    return type("PgRow", (PgRow,), {"__slots__": (), "_index": {name: i for i, name in enumerate(names)}})


def _row_factory(cursor: psycopg.Cursor) -> Callable[[Sequence[Any]], PgRow]:
    cls = _row_class(tuple(column.name for column in cursor.description or ()))
    return cls


class _NumericLoader(psycopg.adapt.Loader):
    """NUMERIC (what SUM over BIGINT returns) as an int when whole, as SQLite's SUM gives an integer."""

    def load(self, data: Any) -> Any:
        value = decimal.Decimal(bytes(data).decode())
        return int(value) if value == value.to_integral_value() else float(value)


# ``CAST(? AS TEXT)`` of UTF-8 bytes (SQLite turns a BLOB into TEXT that way; the core passes encoded JSON
# so the encoding happens off the loop): on PostgreSQL a BYTEA cast to text is its hex escape, so it
# becomes convert_from(?, 'UTF8'), and ``CAST(column AS BLOB)`` convert_to(column, 'UTF8'). ``json_each(?)`` (a JSON array as a table with a ``value`` column) has
# its PostgreSQL twin.
_CAST_TEXT = re.compile(r"CAST\(\s*\?\s+AS\s+TEXT\s*\)", re.IGNORECASE)
_JSON_EACH = re.compile(r"json_each\(\s*\?\s*\)", re.IGNORECASE)
# ``CAST(column AS BLOB)``: the column's text as UTF-8 bytes (records.engine_state decodes them off the loop).
_CAST_BLOB = re.compile(r"CAST\(\s*([A-Za-z_][A-Za-z0-9_.]*)\s+AS\s+BLOB\s*\)", re.IGNORECASE)
_BYTES_MARK = "\x00B"


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> tuple[str, tuple[int, ...]]:
    """SQLite-flavoured shared SQL -> psycopg's: ``?`` outside string literals and quoted names becomes
    ``%s``, a literal ``%`` becomes ``%%``. Returns the query and the positions of parameters that must be
    sent as bytes (``CAST(? AS TEXT)``)."""
    sql = _CAST_TEXT.sub("convert_from(" + _BYTES_MARK + ", 'UTF8')", sql)
    sql = _JSON_EACH.sub("json_array_elements_text(CAST(? AS json))", sql)
    sql = _CAST_BLOB.sub(r"convert_to(\1, 'UTF8')", sql)
    out: list[str] = []
    as_bytes: list[int] = []
    index = 0
    quote: str | None = None
    i = 0
    while i < len(sql):
        ch = sql[i]
        if quote is not None:
            out.append("%%" if ch == "%" else ch)
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
            index += 1
        elif sql.startswith(_BYTES_MARK, i):
            out.append("%b")
            as_bytes.append(index)
            index += 1
            i += len(_BYTES_MARK)
            continue
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
        i += 1
    return "".join(out), tuple(as_bytes)


_CLIENT_MARKS = re.compile(r"%%|%b")


@functools.lru_cache(maxsize=1024)
def client_query(sql: str) -> tuple[str, tuple[int, ...]]:
    """``translate`` for client-side binding (``ClientCursor.mogrify``): a bytes parameter is a BYTEA
    literal there, so ``%b`` becomes ``%s`` (``%%`` stays a literal percent sign)."""
    query, as_bytes = translate(sql)
    return _CLIENT_MARKS.sub(lambda m: "%%" if m.group() == "%%" else "%s", query), as_bytes


def _params(params: Sequence[Any] | None, as_bytes: tuple[int, ...]) -> list[Any]:
    """sqlite3's parameter conventions -> psycopg's: a bool is an integer (the columns are BIGINT, as
    SQLite stores booleans), memoryview/bytearray are bytes (BYTEA), and a ``CAST(? AS TEXT)`` gets bytes."""
    out = []
    for position, value in enumerate(params or ()):
        if isinstance(value, bool):
            value = int(value)
        elif isinstance(value, (memoryview, bytearray)):
            value = bytes(value)
        if position in as_bytes and isinstance(value, str):
            value = value.encode()
        out.append(value)
    return out


class PgCursor:
    """The part of sqlite3.Cursor shared code uses: ``fetchone`` (None when no row or no result set),
    ``fetchall``, ``rowcount`` and iteration."""

    def __init__(self, cursor: psycopg.Cursor) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def fetchone(self) -> Any:
        return self._cursor.fetchone() if self._cursor.description is not None else None

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall() if self._cursor.description is not None else []

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class PgConnection:
    """The connection adapter shared ``fn(conn)`` code gets on PostgreSQL (see the module docstring).

    It also keeps, per transaction of the writer, the threads whose lease row it locked (taken once per
    transaction) and the threads it wrote events of (NOTIFY before COMMIT); ``mark``/``undo`` forget what a
    rolled-back savepoint added (PostgreSQL releases the row locks taken inside it)."""

    def __init__(self, raw: psycopg.Connection, host_id: str | None = None) -> None:
        self.raw = raw
        self.host_id = host_id
        self.locked: set[str] = set()
        self.written: set[str] = set()
        self.statements = 0  # ``execute``/``executemany`` calls of shared code (PostgresStore._read_sync counts)
        self.encoding = raw.info.encoding
        # Binds a one-statement read's parameters client-side (PostgresStore._read_one_statement).
        self.client_cursor = psycopg.ClientCursor(raw)
        self.event_rows_prepared = False  # PREPARE_EVENT_ROWS was run on this session

    # -- sqlite3-like surface ---------------------------------------------------------------------------
    def execute(self, sql: str, params: Sequence[Any] | None = None) -> PgCursor:
        self.statements += 1
        query, as_bytes = translate(sql)
        if params is None and not as_bytes and "%" not in query:
            # No parameters: sent as it is (simple protocol), so SAVEPOINT/BEGIN/COMMIT are never prepared.
            return PgCursor(self.raw.execute(sql))  # type: ignore[arg-type]
        return PgCursor(self.raw.execute(query, _params(params, as_bytes)))  # type: ignore[arg-type]

    def executemany(self, sql: str, seq: Sequence[Sequence[Any]]) -> PgCursor:
        self.statements += 2  # never a one-statement read (several statements, whatever their number)
        query, as_bytes = translate(sql)
        cursor = self.raw.cursor()
        cursor.executemany(query, [_params(p, as_bytes) for p in seq])  # type: ignore[arg-type]
        return PgCursor(cursor)

    @property
    def in_transaction(self) -> bool:
        """True inside a transaction, also a failed one, and when the connection's state is unknown (lost):
        the writer then tries a ROLLBACK, which fails on a lost connection and makes it drop the connection."""
        return self.raw.info.transaction_status != _TXN.IDLE

    def close(self) -> None:
        self.raw.close()

    # -- the writer's bookkeeping -----------------------------------------------------------------------
    def prepare_event_rows(self) -> None:
        """Prepare EXECUTE_EVENT_ROWS's statement on this session, once, outside any transaction (a
        prepared statement is not undone by a ROLLBACK). Raises the driver's error when it cannot: the
        batch then fails as when its BEGIN fails, and the next one tries again."""
        if not self.event_rows_prepared:
            self.raw.execute(PREPARE_EVENT_ROWS)  # type: ignore[arg-type]
            self.event_rows_prepared = True

    def reset(self) -> None:
        self.locked.clear()
        self.written.clear()

    def mark(self) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset(self.locked), frozenset(self.written)

    def undo(self, mark: tuple[frozenset[str], frozenset[str]]) -> None:
        self.locked, self.written = set(mark[0]), set(mark[1])

    def lock_thread(self, thread_id: str) -> None:
        """The seq rule: lock the thread's lease row (creating it with epoch 0 and no owner) before this
        transaction takes a seq for the thread; held to COMMIT/ROLLBACK."""
        if thread_id in self.locked:
            return
        # One round trip: a row the CTE inserts is ours until COMMIT (the SELECT does not see it, but a
        # concurrent insert or lock of it waits for us); a row that was there is locked by the SELECT.
        self.raw.execute(LOCK_LEASE_ROW, (thread_id, thread_id))
        self.locked.add(thread_id)

    def check_fence(self, thread_id: str, epoch: int, action: str) -> None:
        """Lock the lease row at ``epoch``; none: LeaseLost. Under READ COMMITTED a row whose epoch another
        host bumped while we waited for its lock is re-checked after that commit, and not found."""
        row = self.raw.execute("SELECT 1 FROM thread_leases WHERE thread_id = %s AND epoch = %s FOR UPDATE",
                               (thread_id, epoch)).fetchone()
        if row is None:
            raise LeaseLost(f"Failed to {action}: this host no longer holds the lease of thread '{thread_id}' "
                            f"(epoch {epoch})")
        self.locked.add(thread_id)

    def append_event(self, draft: EventDraft) -> Event:
        """``append_event`` on PostgreSQL: the lease-row lock first, then the seq (RETURNING it)."""
        self.lock_thread(draft.thread_id)
        data, payload = encode_payload(draft.payload)
        (seq,) = self.raw.execute(
            "INSERT INTO events (thread_id, turn_id, item_id, event, timestamp, payload)"
            " VALUES (%s, %s, %s, %s, %s, %s) RETURNING seq",
            (draft.thread_id, draft.turn_id, draft.item_id, draft.event, draft.timestamp, payload)).fetchone()
        self.written.add(draft.thread_id)
        return Event(seq, draft.timestamp, draft.thread_id, draft.turn_id, draft.item_id, draft.event, draft.payload,
                     data)


def snapshot_read(conn: PgConnection, fn: Callable[[Any], Any]) -> Any:
    """``fn(conn)`` in one REPEATABLE READ READ ONLY transaction: PostgresStore.read's worker thread, and what
    bench/pg.py's pg3 row times. Whatever ``fn`` does or raises, the connection leaves outside any transaction."""
    if conn.in_transaction:  # never expected; a stale snapshot must not outlive whatever left it
        conn.raw.execute("ROLLBACK")
    conn.raw.execute(READ_BEGIN)
    try:
        return fn(conn)
    finally:
        if conn.in_transaction:
            conn.raw.execute("ROLLBACK")


# ---- one-statement reads (PostgresStore.read) ----------------------------------------------------------

class _NotOneStatement(BaseException):
    """A read function asked its connection for more than the one statement the one-statement path serves:
    the read runs again the snapshot way. A BaseException, like trio's Cancelled, so a read function's own
    ``except Exception`` never swallows it."""


class _Captured(BaseException):
    """A read function's first statement, recorded (and the function stopped) by _CAPTURE."""

    def __init__(self, sql: str, params: Sequence[Any] | None) -> None:
        super().__init__(sql)
        self.sql, self.params = sql, params


class _CaptureConnection:
    """What a read function gets first: its first ``execute`` is recorded and stops it; anything else it asks
    of the connection sends the read the snapshot way."""

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        raise _Captured(sql, params)

    def __getattr__(self, name: str) -> Any:
        raise _NotOneStatement(name)


_CAPTURE = _CaptureConnection()


class _Rows:
    """A statement's rows as PgCursor gives them (``fetchone``, ``fetchall``, ``rowcount``, iteration), and
    the names of its result's columns."""

    def __init__(self, rows: list[Any] | None, rowcount: int, columns: tuple[str, ...] = ()) -> None:
        self.columns = columns
        self._rows = rows or []
        self._next = 0
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[Any]:
        rows = self._rows[self._next:] if self._next else self._rows
        self._next = len(self._rows)
        return rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class _ReplayConnection:
    """What a read function gets the second time: its (same) first statement returns the rows already read;
    a second statement, or anything else of the connection, raises _NotOneStatement."""

    def __init__(self, host_id: str | None, sql: str, params: Sequence[Any] | None, rows: _Rows) -> None:
        self.host_id = host_id
        self._sql, self._params, self._rows = sql, params, rows

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        rows, self._rows = self._rows, None
        if rows is None or sql != self._sql or list(params or ()) != list(self._params or ()):
            raise _NotOneStatement("a second statement")
        return rows

    def __getattr__(self, name: str) -> Any:
        raise _NotOneStatement(name)


class _FirstStatement:
    """What a one-statement read function gets in a worker thread: its first ``execute`` runs on the read
    connection (autocommit: one statement, one snapshot); a second, or anything else of the connection,
    raises _NotOneStatement."""

    def __init__(self, conn: PgConnection) -> None:
        self.host_id = conn.host_id
        self._conn: PgConnection | None = conn

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        conn, self._conn = self._conn, None
        if conn is None:
            raise _NotOneStatement("a second statement")
        return conn.execute(sql, params)

    def __getattr__(self, name: str) -> Any:
        raise _NotOneStatement(name)


def _read_key(fn: Callable[[Any], Any]) -> Any:
    """What ``read`` knows a read function by: its code (partials and bound methods unwrapped), so every call
    of it, whatever its arguments, goes the same way. None (never learned: the snapshot way) without one."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(getattr(fn, "__func__", fn), "__code__", None)


_OK = (psycopg.pq.ExecStatus.TUPLES_OK, psycopg.pq.ExecStatus.COMMAND_OK)


async def _results_on_loop(conn: PgConnection, query: bytes) -> list[Any]:
    """Send ``query`` (simple protocol: one or more statements) on ``conn`` and read every result, awaited on
    the event loop: libpq's non-blocking calls (psycopg connects its connections non-blocking) with trio's
    ``wait_writable``/``wait_readable`` on the socket, as the listener waits for notifications
    (runtime/cluster/listener.py). Raises the first failed statement's error after reading every result, so
    the connection is left at the transaction status that failure leaves (INERROR before a COMMIT, IDLE after
    a failed COMMIT). A cancellation can come at each wait; the caller then closes the connection."""
    pg = conn.raw.pgconn
    sock = pg.socket
    pg.send_query(query)
    while pg.flush():  # the query did not fit the socket's buffer: the rest when it can take more
        await trio.lowlevel.wait_writable(sock)
    results = []
    while True:
        while pg.is_busy():
            await trio.lowlevel.wait_readable(sock)
            pg.consume_input()
        result = pg.get_result()
        if result is None:
            break
        results.append(result)
    for result in results:
        if result.status not in _OK:
            raise psycopg.errors.error_from_result(result, encoding=conn.raw.info.encoding)
    return results


async def _query_on_loop(conn: PgConnection, query: bytes) -> _Rows:
    """One simple-protocol query on ``conn`` (autocommit, outside any transaction), awaited on the event loop
    (``_results_on_loop``). Its rows are loaded with the connection's own loaders (NUMERIC as int)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    result = (await _results_on_loop(conn, query))[-1]
    if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
        return _Rows(None, result.command_tuples if result.command_tuples is not None else -1)
    loader = psycopg.adapt.Transformer(conn.raw)
    loader.set_pgresult(result)
    columns = tuple(result.fname(i).decode() for i in range(result.nfields))  # type: ignore[union-attr]
    return _Rows(loader.load_rows(0, result.ntuples, _row_class(columns)), result.ntuples, columns)


async def script_on_loop(conn: PgConnection, query: bytes) -> list[list[Any] | None]:
    """A plain write batch's one query (``_plan_batch``: several statements) awaited on the event loop as a
    read is (``_results_on_loop``): every statement's rows (None for one without a result set), in order.
    Raises the first failed statement's error after reading every result (see ``_results_on_loop``)."""
    results = await _results_on_loop(conn, query)
    loader = psycopg.adapt.Transformer(conn.raw)
    out: list[list[Any] | None] = []
    for result in results:
        if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
            out.append(None)
            continue
        loader.set_pgresult(result)
        out.append(loader.load_rows(0, result.ntuples, tuple))
    return out


def redact_url(url: str) -> str:
    """The store's URL for messages and logs: never its password (``postgresql://user@host:port/db``)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://(unparseable URL)"
    user = f"{info['user']}@" if info.get("user") else ""
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{info.get('host', '')}{port}/{info.get('dbname', '')}"


def connect(url: str, host_id: str | None = None) -> PgConnection:
    """A connection in autocommit mode (we send BEGIN/COMMIT ourselves, as on SQLite)."""
    # A bound on connecting unless the URL sets one: libpq's default waits as long as the OS does, and the
    # writer (shielded) must not hang on a database that is down; the batch fails and the next one retries.
    timeout = {} if "connect_timeout" in psycopg.conninfo.conninfo_to_dict(url) else {"connect_timeout": CONNECT_TIMEOUT}
    raw = psycopg.connect(url, autocommit=True, row_factory=_row_factory, **timeout)  # type: ignore[arg-type]
    raw.adapters.register_loader("numeric", _NumericLoader)
    return PgConnection(raw, host_id)


def _plain_batch(requests: Sequence[WriteRequest]) -> bool:
    """Plain data writes only (statements and events, no ``fn``), none on a failed lane: the batch can go as
    one query (``PostgresStore._apply_transaction``)."""
    return all(request.fn is None and (request.lane is None or request.lane.failed is None) for request in requests)


class _BatchPlan:
    """A plain batch's one query (``_plan_batch``) and where each request's events come back in its results."""

    def __init__(self, query: str, inserts: list[list[tuple[int, int]]], payloads: list[list[bytes | None]]) -> None:
        self.query = query
        # Per request, per event: (index of its INSERT's result in the query's results, row in that result).
        self.inserts = inserts
        self.payloads = payloads  # each event's payload JSON, for its Event (encoded once)

    def settle(self, requests: Sequence[WriteRequest], results: Sequence[Any]) -> None:
        """The query committed: each request's result, and its events with the seqs the INSERTs returned
        (``results``: one entry per statement, its rows or None)."""
        for request, places, datas in zip(requests, self.inserts, self.payloads):
            request.result = outcome.Value(None)
            request.committed = [Event(results[index][row][0], draft.timestamp, draft.thread_id, draft.turn_id,
                                       draft.item_id, draft.event, draft.payload, data)
                                 for (index, row), draft, data in zip(places, request.events, datas)]


def _plan_batch(conn: PgConnection, requests: Sequence[WriteRequest]) -> _BatchPlan:
    """The one query of a plain batch (see ``PostgresStore._apply_transaction``), its parameters bound
    client-side: ``BEGIN``, the lease-row locks of every thread it writes events of (one statement, before
    any seq: the seq rule), then for each request its fence, its statements and its event INSERTs, the
    NOTIFY, ``COMMIT``. Pure computation (no I/O): raises when a request's data cannot be bound."""
    cursor = conn.client_cursor
    script = ["BEGIN"]
    inserts: list[list[tuple[int, int]]] = []
    payloads: list[list[bytes | None]] = []
    fenced: set[tuple[str, int]] = set()

    def add(sql: str, params: Sequence[Any]) -> int:
        query, as_bytes = client_query(sql)
        script.append(cursor.mogrify(query, _params(params, as_bytes)))
        return len(script) - 1

    def add_fence(request: WriteRequest) -> None:
        # Once per lease and transaction: the first check locks the row at its epoch until COMMIT, so
        # another check of the same (thread, epoch) in this transaction could not fail.
        fence = request.lane.fence if request.lane is not None else None
        if fence is not None and fence not in fenced:
            fenced.add(fence)
            lost = f"the lease of thread {fence[0]} (epoch {fence[1]}) is lost"
            add(FENCE_OR_FAIL, (fence[0], fence[1], lost))

    def add_events(run: Sequence[WriteRequest]) -> None:
        # The events of ``run`` (in request order) in one INSERT (the prepared INSERT_EVENT_ROWS) when there
        # are several and their columns encode as JSON (orjson refuses a str holding a lone surrogate: then
        # one INSERT per event, as before).
        encoded = [[encode_payload(draft.payload) for draft in request.events] for request in run]
        columns = [[draft.thread_id, draft.turn_id, draft.item_id, draft.event, draft.timestamp, text]
                   for request, texts in zip(run, encoded) for draft, (_, text) in zip(request.events, texts)]
        rows: str | None = None
        if len(columns) > 1:
            try:
                rows = orjson.dumps(columns).decode()
            except TypeError:
                rows = None
        position = add(EXECUTE_EVENT_ROWS, (rows,)) if rows is not None else 0
        offset = 0
        for request, texts in zip(run, encoded):
            payloads.append([data for data, _ in texts])
            if rows is not None:
                inserts.append([(position, offset + k) for k in range(len(texts))])
            else:
                inserts.append([(add(INSERT_EVENT, column), 0) for column in columns[offset:offset + len(texts)]])
            offset += len(texts)

    # The seq rule for every thread the batch writes events of, in one statement, first: the rows are
    # locked (in thread id order) before any seq is taken, and held to COMMIT.
    threads = sorted({draft.thread_id for request in requests for draft in request.events})
    if threads:
        add(LOCK_LEASE_ROWS, (threads, threads))
    index = 0
    while index < len(requests):
        # A run of requests that only append events (an engine's streamed deltas): their fences, then
        # all their events in one statement (issue 16: a statement per event cost the server a parse,
        # a plan and a fence check each). Any other request: its fence, statements, then its events.
        end = index + 1
        if not requests[index].statements:
            while end < len(requests) and not requests[end].statements:
                end += 1
        run = requests[index:end]
        for request in run:
            add_fence(request)
            for sql, params in request.statements:
                add(sql, params)
        add_events(run)
        index = end
    if threads:
        add(NOTIFY_THREADS, (NOTIFY_CHANNEL, threads))
    script.append("COMMIT")
    return _BatchPlan(";\n".join(script), inserts, payloads)


class PostgresStore(Store):
    """Open with ``async with PostgresStore.open(url, publish=..., host_id=...) as store``."""

    kind = "postgresql"
    db_errors: tuple[type[BaseException], ...] = (psycopg.Error,)
    statement_undone_alone = False  # a failed statement aborts the transaction: every request in its savepoint

    def __init__(self, url: str, publish: Callable[[list[Event]], None], write_queue: int,
                 host_id: str | None = None, read_pool: int = READ_POOL_SIZE,
                 stalled_after: float = STALLED_TRANSACTION_SECONDS) -> None:
        super().__init__(None, publish, write_queue)  # type: ignore[arg-type]
        self.stalled_after = stalled_after
        self.url = url
        self.host_id = host_id
        self._read_limiter = trio.CapacityLimiter(read_pool)
        self._idle_readers: list[PgConnection] = []
        self._all_readers: set[PgConnection] = set()
        # Per read function (its code, so bounded by the program's read functions): True when its first read
        # ran one statement (``read``: the one-statement path), False when it needed more.
        self._one_statement_reads: dict[Any, bool] = {}

    @classmethod
    def open(cls, url: str, publish: Callable[[list[Event]], None], write_queue: int = 4096,  # type: ignore[override]
             host_id: str | None = None, read_pool: int = READ_POOL_SIZE,
             stalled_after: float = STALLED_TRANSACTION_SECONDS):
        from .sqlite import _StoreContext

        return _StoreContext(cls(url, publish, write_queue, host_id, read_pool, stalled_after))

    @property
    def where(self) -> str:
        return redact_url(self.url)

    # ---- lifecycle -------------------------------------------------------------------------------------

    def _open_sync(self) -> None:
        self._wconn = self._connect_writer()  # type: ignore[assignment]
        migrations.migrate_pg(self._wconn.raw)  # type: ignore[union-attr]
        self._wconn.prepare_event_rows()  # type: ignore[union-attr]  (after the migrations: it names the table)
        # No recovery here: see the module docstring (recover_thread runs per thread at a lease takeover).
        self.recovered_turns = 0

    def _close_sync(self) -> None:
        for conn in [self._wconn, *self._all_readers]:
            if conn is not None:
                try:
                    conn.close()
                except psycopg.Error as exc:
                    log.error("closing a store connection failed: %s", exc)
        self._all_readers.clear()
        self._idle_readers.clear()

    # ---- the writer's hooks ----------------------------------------------------------------------------

    def _connect_writer(self) -> PgConnection:
        """The writer's connection. The server ends its session when a transaction of it waits on this host
        longer than ``stalled_after`` (idle_in_transaction_session_timeout): a host that is paused (SIGSTOP,
        a VM freeze) mid-batch holds lease-row locks, and another host's takeover of those threads would
        wait on them for as long as the pause lasts. The batch then fails like any lost connection."""
        conn = connect(self.url, self.host_id)
        conn.raw.execute(f"SET idle_in_transaction_session_timeout = {max(1, int(self.stalled_after * 1000))}")
        return conn

    def _writer_connection(self) -> Any:
        if self._wconn is not None and self._wconn.raw.closed:  # type: ignore[attr-defined]
            self._drop_connection()
        if self._wconn is None:  # lost or dropped after a failure: a fresh one for this batch
            self._wconn = self._connect_writer()  # type: ignore[assignment]
            self._wconn.prepare_event_rows()  # type: ignore[union-attr]
        return self._wconn

    def _begin(self, conn: Any) -> None:
        conn.reset()
        conn.execute("BEGIN")  # READ COMMITTED: the fence's re-check after a lock wait depends on it

    def _request_mark(self, conn: Any) -> Any:
        return conn.mark()

    def _request_undo(self, conn: Any, mark: Any) -> None:
        conn.undo(mark)

    def _check_fence(self, conn: Any, request: WriteRequest) -> None:
        fence = request.lane.fence if request.lane is not None else None
        if fence is not None:
            conn.check_fence(fence[0], fence[1], request.action)

    def _apply_transaction(self, requests: list[WriteRequest]) -> list[WriteRequest]:
        """A batch of plain data writes in one round trip (docs/design.md, "PostgreSQL driver").

        When no request of the batch has an ``fn`` (statements and events only: an engine's item and delta
        writes, thread creations) and none is on a failed lane, the whole batch goes as ONE simple-protocol
        query, the parameters bound client-side (``ClientCursor.mogrify``): ``BEGIN``, the lease-row locks of
        every thread it writes events of (one statement, before any seq: the seq rule), then for each request
        its fence (FENCE_OR_FAIL: an error when the lease is gone), its statements and its event INSERTs, the
        NOTIFY, ``COMMIT``. The server runs it to its end before it answers, so the connection never waits on
        this host mid-transaction outside ``idle_in_transaction_session_timeout`` (a paused host holds no lock
        past that bound; pipeline mode would). Without savepoints nothing of the batch may stay when any part
        of it failed: a query that stopped with its transaction open (INERROR) is rolled back (the seqs it
        took are a gap, never reused, never published) and the batch runs again the shared way, one savepoint
        per request, where a failure stays with the request that caused it (LeaseLost for a stale lane).
        Running such requests twice is safe: they are plain data, with no effect outside the database. A
        failed COMMIT or a lost connection (the outcome may be unknown) is never run again: every request of
        the batch fails, as a failed COMMIT on SQLite.

        The shared way costs ~5 round trips per request (SAVEPOINT, statements, lease lock, event INSERT,
        RELEASE), each a wait on the socket in the writer thread: 16 thread creations were 83, now 1.

        This runs in the writer thread. A plain batch on an open, idle, prepared session goes the same way
        but awaited on the event loop (``_apply_batch_async``); this method takes it when the session must
        be opened first, and after a failure there."""
        if not _plain_batch(requests):
            return super()._apply_transaction(requests)
        try:
            conn = self._writer_connection()
            conn.prepare_event_rows()  # done when the session was opened, unless that PREPARE failed
        except self.db_errors as exc:
            self._abort()
            for request in requests:
                self._fail(request, storage_error(request.action, exc, "the store could not begin a transaction"))
            return []
        try:
            plan = _plan_batch(conn, requests)
        except Exception as exc:  # one request's data could not be bound (never sent)
            return self._after_failed_query(requests, exc, sent=False)
        cursor = psycopg.ClientCursor(conn.raw)
        try:
            cursor.execute(plan.query)
        except Exception as exc:  # a storage error, a fence that did not hold, one request's bad data
            return self._after_failed_query(requests, exc, sent=True)
        # Committed. The seqs, from the results of the event INSERTs (one result per statement, in order).
        results: list[Any] = []
        while True:
            results.append(cursor.fetchall() if cursor.description is not None else None)
            if not cursor.nextset():
                break
        plan.settle(requests, results)
        return []

    def _after_failed_query(self, requests: list[WriteRequest], exc: Exception, sent: bool) -> list[WriteRequest]:
        """A plain batch's one query failed (or could not be built): in the writer thread. Stopped before its
        COMMIT (INERROR; or never sent, IDLE with no transaction begun): nothing of it stays; rolled back and
        applied the shared way, where a failure stays with its request (a lost fence: LeaseLost for that
        lane's write only). The COMMIT itself failed (IDLE after it), or the connection was lost and the
        outcome is unknown: never run again; every request fails, as a failed COMMIT on SQLite. Returns the
        requests not attempted (``_apply_transaction``'s contract)."""
        conn = self._wconn
        status = conn.raw.info.transaction_status if conn is not None else _TXN.UNKNOWN
        if not sent or status == _TXN.INERROR:
            log.info("a batch of %d write(s) failed in one query (%s); applying it one request at a time",
                     len(requests), exc)
            self._abort()
            return super()._apply_transaction(requests)
        log.error("store commit failed: %s", exc)
        self._abort()
        for request in requests:
            self._fail(request, storage_error(request.action, exc, "the store could not commit"))
        return []

    async def _apply_batch_async(self, batch: list[WriteRequest]) -> None:
        """A plain batch (``_plain_batch``) on a writer session that is open and idle goes as its one query
        awaited on the event loop (``script_on_loop``: libpq's non-blocking calls and trio's waits on the
        socket, as one-statement reads do), not through a worker thread: no two thread hand-offs per batch,
        and the writer thread does not take the GIL back and forth with the loop while the server answers
        (bench row pg2). Everything else, and every failure (the rollback, the shared way, a new connection:
        blocking calls), goes to the writer thread as before. The writer task is shielded, so no
        cancellation lands mid-query; the wait is bounded as the thread's is (the server runs the query to
        its end; a stalled lock holder is ended by its ``idle_in_transaction_session_timeout``)."""
        conn = self._wconn
        if (conn is None or conn.raw.closed or not conn.event_rows_prepared or conn.in_transaction
                or not _plain_batch(batch)):
            await trio.to_thread.run_sync(self._apply_batch, batch)
            return
        try:
            plan = _plan_batch(conn, batch)
            query = plan.query.encode(conn.encoding)
        except Exception:  # bad data: the thread path binds it again and applies the batch the shared way
            await trio.to_thread.run_sync(self._apply_batch, batch)
            return
        token = object()
        self._write_limiter.acquire_on_behalf_of_nowait(token)  # never waits: one writer task
        try:
            results = await script_on_loop(conn, query)
        except Exception as exc:
            failure: Exception | None = exc
        else:
            failure = None
        finally:
            self._write_limiter.release_on_behalf_of(token)
        if failure is not None:
            await trio.to_thread.run_sync(self._recover_batch, batch, failure)
            return
        try:
            plan.settle(batch, results)
        except Exception as exc:  # a bug, not the database (the batch committed): as the thread path fails it
            log.exception("the store's writer failed unexpectedly; failing %d write(s)", len(batch))
            for request in batch:
                self._fail(request, storage_error(request.action, exc, "the store's writer failed"))

    def _recover_batch(self, batch: list[WriteRequest], exc: Exception) -> None:
        """``_apply_batch_async``'s query failed: in the writer thread, what ``_apply_transaction`` does after
        a failed query, then the usual path for any request a lost transaction left unattempted."""
        try:
            pending = self._after_failed_query(batch, exc, sent=True)
        except Exception as error:  # not an SQL error (a bug): fail what is left, start clean
            log.exception("the store's writer failed unexpectedly; failing %d write(s)", len(batch))
            for request in batch:
                if request.result is None:
                    self._fail(request, storage_error(request.action, error, "the store's writer failed"))
            self._drop_connection()
            return
        if pending:
            self._apply_batch(pending)

    def _before_commit(self, conn: Any) -> None:
        if conn.written:  # one round trip for every thread of the batch
            conn.raw.execute("SELECT pg_notify(%s, thread_id) FROM unnest(CAST(%s AS text[])) AS t (thread_id)",
                             (NOTIFY_CHANNEL, sorted(conn.written)))

    # ---- reads -----------------------------------------------------------------------------------------

    async def read(self, fn: Callable[[Any], Any], *, inline: bool = False) -> Any:
        """``fn(conn)`` on a pooled read connection, seeing one snapshot of the database, and never leaving a
        transaction open on that connection (docs/design.md, "One-statement reads").

        The snapshot way: one REPEATABLE READ READ ONLY transaction (BEGIN, ``fn``'s statements, ROLLBACK: at
        least three round trips) in a worker thread. The first read of each read function (by its code) goes
        that way and counts its statements. A function that ran ONE statement needs no transaction:
        PostgreSQL runs a single statement in autocommit mode on one snapshot. Its later reads take a
        one-statement path, one round trip:
        - ``inline`` (the caller's promise that its work is small, as on SQLite): ``fn`` runs up to its first
          ``execute`` (that call is recorded and stops it), the statement goes to the server as one simple
          query with its parameters bound client-side, awaited on the event loop with ``wait_readable`` (no
          worker thread), then ``fn`` runs again from the start against the rows, on the loop;
        - otherwise ``fn`` runs in a worker thread as before, its first statement in autocommit.
        If it asks for a second statement this time (or anything else of the connection), it is stopped there
        and runs again, whole, the snapshot way, and goes that way from then on. So a read function may run
        more than once: read functions are pure functions of the database and their arguments. The read
        connections default to read-only transactions, so no statement of any path can write.

        A cancellation while the statement is on the wire closes that connection (the server ends the query
        when it finds the client gone; the next read opens a new connection); a cancellation while a worker
        thread runs waits for the thread (trio never abandons it), which ends its transaction itself."""
        key = _read_key(fn)
        one_statement = self._one_statement_reads.get(key)
        async with self._read_limiter:
            conn = self._idle_readers.pop() if self._idle_readers else None
            holder = [conn]
            try:
                if one_statement and inline:
                    try:
                        return await self._read_one_statement(holder, fn)
                    except _NotOneStatement:  # it needs more this time: the snapshot way, from now on
                        self._one_statement_reads[key] = False
                        one_statement = False
                return await trio.to_thread.run_sync(self._read_sync, holder, fn, key, one_statement)
            finally:
                if holder[0] is not None:
                    self._idle_readers.append(holder[0])

    async def _read_one_statement(self, holder: list[PgConnection | None], fn: Callable[[Any], Any]) -> Any:
        """The inline one-statement path of ``read`` (raises _NotOneStatement when ``fn`` is not such a read)."""
        try:
            fn(_CAPTURE)
        except _Captured as captured:
            sql, params = captured.sql, captured.params
        else:  # no statement at all (or one it swallowed): the snapshot way decides
            raise _NotOneStatement("no statement")
        conn = holder[0]
        if conn is None or conn.raw.closed or conn.in_transaction:
            if conn is not None:
                self._forget_reader(holder)
            holder[0] = conn = await trio.to_thread.run_sync(self._new_reader)
        query, as_bytes = client_query(sql)
        text = conn.client_cursor.mogrify(query, _params(params, as_bytes))
        try:
            rows = await _query_on_loop(conn, text.encode(conn.encoding))  # a module global: tests trace it
        except psycopg.DatabaseError:
            # The statement's own error leaves the connection fine (autocommit, outside any transaction); a lost
            # one (libpq's status BAD) is closed now, and the next read opens a new one.
            if conn.raw.closed:
                self._forget_reader(holder)
            raise
        except BaseException:
            # Cancelled with the query on the wire: the connection's state is unknown, close it.
            self._forget_reader(holder)
            raise
        return fn(_ReplayConnection(conn.host_id, sql, params, rows))

    def _new_reader(self) -> PgConnection:
        """A read connection: its transactions (also a single statement's, autocommit) are read-only."""
        conn = connect(self.url, self.host_id)
        try:
            conn.raw.execute("SET default_transaction_read_only = on")
        except BaseException:
            conn.close()
            raise
        self._all_readers.add(conn)
        return conn

    def _read_sync(self, holder: list[PgConnection | None], fn: Callable[[Any], Any], key: Any,
                   one_statement: bool | None) -> Any:
        """A read in the worker thread (``read``): ``one_statement`` True, ``fn``'s first statement in
        autocommit, and the snapshot way if it asks for a second; else the snapshot way, where ``fn``'s first
        read (``one_statement`` None) records whether it ran one statement."""
        conn = holder[0]
        if conn is not None and conn.raw.closed:
            self._forget_reader(holder)
            conn = None
        if conn is None:
            holder[0] = conn = self._new_reader()
        try:
            if one_statement:
                if conn.in_transaction:  # never expected; a stale snapshot must not outlive whatever left it
                    conn.raw.execute("ROLLBACK")
                try:
                    return fn(_FirstStatement(conn))
                except _NotOneStatement:  # it needs more this time: the snapshot way, from now on
                    self._one_statement_reads[key] = False
            conn.statements = 0
            result = snapshot_read(conn, fn)
            if one_statement is None and key is not None:  # a concurrent first read that needed more wins
                self._one_statement_reads.setdefault(key, conn.statements == 1)
            return result
        except psycopg.OperationalError:
            if conn.raw.broken or conn.raw.closed:  # lost: the next read opens a new one
                self._forget_reader(holder)
            raise

    def _forget_reader(self, holder: list[PgConnection | None]) -> None:
        conn, holder[0] = holder[0], None
        if conn is not None:
            self._all_readers.discard(conn)
            try:
                conn.close()
            except psycopg.Error:
                pass
