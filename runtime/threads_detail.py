"""Encoded thread details kept while the database does not change (issue 16, bench row 12).

``GET /v1/threads/{id}`` spent most of its own time reading the thread, its turns and their items into
dicts and encoding them (py-spy under wrk: ~18% and ~4% of the server's samples, the rest being what every
request pays). A dashboard polls the same page of an unchanged thread again and again, so ``DetailCache``
keeps the encoded answer of each page it read and serves those bytes again while the database is unchanged.

"Unchanged" is the store's ``version()``: SQLite's ``PRAGMA data_version`` on the inline read connection,
which moves on every commit by any other connection or process (the writer, another ``trio-runtime``
command on the same file), with that connection's own ``total_changes``. It says nothing about which
thread changed, so every commit anywhere drops every entry; in exchange nothing has to be proven about
which writes touch a thread's detail (a turn, a rewind, a retry, a delete, a title or archive change, a
recovery at start-up, a migration): each of them is a commit. A busy server that commits all the time
mostly misses, and a miss costs one PRAGMA (~5 µs) more than before.

An entry is stored only when the version read before the read and after the encoding are equal: no commit
happened meanwhile, so the snapshot the answer was read from is the database at that version. A hit needs
the version of now to be that same one. Entries also expire after MAX_AGE seconds: ``data_version`` is a
32-bit counter in SQLite, and the age bound keeps it from wrapping around to an old value between two
reads (2**32 commits in MAX_AGE seconds cannot happen). PostgreSQL (other hosts commit, thread owners
change) has no version: nothing is kept there.

Memory is bounded: at most MAX_ENTRIES answers and MAX_BYTES in all, least recently used dropped first, and
an answer bigger than MAX_ENTRY_BYTES is never kept. Everything runs on the event loop's thread, with no
checkpoint between reading the version and using it. A cancelled read stores nothing.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Awaitable, Callable, Hashable

import trio

from . import codec

# Answers kept at most: a dashboard's open threads, each with a page or two.
MAX_ENTRIES = 256
# Bytes kept at most across all answers (a 10-turn detail of the bench is ~9 KB; the default page of
# 20 turns with long replies ~100 KB).
MAX_BYTES = 8 * 1024 * 1024
# An answer bigger than this (a page of up to 1,000 turns asked for with turns_limit) is not kept.
MAX_ENTRY_BYTES = 1024 * 1024
# Seconds an entry is served for at most (see the module docstring: data_version is 32 bits wide).
MAX_AGE = 10.0


class DetailCache:
    """Encoded answers of one database version, by page key (see the module docstring)."""

    __slots__ = ("_version", "_entries", "_bytes", "_clock", "hits", "misses")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._version: Hashable = None
        # key -> (body, time stored), oldest use first.
        self._entries: collections.OrderedDict[Hashable, tuple[bytes, float]] = collections.OrderedDict()
        self._bytes = 0
        self._clock = clock
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """Bytes kept."""
        return self._bytes

    def _at(self, version: Hashable) -> None:
        """Drop every entry unless they belong to ``version``."""
        if version != self._version:
            self._entries.clear()
            self._bytes = 0
            self._version = version

    def get(self, version: Hashable, key: Hashable) -> bytes | None:
        self._at(version)
        entry = self._entries.get(key)
        if entry is None:
            return None
        body, stored_at = entry
        if self._clock() - stored_at > MAX_AGE:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return body

    def put(self, version: Hashable, key: Hashable, body: bytes) -> None:
        self._at(version)
        if len(body) > MAX_ENTRY_BYTES:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (body, self._clock())
        self._bytes += len(body)
        while len(self._entries) > MAX_ENTRIES or self._bytes > MAX_BYTES:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: Hashable) -> None:
        body, _ = self._entries.pop(key)
        self._bytes -= len(body)

    async def encoded(self, store: Any, key: Hashable, read: Callable[[], Awaitable[Any]]) -> bytes:
        """``codec.dumps(await read())``, or the bytes kept for ``key`` when the store's version is the one
        they were read at. ``read`` must be a pure function of the database (the same version, the same
        answer). Cancelled, nothing is kept; a hit is still a checkpoint (it may raise Cancelled)."""
        before = store.version()
        if before is not None:
            body = self.get(before, key)
            if body is not None:
                self.hits += 1
                await trio.lowlevel.checkpoint()
                return body
        self.misses += 1
        body = codec.dumps(await read())
        if before is not None and store.version() == before:
            self.put(before, key, body)
        return body
