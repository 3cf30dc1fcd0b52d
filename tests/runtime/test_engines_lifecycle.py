"""Lazy engines and idle eviction (ThreadManager): engines start on first use, leave after an idle
period, and a successor restores exactly the state the evicted one had. An engine (or the runtime
around it) cancelled from outside ends its running turn interrupted, never completed."""

from __future__ import annotations

import trio
import trio.testing

from tests.support import open_runtime

from .helpers import collect_events, run_turn, turn_completed, turn_record, wait_turn_end

IDLE = 5.0
# A cancel wakes the engine's op loop and its turn task in one batch, which trio runs in either order
# (it reverses a batch half of the time). 16 rounds leave a 1 in 65,536 chance of never meeting an order.
ROUNDS = 16


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


async def test_a_turn_whose_engine_is_cancelled_from_outside_ends_interrupted_never_completed(rt, autojump_clock):
    for _ in range(ROUNDS):
        tid = (await rt.create_thread())["id"]
        await run_turn(rt, tid, "hello")
        turn = await rt.start_turn(tid, "/hang")
        engine = rt.manager.engine(tid)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()

        engine._nursery.cancel_scope.cancel(reason="cancelled from outside")
        end = await wait_turn_end(rt, tid, turn["id"])

        # It did not finish, and nothing crashed: interrupted, at once.
        assert (end.payload["status"], end.payload["error"]) == ("interrupted", "engine stopped")
        assert (await turn_record(rt, tid, turn["id"]))["status"] == "interrupted"
        assert not engine.crashed and trio.current_time() == t0
        # The successor restores the turn as it was recorded: its prompt, and no answer.
        snapshot = await rt.get_session_snapshot(tid, timeout=5)
        assert rt.manager.engine(tid) is not engine and not snapshot.turn_in_progress
        assert [m["content"][0]["text"] for m in snapshot.messages] == ["hello", "You said: hello", "/hang"]


async def test_a_runtime_left_by_cancellation_ends_its_running_turns_interrupted(tmp_path, autojump_clock):
    # Runtime.open: "leaving the block interrupts running turns (they end interrupted)" -- also when the
    # block is left by a cancellation, which reaches the engines in the same step as the shutdown.
    for round_ in range(ROUNDS):
        data_dir = tmp_path / f"round-{round_}"
        with trio.CancelScope() as scope:
            async with open_runtime(data_dir) as rt:
                tid = (await rt.create_thread())["id"]
                turn = await rt.start_turn(tid, "/hang")
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel(reason="the server's task was cancelled")
                await trio.sleep_forever()
        assert scope.cancelled_caught

        async with open_runtime(data_dir) as rt:
            assert rt.store.recovered_turns == 0  # the cancelled runtime ended the turn itself
            record = await turn_record(rt, tid, turn["id"])
        # Which of the two stops reaches the turn first is the scheduler's choice; either is "interrupted".
        assert record["status"] == "interrupted"
        assert record["error"] in ("server shutting down", "engine stopped")
