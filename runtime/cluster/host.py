"""One host of a cluster: its LeaseKeeper, its LISTEN connection and its sweeper, started with the Runtime
when the store is PostgreSQL (``Cluster.run`` in the Runtime's nursery; on SQLite nothing of this runs).

The sweeper (every ttl/2) takes over threads that have a running turn and no live owner (a dead host's),
so their turn is ended (``interrupted``, or carried on after a tool of unknown outcome / waiting for an
approval) even if nobody asks for the thread; the engine it starts then lives like any other (idle
eviction releases the lease).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import trio

from ..clock import utc_now
from ..errors import EngineUnavailable, NotFound, NotOwner, RuntimeFailure
from . import leases
from .listener import Listener

log = logging.getLogger(__name__)

# Threads the sweeper takes over per round at most (a dead host may leave many; the next round goes on).
SWEEP_BATCH = 100


def recover_for_takeover(conn: Any, thread_id: str) -> None:
    """The takeover recovery, in the lease's transaction: NotFound (nothing written, not even a lease row)
    for a thread that does not exist, else ``runtime.store.recover_thread`` (running turn -> interrupted,
    a tool of unknown outcome -> failed and the turn goes on, pending approvals stay pending)."""
    from ..store import recover_thread  # the store's public name (helper A's PostgreSQL slice)

    if conn.execute("SELECT 1 FROM threads WHERE id = ?", (thread_id,)).fetchone() is None:
        raise NotFound(f"Thread '{thread_id}' not found")
    recover_thread(conn, thread_id, utc_now())


def add_owners(conn: Any, found: list[dict[str, Any]]) -> None:
    """Set ``owner`` on each ThreadRecord in ``found`` (null when no live host holds its lease), inside the
    caller's read (one statement for all of them)."""
    if not found:
        return
    rows = conn.execute(
        "SELECT thread_id, owner, advertise_url, epoch, expires_at,"
        " (owner IS NOT NULL AND expires_at IS NOT NULL AND expires_at > now())"
        " FROM thread_leases WHERE thread_id = ANY(?)", ([record["id"] for record in found],)).fetchall()
    owners = {row[0]: leases.Lease(row[0], row[1], row[2], int(row[3]), leases._stamp(row[4]), bool(row[5])).record()
              for row in rows}
    for record in found:
        record["owner"] = owners.get(record["id"])


class Cluster:
    def __init__(self, runtime: Any, dsn: str, host_id: str, ttl: float) -> None:
        # ``runtime``: the Runtime (typed loosely: runtime.core imports this module, never the other way).
        self._runtime = runtime
        self.host_id = host_id
        self.keeper = leases.LeaseKeeper(runtime.store, host_id, lambda: getattr(runtime, "advertise_url", None), ttl,
                                         recover=recover_for_takeover)
        self.listener = Listener(dsn, runtime.bus.wake)
        self.sweeps = 0
        # A test seam like LeaseKeeper.renewal_gate: while set and not yet set off, no sweep round starts
        # (a host "dies" in tests/pg by stopping both its renewals and its sweeps).
        self.sweep_gate: trio.Event | None = None
        self._scope = trio.CancelScope()

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Until ``close``: the Runtime closes the cluster after its engines stopped and released their
        leases (a lease still held then simply expires; the LISTEN connection is closed)."""
        with self._scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.keeper.run)
                await nursery.start(self.listener.run)
                nursery.start_soon(self._sweep_loop)
                task_status.started()

    def close(self) -> None:
        self._scope.cancel(reason="runtime closing")

    async def sweep(self) -> list[str]:
        """One round: take over (and so recover) every thread with a running turn and no live owner."""
        orphans = await self._runtime.store.read(functools.partial(leases.orphaned_threads, limit=SWEEP_BATCH))
        taken = []
        for thread_id in orphans:
            try:
                await self._runtime.manager.handle(thread_id)
            except (NotOwner, NotFound, EngineUnavailable):
                continue  # another host was faster, the thread is gone, or we are shutting down
            except RuntimeFailure as exc:
                log.warning("could not take over thread %s: %s", thread_id, exc)
                continue
            taken.append(thread_id)
        self.sweeps += 1
        if taken:
            log.warning("host %s took over %d thread(s) with a running turn and no live owner: %s", self.host_id,
                        len(taken), ", ".join(taken))
        return taken

    async def _sweep_loop(self) -> None:
        while True:
            await trio.sleep(self.keeper.ttl / 2)
            if self.sweep_gate is not None:
                await self.sweep_gate.wait()
            try:
                await self.sweep()
            except RuntimeFailure as exc:  # the database is unreachable: the next round tries again
                log.warning("the sweep of host %s failed: %s", self.host_id, exc)
