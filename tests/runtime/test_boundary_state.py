"""The engine's boundary state (issue 16, records.engine_state / thread_states): an engine restored from it
holds exactly the state one rebuilt by folding every live item holds, after turns, a compaction, a rewind,
a retry, a restore, a fork and a restart; and a start folds only the items after the boundary."""

from __future__ import annotations

import functools

import pytest

from runtime.store import records
from runtime.transcript import build_messages

from .helpers import run_turn, wait_turn_end

EVERY = 4  # items between two boundary states in these tests (2 turns of a plain chat)


@pytest.fixture(autouse=True)
def small_boundary_interval(monkeypatch):
    monkeypatch.setattr(records, "BOUNDARY_EVERY_ITEMS", EVERY)


async def full_state(rt, thread_id) -> tuple[list, int, int, int]:
    """(messages, total tokens, turn ord, item ord) rebuilt from every live item, as before boundary states."""
    state = await rt.store.read(functools.partial(records.engine_state, thread_id=thread_id))
    return (build_messages(state["base_messages"], state["items"]), state["base_tokens"] + state["turn_tokens"],
            state["turn_count"], state["item_count"])


async def boundary(rt, thread_id):
    return await rt.store.read(lambda conn: conn.execute(
        "SELECT through_turn_ord, total_tokens FROM thread_states WHERE thread_id = ?", (thread_id,)).fetchone())


async def assert_restored_equals_rebuilt(rt, thread_id, *, tail_items: int | None = None) -> list:
    """A successor engine (restored from the store, from the boundary state if any) holds what a fold of every
    live item gives; ``tail_items``: how many items its start folded (the rest came from the boundary)."""
    await rt.shutdown_thread(thread_id)
    state = await rt.store.read(functools.partial(records.engine_state, thread_id=thread_id, use_boundary=True))
    if tail_items is not None:
        assert len(state["items"]) == tail_items and state["boundary_messages"] is not None
    await rt.manager.handle(thread_id)
    engine = rt.manager.engine(thread_id)
    expected = await full_state(rt, thread_id)
    assert (engine.messages, engine.total_tokens, engine._turn_ord, engine._item_ord) == expected
    snapshot = await rt.get_session_snapshot(thread_id)
    assert list(snapshot.messages) == expected[0] and snapshot.total_tokens == expected[1]
    return expected[0]


async def test_a_restored_engine_equals_one_rebuilt_from_all_items(open_runtime):
    async with open_runtime() as rt:
        tid = (await rt.create_thread())["id"]
        turns = [await run_turn(rt, tid, f"prompt {n} caf\u00e9 \U0001F600") for n in range(5)]
        # A boundary after every 4 folded items: through turn 4 now, turn 5's 2 items after it.
        assert tuple(await boundary(rt, tid)) == (4, sum(t["usage"]["input_tokens"] + t["usage"]["output_tokens"]
                                                        for t in turns[:4]))
        messages = await assert_restored_equals_rebuilt(rt, tid, tail_items=2)
        assert len(messages) == 10 and messages[-1]["content"][0]["text"] == "You said: prompt 4 caf\u00e9 \U0001F600"

        await rt.compact(tid, "shorter")
        await run_turn(rt, tid, "after the summary")
        assert (await boundary(rt, tid))["through_turn_ord"] == 7  # 2 + 1 + 2 items folded since turn 4
        messages = await assert_restored_equals_rebuilt(rt, tid, tail_items=0)
        assert messages[0]["content"][0]["text"].startswith("[Summary of earlier conversation]")

        # A rewind into the boundary's turns deletes it: the next start folds the whole live history.
        await rt.rewind_thread(tid, turns[2]["id"])
        assert await boundary(rt, tid) is None
        messages = await assert_restored_equals_rebuilt(rt, tid)
        assert len(messages) == 4
        retried = await rt.retry_turn(tid, turns[1]["id"])
        await wait_turn_end(rt, tid, retried["id"])
        assert retried["retry_of"] == turns[1]["id"]
        await assert_restored_equals_rebuilt(rt, tid)
        for n in range(3):
            await run_turn(rt, tid, f"more {n}")
        assert await boundary(rt, tid) is not None

        # A fork starts without a boundary of its own (rebuilt in full once, then keeps one).
        fork = await rt.fork_thread(tid)
        fid = fork["thread"]["id"]
        assert await boundary(rt, fid) is None
        assert await assert_restored_equals_rebuilt(rt, fid) == await assert_restored_equals_rebuilt(rt, tid)
        await rt.store.write()  # a barrier: every earlier write is committed
        assert await boundary(rt, fid) is not None  # its engine stored one at start: it folded >= 4 items
        await assert_restored_equals_rebuilt(rt, fid, tail_items=0)

        # A restore replaces the base and rewinds every turn: the boundary goes.
        saved = await rt.sessions.save(thread_id=fid, timeout=10)
        for n in range(2):
            await run_turn(rt, tid, f"before the restore {n}")
        await rt.store.write()
        assert await boundary(rt, tid) is not None
        await rt.restore_thread(tid, saved["session_id"])
        assert await boundary(rt, tid) is None
        restored = await assert_restored_equals_rebuilt(rt, tid)
        assert restored == (await full_state(rt, fid))[0]  # the fork's messages, now the base
        expected_after_restart = await full_state(rt, tid)

    # A restart restores every engine from the store, boundary states included.
    async with open_runtime() as rt:
        await rt.manager.handle(tid)
        assert rt.manager.engine(tid).messages == expected_after_restart[0]
        for n in range(4):
            await run_turn(rt, tid, f"after restart {n}")
        await assert_restored_equals_rebuilt(rt, tid, tail_items=0)
        # Deleting the thread deletes its boundary state.
        await rt.delete_thread(tid)
        assert await boundary(rt, tid) is None


def test_boundary_messages_are_read_back_exactly(tmp_path):
    """Whatever a message holds (tool input numbers orjson would read as floats, NaN, a lone surrogate, any
    text), the boundary state reads back what was written, in order, across chunk lines."""
    import json
    import math
    import sqlite3

    from runtime.store import migrations

    odd = {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {
        "big": 2**70, "neg": -(2**64), "nan": math.nan, "inf": -math.inf, "f": 0.1, "lone": "x\ud800", "\u00e9": "\U0001F600",
        "nl": "a\nb", "s": "s[1]"}}]}
    plain = [{"role": "user" if i % 2 == 0 else "assistant", "content": [{"type": "text", "text": f"m{i} caf\u00e9"}]}
             for i in range(2 * records.BOUNDARY_CHUNK + 3)]
    messages = plain[:5] + [odd] + plain[5:]
    conn = sqlite3.connect(tmp_path / "b.sqlite3")
    conn.row_factory = sqlite3.Row
    migrations.migrate(conn)
    conn.execute("INSERT INTO threads (id, created_at, updated_at, model, mode, archived, base_tokens)"
                 " VALUES ('thr_b', 'x', 'x', 'scripted', 'default', 0, 0)")
    records.boundary_write("thr_b", 0, 7, tuple(messages))(conn)
    stored = conn.execute("SELECT messages FROM thread_states").fetchone()[0]
    assert [line[:1] for line in stored.split("\n")] == ["s", "[", "["]  # the odd chunk goes to the stdlib
    state = records.engine_state(conn, "thr_b", use_boundary=True)
    got = state["boundary_messages"]
    assert len(got) == len(messages) and got[:5] == messages[:5] and got[6:] == messages[6:]
    read = got[5]["content"][0]["input"]
    assert math.isnan(read.pop("nan")) and json.dumps(read) == json.dumps({k: v for k, v in
                                                                           odd["content"][0]["input"].items() if k != "nan"})
    assert type(read["big"]) is int and read["big"] == 2**70 and read["lone"] == "x\ud800"
    assert state["items"] == [] and state["turn_tokens"] == 7


def test_the_collector_is_paused_while_a_boundary_state_is_decoded_and_restored_after():
    """Decoding a boundary state starts no garbage collection pass (every container it makes stays alive: see
    codec.collector_paused), and leaves the collector as it found it, after an error too."""
    import gc

    messages = tuple({"role": "user" if i % 2 == 0 else "assistant", "content": [{"type": "text", "text": f"m{i}"}]}
                     for i in range(5000))  # 10,000 new containers: ~20 passes with the collector on
    data = "\n".join(records._boundary_line(list(messages[i:i + records.BOUNDARY_CHUNK]))  # as boundary_write
                     for i in range(0, len(messages), records.BOUNDARY_CHUNK)).encode()
    passes: list[int] = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            passes.append(info["generation"])

    assert gc.isenabled()
    gc.collect()  # no pass still due from the setup above
    gc.callbacks.append(count)
    try:
        decoded = records._boundary_messages(data)
        # At most the one young pass that follows the decode (the first new container after it starts it).
        assert passes in ([], [0]) and gc.isenabled()
        assert decoded == list(messages)
        gc.disable()  # a caller's own pause is left as it was
        try:
            assert records._boundary_messages(data) == list(messages) and not gc.isenabled()
        finally:
            gc.enable()
        with pytest.raises(ValueError):
            records._boundary_messages(data[:-5])
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(count)
