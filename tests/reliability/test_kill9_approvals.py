"""kill -9 with approvals pending and being decided, and ``wait`` tools running (issue 13): a real
``trio-runtime serve --tools demo`` process is SIGKILLed at a seeded-random moment while, on several threads,
turns wait for approvals, clients decide some of them, and an ``auto`` thread runs ``wait`` tools; then it
is restarted on the same data dir. After every restart:

- no tool ran twice: per thread and tool, the runs (counted across processes through the test seam
  ``TRIO_RUNTIME_TEST_TOOL_RUN_LOG``) never exceed the tool items whose start was recorded, and no tool
  item is left started without a result (a run cut by the kill ends "outcome unknown");
- every approval is in a valid state: a pending one is exactly what it was before the kill (same id, same
  ``expires_at``) and its turn and item are ``awaiting_approval``; a resolved one has ``resolved_at`` and
  ``decided_by``; every decision a client was told of (200) is in the store as told;
- a turn that awaited approval with its approval still pending survives (still ``awaiting_approval``);
- no seq is reused: every event a client received over SSE before the kill is found again, the same.

At the end every pending approval is allowed and every turn completes. ``make test`` runs 2 kills;
``make reliability`` runs 12 (marker ``reliability``). Run with ``-s`` to see the counts.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from runtime.models.tools import RUN_LOG_ENV
from runtime.store import OUTCOME_UNKNOWN
from tests.conftest import E2E_LIMIT
from web.client import AsyncClient, ServerUnreachable, _q

from .support import SEED, serving

ASK_THREADS = 3
MAX_KILL_DELAY = 1.0  # after the cycle's requests went out, the kill comes within this (seeded-random)
WAIT_SECONDS = 20  # an auto thread's ``wait`` outlives the kill delay, so kills land on running tools
VALID = {"pending", "allowed", "denied", "expired", "canceled"}


@dataclasses.dataclass
class Ledger:
    ask: list[str] = dataclasses.field(default_factory=list)
    auto: str = ""
    # approval id -> the record as a client last saw it (pending before the kill, or the 200 of a decision)
    told: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # thread -> seq -> event received over SSE
    received: dict[str, dict[int, dict[str, Any]]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(dict))
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    unknown: set[str] = dataclasses.field(default_factory=set)  # tool items a kill cut ("outcome unknown")

    @property
    def threads(self) -> list[str]:
        return [*self.ask, self.auto]


def runs(log: Path) -> collections.Counter:
    """(tool, thread) -> runs, over every process that used ``log``."""
    counter: collections.Counter = collections.Counter()
    if log.exists():
        for line in log.read_text().splitlines():
            name, thread_id, _ = line.split()
            counter[(name, thread_id)] += 1
    return counter


async def listen(client: AsyncClient, thread_id: str, ledger: Ledger) -> None:
    last = 0
    try:
        async for event in client.events(thread_id):
            assert event["seq"] > last
            last = event["seq"]
            ledger.received[thread_id][event["seq"]] = event
    except (ServerUnreachable, httpx.TransportError):
        pass


async def call(client: AsyncClient, method: str, path: str, body: Any = None, params: Any = None) -> Any:
    return await client._call(method, path, json_body=body, params=params)


async def decide(client: AsyncClient, ledger: Ledger, approval: dict[str, Any], decision: str) -> None:
    """A decision raced against the kill: recorded in the ledger only if the client got the 200."""
    try:
        record = await call(client, "POST", f"/v1/threads/{_q(approval['thread_id'])}/approvals/{approval['id']}",
                            {"decision": decision})
    except (ServerUnreachable, httpx.TransportError):
        return
    ledger.told[record["id"]] = record
    ledger.counts[f"decisions acknowledged ({decision})"] += 1


async def check(client: AsyncClient, ledger: Ledger, log: Path) -> None:
    """Everything the module docstring promises, after a restart."""
    counted = runs(log)
    for thread_id in ledger.threads:
        detail = await client.get_thread(thread_id)
        items = {i["id"]: i for i in detail["items"]}
        turns = {t["id"]: t for t in detail["turns"]}
        started: collections.Counter = collections.Counter()
        for item in items.values():
            meta = item["metadata"] or {}
            if item["kind"] != "tool_call":
                continue
            if meta.get("started_at"):
                started[meta["name"]] += 1
                # Started: it has its result, or the restart ended it "outcome unknown" (or it still runs now).
                assert "result" in meta or item["status"] == "in_progress", item
                if meta.get("result") == OUTCOME_UNKNOWN:
                    assert item["status"] == "failed"
                    ledger.unknown.add(item["id"])
                    ledger.counts["tools cut by a kill (outcome unknown)"] = len(ledger.unknown)
        for (name, tid), n in counted.items():
            if tid == thread_id:
                assert n <= started[name], f"{name} ran {n} times on {thread_id} but only {started[name]} starts"
        approvals = (await call(client, "GET", f"/v1/threads/{_q(thread_id)}/approvals"))["approvals"]
        for record in approvals:
            assert record["status"] in VALID, record
            turn, item = turns[record["turn_id"]], items[record["item_id"]]
            if record["status"] == "pending":
                assert (turn["status"], item["status"]) == ("awaiting_approval", "awaiting_approval"), record
                assert record["resolved_at"] is None
            else:
                assert record["resolved_at"] and record["decided_by"], record
            told = ledger.told.get(record["id"])
            if told is not None:
                if told["status"] == "pending":  # pending before the kill: the same record, or decided since
                    assert {k: record[k] for k in ("id", "expires_at", "created_at", "item_id", "turn_id")} == {
                        k: told[k] for k in ("id", "expires_at", "created_at", "item_id", "turn_id")}
                    assert record["status"] in ("pending", "allowed", "denied"), record
                else:  # a decision a client was told of
                    assert record == told, (record, told)
        pending_turns = {a["turn_id"] for a in approvals if a["status"] == "pending"}
        ledger.counts["turns found awaiting approval after a restart"] += len(pending_turns)
        # No seq reused: what clients saw before the kill is stored the same.
        seen = ledger.received[thread_id]
        if seen:
            replay = {}
            with trio.fail_after(E2E_LIMIT):
                async for event in client.events(thread_id):
                    replay[event["seq"]] = event
                    if event["seq"] >= max(seen):
                        break
            for seq, event in seen.items():
                assert replay.get(seq) == event, f"seq {seq} of {thread_id} changed across the kill"


async def cycle(server, client: AsyncClient, ledger: Ledger, rng: random.Random) -> None:
    """One round of requests on every thread, then SIGKILL at a seeded-random moment."""
    async with trio.open_nursery() as load:
        for thread_id in ledger.threads:
            load.start_soon(listen, client, thread_id, ledger)
        for thread_id in ledger.ask:
            pending = (await call(client, "GET", f"/v1/threads/{_q(thread_id)}/approvals",
                                  params={"status": "pending"}))["approvals"]
            for record in pending:
                ledger.told.setdefault(record["id"], record)
                choice = rng.random()
                if choice < 0.4:
                    load.start_soon(decide, client, ledger, record, "allow")
                elif choice < 0.6:
                    load.start_soon(decide, client, ledger, record, "deny")
            if not pending:
                detail = await client.get_thread(thread_id)
                if not detail["turns"] or detail["turns"][-1]["status"] not in ("in_progress", "awaiting_approval"):
                    tool = rng.choice(['write_note {"name": "n%d", "text": "note %d"}', 'wait {"seconds": 0}'])
                    number = rng.randrange(1000)
                    await client.start_turn(thread_id, "/tool " + tool.replace("%d", str(number)))
                    ledger.counts["approval turns started"] += 1
        detail = await client.get_thread(ledger.auto)
        if not detail["turns"] or detail["turns"][-1]["status"] not in ("in_progress", "awaiting_approval"):
            await client.start_turn(ledger.auto, f'/tool wait {{"seconds": {WAIT_SECONDS}}}')
            ledger.counts["wait turns started"] += 1
        await trio.sleep(rng.uniform(0, MAX_KILL_DELAY))  # the kill's seeded moment, not synchronisation
        # Pending approvals a client saw just before the kill.
        for thread_id in ledger.ask:
            try:
                for record in (await call(client, "GET", f"/v1/threads/{_q(thread_id)}/approvals",
                                          params={"status": "pending"}))["approvals"]:
                    ledger.told.setdefault(record["id"], record)
            except (ServerUnreachable, httpx.TransportError):
                pass
        server.process.kill()
        with trio.fail_after(E2E_LIMIT):
            assert await server.process.wait() == -9
        ledger.counts["kills"] += 1
        load.cancel_scope.cancel()


async def finish(client: AsyncClient, ledger: Ledger) -> None:
    """Allow whatever is pending; every turn then completes."""
    for thread_id in ledger.threads:
        with trio.fail_after(E2E_LIMIT + WAIT_SECONDS):
            while True:
                detail = await client.get_thread(thread_id)
                last = detail["turns"][-1] if detail["turns"] else None
                if last is None or last["status"] not in ("in_progress", "awaiting_approval"):
                    break
                pending = (await call(client, "GET", f"/v1/threads/{_q(thread_id)}/approvals",
                                      params={"status": "pending"}))["approvals"]
                for record in pending:
                    await decide(client, ledger, record, "allow")
                async for event in client.events(thread_id, since_seq=detail["latest_seq"]):
                    if event["event"] in ("turn.completed", "approval.requested"):
                        break
        assert all(t["status"] in ("completed", "interrupted", "failed") for t in detail["turns"])


async def run_kills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kills: int) -> None:
    rng = random.Random(SEED)
    print(f"\nseed {SEED} (rerun with TRIO_RUNTIME_TEST_SEED={SEED})")
    data_dir, log = tmp_path / "data", tmp_path / "tool-runs.log"
    monkeypatch.setenv(RUN_LOG_ENV, str(log))
    ledger = Ledger()
    for index in range(kills + 1):
        async with serving(data_dir, "--tools", "demo", "--approval-timeout", "600") as server:
            async with AsyncClient(server.url, server.token, timeout=E2E_LIMIT) as client:
                if index == 0:
                    ledger.ask = [(await client.create_thread())["id"] for _ in range(ASK_THREADS)]
                    ledger.auto = (await client.create_thread(approval_policy="auto"))["id"]
                else:
                    await check(client, ledger, log)
                if index == kills:
                    await finish(client, ledger)
                    await check(client, ledger, log)
                    assert (await client.health())["status"] == "ok"
                else:
                    await cycle(server, client, ledger, rng)
    assert ledger.counts["kills"] == kills
    print(dict(ledger.counts))


async def test_kill_9_with_approvals_and_tools_in_flight(tmp_path, monkeypatch):
    await run_kills(tmp_path, monkeypatch, 2)


@pytest.mark.reliability
async def test_reliability_kill_9_with_approvals_12_times(tmp_path, monkeypatch):
    await run_kills(tmp_path, monkeypatch, 12)
