"""Shared pieces of the reliability suite: the seed, a server subprocess whose output is drained, file
tree snapshots, session-file checks, and a count of the app's own request tasks.

The suite runs a short version of every scenario in ``make test`` and the full one under the
``reliability`` marker (``make reliability``). Each randomized test prints its seed; rerun a failing
one with ``TRIO_RUNTIME_TEST_SEED=<seed>``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, AsyncIterator

import trio

from runtime.sessions.files import SESSION_ID_RE, is_work_file, parse_document
from tests.e2e.process import ServerProcess

SEED = int(os.environ.get("TRIO_RUNTIME_TEST_SEED", "1125"))
AUTH = {"Authorization": "Bearer test-token"}


async def _drain(server: ServerProcess) -> None:
    """Keep reading the server's output so a chatty server never blocks on a full pipe."""
    assert server.process is not None and server.process.stdout is not None
    try:
        while chunk := await server.process.stdout.receive_some(65536):
            server.output.append(chunk.decode(errors="replace"))
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass


@contextlib.asynccontextmanager
async def serving(data_dir: Path, *extra: str, cwd: Path | None = None) -> AsyncIterator[ServerProcess]:
    """A real ``trio-runtime serve`` process on ``data_dir``; SIGKILLed on exit if still running."""
    server = ServerProcess(data_dir, *extra, cwd=cwd)
    await server.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, server)
            try:
                yield server
            finally:
                server.kill()
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await server.process.wait()
                nursery.cancel_scope.cancel()
    finally:
        server.kill()


def tree(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (except under ``skip``): relative path -> (size, mtime_ns)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_file() or path.is_symlink():
            st = path.lstat()
            found[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return found


# host_id: the host's generated name among the hosts of one PostgreSQL (issue 15), kept across restarts.
DATA_FILES = {"runtime.sqlite3", "runtime.sqlite3-wal", "runtime.sqlite3-shm", "runtime.token", "host_id"}


def unexpected_data_files(data_dir: Path) -> list[str]:
    """Files in the data dir that the server has no business writing (anything but its database,
    its token, its host_id and well-named session files and their temp and undo files)."""
    odd = []
    for path in sorted(data_dir.rglob("*")):
        rel = path.relative_to(data_dir)
        if path.is_dir():
            if str(rel) != "sessions":
                odd.append(str(rel))
        elif rel.parent == Path("."):
            if rel.name not in DATA_FILES:
                odd.append(str(rel))
        elif rel.parent != Path("sessions") or not (
                (rel.suffix == ".json" and SESSION_ID_RE.match(rel.stem))
                or is_work_file(rel.name)):
            odd.append(str(rel))
    return odd


def session_files(data_dir: Path) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:
    """(parsed documents by id, temp and undo files, files that do not parse) in ``<data_dir>/sessions``."""
    docs, temps, broken = {}, [], []
    directory = data_dir / "sessions"
    if not directory.exists():
        return docs, temps, broken
    for entry in sorted(directory.iterdir()):
        if is_work_file(entry.name):
            temps.append(entry.name)
            continue
        try:
            docs[entry.stem] = parse_document(entry.stem, entry.read_bytes())
        except Exception as exc:  # noqa: BLE001 - any failure to parse is what we count
            broken.append(f"{entry.name}: {exc}")
    return docs, temps, broken


def app_tasks() -> int:
    """The app's request tasks alive in this trio run (hypercorn runs each request's ASGI call in a task
    named ``..._handle``, under its per-connection task). ``harness.task_count`` leaves every
    per-connection subtree out, so this is what shows a request handler (an SSE stream, a save) that
    outlived its client."""

    def walk(task: trio.lowlevel.Task) -> int:
        own = 1 if task.name.endswith("task_group._handle") else 0
        return own + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return walk(trio.lowlevel.current_root_task())


def dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
