"""Thread leases on PostgreSQL: one owner per thread, with an epoch that fences the old owner's writes.

The table is ``thread_leases (thread_id, owner, advertise_url, epoch, expires_at)`` (the PostgreSQL
migrations create it). Expiry is decided by the DATABASE clock only (``now()``): hosts' clocks never
meet, so two hosts can never disagree about whether a lease is live. A host keeps its own conservative
view on top (``LeaseKeeper``): a lease is known valid until the monotonic time at which the renewal
that last extended it STARTED, plus the ttl; the database extended it to its own ``now()`` (later) plus
the ttl, so the local view always ends first.

The SQL functions below take a connection whose ``execute`` uses ``?`` placeholders (the store's
PostgreSQL adapter, or ``QmarkConnection`` around a plain psycopg connection), and run inside the
caller's transaction: ``acquire`` runs in a store write, so the epoch bump and the takeover recovery
of the thread commit together, or neither does.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import logging
from typing import Any, Callable

import trio

from ..errors import NotOwner, RuntimeFailure

log = logging.getLogger(__name__)

# Turn statuses that mean "someone must be running this turn" (as SQLite's restart recovery and
# records.threads_with_active_turns read them).
RUNNING_STATUSES = ("queued", "in_progress", "awaiting_approval")
# Other hosts' leases a host remembers at most (one entry per thread it forwarded recently; oldest dropped).
FOREIGN_REMEMBERED = 10_000


@dataclasses.dataclass(frozen=True)
class Lease:
    """One row of ``thread_leases`` as a host sees it. ``live``: held and not expired by the database's
    clock at the moment it was read."""

    thread_id: str
    owner: str | None
    advertise_url: str | None
    epoch: int
    expires_at: str | None
    live: bool

    def record(self) -> dict[str, Any] | None:
        """ThreadRecord's ``owner`` (API.md, "Several hosts"): null when no host holds the lease."""
        if self.owner is None or not self.live:
            return None
        return {"host_id": self.owner, "advertise_url": self.advertise_url, "epoch": self.epoch,
                "expires_at": self.expires_at}


@dataclasses.dataclass(frozen=True)
class Acquired:
    """What ``acquire`` did: ``lease`` is the row after it. ``taken``: the epoch was bumped (the lease was
    free, released or expired); ``previous_owner``: who held it before (None when free or released)."""

    lease: Lease
    taken: bool
    previous_owner: str | None


def _stamp(value: Any) -> str | None:
    """A TIMESTAMPTZ as the API's RFC 3339 UTC text with milliseconds (runtime.clock.utc_now's format)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    value = value.astimezone(_dt.timezone.utc)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


_SELECT = ("SELECT thread_id, owner, advertise_url, epoch, expires_at,"
           " (owner IS NOT NULL AND expires_at IS NOT NULL AND expires_at > now()) AS live"
           " FROM thread_leases WHERE thread_id = ?")


def _lease(row: Any) -> Lease:
    return Lease(row[0], row[1], row[2], int(row[3]), _stamp(row[4]), bool(row[5]))


def lease_of(conn: Any, thread_id: str) -> Lease | None:
    """The thread's lease row (None when no host ever held or wrote it); the owner lookup."""
    row = conn.execute(_SELECT, (thread_id,)).fetchone()
    return None if row is None else _lease(row)


def owner_for(conn: Any, thread_id: str) -> tuple[Lease | None, float]:
    """The lease and the seconds it has left by the database clock (0 when not live)."""
    row = conn.execute(_SELECT.replace(" AS live", " AS live, EXTRACT(EPOCH FROM (expires_at - now())) AS left"),
                       (thread_id,)).fetchone()
    if row is None:
        return None, 0.0
    lease = _lease(row)
    return lease, float(row[6]) if lease.live and row[6] is not None else 0.0


def acquire(conn: Any, thread_id: str, host_id: str, advertise_url: str | None, ttl: float,
            recover: Callable[[Any, str], Any] | None = None) -> Acquired:
    """Take the thread's lease for ``host_id``, or renew it when this host already holds it live (same
    epoch). Raises NotOwner (nothing changed) while another host holds it live.

    Taking it (free, released, or expired by the database clock, also our own expired one) bumps the
    epoch: every write of the old epoch is refused from then on (fencing). ``recover(conn, thread_id)``
    runs right after, in the same transaction: a turn the previous engine was running is ended as a
    restart ends it, before the new engine restores from the store. It also runs on a renewal: the
    caller acquires only when this host has no engine for the thread, so any turn still running in the
    store is orphaned (an engine of ours that lost its local validity and retired without a write).

    The row lock (``FOR UPDATE``) serialises this with every event write of the thread (the seq rule,
    docs/design.md "seq on PostgreSQL"): the old owner's write either commits before the bump or is
    refused after it."""
    conn.execute("INSERT INTO thread_leases (thread_id) VALUES (?) ON CONFLICT (thread_id) DO NOTHING", (thread_id,))
    before = _lease(conn.execute(_SELECT + " FOR UPDATE", (thread_id,)).fetchone())
    if before.live and before.owner != host_id:
        raise NotOwner(before.owner or "", before.advertise_url or "", thread_id)
    taken = not (before.live and before.owner == host_id)
    row = conn.execute(
        "UPDATE thread_leases SET owner = ?, advertise_url = ?, epoch = epoch + ?,"
        " expires_at = now() + ? * interval '1 second' WHERE thread_id = ?"
        " RETURNING thread_id, owner, advertise_url, epoch, expires_at, TRUE",
        (host_id, advertise_url, 1 if taken else 0, float(ttl), thread_id)).fetchone()
    if recover is not None:
        recover(conn, thread_id)
    return Acquired(_lease(row), taken, before.owner if taken and before.owner else None)


def renew(conn: Any, host_id: str, held: dict[str, int], ttl: float, advertise_url: str | None = None) -> set[str]:
    """Extend every lease in ``held`` (thread id -> epoch) that this host still holds at that epoch;
    returns the thread ids extended. One statement for all of them. A lease already expired but not taken
    by anyone is extended too: its epoch is unchanged, so nobody else wrote meanwhile. ``advertise_url``
    (when given) is written too: leases taken before the server knew its bound port get it here."""
    if not held:
        return set()
    ids = list(held)
    rows = conn.execute(
        "UPDATE thread_leases SET expires_at = now() + ? * interval '1 second',"
        " advertise_url = COALESCE(?, advertise_url)"
        " WHERE owner = ? AND thread_id = ANY(?) RETURNING thread_id, epoch",
        (float(ttl), advertise_url, host_id, ids)).fetchall()
    return {row[0] for row in rows if held.get(row[0]) == int(row[1])}


def release(conn: Any, thread_id: str, host_id: str, epoch: int) -> bool:
    """Give the lease up (owner NULL, expires_at NULL, epoch kept so no old write becomes valid again);
    only ours at that epoch. Returns whether it was ours."""
    row = conn.execute(
        "UPDATE thread_leases SET owner = NULL, advertise_url = NULL, expires_at = NULL"
        " WHERE thread_id = ? AND owner = ? AND epoch = ? RETURNING thread_id",
        (thread_id, host_id, epoch)).fetchone()
    return row is not None


def orphaned_threads(conn: Any, limit: int = 100) -> list[str]:
    """Threads with a running turn and no live owner (expired by the database clock, or released):
    a dead owner's turns, which the sweeper ends even if nobody asks for the thread."""
    rows = conn.execute(
        "SELECT DISTINCT t.thread_id FROM turns t LEFT JOIN thread_leases l ON l.thread_id = t.thread_id"
        " WHERE t.status IN (?, ?, ?) AND t.rewound = 0"
        " AND (l.thread_id IS NULL OR l.owner IS NULL OR l.expires_at IS NULL OR l.expires_at <= now())"
        " LIMIT ?", (*RUNNING_STATUSES, limit)).fetchall()
    return [row[0] for row in rows]


class QmarkConnection:
    """A plain psycopg connection with the store adapter's ``?`` placeholders (tests, and any caller with a
    connection of its own). Only what the lease functions use."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Any = ()) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), params)


@dataclasses.dataclass(eq=False)
class Held:
    """A lease this host holds for a live engine. ``valid_until``: trio time (monotonic) until which the
    host knows it is valid (the start of the renewal that last extended it, plus the ttl)."""

    thread_id: str
    epoch: int
    valid_until: float
    lost: bool = False


class LeaseKeeper:
    """A host's leases: acquired before an engine starts, renewed every ttl/3 in one write, released when
    the engine stops. ``on_lost(thread_id)`` is called (on the loop) for a lease that is no longer known
    valid (its renewal did not come back in time, or the database says another epoch now): the engine is
    retired without another write; the next request re-acquires, which may find another owner.

    ``store`` is the runtime's store (its ``write`` runs the lease SQL in the writer's transaction).
    Cancellation: a lease write cancelled after it was queued still happens (the store's rule); a lease
    taken by a write whose caller was cancelled is found live-and-ours by the next acquire (a renewal)."""

    def __init__(self, store: Any, host_id: str, advertise_url: Callable[[], str | None], ttl: float,
                 recover: Callable[[Any, str], Any] | None = None) -> None:
        self._store = store
        self.host_id = host_id
        # Read at each write: the CLI learns the bound URL (``--port 0``) after the runtime opened.
        self._advertise_url = advertise_url
        self.ttl = float(ttl)
        self._recover = recover
        self._held: dict[str, Held] = {}
        self.on_lost: Callable[[str], None] = lambda thread_id: None
        self._changed = trio.Event()
        # Test seam: a renewal waits for this event first (None: no wait). Simulates a paused host
        # whose renewal task does not run, while the rest of the process (and the database) go on.
        self.renewal_gate: trio.Event | None = None
        self.renewals = 0
        # thread id -> (another host's live lease, trio time until which it is known live): see ``acquire``.
        self._foreign: dict[str, tuple[Lease, float]] = {}

    def forget_owner(self, thread_id: str) -> None:
        """Drop the remembered owner of a thread (it could not be reached, or said it is not the owner)."""
        self._foreign.pop(thread_id, None)

    @property
    def advertise_url(self) -> str | None:
        return self._advertise_url()

    # ---- queries ----------------------------------------------------------------------------

    def held(self, thread_id: str) -> Held | None:
        return self._held.get(thread_id)

    def valid(self, thread_id: str) -> bool:
        """True while this host KNOWS it holds the lease (never past the database's expiry)."""
        held = self._held.get(thread_id)
        return held is not None and not held.lost and trio.current_time() < held.valid_until

    async def lookup(self, thread_id: str) -> Lease | None:
        return await self._store.read(functools.partial(lease_of, thread_id=thread_id))

    # ---- acquire / release --------------------------------------------------------------------

    async def acquire(self, thread_id: str) -> Held:
        """Take (or renew) the lease before an engine starts; NotOwner when another live host holds it.
        Recovery of the thread's orphaned turn commits in the same transaction."""
        # While another live host owns the thread (every forwarded request's case) NotOwner costs nothing:
        # the owner seen last is remembered for the lease's remaining time by the database clock, measured
        # from the START of the read that saw it (so never past the database's expiry); else one pooled
        # read, not a write transaction through the writer (bench row fwd1).
        now = trio.current_time()
        seen = self._foreign.get(thread_id)
        if seen is not None and now < seen[1]:
            raise NotOwner(seen[0].owner or "", seen[0].advertise_url or "", thread_id)
        current, left = await self._store.read(functools.partial(owner_for, thread_id=thread_id))
        if current is not None and current.live and current.owner != self.host_id:
            if len(self._foreign) >= FOREIGN_REMEMBERED:
                self._foreign.pop(next(iter(self._foreign)))
            self._foreign[thread_id] = (current, now + left)
            raise NotOwner(current.owner or "", current.advertise_url or "", thread_id)
        self._foreign.pop(thread_id, None)
        start = trio.current_time()
        acquired, _ = await self._store.write(
            fn=functools.partial(acquire, thread_id=thread_id, host_id=self.host_id,
                                 advertise_url=self.advertise_url, ttl=self.ttl, recover=self._recover),
            fn_events=False, action=f"take the lease of thread '{thread_id}'")
        if acquired.taken:
            log.info("host %s took the lease of thread %s (epoch %d, previous owner %s)", self.host_id, thread_id,
                     acquired.lease.epoch, acquired.previous_owner)
        held = Held(thread_id, acquired.lease.epoch, start + self.ttl)
        self._held[thread_id] = held
        self._wake()
        return held

    async def release(self, held: Held) -> None:
        """Give up the lease of a stopped engine (if it is still ours at that epoch). Bounded by the store
        write; failing is harmless (the lease expires by itself)."""
        if self._held.get(held.thread_id) is held:
            del self._held[held.thread_id]
            self._wake()
        if held.lost:
            return
        try:
            await self._store.write(fn=functools.partial(release, thread_id=held.thread_id, host_id=self.host_id,
                                                         epoch=held.epoch),
                                    action=f"release the lease of thread '{held.thread_id}'")
        except RuntimeFailure as exc:
            log.warning("could not release the lease of thread %s (it expires by itself): %s", held.thread_id, exc)

    def lose(self, thread_id: str, why: str) -> None:
        held = self._held.get(thread_id)
        if held is None or held.lost:
            return
        held.lost = True
        log.warning("host %s lost the lease of thread %s (epoch %d): %s", self.host_id, thread_id, held.epoch, why)
        try:
            self.on_lost(thread_id)
        except Exception:  # the manager's bug must not stop renewals of other threads
            log.exception("retiring the engine of thread %s after its lease was lost failed", thread_id)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ---- renewal -------------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """The renewal task (every ttl/3) and the watchdog that retires engines whose local validity ran out."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._renew_loop)
            nursery.start_soon(self._watchdog)
            task_status.started()

    async def renew_now(self) -> None:
        held = {h.thread_id: h.epoch for h in self._held.values() if not h.lost}
        if not held:
            return
        start = trio.current_time()
        if self.renewal_gate is not None:
            await self.renewal_gate.wait()
        renewed, _ = await self._store.write(
            fn=functools.partial(renew, host_id=self.host_id, held=held, ttl=self.ttl,
                                 advertise_url=self.advertise_url),
            action="renew this host's thread leases")
        self.renewals += 1
        for thread_id, epoch in held.items():
            current = self._held.get(thread_id)
            if current is None or current.epoch != epoch or current.lost:
                continue  # released or re-acquired meanwhile
            if thread_id in renewed:
                current.valid_until = max(current.valid_until, start + self.ttl)
            else:
                self.lose(thread_id, "another host holds it now")
        self._wake()

    async def _renew_loop(self) -> None:
        while True:
            await trio.sleep(self.ttl / 3)
            try:
                # Bounded: a renewal that takes longer than the ttl cannot extend anything anyway (its
                # start + ttl has passed); the watchdog retires the engines meanwhile.
                with trio.move_on_after(self.ttl):
                    await self.renew_now()
            except RuntimeFailure as exc:  # the database is unreachable: try again; the watchdog decides
                log.warning("renewing the leases of host %s failed: %s", self.host_id, exc)

    async def _watchdog(self) -> None:
        while True:
            now = trio.current_time()
            live = [h for h in self._held.values() if not h.lost]
            for held in live:
                if now >= held.valid_until:
                    self.lose(held.thread_id, f"not renewed within {self.ttl:g} s")
            pending = [h.valid_until for h in self._held.values() if not h.lost]
            changed = self._changed
            with trio.move_on_at(min(pending) if pending else float("inf")):
                await changed.wait()
