"""The launcher every stdio MCP server runs under (runtime/mcp/launcher.py), driven directly as a real
process: the server survives the exit of the thread that spawned the launcher (the trap of
``PR_SET_PDEATHSIG`` set on a process forked from a trio worker thread), dies with the launcher, reports its
exit status, and its stderr log is rotated. Every wait is bounded by LIMIT; nothing sleeps to synchronise
(pipes are read with a bounded select, processes polled in /proc with a bound)."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from runtime.mcp import launcher
from runtime.mcp.supervisor import LAUNCHER
from tests.procs import alive, children_of

# Real-clock bound on any one wait (a loaded 2-core machine starts a Python process in well under this).
LIMIT = 60.0


class Launch:
    """The launcher started the way the SDK starts it (new session, pipes), from a thread of its own that
    stays alive until ``end_thread`` (trio's worker threads live on for a while after a spawn, then exit:
    that exit is what would fire a parent-death signal set on a process that thread forked)."""

    def __init__(self, log: Path, *command: str) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._spawn, args=(log, command))
        self.thread.start()
        assert self.started.wait(LIMIT)
        self.proc: subprocess.Popen = self._proc

    def _spawn(self, log: Path, command: tuple[str, ...]) -> None:
        self.tid = threading.get_native_id()
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(LAUNCHER), str(os.getpid()), str(log), *command],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        self.started.set()
        self.release.wait(LIMIT)

    def end_thread(self) -> None:
        """Let the spawning thread exit; returns once the kernel has it gone."""
        self.release.set()
        self.thread.join(LIMIT)
        wait_until(lambda: not Path(f"/proc/self/task/{self.tid}").exists())

    def close(self) -> None:
        self.end_thread()
        self.proc.kill()
        self.proc.wait(LIMIT)


def launch(log: Path, *command: str) -> subprocess.Popen:
    """A launcher whose spawning thread is already gone."""
    started = Launch(log, *command)
    started.end_thread()
    return started.proc


def wait_until(condition, limit: float = LIMIT) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not met within the limit"
        time.sleep(0.01)  # polling another process's state, bounded by the deadline


def read_line(proc: subprocess.Popen) -> bytes:
    assert select.select([proc.stdout], [], [], LIMIT)[0], "no answer within the limit"
    return proc.stdout.readline()


def test_the_server_outlives_the_spawning_thread_and_dies_with_the_launcher(tmp_path):
    started = Launch(tmp_path / "cat.log", shutil.which("cat"))
    proc = started.proc
    try:
        proc.stdin.write(b"ping\n")
        proc.stdin.flush()
        assert read_line(proc) == b"ping\n"  # the server runs (whatever it set up before its exec is done)
        started.end_thread()
        # The spawning thread is gone: a parent-death signal tied to it would have killed the server.
        proc.stdin.write(b"pong\n")
        proc.stdin.flush()
        assert read_line(proc) == b"pong\n"
        (server,) = children_of(proc.pid)
        assert Path(f"/proc/{server}/cmdline").read_bytes() == shutil.which("cat").encode() + b"\0"
        # The SDK stops a server by SIGKILLing the process it started (the launcher): the server follows.
        proc.kill()
        assert proc.wait(LIMIT) == -signal.SIGKILL
        wait_until(lambda: not alive(server))
    finally:
        started.close()


def test_the_exit_status_and_stderr_are_the_servers(tmp_path):
    log = tmp_path / "s.log"
    proc = launch(log, "/bin/sh", "-c", "echo oops >&2; read line; exit 3")
    try:
        proc.stdin.close()  # end of stdin: the server's read ends and it exits 3
        assert proc.wait(LIMIT) == 3
        assert log.read_text() == "oops\n"
    finally:
        proc.kill()
        proc.wait(LIMIT)


def test_a_missing_program_is_exit_127_with_the_reason_logged(tmp_path):
    log = tmp_path / "m.log"
    proc = launch(log, str(tmp_path / "no-such-program"))
    try:
        assert proc.wait(LIMIT) == launcher.EXIT_CANNOT_RUN
        assert log.read_text() == f"cannot run {tmp_path / 'no-such-program'}: No such file or directory\n"
    finally:
        proc.kill()
        proc.wait(LIMIT)


def test_sigterm_to_the_launcher_reaches_the_server(tmp_path):
    proc = launch(tmp_path / "t.log", "/bin/sh", "-c", "trap 'exit 7' TERM; echo up; while :; do sleep 1; done")
    try:
        assert read_line(proc) == b"up\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(LIMIT) == 7
    finally:
        proc.kill()
        proc.wait(LIMIT)


def test_a_servers_stderr_is_copied_whole_and_rotated(tmp_path):
    log = tmp_path / "big.log"
    size = 3 * launcher.LOG_MAX_BYTES + 5
    proc = launch(log, sys.executable, "-c", f"import sys; sys.stderr.write('x' * {size})")
    try:
        assert proc.wait(LIMIT) == 0  # the launcher exits once it has copied what the server wrote
        older = Path(f"{log}.1")
        kept = log.stat().st_size + older.stat().st_size
        assert 0 < log.stat().st_size <= launcher.LOG_MAX_BYTES and older.stat().st_size <= launcher.LOG_MAX_BYTES
        assert kept > launcher.LOG_MAX_BYTES and log.read_bytes() + older.read_bytes() == b"x" * kept
    finally:
        proc.kill()
        proc.wait(LIMIT)


def test_the_log_rotates_at_its_cap_keeping_one_older_file(tmp_path):
    path = tmp_path / "r.log"
    log = launcher.RotatingLog(str(path), max_bytes=100)
    log.write(b"a" * 60)
    log.write(b"b" * 30)
    assert path.read_bytes() == b"a" * 60 + b"b" * 30
    log.write(b"c" * 20)  # 110 > 100: the current file becomes .1
    assert (path.read_bytes(), Path(f"{path}.1").read_bytes()) == (b"c" * 20, b"a" * 60 + b"b" * 30)
    log.write(b"d" * 250)  # larger than the cap alone: only its last 100 bytes are kept
    assert (path.read_bytes(), Path(f"{path}.1").read_bytes()) == (b"d" * 100, b"c" * 20)
    log.write(b"e")
    assert (path.read_bytes(), Path(f"{path}.1").read_bytes()) == (b"e", b"d" * 100)
    # Reopened (the next start of the server), it goes on from the file's size.
    again = launcher.RotatingLog(str(path), max_bytes=100)
    again.write(b"f" * 99)
    assert path.read_bytes() == b"e" + b"f" * 99 and Path(f"{path}.1").read_bytes() == b"d" * 100
