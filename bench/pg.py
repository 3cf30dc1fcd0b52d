"""``python -m bench.run --only pg``: the PostgreSQL driver choice of issue 15, measured on trio against
SQLite doing the same work the way runtime/store/sqlite.py does it (one connection, used from trio worker threads
through ``trio.to_thread.run_sync``), in the same run, on a throwaway cluster (tests/support_pg.py).

PostgreSQL side: psycopg 3 (sync API) from trio worker threads, one connection per writer. psycopg's
async API cannot run on trio (its waiting functions call ``asyncio.get_running_loop()``; probed here and
reported in the notes). ``python -m bench.pg --purepy`` also measures pg-purepy (pure Python on anyio,
so native on trio) when it is installed; it is not a dependency (docs/design.md, "PostgreSQL driver").

Workloads (latencies in ms as seen by the calling trio task, p50 over N):
- insert_commit: one event row INSERT + COMMIT (durable: fsync on, synchronous_commit on; SQLite WAL with
  synchronous=FULL as the store runs it)
- batch100: 100 event rows in one transaction + COMMIT, each side as its store's writer does a run of 100 event
  writes. SQLite: one multi-row INSERT (runtime/store/sqlite.py ``_append_lone``). PostgreSQL: the rows as one
  JSON parameter, bound client-side, to the INSERT prepared on the writer's session (runtime/store/postgres.py
  EXECUTE_EVENT_ROWS), BEGIN and COMMIT in the same query: one round trip, awaited on the event loop as the store's
  writer awaits a plain batch (``PostgresStore._apply_batch_async``, no worker thread); the store's batch also
  locks the thread's lease row and sends a NOTIFY in it. The notes give the same query from a worker thread (the
  writer before issue 16's seventh pass), the earlier workload (INSERT ... SELECT FROM unnest(text arrays) +
  COMMIT, three round trips: not what the store does) and executemany.
- select_pk: one row by primary key. PostgreSQL: a store read (``PostgresStore.read`` of a one-statement read
  function, ``inline=True`` as the store's callers pass for a point read: one simple query awaited on the event
  loop, docs/design.md "One-statement reads"), on a PostgresStore of its own (a second database of the cluster,
  the store's schema). The notes give the same read with ``inline=False`` (the function run in a worker thread),
  the snapshot way (BEGIN REPEATABLE READ READ ONLY, the SELECT, ROLLBACK: what every store read did before,
  and what a read of several statements still does) and a plain psycopg SELECT + COMMIT.
- notify: LISTEN/NOTIFY wake-up: another connection commits a NOTIFY, a trio task waiting on the listener
  (its socket in ``trio.lowlevel.wait_readable``, no thread) wakes up; baseline: an in-process wake-up
  from a worker thread (what the SQLite store does: publish after commit, same process)
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python -m bench.pg` from elsewhere
    sys.path.insert(0, str(ROOT))

from runtime.store import insert_rows_sql  # noqa: E402
from tests.support_pg import PgCluster, PgUnavailable, start_cluster  # noqa: E402

PAYLOAD = json.dumps({"delta": " word", "kind": "agent_message"})
TS = "2026-01-01T00:00:00.000Z"
EVENT_ROW = ("thr_bench", "turn_bench", "item_bench", "item.delta", TS, PAYLOAD)

PG_DDL = """
CREATE TABLE events (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, thread_id text NOT NULL,
  turn_id text, item_id text, event text NOT NULL, timestamp text NOT NULL, payload text NOT NULL)
"""
SQLITE_DDL = """
CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, thread_id TEXT NOT NULL, turn_id TEXT,
  item_id TEXT, event TEXT NOT NULL, timestamp TEXT NOT NULL, payload TEXT NOT NULL)
"""
INSERT_SQL = "INSERT INTO events (thread_id, turn_id, item_id, event, timestamp, payload) VALUES ({})"


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000 if samples else float("nan")


def p99_ms(samples: list[float]) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))] * 1000


async def timed(n: int, step: Callable[[], Any]) -> list[float]:
    """Run the async ``step`` n times (after 3 warm-ups): each call's latency in seconds."""
    for _ in range(3):
        await step()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await step()
        out.append(time.perf_counter() - t0)
    return out


# ---- SQLite as the store runs it ------------------------------------------------------------------------

def sqlite_connect(path: Path) -> sqlite3.Connection:
    # The settings of runtime/store/sqlite.py (_connect): WAL, synchronous=FULL, explicit BEGIN/COMMIT.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(SQLITE_DDL)
    return conn


async def sqlite_workloads(path: Path, n: dict[str, int]) -> dict[str, list[float]]:
    conn = sqlite_connect(path)
    limiter = trio.CapacityLimiter(1)
    sql = INSERT_SQL.format(", ".join("?" * 6))

    def insert_commit() -> None:
        conn.execute("BEGIN")
        conn.execute(sql, EVENT_ROW)
        conn.execute("COMMIT")

    rows_sql = insert_rows_sql(100)

    def batch100() -> None:
        # The store writer's run of 100 event writes (runtime/store/sqlite.py ``_append_lone``, since commit
        # 03c07b3): one multi-row INSERT. Before issue 16's seventh pass this side still ran executemany of
        # 100 one-row INSERTs (~0.06 ms more), which the store no longer does.
        conn.execute("BEGIN")
        conn.execute(rows_sql, [value for _ in range(100) for value in EVENT_ROW])
        conn.execute("COMMIT")

    def select_pk() -> None:
        row = conn.execute("SELECT * FROM events WHERE seq = ?", (7,)).fetchone()
        assert row[0] == 7

    def run(fn):
        return lambda: trio.to_thread.run_sync(fn, limiter=limiter)

    try:
        return {"insert_commit": await timed(n["insert_commit"], run(insert_commit)),
                "batch100": await timed(n["batch100"], run(batch100)),
                "select_pk": await timed(n["select_pk"], run(select_pk)),
                "notify": await in_process_wakeups(n["notify"])}
    finally:
        conn.close()


async def in_process_wakeups(n: int) -> list[float]:
    """A worker thread wakes a waiting trio task (the SQLite store's publish-after-commit, in-process)."""
    token = trio.lowlevel.current_trio_token()
    out = []
    for _ in range(n + 3):
        woke = trio.Event()
        t0 = 0.0

        def wake() -> None:
            nonlocal t0
            t0 = time.perf_counter()
            trio.from_thread.run_sync(woke.set, trio_token=token)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, wake)
            await woke.wait()
            out.append(time.perf_counter() - t0)
    return out[3:]


# ---- psycopg 3 from worker threads ----------------------------------------------------------------------

def event_by_seq(conn: Any, seq: int) -> Any:
    """A one-statement store read function (records.get_thread_row's shape): one row by primary key."""
    return conn.execute("SELECT * FROM events WHERE seq = ?", (seq,)).fetchone()


async def store_reads(url: str, n: int) -> dict[str, list[float]]:
    """Reads through the store itself (``PostgresStore.read``, its read pool): rows pg3 and its notes."""
    import functools

    from runtime.store import EventDraft
    from runtime.store.postgres import PostgresStore

    async with PostgresStore.open(url, publish=lambda events: None) as store:
        await store.write(events=[EventDraft("thr_bench", "item.delta", {"delta": " word"}, timestamp=TS)] * 10)
        read = functools.partial(event_by_seq, seq=7)

        async def inline() -> None:
            assert (await store.read(read, inline=True))[0] == 7

        async def in_thread() -> None:
            assert (await store.read(read))[0] == 7

        return {"select_pk": await timed(n, inline), "select_pk_thread": await timed(n, in_thread)}


async def psycopg_workloads(dsn: str, n: dict[str, int], store_url: str) -> dict[str, list[float]]:
    import orjson
    import psycopg

    from runtime.store.postgres import EXECUTE_EVENT_ROWS, client_query, connect, script_on_loop, snapshot_read

    conn = psycopg.connect(dsn)
    conn.execute(PG_DDL)
    conn.commit()
    limiter = trio.CapacityLimiter(1)
    sql = INSERT_SQL.format(", ".join(["%s"] * 6))
    # The store's own connection and paths (runtime/store/postgres.py): what rows pg2 and pg3 time.
    store_conn = connect(dsn)
    store_conn.prepare_event_rows()  # as the store's writer session does when it opens
    store_cursor = psycopg.ClientCursor(store_conn.raw)
    rows_query, _ = client_query(EXECUTE_EVENT_ROWS)

    def batch100_query() -> str:
        # The store writer's batch (runtime/store/postgres.py _plan_batch) for a run of 100 event writes: the rows
        # encoded as one JSON parameter, bound client-side, one EXECUTE of the INSERT prepared on the session,
        # BEGIN and COMMIT in the same query (one round trip). The store's batch also locks the thread's lease
        # row and sends a NOTIFY in it.
        rows = orjson.dumps([EVENT_ROW] * 100).decode()
        return f"BEGIN;\n{store_cursor.mogrify(rows_query, (rows,))};\nCOMMIT"

    async def batch100_store() -> None:
        # As the store's writer sends it since issue 16's seventh pass (PostgresStore._apply_batch_async):
        # built and awaited on the event loop, no worker thread.
        results = await script_on_loop(store_conn, batch100_query().encode())
        assert len(results[1]) == 100

    def batch100_store_thread() -> None:
        # The same query from a worker thread: how the writer sent it before.
        store_cursor.execute(batch100_query())
        store_cursor.nextset()
        assert len(store_cursor.fetchall()) == 100

    def select_pk_snapshot() -> None:
        # The snapshot way of a store read (PostgresStore._read_sync): one REPEATABLE READ READ ONLY transaction.
        row = snapshot_read(store_conn, lambda c: c.execute("SELECT * FROM events WHERE seq = ?", (7,)).fetchone())
        assert row[0] == 7

    def insert_commit() -> None:
        conn.execute(sql, EVENT_ROW)
        conn.commit()

    def batch100_executemany() -> None:
        with conn.cursor() as cur:
            cur.executemany(sql, [EVENT_ROW] * 100)
        conn.commit()

    unnest = ("INSERT INTO events (thread_id, turn_id, item_id, event, timestamp, payload) SELECT * FROM "
              "unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[]) RETURNING seq")
    columns = [list(col) for col in zip(*[EVENT_ROW] * 100)]

    def batch100() -> None:
        # One statement for the whole batch that also returns the seqs the writer needs to publish.
        seqs = conn.execute(unnest, columns).fetchall()
        conn.commit()
        assert len(seqs) == 100

    def select_pk() -> None:
        row = conn.execute("SELECT * FROM events WHERE seq = %s", (7,)).fetchone()
        conn.commit()  # end the read transaction, as a store read would
        assert row[0] == 7

    def run(fn):
        return lambda: trio.to_thread.run_sync(fn, limiter=limiter)

    try:
        return {"insert_commit": await timed(n["insert_commit"], run(insert_commit)),
                "batch100": await timed(n["batch100"], batch100_store),
                "batch100_thread": await timed(n["batch100"], run(batch100_store_thread)),
                "batch100_unnest": await timed(n["batch100"], run(batch100)),
                "batch100_executemany": await timed(n["batch100"], run(batch100_executemany)),
                **await store_reads(store_url, n["select_pk"]),
                "select_pk_snapshot": await timed(n["select_pk"], run(select_pk_snapshot)),
                "select_pk_plain": await timed(n["select_pk"], run(select_pk)),
                "notify": await psycopg_notify_wakeups(dsn, n["notify"]),
                "notify_thread": await psycopg_notify_thread_wakeups(dsn, n["notify"])}
    finally:
        conn.close()
        store_conn.close()


async def psycopg_notify_wakeups(dsn: str, n: int) -> list[float]:
    """The listener's socket in ``trio.lowlevel.wait_readable``; libpq parses the notification
    (``consume_input`` + ``notifies``) on the event loop, no thread. The sender commits NOTIFY from a
    worker thread; latency = sender's COMMIT returned -> waiting task woke with the payload."""
    import psycopg

    listener = psycopg.connect(dsn, autocommit=True)
    sender = psycopg.connect(dsn, autocommit=True)
    listener.execute("LISTEN bench")
    pg = listener.pgconn
    out = []
    try:
        for i in range(n + 3):
            sent_at = 0.0

            def send(i=i) -> None:
                nonlocal sent_at
                sender.execute("SELECT pg_notify('bench', %s)", (str(i),))
                sent_at = time.perf_counter()

            got = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, send)
                while got is None:
                    await trio.lowlevel.wait_readable(pg.socket)
                    pg.consume_input()
                    got = pg.notifies()
            woke = time.perf_counter()
            assert got.extra.decode() == str(i), got
            out.append(max(0.0, woke - sent_at))
    finally:
        listener.close()
        sender.close()
    return out[3:]


async def psycopg_notify_thread_wakeups(dsn: str, n: int) -> list[float]:
    """The other way: a worker thread per listener blocked in ``conn.notifies()``."""
    import psycopg

    listener = psycopg.connect(dsn, autocommit=True)
    sender = psycopg.connect(dsn, autocommit=True)
    listener.execute("LISTEN bench")
    out = []
    try:
        for i in range(n + 3):
            sent_at = 0.0

            def send(i=i) -> None:
                nonlocal sent_at
                sender.execute("SELECT pg_notify('bench', %s)", (str(i),))
                sent_at = time.perf_counter()

            def wait_one():
                return next(listener.notifies(stop_after=1, timeout=30))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, send)
                got = await trio.to_thread.run_sync(wait_one)
            woke = time.perf_counter()
            assert got.payload == str(i), got
            out.append(max(0.0, woke - sent_at))
    finally:
        listener.close()
        sender.close()
    return out[3:]


def psycopg_async_on_trio(dsn: str) -> str:
    """What happens when psycopg's AsyncConnection is used under trio (the evidence for the notes)."""
    import psycopg

    async def probe() -> str:
        try:
            conn = await psycopg.AsyncConnection.connect(dsn)
        except BaseException as e:  # noqa: BLE001 - reported, not handled
            return f"{type(e).__name__}: {e}"
        await conn.close()
        return "connected"

    return trio.run(probe)


# ---- pg-purepy (optional; pure Python on anyio) ---------------------------------------------------------

async def purepy_workloads(cluster: PgCluster, db: str, n: dict[str, int]) -> dict[str, list[float]]:
    import pg_purepy

    async with pg_purepy.open_database_connection("127.0.0.1", "postgres", port=cluster.port,
                                                  database=db) as conn:
        await conn.execute(PG_DDL.replace("events", "events_pp"))
        sql = INSERT_SQL.replace("events", "events_pp").format(", ".join(f":p{i}" for i in range(6)))
        params = {f"p{i}": v for i, v in enumerate(EVENT_ROW)}

        async def insert_commit() -> None:
            async with conn.with_transaction():
                await conn.execute(sql, **params)

        async def batch100() -> None:
            async with conn.with_transaction():
                for _ in range(100):
                    await conn.execute(sql, **params)

        async def select_pk() -> None:
            row = await conn.fetch_one("SELECT * FROM events_pp WHERE seq = :s", s=7)
            assert row.data[0] == 7

        return {"insert_commit": await timed(n["insert_commit"], insert_commit),
                "batch100": await timed(n["batch100"], batch100),
                "select_pk": await timed(n["select_pk"], select_pk)}


# ---- the row group ----------------------------------------------------------------------------------------

@contextmanager
def cluster_db() -> Iterator[tuple[PgCluster, str]]:
    cluster = start_cluster()
    try:
        yield cluster, cluster.create_database()
    finally:
        cluster.stop()


def measure(quick: bool, purepy: bool = False) -> dict[str, Any]:
    import tempfile

    n = ({"insert_commit": 100, "batch100": 20, "select_pk": 300, "notify": 50} if quick else
         {"insert_commit": 400, "batch100": 60, "select_pk": 2000, "notify": 200})
    with cluster_db() as (cluster, db), tempfile.TemporaryDirectory(prefix="trio-bench-pg-") as tmp:
        dsn = cluster.dsn(db)
        result: dict[str, Any] = {"n": n, "async_probe": psycopg_async_on_trio(dsn)}
        result["sqlite"] = trio.run(sqlite_workloads, Path(tmp) / "bench.sqlite3", n)
        result["psycopg"] = trio.run(psycopg_workloads, dsn, n, cluster.url(cluster.create_database()))
        if purepy:
            result["purepy"] = trio.run(purepy_workloads, cluster, db, n)
    return result


def bench_pg(sz) -> list:
    from bench.cases import Row

    try:
        got = measure(sz.quick)
    except PgUnavailable as e:
        raise RuntimeError(f"no PostgreSQL for the pg rows: {e}") from None
    s, p = got["sqlite"], got["psycopg"]
    probe = got["async_probe"]
    # Targets: issue 15's goal for the whole store is >= 0.5x SQLite's throughput, i.e. <= 2x its latency
    # per operation; the wake-up must stay well under a streaming reader's tolerance (10 ms absolute).
    return [
        Row("pg1", "PG insert+COMMIT p50 (psycopg thread)", "SQLite FULL, thread", p50_ms(s["insert_commit"]),
            p50_ms(p["insert_commit"]), "ms", 2.0, False,
            notes=f"p99 {p99_ms(p['insert_commit']):.2f} vs {p99_ms(s['insert_commit']):.2f} ms; "
                  f"n={got['n']['insert_commit']}; psycopg AsyncConnection on trio: {probe}"),
        Row("pg2", "PG 100-row batch (store's run INSERT)+COMMIT p50", "SQLite FULL, thread", p50_ms(s["batch100"]),
            p50_ms(p["batch100"]), "ms", 2.0, False,
            notes=f"p99 {p99_ms(p['batch100']):.2f} vs {p99_ms(s['batch100']):.2f} ms; the store writer's INSERT "
                  f"of a run of events (rows as one JSON parameter, the prepared INSERT) with BEGIN and COMMIT in "
                  f"one query awaited on the event loop; the same query from a worker thread (the writer before "
                  f"issue 16's seventh pass): p50 {p50_ms(p['batch100_thread']):.2f} ms; before "
                  f"issue 16's second pass: INSERT ... SELECT FROM unnest(text arrays) + COMMIT p50 "
                  f"{p50_ms(p['batch100_unnest']):.2f} ms; executemany (pipeline): p50 "
                  f"{p50_ms(p['batch100_executemany']):.2f} ms"),
        Row("pg3", "PG SELECT by pk p50 (store read)", "SQLite, thread", p50_ms(s["select_pk"]),
            p50_ms(p["select_pk"]), "ms", 2.0, False,
            notes=f"p99 {p99_ms(p['select_pk']):.3f} vs {p99_ms(s['select_pk']):.3f} ms; a store read of one "
                  f"statement, inline (one query awaited on the loop); the same read not inline (its function "
                  f"in a worker thread): p50 {p50_ms(p['select_pk_thread']):.3f} ms; the snapshot way (BEGIN "
                  f"REPEATABLE READ READ ONLY, SELECT, ROLLBACK in a thread: every read before issue 16's third "
                  f"pass, a read of several statements now): p50 {p50_ms(p['select_pk_snapshot']):.3f} ms; a plain "
                  f"psycopg SELECT + COMMIT: p50 {p50_ms(p['select_pk_plain']):.3f} ms"),
        Row("pg4", "PG NOTIFY wake-up p50 (wait_readable)", "in-process wake", p50_ms(s["notify"]),
            p50_ms(p["notify"]), "ms", 0.0, False, absolute_target=10.0,
            notes=f"p99 {p99_ms(p['notify']):.2f} ms; a thread blocked in conn.notifies(): "
                  f"p50 {p50_ms(p['notify_thread']):.2f}, p99 {p99_ms(p['notify_thread']):.2f} ms"),
    ]


def main(argv: list[str]) -> int:
    got = measure("--quick" in argv, purepy="--purepy" in argv)
    print(f"psycopg AsyncConnection on trio: {got['async_probe']}")
    for name in ("insert_commit", "batch100", "batch100_thread", "batch100_unnest", "batch100_executemany", "select_pk",
                 "select_pk_thread", "select_pk_snapshot", "select_pk_plain", "notify", "notify_thread"):
        cells = [f"{name:14}"]
        for side in ("sqlite", "psycopg", "purepy"):
            if side in got and name in got[side]:
                cells.append(f"{side} p50 {p50_ms(got[side][name]):7.3f} p99 {p99_ms(got[side][name]):7.3f} ms")
        print(" | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
