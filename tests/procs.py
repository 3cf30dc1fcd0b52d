"""Processes counted from /proc, for the tests that prove no child is left behind (MCP servers, the launcher,
browsers): zombies count as gone, since they have exited and only wait to be reaped."""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first, then the parent's pid), or None
    when the process is gone. The name is skipped by its last ")" since it may hold spaces and parentheses."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children_of(pid: int) -> set[int]:
    """Live (not zombie) children of ``pid``."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat(name)) is not None and int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(name))
    return found


def descendants(pid: int) -> set[int]:
    """Live descendants of ``pid``."""
    found, todo = set(), [pid]
    while todo:
        kids = children_of(todo.pop())
        found |= kids
        todo.extend(kids)
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"
