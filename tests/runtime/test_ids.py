"""Record ids (runtime.clock.new_id / new_ids): 32 hex digits after the prefix, the milliseconds first, so
ids made close in time sit close together in every index on an id (bench row 15a; docs/design.md, "History
control"). The second test is the cost that layout exists for: a fork's copied rows land on a few pages."""

from __future__ import annotations

import re
import sqlite3
import types

import pytest

from bench import datagen
from runtime import clock

from tests import support

ID = re.compile(r"^turn_[0-9a-f]{32}$")


def test_ids_made_later_sort_after_earlier_ones_and_a_batch_shares_its_millisecond(monkeypatch):
    now_ms = [1_764_700_000_000]
    monkeypatch.setattr(clock, "time", types.SimpleNamespace(time_ns=lambda: now_ms[0] * 1_000_000 + 123))
    first = [clock.new_id("turn") for _ in range(100)] + clock.new_ids("turn", 100)
    now_ms[0] += 1
    later = [clock.new_id("turn") for _ in range(100)] + clock.new_ids("turn", 100)
    assert all(ID.match(made) for made in first + later)
    assert len(set(first + later)) == 400  # 80 random bits after the milliseconds
    assert {made[5:17] for made in first} == {f"{now_ms[0] - 1:012x}"}
    assert {made[5:17] for made in later} == {f"{now_ms[0]:012x}"}
    assert max(first) < min(later)
    assert clock.new_ids("turn", 0) == []


@pytest.mark.sqlite_only(reason="counts the frames of SQLite's WAL file")
async def test_a_fork_of_a_100_turn_thread_writes_few_pages(tmp_path):
    """With uuid4 ids each copied turn and item went to a random page of the turns and items primary keys
    and of ``items_by_turn``: ~240 WAL frames per fork once 30 forks were stored; now ~70."""
    conn = datagen.open_db(tmp_path)
    (source,) = datagen.add_threads(conn, 1, turns=100, events_per_thread=601)
    conn.close()
    async with support.open_runtime(tmp_path) as rt:
        for _ in range(30):
            await rt.fork_thread(source)
        frames = []
        for _ in range(3):
            with sqlite3.connect(tmp_path / "runtime.sqlite3", isolation_level=None) as other:
                busy, _, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                assert busy == 0
            fork = await rt.fork_thread(source)
            assert len(fork["turn_ids"]) == 100
            with sqlite3.connect(tmp_path / "runtime.sqlite3", isolation_level=None) as other:
                _, logged, _ = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            frames.append(logged)
    assert min(frames) < 150, frames
