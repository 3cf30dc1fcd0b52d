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
