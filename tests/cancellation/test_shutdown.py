"""SIGTERM while saves are in flight and a turn streams: exit 0, every save whole or absent, the turn
``interrupted``, and the data dir consistent when reopened."""

from __future__ import annotations

import json
import signal

import httpx
import trio

from runtime import Runtime, RuntimeConfig
from tests.e2e.helpers import collect_until
from tests.e2e.process import ServerProcess
from tests.support import E2E_LIMIT
from web.client import AsyncClient

from .harness import check_invariants


async def test_sigterm_during_saves_and_a_streaming_turn(tmp_path):
    data = tmp_path / "data"
    proc = await ServerProcess(data).start()
    try:
        async with AsyncClient(proc.url, proc.token) as c:
            quiet = await c.create_thread(title="quiet")
            turn = await c.start_turn(quiet["id"], "some history to save")
            await collect_until(c, quiet["id"], lambda e: e["event"] == "turn.completed")
            busy = await c.create_thread(title="busy")
            streaming = await c.start_turn(busy["id"], "/slow 60\n" + " ".join(["word"] * 200))
            await collect_until(c, busy["id"], lambda e: e["event"] == "item.delta")

        outcomes: list[object] = []
        first_response = trio.Event()

        async def saver(index: int) -> None:
            async with httpx.AsyncClient(base_url=proc.url, headers={"Authorization": f"Bearer {proc.token}"},
                                         timeout=E2E_LIMIT) as http:
                for round_ in range(50):
                    try:
                        response = await http.put("/v1/sessions", json={
                            "thread_id": (quiet, busy)[index % 2]["id"], "session_id": f"s{index}"})
                    except httpx.TransportError as exc:  # the server went away mid-request
                        outcomes.append(type(exc).__name__)
                        return
                    outcomes.append(response.status_code)
                    first_response.set()

        with trio.fail_after(E2E_LIMIT):
            async with trio.open_nursery() as nursery:
                for index in range(6):
                    nursery.start_soon(saver, index)
                await first_response.wait()
                proc.process.send_signal(signal.SIGTERM)
                assert await proc.wait() == 0
        assert 200 in outcomes
    finally:
        proc.kill()

    async with Runtime.open(RuntimeConfig(data_dir=data)) as rt:
        state = await check_invariants(rt, data)
        for name, raw in state.files.items():
            doc = json.loads(raw)
            assert doc["metadata"]["id"] == name[:-5], name
            # Saved from the quiet thread: its completed turn. From the busy one: nothing had finished yet.
            expected = 2 if doc["metadata"]["thread_id"] == quiet["id"] else 0
            assert doc["metadata"]["message_count"] == len(doc["messages"]) == expected, name
        assert state.turns[streaming["id"]]["status"] == "interrupted"
        assert state.turns[streaming["id"]]["error"] == "server shutting down"
        assert state.turns[turn["id"]]["status"] == "completed"
