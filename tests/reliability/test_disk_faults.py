"""A full or failing disk during a save, over HTTP: the ``FileSystem`` seam of runtime/sessions/files.py
raises ``OSError(ENOSPC)`` or ``OSError(EIO)`` in the commit phase (writing the temp file, renaming it
over the old one). Every request gets a 507 (full disk) or 500 whose message names the action; the
previous file is intact, the index, the thread links and the event log are unchanged (no link to a
missing file), no temp or undo file is left, and once the disk recovers the next save gets the very
next revision.

tests/sessions/test_save.py and tests/cancellation/test_timeouts.py cover ENOSPC (and EACCES on
delete) on the runtime directly, tests/faults/test_session_faults.py every step of every session
operation; this file adds the HTTP answers and EIO everywhere, a failing directory fsync after the
rename, and EIO while loading.
"""

from __future__ import annotations

import errno
import os

import httpx
import pytest

from tests.cancellation.harness import check_invariants
from tests.conftest import E2E_LIMIT
from tests.e2e.helpers import wait_turn_end
from tests.faults.session_cases import CASES, KINDS, Case, run_every_crash, run_every_step
from tests.sessions.conftest import dir_snapshot
from tests.support import InFlight

from .support import AUTH

# errno -> (its message, the status and code a client gets)
FAULTS = {"ENOSPC": (errno.ENOSPC, "no space left on device", 507, "insufficient_storage"),
          "EIO": (errno.EIO, os.strerror(errno.EIO), 500, "storage_error")}


def failing(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


async def _setup(server, client, http):
    """Two threads with a finished turn each; the first is saved as session 'kept' (revision 1)."""
    threads = []
    for prompt in ("hello there", "another conversation"):
        thread = await client.create_thread()
        turn = await client.start_turn(thread["id"], prompt)
        await wait_turn_end(client, thread["id"], turn["id"])
        threads.append(thread["id"])
    saved = await http.put("/v1/sessions", json={"thread_id": threads[0], "session_id": "kept"})
    assert saved.status_code == 200 and saved.json()["session"]["metadata"]["revision"] == 1
    return threads


async def _observe(server, http, threads):
    """Everything a failed save must leave as it was."""
    details = [(await http.get(f"/v1/threads/{tid}")).json() for tid in threads]
    return {
        "files": dir_snapshot(server.data_dir / "sessions"),
        "listed": (await http.get("/v1/sessions", params={"include_archived": "true", "limit": 500})).json(),
        "links": [d["thread"]["session_id"] for d in details],
        "latest_seq": [d["latest_seq"] for d in details],  # no session.saved event (nor any other)
    }


def _assert_storage_error(response: httpx.Response, prefix: str, reason: str, status: int = 500,
                          code: str = "storage_error") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["status"] == status and error["code"] == code, error
    assert error["message"].startswith(prefix) and error["message"].endswith(f": {reason}"), error


@pytest.mark.parametrize("stage", ["write_data", "replace"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_a_full_or_failing_disk_during_the_commit_is_a_507_or_500_naming_the_action_and_changes_nothing(
        server, monkeypatch, fault, stage):
    code, reason, status, error_code = FAULTS[fault]
    inflight = InFlight(server.running.app)
    async with server.client() as client, httpx.AsyncClient(base_url=server.url, headers=AUTH,
                                                              timeout=E2E_LIMIT) as http:
        tid, other = await _setup(server, client, http)
        before = await _observe(server, http, [tid, other])
        monkeypatch.setattr(server.runtime.sessions.files.fs, stage, failing(code))

        for prefix, method, path, body in (
            ("Failed to save session 'kept'", "PUT", "/v1/sessions", {"thread_id": other, "session_id": "kept"}),
            ("Failed to save session 'fresh'", "PUT", "/v1/sessions", {"thread_id": other, "session_id": "fresh"}),
            ("Failed to save session '", "PUT", "/v1/sessions", {"thread_id": other}),
            ("Failed to save session '", "POST", "/v1/sessions", {"thread_id": other, "title": "rebuilt"}),
            ("Failed to update session 'kept'", "PATCH", "/v1/sessions/kept", {"title": "renamed"}),
        ):
            _assert_storage_error(await http.request(method, path, json=body), prefix, reason, status, error_code)

        assert await _observe(server, http, [tid, other]) == before
        assert (await http.get("/v1/sessions/fresh")).status_code == 404  # never linked, never listed
        monkeypatch.undo()
        # The disk is back: the next save is the very next revision, and everything agrees again.
        again = await http.put("/v1/sessions", json={"thread_id": other, "session_id": "kept"})
        assert again.status_code == 200 and again.json()["session"]["metadata"]["revision"] == 2
        assert (await http.get(f"/v1/threads/{other}")).json()["thread"]["session_id"] == "kept"
    await inflight.settle()
    await check_invariants(server.runtime, server.data_dir)


async def test_a_failing_disk_during_a_delete_keeps_the_file_index_and_links(server, monkeypatch):
    async with server.client() as client, httpx.AsyncClient(base_url=server.url, headers=AUTH,
                                                              timeout=E2E_LIMIT) as http:
        tid, other = await _setup(server, client, http)
        before = await _observe(server, http, [tid, other])
        # DELETE moves the file aside (a rename) before its COMMIT, and drops it after.
        monkeypatch.setattr(server.runtime.sessions.files.fs, "replace", failing(errno.EIO))
        _assert_storage_error(await http.delete("/v1/sessions/kept"), "Failed to delete session 'kept'",
                              os.strerror(errno.EIO))
        assert await _observe(server, http, [tid, other]) == before
        monkeypatch.undo()
        assert (await http.delete("/v1/sessions/kept")).status_code == 204
        assert (await http.get(f"/v1/threads/{tid}")).json()["thread"]["session_id"] is None
    await check_invariants(server.runtime, server.data_dir)


async def test_a_failing_disk_while_loading_is_a_500_naming_the_load_and_writes_nothing(server, monkeypatch):
    async with server.client() as client, httpx.AsyncClient(base_url=server.url, headers=AUTH,
                                                              timeout=E2E_LIMIT) as http:
        tid, other = await _setup(server, client, http)
        before = await _observe(server, http, [tid, other])
        fs = server.runtime.sessions.files.fs
        monkeypatch.setattr(fs, "read_bytes", failing(errno.EIO))
        reason = os.strerror(errno.EIO)
        for method, path, body in (("GET", "/v1/sessions/kept", None),
                                   ("PUT", "/v1/sessions", {"thread_id": other, "session_id": "kept"}),
                                   ("PATCH", "/v1/sessions/kept", {"archived": True}),
                                   ("POST", "/v1/sessions/kept/resume-thread", {})):
            _assert_storage_error(await http.request(method, path, json=body), "Failed to load session 'kept'",
                                  reason)
        assert await _observe(server, http, [tid, other]) == before
    await check_invariants(server.runtime, server.data_dir)


async def test_a_failing_directory_fsync_after_the_rename_is_a_500_and_puts_the_previous_file_back(
        server, monkeypatch):
    """After ``os.replace`` the directory fsync decides whether the rename survives a power loss, and
    the COMMIT must not be durable before it: failing there, the save is undone (the previous file back
    under its name) and reported as not saved; the next save gets the very next revision."""
    async with server.client() as client, httpx.AsyncClient(base_url=server.url, headers=AUTH,
                                                              timeout=E2E_LIMIT) as http:
        tid, other = await _setup(server, client, http)
        before = await _observe(server, http, [tid, other])
        fs = server.runtime.sessions.files.fs
        calls = []

        def fsync_dir(directory):  # the second: the one after the replace (the first follows staging)
            calls.append(directory)
            if len(calls) == 2:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            type(fs).fsync_dir(fs, directory)

        monkeypatch.setattr(fs, "fsync_dir", fsync_dir)
        response = await http.put("/v1/sessions", json={"thread_id": other, "session_id": "kept"})
        _assert_storage_error(response, "Failed to save session 'kept'", os.strerror(errno.EIO))
        assert len(calls) >= 2
        monkeypatch.undo()
        assert await _observe(server, http, [tid, other]) == before
        again = await http.put("/v1/sessions", json={"thread_id": other, "session_id": "kept"})
        assert again.status_code == 200 and again.json()["session"]["metadata"]["revision"] == 2
        assert (await http.get(f"/v1/threads/{other}")).json()["thread"]["session_id"] == "kept"
    await check_invariants(server.runtime, server.data_dir)


# ---- the full fault-at-every-step and kill-at-every-step runs (make reliability) --------------
# The operations, the drivers and how each run is judged: tests/faults/session_cases.py; the short
# versions run in make test (tests/faults/test_session_faults.py).


@pytest.mark.reliability
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_a_session_fault_of_every_kind_at_every_step_changes_all_or_nothing(tmp_path, case: Case):
    counts = await run_every_step(tmp_path, case, KINDS)
    assert set(counts) == set(KINDS)


@pytest.mark.reliability
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_a_kill_at_every_step_of_every_session_operation_restarts_before_or_after(tmp_path, case: Case):
    await run_every_crash(tmp_path, case)
