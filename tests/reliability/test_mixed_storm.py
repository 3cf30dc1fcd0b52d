"""A disconnect storm of mixed requests against a real server: ``PUT /v1/sessions``, ``POST
/v1/sessions``, SSE subscriptions and turn starts, whose clients drop the socket at seeded-random
moments (some in the middle of sending their request body), while two turns stream the whole time.

tests/cancellation/test_disconnect_storm.py storms PUTs only; this one mixes every kind of request a
client can abandon. Afterwards: no partial save (every file parses, no temp file, index and links
agree), no leaked task, subscriber, request handler or file descriptor (counted before and after),
and every engine still answers a save and a full turn.

Counting: ``harness.task_count`` leaves out turn tasks and hypercorn's per-connection tasks (a
connection's task lives as long as its socket, which is the client's to close), and ``open_fds``
leaves out sockets for the same reason. The app's own request tasks live under those connection
tasks, so ``support.app_tasks`` counts them separately: none may outlive its client. ``make test``
runs 150 requests; ``make reliability`` runs 1,000 (marker ``reliability``).
"""

from __future__ import annotations

import collections
import random

import httpx
import pytest
import trio

from runtime.errors import Conflict
from tests.cancellation.harness import check_invariants, task_count
from tests.cancellation.test_disconnect_storm import open_fds
from tests.conftest import start_server
from tests.e2e.helpers import wait_turn_end
from tests.support import CLIENT_TLS, E2E_LIMIT, InFlight, run_clients

from .support import AUTH, SEED, app_tasks, session_files

KINDS = ("put", "post", "sse", "turn", "raw")
WEIGHTS = (30, 15, 25, 20, 10)
DROPS = (0.0, 0.0005, 0.001, 0.003, 0.01, 0.05, None)  # seconds until the client drops; None: never
SLOW = "/slow 30\n" + " ".join(f"w{i}" for i in range(300))


async def raw_partial(url: str, rng: random.Random, body: bytes) -> None:
    """A PUT that stops in the middle of its headers or body, then closes the socket."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    request = (f"PUT /v1/sessions HTTP/1.1\r\nHost: {host}\r\nAuthorization: {AUTH['Authorization']}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body) + 64}\r\n\r\n").encode() + body
    cut = rng.randrange(1, len(request))
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        await stream.send_all(request[:cut])
        if rng.random() < 0.5:  # give the server the time to start on it before the drop
            with trio.move_on_after(rng.choice((0.001, 0.01, 0.05))):
                await stream.receive_some(1024)
    finally:
        await stream.aclose()


async def storm(nursery: trio.Nursery, tmp_path, *, requests: int, concurrency: int, seed: int):
    live = await start_server(nursery, tmp_path / "data", request_timeout=1.0)
    try:
        return await _storm(live, requests=requests, concurrency=concurrency, seed=seed)
    finally:
        live.shutdown.set()  # a graceful stop, also when the test failed (a cancelled server waits out its bounds)


async def _storm(live, *, requests: int, concurrency: int, seed: int):
    rt = live.runtime
    inflight = InFlight(live.running.app)
    rng = random.Random(seed)
    tally: collections.Counter = collections.Counter()

    async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=E2E_LIMIT, verify=CLIENT_TLS) as http:
        async with live.client() as client:
            threads = [(await client.create_thread(title=f"storm {i}"))["id"] for i in range(4)]
            # Threads 0-1 stream a long turn the whole time; 2-3 get a finished turn (something to rebuild)
            # and take the storm's turn starts.
            for thread_id in threads[:2]:
                await client.start_turn(thread_id, SLOW)
            for thread_id in threads[2:]:
                turn = await client.start_turn(thread_id, "hello there")
                await wait_turn_end(client, thread_id, turn["id"])
            for thread_id in threads:  # every engine spawned before counting
                await client.save_session(thread_id=thread_id)
        await inflight.settle()
        await check_invariants(rt, live.data_dir)  # once first: SQLite settles its fds (see open_fds)
        baseline = {"tasks": task_count(), "fds": open_fds(), "subscribers": rt.bus.subscriber_count,
                    "app tasks": app_tasks()}

        async def one_client(index: int) -> None:
            kind = rng.choices(KINDS, WEIGHTS)[0]
            thread_id = rng.choice(threads)
            drop_after = rng.choice(DROPS)
            if kind == "raw":
                body = f'{{"thread_id": "{thread_id}", "session_id": "s{rng.randrange(6)}"}}'.encode()
                await raw_partial(live.url, rng, body)
                tally["raw: dropped mid-request"] += 1
                return
            if kind == "sse" and drop_after is None:
                drop_after = rng.choice((0.02, 0.1, 0.3))
            status = None
            # Every client has its own connection, so dropping it really closes a socket.
            async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=E2E_LIMIT,
                                         verify=CLIENT_TLS) as own:
                with trio.move_on_after(drop_after if drop_after is not None else E2E_LIMIT):
                    if kind == "put":
                        body = {"thread_id": thread_id, "session_id": f"s{rng.randrange(6)}"}
                        if rng.random() < 0.2:
                            body["wait_for_idle"] = True
                        response = await own.put("/v1/sessions", json=body)
                        # 504: waited for an idle engine; 409: queued behind such a save past the timeout.
                        status, allowed = response.status_code, (200, 409, 504)
                    elif kind == "post":
                        response = await own.post("/v1/sessions", json={"thread_id": thread_id})
                        status, allowed = response.status_code, (201, 409)  # 409: a turn is running
                    elif kind == "turn":
                        prompt = rng.choice(("hi there", "/slow 0.2\nsome words to stream"))
                        response = await own.post(f"/v1/threads/{thread_id}/turns", json={"prompt": prompt})
                        # Never 504: a start waits for its commit, and the writer's batches take
                        # milliseconds here (p99 ~18 ms with session saves in them), far below the 1 s timeout.
                        status, allowed = response.status_code, (201, 409)
                    else:
                        wanted = rng.randrange(1, 40)
                        since = rng.choice((0, 0, 5, 50))
                        async with own.stream("GET", f"/v1/threads/{thread_id}/events",
                                              params={"since_seq": since}) as response:
                            assert response.status_code == 200
                            async for line in response.aiter_lines():
                                if line.startswith("data:"):
                                    wanted -= 1
                                    if wanted == 0:
                                        break  # the client has seen enough and goes away
                    if status is not None:
                        assert status in allowed, (kind, response.text)
            tally[f"{kind}: {'answered ' + str(status) if status is not None else 'dropped'}"] += 1

        with trio.fail_after(E2E_LIMIT * 6):
            await run_clients(requests, concurrency, one_client)
            await inflight.settle()

        # No partial save, whatever the moment of each drop.
        docs, temps, broken = session_files(live.data_dir)
        tally["partial saves"] = len(temps) + len(broken)
        assert temps == [] and broken == [], (temps, broken)
        # Turns still running (the two long ones, a storm turn perhaps) are stopped, so counts compare.
        for thread_id in threads:
            engine = rt.manager.engine(thread_id)
            if engine is not None and engine.active is not None:
                try:
                    await rt.interrupt_turn(thread_id, engine.active.id, timeout=10)
                except Conflict:
                    pass  # it ended by itself meanwhile
        await inflight.settle()
        state = await check_invariants(rt, live.data_dir)
        assert state.files, "no save ever completed"
        after = {"tasks": task_count(), "fds": open_fds(), "subscribers": rt.bus.subscriber_count,
                 "app tasks": app_tasks()}
        tally["leaked tasks"] = after["tasks"] - baseline["tasks"]
        tally["leaked request handlers"] = after["app tasks"] - baseline["app tasks"]
        tally["leaked subscribers"] = after["subscribers"] - baseline["subscribers"]
        tally["leaked fds"] = max(0, after["fds"] - baseline["fds"])
        assert (after["tasks"], after["subscribers"], after["app tasks"]) == (
            baseline["tasks"], baseline["subscribers"], baseline["app tasks"]), (seed, baseline, after)
        assert after["fds"] <= baseline["fds"], (seed, baseline, after)

        # Every engine still answers: a save, and a whole turn seen over SSE.
        async with live.client() as client:
            for thread_id in threads:
                assert (await http.put("/v1/sessions", json={"thread_id": thread_id})).status_code == 200
                turn = await client.start_turn(thread_id, "still there?")
                end = await wait_turn_end(client, thread_id, turn["id"])
                assert end["payload"]["status"] == "completed"
        await inflight.settle()
        await check_invariants(rt, live.data_dir)
    return tally


def _report(requests: int, seed: int, tally: collections.Counter) -> None:
    print(f"\ndisconnect storm of {requests} mixed requests (seed {seed}):")
    for name in sorted(tally):
        print(f"  {name}: {tally[name]}")


async def test_mixed_disconnect_storm_leaves_no_partial_save_or_leak(nursery, tmp_path):
    tally = await storm(nursery, tmp_path, requests=150, concurrency=25, seed=SEED)
    _report(150, SEED, tally)
    dropped = sum(v for k, v in tally.items() if "dropped" in k)
    assert dropped >= 40, f"seed {SEED}: too few drops to mean anything: {tally}"


@pytest.mark.reliability
async def test_reliability_disconnect_storm_1000(nursery, tmp_path):
    tally = await storm(nursery, tmp_path, requests=1000, concurrency=50, seed=SEED)
    _report(1000, SEED, tally)
