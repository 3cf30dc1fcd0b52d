"""What one save costs the event loop and the GIL (issue 16, row 3 of ``make bench``): fewer chunks in a
small PUT answer, unbuffered session files (no extra system calls per open), and no GIL hand-over while
a small document's search text is made. Counted, never timed; results are compared with what they were.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import threading

import pytest
import trio

from runtime import StorageFull
from runtime.sessions import docs as session_docs
from runtime.sessions import filedocs
from runtime.sessions.docs import INDEX_TEXT_SLICE, index_text
from runtime.sessions.files import FileSystem
from runtime.transcript import text_of
from tests import support
from tests.sessions.conftest import LIMIT, run_turn
from web.routes import sessions as session_routes


def _messages(count: int, text: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": [{"type": "text", "text": f"{i} {text}"}]}
            for i in range(count)]


async def _body(response) -> tuple[list[bytes], bytes]:
    """The chunks quart would send for ``response``, and their concatenation."""
    chunks = []
    async with response.response as body:
        async for chunk in body:
            chunks.append(chunk)
    return chunks, b"".join(chunks)


async def test_a_small_put_answer_is_one_body_and_a_big_one_goes_chunk_by_chunk():
    small_doc = json.dumps({"metadata": {"revision": 4}, "messages": _messages(20, "Grüße ☕")}).encode()
    fields = {"session_id": "s", "thread_id": "thr_1", "turn_in_progress": False, "session": None}
    chunks = session_routes._json_around(fields, "session", small_doc)
    response = session_routes._json_response(chunks, 4)
    sent, whole = await _body(response)
    assert len(sent) == 1  # was 3: head, document, "}" each a trip through hypercorn
    assert json.loads(whole) == {**fields, "session": json.loads(small_doc)}
    assert response.headers["Content-Length"] == str(len(whole)) and response.headers["ETag"] == '"4"'

    big_doc = b'{"messages":["' + b"x" * session_routes.JOIN_BELOW + b'"]}'
    chunks = session_routes._json_around(fields, "session", big_doc)
    response = session_routes._json_response(chunks, 5)
    sent, whole = await _body(response)
    assert sent == chunks and sent[1] is big_doc  # the stored bytes as they are, never copied into one buffer
    assert json.loads(whole)["session"] == json.loads(big_doc)
    assert response.headers["Content-Length"] == str(len(whole)) and response.headers["ETag"] == '"5"'


def test_session_files_are_written_and_read_unbuffered_and_whole(tmp_path, monkeypatch):
    """Unbuffered: one system call per open fewer each way. A raw write may take only part of the data,
    so write_data loops; checked with a file that takes 7 bytes per call."""
    fs = FileSystem()
    seen = []

    class Trickle(FileSystem):
        def write_data(self, f, data):
            seen.append(type(f))
            real = f.write
            f = type("Trickling", (), {"write": lambda _self, view: real(view[:7]), "fileno": f.fileno})()
            super().write_data(f, data)

    data = ("Grüße ☕ " * 1000).encode()
    tmp = Trickle().stage(tmp_path / "s.json", data)
    assert seen == [io.FileIO]
    assert tmp.read_bytes() == data
    opened = []
    real_open = open

    def spy_open(*args, **kwargs):
        f = real_open(*args, **kwargs)
        opened.append(type(f))
        return f

    monkeypatch.setattr(builtins, "open", spy_open)
    assert fs.read_bytes(tmp) == data
    monkeypatch.undo()
    assert opened == [io.FileIO]


def test_a_small_documents_search_text_offers_the_gil_to_no_one(monkeypatch):
    offers = []
    monkeypatch.setattr(session_docs.codec, "let_others_run", lambda: offers.append(1))
    small = _messages(20, "Héllo WORLD")
    text = index_text("Tïtle", small)
    assert offers == []  # was one per message, and the first slept (a GIL hand-over) in every save
    assert text == "\n".join(["tïtle", *(text_of(m).lower() for m in small)]).encode("utf-8")

    big = _messages(400, "Ü" * 2000)  # ~1.6 MB of UTF-8 text: offered about every INDEX_TEXT_SLICE bytes
    text = index_text("T", big)
    assert text == "\n".join(["t", *(text_of(m).lower() for m in big)]).encode("utf-8")
    assert len(text) // INDEX_TEXT_SLICE - 1 <= len(offers) <= len(text) // INDEX_TEXT_SLICE + 1


async def test_a_save_writes_its_threads_row_only_when_the_link_changes(rt):
    """Writing the thread's row rewrites its whole record, base messages too (~35 ms for a thread resumed
    from a 10 MB session, row 9 of ``make bench``): a save of an already linked thread leaves it alone. Counted
    by a trigger on ``threads.session_id`` (SQLite: PostgreSQL has the same statement, and other tests
    check the links it makes)."""
    if support.on_postgresql():
        pytest.skip("counts row writes with an SQLite trigger")
    first, second = (await rt.create_thread())["id"], (await rt.create_thread())["id"]
    await run_turn(rt, first, "hello there")
    await run_turn(rt, second, "something else")

    def count_link_writes(conn) -> None:
        conn.execute("CREATE TABLE link_writes (thread_id TEXT)")
        conn.execute("CREATE TRIGGER count_link_writes AFTER UPDATE OF session_id ON threads"
                     " BEGIN INSERT INTO link_writes VALUES (new.id); END")

    await rt.store.write(fn=count_link_writes)

    async def writes() -> list[str]:
        return await rt.store.read(lambda conn: [row[0] for row in conn.execute("SELECT thread_id FROM link_writes")])

    async def linked(thread_id: str) -> str | None:
        return (await rt.thread_record(thread_id))["session_id"]

    await rt.sessions.save(thread_id=first, session_id="one", timeout=LIMIT)  # links the thread
    assert await writes() == [first] and await linked(first) == "one"
    for _ in range(2):  # saves in place of the linked thread: nothing to write
        await rt.sessions.save(thread_id=first, session_id="one", timeout=LIMIT)
    assert await writes() == [first] and await linked(first) == "one"
    await rt.sessions.save(thread_id=second, session_id="one", timeout=LIMIT)  # another thread, linked now
    await rt.sessions.save(thread_id=first, session_id="two", timeout=LIMIT)  # the thread moves to another session
    assert await writes() == [first, second, first]
    assert (await linked(first), await linked(second)) == ("two", "one")
    rebuilt = await rt.sessions.rebuild(thread_id=second, timeout=LIMIT)  # POST: a new session, a new link
    assert await writes() == [first, second, first, second] and await linked(second) == rebuilt["session_id"]


@pytest.mark.files_only
async def test_a_save_puts_its_file_in_place_before_it_asks_the_writer(rt, monkeypatch):
    """The replace and its directory fsync run in the save's staging thread, before the writer's request
    (which then only writes rows): in the writer they ran one save after another (~5 ms each under row 3's
    50 connections, the writer busy all the time). The COMMIT still follows the durable rename
    (tests/faults/test_session_faults.py checks the whole order)."""
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "hello there")
    fs, store_write, log = rt.sessions.files.fs, rt.store.write, []
    for name in ("link", "replace", "fsync_dir"):
        def logged(*args, _name=name):
            log.append(_name)
            return getattr(FileSystem, _name)(fs, *args)

        monkeypatch.setattr(fs, name, logged)

    async def write(*args, **kwargs):
        log.append("store.write")
        return await store_write(*args, **kwargs)

    monkeypatch.setattr(rt.store, "write", write)
    for revision in (1, 2):  # create, then update in place
        log.clear()
        saved = await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
        assert saved["session"]["metadata"]["revision"] == revision
        assert log == ["link", "fsync_dir", "replace", "fsync_dir", "store.write"]
    monkeypatch.undo()
    assert (await rt.sessions.get("s"))["metadata"]["revision"] == 2
    assert [s["revision"] for s in await rt.sessions.list(limit=10)] == [2]


# A pure function (no Runtime, no storage): the session_storage parametrization ran it twice, and once more in
# the PostgreSQL pass, the same ~3 s each time. files_only runs it once (the store and PostgreSQL runs skip it).
@pytest.mark.files_only
def test_the_search_text_is_lower_cased_exactly_as_str_lower_does():
    """``lower_utf8`` sends only the non-ASCII runs through ``str.lower`` (which lower-cases a whole
    non-ASCII string through the Unicode tables, ~140 ms for 12 MB): the bytes must be exactly
    ``str.lower``'s, for every code point, next to ASCII letters, marks and other non-ASCII characters,
    and with Greek capital sigma, whose lower case depends on its neighbours."""
    every = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and c != 0x3A3]
    for joint in ("", "A", " ", "é", "\u0301"):
        text = joint.join(every)
        assert session_docs.lower_utf8(text) == text.lower().encode("utf-8")
    for text in ("ΣΑΣ", "AΣ", "aΣ b", "Σ", "ΌΣΟΣ. ΣΑ", "x\u0301Σ\u0301", "café ΟΔΟΣ", "KELVIN \u212a ΣΑΣ İ"):
        assert session_docs.lower_utf8(text) == text.lower().encode("utf-8"), text
        assert session_docs.lower_utf8(text * 3) == (text * 3).lower().encode("utf-8"), text
    messages = [{"role": "user", "content": [{"type": "text", "text": "Grüße ☕ ÀÉÎ Hello ΟΔΟΣ"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "İstanbul \u212aelvin STRASSE ẞ"}]}]
    assert index_text("Café TITLE", messages) == "\n".join(
        ["Café TITLE".lower(), *(text_of(m).lower() for m in messages)]).encode("utf-8")
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate fails as ``encode`` does
        session_docs.lower_utf8("A\ud800b")


def _logged_reads(rt, monkeypatch) -> list[tuple[str, bool]]:
    """(function name, inline) of every store read from here on."""
    reads, read = [], rt.store.read

    async def logged(fn, *, inline=False):
        reads.append((getattr(fn, "func", fn).__name__, inline))
        return await read(fn, inline=inline)

    monkeypatch.setattr(rt.store, "read", logged)
    return reads


@pytest.mark.files_only
async def test_a_save_in_place_takes_the_index_row_it_committed_instead_of_reading_it_on_the_loop(rt, monkeypatch):
    """The inline read of the index row was three SQLite calls on the event loop per save, each handing the
    GIL to a worker thread and waiting to get it back (row 3 of ``make bench``). The row a save committed is
    the database's until the session's next change, which drops it first."""
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "hello there")
    await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
    reads = _logged_reads(rt, monkeypatch)
    for revision in (2, 3):
        saved = await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
        assert saved["session"]["metadata"]["revision"] == revision
    assert ("index_row", True) not in reads, reads
    monkeypatch.undo()
    assert [(s["id"], s["revision"]) for s in await rt.sessions.list(limit=10)] == [("s", 3)]
    assert (await rt.sessions.get("s"))["metadata"]["revision"] == 3


@pytest.mark.files_only
async def test_after_a_failed_save_and_a_file_changed_behind_the_index_a_save_reads_what_is_stored(rt, monkeypatch):
    """The kept index row never outlives a change that did not commit, and the file is still compared
    with it: a save after a failed one, and after the file changed on disk, counts from what is stored."""
    from runtime.errors import StorageError
    from runtime.sessions import filedocs

    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "hello there")
    await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
    journal = filedocs._journal

    def failing(conn, change, retired):
        raise StorageError("disk I/O error")

    monkeypatch.setattr(filedocs, "_journal", failing)
    with pytest.raises(StorageError):
        await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
    monkeypatch.setattr(filedocs, "_journal", journal)
    assert (await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT))["session"]["metadata"]["revision"] == 2

    path = rt.config.sessions_dir / "s.json"
    doc = json.loads(path.read_bytes())
    doc["metadata"].update(revision=7, title="edited by hand")
    path.write_bytes(json.dumps(doc, indent=1).encode())
    saved = (await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT))["session"]["metadata"]
    assert (saved["revision"], saved["title"]) == (8, "edited by hand")
    listed = await rt.sessions.list(limit=10)
    assert [(s["id"], s["revision"], s["title"]) for s in listed] == [("s", 8, "edited by hand")]


@pytest.mark.files_only
async def test_a_change_names_itself_without_asking_the_kernel_for_randomness(rt, monkeypatch):
    """uuid4 read 16 bytes from the kernel for every change's token, on the event loop (a system call that
    hands the GIL over and waits for it back). Tokens are still unique, 32 hex digits, one prefix per
    process (so unique across restarts too)."""
    import os

    from runtime.sessions import files as session_files

    calls = []
    urandom = os.urandom
    monkeypatch.setattr(os, "urandom", lambda n: calls.append(n) or urandom(n))
    changes = [rt.sessions.files.change("s") for _ in range(1000)]
    assert calls == []
    tokens = {change.token for change in changes}
    assert len(tokens) == 1000 and all(len(t) == 32 and int(t, 16) >= 0 for t in tokens)
    assert {t[:16] for t in tokens} == {session_files._TOKEN_PREFIX}


async def test_a_save_that_keeps_the_search_text_leaves_the_trigram_index_alone(rt):
    """Migration 10: the update trigger re-tokenizes a row only when its text changed; every save's upsert
    sets the column, so a save in place re-indexed an unchanged text in the single writer (row 3 of
    ``make bench``). FTS5 writes a new segment (and bumps its structure record) for each row it indexes,
    so its data table is compared. A changed text is still re-indexed and found."""
    if support.on_postgresql():
        pytest.skip("SQLite's trigram index (PostgreSQL's pg_trgm index has no trigger)")
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "hello there")
    await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)

    async def fts_data() -> list[tuple]:
        return await rt.store.read(lambda conn: [tuple(row) for row in conn.execute(
            "SELECT id, block FROM sessions_search_data ORDER BY id")])

    before = await fts_data()
    for revision in (2, 3):  # the same messages and title: the same search text
        saved = await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
        assert saved["session"]["metadata"]["revision"] == revision
    assert await fts_data() == before

    await run_turn(rt, tid, "zebra crossing")  # a new message: a new text, re-indexed
    await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
    assert await fts_data() != before
    assert [s["id"] for s in await rt.sessions.list(limit=10, search="zebra cross")] == ["s"]
    assert [s["id"] for s in await rt.sessions.list(limit=10, search="hello the")] == ["s"]


@pytest.mark.files_only
async def test_a_save_in_place_checks_its_file_in_the_staging_thread_not_in_a_hop_of_its_own(rt, monkeypatch):
    """With the index row it committed, a save without If-Match reads and compares the file in its staging
    (before it writes anything) instead of a worker-thread job of its own before the engine snapshot
    (row 3 of ``make bench``). With If-Match the file is read before the
    check, as before; a file changed behind the index is the other test's (above)."""
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "hello there")
    await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
    jobs, run_sync = [], trio.to_thread.run_sync

    async def counted(fn, *args, **kwargs):
        jobs.append(getattr(fn, "__name__", repr(fn)))
        return await run_sync(fn, *args, **kwargs)

    stager = rt.sessions._file_docs.stager
    staged = stager.run

    async def counted_stage(steps):
        jobs.append("stage")  # the save's staging, run by the group stager (runtime/sessions/staging.py)
        return await staged(steps)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    monkeypatch.setattr(stager, "run", counted_stage)
    saved = await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT)
    assert saved["session"]["metadata"]["revision"] == 2
    assert jobs.count("load") == 0 and jobs.count("stage") == 1, jobs
    jobs.clear()
    saved = await rt.sessions.save(thread_id=tid, session_id="s", if_match=2, timeout=LIMIT)
    assert saved["session"]["metadata"]["revision"] == 3
    assert jobs.count("load") == 1 and jobs.count("stage") == 1, jobs
    monkeypatch.undo()
    assert (await rt.sessions.get("s"))["metadata"]["revision"] == 3


def _big_document(session_id: str) -> bytes:
    """A session document of ~1.3 MB (over PARALLEL_SEARCH_TEXT_BYTES), one message with a findable word."""
    messages = _messages(400, "Grüße " * 500)
    messages[123]["content"][0]["text"] += " NeedleWord"
    return json.dumps({"schema_version": 1, "metadata": {
        "id": session_id, "title": "Big", "created_at": "2030-01-01T00:00:00.000Z", "updated_at": "2030-01-01T00:00:00.000Z",
        "message_count": len(messages), "total_tokens": 0, "model": "scripted", "workspace": None, "mode": "default",
        "archived": False, "revision": 1}, "messages": messages, "system_prompt": None}).encode()


@pytest.mark.files_only
async def test_a_big_documents_search_text_is_made_while_its_file_is_written(rt, monkeypatch):
    """Bench row 9 (a 10.6 MB save): the search text (~9 ms) and writing + fsyncing the file (~7 ms) ran one
    after the other in the staging thread. Now a big document's text is made in a thread of its own from the
    start: here the temp file's fsync waits until the text is being made, which never happened before the
    fsync (the wait ran out). A small document's text is still made by the staging thread itself."""
    assert len(_big_document("big")) >= filedocs.PARALLEL_SEARCH_TEXT_BYTES
    making, seen = threading.Event(), {}
    real_index_text, real_fsync = filedocs.index_text, rt.sessions.files.fs.fsync_file

    def spy_index_text(title, messages):
        seen.setdefault("text", []).append(threading.get_ident())
        making.set()
        return real_index_text(title, messages)

    def fsync_file(f):
        seen.setdefault("fsync", []).append(threading.get_ident())
        if seen.get("wait", True):
            seen["overlapped"] = making.wait(timeout=LIMIT)
        real_fsync(f)

    monkeypatch.setattr(filedocs, "index_text", spy_index_text)
    monkeypatch.setattr(rt.sessions.files.fs, "fsync_file", fsync_file)
    await rt.sessions.import_document(_big_document("big"), timeout=LIMIT)
    assert seen["overlapped"] and seen["text"][0] != seen["fsync"][0]
    assert [row["id"] for row in await rt.sessions.list(limit=10, search="needleword")] == ["big"]

    seen.clear()
    seen["wait"] = False
    thread = (await rt.create_thread())["id"]
    await run_turn(rt, thread, "a small one")
    await rt.sessions.save(thread_id=thread, session_id="small", timeout=LIMIT)
    assert seen["text"] == seen["fsync"]  # one thread for both: no extra thread job for a small save
    assert [row["id"] for row in await rt.sessions.list(limit=10, search="small one")] == ["small"]


@pytest.mark.files_only
async def test_a_big_save_whose_file_fails_reports_the_disk_error_and_changes_nothing(rt, monkeypatch):
    """The search text's thread of a big save runs beside the file steps; when they fail, the failure is the
    one reported and nothing is left (the staging thread waits for the text's thread before it raises)."""
    def enospc(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rt.sessions.files.fs, "fsync_file", enospc)
    with pytest.raises(StorageFull, match="no space left on device"):
        await rt.sessions.import_document(_big_document("big"), timeout=LIMIT)
    assert await rt.sessions.list(limit=10) == []
    assert sorted(p.name for p in rt.config.sessions_dir.iterdir()) == []
    monkeypatch.undo()
    await rt.sessions.import_document(_big_document("big"), timeout=LIMIT)
    assert [row["id"] for row in await rt.sessions.list(limit=10, search="needleword")] == ["big"]


@pytest.mark.files_only
async def test_a_save_with_the_same_title_and_messages_neither_makes_nor_writes_its_search_text(rt, monkeypatch):
    """Bench row 9 (a 10.6 MB session saved in place): the search text was made (~9 ms) and written again by
    every save, and its row's UPDATE read the whole old text back (~9 ms). Now a save without If-Match whose
    file is the one this process committed, with the same title and the same messages' bytes, keeps the
    stored text (``KEEP_TEXT``: ``session_texts`` is not written). Any other save makes and writes it, and
    search follows every change."""
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "hello there")
    made, written = [], []
    real_index_text, real_upsert = filedocs.index_text, filedocs.upsert_index

    def spy_index_text(title, messages):
        made.append(title)
        return real_index_text(title, messages)

    def spy_upsert(conn, doc, size, mtime_ns, search_text=None):
        written.append(search_text is not session_docs.KEEP_TEXT)
        return real_upsert(conn, doc, size, mtime_ns, search_text)

    monkeypatch.setattr(filedocs, "index_text", spy_index_text)
    monkeypatch.setattr(filedocs, "upsert_index", spy_upsert)

    async def save(**kw) -> None:
        made.clear()
        written.clear()
        await rt.sessions.save(thread_id=tid, session_id="s", timeout=LIMIT, **kw)

    async def found(text: str) -> list[str]:
        return [s["id"] for s in await rt.sessions.list(limit=10, search=text)]

    async def stored_text() -> str:
        return await rt.store.read(lambda conn: conn.execute(
            "SELECT search_text FROM session_texts WHERE session_rowid = (SELECT rowid FROM sessions WHERE id = 's')"
        ).fetchone()[0])

    await save()
    assert made and written == [True]  # a new session
    for _ in range(2):
        await save()
        assert made == [] and written == [False]
    assert await found("hello the") == ["s"]

    await run_turn(rt, tid, "zebra crossing")  # new messages: a new text
    await save()
    assert made and written == [True]
    assert await found("zebra cross") == ["s"]

    made.clear()
    await rt.sessions.patch("s", title="Quarterly plans", timeout=LIMIT)  # a new title: the PATCH makes its text
    assert made == ["Quarterly plans"]
    await save()  # the PATCH's file, title and messages: its text is kept
    assert made == [] and written == [False]
    assert await found("quarterly plans") == ["s"] and await found("zebra cross") == ["s"]
    text = await stored_text()
    assert text.startswith("quarterly plans\n") and "zebra crossing" in text

    await save(if_match=6)  # with If-Match the staging thread does not read the file: made as before
    assert made and written == [True]

    # A file changed behind the index: the save starts over from the file and makes the text again.
    path = rt.config.sessions_dir / "s.json"
    path.write_bytes(path.read_bytes().replace(b"zebra crossing", b"zebra CROSSING"))
    await save()
    assert made and written == [True]
    assert await found("zebra cross") == ["s"]
