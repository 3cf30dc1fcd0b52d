"""The real ``trio-runtime serve`` process: startup line, graceful SIGTERM/SIGINT, SIGKILL recovery."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import trio

from tests.e2e.helpers import collect_until
from tests.e2e.process import ServerProcess
from web.client import AsyncClient


@pytest.fixture
async def proc(tmp_path):
    server = ServerProcess(tmp_path / "data")
    await server.start()
    yield server
    server.kill()


async def test_serve_prints_the_real_port_and_answers_health(proc):
    assert proc.url.startswith("http://127.0.0.1:") and not proc.url.endswith(":0")
    async with AsyncClient(proc.url, proc.token) as c:
        assert (await c.health())["status"] == "ok"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_interrupts_running_turns_and_exits_zero(tmp_path, signum):
    proc = await ServerProcess(tmp_path / "data").start()
    try:
        async with AsyncClient(proc.url, proc.token) as c:
            thread = await c.create_thread()
            turn = await c.start_turn(thread["id"], "/hang")
            # An open SSE stream must not hold the shutdown up.
            async with trio.open_nursery() as nursery:
                ready = trio.Event()

                async def listen():
                    async for event in c.events(thread["id"]):
                        if event["event"] == "turn.started":
                            ready.set()

                nursery.start_soon(listen)
                await ready.wait()
                proc.process.send_signal(signum)
                assert await proc.wait() == 0
                nursery.cancel_scope.cancel()
        restarted = await ServerProcess(tmp_path / "data").start()
        try:
            async with AsyncClient(restarted.url, restarted.token) as c:
                detail = await c.get_thread(thread["id"])
            record = detail["turns"][0]
            assert record["id"] == turn["id"] and record["status"] == "interrupted"
            assert record["error"] == "server shutting down"
        finally:
            restarted.kill()
    finally:
        proc.kill()


async def test_sigkill_leaves_the_turn_interrupted_and_seq_increasing(tmp_path):
    proc = await ServerProcess(tmp_path / "data").start()
    async with AsyncClient(proc.url, proc.token) as c:
        thread = await c.create_thread()
        turn = await c.start_turn(thread["id"], "/slow 600\n" + " ".join(["never finished"] * 20))
        seen = await collect_until(c, thread["id"], lambda e: e["event"] == "item.delta")
    proc.process.kill()
    await proc.wait()

    again = await ServerProcess(tmp_path / "data").start()
    try:
        async with AsyncClient(again.url, again.token) as c:
            detail = await c.get_thread(thread["id"])
            record = detail["turns"][0]
            assert record["status"] == "interrupted" and record["error"] == "interrupted by process restart"
            assert detail["latest_seq"] > seen[-1]["seq"]
            events = await collect_until(c, thread["id"], lambda e: e["event"] == "turn.completed")
            assert events[-1]["payload"]["status"] == "interrupted"
            seqs = [e["seq"] for e in events]
            assert seqs == sorted(set(seqs)) and set(e["seq"] for e in seen) <= set(seqs)
            # New events continue above every seq from before the crash.
            fresh = await c.create_thread()
            assert (await c.get_thread(fresh["id"]))["latest_seq"] > detail["latest_seq"]
            assert turn["id"] == record["id"]
    finally:
        again.kill()


def test_insecure_no_auth_is_refused_on_a_non_loopback_host(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "web.cli", "serve", "--host", "0.0.0.0", "--insecure-no-auth",
         "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--insecure-no-auth is refused on the non-loopback host '0.0.0.0'" in result.stderr


def test_version_flag():
    result = subprocess.run([sys.executable, "-m", "web.cli", "--version"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("trio-runtime ")
