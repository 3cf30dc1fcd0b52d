"""Resume takes the session's lock (issue 11, suspected: "a concurrent DELETE leaves the new thread
linked to a deleted session").

Resume loads the session file and then creates a thread linked to it. Without the lock a DELETE could
commit between the two, and the thread was created linked to a session whose file and index row were
gone. With it, a DELETE (or a save) of that session comes wholly before or wholly after the resume.
Orderings are forced with events and a held store writer, never with sleeps.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import AsyncIterator

import pytest
import trio
import trio.testing

from runtime import Runtime
from runtime.store import records
from runtime.errors import Conflict, NotFound
from tests.support import held_writer

from .conftest import LIMIT, run_turn, stored_bytes


async def saved_session(rt: Runtime) -> str:
    thread_id = (await rt.create_thread(title="to resume"))["id"]
    await run_turn(rt, thread_id, "remember this")
    return (await rt.sessions.save(thread_id=thread_id, timeout=LIMIT))["session_id"]


async def all_threads(rt: Runtime) -> list[dict]:
    return await rt.store.read(functools.partial(records.list_threads, limit=500, include_archived=True,
                                                 archived_only=False))


async def dangling_links(rt: Runtime) -> list[tuple[str, str]]:
    """(thread, session) pairs where the thread is linked to a session with no file or no index row."""
    indexed = {m["id"] for m in await rt.sessions.list(limit=500, include_archived=True)}
    return [(t["id"], t["session_id"]) for t in await all_threads(rt) if t.get("session_id") and (
        t["session_id"] not in indexed or stored_bytes(rt, t["session_id"]) is None)]


async def test_a_delete_during_a_resume_never_leaves_the_new_thread_linked_to_a_deleted_session(rt, monkeypatch):
    session_id = await saved_session(rt)
    reached, go = trio.Event(), trio.Event()
    create_thread = rt.create_thread

    async def create_when_told(**fields):  # the seam between resume's load and its thread's create
        reached.set()
        await go.wait()
        return await create_thread(**fields)

    monkeypatch.setattr(rt, "create_thread", create_when_told)
    results: dict[str, object] = {}

    async def resume() -> None:
        results["resume"] = await rt.sessions.resume(session_id, timeout=LIMIT)

    async def delete() -> None:
        results["delete"] = await rt.sessions.delete(session_id, timeout=LIMIT)

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(resume)
            await reached.wait()  # resume has read the file and is about to create its thread
            nursery.start_soon(delete)
            # Without the lock the delete's commit is queued now, ahead of the thread's create;
            # with it, the delete waits for the resume to finish.
            await trio.testing.wait_all_tasks_blocked()
            go.set()

    assert await dangling_links(rt) == []
    # The resume came first (it held the lock); then the delete removed the session and unlinked its thread.
    resumed = await rt.thread_record(results["resume"]["thread_id"])
    assert (resumed["session_id"], resumed["title"]) == (None, "to resume")
    assert stored_bytes(rt, session_id) is None
    assert session_id not in {m["id"] for m in await rt.sessions.list(limit=500, include_archived=True)}
    assert rt.sessions._locks == {}


async def test_a_resume_behind_a_committing_delete_finds_the_session_gone_and_creates_nothing(
        rt, autojump_clock):
    session_id = await saved_session(rt)
    before = [t["id"] for t in await all_threads(rt)]
    results: dict[str, object] = {}

    async def resume() -> None:
        try:
            results["resume"] = await rt.sessions.resume(session_id, timeout=LIMIT)
        except NotFound as exc:
            results["resume"] = exc

    async with trio.open_nursery() as nursery:
        with held_writer(rt):  # the delete's commit waits in the writer, the delete holds the session
            nursery.start_soon(functools.partial(rt.sessions.delete, session_id, timeout=LIMIT))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(resume)
            await trio.testing.wait_all_tasks_blocked()
            assert "resume" not in results  # waiting for the session, not answered from a stale load

    assert isinstance(results["resume"], NotFound)
    assert str(results["resume"]) == f"Session '{session_id}' not found"
    assert [t["id"] for t in await all_threads(rt)] == before
    assert rt.sessions._locks == {}


@contextlib.asynccontextmanager
async def session_held(rt: Runtime, session_id: str) -> AsyncIterator[None]:
    """Another task holds the session's lock for the block, as a PUT does while it waits for its engine."""
    holding, release = trio.Event(), trio.Event()

    async def live_save() -> None:
        async with rt.sessions._locked(session_id, math.inf):
            holding.set()
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(live_save)
        await holding.wait()
        try:
            yield
        finally:
            release.set()


async def test_a_resume_held_up_past_its_timeout_by_a_save_is_a_conflict_and_creates_nothing(rt, autojump_clock):
    session_id = await saved_session(rt)
    before = await all_threads(rt)
    async with session_held(rt, session_id):
        t0 = trio.current_time()
        with pytest.raises(Conflict, match=f"Session '{session_id}' is in use"):
            await rt.sessions.resume(session_id, timeout=5)
        assert trio.current_time() == t0 + 5

    assert await all_threads(rt) == before
    assert rt.sessions._locks == {}
    # Once the session is free, the same resume works.
    resumed = await rt.sessions.resume(session_id, timeout=5)
    assert (await rt.thread_record(resumed["thread_id"]))["session_id"] == session_id


async def test_a_resume_cancelled_while_it_waits_for_the_session_creates_nothing(rt, autojump_clock):
    session_id = await saved_session(rt)
    before = await all_threads(rt)
    async with session_held(rt, session_id):
        with trio.move_on_after(3) as waited:
            await rt.sessions.resume(session_id, timeout=LIMIT)
    assert waited.cancelled_caught
    assert await all_threads(rt) == before
    assert rt.sessions._locks == {}
