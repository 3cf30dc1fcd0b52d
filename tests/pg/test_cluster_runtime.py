"""Several Runtimes (hosts) on one PostgreSQL database in one trio process (runtime/cluster): events across
hosts, one owner per thread (NotOwner), fencing of a paused owner, and takeover recovery of a dead owner's
turn. Real database, real clock for lease expiry (the database's clock decides it; ttls are short), every
wait is on a condition with a bound."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from runtime import Runtime
from runtime.cluster import leases
from runtime.errors import LeaseLost, NotOwner
from runtime.models.tools import demo_registry
from tests import support
from tests.runtime.helpers import collect_events, run_turn, stored_events, turn_completed

# Lease ttl of the hosts below (seconds): short so that expiry happens within a test, long enough that a
# loaded 2-core machine renews in time (renewal every ttl/3).
TTL = 1.5
# Bound on each wait below (real time): a hang fails instead of blocking the suite.
WAIT = 30


@contextlib.asynccontextmanager
async def host(tmp_path: Path, url: str, host_id: str, **overrides: Any) -> AsyncIterator[Runtime]:
    overrides.setdefault("lease_ttl", TTL)
    async with support.open_runtime(tmp_path / host_id, store_url=url, host_id=host_id, **overrides) as rt:
        rt.advertise_url = f"http://{host_id}.invalid"
        yield rt


async def lease(rt: Runtime, thread_id: str) -> leases.Lease | None:
    return await rt.cluster.keeper.lookup(thread_id)


async def until(predicate, what: str) -> None:
    """Poll an async condition on the database (a lease's expiry is the database clock's business)."""
    with trio.fail_after(WAIT):
        while not await predicate():
            await trio.sleep(0.05)


def check_seqs(events) -> None:
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)), f"seqs must strictly increase, no duplicate: {seqs}"


async def test_a_stream_on_one_host_follows_turns_driven_on_another(tmp_path, pg_url):
    async with host(tmp_path, pg_url, "h1") as one, host(tmp_path, pg_url, "h2") as two:
        assert one.bus.polled and two.bus.polled
        thread = await one.create_thread(title="shared")
        tid = thread["id"]
        assert (await two.thread_record(tid))["owner"] is None  # nobody holds it yet

        async with trio.open_nursery() as nursery:
            seen: list = []
            followed = trio.Event()

            async def follow():
                seen.extend(await collect_events(two, tid, lambda e: e.event == "turn.completed"
                                                 and sum(x.event == "turn.completed" for x in seen) == 1,
                                                 limit=WAIT))
                followed.set()

            async def follow_two_turns():
                events = []
                with trio.fail_after(WAIT):
                    async with contextlib.aclosing(await two.subscribe(tid, 0)) as stream:
                        async for event in stream:
                            events.append(event)
                            if sum(e.event == "turn.completed" for e in events) == 2:
                                break
                seen.extend(events)
                followed.set()

            nursery.start_soon(follow_two_turns)
            first = await one.start_turn(tid, "hello there")
            await collect_events(one, tid, turn_completed(first["id"]), limit=WAIT)
            second = await one.start_turn(tid, "/think hmm\nagain please")
            await followed.wait()

        stored = await stored_events(one, tid)
        check_seqs(seen)
        # No gap, no duplicate: exactly the stored events, in order, seen on the other host.
        assert [(e.seq, e.event) for e in seen] == [(e.seq, e.event) for e in stored]
        assert [e.turn_id for e in seen if e.event == "turn.completed"] == [first["id"], second["id"]]
        assert any(e.event == "item.delta" for e in seen)

        # h1 owns the thread now: h2 refuses engine work before changing anything, naming the owner.
        owner = (await two.thread_record(tid))["owner"]
        assert owner["host_id"] == "h1" and owner["advertise_url"] == "http://h1.invalid" and owner["epoch"] == 1
        with pytest.raises(NotOwner) as refused:
            await two.start_turn(tid, "from h2")
        assert (refused.value.owner_host_id, refused.value.advertise_url) == ("h1", "http://h1.invalid")
        assert len(await stored_events(one, tid)) == len(stored)

        # Last-Event-ID on the other host: everything after a position, nothing before it.
        middle = stored[len(stored) // 2].seq
        rest = await collect_events(two, tid, turn_completed(second["id"]), since_seq=middle, limit=WAIT)
        assert [e.seq for e in rest] == [e.seq for e in stored if e.seq > middle]


async def test_a_paused_owner_is_fenced_and_its_engine_retires_without_writing(tmp_path, pg_url, caplog):
    caplog.set_level(logging.WARNING, logger="runtime")
    async with host(tmp_path, pg_url, "h1") as one, host(tmp_path, pg_url, "h2") as two:
        tid = (await one.create_thread(title="fenced"))["id"]
        await one.update_thread(tid, {"title": "by h1"})  # h1's engine runs, under epoch 1
        held = one.cluster.keeper.held(tid)
        assert held is not None and held.epoch == 1

        # "Pause" h1: its renewals stop, and (as for a SIGSTOPped process) its own validity check has not run
        # yet when it goes on.
        one.cluster.keeper.renewal_gate = trio.Event()
        held.valid_until = float("inf")

        async def expired():
            found = await lease(two, tid)
            return not found.live

        await until(expired, "h1's lease to expire")
        await two.update_thread(tid, {"title": "by h2"})  # h2 takes it: epoch 2, recovery
        assert (await lease(two, tid)).epoch == 2 and (await lease(two, tid)).owner == "h2"
        before = await stored_events(two, tid)

        # h1 still believes in its engine: its write is refused by the database (epoch 1 is gone).
        with pytest.raises(LeaseLost) as refused:
            await one.update_thread(tid, {"title": "stale write from h1"})
        assert "lease" in refused.value.message and tid in refused.value.message
        with trio.fail_after(WAIT):
            while one.manager.engine(tid) is not None:  # the engine retired
                await trio.sleep(0.01)
        assert (await two.thread_record(tid))["title"] == "by h2"
        assert [(e.seq, e.event) for e in await stored_events(two, tid)] == [(e.seq, e.event) for e in before]
        # Its next request finds the owner.
        with pytest.raises(NotOwner) as not_owner:
            await one.update_thread(tid, {"title": "again"})
        assert not_owner.value.owner_host_id == "h2"
        assert one.cluster.keeper.held(tid) is None
        one.cluster.keeper.renewal_gate.set()
    # Losing a lease is expected in a cluster: logged as a warning naming the thread, never as an error.
    retired = [r for r in caplog.records if r.name == "runtime.engine.engine" and tid in r.getMessage()]
    assert retired and all(r.levelno == logging.WARNING for r in retired), [(r.levelname, r.getMessage())
                                                                            for r in retired]


async def test_a_paused_owners_history_change_is_refused_after_a_takeover(tmp_path, pg_url):
    async with host(tmp_path, pg_url, "h1") as one, host(tmp_path, pg_url, "h2") as two:
        tid = (await one.create_thread(title="kept"))["id"]
        await one.update_thread(tid, {"title": "by h1"})
        held = one.cluster.keeper.held(tid)
        one.cluster.keeper.renewal_gate = trio.Event()
        held.valid_until = float("inf")  # paused: its own validity check has not run when it goes on

        async def expired():
            return not (await lease(two, tid)).live

        await until(expired, "h1's lease to expire")
        await two.update_thread(tid, {"title": "by h2"})
        before = await stored_events(two, tid)
        # A history change (delete) from h1's stale engine: refused by the database, the thread stays.
        with pytest.raises(LeaseLost):
            await one.delete_thread(tid)
        assert (await two.thread_record(tid))["title"] == "by h2"
        assert [(e.seq, e.event) for e in await stored_events(two, tid)] == [(e.seq, e.event) for e in before]
        with trio.fail_after(WAIT):
            while one.manager.engine(tid) is not None:  # and h1's engine retired
                await trio.sleep(0.01)
        with pytest.raises(NotOwner):
            await one.delete_thread(tid)
        one.cluster.keeper.renewal_gate.set()


async def test_an_engine_whose_lease_is_not_known_valid_serves_nothing(tmp_path, pg_url):
    async with host(tmp_path, pg_url, "h1", lease_ttl=30) as one:
        tid = (await one.create_thread(title="t"))["id"]
        await one.update_thread(tid, {"title": "a"})
        first = one.manager.engine(tid)
        held = one.cluster.keeper.held(tid)
        # Our own view lapsed (a renewal that did not come back in time) before the watchdog ran: the
        # request must not reach that engine. It re-acquires (still ours in the database: same epoch) and a
        # successor restored from the store serves it.
        held.valid_until = trio.current_time() - 1
        record = await one.update_thread(tid, {"title": "b"})
        assert record["title"] == "b" and record["owner"]["epoch"] == 1
        assert one.manager.engine(tid) is not first and first.diverged is not None
        assert one.cluster.keeper.held(tid) is not held and one.cluster.keeper.valid(tid)


async def test_a_dead_owners_turns_are_taken_over_interrupted_and_approvals_stay_pending(tmp_path, pg_url):
    async with host(tmp_path, pg_url, "h2") as two:
        async with host(tmp_path, pg_url, "h1", tools=demo_registry()) as one:
            hanging = (await one.create_thread(title="hanging"))["id"]
            asking = (await one.create_thread(title="asking"))["id"]
            turn = await one.start_turn(hanging, "/hang")
            await collect_events(one, hanging, lambda e: e.event == "turn.started" and e.turn_id == turn["id"],
                                 limit=WAIT)
            waiting = await one.start_turn(asking, '/tool write_note {"name": "n", "text": "t"}')
            await collect_events(one, asking, lambda e: e.event == "approval.requested", limit=WAIT)
            (approval,) = await one.list_approvals(thread_id=asking, status="pending")
            before = {tid: await stored_events(one, tid) for tid in (hanging, asking)}

            # h1 "dies": its renewals and its sweeps stop (its sweeper would otherwise take its own expired
            # threads back, racing h2's); its own watchdog retires both engines WITHOUT a write (the local
            # validity ends before the database's expiry), so the store keeps the turns as h1 left them.
            one.cluster.keeper.renewal_gate = trio.Event()
            one.cluster.sweep_gate = trio.Event()
            with trio.fail_after(WAIT):
                while one.manager.live_count:
                    await trio.sleep(0.01)
            for tid in (hanging, asking):
                assert [(e.seq, e.event) for e in await stored_events(one, tid)] == \
                    [(e.seq, e.event) for e in before[tid]]
            # h2's sweeper takes both over once the database says they expired (nobody asked for them).
            async def taken_by_h2():
                found = [await lease(two, tid) for tid in (hanging, asking)]
                return all(row is not None and row.owner == "h2" for row in found)

            await until(taken_by_h2, "h2's sweeper to take both threads")
            one.cluster.keeper.renewal_gate.set()
            one.cluster.sweep_gate.set()

        detail = await two.get_thread(hanging)
        (ended,) = [t for t in detail["turns"] if t["id"] == turn["id"]]
        assert ended["status"] == "interrupted"
        assert detail["thread"]["owner"]["host_id"] == "h2" and detail["thread"]["owner"]["epoch"] == 2
        after = await stored_events(two, hanging)
        check_seqs(after)
        assert after[: len(before[hanging])] == before[hanging]  # nothing rewritten, no seq reused
        assert min(e.seq for e in after[len(before[hanging]):]) > max(e.seq for e in before[hanging])
        assert after[-1].event == "turn.completed" and after[-1].payload["status"] == "interrupted"

        # The approval is still pending and its turn waits for it; deciding it on h2 goes on there.
        assert [a["id"] for a in await two.list_approvals(thread_id=asking, status="pending")] == [approval["id"]]
        await two.decide_approval(asking, approval["id"], "allow")
        done = await collect_events(two, asking, turn_completed(waiting["id"]), limit=WAIT)
        assert done[-1].payload["status"] == "completed"
        check_seqs(await stored_events(two, asking))


async def test_every_thread_record_an_answer_carries_has_the_owner_get_shows(tmp_path, pg_url):
    """API.md: on PostgreSQL a ThreadRecord has ``owner``; the answers of create, fork, rewind and restore
    carry one as GET would show it at that moment (a new thread: null, no lease until its first engine use)."""
    async with host(tmp_path, pg_url, "h1") as one:
        created = await one.create_thread(title="owned")
        tid = created["id"]
        assert created["owner"] is None
        with trio.fail_after(WAIT):
            await run_turn(one, tid, "first")
        mine = (await one.thread_record(tid))["owner"]
        assert mine["host_id"] == "h1" and mine["epoch"] >= 1

        forked = await one.fork_thread(tid)
        assert forked["thread"]["owner"] is None and (await one.thread_record(forked["thread"]["id"]))["owner"] is None
        saved = await one.sessions.save(thread_id=tid, timeout=WAIT)
        with trio.fail_after(WAIT):
            second = await run_turn(one, tid, "second")
        rewound = await one.rewind_thread(tid, second["id"])
        restored = await one.restore_thread(tid, saved["session_id"])
        for answer in (rewound, restored):
            assert answer["thread"]["owner"]["host_id"] == "h1"
            assert answer["thread"]["owner"]["epoch"] == mine["epoch"]
