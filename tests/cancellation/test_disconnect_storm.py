"""Client disconnects against a real server: many PUTs whose clients drop the socket at seeded-random
moments while turns stream. Afterwards every session file parses, every link points to an existing
file, the engines answer, and no task or file descriptor leaked.

The short storm runs in ``make test``; ``make soak`` runs a long one (marker ``soak``).
"""

from __future__ import annotations

import os
import random

import httpx
import pytest
import trio

from tests.conftest import start_server
from tests.support import CLIENT_TLS, E2E_LIMIT, InFlight, run_clients

from .harness import check_invariants, task_count

SEED = int(os.environ.get("TRIO_RUNTIME_TEST_SEED", "1125"))


def open_fds() -> int:
    """Open file descriptors other than sockets. Sockets are left out because hypercorn closes a dropped
    client's connection only after its keep-alive timeout (see harness.LEGITIMATE); our code opens
    files (SQLite, session files), and those must all be closed again."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except FileNotFoundError:  # the fd listdir itself used
            pass
    return count


async def storm(nursery: trio.Nursery, tmp_path, *, clients: int, concurrency: int, seed: int) -> dict[str, int]:
    # A short request timeout: the clients that wait for an idle engine get their 504 quickly.
    live = await start_server(nursery, tmp_path / "data", request_timeout=1.0)
    rt = live.runtime
    inflight = InFlight(live.running.app)
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {live.token}"}
    tally = {"completed": 0, "dropped": 0}

    async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=E2E_LIMIT, verify=CLIENT_TLS) as http:
        threads = [(await http.post("/v1/threads", json={"title": f"t{i}"})).json()["id"] for i in range(3)]
        # Streaming turns keep the engines and the writer busy the whole time.
        for thread_id in threads[:2]:
            await http.post(f"/v1/threads/{thread_id}/turns",
                            json={"prompt": "/slow 30\n" + " ".join(f"w{i}" for i in range(300))})
        for thread_id in threads:  # spawn every engine before counting tasks
            assert (await http.put("/v1/sessions", json={"thread_id": thread_id})).status_code == 200
        await inflight.settle()
        # Once first: SQLite keeps one fd of a closed connection while another holds locks on the file.
        await check_invariants(rt, live.data_dir)
        baseline_tasks, baseline_fds = task_count(), open_fds()

        async def one_client(index: int) -> None:
            body = {"thread_id": rng.choice(threads), "session_id": f"s{rng.randrange(6)}"}
            if rng.random() < 0.2:
                body["wait_for_idle"] = True
            drop_after = rng.choice([0.0, 0.0005, 0.001, 0.003, 0.01, 0.05, None])
            # Every client has its own connection, so dropping it really closes a socket.
            async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=E2E_LIMIT,
                                         verify=CLIENT_TLS) as own:
                with trio.move_on_after(drop_after if drop_after is not None else E2E_LIMIT) as scope:
                    response = await own.put("/v1/sessions", json=body)
                    # 504: waited for an idle engine; 409: queued behind such a save past the timeout.
                    assert response.status_code in (200, 409, 504), response.text
            tally["dropped" if scope.cancelled_caught else "completed"] += 1

        with trio.fail_after(E2E_LIMIT * 6):
            await run_clients(clients, concurrency, one_client)
            await inflight.settle()
        # The streaming turns are still running: stop them so the counts compare like with like.
        for thread_id in threads[:2]:
            engine = rt.manager.engine(thread_id)
            if engine is not None and engine.active is not None:
                await rt.interrupt_turn(thread_id, engine.active.id, timeout=10)
        state = await check_invariants(rt, live.data_dir)
        assert state.files, "no save ever completed"
        for thread_id in threads:
            assert (await http.put("/v1/sessions", json={"thread_id": thread_id})).status_code == 200
        await inflight.settle()
        await check_invariants(rt, live.data_dir)
        # Turn tasks are not counted (see harness.task_count); everything else must be back where it was.
        assert task_count() == baseline_tasks, f"tasks leaked (seed {seed})"
    assert open_fds() <= baseline_fds, f"file descriptors leaked (seed {seed})"
    live.shutdown.set()
    return tally


async def test_200_clients_dropping_puts_mid_flight_leave_everything_whole(nursery, tmp_path):
    tally = await storm(nursery, tmp_path, clients=200, concurrency=20, seed=SEED)
    print(f"\ndisconnect storm (seed {SEED}): {tally}")
    assert tally["dropped"] >= 50 and tally["completed"] >= 10, f"seed {SEED}: {tally}"


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(5))
async def test_soak_disconnect_storm(nursery, tmp_path, seed):
    tally = await storm(nursery, tmp_path, clients=2000, concurrency=50, seed=SEED * 100 + seed)
    print(f"\nsoak storm (seed {SEED * 100 + seed}): {tally}")
