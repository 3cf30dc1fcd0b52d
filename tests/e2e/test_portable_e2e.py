"""Moving a session between two real servers (two ``trio-runtime serve`` processes, two data dirs):
export from one, import into the other, and the document, its listing and its next turn are the same
there, whichever storage each server keeps its sessions in (--session-storage). Real sockets, real files,
the typed client; no sleeps."""

from __future__ import annotations

import json

import pytest

from tests import support
from tests.e2e.helpers import wait_turn_end
from tests.e2e.process import ServerProcess
from web.client import ApiError, AsyncClient


async def _turn(client: AsyncClient, thread_id: str, prompt: str) -> None:
    turn = await client.start_turn(thread_id, prompt)
    assert (await wait_turn_end(client, thread_id, turn["id"]))["payload"]["status"] == "completed"


def _stored(data_dir, storage: str, session_id: str) -> bytes:
    """The stored document as the server keeps it: its file, or its row in the store (session_docs)."""
    if storage == "files":
        return (data_dir / "sessions" / f"{session_id}.json").read_bytes()
    with support.store_connection(data_dir) as conn:
        return bytes(conn.execute("SELECT document FROM session_docs WHERE id = ?", (session_id,)).fetchone()[0])


# Each server's --session-storage: the document travels between the two storages unchanged too. On
# PostgreSQL sessions always live in the store: only store to store runs there.
@pytest.mark.parametrize("first_storage,second_storage",
                         [("files", "files"), ("files", "store"), ("store", "files"), ("store", "store")])
async def test_a_session_moves_to_another_server_and_back_unchanged(tmp_path, first_storage, second_storage):
    if support.on_postgresql() and "files" in (first_storage, second_storage):
        pytest.skip("on PostgreSQL sessions always live in the store: the store-to-store variant runs")
    first = await ServerProcess(tmp_path / "first", "--session-storage", first_storage).start()
    try:
        second = await ServerProcess(tmp_path / "second", "--session-storage", second_storage).start()
        try:
            async with AsyncClient(first.url, first.token) as a, AsyncClient(second.url, second.token) as b:
                thread = await a.create_thread(title="travelling", system_prompt="Be brief.")
                await _turn(a, thread["id"], "/think weighing it\nfirst question")
                await _turn(a, thread["id"], "second question")
                saved = await a.save_session(thread_id=thread["id"], session_id="trip")
                assert saved["session"]["metadata"]["revision"] == 1
                exported = await a.export_session("trip")
                assert exported == _stored(tmp_path / "first", first_storage, "trip")
                markdown = await a.export_session("trip", format="markdown")
                assert markdown.startswith("# travelling\n")
                assert "\n\n> **Thinking**\n>\n> weighing it\n\nYou said: first question\n\n" in markdown

                assert await b.import_session(exported) == {"session_id": "trip", "revision": 1}
                assert await b.export_session("trip") == exported  # revision 1: byte for byte
                assert _stored(tmp_path / "second", second_storage, "trip") == exported
                assert await b.export_session("trip", format="markdown") == markdown
                assert [s["id"] for s in await b.list_sessions(search="second question")] == ["trip"]
                with pytest.raises(ApiError) as info:
                    await b.import_session(exported)
                assert (info.value.status, info.value.code) == (409, "conflict")

                # The imported session resumes on the second server and its next turn sees the history.
                resumed = await b.resume_thread("trip")
                await _turn(b, resumed["thread_id"], "third question")
                again = await b.save_session(thread_id=resumed["thread_id"], session_id="trip")
                assert again["session"]["metadata"]["revision"] == 2
                assert len(again["session"]["messages"]) == 6

                # Back to the first server under a new id: equal to the second's except id and revision.
                travelled = await b.export_session("trip")
                assert await a.import_session(travelled, session_id="trip-back") == {
                    "session_id": "trip-back", "revision": 1}
                back = json.loads(await a.export_session("trip-back"))
                expected = json.loads(travelled)
                expected["metadata"].update(id="trip-back", revision=1)
                assert back == expected
                assert sorted(s["id"] for s in await a.list_sessions()) == ["trip", "trip-back"]
                assert (await a.health())["status"] == "ok" and (await b.health())["status"] == "ok"
                for data_dir, storage in ((tmp_path / "first", first_storage), (tmp_path / "second", second_storage)):
                    # Each server kept its sessions where it was told: no file at all in the store's case.
                    assert (data_dir / "sessions").exists() == (storage == "files")
        finally:
            second.kill()
            await second.wait()
    finally:
        first.kill()
        await first.wait()
