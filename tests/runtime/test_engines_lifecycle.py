"""Lazy engines and idle eviction (ThreadManager): engines start on first use, leave after an idle
period, and a successor restores exactly the state the evicted one had."""

from __future__ import annotations

import trio

from .helpers import collect_events, run_turn, turn_completed

IDLE = 5.0


async def test_creating_and_reading_a_thread_spawns_no_engine(rt):
    tid = (await rt.create_thread(title="cold"))["id"]
    await rt.get_thread(tid)
    await rt.list_threads()

    assert rt.manager.live_count == 0
    await rt.get_session_snapshot(tid)
    assert rt.manager.live_count == 1 and rt.manager.spawned == 1


async def test_concurrent_first_requests_spawn_exactly_one_engine(rt, thread_id):
    snapshots = []

    async def ask() -> None:
        snapshots.append(await rt.get_session_snapshot(thread_id))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(ask)

    assert len(snapshots) == 10
    assert rt.manager.spawned == 1 and rt.manager.live_count == 1


async def test_idle_engine_is_evicted_after_the_idle_period(open_runtime, autojump_clock):
    async with open_runtime(idle_evict_seconds=IDLE) as rt:
        tid = (await rt.create_thread())["id"]
        await run_turn(rt, tid, "hello")
        assert rt.manager.live_count == 1

        await trio.sleep(IDLE + 1)

        assert rt.manager.live_count == 0


async def test_evicted_engine_respawns_with_the_same_messages_and_tokens(open_runtime, autojump_clock):
    async with open_runtime(idle_evict_seconds=IDLE) as rt:
        tid = (await rt.create_thread(system_prompt="be brief", title="kept"))["id"]
        await run_turn(rt, tid, "hello")
        await run_turn(rt, tid, "/think mulling\nand again")
        before = await rt.get_session_snapshot(tid)
        await trio.sleep(IDLE + 1)
        assert rt.manager.live_count == 0
        t0 = trio.current_time()

        after = await rt.get_session_snapshot(tid)

        assert trio.current_time() == t0
        assert rt.manager.live_count == 1 and rt.manager.spawned == 2
        assert after.messages == before.messages
        assert after.total_tokens == before.total_tokens > 0
        assert (after.system_prompt, after.title, after.model) == ("be brief", "kept", "scripted")
        # The successor also continues the numbering: a new turn's items come after the old ones.
        record = await run_turn(rt, tid, "third")
        detail = await rt.get_thread(tid)
        assert [t["id"] for t in detail["turns"]][-1] == record["id"]
        assert detail["items"][-1]["detail"] == "You said: third"


async def test_engine_is_not_evicted_while_a_turn_runs(open_runtime, autojump_clock):
    async with open_runtime(idle_evict_seconds=IDLE) as rt:
        tid = (await rt.create_thread())["id"]
        turn = await rt.start_turn(tid, "/slow 20\na b c d e f g h")
        start = trio.current_time()
        events = await collect_events(rt, tid, turn_completed(turn["id"]))

        assert trio.current_time() - start > 3 * IDLE  # the turn outlived several idle periods ...
        assert rt.manager.live_count == 1 and rt.manager.spawned == 1  # ... on one engine
        assert events[-1].payload["status"] == "completed"


async def test_engine_is_not_evicted_sooner_than_the_idle_period_after_a_turn_ends(open_runtime, autojump_clock):
    # RuntimeConfig: "Engines with no op and no running turn for this long are evicted".
    async with open_runtime(idle_evict_seconds=IDLE) as rt:
        tid = (await rt.create_thread())["id"]
        turn = await rt.start_turn(tid, "/slow 8\na b c d e f g h")  # 10 words, the last at t = 7.2
        await collect_events(rt, tid, turn_completed(turn["id"]))
        ended = trio.current_time()

        await trio.sleep_until(ended + IDLE - 1)
        assert rt.manager.live_count == 1, "evicted less than idle_evict_seconds after the turn ended"
        await trio.sleep_until(ended + IDLE + 1)
        assert rt.manager.live_count == 0
