"""Tools the engine offers the model: a name, a JSON-schema description, an async function, and whether
a call needs a person's approval or writes anything.

A registry is empty unless tools are added; ``demo_registry()`` holds the built-in demo tools (API.md,
"Tools and approvals"): ``get_time`` (reads the clock), ``write_note`` (needs approval; writes one file
under ``<data-dir>/notes/<thread_id>/``) and ``wait`` (needs approval; sleeps, so tests have a tool that
is running). A tool takes the model's input (a dict, already checked against its schema) and a
ToolContext, and returns text.

Whatever goes wrong with a call (the tool is unknown, the input does not match the schema, the tool
raises, it runs past its timeout) becomes an error *outcome* the model is shown, never an exception for
the turn: the model may recover, and the turn only fails if the model does. The registry only runs tools;
asking for approval and recording the start belong to the engine, which calls ``ToolRegistry.call``.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import errno
import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

import jsonschema
import trio

from ..text import valid_text
from .base import ToolOutcome, ToolSpec

__all__ = [
    "DEFAULT_TOOL_TIMEOUT", "MAX_RESULT_CHARS", "RUN_LOG_ENV", "Tool", "ToolContext", "ToolError", "ToolOutcome", "ToolRegistry",
    "ToolSpec", "demo_registry",
]

# A tool call gets this long before its result becomes an error; generous for local tools, and it keeps
# a wedged tool from holding a turn forever (an interrupt cancels it sooner). A tool may set its own.
DEFAULT_TOOL_TIMEOUT = 30.0
# Results longer than this are cut: they are sent back to the model on every later request of the thread.
MAX_RESULT_CHARS = 16_000
# How much of a schema violation's own message is quoted (it can quote the whole bad input).
MAX_REASON_CHARS = 300
# Test seam, never set in production: a file ``serve`` hands the demo registry as its ``run_log``, so a
# kill -9 test can count a tool's runs across processes (tests/e2e/test_kill9_approvals.py).
RUN_LOG_ENV = "TRIO_RUNTIME_TEST_TOOL_RUN_LOG"


@dataclasses.dataclass(frozen=True)
class ToolContext:
    """Where a call runs: the thread that asked (a tool that keeps files keeps them per thread) and the
    server's data directory."""

    thread_id: str
    data_dir: Path


ToolFunction = Callable[[dict[str, Any], ToolContext], Awaitable[Any]]


class ToolError(Exception):
    """A tool refusing its input or failing in a way it can explain; the message is the result text
    (after ``Tool 'NAME' failed: ``), without the exception's type name."""


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    # JSON schema (Draft 2020-12) of the input object (OpenAI's ``function.parameters``).
    parameters: dict[str, Any]
    run: ToolFunction
    # A call waits for a person's yes under the thread's approval policy ``ask`` (the engine asks).
    needs_approval: bool = False
    # The tool changes something outside the conversation (files): shown to whoever approves it.
    writes: bool = False
    # Seconds before a call's result becomes an error; None: the registry's timeout.
    timeout: float | None = None

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.parameters)


class ToolRegistry:
    """Tools by name. ``call`` never raises for a call's own failure (see the module docstring).

    ``calls[name]`` counts the calls asked for, ``runs[name]`` the times the tool's function was
    started (a call refused for its input, or for an unknown name, is not a run): tests count runs to
    prove a tool never ran twice."""

    def __init__(self, tools: Iterable[Tool] = (), *, timeout: float = DEFAULT_TOOL_TIMEOUT,
                 run_log: Path | None = None) -> None:
        self.timeout = timeout
        # Test seam (RUN_LOG_ENV): a line ``NAME THREAD_ID PID`` is appended here as each run starts, so runs can be
        # counted across processes; a kill -9 does not lose it (the write is done before the run starts).
        self.run_log = run_log
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, jsonschema.Draft202012Validator] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.runs: collections.Counter[str] = collections.Counter()
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        """Register ``tool``; a second tool of the same name, or a schema that is not a valid Draft
        2020-12 schema, is a programming error (ValueError) caught here rather than at the first call."""
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        try:
            jsonschema.Draft202012Validator.check_schema(tool.parameters)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"tool {tool.name!r} has an invalid input schema: {exc.message}") from exc
        self._tools[tool.name] = tool
        self._validators[tool.name] = jsonschema.Draft202012Validator(tool.parameters)

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    @property
    def names(self) -> list[str]:
        return sorted(self._tools)

    def get(self, name: str) -> Tool | None:
        """The tool called ``name``, or None (a model may ask for a tool that does not exist)."""
        return self._tools.get(name)

    def spec(self) -> tuple[ToolSpec, ...]:
        """What the model is told, in registration order (ModelRequest.tools)."""
        return tuple(tool.spec for tool in self._tools.values())

    def check(self, name: str, arguments: Any) -> ToolOutcome | None:
        """The error outcome a call of ``name`` with ``arguments`` gets without running (unknown tool,
        input not matching the schema), or None when it may run."""
        validator = self._validators.get(name)
        if validator is None:
            known = ", ".join(self.names) or "none"
            return ToolOutcome(f"Unknown tool '{name}' (available tools: {known})", is_error=True)
        error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
        if error is None:
            return None
        reason = error.message
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[: MAX_REASON_CHARS - 1] + "…"
        return ToolOutcome(f"Invalid input for tool '{name}': {error.json_path}: {reason}", is_error=True)

    async def call(self, name: str, arguments: Any, context: ToolContext) -> ToolOutcome:
        """Check the input, then run one tool, bounded by its timeout. Cancellation (an interrupt)
        propagates: a tool that can stop is cancelled mid-call (``wait``) and no outcome is produced; one
        that finishes its step first (``write_note``'s write in a worker thread) returns its outcome,
        since what it did is done, and the caller's next checkpoint raises. Either way a note is the old
        one or the new one, whole."""
        self.calls[name] += 1
        refused = self.check(name, arguments)
        if refused is not None:
            return refused
        tool = self._tools[name]
        timeout = tool.timeout if tool.timeout is not None else self.timeout
        self.runs[name] += 1
        if self.run_log is not None:
            with open(self.run_log, "a", encoding="utf-8") as log_file:  # tiny, test-only: blocking is fine
                log_file.write(f"{name} {context.thread_id} {os.getpid()}\n")
        try:
            with trio.fail_after(timeout):
                value = await tool.run(arguments, context)
        except trio.TooSlowError:
            return ToolOutcome(f"Tool '{name}' did not finish within {timeout:g} s", is_error=True)
        except ToolError as exc:
            return ToolOutcome(valid_text(f"Tool '{name}' failed: {exc}"), is_error=True)
        except Exception as exc:  # a tool's bug is the model's problem to read about, not the turn's
            return ToolOutcome(valid_text(f"Tool '{name}' failed: {type(exc).__name__}: {exc}"), is_error=True)
        # A tool's text goes back to the model and into the transcript: valid Unicode (runtime.text).
        content = valid_text(value) if isinstance(value, str) else json.dumps(value, default=str)
        if len(content) > MAX_RESULT_CHARS:
            content = content[: MAX_RESULT_CHARS - 1] + "…"
        return ToolOutcome(content)


# ---- the demo tools ----------------------------------------------------------------------------------


async def get_time(arguments: dict[str, Any], context: ToolContext) -> str:
    """The current UTC time as an ISO 8601 string, e.g. ``2025-01-31T12:00:00+00:00``. Takes no arguments."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


GET_TIME = Tool(
    name="get_time",
    description="Returns the current date and time in UTC as an ISO 8601 string.",
    parameters={"type": "object", "properties": {}, "additionalProperties": False},
    run=get_time,
)

# The note name rule of API.md ("Tools and approvals"); also the file's stem, so it must never be a path.
NOTE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The thread id rule of API.md (the same as runtime.core.THREAD_ID_RE): the directory a thread's notes
# live in. Checked again here because it becomes part of a path.
THREAD_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# The directory under the data dir that holds every thread's notes.
NOTES_DIR = "notes"
# A note's text is at most this many characters: it is a note, and the model pays for every one it writes.
MAX_NOTE_CHARS = 100_000


def _open_dir(name: str, parent_fd: int) -> tuple[int, bool]:
    """Open (creating it if needed) the directory ``name`` inside ``parent_fd`` without following a
    symbolic link; returns the fd and whether it was created. A symlink in its place is refused."""
    created = False
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        created = True
    except FileExistsError:
        pass
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd), created
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise ToolError(f"refusing to write into '{name}': it is a symbolic link or not a directory") from exc


def write_note_file(data_dir: Path, thread_id: str, name: str, text: str) -> Path:
    """Write ``text`` to ``<data_dir>/notes/<thread_id>/<name>.txt`` atomically; blocking (run it in a
    worker thread).

    Both ids are checked by their rules before any path is built, so neither can be ``..``, hold a
    ``/`` or a NUL. The two directories are opened without following symlinks, and the resolved path
    must lie under ``<data_dir>/notes``: nothing lands outside it. The text goes to a fresh temp file in
    the note's own directory (``.<name>.<random>.tmp``, created exclusively), is fsynced, renamed over
    the note with ``os.replace`` and the directory fsynced: a reader, or a crash at any point, sees the
    old note or the new one, whole. A crash before the rename can leave the temp file behind; a failed
    write removes it."""
    if not isinstance(thread_id, str) or not THREAD_ID_RE.fullmatch(thread_id):
        raise ToolError(f"thread id {thread_id!r} is not a valid thread id")
    if not isinstance(name, str) or not NOTE_NAME_RE.fullmatch(name):
        raise ToolError(f"note name {name!r} must be 1 to 64 letters, digits, '_' or '-'")
    try:
        return _write_note_file(data_dir, thread_id, name, text)
    except OSError as exc:
        raise ToolError(f"could not write note '{name}' of thread '{thread_id}':"
                        f" {exc.strerror or type(exc).__name__}") from exc


def _write_note_file(data_dir: Path, thread_id: str, name: str, text: str) -> Path:
    root = data_dir.resolve() / NOTES_DIR
    target = root / thread_id / f"{name}.txt"
    base_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    fds = [base_fd]
    try:
        notes_fd, _ = _open_dir(NOTES_DIR, base_fd)
        fds.append(notes_fd)
        thread_fd, created = _open_dir(thread_id, notes_fd)
        fds.append(thread_fd)
        if created:
            os.fsync(notes_fd)  # the new thread directory's entry is durable before a note in it is
        # The fds above never followed a link; this also catches a data dir whose notes path was
        # swapped for a link after it was opened (the check the brief asks for, kept as a second guard).
        if not target.parent.resolve().is_relative_to(root):
            raise ToolError(f"refusing to write note '{name}': its directory resolves outside {root}")
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=thread_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, f"{name}.txt", src_dir_fd=thread_fd, dst_dir_fd=thread_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=thread_fd)
            except OSError:
                pass
            raise
        os.fsync(thread_fd)  # the rename is durable before the tool says it wrote the note
        return target
    finally:
        for fd in reversed(fds):
            os.close(fd)


async def write_note(arguments: dict[str, Any], context: ToolContext) -> str:
    """Write a note for this thread (see ``write_note_file``). The write runs in a worker thread and is
    not abandoned on cancellation: an interrupt that arrives during the (small, bounded) write waits for
    it, and the result still says the note was written (it was); the turn stops at its next checkpoint.
    An interrupt before the thread starts means nothing is written."""
    name, text = arguments["name"], arguments["text"]
    await trio.to_thread.run_sync(write_note_file, context.data_dir, context.thread_id, name, text)
    return f"Wrote note '{name}' ({len(text)} characters) to {NOTES_DIR}/{context.thread_id}/{name}.txt"


WRITE_NOTE = Tool(
    name="write_note",
    description=("Saves a text note under a name for this conversation, replacing a note of the same name."
                 " Needs the user's approval."),
    parameters={
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$",
                     "description": "the note's name: 1 to 64 letters, digits, '_' or '-'"},
            "text": {"type": "string", "maxLength": MAX_NOTE_CHARS, "description": "the note's text"},
        },
        "required": ["name", "text"],
        "additionalProperties": False,
    },
    run=write_note,
    needs_approval=True,
    writes=True,
)

# The longest ``wait`` (API.md): long enough to kill a server while a tool runs, short enough for tests.
MAX_WAIT_SECONDS = 60


async def wait(arguments: dict[str, Any], context: ToolContext) -> str:
    """Sleep ``seconds`` (0 to 60); cancellable at any moment (an interrupt ends it at once)."""
    seconds = arguments["seconds"]
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
            math.isfinite(seconds) and 0 <= seconds <= MAX_WAIT_SECONDS):
        raise ToolError(f"seconds must be a number from 0 to {MAX_WAIT_SECONDS:g}, got {seconds!r}")
    await trio.sleep(seconds)
    return f"Waited {seconds:g} s"


WAIT = Tool(
    name="wait",
    description=f"Waits the given number of seconds (0 to {MAX_WAIT_SECONDS:g}), then returns. Needs the user's"
                " approval.",
    parameters={
        "type": "object",
        "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS}},
        "required": ["seconds"],
        "additionalProperties": False,
    },
    run=wait,
    needs_approval=True,
    # Past the longest wait, so that a wait the schema allows never ends as a timeout.
    timeout=MAX_WAIT_SECONDS + 5.0,
)


def demo_registry(*, run_log: Path | None = None) -> ToolRegistry:
    """A fresh registry with the demo tools ``get_time``, ``write_note`` and ``wait`` (fresh counters);
    ``run_log``: the test seam of ToolRegistry."""
    return ToolRegistry([GET_TIME, WRITE_NOTE, WAIT], run_log=run_log)
