"""Wall-clock timestamps and ids. Kept apart so tests can see exactly where real time enters."""

from __future__ import annotations

import datetime as _dt
import os
import time


def _stamp(moment: _dt.datetime) -> str:
    # %-formatting of the fields: 0.70 us against strftime's 1.63 (a keyed POST formats three stamps on the
    # event loop); the same text, and the year always 4 digits.
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (moment.year, moment.month, moment.day, moment.hour,
                                                   moment.minute, moment.second, moment.microsecond // 1000)


def utc_now() -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-25T12:00:00.123Z`` (sorts as text)."""
    return _stamp(_dt.datetime.now(_dt.timezone.utc))


def utc_stamp(moment: _dt.datetime) -> str:
    """``moment`` (an aware UTC datetime, e.g. ``utc_moment()``) as ``utc_now`` formats it: for two stamps of
    one clock reading (a record's creation and its expiry) without parsing the first back."""
    return _stamp(moment)


def utc_moment() -> _dt.datetime:
    """The wall clock's now as an aware datetime, without formatting a stamp (0.2 us against ``utc_now``'s
    1 us): for comparing with a parsed stamp (``parse_utc``) on every keyed request."""
    return _dt.datetime.now(_dt.timezone.utc)


def new_id(prefix: str) -> str:
    """Opaque id such as ``thr_019ae3f2a…``; the prefix tells a reader what kind of record it names.

    32 hex digits like the uuid4 hex it replaces, laid out like a UUIDv7: the wall-clock milliseconds (12
    digits), then 80 random bits. Ids made close in time are close in the ids' order, so the rows a write
    adds go into the same few pages of each index on an id (primary keys, ``items_by_turn``) instead of one
    random page per id: a fork of a 100-turn thread wrote ~330 WAL pages with uuid4 ids, now ~70 (bench
    row 15a, docs/design.md "History control"). A clock stepping back only costs that locality."""
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def new_ids(prefix: str, count: int) -> list[str]:
    """``count`` ids as ``new_id`` makes them, with one clock reading and one ``getrandom`` for all (a fork
    makes one per copied turn and item)."""
    stamp = f"{prefix}_{time.time_ns() // 1_000_000:012x}"
    random = os.urandom(10 * count).hex()
    return [stamp + random[at:at + 20] for at in range(0, 20 * count, 20)]


def utc_after(seconds: float, start: str | None = None) -> str:
    """``start`` (a ``utc_now()`` stamp; default: now) plus ``seconds``, in the same sortable format (an
    expiry to compare as text). A record's expiry counted from its own creation stamp passes that stamp:
    reading the clock again could put it a millisecond later."""
    base = _dt.datetime.now(_dt.timezone.utc) if start is None else parse_utc(start)
    return _stamp(base + _dt.timedelta(seconds=seconds))


def parse_utc(stamp: str) -> _dt.datetime:
    """A ``utc_now()`` timestamp back as an aware datetime. Exactly that format is parsed by
    ``fromisoformat`` (0.1 us against strptime's 4.3: an expiry counted from its creation stamp parses it
    on every keyed request); anything else goes through the strict strptime, which refuses what
    ``utc_now()`` never makes."""
    if len(stamp) == 24 and stamp[19] == "." and stamp[23] == "Z":
        return _dt.datetime.fromisoformat(stamp)
    return _dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=_dt.timezone.utc)


def seconds_until(stamp: str) -> float:
    """Wall-clock seconds from now until ``stamp`` (negative once it passed). Stored deadlines are wall
    clock so they keep running across restarts; a waiter turns them into a trio deadline with this."""
    return (parse_utc(stamp) - _dt.datetime.now(_dt.timezone.utc)).total_seconds()
