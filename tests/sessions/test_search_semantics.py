"""Session search answers exactly as the plain ``LIKE`` scan did (issue 16: the trigram index).

Search moved from a scan of ``sessions.search_text`` to a trigram index (SQLite FTS5, PostgreSQL pg_trgm)
that only narrows the rows the same ``LIKE`` then checks. These tests pin the semantics on a corpus of
tricky strings: substring (not word) matches, Python's lower-casing of both sides (ß, İ, the Kelvin sign,
final sigma), ``%`` ``_`` ``\\`` taken literally, quotes and FTS query syntax taken as text, non-ASCII,
emoji, newlines, queries shorter than a trigram, NUL. Each query is checked twice: against concrete
expected sessions, and against the pre-index query itself (``ORACLE_SQL``, run on the same database), for
every sort order, with archived sessions and a limit; also after the sessions change (rename, archive,
delete, save in place), so the index follows every write.
"""

from __future__ import annotations

import pytest

from runtime.store.migrations import MIGRATIONS, SCHEMA_VERSION, migrate, statements
from tests import support

from .conftest import LIMIT, run_turn

# The search of the runtime before issue 16, verbatim: the reference every answer must equal.
# (The text is in ``session_texts`` since SQLite migration 11 / PG migration 4: by rowid on SQLite, by id on PG.)
ORACLE_SQL = ("SELECT id FROM sessions JOIN session_texts " + (
    "USING (id)" if support.on_postgresql() else "ON session_rowid = sessions.rowid")
    + " WHERE {archived} search_text LIKE ? ESCAPE '\\' ORDER BY {order} LIMIT ?")
ORDERS = {"recent": "updated_at DESC, id", "name": "LOWER(title) ASC, id", "size": "size DESC, id"}


def oracle_pattern(search: str) -> str:
    escaped = search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# name -> (title, prompt): the session's text is its title, the prompt and the reply "You said: <prompt>".
CORPUS = {
    "german": ("Straße notes", "Ärger ÜBER Öl und Fuß"),
    "percent": ("100% done_now", "literal wildcards: 50%_off and a__b"),
    "backslash": ("paths", "C:\\Temp\\new and a\\%b and \\\\server"),
    "kelvin": ("units", "the \u212a sign and degrees"),
    "turkish": ("İstanbul trip", "DIŞ kapı"),
    "emoji": ("party", "coffee ☕ time 🎉 party"),
    "cjk": ("東京タワー", "東京タワーの夜景はきれい"),
    "quotes": ("quoting", 'say "hello" and \'bye\' and ""double""'),
    "syntax": ("fts syntax", "alpha AND beta OR NOT gamma NEAR(x y) col:val * ^start (paren) -minus +plus"),
    "lines": ("lines", "line one\nline two\tcolumn"),
    "repeat": ("aaaa", "bbbbbb abab"),
    "combining": ("cafe\u0301 decomposed", "café precomposed"),
    "greek": ("ΟΔΟΣ", "ΣΟΦΙΑ σοφός"),
    "nul": ("nul", "before\x00after"),
    "plain": ("Quarterly BUDGET", "Review the budget"),
}

QUERIES = [
    # concrete words, any case
    "straße", "STRASSE", "strasse", "ärger über", "ÄRGER ÜBER ÖL", "fuß", "budget", "QUARTERLY bud",
    "you said: review", "review the budget", "no such text anywhere",
    # LIKE's wildcards and escape, taken literally
    "%", "_", "%%", "0%", "% d", "50%_", "%_o", "a__b", "a_b", "e_n", "\\", "\\\\", "\\t", "a\\%b", "c:\\temp",
    "\\%", "\\_", "ne_", "%done",
    # quotes and FTS5 query syntax are text
    '"', "'", '"hello"', "'bye'", '""double""', "and", "AND beta", "or not", "near(x", "*", "^start", "col:val",
    "(paren)", "-minus", "+plus", "x y)",
    # lower-casing: Kelvin sign, dotted I, dotless ı, final sigma, combining accents
    "\u212a sign", "k sign", "K SIGN", "İstanbul", "istanbul", "i̇stanbul", "diş", "DIŞ", "ı", "ΟΔΟΣ", "οδος",
    "οδοσ", "σοφός", "ΣΟΦΊΑ", "σοφια", "cafe\u0301", "café", "e\u0301 dec",
    # non-ASCII, emoji, CJK, whitespace and control characters
    "☕", "☕ time 🎉", "🎉", "タワー", "東京", "夜景は", "line one\nline", "\n", "\t", "one\nline", "two\tcol",
    "  ", " ", "before\x00", "\x00after", "after", "before",
    # shorter than a trigram, repeats
    "a", "é", "ab", "aa", "aaa", "aaaa", "aaaaa", "bbbbbb", "bbbbbbb", "abab", "baba",
    # long
    "alpha AND beta OR NOT gamma NEAR(x y) col:val * ^start (paren) -minus +plus", "x" * 300,
]

# A few answers spelled out (the oracle check covers every query): substring, case and literal rules.
EXPECTED = {
    "straße": {"german"},
    "STRASSE": set(),  # lower() keeps ß: no case folding to "ss"
    "ÄRGER ÜBER ÖL": {"german"},
    "you said: review": {"plain"},  # the reply's text is searched too
    "%": {"percent", "backslash"},
    "_": {"percent"},
    "a__b": {"percent"},
    "a_b": set(),  # _ is not a wildcard
    "\\": {"backslash"},
    "a\\%b": {"backslash"},
    '"hello"': {"quotes"},
    "AND beta": {"syntax"},
    "near(x": {"syntax"},
    "k sign": {"kelvin"},  # the Kelvin sign lower-cases to an ASCII k
    "istanbul": set(),  # İ lower-cases to i + combining dot
    "İstanbul": {"turkish"},
    "οδοσ": set(),  # a final sigma is lower-cased to ς
    "οδος": {"greek"},
    "cafe\u0301": {"combining"},
    "☕ time 🎉": {"emoji"},
    "タワー": {"cjk"},
    "line one\nline": {"lines"},
    "a": set(CORPUS) - {"nul"},  # every reply says "You said"; LIKE reads text up to a NUL
    "bbbbbbb": set(),
    "before": {"nul"},
    "after": set(),  # LIKE reads a text only up to its first NUL
    "x" * 300: set(),
}


def nul_free(texts):
    """PostgreSQL's text cannot hold NUL (a thread or a search with one fails there, as before issue 16):
    the NUL cases run on SQLite only."""
    if not support.on_postgresql():
        return texts
    return {k: v for k, v in texts.items() if "\x00" not in k + "".join(v)} if isinstance(texts, dict) else [
        t for t in texts if "\x00" not in t]


async def make_corpus(rt) -> dict[str, str]:
    """Name -> session id of a session per CORPUS entry, saved from a thread with one turn."""
    ids = {}
    for name, (title, prompt) in nul_free(CORPUS).items():
        tid = (await rt.create_thread())["id"]
        await run_turn(rt, tid, prompt)
        ids[name] = (await rt.sessions.rebuild(thread_id=tid, title=title, timeout=LIMIT))["session_id"]
    return ids


async def oracle(rt, search: str, *, sort: str = "recent", include_archived: bool = False, limit: int = 500
                 ) -> list[str]:
    sql = ORACLE_SQL.format(archived="" if include_archived else "archived = 0 AND", order=ORDERS[sort])

    def query(conn):
        return [row[0] for row in conn.execute(sql, (oracle_pattern(search), limit))]

    return await rt.store.read(query)


async def listed(rt, search: str, **kw) -> list[str]:
    return [m["id"] for m in await rt.sessions.list(limit=kw.pop("limit", 500), search=search, **kw)]


async def check_all(rt, ids: dict[str, str], expected: dict[str, set[str]]) -> int:
    names = {sid: name for name, sid in ids.items()}
    checked = 0
    for search in nul_free(QUERIES):
        got = await listed(rt, search)
        assert got == await oracle(rt, search), f"search {search!r}"
        if search in expected:
            assert {names[sid] for sid in got} == expected[search] & set(ids), f"search {search!r}"
        checked += 1
    return checked


@pytest.fixture(params=["by rowid", "by rowid off the loop", "index walk"])
def candidates_plan(request, monkeypatch) -> str:
    """Every plan of a search that uses the trigram index: the candidates fetched by rowid and sorted (at
    most FEW_CANDIDATES of them), on the loop when they are small, else in a worker thread; or the
    listing's index walked in order (more candidates)."""
    if request.param == "index walk":
        monkeypatch.setattr("runtime.sessions.service.FEW_CANDIDATES", 0)
    if request.param == "by rowid off the loop":
        monkeypatch.setattr("runtime.sessions.service.INLINE_SEARCH_BYTES", 0)
    return request.param


async def test_search_answers_as_the_like_scan_on_tricky_strings(rt, fake_now, candidates_plan):
    ids = await make_corpus(rt)
    assert await check_all(rt, ids, EXPECTED) == len(nul_free(QUERIES))
    # Every sort order, archived sessions and a limit give the scan's order and cut too.
    await rt.sessions.patch(ids["percent"], archived=True, timeout=LIMIT)
    for search in ("a", "%", "e", "ab", "the", "you said", "☕", "zzz"):
        for sort in ORDERS:
            for include_archived in (False, True):
                for limit in (1, 3, 500):
                    got = await listed(rt, search, sort=sort, include_archived=include_archived, limit=limit)
                    want = await oracle(rt, search, sort=sort, include_archived=include_archived, limit=limit)
                    assert got == want, (search, sort, include_archived, limit)
    assert await listed(rt, "%") == [ids["backslash"]]
    assert set(await listed(rt, "%", include_archived=True)) == {ids["percent"], ids["backslash"]}
    assert await listed(rt, "%", archived_only=True) == [ids["percent"]]


async def test_search_follows_renames_saves_and_deletes(rt, fake_now, candidates_plan):
    ids = await make_corpus(rt)
    # Rename: the old title no longer matches, the new one does.
    await rt.sessions.patch(ids["german"], title="Renamed zebra", timeout=LIMIT)
    assert await listed(rt, "straße") == []
    assert await listed(rt, "ZEBRA") == [ids["german"]]
    assert await listed(rt, "ärger über") == [ids["german"]]  # the messages stay
    # Delete: gone from every search.
    await rt.sessions.delete(ids["plain"], timeout=LIMIT)
    assert await listed(rt, "budget") == []
    # Save in place with new messages: the new text matches, and the old text still does (it is kept).
    tid = (await rt.create_thread())["id"]
    await run_turn(rt, tid, "first words")
    saved = (await rt.sessions.save(thread_id=tid, timeout=LIMIT))["session_id"]
    assert await listed(rt, "first words") == [saved]
    assert await listed(rt, "second words") == []
    await run_turn(rt, tid, "second words")
    await rt.sessions.save(thread_id=tid, session_id=saved, timeout=LIMIT)
    assert await listed(rt, "second words") == [saved]
    assert await listed(rt, "first words") == [saved]
    ids["saved"] = saved
    del ids["plain"]
    expected = {q: names for q, names in EXPECTED.items() if "plain" not in names and "german" not in names}
    expected["a"] = set(ids) - {"nul"}
    assert await check_all(rt, ids, expected) == len(nul_free(QUERIES))


@pytest.mark.files_only
async def test_search_finds_sessions_indexed_at_start(open_rt, data_dir, fake_now):
    """A session file written while the server was down is indexed by the start-up reconcile: search
    finds it (the index row and the search index are written together)."""
    async with open_rt() as rt:
        ids = await make_corpus(rt)
        path = rt.config.sessions_dir / f"{ids['plain']}.json"
    data = path.read_bytes().replace(b"Quarterly BUDGET", b"Quarterly PLANS!")
    path.write_bytes(data)
    async with open_rt() as rt:
        assert await listed(rt, "budget") == [ids["plain"]]  # the message text is unchanged
        assert await listed(rt, "quarterly plans!") == [ids["plain"]]
        assert await listed(rt, "quarterly budget") == []
        expected = {q: names for q, names in EXPECTED.items() if q != "QUARTERLY bud"}
        assert await check_all(rt, ids, expected) == len(nul_free(QUERIES))


# The SQLite schema version that adds the search index (found by content, not by number, so the test
# holds wherever the migration lands among others).
SEARCH_VERSION = next(n for n, script in enumerate(MIGRATIONS, 1) if "CREATE VIRTUAL TABLE sessions_search" in script)
# The one that moves the search text to a table of its own.
TEXTS_VERSION = next(n for n, script in enumerate(MIGRATIONS, 1) if "CREATE TABLE session_texts" in script)
SESSION_COLUMNS = ("id, title, created_at, updated_at, message_count, total_tokens, model, workspace, mode, archived,"
                   " revision, size, file_mtime_ns, search_text")


@pytest.mark.store_only
@pytest.mark.skipif(support.on_postgresql(), reason="SQLite's migration; tests/pg covers PostgreSQL's")
@pytest.mark.parametrize("before", ["the index", "the text table"])
async def test_the_migration_indexes_sessions_saved_before_it(open_rt, data_dir, tmp_path, fake_now, before):
    """A data dir at the schema version before the index (sessions saved before it existed), or before
    the search text moved to ``session_texts`` (SQLite migration 11, issue 16 bench row 9), opens at the
    current version with every session indexed: search answers as the scan did, and FTS5's own check
    finds the index whole."""
    version_before = (SEARCH_VERSION if before == "the index" else TEXTS_VERSION) - 1
    import sqlite3

    async with open_rt() as rt:
        ids = await make_corpus(rt)
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    conn = sqlite3.connect(old_dir / "runtime.sqlite3", isolation_level=None)
    try:
        for version in range(1, version_before + 1):
            for statement in statements(MIGRATIONS[version - 1]):
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version_before}")
        conn.execute("ATTACH DATABASE ? AS saved", (str(data_dir / "runtime.sqlite3"),))
        conn.execute(f"INSERT INTO sessions ({SESSION_COLUMNS}) SELECT {SESSION_COLUMNS}"
                     " FROM saved.sessions JOIN saved.session_texts ON session_rowid = saved.sessions.rowid")
        conn.execute("INSERT INTO session_docs SELECT * FROM saved.session_docs")
        conn.execute("DETACH DATABASE saved")
        assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == len(nul_free(CORPUS))
        has_index = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sessions_search'").fetchone()
        assert (has_index is None) == (before == "the index")
    finally:
        conn.close()

    async with support.open_runtime(old_dir) as rt:
        assert await check_all(rt, ids, EXPECTED) == len(nul_free(QUERIES))
        assert await listed(rt, "quarterly budget") == [ids["plain"]]
    conn = sqlite3.connect(old_dir / "runtime.sqlite3", isolation_level=None)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= SEARCH_VERSION
        triggers = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        assert {"session_texts_insert", "sessions_search_delete", "session_texts_update",
                "sessions_texts_delete"} <= triggers
        columns = {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}
        assert "search_text" not in columns
        assert conn.execute("SELECT COUNT(*) FROM session_texts").fetchone()[0] == len(nul_free(CORPUS))
        conn.execute("INSERT INTO sessions_search (sessions_search) VALUES ('integrity-check')")
        indexed = conn.execute("SELECT COUNT(*) FROM sessions_search WHERE sessions_search MATCH '\"udg\"'")
        assert indexed.fetchone()[0] == 1  # "budget"
        migrate(conn)  # a second start migrates nothing
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


async def test_a_search_that_reads_much_text_stays_off_the_event_loop(rt, fake_now, monkeypatch):
    """Only a search whose few candidates are small runs on the event loop (an inline read): a query too
    short for the index scans every text, and many or big candidates mean much text for the LIKE."""
    import runtime.sessions.service as service

    ids = await make_corpus(rt)
    reads: list[bool] = []
    original = rt.store.read

    async def read(fn, *, inline=False):
        reads.append(inline)
        return await original(fn, inline=inline)

    monkeypatch.setattr(rt.store, "read", read)

    async def where(search: str) -> str:
        reads.clear()
        got = await listed(rt, search)
        place = "loop" if reads[-1] else "thread"  # the read that answered
        assert got == await oracle(rt, search)
        return place

    indexed = rt.store.kind == "sqlite"
    assert await where("budget") == ("loop" if indexed else "thread")
    assert await listed(rt, "budget") == [ids["plain"]]
    assert await where("bu") == "thread"  # shorter than a trigram: scans
    monkeypatch.setattr(service, "INLINE_SEARCH_BYTES", 100)  # smaller than any session
    assert await where("budget") == "thread"
    monkeypatch.setattr(service, "INLINE_SEARCH_BYTES", 10**6)
    monkeypatch.setattr(service, "FEW_CANDIDATES", 0)
    assert await where("budget") == "thread"


@pytest.mark.skipif(support.on_postgresql(), reason="SQLite's FTS5 index; pg_trgm indexes every text")
async def test_a_long_session_is_searched_without_indexing_its_whole_text(rt, fake_now):
    """Tokenizing costs the writer ~0.1-0.2 s per MB (a changed 10 MB save took seconds with every text
    indexed), so a text over 32,768 characters is indexed as a marker only, and every search reads it: it
    is still found by text anywhere in it, also after it changes, and never by text it lost."""
    from runtime.sessions.service import LONG_TEXT_MARKER

    ids = await make_corpus(rt)
    tid = (await rt.create_thread())["id"]
    filler = "lorem ipsum dolor " * 2000  # 36,000 characters: over the limit
    await run_turn(rt, tid, filler + "qqzzy at the very end")
    long_id = (await rt.sessions.save(thread_id=tid, timeout=LIMIT))["session_id"]
    assert await listed(rt, "QQZZY AT THE VERY END") == [long_id]
    assert await listed(rt, "budget") == [ids["plain"]]  # short sessions by their trigrams, long one checked

    def indexed(term: str) -> list[int]:
        def query(conn):
            return [row[0] for row in conn.execute(
                "SELECT rowid FROM sessions_search WHERE sessions_search MATCH ?", (f'"{term}"',))]
        return query

    def rowid_of(conn):
        return conn.execute("SELECT rowid FROM sessions WHERE id = ?", (long_id,)).fetchone()[0]

    rowid = await rt.store.read(rowid_of)
    assert await rt.store.read(indexed("qzz")) == []  # its trigrams are not in the index ...
    assert await rt.store.read(indexed(LONG_TEXT_MARKER)) == [rowid]  # ... its marker is

    def kept(conn):  # what the index keeps of a row (deleted by rowid, it never reads the row's text)
        return conn.execute("SELECT search_text FROM sessions_search WHERE rowid = ?", (rowid,)).fetchone()[0]

    assert await rt.store.read(kept) == LONG_TEXT_MARKER
    await run_turn(rt, tid, "wxxyv appended later")
    await rt.sessions.save(thread_id=tid, session_id=long_id, timeout=LIMIT)
    assert await listed(rt, "wxxyv appended") == [long_id]
    assert await listed(rt, "qqzzy") == [long_id]
    await rt.sessions.delete(long_id, timeout=LIMIT)
    assert await listed(rt, "qqzzy") == []
    assert await rt.store.read(indexed(LONG_TEXT_MARKER)) == []  # deleted from the index with its marker
    assert await check_all(rt, ids, EXPECTED) == len(nul_free(QUERIES))
