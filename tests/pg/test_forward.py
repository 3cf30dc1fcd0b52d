"""Forwarding between hosts over real sockets (web/forward.py): two servers (run_server, each with its own
Runtime) on one PostgreSQL database in one trio process. A request for a thread another host owns is
served by the owner (its Idempotency-Key replays on either host); a request that was already forwarded is
never forwarded again; an owner that cannot be reached is waited out (its lease expires) and the thread is
taken over and served here."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import AsyncIterator

import httpx
import trio

from runtime import RuntimeConfig
from web.cli import RunningServer, run_server
from web.forward import FORWARDED_BY
from web.settings import ServerSettings

TOKEN = "cluster-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TTL = 1.5  # lease ttl (seconds): expiry within the test, renewal every 0.5 s
WAIT = 30  # bound on every wait (real time)


@contextlib.asynccontextmanager
async def server(tmp_path: Path, url: str, host_id: str, **config) -> AsyncIterator[RunningServer]:
    settings = ServerSettings(port=0, data_dir=tmp_path / host_id, auth_token=TOKEN, graceful_seconds=0.5)
    runtime_config = RuntimeConfig(data_dir=tmp_path / host_id, store_url=url, host_id=host_id, lease_ttl=TTL,
                                   **config)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        running = await nursery.start(lambda task_status: run_server(settings, runtime_config, shutdown=shutdown,
                                                                     task_status=task_status))
        try:
            yield running
        finally:
            shutdown.set()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_turn_posted_to_another_host_is_served_by_the_owner_and_its_key_replays(tmp_path, pg_url):
    async with server(tmp_path, pg_url, "h1") as one, server(tmp_path, pg_url, "h2") as two, \
            httpx.AsyncClient(headers=AUTH, timeout=WAIT) as http:
        assert one.runtime.advertise_url == one.url and one.url != two.url
        thread = (await http.post(f"{one.url}/v1/threads", json={"title": "t"})).json()
        tid = thread["id"]
        first = await http.post(f"{one.url}/v1/threads/{tid}/turns", json={"prompt": "hello"})
        assert first.status_code in (200, 201, 202), first.text
        assert (await http.get(f"{two.url}/v1/threads/{tid}")).json()["thread"]["owner"]["host_id"] == "h1"

        # Wait for the first turn to end (on h1) so the next one is not refused as busy.
        with trio.fail_after(WAIT):
            while (await http.get(f"{two.url}/v1/threads/{tid}")).json()["turns"][0]["status"] != "completed":
                await trio.sleep(0.05)
        keyed = {"Idempotency-Key": "fwd-1"}
        forwarded = await http.post(f"{two.url}/v1/threads/{tid}/turns", json={"prompt": "via h2"}, headers=keyed)
        assert forwarded.status_code == first.status_code, forwarded.text
        turn = forwarded.json()
        assert turn["thread_id"] == tid if "thread_id" in turn else True
        assert two.runtime.manager.engine(tid) is None  # h2 never ran an engine for it
        assert one.runtime.manager.engine(tid) is not None
        for where in (two.url, one.url):  # the stored answer, byte for byte, on either host
            again = await http.post(f"{where}/v1/threads/{tid}/turns", json={"prompt": "via h2"}, headers=keyed)
            assert again.status_code == forwarded.status_code
            assert again.headers["Idempotent-Replayed"] == "true"
            assert again.content == forwarded.content
        detail = (await http.get(f"{two.url}/v1/threads/{tid}")).json()
        assert [t["id"] for t in detail["turns"]].count(turn["id"]) == 1 and len(detail["turns"]) == 2

        # Loop guard: a request that was forwarded once is answered 503 not_owner, naming the owner.
        looped = await http.patch(f"{two.url}/v1/threads/{tid}", json={"title": "x"}, headers={FORWARDED_BY: "h9"})
        assert looped.status_code == 503
        error = looped.json()["error"]
        assert error["code"] == "not_owner" and "h1" in error["message"] and "h9" in error["message"]
        assert (await http.get(f"{one.url}/v1/threads/{tid}")).json()["thread"]["title"] == "t"
        # Without the header, the same PATCH is forwarded and done once.
        patched = await http.patch(f"{two.url}/v1/threads/{tid}", json={"title": "x"})
        assert patched.status_code == 200 and patched.json()["title"] == "x"


async def test_an_unreachable_owner_is_waited_out_and_the_thread_taken_over(tmp_path, pg_url):
    async with server(tmp_path, pg_url, "h1") as one, server(tmp_path, pg_url, "h2") as two, \
            httpx.AsyncClient(headers=AUTH, timeout=WAIT) as http:
        # h1 advertises a port nobody listens on, and then stops renewing: like a host that died.
        one.runtime.advertise_url = f"http://127.0.0.1:{closed_port()}"
        tid = (await http.post(f"{one.url}/v1/threads", json={"title": "t"})).json()["id"]
        assert (await http.patch(f"{one.url}/v1/threads/{tid}", json={"title": "by h1"})).status_code == 200
        one.runtime.cluster.keeper.renewal_gate = trio.Event()
        start = trio.current_time()
        answer = await http.patch(f"{two.url}/v1/threads/{tid}", json={"title": "by h2"})
        took = trio.current_time() - start
        assert answer.status_code == 200, answer.text
        assert answer.json()["title"] == "by h2"
        assert answer.json()["owner"]["host_id"] == "h2" and answer.json()["owner"]["epoch"] == 2
        assert took <= TTL + 2.5, took  # bounded by the lease's remaining time + 1 s (plus the hop)
        assert two.runtime.manager.engine(tid) is not None
        one.runtime.cluster.keeper.renewal_gate.set()


async def test_a_remembered_owner_that_moved_on_is_looked_up_again(tmp_path, pg_url):
    async with server(tmp_path, pg_url, "h1") as one, server(tmp_path, pg_url, "h2") as two, \
            server(tmp_path, pg_url, "h3") as three, httpx.AsyncClient(headers=AUTH, timeout=WAIT) as http:
        tid = (await http.post(f"{one.url}/v1/threads", json={"title": "t"})).json()["id"]
        assert (await http.patch(f"{one.url}/v1/threads/{tid}", json={"title": "a"})).status_code == 200
        assert (await http.patch(f"{two.url}/v1/threads/{tid}", json={"title": "b"})).status_code == 200
        assert two.runtime.cluster.keeper._foreign[tid][0].owner == "h1"  # h2 remembers h1 as the owner
        # h1 lets the thread go (its engine stops, the lease is released) and h3 takes it.
        await one.runtime.manager.shutdown(tid)
        assert (await http.patch(f"{three.url}/v1/threads/{tid}", json={"title": "c"})).status_code == 200
        # h2 still forwards to h1 first; h1 answers "not the owner" (loop guard); h2 looks again, finds h3.
        moved = await http.patch(f"{two.url}/v1/threads/{tid}", json={"title": "d"})
        assert moved.status_code == 200, moved.text
        assert moved.json()["title"] == "d" and moved.json()["owner"]["host_id"] == "h3"
        assert two.runtime.cluster.keeper._foreign[tid][0].owner == "h3"
        assert one.runtime.manager.engine(tid) is None and two.runtime.manager.engine(tid) is None
