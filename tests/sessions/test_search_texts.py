"""The search text's own table (``session_texts``, SQLite migration 11 / PostgreSQL migration 4) and the kept
text of a save (runtime/sessions/filedocs.py ``_same_text``; issue 16, bench row 9): a save keeps the stored
text only when the title and the messages' bytes are the ones it was made from, and a deleted session takes
its text along."""

from __future__ import annotations

import pytest

from runtime.sessions.filedocs import _same_text
from tests.sessions.conftest import LIMIT, run_turn


def _doc(title: str) -> dict:
    return {"metadata": {"title": title}}


# A file this process committed: its bytes, and the messages' span in them.
FILE = b'{"metadata":{},"messages":[{"text":"hello there"}]}'
SPAN = (FILE.index(b"["), FILE.index(b"]") + 1)
KEPT = (len(FILE), 123, "Title", *SPAN)


def test_the_kept_text_is_used_only_for_the_same_title_and_the_same_message_bytes():
    found = (FILE, None)
    assert _same_text(KEPT, (len(FILE), 123), found, _doc("Title"), FILE, SPAN)
    # Another title (the text starts with it), with the same messages.
    assert not _same_text(KEPT, (len(FILE), 123), found, _doc("Other"), FILE, SPAN)
    # Messages of the same length that differ in a byte: only the bytes tell.
    other = FILE.replace(b"hello there", b"hello where")
    assert len(other) == len(FILE)
    assert not _same_text(KEPT, (len(FILE), 123), found, _doc("Title"), other, SPAN)
    # Messages of another length.
    longer = FILE.replace(b"hello there", b"hello there!")
    assert not _same_text(KEPT, (len(FILE), 123), found, _doc("Title"), longer, (SPAN[0], SPAN[1] + 1))
    # The file is not the one committed (another size or mtime), or was not read, or nothing was kept.
    assert not _same_text(KEPT, (len(FILE), 124), found, _doc("Title"), FILE, SPAN)
    assert not _same_text(KEPT, (len(FILE), 123), None, _doc("Title"), FILE, SPAN)
    assert not _same_text(None, (len(FILE), 123), found, _doc("Title"), FILE, SPAN)


async def test_messages_that_change_but_keep_their_length_get_a_new_search_text(rt):
    # Two threads with the same title and replies of the same length, saved in turn to one session: the
    # second save's messages differ only in their bytes, and search must follow them.
    first, second = (await rt.create_thread(title="Same title"))["id"], (await rt.create_thread(title="Same title"))["id"]
    await run_turn(rt, first, "alpha kilo")
    await run_turn(rt, second, "bravo lima")
    await rt.sessions.save(thread_id=first, session_id="s", timeout=LIMIT)
    await rt.sessions.save(thread_id=first, session_id="s", timeout=LIMIT)  # kept: nothing changed
    assert [row["id"] for row in await rt.sessions.list(limit=10, search="alpha kilo")] == ["s"]
    await rt.sessions.save(thread_id=second, session_id="s", timeout=LIMIT)
    assert [row["id"] for row in await rt.sessions.list(limit=10, search="bravo lima")] == ["s"]
    assert await rt.sessions.list(limit=10, search="alpha kilo") == []


async def _texts(rt) -> int:
    return await rt.store.read(lambda conn: conn.execute("SELECT count(*) FROM session_texts").fetchone()[0])


@pytest.mark.parametrize("how", ["delete", "delete and save anew"])
async def test_a_deleted_session_takes_its_search_text_along(rt, how):
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "needle haystack")
    await rt.sessions.save(thread_id=tid, session_id="gone", timeout=LIMIT)
    assert await _texts(rt) == 1
    await rt.sessions.delete("gone", timeout=LIMIT)
    assert await _texts(rt) == 0
    assert await rt.sessions.list(limit=10, search="needle") == []
    if how == "delete and save anew":
        # The last row deleted, SQLite may give its rowid to the next session: no text of the old one is
        # found under it.
        other = (await rt.create_thread())["id"]
        await run_turn(rt, other, "fresh words")
        await rt.sessions.save(thread_id=other, session_id="new", timeout=LIMIT)
        assert await _texts(rt) == 1
        assert await rt.sessions.list(limit=10, search="needle") == []
        assert [row["id"] for row in await rt.sessions.list(limit=10, search="fresh words")] == ["new"]
