"""The kept thread details (runtime/threads_detail.py, issue 16 row 12): a repeated read of an unchanged
thread is served from the bytes kept, and every change of the database, whichever way it was made, is seen
by the next read. Each change test first shows that the page IS served from the kept bytes (so it would
fail with invalidation broken), then makes the change and compares the answer with a fresh, uncached read."""

from __future__ import annotations

import json
import sqlite3

import pytest
import trio

from runtime import NotFound, threads_detail
from runtime.store import records
from runtime.threads_detail import DetailCache

from .helpers import run_turn, wait_turn_end

SQLITE_ONLY = pytest.mark.sqlite_only(reason="the kept details live on SQLite's data_version; PostgreSQL keeps none")


@pytest.fixture
def detail_reads(monkeypatch) -> list[str]:
    """The thread id of every detail read that reached the store (a kept answer does not)."""
    calls: list[str] = []
    real = records.thread_detail

    def counting(conn, thread_id, *args, **kwargs):
        calls.append(thread_id)
        return real(conn, thread_id, *args, **kwargs)

    monkeypatch.setattr(records, "thread_detail", counting)
    return calls


async def served_twice(rt, thread_id, detail_reads, **page) -> bytes:
    """Read the page twice; the second read must be the kept bytes (no store read). Returns them."""
    before = len(detail_reads)
    first = await rt.get_thread_json(thread_id, **page)
    second = await rt.get_thread_json(thread_id, **page)
    assert second == first
    assert len(detail_reads) == before + 1, "the second read of an unchanged thread went to the store"
    return first


async def fresh(rt, thread_id, **page) -> dict:
    """The detail read from the store, past the kept answers."""
    return await rt.get_thread(thread_id, **page)


@SQLITE_ONLY
async def test_a_repeated_read_of_an_unchanged_thread_is_served_from_the_kept_bytes(rt, thread_id, detail_reads):
    turn = await run_turn(rt, thread_id, "hello there")
    reads_before = len(detail_reads)

    body = await served_twice(rt, thread_id, detail_reads)

    doc = json.loads(body)
    assert doc == await fresh(rt, thread_id)
    assert [t["id"] for t in doc["turns"]] == [turn["id"]]
    assert [i["detail"] for i in doc["items"]] == ["hello there", "You said: hello there"]
    # Each page is its own answer: another page parameter is read, then kept too.
    older = await served_twice(rt, thread_id, detail_reads, include_rewound=True, turns_limit=1)
    assert json.loads(older) == await fresh(rt, thread_id, include_rewound=True, turns_limit=1)
    assert len(detail_reads) - reads_before == 4  # two pages served twice (2 reads) + two fresh reads
    assert rt.details.hits == 2


@SQLITE_ONLY
async def test_a_turn_changes_the_next_read(rt, thread_id, detail_reads):
    await run_turn(rt, thread_id, "first")
    await served_twice(rt, thread_id, detail_reads)

    second = await run_turn(rt, thread_id, "second")

    doc = json.loads(await rt.get_thread_json(thread_id))
    assert doc == await fresh(rt, thread_id)
    assert [t["input_summary"] for t in doc["turns"]] == ["first", "second"]
    assert doc["turns"][-1]["id"] == second["id"] and doc["turns"][-1]["status"] == "completed"


@SQLITE_ONLY
async def test_a_running_turn_is_seen_as_it_goes(rt, thread_id, detail_reads):
    """A turn's start, its items and its end are separate commits: each read shows the state of its moment."""
    await served_twice(rt, thread_id, detail_reads)
    turn = await rt.start_turn(thread_id, "stream me")
    started = json.loads(await rt.get_thread_json(thread_id))
    assert started == await fresh(rt, thread_id)
    assert [t["id"] for t in started["turns"]] == [turn["id"]]
    await wait_turn_end(rt, thread_id, turn["id"])
    ended = json.loads(await rt.get_thread_json(thread_id))
    assert ended == await fresh(rt, thread_id)
    assert ended["turns"][0]["status"] == "completed"
    assert ended["latest_seq"] > started["latest_seq"]


@SQLITE_ONLY
async def test_a_rewind_changes_the_next_read(rt, thread_id, detail_reads):
    t1 = await run_turn(rt, thread_id, "one")
    t2 = await run_turn(rt, thread_id, "two")
    await served_twice(rt, thread_id, detail_reads)
    await served_twice(rt, thread_id, detail_reads, include_rewound=True)

    await rt.rewind_thread(thread_id, t2["id"])

    doc = json.loads(await rt.get_thread_json(thread_id))
    assert doc == await fresh(rt, thread_id)
    assert [t["id"] for t in doc["turns"]] == [t1["id"]]
    every = json.loads(await rt.get_thread_json(thread_id, include_rewound=True))
    assert [(t["id"], t["rewound"]) for t in every["turns"]] == [(t1["id"], False), (t2["id"], True)]


@SQLITE_ONLY
async def test_a_retry_changes_the_next_read(rt, thread_id, detail_reads):
    t1 = await run_turn(rt, thread_id, "again please")
    await served_twice(rt, thread_id, detail_reads)

    retried = await rt.retry_turn(thread_id, t1["id"])
    await wait_turn_end(rt, thread_id, retried["id"])

    doc = json.loads(await rt.get_thread_json(thread_id))
    assert doc == await fresh(rt, thread_id)
    assert [(t["id"], t["retry_of"]) for t in doc["turns"]] == [(retried["id"], t1["id"])]


@SQLITE_ONLY
async def test_a_delete_makes_the_next_read_not_found(rt, thread_id, detail_reads):
    await run_turn(rt, thread_id, "soon gone")
    await served_twice(rt, thread_id, detail_reads)

    await rt.delete_thread(thread_id)

    with pytest.raises(NotFound):
        await rt.get_thread_json(thread_id)
    # A new thread with the same id (a caller's id) is a new answer, not the deleted one's.
    await rt.create_thread(thread_id=thread_id, title="reborn")
    doc = json.loads(await rt.get_thread_json(thread_id))
    assert doc["turns"] == [] and doc["thread"]["title"] == "reborn"


@SQLITE_ONLY
@pytest.mark.parametrize("changes", [{"title": "renamed"}, {"archived": True}, {"system_prompt": "be brief"},
                                     {"approval_policy": "deny"}])
async def test_a_thread_update_changes_the_next_read(rt, thread_id, detail_reads, changes):
    await served_twice(rt, thread_id, detail_reads)

    await rt.update_thread(thread_id, changes)

    doc = json.loads(await rt.get_thread_json(thread_id))
    assert doc == await fresh(rt, thread_id)
    assert {name: doc["thread"][name] for name in changes} == changes


@SQLITE_ONLY
async def test_a_fork_changes_the_next_read_of_the_source_and_the_copy_reads_its_own(rt, thread_id, detail_reads):
    t1 = await run_turn(rt, thread_id, "fork me")
    source = json.loads(await served_twice(rt, thread_id, detail_reads))

    fork = await rt.fork_thread(thread_id, title="copy")

    after = json.loads(await rt.get_thread_json(thread_id))
    assert after == await fresh(rt, thread_id)
    assert after["turns"] == source["turns"]
    assert after["latest_seq"] > source["latest_seq"]  # the fork is an event of the source too
    copy = json.loads(await rt.get_thread_json(fork["thread"]["id"]))
    assert copy == await fresh(rt, fork["thread"]["id"])
    assert copy["thread"]["title"] == "copy" and [t["input_summary"] for t in copy["turns"]] == ["fork me"]
    assert copy["turns"][0]["id"] != t1["id"]


@SQLITE_ONLY
async def test_a_commit_by_another_process_changes_the_next_read(rt, thread_id, detail_reads, tmp_path):
    """Someone else writes the database file (another connection, as another process would): no event,
    nothing this runtime did, and still the next read sees it."""
    await served_twice(rt, thread_id, detail_reads)
    other = sqlite3.connect(rt.config.db_path, isolation_level=None)
    try:
        other.execute("UPDATE threads SET title = 'from outside' WHERE id = ?", (thread_id,))
    finally:
        other.close()

    doc = json.loads(await rt.get_thread_json(thread_id))
    assert doc["thread"]["title"] == "from outside"
    assert doc == await fresh(rt, thread_id)


@SQLITE_ONLY
async def test_a_commit_on_the_inline_connection_itself_changes_the_next_read(rt, thread_id, detail_reads):
    """data_version does not count the commits of the connection it is asked on: the version also carries
    that connection's own total_changes (the runtime never writes through it; this is the guard)."""
    await served_twice(rt, thread_id, detail_reads)
    rt.store._iconn.execute("UPDATE threads SET title = 'inline' WHERE id = ?", (thread_id,))

    doc = json.loads(await rt.get_thread_json(thread_id))
    assert doc["thread"]["title"] == "inline"
    assert doc == await fresh(rt, thread_id)


@SQLITE_ONLY
async def test_an_answer_read_while_a_commit_landed_is_not_kept(rt, thread_id, detail_reads, monkeypatch):
    """A commit between the version read before and after the read: that answer may be of the older
    database, so it is served once and not kept."""
    real = records.thread_detail  # the counting one

    def read_then_commit(conn, thread_id, *args, **kwargs):
        result = real(conn, thread_id, *args, **kwargs)
        other = sqlite3.connect(rt.config.db_path, isolation_level=None)
        try:
            other.execute("UPDATE threads SET title = 'meanwhile' WHERE id = ?", (thread_id,))
        finally:
            other.close()
        return result

    monkeypatch.setattr(records, "thread_detail", read_then_commit)
    first = json.loads(await rt.get_thread_json(thread_id))
    assert first["thread"]["title"] is None  # the snapshot from before the commit
    assert len(rt.details) == 0
    monkeypatch.setattr(records, "thread_detail", real)
    second = json.loads(await rt.get_thread_json(thread_id))
    assert second["thread"]["title"] == "meanwhile"
    assert len(detail_reads) == 2


@SQLITE_ONLY
async def test_the_version_moves_on_every_commit_and_is_none_inside_a_transaction(rt, thread_id):
    before = rt.store.version()
    assert before is not None
    await rt.get_thread(thread_id)  # reads change nothing
    assert rt.store.version() == before
    await rt.update_thread(thread_id, {"title": "x"})
    after = rt.store.version()
    assert after is not None and after != before
    conn = rt.store._iconn
    conn.execute("BEGIN")
    try:
        conn.execute("SELECT 1 FROM threads").fetchall()
        assert rt.store.version() is None  # a pinned view cannot say whether others committed
    finally:
        conn.execute("ROLLBACK")
    assert rt.store.version() == after


async def test_on_every_backend_the_answer_is_the_detail_encoded(rt, thread_id):
    """Both backends: the bytes are the detail's JSON (on PostgreSQL nothing is kept; its records carry
    ``owner``), and a change is seen."""
    await run_turn(rt, thread_id, "both stores")
    doc = json.loads(await rt.get_thread_json(thread_id))
    assert doc == await fresh(rt, thread_id)
    assert [i["detail"] for i in doc["items"]] == ["both stores", "You said: both stores"]
    await rt.update_thread(thread_id, {"title": "after"})
    assert json.loads(await rt.get_thread_json(thread_id))["thread"]["title"] == "after"
    if rt.store.version() is None:
        assert len(rt.details) == 0


async def test_a_cancelled_read_keeps_nothing_and_a_hit_still_checkpoints(rt, thread_id):
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await rt.get_thread_json(thread_id)
    assert len(rt.details) == 0
    await rt.get_thread_json(thread_id)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await rt.get_thread_json(thread_id)  # served from the kept bytes on SQLite: still cancellable


# ---- the cache itself: bounds and expiry --------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_entries_are_bounded_in_number_least_recently_used_dropped_first():
    cache = DetailCache()
    for n in range(threads_detail.MAX_ENTRIES):
        cache.put(1, n, b"x")
    assert cache.get(1, 0) == b"x"  # now the most recently used
    cache.put(1, "one more", b"y")
    assert len(cache) == threads_detail.MAX_ENTRIES
    assert cache.get(1, 1) is None  # the least recently used went
    assert cache.get(1, 0) == b"x" and cache.get(1, "one more") == b"y"


def test_entries_are_bounded_in_bytes_and_a_too_big_answer_is_not_kept():
    cache = DetailCache()
    big = b"z" * threads_detail.MAX_ENTRY_BYTES
    count = threads_detail.MAX_BYTES // len(big)
    for n in range(count + 2):
        cache.put(1, n, big)
    assert cache.size <= threads_detail.MAX_BYTES
    assert len(cache) == count
    assert cache.get(1, 0) is None and cache.get(1, 1) is None and cache.get(1, count + 1) == big
    cache.put(1, "huge", big + b"!")
    assert cache.get(1, "huge") is None
    assert cache.size == count * len(big)


def test_another_version_drops_every_entry():
    cache = DetailCache()
    cache.put((1, 0), "a", b"aa")
    cache.put((1, 0), "b", b"bb")
    assert cache.get((2, 0), "a") is None
    assert len(cache) == 0 and cache.size == 0
    assert cache.get((1, 0), "b") is None  # an old version never comes back to life


def test_an_entry_expires_after_max_age():
    clock = FakeClock()
    cache = DetailCache(clock)
    cache.put(1, "a", b"aa")
    clock.now += threads_detail.MAX_AGE
    assert cache.get(1, "a") == b"aa"
    clock.now += 0.001
    assert cache.get(1, "a") is None
    assert len(cache) == 0 and cache.size == 0
