"""kill -9 while history changes: a real ``trio-runtime serve`` process runs turns on several threads
while one client per thread rewinds, retries, forks, restores and deletes at random, and it is SIGKILLed
at a seeded-random moment, again and again, each time restarted on the same data dir.

Each thread has one worker, so at most one request that changes its live history is in flight at a
time. Before each request the worker records the thread's live turn ids ("before") and what the
operation makes of them ("after"); an answered request moves the expected state to "after". After
every restart each thread must hold exactly the expected state, or, for the request that was in
flight at the kill, exactly its before or its after:

- rewind: the live turns before the anchor; retry: those plus one new turn whose ``retry_of`` is the
  anchor; turn start: one new turn at the end; restore: no live turn; fork: the new thread absent, or
  present with exactly copies of the source's turns through the anchor; delete: the thread whole, or
  gone with no thread, turn, item or event row left (read from the SQLite file after the server exited);
- no seq is reused: every seq written after the restart is above every seq a client saw before the
  kill (SSE, ``latest_seq``); the replay from 0 of each thread is strictly increasing and holds every
  event the database held at the kill, unchanged;
- rewound turns keep their events; no turn or item is left queued or in progress (a turn in flight ends
  ``interrupted`` by the restart);
- the restarted engine agrees with the store: ``PUT /v1/sessions`` messages == ``POST /v1/sessions``
  (rebuild) messages == the thread's base messages and live items folded;
- no session work file survives the start-up recovery, and every safety session of a restore that
  answered 200 exists.

``make reliability`` runs 15 kills (marker ``reliability``); run with ``-s`` to see the counts and the
seed, and rerun with ``TRIO_RUNTIME_TEST_SEED=<seed>``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from runtime import codec
from runtime.store import RESTART_ERROR
from runtime.transcript import build_messages
from tests.conftest import E2E_LIMIT
from web.client import ApiError, AsyncClient, ServerUnreachable, _q

from .support import SEED, serving, session_files

THREADS = 3  # threads at the start; forks add threads and deletes take them away
MIN_THREADS, MAX_THREADS = 2, 6  # forks stop at MAX_THREADS, deletes at MIN_THREADS
TURN_SECONDS = 0.6  # long enough for history requests to land on streaming turns, short enough to finish some
PROMPT = f"/slow {TURN_SECONDS}\n" + " ".join(f"w{i}" for i in range(10))
WARM_UP_OPS = 12  # answered requests (all threads) before the kill may come, so every kind gets a chance
MAX_KILL_DELAY = 1.5  # after the warm-up, the kill comes within this (seeded-random)
MAX_OPS = 400  # per worker and cycle: loops are bounded in count as well as in time
ACTIVE = ("queued", "in_progress")
SAFETY_TITLE = "Before restore: "  # API.md: the title of a restore's safety session
FINISHED = ("completed", "failed", "interrupted")
HISTORY = ("rewind", "retry", "fork", "restore", "delete")
MAX_AIMED_DELAY = 0.02  # an aimed kill comes within this after a history request was sent (its latency here)


class Lost(Exception):
    """The server went away under a request (the kill): its outcome is decided after the restart."""


@dataclasses.dataclass
class Op:
    """A request that changes a thread's live history, recorded before it is sent."""

    kind: str
    thread_id: str
    before: list[str]  # the live turn ids when it was sent
    anchor: str | None = None
    target: str | None = None  # fork: the new thread's (caller-supplied) id
    copied: list[tuple[str, str]] | None = None  # fork: (input_summary, status) of the turns it copies
    session_id: str | None = None  # restore

    def prefix(self) -> list[str]:
        """The live turns before the anchor (rewind, retry)."""
        return self.before[:self.before.index(self.anchor)]


@dataclasses.dataclass
class Ledger:
    """What clients were told, to check against what a restarted server holds."""

    live: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # thread -> expected live turn ids
    pending: dict[str, Op] = dataclasses.field(default_factory=dict)  # thread -> its request in flight
    gone: set[str] = dataclasses.field(default_factory=set)  # deleted threads
    snapshots: list[str] = dataclasses.field(default_factory=list)  # saved sessions to restore from
    safety: set[str] = dataclasses.field(default_factory=set)  # safety sessions of restores that answered
    started: dict[str, str] = dataclasses.field(default_factory=dict)  # turn -> thread it started on
    received: dict[str, dict[int, dict[str, Any]]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(dict))  # thread -> seq -> event, this cycle
    verified: dict[str, int] = dataclasses.field(default_factory=dict)  # thread -> latest seq checked
    seen: int = 0  # the highest seq any client saw (SSE, latest_seq) since the server started
    floor: int = 0  # every seq that existed at the last restart is <= floor
    answered: int = 0  # requests answered this cycle
    warm: trio.Event = dataclasses.field(default_factory=trio.Event)
    trigger: trio.Event | None = None  # set when a history request is sent (a kill aimed at one waits for it)
    serial: int = 0
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def see(self, seq: int) -> None:
        self.seen = max(self.seen, seq)

    def name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}-{self.serial}"


# ---- requests -----------------------------------------------------------------------------------


async def call(client: AsyncClient, method: str, path: str, body: Any = None, params: dict | None = None) -> Any:
    try:
        return await client._call(method, path, json_body=body, params=params)
    except (ServerUnreachable, httpx.TransportError) as exc:
        raise Lost() from exc


def thread_path(thread_id: str, tail: str = "") -> str:
    return f"/v1/threads/{_q(thread_id)}{tail}"


async def detail_of(client: AsyncClient, thread_id: str, ledger: Ledger) -> dict[str, Any] | None:
    """GET thread with its rewound turns, or None when it is gone (404)."""
    try:
        detail = await call(client, "GET", thread_path(thread_id), params={"include_rewound": "true"})
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
    ledger.see(detail["latest_seq"])
    return detail


def live_ids(detail: dict[str, Any]) -> list[str]:
    return [turn["id"] for turn in detail["turns"] if not turn["rewound"]]


# ---- the load --------------------------------------------------------------------------------


@dataclasses.dataclass
class Watch:
    """What a thread's SSE listener tells its worker: a turn streams, a turn ended."""

    streaming: dict[str, trio.Event] = dataclasses.field(default_factory=dict)
    ended: dict[str, trio.Event] = dataclasses.field(default_factory=dict)

    def of(self, table: dict[str, trio.Event], turn_id: str) -> trio.Event:
        return table.setdefault(turn_id, trio.Event())


async def listen(client: AsyncClient, thread_id: str, ledger: Ledger, watch: Watch) -> None:
    """Read the thread's stream: every seq strictly increasing and above every seq of an earlier run."""
    last = since = ledger.verified.get(thread_id, 0)
    try:
        async for event in client.events(thread_id, since_seq=since):
            seq = event["seq"]
            assert seq > last, f"stream of {thread_id} went from seq {last} to {seq}"
            assert seq > ledger.floor, f"seq {seq} of {thread_id} reused after a restart (floor {ledger.floor})"
            last = seq
            ledger.see(seq)
            ledger.received[thread_id][seq] = event
            ledger.counts["events received over SSE"] += 1
            turn_id = event.get("turn_id")
            if event["event"] == "turn.started":
                ledger.started[turn_id] = thread_id
            elif event["event"] == "item.delta":
                watch.of(watch.streaming, turn_id).set()
            elif event["event"] == "turn.completed":
                watch.of(watch.streaming, turn_id).set()
                watch.of(watch.ended, turn_id).set()
            elif event["event"] == "thread.deleted":
                return
    except (ServerUnreachable, httpx.TransportError):
        pass
    except ApiError as exc:  # the thread was deleted before the stream opened
        assert exc.status == 404, exc


def choose(rng: random.Random, ledger: Ledger, finished: list[dict[str, Any]], busy: bool) -> str:
    weights = {"turn": 0 if busy else 4, "save": 1, "restore": 1 if ledger.snapshots else 0,
               "rewind": 3 if finished else 0, "retry": 3 if finished else 0,
               "fork": 2 if len(ledger.live) < MAX_THREADS else 0,
               "delete": 1 if len(ledger.live) > MIN_THREADS else 0}
    kinds = [kind for kind in weights if weights[kind]]
    return rng.choices(kinds, [weights[kind] for kind in kinds])[0]


async def worker(client: AsyncClient, thread_id: str, ledger: Ledger, watch: Watch, rng: random.Random,
                 spawn) -> None:
    """Change the thread's history at random, one request at a time."""
    try:
        for _ in range(MAX_OPS):
            detail = await detail_of(client, thread_id, ledger)
            assert detail is not None, f"thread {thread_id} vanished while only its worker changes it"
            before = live_ids(detail)
            assert before == ledger.live[thread_id], f"{thread_id}: the store disagrees with what clients were told"
            live = [turn for turn in detail["turns"] if not turn["rewound"]]
            finished = [turn for turn in live if turn["status"] in FINISHED]
            busy = any(turn["status"] in ACTIVE for turn in live)
            kind = choose(rng, ledger, finished, busy)
            if_busy = "interrupt" if rng.random() < 0.85 else "reject"
            anchor = rng.choice(finished)["id"] if finished and kind in ("rewind", "retry", "fork") else None
            op = Op(kind, thread_id, before, anchor=anchor)
            if kind == "fork":
                op.target = ledger.name("fork")
                through = live[:before.index(anchor) + 1] if anchor else []
                op.copied = [(turn["input_summary"], turn["status"]) for turn in through]
            elif kind == "restore":
                op.session_id = rng.choice(ledger.snapshots)
            ledger.pending[thread_id] = op
            if ledger.trigger is not None and kind in HISTORY:
                ledger.trigger.set()
            try:
                done = await send(client, op, if_busy, ledger)
            except ApiError as exc:
                # Refused as the contract says (a busy thread with if_busy "reject", a turn while one runs):
                # nothing changed. Any other error fails the test.
                assert exc.status == 409 and "in progress" in exc.message, f"{kind}: {exc}"
                assert kind == "turn" or (if_busy == "reject" and kind in ("rewind", "retry", "restore", "delete")), \
                    f"{kind} with if_busy {if_busy!r}: {exc}"
                del ledger.pending[thread_id]
                ledger.counts[f"{kind} refused (409, busy)"] += 1
                continue
            del ledger.pending[thread_id]
            ledger.counts[f"{kind} answered"] += 1
            ledger.answered += 1
            if ledger.answered >= WARM_UP_OPS:
                ledger.warm.set()
            if kind == "delete":
                return
            if kind == "fork":
                spawn(op.target)
            if done is not None:  # a turn started (or a retry's turn): let it stream, or let it end
                table = watch.ended if rng.random() < 0.5 else watch.streaming
                with trio.fail_after(E2E_LIMIT):
                    await watch.of(table, done).wait()
    except Lost:
        pass


async def send(client: AsyncClient, op: Op, if_busy: str, ledger: Ledger) -> str | None:
    """Send ``op``; on its answer, move the expected state to its after. Returns a turn it started."""
    tid = op.thread_id
    if op.kind == "turn":
        turn = await call(client, "POST", thread_path(tid, "/turns"), {"prompt": PROMPT})
        ledger.live[tid] = op.before + [turn["id"]]
        ledger.started[turn["id"]] = tid
        return turn["id"]
    if op.kind == "rewind":
        body = {"before_turn_id": op.anchor, "if_busy": if_busy}
        result = await call(client, "POST", thread_path(tid, "/rewind"), body)
        assert result["removed_turn_ids"] == op.before[len(op.prefix()):], result
        ledger.see(result["latest_seq"])
        ledger.live[tid] = op.prefix()
    elif op.kind == "retry":
        turn = await call(client, "POST", thread_path(tid, "/retry"), {"turn_id": op.anchor, "if_busy": if_busy})
        assert turn["retry_of"] == op.anchor and turn["id"] not in op.before, turn
        ledger.live[tid] = op.prefix() + [turn["id"]]
        ledger.started[turn["id"]] = tid
        return turn["id"]
    elif op.kind == "fork":
        body = {"id": op.target, "title": f"fork of {tid}"}
        if op.anchor is not None:
            body["through_turn_id"] = op.anchor
        result = await call(client, "POST", thread_path(tid, "/fork"), body)
        assert result["thread"]["id"] == op.target and len(result["turn_ids"]) == len(op.copied), result
        ledger.live[op.target] = result["turn_ids"]
    elif op.kind == "save":
        session_id = ledger.name("snap")
        await call(client, "PUT", "/v1/sessions", {"thread_id": tid, "session_id": session_id})
        ledger.snapshots.append(session_id)
    elif op.kind == "restore":
        body = {"session_id": op.session_id, "if_busy": if_busy}
        result = await call(client, "POST", thread_path(tid, "/restore"), body)
        assert result["session_id"] == op.session_id and result["thread"]["session_id"] == op.session_id, result
        ledger.safety.add(result["safety_session_id"])
        ledger.snapshots.append(result["safety_session_id"])
        ledger.live[tid] = []
    elif op.kind == "delete":
        await call(client, "DELETE", thread_path(tid), params={"if_busy": if_busy})
        del ledger.live[tid]
        ledger.gone.add(tid)
    return None


async def load_then_kill(server, clients: list[AsyncClient], ledger: Ledger, rng: random.Random) -> None:
    ledger.answered = 0
    ledger.warm = trio.Event()
    ledger.received.clear()
    async with trio.open_nursery() as load:

        def spawn(thread_id: str) -> None:
            watch = Watch()
            load.start_soon(listen, rng.choice(clients), thread_id, ledger, watch)
            load.start_soon(worker, rng.choice(clients), thread_id, ledger, watch, random.Random(rng.random()), spawn)

        for thread_id in sorted(ledger.live):
            spawn(thread_id)
        with trio.fail_after(E2E_LIMIT):
            await ledger.warm.wait()
        # The fault: SIGKILL at a seeded-random moment while turns stream and history requests run. Every
        # other kill is aimed: it waits for a history request to be sent and lands within that request's
        # time on the server (else most kills would find every worker waiting for a turn).
        await trio.sleep(rng.uniform(0, MAX_KILL_DELAY))
        if rng.random() < 0.5:
            ledger.trigger = trio.Event()
            with trio.fail_after(E2E_LIMIT):
                await ledger.trigger.wait()
            ledger.trigger = None
            await trio.sleep(rng.uniform(0, MAX_AIMED_DELAY))
            ledger.counts["kills aimed at a history request"] += 1
        server.process.kill()
        with trio.fail_after(E2E_LIMIT):
            assert await server.process.wait() == -9
        ledger.counts["kills"] += 1
        ledger.counts["requests in flight at a kill"] += len(ledger.pending)
        load.cancel_scope.cancel()


# ---- the database after the server exited ------------------------------------------------------


@dataclasses.dataclass
class Stored:
    """What the SQLite file held when the server was dead, per thread."""

    threads: set[str]
    rows: dict[str, dict[str, int]]  # thread -> table -> rows with that thread_id
    seqs: dict[str, dict[int, tuple[str, str | None, Any]]]  # thread -> seq -> (event, turn_id, payload)
    base: dict[str, list[dict[str, Any]]]  # thread -> base messages
    top: int  # the highest seq ever handed out (sqlite_sequence), deleted threads' too


def read_store(data_dir: Path, scratch: Path) -> Stored:
    """Read a copy, so that opening the database does not do the restarted server's recovery for it."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    for path in data_dir.glob("runtime.sqlite3*"):
        shutil.copy2(path, scratch / path.name)
    conn = sqlite3.connect(scratch / "runtime.sqlite3")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        threads = {row[0] for row in conn.execute("SELECT id FROM threads")}
        rows: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
        for table in ("turns", "items", "events"):
            for thread_id, count in conn.execute(f"SELECT thread_id, COUNT(*) FROM {table} GROUP BY thread_id"):
                rows[thread_id][table] = count
        seqs: dict[str, dict[int, tuple]] = collections.defaultdict(dict)
        for seq, thread_id, event, turn_id, payload in conn.execute(
                "SELECT seq, thread_id, event, turn_id, payload FROM events"):
            seqs[thread_id][seq] = (event, turn_id, json.loads(payload))
        base = {thread_id: (codec.loads(blob) if blob else []) for thread_id, blob in conn.execute(
            "SELECT id, CAST(base_messages AS BLOB) FROM threads")}
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        top = row[0] if row else 0
        return Stored(threads, rows, seqs, base, top)
    finally:
        conn.close()


def assert_gone_in_store(stored: Stored, thread_id: str) -> None:
    assert thread_id not in stored.threads, f"deleted thread {thread_id} still has its row"
    left = {table: n for table, n in stored.rows.get(thread_id, {}).items() if n}
    assert left == {}, f"deleted thread {thread_id} left rows behind: {left}"


# ---- after a restart ---------------------------------------------------------------------------


def resolve(ledger: Ledger, op: Op, detail: dict[str, Any] | None, target: dict[str, Any] | None) -> str:
    """The request in flight at the kill: its thread holds exactly its before or its after. Returns which,
    and moves the expected state there."""
    tid = op.thread_id
    if op.kind == "delete":
        if detail is None:
            del ledger.live[tid]
            ledger.gone.add(tid)
            return "after"
        assert live_ids(detail) == op.before, f"delete of {tid} in flight: neither whole nor gone"
        return "before"
    assert detail is not None, f"{op.kind} of {tid} in flight at the kill lost the thread"
    live = live_ids(detail)
    turns = {turn["id"]: turn for turn in detail["turns"]}
    if op.kind == "fork":
        assert live == op.before, f"fork changed its source {tid}"
        if target is None:
            return "before"
        copies = [turn for turn in target["turns"] if not turn["rewound"]]
        assert [(t["input_summary"], t["status"]) for t in copies] == op.copied, f"fork {op.target} is not whole"
        assert target["thread"]["forked_from"] == {"thread_id": tid, "through_turn_id": op.anchor}, target["thread"]
        assert len(target["turns"]) == len(copies), "a fork holds rewound turns"
        ledger.live[op.target] = [t["id"] for t in copies]
        return "after"
    if live == op.before:
        return "before"
    if op.kind in ("save",):
        raise AssertionError(f"a save changed the live turns of {tid}: {op.before} -> {live}")
    if op.kind == "rewind":
        assert live == op.prefix(), f"rewind of {tid} in flight: {live} is neither {op.before} nor {op.prefix()}"
    elif op.kind == "restore":
        assert live == [], f"restore of {tid} in flight: {live} is neither {op.before} nor []"
        assert detail["thread"]["session_id"] == op.session_id, detail["thread"]
    elif op.kind in ("retry", "turn"):
        kept = op.prefix() if op.kind == "retry" else op.before
        assert live[:-1] == kept and live[-1] not in op.before, \
            f"{op.kind} of {tid} in flight: {live} is neither {op.before} nor {kept} + one new turn"
        assert turns[live[-1]]["retry_of"] == (op.anchor if op.kind == "retry" else None), turns[live[-1]]
        ledger.started[live[-1]] = tid
    ledger.live[tid] = live
    return "after"


async def messages_agree(client: AsyncClient, thread_id: str, detail: dict[str, Any], stored: Stored) -> str:
    """The restarted engine (PUT /v1/sessions), a rebuild from the store (POST /v1/sessions) and the thread's
    base plus its live items folded are one and the same history."""
    saved = await call(client, "PUT", "/v1/sessions", {"thread_id": thread_id, "session_id": f"check-{thread_id}"})
    assert saved["turn_in_progress"] is False, saved
    live_turns = {turn["id"] for turn in detail["turns"] if not turn["rewound"]}
    folded = build_messages(stored.base.get(thread_id, []),
                            [item for item in detail["items"] if item["turn_id"] in live_turns])
    assert saved["session"]["messages"] == folded, f"the engine of {thread_id} disagrees with its store"
    try:
        rebuilt = await call(client, "POST", "/v1/sessions", {"thread_id": thread_id})
    except ApiError as exc:
        assert exc.status == 400 and folded == [], exc  # nothing to rebuild from
        return "nothing to rebuild"
    else:
        document = await call(client, "GET", f"/v1/sessions/{_q(rebuilt['session_id'])}")
        assert document["messages"] == folded, f"a rebuild of {thread_id} disagrees with its engine"
        await call(client, "DELETE", f"/v1/sessions/{_q(rebuilt['session_id'])}")
    return "rebuilt"


async def replay(client: AsyncClient, thread_id: str, latest: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    if latest == 0:
        return events
    with trio.fail_after(E2E_LIMIT):
        async for event in client.events(thread_id, since_seq=0):
            assert not events or event["seq"] > events[-1]["seq"], f"replay of {thread_id} is not strictly increasing"
            events.append(event)
            if event["seq"] >= latest:
                break
    return events


async def check_after_restart(client: AsyncClient, data_dir: Path, ledger: Ledger, stored: Stored) -> None:
    docs, temps, broken = session_files(data_dir)
    assert temps == [], f"session work files survived the restart: {temps}"
    assert broken == [], f"unparseable session files: {broken}"
    missing = sorted(ledger.safety - set(docs))
    assert missing == [], f"safety sessions of answered restores are missing: {missing}"
    listed = {meta["id"]: meta["revision"] for meta in await client.list_sessions(include_archived=True, limit=500)}
    assert len(listed) < 500, "more sessions than one page lists: raise the limit"
    assert listed == {session_id: doc["metadata"]["revision"] for session_id, doc in docs.items()}, \
        "the session index disagrees with the session files"
    ledger.counts["safety sessions verified (restores answered or found committed)"] = len(ledger.safety)
    seen_before = ledger.seen
    pending = dict(ledger.pending)
    ledger.pending.clear()
    for thread_id in sorted(set(ledger.live) | set(pending)):
        detail = await detail_of(client, thread_id, ledger)
        op = pending.get(thread_id)
        if op is not None:
            target = await detail_of(client, op.target, ledger) if op.kind == "fork" else None
            if op.kind == "fork" and target is None:
                assert_gone_in_store(stored, op.target)
            outcome = resolve(ledger, op, detail, target)
            if op.kind == "restore" and outcome == "after":  # the thread's base is now that session's messages
                assert stored.base[thread_id] == docs[op.session_id]["messages"], f"restore of {thread_id} is not whole"
            ledger.counts[f"{op.kind} in flight at a kill, found {outcome}"] += 1
        elif detail is None:
            raise AssertionError(f"thread {thread_id} is gone after a restart, with no delete in flight")
        else:
            assert live_ids(detail) == ledger.live[thread_id], \
                f"{thread_id}: an answered change was lost or undone by the kill"
        if detail is None:
            assert_gone_in_store(stored, thread_id)
            ledger.counts["deleted threads verified gone in the SQLite file"] += 1
    for thread_id in sorted(ledger.gone):
        assert_gone_in_store(stored, thread_id)
        with pytest.raises(ApiError) as gone:
            await call(client, "GET", thread_path(thread_id))
        assert gone.value.status == 404
    for thread_id in sorted(ledger.live):
        await check_thread(client, thread_id, ledger, stored, seen_before, docs)
    # A restore that did not commit left no safety session behind (each committed one logged its id).
    orphans = sorted(session_id for session_id, doc in docs.items()
                     if doc["metadata"]["title"].startswith(SAFETY_TITLE) and session_id not in ledger.safety)
    assert orphans == [], f"safety sessions of restores that never committed: {orphans}"
    ledger.floor = max(ledger.floor, ledger.seen)
    ledger.counts["max seq"] = ledger.floor


async def check_thread(client: AsyncClient, thread_id: str, ledger: Ledger, stored: Stored, seen_before: int,
                       docs: dict[str, Any]) -> None:
    detail = await detail_of(client, thread_id, ledger)
    assert detail is not None
    stuck = [t["id"] for t in detail["turns"] if t["status"] in ACTIVE]
    stuck += [i["id"] for i in detail["items"] if i["status"] in ACTIVE]
    assert stuck == [], f"still running after a restart: {stuck}"
    live = live_ids(detail)
    assert detail["thread"]["latest_turn_id"] == (live[-1] if live else None), (detail["thread"], live)
    events = await replay(client, thread_id, detail["latest_seq"])
    by_seq = {event["seq"]: event for event in events}
    # Nothing the store held at the kill is lost or changed; everything written since is above every
    # seq a client saw before the kill.
    for seq, (name, turn_id, payload) in stored.seqs.get(thread_id, {}).items():
        event = by_seq.get(seq)
        found = None if event is None else (event["event"], event.get("turn_id"), event["payload"])
        assert found == (name, turn_id, payload), f"event {seq} of {thread_id} lost or changed by the kill"
    for seq, event in ledger.received[thread_id].items():
        assert by_seq.get(seq) == event, f"event {seq} of {thread_id}, received over SSE, lost or changed"
    new = [seq for seq in by_seq if seq not in stored.seqs.get(thread_id, {})]
    if new:
        assert min(new) > max(seen_before, stored.top), \
            f"{thread_id}: seq {min(new)} written after the restart is not above {max(seen_before, stored.top)}"
        ledger.counts["seqs written after a restart, all above every earlier one"] += len(new)
    for event in events:
        if event["event"] == "thread.restored":  # committed, so its safety session was written with it
            safety = event["payload"]["safety_session_id"]
            assert safety in docs, f"restore of {thread_id} committed without its safety session {safety}"
            ledger.safety.add(safety)
            ledger.counts["thread.restored events read back whose safety session exists"] += 1
    for turn in detail["turns"]:
        if turn["error"] == RESTART_ERROR and any(by_seq[seq]["event"] == "turn.completed"
                                                  and by_seq[seq].get("turn_id") == turn["id"] for seq in new):
            assert turn["status"] == "interrupted", turn  # ended by this restart's recovery
            ledger.counts["turns in flight at a kill, found interrupted"] += 1
        if turn["rewound"] and ledger.started.get(turn["id"]) == thread_id:
            # Started here (not a fork's copy): rewinding never removes its events.
            names = {e["event"] for e in events if e.get("turn_id") == turn["id"]}
            assert {"turn.started", "turn.completed"} <= names, f"rewound turn {turn['id']} lost its events: {names}"
            ledger.counts["rewound turns with their events checked"] += 1
    how = await messages_agree(client, thread_id, detail, stored)
    ledger.counts[f"threads whose engine, rebuild and store agree ({how})"] += 1
    ledger.verified[thread_id] = detail["latest_seq"]


async def kill_loop(tmp_path: Path, kills: int, seed: int) -> collections.Counter:
    print(f"\nkill -9 of history control: seed {seed} (rerun with TRIO_RUNTIME_TEST_SEED={seed})")
    data_dir = tmp_path / "data"
    ledger = Ledger()
    rng = random.Random(seed)
    stored: Stored | None = None
    for cycle in range(kills + 1):
        async with serving(data_dir) as server:
            ledger.counts["server starts"] += 1
            async with AsyncClient(server.url, server.token, timeout=E2E_LIMIT) as one, \
                    AsyncClient(server.url, server.token, timeout=E2E_LIMIT) as two:
                if cycle == 0:
                    for index in range(THREADS):
                        thread = await one.create_thread(title=f"history {index}")
                        ledger.live[thread["id"]] = []
                else:
                    assert stored is not None
                    await check_after_restart(one, data_dir, ledger, stored)
                if cycle < kills:
                    await load_then_kill(server, [one, two], ledger, rng)
        stored = read_store(data_dir, tmp_path / "copy")
    for thread_id in ledger.gone:
        assert_gone_in_store(stored, thread_id)
    assert set(stored.threads) >= set(ledger.live)
    assert ledger.counts["kills"] == kills
    return ledger.counts


def _report(kills: int, seed: int, counts: collections.Counter) -> None:
    print(f"\nkill -9 of history control x{kills} (seed {seed}):")
    for name, value in sorted(counts.items()):
        print(f"  {name}: {value}")


@pytest.mark.reliability
async def test_reliability_kill_9_during_history_changes_15_times(tmp_path):
    counts = await kill_loop(tmp_path, kills=15, seed=SEED)
    _report(15, SEED, counts)
