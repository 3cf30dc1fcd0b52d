"""The SQLite schema and its migrations, versioned with ``PRAGMA user_version``."""

from __future__ import annotations

import sqlite3

# Each entry upgrades the schema from version i to i + 1; never edit a shipped entry, append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE threads (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        model TEXT NOT NULL,
        workspace TEXT,
        mode TEXT NOT NULL,
        archived INTEGER NOT NULL DEFAULT 0,
        title TEXT,
        system_prompt TEXT,
        latest_turn_id TEXT,
        session_id TEXT,
        base_messages TEXT,
        base_tokens INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX threads_by_update ON threads (updated_at DESC, id DESC);
    CREATE TABLE turns (
        id TEXT PRIMARY KEY,
        thread_id TEXT NOT NULL REFERENCES threads (id),
        ord INTEGER NOT NULL,
        status TEXT NOT NULL,
        input_summary TEXT NOT NULL,
        created_at TEXT NOT NULL,
        started_at TEXT,
        ended_at TEXT,
        duration_ms INTEGER,
        input_tokens INTEGER,
        output_tokens INTEGER,
        error TEXT,
        steer_count INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX turns_by_thread ON turns (thread_id, ord);
    CREATE INDEX turns_active ON turns (status) WHERE status IN ('queued', 'in_progress');
    CREATE TABLE items (
        id TEXT PRIMARY KEY,
        turn_id TEXT NOT NULL REFERENCES turns (id),
        thread_id TEXT NOT NULL,
        ord INTEGER NOT NULL,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        summary TEXT NOT NULL,
        detail TEXT,
        metadata TEXT,
        started_at TEXT,
        ended_at TEXT
    );
    CREATE INDEX items_by_thread ON items (thread_id, ord);
    CREATE INDEX items_active ON items (status) WHERE status IN ('queued', 'in_progress');
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        thread_id TEXT NOT NULL,
        turn_id TEXT,
        item_id TEXT,
        event TEXT NOT NULL,
        timestamp TEXT NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE INDEX events_by_thread ON events (thread_id, seq);
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        message_count INTEGER NOT NULL,
        total_tokens TEXT NOT NULL,
        model TEXT,
        workspace TEXT,
        mode TEXT,
        archived INTEGER NOT NULL DEFAULT 0,
        revision INTEGER NOT NULL,
        size INTEGER NOT NULL,
        file_mtime_ns INTEGER NOT NULL,
        search_text TEXT NOT NULL
    );
    CREATE INDEX sessions_by_update ON sessions (archived, updated_at DESC);
    """,
    # 2: session files are now validated block by block (issue 11). Forget the recorded mtimes so the
    # start-up reconcile parses every file once more and drops from the index those it now refuses.
    """
    UPDATE sessions SET file_mtime_ns = -1;
    """,
    # 3: the session change journal (runtime/sessions/files.py): a row, committed in the same transaction
    # as a session file change's index row and thread link, says that change committed. Recovery keeps
    # a change whose row exists and rolls back any other; rows are deleted once their undo file is gone.
    """
    CREATE TABLE session_commits (
        token TEXT PRIMARY KEY,
        session_id TEXT NOT NULL
    );
    CREATE INDEX session_commits_by_session ON session_commits (session_id);
    """,
    # 4: history control and idempotency (issue 12). A rewound turn stays in the store (its events stay in
    # the log) but leaves the live history; ``retry_of`` names the turn a retry replaced; ``forked_from`` is
    # the JSON ``{thread_id, through_turn_id}`` of a fork. An idempotency record is the stored answer of a
    # request made with an ``Idempotency-Key``, written in the same transaction as the change it made.
    """
    ALTER TABLE turns ADD COLUMN rewound INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE turns ADD COLUMN retry_of TEXT;
    ALTER TABLE threads ADD COLUMN forked_from TEXT;
    CREATE TABLE idempotency (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        status INTEGER NOT NULL,
        headers TEXT NOT NULL,
        body BLOB NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL
    );
    CREATE INDEX idempotency_by_expiry ON idempotency (expires_at);
    """,
    # 5: tools and approvals (issue 13). A thread's approval policy and the tools a client allowed for
    # the rest of it ("remember"); an approval is a stored record with a wall-clock deadline, so a pending
    # one outlives the process. A turn or a tool_call item waiting for one has status 'awaiting_approval'.
    """
    ALTER TABLE threads ADD COLUMN approval_policy TEXT NOT NULL DEFAULT 'ask';
    ALTER TABLE threads ADD COLUMN allowed_tools TEXT;
    CREATE TABLE approvals (
        id TEXT PRIMARY KEY,
        thread_id TEXT NOT NULL,
        turn_id TEXT NOT NULL,
        item_id TEXT NOT NULL,
        tool TEXT NOT NULL,
        input TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        resolved_at TEXT,
        decided_by TEXT,
        message TEXT
    );
    CREATE INDEX approvals_by_thread ON approvals (thread_id, created_at);
    CREATE INDEX approvals_pending ON approvals (created_at) WHERE status = 'pending';
    """,
    # 6: the mcp.json change journal (runtime/mcp/changes.py; issue 17): a row, committed in the same
    # transaction as a change's idempotency record, says that change of mcp.json committed. Recovery keeps
    # a change whose row exists and rolls back any other.
    """
    CREATE TABLE mcp_commits (
        token TEXT PRIMARY KEY
    );
    """,
    # 7: sessions in the database (issue 15; RuntimeConfig.session_storage = "store"): each session's whole
    # document (the bytes a session file would hold), written in the same transaction as its ``sessions``
    # index row, so a change is all or nothing by the database alone. Empty with session files.
    """
    CREATE TABLE session_docs (
        id TEXT PRIMARY KEY,
        revision INTEGER NOT NULL,
        document BLOB NOT NULL,
        size INTEGER NOT NULL,
        updated_at TEXT NOT NULL
    );
    """,
    # 8: a trigram index of the session search text (issue 16): FTS5's trigram tokenizer indexes every run
    # of three characters, so a substring search of 3 characters or more reads the few rows holding all of
    # the query's trigrams instead of every row's text; the same LIKE then checks those rows, so the answers
    # are the scan's (runtime/sessions/service.py, ``SessionService.list``). Tokenizing costs ~0.1-0.2 s per
    # MB in the writer (measured: a changed 10 MB save took 1.7-2.7 s instead of 0.03), so only a text of
    # at most 32,768 characters is indexed (``substr(t, 32769, 1) = ''`` reads no further than that); a
    # longer one is indexed as the marker U+FDD0 U+FDD1 U+FDD2 (three Unicode noncharacters), which every
    # search also matches: long sessions stay candidates whose text the LIKE reads, as before. The table
    # keeps its own copy of what it indexed (at most 32,768 characters a row), so a row leaves it by rowid:
    # the triggers never read a replaced or deleted row's text (a 10 MB one cost a save tens of ms). They
    # write the index in the same statement, so in the same transaction, as every insert, update and delete
    # of an index row (saves, renames, deletes, the start-up reconcile, bench/datagen.py); the INSERT ...
    # SELECT indexes the rows already there. detail='none': no positions (a tenth of the size of the full
    # index); the LIKE does the exact check. Case-insensitive (the default): search_text is already
    # lower-cased, and folding only adds candidates.
    """
    CREATE VIRTUAL TABLE sessions_search USING fts5 (search_text, tokenize = 'trigram', detail = 'none');
    INSERT INTO sessions_search (rowid, search_text) SELECT rowid, CASE WHEN substr(search_text, 32769, 1) = ''
        THEN search_text ELSE char(64976, 64977, 64978) END FROM sessions;
    CREATE TRIGGER sessions_search_insert AFTER INSERT ON sessions BEGIN
        INSERT INTO sessions_search (rowid, search_text) VALUES (new.rowid, CASE WHEN
            substr(new.search_text, 32769, 1) = '' THEN new.search_text ELSE char(64976, 64977, 64978) END);
    END;
    CREATE TRIGGER sessions_search_delete AFTER DELETE ON sessions BEGIN
        DELETE FROM sessions_search WHERE rowid = old.rowid;
    END;
    CREATE TRIGGER sessions_search_update AFTER UPDATE OF search_text ON sessions BEGIN
        DELETE FROM sessions_search WHERE rowid = old.rowid;
        INSERT INTO sessions_search (rowid, search_text) VALUES (new.rowid, CASE WHEN
            substr(new.search_text, 32769, 1) = '' THEN new.search_text ELSE char(64976, 64977, 64978) END);
    END;
    """,
    # 9: one huge thread as cheap as a small one (issue 16). ``items_by_turn``: a page of a thread's turns
    # reads just those turns' items (GET /v1/threads/{id} pages its turns). ``thread_states``: an engine's
    # compact boundary state, the thread's messages (base and live items folded, runtime.transcript) through
    # the live turns with ``ord <= through_turn_ord`` and the token total then; an engine starts from it and
    # folds only the later turns' items (records.engine_state). Written by the engine, in its write lane
    # (runtime/engine/engine.py, _checkpoint); deleted by any change of the history it folds (history._rewind).
    """
    CREATE INDEX items_by_turn ON items (turn_id, ord);
    CREATE TABLE thread_states (
        thread_id TEXT PRIMARY KEY,
        through_turn_ord INTEGER NOT NULL,
        total_tokens INTEGER NOT NULL,
        messages TEXT NOT NULL
    );
    """,
    # 10: a save whose search text did not change leaves the trigram index alone (issue 16, row 3 of ``make
    # bench``: 50 connections saving sessions in place). ``AFTER UPDATE OF search_text`` fires whenever the
    # column is in the SET list, and every save's upsert sets it, so each save deleted and re-tokenized its
    # row in the single writer: ~0.3 ms of the writer's ~1 ms per save there. Comparing the old and the new
    # text costs one memcmp.
    """
    DROP TRIGGER sessions_search_update;
    CREATE TRIGGER sessions_search_update AFTER UPDATE OF search_text ON sessions
        WHEN old.search_text IS NOT new.search_text BEGIN
        DELETE FROM sessions_search WHERE rowid = old.rowid;
        INSERT INTO sessions_search (rowid, search_text) VALUES (new.rowid, CASE WHEN
            substr(new.search_text, 32769, 1) = '' THEN new.search_text ELSE char(64976, 64977, 64978) END);
    END;
    """,
    # 11: the search text in a table of its own (issue 16, bench row 9: a 10.6 MB session saved in place).
    # In the ``sessions`` row, every save's UPDATE of that row (revision, updated_at, size, mtime) read the
    # whole old text back through its overflow pages to build the new record, even when the text was not
    # changed: ~9 ms of the writer for 10 MB (an UPDATE of one small column of such a row costs the same).
    # Now the row is small, and a save whose text did not change does not touch ``session_texts`` at all
    # (runtime/sessions/filedocs.py). Keyed by the ``sessions`` row's rowid, which the trigram index uses
    # too: a search reads a row's text with one lookup by rowid (keyed by the session id, a second B-tree
    # descent per row made a search 1.3-1.8x as slow; as a WITHOUT ROWID table, 4-10x). ``upsert_index``
    # writes the ``sessions`` row first and finds its rowid by id; a deleted ``sessions`` row takes its
    # text along, and leaves the trigram index as before. DROP COLUMN keeps every row's rowid.
    """
    CREATE TABLE session_texts (
        session_rowid INTEGER PRIMARY KEY,
        search_text TEXT NOT NULL
    );
    INSERT INTO session_texts (session_rowid, search_text) SELECT rowid, search_text FROM sessions;
    DROP TRIGGER sessions_search_insert;
    DROP TRIGGER sessions_search_update;
    ALTER TABLE sessions DROP COLUMN search_text;
    CREATE TRIGGER session_texts_insert AFTER INSERT ON session_texts BEGIN
        INSERT INTO sessions_search (rowid, search_text) VALUES (new.session_rowid, CASE WHEN
            substr(new.search_text, 32769, 1) = '' THEN new.search_text ELSE char(64976, 64977, 64978) END);
    END;
    CREATE TRIGGER session_texts_update AFTER UPDATE OF search_text ON session_texts
        WHEN old.search_text IS NOT new.search_text BEGIN
        DELETE FROM sessions_search WHERE rowid = old.session_rowid;
        INSERT INTO sessions_search (rowid, search_text) VALUES (new.session_rowid, CASE WHEN
            substr(new.search_text, 32769, 1) = '' THEN new.search_text ELSE char(64976, 64977, 64978) END);
    END;
    CREATE TRIGGER sessions_texts_delete AFTER DELETE ON sessions BEGIN
        DELETE FROM session_texts WHERE session_rowid = old.rowid;
    END;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


def statements(script: str) -> list[str]:
    """The statements of ``script`` one by one (``execute`` runs one; ``executescript`` would commit the
    migration's transaction). Split at each ``;`` that ends a complete statement, so a trigger's body,
    whose statements end with ``;`` too, stays whole."""
    out, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                out.append(pending)
            pending = ""
    if pending.strip(" \n;"):
        out.append(pending)
    return out


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the database to SCHEMA_VERSION; refuses a database written by a newer runtime."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema version {version} is newer than this runtime supports ({SCHEMA_VERSION})"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements(MIGRATIONS[target - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


# ---- PostgreSQL (issue 15) -------------------------------------------------------------------------------
#
# The same tables and columns as the SQLite schema above after all its migrations (shared code runs the same
# SQL on both), plus ``thread_leases``. Types: TEXT stays TEXT with the "C" collation (byte order, as SQLite
# compares: ids and ISO timestamps sort the same on both), INTEGER becomes BIGINT (SQLite's integers are 64
# bits; nanosecond mtimes need it), BLOB becomes BYTEA, and the events' seq comes from a sequence (BIGSERIAL;
# the lease-row lock rule of docs/design.md "seq on PostgreSQL" keeps a thread's seqs visible in order).
# Versioned in ``trio_runtime_schema``; each entry upgrades from version i to i + 1, applied under an
# advisory lock so that hosts starting together migrate once. Never edit a shipped entry, append a new one.
PG_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE threads (
        id TEXT COLLATE "C" PRIMARY KEY,
        created_at TEXT COLLATE "C" NOT NULL,
        updated_at TEXT COLLATE "C" NOT NULL,
        model TEXT COLLATE "C" NOT NULL,
        workspace TEXT COLLATE "C",
        mode TEXT COLLATE "C" NOT NULL,
        archived BIGINT NOT NULL DEFAULT 0,
        title TEXT COLLATE "C",
        system_prompt TEXT COLLATE "C",
        latest_turn_id TEXT COLLATE "C",
        session_id TEXT COLLATE "C",
        base_messages TEXT COLLATE "C",
        base_tokens BIGINT NOT NULL DEFAULT 0,
        forked_from TEXT COLLATE "C",
        approval_policy TEXT COLLATE "C" NOT NULL DEFAULT 'ask',
        allowed_tools TEXT COLLATE "C"
    );
    CREATE INDEX threads_by_update ON threads (updated_at DESC, id DESC);
    CREATE TABLE turns (
        id TEXT COLLATE "C" PRIMARY KEY,
        thread_id TEXT COLLATE "C" NOT NULL REFERENCES threads (id),
        ord BIGINT NOT NULL,
        status TEXT COLLATE "C" NOT NULL,
        input_summary TEXT COLLATE "C" NOT NULL,
        created_at TEXT COLLATE "C" NOT NULL,
        started_at TEXT COLLATE "C",
        ended_at TEXT COLLATE "C",
        duration_ms BIGINT,
        input_tokens BIGINT,
        output_tokens BIGINT,
        error TEXT COLLATE "C",
        steer_count BIGINT NOT NULL DEFAULT 0,
        rewound BIGINT NOT NULL DEFAULT 0,
        retry_of TEXT COLLATE "C"
    );
    CREATE INDEX turns_by_thread ON turns (thread_id, ord);
    CREATE INDEX turns_active ON turns (status) WHERE status IN ('queued', 'in_progress');
    CREATE TABLE items (
        id TEXT COLLATE "C" PRIMARY KEY,
        turn_id TEXT COLLATE "C" NOT NULL REFERENCES turns (id),
        thread_id TEXT COLLATE "C" NOT NULL,
        ord BIGINT NOT NULL,
        kind TEXT COLLATE "C" NOT NULL,
        status TEXT COLLATE "C" NOT NULL,
        summary TEXT COLLATE "C" NOT NULL,
        detail TEXT COLLATE "C",
        metadata TEXT COLLATE "C",
        started_at TEXT COLLATE "C",
        ended_at TEXT COLLATE "C"
    );
    CREATE INDEX items_by_thread ON items (thread_id, ord);
    CREATE INDEX items_active ON items (status) WHERE status IN ('queued', 'in_progress');
    CREATE TABLE events (
        seq BIGSERIAL PRIMARY KEY,
        thread_id TEXT COLLATE "C" NOT NULL,
        turn_id TEXT COLLATE "C",
        item_id TEXT COLLATE "C",
        event TEXT COLLATE "C" NOT NULL,
        timestamp TEXT COLLATE "C" NOT NULL,
        payload TEXT COLLATE "C" NOT NULL
    );
    CREATE INDEX events_by_thread ON events (thread_id, seq);
    CREATE INDEX events_by_item ON events (item_id) WHERE item_id IS NOT NULL;
    CREATE TABLE sessions (
        id TEXT COLLATE "C" PRIMARY KEY,
        title TEXT COLLATE "C" NOT NULL,
        created_at TEXT COLLATE "C" NOT NULL,
        updated_at TEXT COLLATE "C" NOT NULL,
        message_count BIGINT NOT NULL,
        total_tokens TEXT COLLATE "C" NOT NULL,
        model TEXT COLLATE "C",
        workspace TEXT COLLATE "C",
        mode TEXT COLLATE "C",
        archived BIGINT NOT NULL DEFAULT 0,
        revision BIGINT NOT NULL,
        size BIGINT NOT NULL,
        file_mtime_ns BIGINT NOT NULL,
        search_text TEXT COLLATE "C" NOT NULL
    );
    CREATE INDEX sessions_by_update ON sessions (archived, updated_at DESC);
    CREATE TABLE session_commits (
        token TEXT COLLATE "C" PRIMARY KEY,
        session_id TEXT COLLATE "C" NOT NULL
    );
    CREATE INDEX session_commits_by_session ON session_commits (session_id);
    CREATE TABLE idempotency (
        key TEXT COLLATE "C" PRIMARY KEY,
        fingerprint TEXT COLLATE "C" NOT NULL,
        status BIGINT NOT NULL,
        headers TEXT COLLATE "C" NOT NULL,
        body BYTEA NOT NULL,
        created_at TEXT COLLATE "C" NOT NULL,
        expires_at TEXT COLLATE "C" NOT NULL
    );
    CREATE INDEX idempotency_by_expiry ON idempotency (expires_at);
    CREATE TABLE approvals (
        id TEXT COLLATE "C" PRIMARY KEY,
        thread_id TEXT COLLATE "C" NOT NULL,
        turn_id TEXT COLLATE "C" NOT NULL,
        item_id TEXT COLLATE "C" NOT NULL,
        tool TEXT COLLATE "C" NOT NULL,
        input TEXT COLLATE "C" NOT NULL,
        status TEXT COLLATE "C" NOT NULL,
        created_at TEXT COLLATE "C" NOT NULL,
        expires_at TEXT COLLATE "C" NOT NULL,
        resolved_at TEXT COLLATE "C",
        decided_by TEXT COLLATE "C",
        message TEXT COLLATE "C"
    );
    CREATE INDEX approvals_by_thread ON approvals (thread_id, created_at);
    CREATE INDEX approvals_pending ON approvals (created_at) WHERE status = 'pending';
    -- mcp.json is a file of each host: its change journal is keyed by the host (runtime/mcp/changes.py).
    CREATE TABLE mcp_commits (
        host_id TEXT COLLATE "C" NOT NULL,
        token TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (host_id, token)
    );
    -- Sessions always live in the database on PostgreSQL (SQLite migration 7; runtime/sessions/docs.py).
    CREATE TABLE session_docs (
        id TEXT COLLATE "C" PRIMARY KEY,
        revision BIGINT NOT NULL,
        document BYTEA NOT NULL,
        size BIGINT NOT NULL,
        updated_at TEXT COLLATE "C" NOT NULL
    );
    CREATE TABLE thread_leases (
        thread_id TEXT COLLATE "C" PRIMARY KEY,
        owner TEXT COLLATE "C",
        advertise_url TEXT COLLATE "C",
        epoch BIGINT NOT NULL DEFAULT 0,
        expires_at TIMESTAMPTZ
    );
    """,
    # 2: a trigram index of the session search text (issue 16; SQLite migration 8): pg_trgm's GIN index
    # answers ``search_text LIKE '%...%'`` itself (PostgreSQL rechecks each row it returns, so the answers
    # are the scan's). pg_trgm ships with PostgreSQL (contrib) and is a trusted extension (13+): a role with
    # CREATE on the database may create it. Where it cannot be had (not installed, no privilege), the step
    # warns and search keeps scanning; ``CREATE EXTENSION pg_trgm`` as a superuser and
    # ``CREATE INDEX sessions_search ON sessions USING gin (search_text gin_trgm_ops)`` add it later.
    """
    DO $$
    BEGIN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS pg_trgm;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'pg_trgm is not available, session search scans every session: %', SQLERRM;
        END;
        IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm') THEN
            CREATE INDEX sessions_search ON sessions USING gin (search_text gin_trgm_ops);
        END IF;
    END
    $$;
    """,
    # 3: SQLite migration 9 (issue 16): items by turn, and the engines' boundary states.
    """
    CREATE INDEX items_by_turn ON items (turn_id, ord);
    CREATE TABLE thread_states (
        thread_id TEXT COLLATE "C" PRIMARY KEY,
        through_turn_ord BIGINT NOT NULL,
        total_tokens BIGINT NOT NULL,
        messages TEXT COLLATE "C" NOT NULL
    );
    """,
    # 4: SQLite migration 11 (issue 16, bench row 9): the search text in a table of its own, as on SQLite
    # (PostgreSQL itself leaves an unchanged TOASTed column alone in an UPDATE), keyed by the session id
    # (SQLite's by rowid). Its trigram index moves with it; where pg_trgm is missing, search scans as
    # before. A deleted ``sessions`` row takes its text along (ON DELETE CASCADE).
    """
    CREATE TABLE session_texts (
        id TEXT COLLATE "C" PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
        search_text TEXT COLLATE "C" NOT NULL
    );
    INSERT INTO session_texts (id, search_text) SELECT id, search_text FROM sessions;
    DROP INDEX IF EXISTS sessions_search;
    ALTER TABLE sessions DROP COLUMN search_text;
    DO $$
    BEGIN
        IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm') THEN
            CREATE INDEX session_texts_search ON session_texts USING gin (search_text gin_trgm_ops);
        END IF;
    END
    $$;
    """,
)

PG_SCHEMA_VERSION = len(PG_MIGRATIONS)
# pg_advisory_xact_lock key serialising migrations of hosts that start together (any constant; "trio" in ASCII).
PG_MIGRATION_LOCK = 0x7472696F


def migrate_pg(conn) -> None:
    """Bring a PostgreSQL database to PG_SCHEMA_VERSION (``conn``: a psycopg connection in autocommit
    mode, outside any transaction); refuses a database written by a newer runtime. Each step is one
    transaction (PostgreSQL's DDL is transactional): a failure leaves the previous version whole."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (PG_MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS trio_runtime_schema (version BIGINT NOT NULL)")
        row = conn.execute("SELECT version FROM trio_runtime_schema").fetchone()
        version = 0 if row is None else row[0]
        if row is None:
            conn.execute("INSERT INTO trio_runtime_schema (version) VALUES (0)")
        if version > PG_SCHEMA_VERSION:
            raise RuntimeError(f"database schema version {version} is newer than this runtime supports "
                               f"({PG_SCHEMA_VERSION})")
        for target in range(version + 1, PG_SCHEMA_VERSION + 1):
            conn.execute(PG_MIGRATIONS[target - 1])
            conn.execute("UPDATE trio_runtime_schema SET version = %s", (target,))
