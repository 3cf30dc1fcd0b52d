"""Client disconnects during PUT /v1/sessions over real sockets: the connection drops after a
seeded-random number of checkpoints or when the server reaches a chosen phase of the save, and the
result is always nothing changed or the whole save durable and linked. (Cancelling each operation at
every scheduling step, at the runtime level, is tests/cancellation/test_cancel_every_step.py.)
"""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tests import support

from runtime.sessions.files import parse_document
from tests.conftest import E2E_LIMIT
from tests.e2e.helpers import wait_turn_end

from .conftest import dir_snapshot, events_of, sessions_dir, stored_bytes, temp_files

def files_on_disk(directory) -> dict[str, dict[str, Any]]:
    """Every stored document (a file, or a row in the store), parsed."""
    docs = {}
    for name, data in dir_snapshot(directory).items():
        if not name.endswith(".json"):
            continue
        doc = parse_document(name[:-5], data)  # every file is whole and well-formed
        assert doc["metadata"]["id"] == name[:-5]
        docs[name[:-5]] = doc
    return docs


async def assert_consistent(rt) -> dict[str, dict[str, Any]]:
    """Files, index, thread links and session.saved events agree; no temp file; no leaked lock."""
    directory = sessions_dir(rt)
    assert temp_files(directory) == []
    docs = files_on_disk(directory)
    listed = {m["id"]: m for m in await rt.sessions.list(limit=500, include_archived=True)}
    assert set(listed) == set(docs)
    for sid, doc in docs.items():
        assert listed[sid]["revision"] == doc["metadata"]["revision"]
        assert listed[sid]["title"] == doc["metadata"]["title"]
        assert listed[sid]["size"] == len(stored_bytes(rt, sid))
    for thread in await rt.list_threads(include_archived=True, limit=500):
        if thread["session_id"] is not None:
            assert thread["session_id"] in docs, thread
    assert rt.sessions._locks == {}
    return docs


async def saved_revisions(rt, thread_ids, session_id) -> list[int]:
    revisions = []
    for tid in thread_ids:
        revisions += [e.payload["revision"] for e in await events_of(rt, tid, "session.saved")
                      if e.payload["session_id"] == session_id]
    return sorted(revisions)


# ---- runtime level: every k ------------------------------------------------------------------


@pytest.mark.parametrize("hang", [False, True], ids=["idle", "mid-turn"])
# ---- end to end: client disconnects during PUT -----------------------------------------------


class Phases:
    """trio.Events set as the server's save reaches each phase (wrapping the in-process runtime)."""

    NAMES = ("entered", "snapshot", "commit")

    def __init__(self, rt) -> None:
        self.reset()
        save, snapshot, write_shielded = rt.sessions.save, rt.get_session_snapshot, rt.store.write_shielded

        async def traced_save(*args, **kwargs):
            self.events["entered"].set()
            return await save(*args, **kwargs)

        async def traced_snapshot(*args, **kwargs):
            self.events["snapshot"].set()
            return await snapshot(*args, **kwargs)

        async def traced_write(*args, **kwargs):
            self.events["commit"].set()
            return await write_shielded(*args, **kwargs)

        rt.sessions.save = traced_save
        rt.get_session_snapshot = traced_snapshot
        rt.store.write_shielded = traced_write

    def reset(self) -> None:
        self.events = {name: trio.Event() for name in self.NAMES}


async def test_client_disconnects_during_put_never_leave_a_partial_or_unlinked_save(server, client):
    rt = server.runtime
    inflight = support.InFlight(server.running.app)
    phases = Phases(rt)
    rng = random.Random(20240611)

    idle = (await client.create_thread(title="idle"))["id"]
    busy = (await client.create_thread(title="busy"))["id"]
    for tid in (idle, busy):
        turn = await client.start_turn(tid, "hello there")
        await wait_turn_end(client, tid, turn["id"])
    hang = await client.start_turn(busy, "/hang")
    threads = (idle, busy)
    revisions = {"sess-a": 0, "sess-b": 0}
    tally = {"completed": 0, "cancelled": 0}

    for iteration in range(30):
        sid = rng.choice(sorted(revisions))
        tid = rng.choice(threads)
        wait_for_idle = tid == busy and rng.random() < 0.3
        # Waiting for the busy thread's turn never reaches the commit: cancel it earlier.
        triggers = ["checkpoints", "checkpoints", "entered", "snapshot"] + (
            [] if wait_for_idle else ["commit", "never"])
        trigger = rng.choice(triggers)
        checkpoints = rng.randint(0, 250) if rng.random() < 0.8 else rng.randint(0, 8)
        phases.reset()
        result: dict[str, Any] = {}

        async with trio.open_nursery() as nursery:
            async def request():
                async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": "Bearer test-token"},
                                             timeout=E2E_LIMIT) as http:
                    response = await http.put("/v1/sessions", json={
                        "thread_id": tid, "session_id": sid, "wait_for_idle": wait_for_idle})
                result["status"], result["body"] = response.status_code, response.json()
                nursery.cancel_scope.cancel()

            async def disconnect():
                if trigger == "never":  # a control: the request runs to its response
                    return
                if trigger == "checkpoints":
                    for _ in range(checkpoints):
                        await trio.lowlevel.checkpoint()
                else:
                    await phases.events[trigger].wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(request)
            nursery.start_soon(disconnect)

        await inflight.settle()
        docs = await assert_consistent(rt)
        context = (iteration, sid, tid == busy, wait_for_idle, trigger, checkpoints, result.get("status"))
        now = docs[sid]["metadata"]["revision"] if sid in docs else 0
        assert now in (revisions[sid], revisions[sid] + 1), context
        if "status" in result:
            tally["completed"] += 1
            assert result["status"] == 200, (context, result)
            assert result["body"]["session"]["metadata"]["revision"] == now == revisions[sid] + 1, context
            assert result["body"]["turn_in_progress"] is (tid == busy)
        else:
            tally["cancelled"] += 1
        revisions[sid] = now
        assert await saved_revisions(rt, threads, sid) == list(range(1, now + 1)), context

    # The loop really exercised disconnects, and some requests completed.
    assert tally["cancelled"] >= 10 and tally["completed"] >= 1, tally

    # The engines still answer: snapshots and saves work on both threads, and the hanging turn
    # (which had waiters that gave up) still ends on request.
    for tid in threads:
        saved = await client.save_session(thread_id=tid, session_id="after")
        assert saved["session"]["messages"][:2] == [
            {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "You said: hello there"}]}]
    assert (await client.interrupt(busy, hang["id"]))["status"] == "interrupted"
    final = await client.save_session(thread_id=busy, session_id="after", wait_for_idle=True)
    assert final["turn_in_progress"] is False and len(final["session"]["messages"]) == 3
    await inflight.settle()
    docs = await assert_consistent(rt)
    for sid, doc in docs.items():
        assert json.loads(stored_bytes(server.data_dir, sid)) == doc
