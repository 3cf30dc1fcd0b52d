"""Where session documents live (RuntimeConfig.session_storage, runtime/sessions/docs.py).

Every other test in tests/sessions runs with both storages; these pin what is particular to the choice:
a 10 MB document round trip through every route with each storage, what "store" leaves on disk (nothing),
what a data directory switched from files to the store shows, and how the storage is chosen.
"""

from __future__ import annotations

import types

import pytest

from runtime import codec
from runtime.errors import NotFound
from runtime.sessions import SessionService
from runtime.sessions.files import encode_document
from tests import support

from .conftest import LIMIT, dir_snapshot, run_turn, session_ids_listed, sessions_dir, stored_bytes

# Bigger than the 10 MB a session may reach in practice (docs/design.md, "Sessions").
BIG = 10 * 1000 * 1000


def big_document(session_id: str) -> dict:
    text = "Grüße, café ☕ 😀 " + "x" * 3300  # non-ASCII and an emoji: UTF-8 of 1, 2 and 4 bytes
    messages = [{"role": role, "content": [{"type": "text", "text": f"message {i} {text}"}]}
                for i, role in zip(range(3000), ["user", "assistant"] * 1500)]
    return {
        "schema_version": 1,
        "metadata": {"id": session_id, "title": "big one", "created_at": "2030-01-01T00:00:00.000Z",
                     "updated_at": "2030-01-01T00:00:00.000Z", "message_count": len(messages), "total_tokens": 7,
                     "model": "scripted", "workspace": None, "mode": "default", "archived": False, "revision": 4},
        "messages": messages,
        "system_prompt": "be brief",
    }


async def test_a_10_mb_session_round_trips_whole_through_every_route(rt, session_storage):
    doc = big_document("big")
    data = encode_document(doc)
    assert len(data) > BIG

    assert await rt.sessions.import_document(data, timeout=LIMIT) == {"session_id": "big", "revision": 1}
    doc["metadata"]["revision"] = 1  # an import is revision 1, every other byte as it was
    stored = encode_document(doc)
    assert stored_bytes(rt, "big") == stored
    assert await rt.sessions.read_document("big") == (stored, 1)
    assert (await rt.sessions.export("big", "json"))[0] == stored
    [listed] = await rt.sessions.list(limit=10, search="MESSAGE 2999 GRÜßE, CAFÉ ☕")
    assert (listed["id"], listed["size"], listed["message_count"]) == ("big", len(stored), 3000)

    patched = await rt.sessions.patch("big", title="renamed", timeout=LIMIT)
    assert patched["session"]["revision"] == 2
    after_patch = codec.loads(stored_bytes(rt, "big"))
    assert after_patch["messages"] == doc["messages"] and after_patch["metadata"]["title"] == "renamed"

    resumed = await rt.sessions.resume("big")
    assert resumed["message_count"] == 3000
    await run_turn(rt, resumed["thread_id"], "one more")
    saved = await rt.sessions.save(thread_id=resumed["thread_id"], session_id="big", timeout=LIMIT)
    assert saved["session"]["metadata"]["revision"] == 3
    again = codec.loads(stored_bytes(rt, "big"))
    assert again["messages"][:3000] == doc["messages"] and len(again["messages"]) == 3002
    assert saved["session"].encoded == stored_bytes(rt, "big")  # PUT's answer repeats the stored bytes

    if session_storage == "store":
        assert not sessions_dir(rt).exists()  # nothing on disk but the database
    await rt.sessions.delete("big", timeout=LIMIT)
    assert stored_bytes(rt, "big") is None and await session_ids_listed(rt) == []
    with pytest.raises(NotFound):
        await rt.sessions.read_document("big")


@pytest.mark.store_only
@pytest.mark.sqlite_only(reason="PostgreSQL always keeps sessions in the store: a data dir cannot switch from files")
async def test_switching_a_data_dir_from_files_to_the_store_lists_only_the_stores_sessions(open_rt, data_dir):
    """Session files are not moved into the store: with session_storage=store, their index rows (written
    while the directory kept files) are dropped at start, so nothing is listed that cannot be read; the
    files stay on disk untouched, and switching back finds them again."""
    async with open_rt(session_storage="files") as rt:
        tid = (await rt.create_thread())["id"]
        await run_turn(rt, tid, "hello there")
        await rt.sessions.save(thread_id=tid, session_id="on-disk", timeout=LIMIT)
    files = dir_snapshot(sessions_dir(data_dir))
    assert list(files) == ["on-disk.json"]

    async with open_rt(session_storage="store") as rt:
        assert await session_ids_listed(rt) == []
        with pytest.raises(NotFound):
            await rt.sessions.get("on-disk")
        await rt.sessions.save(thread_id=tid, session_id="in-store", timeout=LIMIT)
        assert await session_ids_listed(rt) == ["in-store"]
    with support.store_connection(data_dir) as conn:
        assert [row[0] for row in conn.execute("SELECT id FROM session_docs")] == ["in-store"]
    assert {p.name: p.read_bytes() for p in sessions_dir(data_dir).iterdir()} == files  # untouched

    async with open_rt(session_storage="files") as rt:
        assert await session_ids_listed(rt) == ["on-disk"]


def _host(storage: str, kind: str | None) -> types.SimpleNamespace:
    store = types.SimpleNamespace() if kind is None else types.SimpleNamespace(kind=kind)
    config = types.SimpleNamespace(session_storage=storage, sessions_dir=None, session_fs=None)
    return types.SimpleNamespace(config=config, store=store)


@pytest.mark.store_only
def test_the_storage_is_the_configured_one_and_always_the_store_on_postgresql():
    assert SessionService(_host("files", None)).storage == "files"
    assert SessionService(_host("store", None)).storage == "store"
    assert SessionService(_host("files", "sqlite")).storage == "files"
    # Files on one host's disk cannot be shared by several hosts: PostgreSQL always keeps them in the store.
    assert SessionService(_host("files", "postgresql")).storage == "store"
    with pytest.raises(ValueError, match="session_storage must be one of: files, store, not 'disk'"):
        SessionService(_host("disk", None))
    with pytest.raises(AttributeError, match="sessions are kept in the store, not in files"):
        SessionService(_host("store", None)).files
