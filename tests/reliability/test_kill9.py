"""kill -9 under load: a real ``trio-runtime serve`` process streams turns on several threads while
clients save sessions into it, and is SIGKILLed at a seeded-random moment, again and again, each
time restarted on the same data dir. After every kill and every restart:

- every session file parses, and no temp file survives the restart;
- no committed event is lost: every event a client received over SSE (seq N) is found again, the
  same, after the restart;
- seq never goes backwards: each thread's stream is strictly increasing, and events written after
  a restart (the recovery events included) are above every seq seen before it;
- every turn in flight at the kill is ``interrupted`` ("interrupted by process restart"), and no turn
  or item stays queued/in progress;
- every acknowledged save (200) is on disk with at least its revision, listed and linked;
- the SQLite database passes ``PRAGMA integrity_check``.

``make test`` runs 3 kills; ``make reliability`` runs 25 (marker ``reliability``). Run with ``-s`` to
see the counts.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from runtime.store import RESTART_ERROR
from tests.conftest import E2E_LIMIT
from web.client import AsyncClient, ServerUnreachable

from .support import SEED, serving, session_files

THREADS = 3
SAVERS = 2
SESSIONS = 4  # session ids every saver updates in place (plus a new session now and then)
TURN_SECONDS = 4.0  # a turn outlives the kill delay, so every kill lands on running turns
PROMPT = f"/slow {TURN_SECONDS}\n" + " ".join(f"w{i}" for i in range(40))
MAX_KILL_DELAY = 1.0  # after every thread streams, the kill comes within this (seeded-random)
MAX_SAVES = 2000  # per saver and cycle: loops are bounded in count as well as in time
ACTIVE = ("queued", "in_progress")


@dataclasses.dataclass
class Ledger:
    """What clients were told, to check against what a restarted server holds."""

    threads: list[str] = dataclasses.field(default_factory=list)
    # thread -> seq -> the event as received over SSE (before any kill)
    received: dict[str, dict[int, dict[str, Any]]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(dict))
    verified: dict[str, int] = dataclasses.field(default_factory=dict)  # thread -> latest seq checked
    floor: int = 0  # every seq that existed at the last restart is <= floor
    started: dict[str, str] = dataclasses.field(default_factory=dict)  # turn -> thread, acknowledged this cycle
    ended: dict[str, str] = dataclasses.field(default_factory=dict)  # turn -> status seen over SSE
    acked: dict[str, int] = dataclasses.field(default_factory=dict)  # session -> highest acknowledged revision
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def record(self, thread_id: str, event: dict[str, Any], last: int) -> None:
        seq = event["seq"]
        assert seq > last, f"stream of {thread_id} went from seq {last} to {seq}"
        assert seq > self.floor, f"seq {seq} reused after a restart (floor {self.floor})"
        self.received[thread_id][seq] = event
        self.counts["events received over SSE"] += 1


async def stream_turns(client: AsyncClient, thread_id: str, ledger: Ledger, streaming: trio.Event) -> None:
    """Start turns one after another on ``thread_id`` and read its event stream."""
    since = ledger.verified.get(thread_id, 0)
    ended: dict[str, trio.Event] = {}

    async def listen() -> None:
        last = since
        async for event in client.events(thread_id, since_seq=since):
            ledger.record(thread_id, event, last)
            last = event["seq"]
            if event["event"] == "item.delta":
                streaming.set()  # every turn before `since` ended at the last restart: this one is new
            if event["event"] == "turn.completed":
                ledger.ended[event["turn_id"]] = event["payload"]["status"]
                ended.setdefault(event["turn_id"], trio.Event()).set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            for _ in range(3):  # bounded; a turn lasts longer than the time to the kill anyway
                turn = await client.start_turn(thread_id, PROMPT)  # a 409 here fails the test
                ledger.started[turn["id"]] = thread_id
                ledger.counts["turns started"] += 1
                await ended.setdefault(turn["id"], trio.Event()).wait()
    except* (ServerUnreachable, httpx.TransportError):
        pass


async def save_loop(client: AsyncClient, ledger: Ledger, rng: random.Random) -> None:
    """Save threads into a few sessions in place (and now and then into a new one), rename some."""
    try:
        for _ in range(MAX_SAVES):
            thread_id = rng.choice(ledger.threads)
            if ledger.acked and rng.random() < 0.1:
                session_id = rng.choice(sorted(ledger.acked))
                result = await client.patch_session(session_id, title=f"renamed {rng.randrange(1000)}")
                revision = result["session"]["revision"]
            else:
                session_id = None if rng.random() < 0.1 else f"kill-{rng.randrange(SESSIONS)}"
                result = await client.save_session(thread_id=thread_id, session_id=session_id)
                session_id, revision = result["session_id"], result["session"]["metadata"]["revision"]
            ledger.acked[session_id] = max(ledger.acked.get(session_id, 0), revision)
            ledger.counts["saves acknowledged"] += 1
    except (ServerUnreachable, httpx.TransportError):
        pass


async def load_then_kill(server, client: AsyncClient, ledger: Ledger, rng: random.Random) -> None:
    ledger.started.clear()
    streaming = {thread_id: trio.Event() for thread_id in ledger.threads}
    async with trio.open_nursery() as load:
        for thread_id in ledger.threads:
            load.start_soon(stream_turns, client, thread_id, ledger, streaming[thread_id])
        for index in range(SAVERS):
            load.start_soon(save_loop, client, ledger, random.Random(rng.random()))
        with trio.fail_after(E2E_LIMIT):
            for event in streaming.values():
                await event.wait()
        # The fault: SIGKILL at a seeded-random moment while every thread streams and saves commit.
        await trio.sleep(rng.uniform(0, MAX_KILL_DELAY))
        server.process.kill()
        with trio.fail_after(E2E_LIMIT):
            assert await server.process.wait() == -9
        ledger.counts["kills"] += 1
        load.cancel_scope.cancel()


def check_after_kill(data_dir: Path, ledger: Ledger, scratch: Path) -> None:
    """What a crash may leave: whole session files (old or new), perhaps temp files, a sound database."""
    docs, temps, broken = session_files(data_dir)
    assert broken == [], f"torn session files after kill -9: {broken}"
    ledger.counts["temp files left by a kill (removed at restart)"] += len(temps)
    for session_id, revision in ledger.acked.items():
        assert docs[session_id]["metadata"]["revision"] >= revision, f"acknowledged save of {session_id} lost"
    # Check a copy, so that opening the database does not do the restarted server's recovery for it.
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    for path in data_dir.glob("runtime.sqlite3*"):
        shutil.copy2(path, scratch / path.name)
    conn = sqlite3.connect(scratch / "runtime.sqlite3")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


async def replay(client: AsyncClient, thread_id: str, since: int, latest: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    if latest <= since:
        return events
    with trio.fail_after(E2E_LIMIT):
        async for event in client.events(thread_id, since_seq=since):
            assert not events or event["seq"] > events[-1]["seq"], "replay is not strictly increasing"
            events.append(event)
            if event["seq"] >= latest:
                break
    return events


async def check_after_restart(client: AsyncClient, data_dir: Path, ledger: Ledger, *, full: bool = False) -> None:
    docs, temps, broken = session_files(data_dir)
    assert temps == [], f"temp files survived the restart: {temps}"
    assert broken == [], f"unparseable session files: {broken}"
    listed = {meta["id"]: meta for meta in await client.list_sessions(include_archived=True, limit=500)}
    assert set(listed) == set(docs), "the session index disagrees with the files"
    for session_id, doc in docs.items():
        assert listed[session_id]["revision"] == doc["metadata"]["revision"], session_id
    for session_id, revision in ledger.acked.items():
        assert docs[session_id]["metadata"]["revision"] >= revision, f"acknowledged save of {session_id} lost"
    ledger.counts["sessions with an acknowledged save, verified"] = len(ledger.acked)
    seen_before = max((seq for events in ledger.received.values() for seq in events), default=0)
    floor = 0
    for thread_id in ledger.threads:
        detail = await client.get_thread(thread_id)
        stuck = [t["id"] for t in detail["turns"] if t["status"] in ACTIVE]
        stuck += [i["id"] for i in detail["items"] if i["status"] in ACTIVE]
        assert stuck == [], f"still running after a restart: {stuck}"
        for turn in detail["turns"]:
            if ledger.started.get(turn["id"]) != thread_id or turn["id"] in ledger.ended:
                continue
            # In flight at the kill: interrupted by the restart (or it had just completed, unseen).
            if turn["status"] == "interrupted":
                assert turn["error"] == RESTART_ERROR, turn
                ledger.counts["in-flight turns found interrupted"] += 1
            else:
                assert turn["status"] == "completed", turn
                ledger.counts["in-flight turns found completed"] += 1
        link = detail["thread"]["session_id"]
        assert link is None or link in docs, f"thread {thread_id} links a missing session {link}"
        latest = detail["latest_seq"]
        since = 0 if full else ledger.verified.get(thread_id, 0)
        events = await replay(client, thread_id, since, latest)
        by_seq = {event["seq"]: event for event in events}
        for seq, event in ledger.received[thread_id].items():
            if seq > since:
                assert by_seq.get(seq) == event, f"event {seq} of {thread_id} lost or changed by the kill"
                ledger.counts["received events checked in the final full replay" if full
                              else "received events found again after the next restart"] += 1
        for event in events:
            if event["event"] == "turn.completed" and event["payload"].get("error") == RESTART_ERROR \
                    and event["seq"] > ledger.verified.get(thread_id, 0):
                assert event["seq"] > seen_before, "a recovery event reused a seq"
        ledger.verified[thread_id] = latest
        floor = max(floor, latest)
    ledger.floor = max(ledger.floor, floor)
    ledger.counts["max seq"] = ledger.floor


async def kill_loop(tmp_path: Path, kills: int, seed: int) -> collections.Counter:
    data_dir = tmp_path / "data"
    ledger = Ledger()
    rng = random.Random(seed)
    for cycle in range(kills + 1):
        async with serving(data_dir) as server:
            ledger.counts["server starts"] += 1
            async with AsyncClient(server.url, server.token, timeout=E2E_LIMIT) as client:
                if cycle == 0:
                    ledger.threads = [(await client.create_thread(title=f"kill {i}"))["id"] for i in range(THREADS)]
                else:
                    await check_after_restart(client, data_dir, ledger, full=cycle == kills)
                if cycle < kills:
                    await load_then_kill(server, client, ledger, rng)
        if cycle < kills:
            check_after_kill(data_dir, ledger, tmp_path / "copy")
    # Every kill interrupted turns in flight (each kill lands while every thread streams a long turn).
    assert ledger.counts["in-flight turns found interrupted"] >= kills
    assert ledger.counts["saves acknowledged"] > 0
    return ledger.counts


def _report(kills: int, seed: int, counts: collections.Counter) -> None:
    print(f"\nkill -9 x{kills} (seed {seed}):")
    for name, value in counts.items():
        print(f"  {name}: {value}")


async def test_kill_9_under_load_loses_no_committed_event_or_save(tmp_path):
    counts = await kill_loop(tmp_path, kills=3, seed=SEED)
    _report(3, SEED, counts)


@pytest.mark.reliability
async def test_reliability_kill_9_25_times(tmp_path):
    counts = await kill_loop(tmp_path, kills=25, seed=SEED)
    _report(25, SEED, counts)
