"""POST (rebuild from stored items), listing/search/sort, PATCH and DELETE at the runtime level."""

from __future__ import annotations

import pytest
import trio

from runtime import Conflict, InvalidData, InvalidInput, NotFound

from .conftest import (
    LIMIT, dir_snapshot, events_of, read_session_file, run_turn, session_ids_listed, sessions_dir, stored_bytes,
    wait_turn_end,
)

# ---- rebuild ---------------------------------------------------------------------------------


async def _first_event(rt, tid, name):
    stream = await rt.subscribe(tid)
    try:
        with trio.fail_after(LIMIT):
            async for event in stream:
                if event.event == name:
                    return event
    finally:
        stream.close()


async def test_rebuild_matches_the_live_save_for_completed_turns_including_thinking(rt):
    tid = (await rt.create_thread(system_prompt="sys"))["id"]
    await run_turn(rt, tid, "hello there")
    await run_turn(rt, tid, "/think weighing the options carefully\nwhat next")
    await run_turn(rt, tid, "/fail the model fell over")

    put = await rt.sessions.save(thread_id=tid, timeout=LIMIT)
    post = await rt.sessions.rebuild(thread_id=tid, timeout=LIMIT)

    assert post["session_id"] != put["session_id"] and post["thread_id"] == tid
    rebuilt = read_session_file(rt, post["session_id"])
    assert rebuilt["messages"] == put["session"]["messages"]
    assert {"type": "thinking", "text": "weighing the options carefully"} in rebuilt["messages"][3]["content"]
    assert post["message_count"] == len(put["session"]["messages"]) == rebuilt["metadata"]["message_count"] == 5
    assert rebuilt["metadata"]["total_tokens"] == put["session"]["metadata"]["total_tokens"]
    assert rebuilt["metadata"]["revision"] == 1
    assert rebuilt["system_prompt"] == "sys"
    assert post["title"] == put["session"]["metadata"]["title"] == "hello there"
    assert (await rt.thread_record(tid))["session_id"] == post["session_id"]
    saved = await events_of(rt, tid, "session.saved")
    assert saved[-1].payload == {"session_id": post["session_id"], "revision": 1, "message_count": 5,
                                 "turn_in_progress": False, "created": True}


async def test_rebuild_matches_the_live_save_after_steer_interrupt_and_compaction(rt):
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "remember the number seven")
    await rt.compact(tid, reason="shorter")
    turn = await rt.start_turn(tid, "/slow 100\none two three four five")
    await _first_event(rt, tid, "item.delta")
    await rt.steer_turn(tid, turn["id"], "and also this")
    await rt.interrupt_turn(tid, turn["id"])
    await wait_turn_end(rt, tid, turn["id"])

    put = await rt.sessions.save(thread_id=tid, timeout=LIMIT)
    post = await rt.sessions.rebuild(thread_id=tid, timeout=LIMIT)
    rebuilt = read_session_file(rt, post["session_id"])
    assert rebuilt["messages"] == put["session"]["messages"]
    assert rebuilt["messages"][0]["content"][0]["text"].startswith("[Summary of earlier conversation]")
    assert rebuilt["messages"][-1] == {"role": "user", "content": [{"type": "text", "text": "and also this"}]}


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
async def test_rebuild_with_blank_thread_id_is_invalid_input(rt, blank):
    with pytest.raises(InvalidInput, match="thread_id must not be blank"):
        await rt.sessions.rebuild(thread_id=blank, timeout=LIMIT)
    assert dir_snapshot(sessions_dir(rt)) == {}


async def test_rebuild_of_unknown_thread_is_not_found(rt):
    with pytest.raises(NotFound, match="thr_nope"):
        await rt.sessions.rebuild(thread_id="thr_nope", timeout=LIMIT)
    assert dir_snapshot(sessions_dir(rt)) == {}


async def test_rebuild_during_a_running_turn_is_conflict(rt):
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "hello there")
    hang = await rt.start_turn(tid, "/hang")
    with pytest.raises(Conflict, match=hang["id"]):
        await rt.sessions.rebuild(thread_id=tid, timeout=LIMIT)
    assert dir_snapshot(sessions_dir(rt)) == {}
    assert (await rt.thread_record(tid))["session_id"] is None
    await rt.interrupt_turn(tid, hang["id"])
    assert (await rt.sessions.rebuild(thread_id=tid, timeout=LIMIT))["message_count"] == 3


async def test_rebuild_is_conflict_when_only_the_store_knows_a_turn_is_queued(rt):
    """The store, not just the live engine, says whether a turn is running."""
    tid = (await rt.create_thread())["id"]
    await rt.store.write(statements=[(
        "INSERT INTO turns (id, thread_id, ord, status, input_summary, created_at)"
        " VALUES (?, ?, 1, 'queued', 'x', 'now')",
        ("turn_queued", tid))])
    assert rt.manager.engine(tid) is None
    with pytest.raises(Conflict, match="turn_queued"):
        await rt.sessions.rebuild(thread_id=tid, timeout=LIMIT)


async def test_rebuild_of_a_thread_without_messages_is_invalid_input(rt):
    tid = (await rt.create_thread(title="empty"))["id"]
    with pytest.raises(InvalidInput, match="no messages"):
        await rt.sessions.rebuild(thread_id=tid, timeout=LIMIT)
    assert dir_snapshot(sessions_dir(rt)) == {}
    assert (await rt.thread_record(tid))["session_id"] is None


async def test_rebuild_title_is_given_then_thread_then_first_message(rt):
    a = (await rt.create_thread(title="  thread   title  "))["id"]
    b = (await rt.create_thread())["id"]
    for tid in (a, b):
        await run_turn(rt, tid, "first user message " + "x" * 60)
    given = await rt.sessions.rebuild(thread_id=a, title="  given\n  title ", timeout=LIMIT)
    assert given["title"] == "given title"
    assert (await rt.sessions.rebuild(thread_id=a, title="y" * 80, timeout=LIMIT))["title"] == "y" * 50
    assert (await rt.sessions.rebuild(thread_id=a, timeout=LIMIT))["title"] == "thread title"
    derived = (await rt.sessions.rebuild(thread_id=b, timeout=LIMIT))["title"]
    assert derived == ("first user message " + "x" * 60)[:50]
    with pytest.raises(InvalidInput, match="title must not be blank"):
        await rt.sessions.rebuild(thread_id=a, title="   ", timeout=LIMIT)
    assert read_session_file(rt, given["session_id"])["metadata"]["title"] == "given title"


# ---- list ------------------------------------------------------------------------------------


async def _session(rt, title: str, prompt: str) -> str:
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, prompt)
    return (await rt.sessions.rebuild(thread_id=tid, title=title, timeout=LIMIT))["session_id"]


async def test_list_search_matches_title_and_message_text_case_insensitively(rt):
    uni = await _session(rt, "Ünïcode Straße notes", "plain words")
    budget = await _session(rt, "Finance", "Review the Quarterly BUDGET now")
    pct = await _session(rt, "100% done", "nothing special")
    other = await _session(rt, "Something else", "Ärger über Öl")

    async def search(term):
        return set(await session_ids_listed(rt, search=term))

    assert await search("ünïcode") == {uni}
    assert await search("ÜNÏCODE") == {uni}
    assert await search("straße") == {uni}
    assert await search("budget") == {budget}
    assert await search("quarterly budget") == {budget}
    assert await search("YOU SAID: REVIEW") == {budget}  # assistant text is searched too
    assert await search("äRGER ÜBER öl") == {other}
    assert await search("0% d") == {pct}
    assert await search("%") == {pct}  # LIKE wildcards are literal
    assert await search("_") == set()
    assert await search("no such text anywhere") == set()
    assert await search("") == {uni, budget, pct, other}


async def test_list_sorts_by_recent_name_and_size(rt, fake_now):
    small = await _session(rt, "bravo", "hi")
    large = await _session(rt, "Alpha", "a much longer message " * 20)
    medium = await _session(rt, "charlie", "a medium sized message here")
    assert await session_ids_listed(rt) == [medium, large, small]
    assert await session_ids_listed(rt, sort="recent") == [medium, large, small]
    assert await session_ids_listed(rt, sort="name") == [large, small, medium]  # case-insensitive
    assert await session_ids_listed(rt, sort="size") == [large, medium, small]
    sizes = [m["size"] for m in await rt.sessions.list(limit=10, sort="size")]
    assert sizes == sorted(sizes, reverse=True)
    await rt.sessions.patch(small, title="zulu", timeout=LIMIT)  # now the most recent
    assert await session_ids_listed(rt, sort="recent") == [small, medium, large]
    with pytest.raises(InvalidInput, match="sort must be one of"):
        await rt.sessions.list(limit=10, sort="oldest")


async def test_list_hides_archived_unless_asked_and_honours_limit(rt, fake_now):
    a = await _session(rt, "a", "one")
    b = await _session(rt, "b", "two")
    c = await _session(rt, "c", "three")
    await rt.sessions.patch(b, archived=True, timeout=LIMIT)
    assert await session_ids_listed(rt) == [c, a]
    assert await session_ids_listed(rt, include_archived=True) == [b, c, a]
    assert await session_ids_listed(rt, archived_only=True) == [b]
    assert await session_ids_listed(rt, archived_only=True, include_archived=True) == [b]
    assert await session_ids_listed(rt, include_archived=True, limit=2) == [b, c]
    assert await session_ids_listed(rt, limit=1) == [c]
    listed = await rt.sessions.list(limit=10, archived_only=True)
    assert listed[0]["archived"] is True and listed[0]["revision"] == 2


@pytest.mark.files_only
async def test_a_corrupt_file_added_on_disk_is_skipped_by_the_listing_after_reopen(open_rt, data_dir):
    async with open_rt() as rt:
        good = await _session(rt, "good one", "hello there")
    (sessions_dir(data_dir) / "broken.json").write_bytes(b'{"schema_version": 1, "metada')
    (sessions_dir(data_dir) / "wrongshape.json").write_bytes(b'{"schema_version": 1}')
    (sessions_dir(data_dir) / "not-json.txt").write_bytes(b"ignored")
    (sessions_dir(data_dir) / "bad name!.json").write_bytes(b"{}")
    (sessions_dir(data_dir) / "adir.json").mkdir()
    async with open_rt() as rt:
        assert await session_ids_listed(rt, include_archived=True) == [good]
        assert await session_ids_listed(rt, search="hello") == [good]
        with pytest.raises(InvalidData, match="Failed to parse session 'broken'"):
            await rt.sessions.get("broken")
        assert (sessions_dir(rt) / "broken.json").read_bytes() == b'{"schema_version": 1, "metada'
        # The listing keeps working as sessions are added next to the corrupt file.
        another = await _session(rt, "another", "more text")
        assert set(await session_ids_listed(rt)) == {good, another}


# ---- patch / delete --------------------------------------------------------------------------


async def test_patch_title_and_archived_bump_revision_by_one_and_report_changes(rt, fake_now):
    sid = await _session(rt, "first title", "hello there")
    before = read_session_file(rt, sid)

    renamed = await rt.sessions.patch(sid, title="  a   new\ttitle  ", timeout=LIMIT)
    assert renamed["changes"] == {"title": "a new title"}
    assert renamed["session"]["title"] == "a new title" and renamed["session"]["revision"] == 2
    assert renamed["session"]["updated_at"] > before["metadata"]["updated_at"]
    assert renamed["session"]["created_at"] == before["metadata"]["created_at"]

    archived = await rt.sessions.patch(sid, archived=True, timeout=LIMIT)
    assert archived["changes"] == {"archived": True} and archived["session"]["revision"] == 3

    both = await rt.sessions.patch(sid, title="t" * 70, archived=False, timeout=LIMIT)
    assert both["changes"] == {"title": "t" * 50, "archived": False} and both["session"]["revision"] == 4

    on_disk = read_session_file(rt, sid)
    assert on_disk["metadata"] == both["session"]
    assert on_disk["messages"] == before["messages"]  # PATCH touches metadata only
    [listed] = await rt.sessions.list(limit=10)
    assert (listed["title"], listed["revision"], listed["archived"]) == ("t" * 50, 4, False)
    assert (await rt.sessions.get(sid))["metadata"]["revision"] == 4


async def test_patch_errors_change_nothing(rt):
    sid = await _session(rt, "title", "hello there")
    before = dir_snapshot(sessions_dir(rt))
    with pytest.raises(InvalidInput, match="at least one"):
        await rt.sessions.patch(sid, timeout=LIMIT)
    with pytest.raises(InvalidInput, match="title must not be blank"):
        await rt.sessions.patch(sid, title=" \n ", timeout=LIMIT)
    with pytest.raises(InvalidInput, match="title must be a string"):
        await rt.sessions.patch(sid, title=5, timeout=LIMIT)
    with pytest.raises(NotFound, match="Session 'missing' not found"):
        await rt.sessions.patch("missing", title="x", timeout=LIMIT)
    assert dir_snapshot(sessions_dir(rt)) == before


async def test_delete_removes_file_index_row_and_every_thread_link(rt):
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "hello there")
    sid = (await rt.sessions.save(thread_id=tid, timeout=LIMIT))["session_id"]
    keep = await _session(rt, "keep me", "other")
    resumed = (await rt.sessions.resume(sid))["thread_id"]
    assert (await rt.thread_record(resumed))["session_id"] == sid

    assert await rt.sessions.delete(sid, timeout=LIMIT) is None

    assert stored_bytes(rt, sid) is None
    assert stored_bytes(rt, keep) is not None
    assert await session_ids_listed(rt, include_archived=True) == [keep]
    assert (await rt.thread_record(tid))["session_id"] is None
    assert (await rt.thread_record(resumed))["session_id"] is None
    with pytest.raises(NotFound):
        await rt.sessions.get(sid)
    with pytest.raises(NotFound, match=f"Session '{sid}' not found"):
        await rt.sessions.delete(sid, timeout=LIMIT)
    # The id is free again: saving under it starts a new history.
    again = await rt.sessions.save(thread_id=tid, session_id=sid, timeout=LIMIT)
    assert again["session"]["metadata"]["revision"] == 1


async def test_delete_of_unknown_session_is_not_found_and_changes_nothing(rt):
    keep = await _session(rt, "keep me", "other")
    before = dir_snapshot(sessions_dir(rt))
    with pytest.raises(NotFound, match="Session 'nope' not found"):
        await rt.sessions.delete("nope", timeout=LIMIT)
    assert dir_snapshot(sessions_dir(rt)) == before
    assert await session_ids_listed(rt) == [keep]


@pytest.mark.files_only
async def test_delete_of_an_unparseable_session_file_is_allowed(rt):
    (sessions_dir(rt) / "junk.json").write_bytes(b"{not json")
    await rt.sessions.delete("junk", timeout=LIMIT)
    assert dir_snapshot(sessions_dir(rt)) == {}
