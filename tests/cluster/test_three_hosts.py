"""Three hosts on one PostgreSQL over real sockets (issue 15, "Proof"; API.md v1.1, "Several hosts on one
PostgreSQL"):

- a thread created on one host is read, turned, saved and streamed on the others; SSE on host C follows a
  turn started on host B with no gap and no duplicate; a reader reconnecting on another host with
  ``Last-Event-ID`` gets the rest;
- failover: kill -9 of the owner during a turn: another host serves the thread within ``--lease-ttl`` +
  2 s, the turn is ``interrupted``, a new turn completes, no seq is reused;
- split brain: the owner SIGSTOPped past its lease, another host takes over and runs a turn, the old one
  SIGCONTed: it writes nothing more to the thread (the database refuses its epoch), and what it is asked
  is forwarded or refused, never served from its stale state.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import trio

from runtime.clock import parse_utc, utc_now
from tests.cluster.conftest import LEASE_TTL, TOKEN, Host, cluster
from tests.conftest import E2E_LIMIT
from tests.e2e.helpers import collect_until, comparable, stream_from, wait_turn_end
from web.client import ApiError

POLL = 0.05  # seconds between looks at a condition polled under a deadline


def ended(turn_id: str):
    return lambda e: e["event"] == "turn.completed" and e.get("turn_id") == turn_id


async def owner_of(host: Host, thread_id: str) -> dict[str, Any] | None:
    return (await host.client.get_thread(thread_id))["thread"]["owner"]


async def wait_until(predicate, what: str) -> None:
    with trio.fail_after(E2E_LIMIT):
        while not await predicate():
            await trio.sleep(POLL)


def strictly_increasing(events: list[dict[str, Any]]) -> bool:
    seqs = [e["seq"] for e in events]
    return seqs == sorted(set(seqs))


async def test_a_thread_lives_on_every_host_and_streams_across_them(tmp_path, pg_url):
    async with cluster(tmp_path, pg_url) as (a, b, c):
        infos = [await h.client.info() for h in (a, b, c)]
        assert [(i["host_id"], i["advertise_url"], i["store"]) for i in infos] == [
            ("h1", a.url, "postgresql"), ("h2", b.url, "postgresql"), ("h3", c.url, "postgresql")]
        assert all("postgres@" not in json.dumps(i) for i in infos)  # never the connection string

        thread = await a.client.create_thread(title="shared")
        thread_id = thread["id"]
        for host in (b, c):  # read on the others
            assert (await host.client.get_thread(thread_id))["thread"]["title"] == "shared"

        # SSE on C follows a turn started on B, no gap, no duplicate.
        async with trio.open_nursery() as nursery:
            followed: list[dict[str, Any]] = []
            subscribed = trio.Event()

            async def follow() -> None:
                async for event in c.client.events(thread_id, since_seq=0):
                    followed.append(event)
                    subscribed.set()
                    if event["event"] == "turn.completed":
                        return

            nursery.start_soon(follow)
            with trio.fail_after(E2E_LIMIT):
                await subscribed.wait()  # thread.created replayed: C's stream is live before the turn
            turn = await b.client.start_turn(thread_id, "hello from host b, streamed word by word")
        replay = await collect_until(a.client, thread_id, ended(turn["id"]))
        assert comparable(followed) == comparable(replay)
        assert strictly_increasing(followed)
        assert followed[-1]["payload"]["status"] == "completed"
        assert [e["event"] for e in followed].count("item.delta") >= 3

        owner = await owner_of(c, thread_id)
        assert owner is not None and owner["host_id"] in ("h1", "h2", "h3") and owner["epoch"] >= 1
        assert owner["advertise_url"] == {"h1": a.url, "h2": b.url, "h3": c.url}[owner["host_id"]]

        # Saved on a host that need not own it (PUT /v1/sessions asks the engine: forwarded to the owner).
        non_owners = [h for h in (a, b, c) if h.host_id != owner["host_id"]]
        saved = await non_owners[0].client.save_session(thread_id=thread_id)
        for host in (a, b, c):
            got = await host.client.get_session(saved["session_id"])
            assert got == saved["session"]
        assert len(saved["session"]["messages"]) == 2  # the turn's prompt and answer
        listed = await non_owners[1].client.list_sessions()
        assert [s["id"] for s in listed] == [saved["session_id"]]

        # A second turn from the third host; a reader that saw the first turn reconnects on yet another
        # host with Last-Event-ID and gets exactly the rest.
        last_seen = followed[-1]["seq"]
        second = await c.client.start_turn(thread_id, "and a second turn from host c")
        rest = await stream_from(a.url, TOKEN, thread_id, last_seen, second["id"])
        everything = await collect_until(b.client, thread_id, ended(second["id"]))
        assert comparable(followed + rest) == comparable(everything)
        assert rest[0]["seq"] > last_seen and rest[-1]["payload"]["status"] == "completed"
        detail = await a.client.get_thread(thread_id)
        assert [(t["id"], t["status"]) for t in detail["turns"]] == [(turn["id"], "completed"), (second["id"], "completed")]


async def test_kill_9_of_the_owner_during_a_turn_fails_over_within_the_lease(tmp_path, pg_url):
    async with cluster(tmp_path, pg_url) as hosts:
        a = hosts[0]
        thread_id = (await a.client.create_thread())["id"]
        turn = await a.client.start_turn(thread_id, "/slow 60\n" + " ".join(f"word{i}" for i in range(40)))
        before = await collect_until(a.client, thread_id, lambda e: e["event"] == "item.delta")
        owner = await owner_of(a, thread_id)
        assert owner is not None
        (dead,) = [h for h in hosts if h.host_id == owner["host_id"]]
        other = next(h for h in hosts if h is not dead)

        killed_at = time.monotonic()
        dead.server.process.kill()
        with trio.fail_after(E2E_LIMIT):
            assert await dead.server.process.wait() == -signal.SIGKILL

        # The next request on another host is served within the lease's length + 2 s.
        with trio.fail_after(LEASE_TTL + 2 + 1):  # +1: the request's own work, on a loaded machine
            new = await other.client.start_turn(thread_id, "after the failover")
        served_in = time.monotonic() - killed_at
        assert served_in <= LEASE_TTL + 2, served_in
        await wait_turn_end(other.client, thread_id, new["id"])

        detail = await other.client.get_thread(thread_id)
        statuses = {t["id"]: t["status"] for t in detail["turns"]}
        assert statuses == {turn["id"]: "interrupted", new["id"]: "completed"}
        taken = detail["thread"]["owner"]
        assert taken["host_id"] == other.host_id and taken["epoch"] > owner["epoch"]
        everything = await collect_until(other.client, thread_id, ended(new["id"]))
        assert strictly_increasing(everything)  # no seq reused
        assert comparable(before) == comparable(everything[:len(before)])
        ends = [e for e in everything if e["event"] == "turn.completed"]
        assert [(e["turn_id"], e["payload"]["status"]) for e in ends] == [(turn["id"], "interrupted"),
                                                                           (new["id"], "completed")]


async def test_an_owner_paused_past_its_lease_writes_nothing_more_after_another_host_took_over(tmp_path, pg_url):
    async with cluster(tmp_path, pg_url) as hosts:
        a = hosts[0]
        thread_id = (await a.client.create_thread())["id"]
        turn = await a.client.start_turn(thread_id, "/slow 60\n" + " ".join(f"word{i}" for i in range(40)))
        await collect_until(a.client, thread_id, lambda e: e["event"] == "item.delta")
        owner = await owner_of(a, thread_id)
        (old,) = [h for h in hosts if h.host_id == owner["host_id"]]
        new_host = next(h for h in hosts if h is not old)

        os.kill(old.pid, signal.SIGSTOP)
        try:
            async def expired() -> bool:
                current = await owner_of(new_host, thread_id)
                return current is None or parse_utc(current["expires_at"]) < parse_utc(utc_now())

            await wait_until(expired, "the paused owner's lease to expire")
            taken = await new_host.client.start_turn(thread_id, "served by the new owner")
            await wait_turn_end(new_host.client, thread_id, taken["id"])
            now_owner = await owner_of(new_host, thread_id)
            assert now_owner["host_id"] == new_host.host_id and now_owner["epoch"] > owner["epoch"]
            log_before = await collect_until(new_host.client, thread_id, ended(taken["id"]))
        finally:
            os.kill(old.pid, signal.SIGCONT)

        # The old owner wakes with an engine mid-turn that still believes it owns the thread. What it is
        # asked now is forwarded to the new owner or refused, never served from that engine.
        try:
            third = await old.client.start_turn(thread_id, "asked of the old owner")
        except ApiError as error:
            assert error.status == 503 and error.code == "not_owner", error
            third = None
        if third is not None:
            await wait_turn_end(new_host.client, thread_id, third["id"])
        detail = await new_host.client.get_thread(thread_id)
        assert detail["thread"]["owner"]["host_id"] == new_host.host_id
        assert detail["thread"]["owner"]["epoch"] == now_owner["epoch"]
        expected = {turn["id"]: "interrupted", taken["id"]: "completed"}
        if third is not None:
            expected[third["id"]] = "completed"
        assert {t["id"]: t["status"] for t in detail["turns"]} == expected

        # Nothing more from the old owner: the log up to the new owner's turn is unchanged, and nothing
        # after it belongs to the old turn.
        last = third["id"] if third is not None else taken["id"]
        everything = await collect_until(new_host.client, thread_id, ended(last)) if third else \
            await collect_until(new_host.client, thread_id, ended(taken["id"]))
        assert comparable(everything[:len(log_before)]) == comparable(log_before)
        assert not [e for e in everything[len(log_before):] if e.get("turn_id") == turn["id"]]
        assert strictly_increasing(everything)
        old_turn_end = [e for e in everything if e["event"] == "turn.completed" and e["turn_id"] == turn["id"]]
        assert len(old_turn_end) == 1 and old_turn_end[0]["payload"]["status"] == "interrupted"
        assert (await old.client.health())["status"] == "ok"  # the old host lives on, fenced
