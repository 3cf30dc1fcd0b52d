"""The launcher every stdio MCP server runs under: ``python -I -S launcher.py RUNTIME_PID LOG_PATH COMMAND [ARGS...]``.

Why it exists: a stdio server whose runtime is killed with SIGKILL must die too, and reading EOF on its stdin
is only a convention (a server may ignore it). Linux's ``PR_SET_PDEATHSIG`` kills a process when the THREAD
that forked it exits, and the MCP SDK spawns its child through ``anyio.open_process`` -> trio's
``open_process``, which runs ``subprocess.Popen`` in a trio worker thread; those threads exit after 10 s idle,
so the parent-death signal set on the server directly would kill a healthy server about 10 s after its
start. So the SDK spawns this launcher (any thread may; the launcher watches the runtime PROCESS through a
pidfd), and the launcher forks the server itself: the server's parent is the launcher's only thread, and
``PR_SET_PDEATHSIG(SIGKILL)`` on the server is exact.

- The runtime dies (any way, kill -9 included): the launcher's pidfd of the runtime becomes readable; it
  kills its process group (the SDK starts it in a new session: the server and anything the server started)
  with SIGKILL, itself included.
- The launcher dies (the SDK SIGKILLs it when a server is stopped by cancellation): the kernel SIGKILLs the
  server (parent-death signal).
- The server exits: the launcher exits with its status (128 + N for a signal N), so the SDK sees the same
  end as without a launcher. SIGTERM/SIGINT/SIGHUP sent to the launcher are forwarded to the server.
- The server's stderr is a pipe the launcher copies into LOG_PATH, rotated at LOG_MAX_BYTES (the previous
  file kept as LOG_PATH + ".1"): a chatty server cannot fill the disk, and no blocking file write happens on
  the runtime's event loop.

Both races are closed: the launcher checks, after opening the runtime's pidfd, that its parent is still the
runtime (else the runtime died before it could watch it); the server checks, after prctl, that its parent
is still the launcher.

Standard library only, run with ``-I -S`` (no site-packages, no environment-driven imports): it starts in
tens of milliseconds and cannot be broken by the server's environment.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys

# prctl(2) option number from <linux/prctl.h>.
PR_SET_PDEATHSIG = 1
# Where a server's stderr log is rotated: 1 MiB kept in the current file plus one older file (API.md's data
# dir layout bounds each server's logs to 2 MiB).
LOG_MAX_BYTES = 1 << 20
# Exit status when the command cannot be run (the shell's convention for "not found / not executable").
EXIT_CANNOT_RUN = 127
READ_CHUNK = 65536
# Chunks of stderr copied after the server exited (its last words; a grandchild holding the pipe may write on).
DRAIN_CHUNKS = 64


class RotatingLog:
    """Appends to ``path``; past ``max_bytes`` renames it to ``path + '.1'`` (replacing the older one) and
    starts a fresh file. A failing disk drops output rather than stopping the server."""

    def __init__(self, path: str, max_bytes: int = LOG_MAX_BYTES) -> None:
        self.path, self.max_bytes = path, max_bytes
        self.fd = -1
        self.size = 0
        self._open()

    def _open(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self.size = os.fstat(self.fd).st_size
        except OSError:
            self.fd = -1

    def write(self, data: bytes) -> None:
        if self.fd < 0:
            return
        try:
            if self.size and self.size + len(data) > self.max_bytes:
                os.close(self.fd)
                os.replace(self.path, self.path + ".1")
                self._open()
                if self.fd < 0:
                    return
            data = data[-self.max_bytes:]
            os.write(self.fd, data)
            self.size += len(data)
        except OSError:
            pass


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        sys.stderr.write("usage: launcher.py RUNTIME_PID LOG_PATH COMMAND [ARGS...]\n")
        return 2
    runtime_pid, log_path, command = int(argv[1]), argv[2], argv[3:]
    try:
        runtime = os.pidfd_open(runtime_pid)
    except ProcessLookupError:
        return 1
    if os.getppid() != runtime_pid:  # the runtime died before the pidfd was opened: do not start
        return 1
    libc = ctypes.CDLL(None, use_errno=True)
    log = RotatingLog(log_path)
    err_r, err_w = os.pipe()
    me = os.getpid()
    child = 0

    def forward(signum: int, _frame: object) -> None:
        if child > 0:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    # Installed before the fork and blocked across it: a signal sent once the server may be running
    # (it could be told it is up before this process returns from fork) is forwarded, never lost, and
    # never kills the launcher by its default action.
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for sig in forwarded:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
    pid = os.fork()
    if pid == 0:  # the server
        try:
            for sig in forwarded:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != me:
                os._exit(1)  # the launcher is already gone (or prctl failed): never run unwatched
            os.dup2(err_w, 2)
            os.close(err_w), os.close(err_r), os.close(runtime)
            # Python ignores SIGPIPE and SIGXFSZ; an exec'd program expects the defaults (as Popen restores).
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            os.execvp(command[0], command)
        except OSError as exc:
            os.write(2, f"cannot run {command[0]}: {exc.strerror}\n".encode(errors="replace"))
        os._exit(EXIT_CANNOT_RUN)

    os.close(err_w)
    # The server alone holds the runtime's pipes: its exit (or its closing stdout) is what the runtime sees.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0), os.dup2(null, 1)
    os.close(null)

    child = pid
    signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
    server = os.pidfd_open(pid)
    poller = select.poll()
    for fd in (runtime, server, err_r):
        poller.register(fd, select.POLLIN)
    stderr_open = True
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if runtime in ready:
            if os.getpgrp() == os.getpid():
                os.killpg(os.getpid(), signal.SIGKILL)  # the server, its children, and this launcher
            os.kill(pid, signal.SIGKILL)
            return 1
        if err_r in ready and stderr_open:
            data = os.read(err_r, READ_CHUNK)
            if data:
                log.write(data)
            else:
                poller.unregister(err_r)
                stderr_open = False
        if server in ready:
            _, status = os.waitpid(pid, 0)
            for _ in range(DRAIN_CHUNKS):  # what it wrote before exiting (bounded: a grandchild may go on)
                if not (stderr_open and select.select([err_r], [], [], 0)[0]):
                    break
                data = os.read(err_r, READ_CHUNK)
                if not data:
                    break
                log.write(data)
            return _exit_code(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
