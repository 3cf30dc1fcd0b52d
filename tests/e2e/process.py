"""Run ``trio-runtime serve`` as a real subprocess and read its startup line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import trio

from tests.conftest import E2E_LIMIT
from tests.support import serve_store_args


class ServerProcess:
    def __init__(self, data_dir: Path, *extra: str, token: str = "proc-token", cwd: Path | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.data_dir = data_dir
        self.token = token
        self.cwd = cwd
        self.preexec_fn = preexec_fn  # runs in the child before exec (e.g. a resource limit)
        # In a whole-suite run on PostgreSQL the server opens its data dir's database (tests/support.py), unless
        # the test chooses a store itself.
        store = [] if "--store" in extra else serve_store_args(data_dir)
        self.args = [sys.executable, "-m", "web.cli", "serve", "--port", "0", "--data-dir", str(data_dir),
                     "--auth-token", token, "--log-level", "warning", *store, *extra]
        self.process: trio.Process | None = None
        self.url: str | None = None
        self.output: list[str] = []

    async def start(self) -> "ServerProcess":
        self.process = await trio.lowlevel.open_process(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=self.cwd, preexec_fn=self.preexec_fn)
        buffer = b""
        with trio.fail_after(E2E_LIMIT):
            while self.url is None:
                chunk = await self.process.stdout.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"server exited before listening: {buffer.decode(errors='replace')}")
                buffer += chunk
                for line in buffer.decode(errors="replace").splitlines():
                    if line.startswith("trio-runtime listening on "):
                        self.url = line.split(" on ", 1)[1].strip()
        self.output.append(buffer.decode(errors="replace"))
        return self

    async def read_until(self, text: str) -> str:
        """Read the output until ``text`` appears in it (keeps what it read for ``drain``)."""
        assert self.process is not None
        with trio.fail_after(E2E_LIMIT):
            while text not in "".join(self.output):
                chunk = await self.process.stdout.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"output ended without {text!r}: {''.join(self.output)}")
                self.output.append(chunk.decode(errors="replace"))
        return "".join(self.output)

    async def drain(self) -> str:
        """Read the rest of the output until the process closes it."""
        assert self.process is not None
        with trio.fail_after(E2E_LIMIT):
            while chunk := await self.process.stdout.receive_some(4096):
                self.output.append(chunk.decode(errors="replace"))
        return "".join(self.output)

    async def wait(self) -> int:
        assert self.process is not None
        with trio.fail_after(E2E_LIMIT):
            return await self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
