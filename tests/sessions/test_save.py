"""PUT semantics at the runtime level: ``rt.sessions.save`` creates, updates in place, links the thread,
records ``session.saved``, answers at once mid-turn, and never writes anything when it fails."""

from __future__ import annotations

import errno
import json
import os
import uuid

import pytest
import trio
import trio.testing

from runtime import (
    Conflict, EngineTimeout, InvalidData, InvalidInput, NotFound, PreconditionFailed, StorageError, StorageFull,
)
from runtime.sessions.files import FileSystem, encode_document
from web.errors import status_for

from .conftest import (
    LIMIT, dir_snapshot, events_of, read_session_file, real_time_limit, run_turn, session_ids_listed, sessions_dir,
    stored_bytes, temp_files,
)

HELLO = [
    {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "You said: hello there"}]},
]
THINK_PROMPT = "/think pondering deeply\nsecond question"
THINK = [
    {"role": "user", "content": [{"type": "text", "text": THINK_PROMPT}]},
    {"role": "assistant", "content": [{"type": "thinking", "text": "pondering deeply"},
                                      {"type": "text", "text": "You said: second question"}]},
]


def tokens(*payloads) -> int:
    return sum(p["usage"]["input_tokens"] + p["usage"]["output_tokens"] for p in payloads)


# ---- create ----------------------------------------------------------------------------------


async def test_save_without_session_id_creates_a_uuid_session_linked_to_the_thread(rt):
    thread = await rt.create_thread(
        title="  My   thread\ttitle that is definitely   longer than fifty characters in total  ",
        system_prompt="be brief", workspace="/work/space")
    tid = thread["id"]
    first = await run_turn(rt, tid, "hello there")
    second = await run_turn(rt, tid, THINK_PROMPT)

    result = await rt.sessions.save(thread_id=tid, timeout=LIMIT)

    sid = result["session_id"]
    assert str(uuid.UUID(sid)) == sid
    assert result["thread_id"] == tid and result["turn_in_progress"] is False
    meta = result["session"]["metadata"]
    assert meta["id"] == sid
    assert meta["title"] == "My thread title that is definitely longer than fif"
    assert meta["revision"] == 1
    assert meta["created_at"] == meta["updated_at"]
    assert meta["archived"] is False
    assert meta["model"] == "scripted" and meta["mode"] == "default" and meta["workspace"] == "/work/space"
    # 2 in + 4 out for "hello there"; 11 in (6 history + 5 prompt) + 6 out (2 thinking + 4 text).
    assert meta["total_tokens"] == tokens(first, second) == 23
    assert result["session"]["messages"] == HELLO + THINK
    assert meta["message_count"] == 4
    assert result["session"]["system_prompt"] == "be brief"

    on_disk = read_session_file(rt, sid)
    assert on_disk["schema_version"] == 1
    assert on_disk["metadata"] == meta
    assert on_disk["messages"] == HELLO + THINK
    assert on_disk["system_prompt"] == "be brief"
    assert sorted(dir_snapshot(sessions_dir(rt))) == [f"{sid}.json"]

    assert (await rt.thread_record(tid))["session_id"] == sid
    saved = await events_of(rt, tid, "session.saved")
    assert [e.payload for e in saved] == [{"session_id": sid, "revision": 1, "message_count": 4,
                                           "turn_in_progress": False, "created": True}]
    listed = await rt.sessions.list(limit=10)
    assert [m["id"] for m in listed] == [sid]
    assert {k: listed[0][k] for k in meta if k != "thread_id"} == {k: meta[k] for k in meta if k != "thread_id"}
    assert listed[0]["size"] == len(stored_bytes(rt, sid))


async def test_save_title_falls_back_to_the_first_user_message_trimmed_to_50_chars(rt):
    tid = (await rt.create_thread())["id"]
    prompt = "   Please   summarise\nthe quarterly report for the northern region and its regional offices   "
    await run_turn(rt, tid, prompt)
    result = await rt.sessions.save(thread_id=tid, timeout=LIMIT)
    title = result["session"]["metadata"]["title"]
    assert title == "Please summarise the quarterly report for the nort"
    assert len(title) == 50


async def test_save_title_ignores_a_blank_thread_title_like_rebuild_does(rt):
    """PUT and POST derive titles the same way: a whitespace-only thread title is no title."""
    tid = (await rt.create_thread(title="   "))["id"]
    await run_turn(rt, tid, "hello there")
    put = await rt.sessions.save(thread_id=tid, timeout=LIMIT)
    post = await rt.sessions.rebuild(thread_id=tid, timeout=LIMIT)
    assert post["title"] == "hello there"
    assert put["session"]["metadata"]["title"] == post["title"]


# ---- update in place -------------------------------------------------------------------------


async def test_save_with_existing_session_id_updates_in_place(rt, fake_now):
    tid = (await rt.create_thread(title="original title", system_prompt="v1"))["id"]
    first = await run_turn(rt, tid, "hello there")
    created = await rt.sessions.save(thread_id=tid, timeout=LIMIT)
    sid = created["session_id"]
    old = created["session"]["metadata"]
    await rt.sessions.patch(sid, archived=True, timeout=LIMIT)  # revision 2

    second = await run_turn(rt, tid, THINK_PROMPT)
    await rt.update_thread(tid, {"title": "renamed thread", "model": "m2", "mode": "plan", "system_prompt": "v2"})
    updated = await rt.sessions.save(thread_id=tid, session_id=sid, timeout=LIMIT)

    assert updated["session_id"] == sid
    meta = updated["session"]["metadata"]
    assert meta["id"] == sid
    assert meta["created_at"] == old["created_at"]
    assert meta["title"] == "original title"  # kept, although the thread was renamed
    assert meta["archived"] is True  # kept
    assert meta["revision"] == 3  # 1 (create) + 1 (patch) + 1 (this save)
    assert meta["updated_at"] > old["updated_at"]
    assert meta["model"] == "m2" and meta["mode"] == "plan"
    assert updated["session"]["system_prompt"] == "v2"
    assert updated["session"]["messages"] == HELLO + THINK
    assert meta["message_count"] == 4
    assert meta["total_tokens"] == tokens(first, second)

    assert read_session_file(rt, sid) == {"schema_version": 1, **updated["session"]}
    assert sorted(dir_snapshot(sessions_dir(rt))) == [f"{sid}.json"]
    saved = await events_of(rt, tid, "session.saved")
    assert [(e.payload["revision"], e.payload["created"]) for e in saved] == [(1, True), (3, False)]
    listed = await rt.sessions.list(limit=10, include_archived=True)
    assert [(m["id"], m["revision"], m["message_count"]) for m in listed] == [(sid, 3, 4)]


@pytest.mark.files_only
@pytest.mark.parametrize("edit", ["new size", "same size, later mtime"])
async def test_save_over_a_session_file_edited_on_disk_carries_the_files_revision_and_title(rt, edit):
    # The file is the source of truth; the index row only spares a parse while the file is unchanged.
    # An edit by hand while the server runs must be seen by the next save, whichever of size and mtime
    # it changed.
    tid = (await rt.create_thread(title="thread title"))["id"]
    await run_turn(rt, tid, "hello there")
    created = await rt.sessions.save(thread_id=tid, session_id="edited", timeout=LIMIT)
    assert created["session"]["metadata"]["revision"] == 1
    path = sessions_dir(rt) / "edited.json"
    doc = read_session_file(rt, "edited")
    old = path.stat()
    title = "Renamed by hand on disk" if edit == "new size" else "thread TITLE"  # same length as the old one
    doc["metadata"].update(title=title, revision=7)
    path.write_bytes(encode_document(doc))
    if edit == "new size":
        assert path.stat().st_size != old.st_size
    else:
        assert path.stat().st_size == old.st_size
        # A later edit of the same size: its mtime is later (set explicitly: a coarse file-system clock
        # could stamp both writes alike, and then no check could tell them apart).
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 2_000_000_000))

    saved = await rt.sessions.save(thread_id=tid, session_id="edited", timeout=LIMIT)

    meta = saved["session"]["metadata"]
    assert (meta["revision"], meta["title"]) == (8, title)
    assert meta["created_at"] == created["session"]["metadata"]["created_at"]
    assert (read_session_file(rt, "edited")["metadata"]["revision"], read_session_file(rt, "edited")["metadata"][
        "title"]) == (8, title)
    [listed] = await rt.sessions.list(limit=10)
    assert (listed["revision"], listed["title"]) == (8, title)
    assert [e.payload["revision"] for e in await events_of(rt, tid, "session.saved")] == [1, 8]
    with pytest.raises(PreconditionFailed, match="revision 8, not 2"):
        await rt.sessions.save(thread_id=tid, session_id="edited", if_match=2, timeout=LIMIT)


async def test_save_with_unknown_session_id_creates_it_under_that_id(rt):
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "hello there")
    result = await rt.sessions.save(thread_id=tid, session_id="My-Session_01", timeout=LIMIT)
    assert result["session_id"] == "My-Session_01"
    assert result["session"]["metadata"]["revision"] == 1
    assert result["session"]["metadata"]["title"] == "hello there"
    assert read_session_file(rt, "My-Session_01")["metadata"]["id"] == "My-Session_01"
    assert (await rt.thread_record(tid))["session_id"] == "My-Session_01"
    [event] = await events_of(rt, tid, "session.saved")
    assert event.payload["created"] is True and event.payload["session_id"] == "My-Session_01"


async def test_saving_one_thread_into_another_threads_session_links_both(rt):
    a = (await rt.create_thread())["id"]
    b = (await rt.create_thread())["id"]
    await run_turn(rt, a, "hello there")
    sid = (await rt.sessions.save(thread_id=a, timeout=LIMIT))["session_id"]
    result = await rt.sessions.save(thread_id=b, session_id=sid, timeout=LIMIT)
    assert result["session"]["messages"] == [] and result["session"]["metadata"]["revision"] == 2
    assert (await rt.thread_record(a))["session_id"] == sid
    assert (await rt.thread_record(b))["session_id"] == sid


# ---- choosing the thread ---------------------------------------------------------------------


async def test_save_without_thread_id_picks_the_most_recently_updated_thread(rt, fake_now):
    a = (await rt.create_thread(title="A"))["id"]
    b = (await rt.create_thread(title="B"))["id"]
    assert (await rt.sessions.save(timeout=LIMIT))["thread_id"] == b
    await run_turn(rt, a, "hello there")  # a is now the most recently updated
    result = await rt.sessions.save(timeout=LIMIT)
    assert result["thread_id"] == a
    assert result["session"]["messages"] == HELLO
    assert (await rt.thread_record(a))["session_id"] == result["session_id"]


async def test_save_with_no_threads_at_all_is_invalid_input_and_writes_nothing(rt):
    with pytest.raises(InvalidInput, match="No threads to save"):
        await rt.sessions.save(timeout=LIMIT)
    with pytest.raises(InvalidInput, match="No threads to save"):
        await rt.sessions.save(session_id="s1", timeout=LIMIT)
    assert dir_snapshot(sessions_dir(rt)) == {}


async def test_save_of_an_unknown_thread_is_not_found_and_writes_nothing(rt):
    await rt.create_thread()
    with pytest.raises(NotFound, match="thr_missing"):
        await rt.sessions.save(thread_id="thr_missing", timeout=LIMIT)
    with pytest.raises(NotFound):
        await rt.sessions.save(thread_id="thr_missing", session_id="s1", timeout=LIMIT)
    assert dir_snapshot(sessions_dir(rt)) == {}
    assert await session_ids_listed(rt, include_archived=True) == []


# ---- mid-turn saves (virtual time) -----------------------------------------------------------


async def test_save_during_a_running_turn_answers_at_once_with_completed_turns_only(autojump_clock, open_rt):
    async with open_rt() as rt:
        tid = (await rt.create_thread())["id"]
        first = await run_turn(rt, tid, "hello there")
        hang = await rt.start_turn(tid, "/hang")

        t0 = trio.current_time()
        result = await rt.sessions.save(thread_id=tid, timeout=30)
        assert trio.current_time() == t0  # no virtual time passed: it never waited for the turn

        assert result["turn_in_progress"] is True
        assert result["session"]["messages"] == HELLO
        assert result["session"]["metadata"]["message_count"] == 2
        assert result["session"]["metadata"]["total_tokens"] == tokens(first)
        assert read_session_file(rt, result["session_id"])["messages"] == HELLO
        [event] = await events_of(rt, tid, "session.saved")
        assert event.payload["turn_in_progress"] is True
        assert (await rt.interrupt_turn(tid, hang["id"]))["status"] == "interrupted"


async def test_save_with_wait_for_idle_waits_for_the_turn_to_end_and_includes_it(autojump_clock, open_rt):
    async with open_rt() as rt:
        tid = (await rt.create_thread())["id"]
        await run_turn(rt, tid, "hello there")
        hang = await rt.start_turn(tid, "/hang")
        t0 = trio.current_time()
        interrupted = {}

        async def interrupt_later():
            # Virtual time only reaches t0 + 5 once every task is blocked, i.e. the save is parked
            # on the engine waiting for the turn to end.
            await trio.sleep(5)
            interrupted["record"] = await rt.interrupt_turn(tid, hang["id"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(interrupt_later)
            result = await rt.sessions.save(thread_id=tid, wait_for_idle=True, timeout=30)

        assert trio.current_time() - t0 >= 5
        assert interrupted["record"]["status"] == "interrupted"
        assert result["turn_in_progress"] is False
        assert result["session"]["messages"] == HELLO + [
            {"role": "user", "content": [{"type": "text", "text": "/hang"}]}]
        assert read_session_file(rt, result["session_id"])["metadata"]["message_count"] == 3


async def test_save_with_wait_for_idle_times_out_and_writes_nothing(autojump_clock, open_rt):
    async with open_rt() as rt:
        tid = (await rt.create_thread())["id"]
        await run_turn(rt, tid, "hello there")
        sid = (await rt.sessions.save(thread_id=tid, timeout=30))["session_id"]
        hang = await rt.start_turn(tid, "/hang")
        before = dir_snapshot(sessions_dir(rt))
        listed = await rt.sessions.list(limit=10)
        events = len(await events_of(rt, tid, "session.saved"))
        other = (await rt.create_thread())["id"]

        for session_id in (sid, None):
            t0 = trio.current_time()
            with pytest.raises(EngineTimeout):
                await rt.sessions.save(thread_id=tid, session_id=session_id, wait_for_idle=True, timeout=0.5)
            assert trio.current_time() - t0 == pytest.approx(0.5)

        assert dir_snapshot(sessions_dir(rt)) == before
        assert await rt.sessions.list(limit=10) == listed
        assert len(await events_of(rt, tid, "session.saved")) == events
        assert (await rt.thread_record(tid))["session_id"] == sid
        assert (await rt.thread_record(other))["session_id"] is None
        # The requesters that gave up did not wedge the engine.
        again = await rt.sessions.save(thread_id=tid, session_id=sid, timeout=30)
        assert again["turn_in_progress"] is True and again["session"]["metadata"]["revision"] == 2
        assert (await rt.interrupt_turn(tid, hang["id"]))["status"] == "interrupted"


async def test_a_session_held_by_a_live_save_is_conflict_for_other_writers(autojump_clock, open_rt):
    async with open_rt() as rt:
        tid = (await rt.create_thread())["id"]
        await run_turn(rt, tid, "hello there")
        hang = await rt.start_turn(tid, "/hang")
        first = {}

        async def hold():
            first["result"] = await rt.sessions.save(thread_id=tid, session_id="held", wait_for_idle=True, timeout=60)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            await trio.sleep(1)  # virtual: the first save now waits on the engine, holding the session
            t0 = trio.current_time()
            with pytest.raises(Conflict, match="Session 'held' is in use by a live save"):
                await rt.sessions.save(thread_id=tid, session_id="held", timeout=0.5)
            assert trio.current_time() - t0 == pytest.approx(0.5)
            with pytest.raises(Conflict):
                await rt.sessions.patch("held", title="x", timeout=0.5)
            with pytest.raises(Conflict):
                await rt.sessions.delete("held", timeout=0.5)
            assert dir_snapshot(sessions_dir(rt)) == {}
            await rt.interrupt_turn(tid, hang["id"])
        assert first["result"]["session"]["metadata"]["revision"] == 1
        assert first["result"]["session"]["metadata"]["message_count"] == 3
        assert rt.sessions._locks == {}


async def test_a_save_behind_a_lock_hold_waits_on_the_engine_only_for_what_is_left_of_its_timeout(
        autojump_clock, open_rt):
    # One timeout covers the whole wait phase: 3 s waiting for the session's lock leave 2 s of a 5 s
    # timeout for the engine, so the save answers 504 at 5 s, not at 3 + 5 = 8.
    async with open_rt() as rt:
        tid = (await rt.create_thread())["id"]
        await run_turn(rt, tid, "hello there")
        hang = await rt.start_turn(tid, "/hang")
        t0 = trio.current_time()
        ended: dict[str, tuple[Exception, float]] = {}

        async def save(name: str, timeout: float) -> None:
            with pytest.raises(EngineTimeout) as info:
                await rt.sessions.save(thread_id=tid, session_id="held", wait_for_idle=True, timeout=timeout)
            ended[name] = (info.value, trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(save, "holder", 3)  # holds the session for 3 s, waiting on the hanging turn
            await trio.testing.wait_all_tasks_blocked()
            assert rt.sessions._locks["held"][1] == 1  # the holder has it; nobody waits yet
            nursery.start_soon(save, "behind", 5)
            await trio.testing.wait_all_tasks_blocked()
            assert rt.sessions._locks["held"][1] == 2  # the second save waits for the lock
            assert trio.current_time() == t0

        assert ended["holder"][1] == t0 + 3
        error, at = ended["behind"]
        assert at == t0 + 5, f"the save behind the lock answered at t0 + {at - t0} s"
        assert status_for(error) == 504
        # Nothing was written, nothing is held, and the engine still serves the running turn.
        assert dir_snapshot(sessions_dir(rt)) == {}
        assert rt.sessions._locks == {}
        assert (await rt.thread_record(tid))["session_id"] is None
        assert (await rt.interrupt_turn(tid, hang["id"]))["status"] == "interrupted"


async def test_save_after_the_engine_was_evicted_restores_the_same_state(autojump_clock, open_rt):
    async with open_rt(idle_evict_seconds=5) as rt:
        tid = (await rt.create_thread(system_prompt="sys"))["id"]
        first = await run_turn(rt, tid, "hello there")
        second = await run_turn(rt, tid, THINK_PROMPT)
        live = await rt.sessions.save(thread_id=tid, session_id="before", timeout=30)
        with real_time_limit(3):
            await trio.sleep(10)
            assert rt.manager.engine(tid) is None  # evicted while idle
            restored = await rt.sessions.save(thread_id=tid, session_id="after", timeout=30)
        assert restored["session"]["messages"] == live["session"]["messages"] == HELLO + THINK
        assert restored["session"]["metadata"]["total_tokens"] == tokens(first, second)
        assert restored["session"]["system_prompt"] == "sys"


# ---- load errors: nothing is written ---------------------------------------------------------

CORRUPT = b'{"schema_version": 1, "metadata": {"id": "bad", "title": "trunc'
BAD_FILES = {
    "truncated_json": CORRUPT,
    "binary": b"\xff\xfe\x00garbage",
    "wrong_shape": b'{"schema_version": 1, "metadata": {"id": "bad"}, "messages": []}',
    "future_schema": b'{"schema_version": 2, "metadata": {}, "messages": []}',
    "not_an_object": b"[1, 2, 3]",
}


async def _linked_session(rt) -> tuple[str, str]:
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "hello there")
    sid = (await rt.sessions.save(thread_id=tid, session_id="good", timeout=LIMIT))["session_id"]
    return tid, sid


async def _observable_state(rt, tid):
    return {
        "dir": dir_snapshot(sessions_dir(rt)),
        "list": await rt.sessions.list(limit=50, include_archived=True),
        "link": (await rt.thread_record(tid))["session_id"],
        "threads": len(await rt.list_threads(include_archived=True, limit=500)),
        "saved_events": len(await events_of(rt, tid, "session.saved")),
    }


async def _call(rt, op: str, tid: str, session_id: str):
    if op == "save":
        return await rt.sessions.save(thread_id=tid, session_id=session_id, timeout=LIMIT)
    if op == "get":
        return await rt.sessions.get(session_id)
    if op == "patch":
        return await rt.sessions.patch(session_id, title="new title", archived=True, timeout=LIMIT)
    if op == "resume":
        return await rt.sessions.resume(session_id)
    if op == "delete":
        return await rt.sessions.delete(session_id, timeout=LIMIT)
    raise AssertionError(op)


@pytest.mark.files_only
@pytest.mark.parametrize("op", ["save", "get", "patch", "resume"])
@pytest.mark.parametrize("kind", sorted(BAD_FILES))
async def test_unparseable_session_file_is_invalid_data_and_is_not_overwritten(rt, op, kind):
    tid, _ = await _linked_session(rt)
    (sessions_dir(rt) / "bad.json").write_bytes(BAD_FILES[kind])
    before = await _observable_state(rt, tid)
    with pytest.raises(InvalidData) as info:
        await _call(rt, op, tid, "bad")
    assert info.value.message.startswith("Failed to parse session 'bad'")
    assert await _observable_state(rt, tid) == before
    assert (sessions_dir(rt) / "bad.json").read_bytes() == BAD_FILES[kind]


@pytest.mark.files_only
@pytest.mark.parametrize("op", ["save", "get", "patch", "resume", "delete"])
async def test_directory_in_place_of_a_session_file_is_storage_error(rt, op):
    tid, _ = await _linked_session(rt)
    (sessions_dir(rt) / "dir.json").mkdir()
    (sessions_dir(rt) / "dir.json" / "keep").write_bytes(b"inside")
    before = await _observable_state(rt, tid)
    with pytest.raises(StorageError) as info:
        await _call(rt, op, tid, "dir")
    assert "a directory is in the way" in info.value.message
    action = "delete" if op == "delete" else "load"
    assert info.value.message.startswith(f"Failed to {action} session 'dir'")
    assert await _observable_state(rt, tid) == before


@pytest.mark.files_only
@pytest.mark.parametrize("op", ["save", "get", "patch", "resume"])
async def test_permission_denied_reading_a_session_is_storage_error(rt, monkeypatch, op):
    tid, sid = await _linked_session(rt)
    other = (await rt.create_thread())["id"]
    await run_turn(rt, other, "something else")
    fs = rt.sessions.files.fs

    def read_bytes(path):
        if path.name == f"{sid}.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return FileSystem.read_bytes(fs, path)

    monkeypatch.setattr(fs, "read_bytes", read_bytes)
    before = await _observable_state(rt, tid)
    before_other = (await rt.thread_record(other))["session_id"]
    with pytest.raises(StorageError) as info:
        await _call(rt, op, other, sid)
    assert info.value.message == f"Failed to load session '{sid}': permission denied"
    assert await _observable_state(rt, tid) == before
    assert (await rt.thread_record(other))["session_id"] == before_other is None


INVALID_IDS = ["..", ".", "a/b", "../x", "a\x00b", "x" * 129, "", "-lead", "_lead", "abc\n", "a b", "a.json",
               "ü", "a\\b"]


@pytest.mark.parametrize("op", ["save", "get", "patch", "resume", "delete"])
async def test_invalid_session_ids_are_invalid_input_before_any_file_access(rt, monkeypatch, op):
    tid, _ = await _linked_session(rt)
    before = await _observable_state(rt, tid)
    touched = []
    if rt.sessions.storage == "files":
        fs = rt.sessions.files.fs
        for name in ("read_bytes", "stage", "stage_steps", "write_data", "link", "replace", "publish", "remove"):
            monkeypatch.setattr(fs, name, lambda *a, _n=name: touched.append(_n))
    for bad in INVALID_IDS:
        with pytest.raises(InvalidInput, match="Invalid session id"):
            await _call(rt, op, tid, bad)
    assert touched == []
    monkeypatch.undo()
    assert await _observable_state(rt, tid) == before


async def test_longest_valid_session_id_is_accepted(rt):
    tid = (await rt.create_thread())["id"]
    longest = "A" + "z_-9" * 31 + "abc"
    assert len(longest) == 128
    result = await rt.sessions.save(thread_id=tid, session_id=longest, timeout=LIMIT)
    assert result["session_id"] == longest
    assert (await rt.sessions.get(longest))["metadata"]["id"] == longest


# ---- If-Match --------------------------------------------------------------------------------


async def test_if_match_with_the_current_revision_saves_and_a_stale_one_changes_nothing(rt):
    tid, sid = await _linked_session(rt)
    other = (await rt.create_thread())["id"]
    saved = await rt.sessions.save(thread_id=tid, session_id=sid, if_match=1, timeout=LIMIT)
    assert saved["session"]["metadata"]["revision"] == 2

    before = await _observable_state(rt, tid)
    with pytest.raises(PreconditionFailed, match="revision 2, not 1"):
        await rt.sessions.save(thread_id=other, session_id=sid, if_match=1, timeout=LIMIT)
    with pytest.raises(PreconditionFailed):
        await rt.sessions.patch(sid, title="renamed", if_match=5, timeout=LIMIT)
    with pytest.raises(PreconditionFailed):  # a session that does not exist matches no revision
        await rt.sessions.save(thread_id=other, session_id="absent", if_match=1, timeout=LIMIT)
    with pytest.raises(PreconditionFailed):
        await rt.sessions.save(thread_id=other, session_id="absent", if_match="*", timeout=LIMIT)
    assert await _observable_state(rt, tid) == before
    assert (await rt.thread_record(other))["session_id"] is None

    assert (await rt.sessions.save(thread_id=tid, session_id=sid, if_match="*", timeout=LIMIT)
            )["session"]["metadata"]["revision"] == 3
    assert (await rt.sessions.patch(sid, title="renamed", if_match=3, timeout=LIMIT))["session"]["revision"] == 4


# ---- concurrency -----------------------------------------------------------------------------


async def test_concurrent_saves_to_one_session_are_serialised(rt):
    threads = [(await rt.create_thread(title=f"t{i}"))["id"] for i in range(5)]
    for i, tid in enumerate(threads):
        await run_turn(rt, tid, f"message number {i}")
    sid = (await rt.sessions.save(thread_id=threads[0], session_id="shared", timeout=LIMIT))["session_id"]
    results = []

    async def save(tid):
        results.append(await rt.sessions.save(thread_id=tid, session_id=sid, timeout=LIMIT))

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            for tid in threads:
                nursery.start_soon(save, tid)

    revisions = [r["session"]["metadata"]["revision"] for r in results]
    assert sorted(revisions) == [2, 3, 4, 5, 6]
    doc = read_session_file(rt, sid)
    assert doc["metadata"]["revision"] == 6
    last = next(r for r in results if r["session"]["metadata"]["revision"] == 6)
    assert doc["messages"] == last["session"]["messages"]
    assert doc["metadata"]["title"] == "t0"
    assert temp_files(sessions_dir(rt)) == []
    seen = []
    for tid in threads:
        seen += [e.payload["revision"] for e in await events_of(rt, tid, "session.saved")]
    seen.sort()
    assert seen == [1, 2, 3, 4, 5, 6]
    for tid in threads:
        assert (await rt.thread_record(tid))["session_id"] == sid
    [listed] = await rt.sessions.list(limit=10)
    assert listed["revision"] == 6 and listed["size"] == len(stored_bytes(rt, sid))
    assert rt.sessions._locks == {}  # lock slots are dropped when the last holder leaves


# ---- disk faults through the FileSystem seam -------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.files_only
@pytest.mark.parametrize("fault", ["write_data", "replace"])
async def test_a_failed_session_write_changes_nothing(rt, monkeypatch, fault):
    tid, sid = await _linked_session(rt)
    other = (await rt.create_thread())["id"]
    await run_turn(rt, other, "a different conversation")
    await run_turn(rt, tid, "one more turn")
    before = await _observable_state(rt, tid)
    other_events = len(await events_of(rt, other, "session.saved"))
    monkeypatch.setattr(rt.sessions.files.fs, fault, _enospc)

    with pytest.raises(StorageFull) as info:  # update in place, from another thread
        await rt.sessions.save(thread_id=other, session_id=sid, timeout=LIMIT)
    assert info.value.message == f"Failed to save session '{sid}': no space left on device"
    with pytest.raises(StorageError, match="Failed to save session"):  # create
        await rt.sessions.save(thread_id=other, timeout=LIMIT)
    with pytest.raises(StorageError, match="Failed to update session"):  # PATCH
        await rt.sessions.patch(sid, title="renamed", timeout=LIMIT)
    with pytest.raises(StorageError, match="Failed to save session"):  # POST (rebuild)
        await rt.sessions.rebuild(thread_id=other, timeout=LIMIT)

    assert await _observable_state(rt, tid) == before
    assert temp_files(sessions_dir(rt)) == []
    assert (await rt.thread_record(other))["session_id"] is None
    assert len(await events_of(rt, other, "session.saved")) == other_events
    assert (await rt.sessions.get(sid))["metadata"]["revision"] == 1

    monkeypatch.undo()
    again = await rt.sessions.save(thread_id=tid, session_id=sid, timeout=LIMIT)
    assert again["session"]["metadata"]["revision"] == 2


class FailNth:
    """Stands in for one FileSystem operation: its ``n``-th call fails with EIO, the others run."""

    def __init__(self, fs: FileSystem, name: str, n: int) -> None:
        self.fs, self.name, self.n, self.calls = fs, name, n, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.n:
            raise OSError(errno.EIO, "Input/output error")
        return getattr(FileSystem, self.name)(self.fs, *args)


@pytest.mark.files_only
async def test_a_directory_fsync_failure_after_the_replace_changes_nothing(rt, monkeypatch):
    """``fsync_dir`` after ``os.replace`` decides whether the rename is durable, and the COMMIT comes
    after it: failing there, the save puts the previous file back (create: removes the new one) and
    reports that nothing was saved."""
    tid, sid = await _linked_session(rt)
    other = (await rt.create_thread())["id"]
    await run_turn(rt, other, "a different conversation")
    before = await _observable_state(rt, tid)
    files_before = dir_snapshot(sessions_dir(rt))

    for session_id in (sid, "created"):  # update in place, then create
        fs = rt.sessions.files.fs
        fail = FailNth(fs, "fsync_dir", 2)  # 1: after staging (undo file durable), 2: after the replace
        monkeypatch.setattr(fs, "fsync_dir", fail)
        with pytest.raises(StorageError) as info:
            await rt.sessions.save(thread_id=other, session_id=session_id, timeout=LIMIT)
        assert info.value.message == f"Failed to save session '{session_id}': Input/output error"
        assert fail.calls >= 2  # the failing call was reached
        assert await _observable_state(rt, tid) == before
        assert dir_snapshot(sessions_dir(rt)) == files_before  # no new file, no undo or temp file left
        assert (await rt.thread_record(other))["session_id"] is None
        assert await events_of(rt, other, "session.saved") == []
    monkeypatch.undo()
    again = await rt.sessions.save(thread_id=other, session_id=sid, timeout=LIMIT)
    assert again["session"]["metadata"]["revision"] == 2


@pytest.mark.files_only
async def test_a_failed_delete_changes_nothing(rt, monkeypatch):
    tid, sid = await _linked_session(rt)
    before = await _observable_state(rt, tid)
    files_before = dir_snapshot(sessions_dir(rt))

    def replace(src, dst):  # DELETE moves the file aside before its COMMIT
        raise PermissionError(errno.EACCES, "Permission denied", str(src))

    monkeypatch.setattr(rt.sessions.files.fs, "replace", replace)
    with pytest.raises(StorageError) as info:
        await rt.sessions.delete(sid, timeout=LIMIT)
    assert info.value.message == f"Failed to delete session '{sid}': permission denied"
    assert await _observable_state(rt, tid) == before
    assert dir_snapshot(sessions_dir(rt)) == files_before

    monkeypatch.undo()
    fs = rt.sessions.files.fs
    monkeypatch.setattr(fs, "fsync_dir", FailNth(fs, "fsync_dir", 1))  # after moving the file aside
    with pytest.raises(StorageError, match=f"Failed to delete session '{sid}': Input/output error"):
        await rt.sessions.delete(sid, timeout=LIMIT)
    assert await _observable_state(rt, tid) == before
    assert dir_snapshot(sessions_dir(rt)) == files_before  # the file is back under its own name


@pytest.mark.files_only
async def test_temp_files_left_by_a_crash_are_removed_on_open(open_rt, data_dir):
    async with open_rt() as rt:
        tid, sid = await _linked_session(rt)
    stray = sessions_dir(data_dir) / f".{sid}.0123abcd.tmp"
    stray.write_bytes(b'{"half": ')
    async with open_rt() as rt:
        assert temp_files(sessions_dir(rt)) == []
        assert json.loads((sessions_dir(rt) / f"{sid}.json").read_bytes())["metadata"]["revision"] == 1
