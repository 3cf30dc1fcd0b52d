"""Wall-clock timestamps and ids. Kept apart so tests can see exactly where real time enters."""

from __future__ import annotations

import datetime as _dt
import uuid


def utc_now() -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-25T12:00:00.123Z`` (sorts as text)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def new_id(prefix: str) -> str:
    """Opaque id such as ``thr_3f2a…``; the prefix tells a reader what kind of record it names."""
    return f"{prefix}_{uuid.uuid4().hex}"


def utc_after(seconds: float) -> str:
    """``utc_now()`` plus ``seconds``, in the same sortable format (an expiry to compare as text)."""
    then = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=seconds)
    return then.strftime("%Y-%m-%dT%H:%M:%S.") + f"{then.microsecond // 1000:03d}Z"


def parse_utc(stamp: str) -> _dt.datetime:
    """A ``utc_now()`` timestamp back as an aware datetime."""
    return _dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=_dt.timezone.utc)


def seconds_until(stamp: str) -> float:
    """Wall-clock seconds from now until ``stamp`` (negative once it passed). Stored deadlines are wall
    clock so they keep running across restarts; a waiter turns them into a trio deadline with this."""
    return (parse_utc(stamp) - _dt.datetime.now(_dt.timezone.utc)).total_seconds()
