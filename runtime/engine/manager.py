"""ThreadManager: the supervisor nursery of engines, with lazy spawn and idle eviction.

At most one engine runs per thread. An evicted engine stays registered until it has exited, and a
request that arrives meanwhile waits for that exit before spawning the successor, so two engines
never serve one thread. A crashed engine is forgotten the same way; the next request restores a new
one from the store.

An engine whose write failed could not always record its turn's end; it hands the manager the
(idempotent) write that ends the turn ``failed``. The manager retries it with capped backoff until it
commits, and a successor engine for that thread is only started once it has: an engine never starts
on a store that still shows its predecessor's turn in progress.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import logging
import math
import sqlite3
from typing import Callable

import trio

from ..config import RuntimeConfig
from .engine import Engine
from ..errors import EngineUnavailable, LeaseLost, NotFound
from .handle import EngineHandle
from ..models.base import ModelBackend
from .ops import Op
from ..store import EventDraft, Store, WriteRequest, records

log = logging.getLogger(__name__)

# Retrying a turn's end that did not commit (a full or failing disk): the first retry comes after
# REPAIR_FIRST_DELAY, then the delay doubles up to REPAIR_MAX_DELAY. Each attempt is one small write; a
# disk rarely recovers within milliseconds, and a few seconds' delay after it has is what "as soon as
# the store can write again" costs. A request for the thread tries at once anyway (see ``_spawn``).
REPAIR_FIRST_DELAY = 0.1
REPAIR_MAX_DELAY = 5.0
# The name of every engine's task: the name trio would give it, but one string, not one per engine (~0.1 KiB).
SUPERVISE_TASK = f"{__name__}.ThreadManager._supervise"


@dataclasses.dataclass(eq=False)
class _Unended:
    thread_id: str
    end: Callable[[sqlite3.Connection], list[EventDraft]]


@dataclasses.dataclass(eq=False, slots=True)
class _Entry:
    handle: EngineHandle
    engine: Engine
    lease: object | None = None  # runtime.cluster.leases.Held on PostgreSQL: the lease the engine writes under
    idle_seq: int = -1  # the idle timer's current watch of this entry (ThreadManager._idle_watch)
    gone: bool = False  # the engine has exited
    # Made on first wait (``exited``): most engines are never waited for, and an Event costs ~0.3 KiB.
    _exited: trio.Event | None = None

    @property
    def exited(self) -> trio.Event:
        """Set once the engine has exited."""
        if self._exited is None:
            self._exited = trio.Event()
            if self.gone:
                self._exited.set()
        return self._exited

    def set_exited(self) -> None:
        self.gone = True
        if self._exited is not None:
            self._exited.set()


class ThreadManager:
    def __init__(self, store: Store, backend: ModelBackend, config: RuntimeConfig) -> None:
        self._store = store
        self._backend = backend
        self._config = config
        self._entries: dict[str, _Entry] = {}
        self._spawning: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._close_reason = "server shutting down"
        self.spawned = 0
        # turn id -> the end its engine could not record; retried until it commits.
        self._unended: dict[str, _Unended] = {}
        self._repair_wanted = trio.Event()
        # thread id -> a history write its retired engine could not see finish: the successor waits for it.
        self._unconfirmed: dict[str, WriteRequest] = {}
        # The tools every engine offers its model when the runtime has more than the config's built-ins
        # (a registry-like object: get, spec, call, len); None: the config's registry.
        self.tools: object | None = None
        # Several hosts on PostgreSQL (runtime.cluster.leases.LeaseKeeper): an engine starts only under the
        # thread's lease and serves only while the lease is known valid. None on SQLite (one host, no lease).
        self.keeper = None
        # Idle eviction: ONE timer for all engines (``_idle_loop``), not a cancel scope per parked engine (with
        # its deadline entry ~0.8 KiB each, issue 16). A heap of (deadline, seq, thread id); an entry is watched
        # by one seq at a time (``_Entry.idle_seq``): items of exited engines are dropped when reached, and a
        # deadline an op moved meanwhile is checked then and watched again (``Engine.idle_due``).
        self._idle_heap: list[tuple[float, int, str]] = []
        self._idle_seqs = itertools.count()
        self._idle_wake: trio.CancelScope | None = None

    def attach_keeper(self, keeper) -> None:  # type: ignore[no-untyped-def]
        self.keeper = keeper
        keeper.on_lost = self._lease_lost

    def _lease_valid(self, thread_id: str) -> bool:
        return self.keeper is None or self.keeper.valid(thread_id)

    def _lease_lost(self, thread_id: str) -> None:
        """The lease of a live engine is no longer known valid (not renewed in time, or taken): the engine
        retires WITHOUT another write (a new owner may be writing already); requests wait for its exit and
        re-acquire (finding another owner: NotOwner; or renewing ours: a successor restores from the store)."""
        entry = self._entries.get(thread_id)
        if entry is None:
            return
        held = entry.lease
        epoch = getattr(held, "epoch", "?")
        entry.engine.lease_lost(LeaseLost(f"Failed to go on with thread '{thread_id}': this host no longer holds "
                                          f"its lease (epoch {epoch})"))
        self._retire(entry.engine, False)

    @property
    def live_count(self) -> int:
        return len(self._entries)

    def engine(self, thread_id: str) -> Engine | None:
        entry = self._entries.get(thread_id)
        return entry.engine if entry else None

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._repair_loop)
            nursery.start_soon(self._idle_loop)
            task_status.started()
            await trio.sleep_forever()

    # ---- idle eviction ---------------------------------------------------------------------------

    def _idle_watch(self, entry: _Entry, deadline: float) -> None:
        entry.idle_seq = seq = next(self._idle_seqs)
        heapq.heappush(self._idle_heap, (deadline, seq, entry.handle.thread_id))
        if self._idle_wake is not None and deadline < self._idle_wake.deadline:
            self._idle_wake.deadline = deadline

    async def _idle_loop(self) -> None:
        """Sleep until the earliest idle deadline, then ask every engine whose deadline passed
        (``Engine.idle_due``); watch again those that stay. Stops with the manager; holds nothing then."""
        heap = self._idle_heap
        while True:
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as self._idle_wake:
                await trio.sleep_forever()
            self._idle_wake = None
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, seq, thread_id = heapq.heappop(heap)
                entry = self._entries.get(thread_id)
                if entry is None or entry.idle_seq != seq or entry.handle.evicted:
                    continue  # exited, succeeded, or leaving already
                try:
                    deadline = entry.engine.idle_due()
                except Exception:  # a bug in one engine's check must not stop eviction (or the manager)
                    log.exception("idle check of the engine of thread %s failed", thread_id)
                    continue
                if deadline is not None:
                    self._idle_watch(entry, deadline)

    # ---- turns whose end was not recorded ---------------------------------------------------

    @property
    def unended_turns(self) -> list[str]:
        """Turns whose end an engine could not record and that are not ended yet (for tests and info)."""
        return list(self._unended)

    def _end_later(self, thread_id: str, turn_id: str, end: Callable[[sqlite3.Connection], list[EventDraft]]) -> None:
        """Called by an engine, before it exits, for a turn whose end it could not record."""
        self._unended[turn_id] = _Unended(thread_id, end)
        self._repair_wanted.set()

    async def _end_unended(self, thread_id: str) -> None:
        """Write the end of every unrecorded turn of the thread. StorageError if one still fails.

        A cancellation after a write was queued does not undo it; the turn then stays listed until the
        next attempt, which finds it ended and writes nothing (the end is idempotent)."""
        for turn_id, pending in list(self._unended.items()):
            if pending.thread_id != thread_id:
                continue
            events, _ = await self._store.write(fn=pending.end, fn_events=True,
                                                action=f"record the end of turn '{turn_id}' after a storage error")
            if self._unended.get(turn_id) is pending:
                del self._unended[turn_id]
            if events:  # empty when another attempt (or the engine's own late write) ended it first
                log.warning("turn %s ended failed after a storage error", turn_id)

    async def _repair_loop(self) -> None:
        """Retry every unrecorded turn end with capped backoff until all have committed. Stops with the
        manager; whatever is still unended then, restart recovery ends (``interrupted``)."""
        delay = REPAIR_FIRST_DELAY
        while True:
            await self._repair_wanted.wait()
            for thread_id in {pending.thread_id for pending in self._unended.values()}:
                try:
                    await self._end_unended(thread_id)
                except Exception as exc:  # the disk is still failing: try again later; never stop the manager
                    log.info("turn end of thread %s still not recorded: %s", thread_id, exc)
            if not self._unended:
                self._repair_wanted = trio.Event()
                delay = REPAIR_FIRST_DELAY
                continue
            await trio.sleep(delay)
            delay = min(delay * 2, REPAIR_MAX_DELAY)

    def live_handle(self, thread_id: str) -> EngineHandle | None:
        """The running engine's handle when there is one to route to right now (no spawn, no wait)."""
        entry = self._entries.get(thread_id)
        if entry is None or entry.handle.evicted or self._closing or not self._lease_valid(thread_id):
            return None
        return entry.handle

    async def handle(self, thread_id: str) -> EngineHandle:
        """The live engine's handle, spawning (and restoring) the engine if needed. NotFound for an
        unknown thread; EngineUnavailable once shutdown began."""
        while True:
            if self._closing:
                raise EngineUnavailable("The runtime is shutting down")
            entry = self._entries.get(thread_id)
            if entry is not None and not entry.handle.evicted and not self._lease_valid(thread_id):
                self._lease_lost(thread_id)  # never serve from an engine whose lease is not known valid
            if entry is not None and not entry.handle.evicted:
                return entry.handle
            if entry is not None:
                await entry.exited.wait()
                continue
            spawning = self._spawning.get(thread_id)
            if spawning is not None:
                await spawning.wait()
                continue
            spawning = self._spawning[thread_id] = trio.Event()
            try:
                return await self._spawn(thread_id)
            finally:
                del self._spawning[thread_id]
                spawning.set()

    async def _spawn(self, thread_id: str) -> EngineHandle:
        # The predecessor's turn must be ended in the store before a successor restores from it (else
        # the successor would see a turn in progress that nobody runs). Fails with the StorageError
        # (naming the turn) while the disk still refuses it; nothing else happened then.
        await self._end_unended(thread_id)
        unconfirmed = self._unconfirmed.get(thread_id)
        if unconfirmed is not None:
            # Restoring before that write is done could start from the store as it was before it.
            # Bounded by the caller's deadline; the writer finishes every request it took.
            await unconfirmed.done.wait()
            if self._unconfirmed.get(thread_id) is unconfirmed:
                del self._unconfirmed[thread_id]
        lease = None
        if self.keeper is not None:
            # Before the engine restores: NotOwner (nothing changed) while another live host owns the thread;
            # otherwise the lease is ours and what a previous owner left running is settled in the same
            # transaction (runtime.cluster.host.recover_for_takeover), so the restore below sees it ended.
            lease = await self.keeper.acquire(thread_id)
        try:
            state = await self._store.read(functools.partial(records.engine_state, thread_id=thread_id,
                                                             use_boundary=True))
            if state is None:
                raise NotFound(f"Thread '{thread_id}' not found")
            if self._closing or self._nursery is None:
                raise EngineUnavailable("The runtime is shutting down")
        except BaseException:
            if lease is not None:
                with trio.CancelScope(shield=True):  # one bounded lease write; the lease expires anyway
                    with trio.move_on_after(self._config.final_write_seconds):
                        await self.keeper.release(lease)
            raise
        send, receive = trio.open_memory_channel[Op](self._config.inbox_capacity)
        engine = Engine(state, store=self._store, backend=self._backend, config=self._config,
                        inbox=receive, retire=self._retire, end_later=self._end_later,
                        fence=None if lease is None else (thread_id, lease.epoch))
        engine.tools = self.tools
        entry = _Entry(EngineHandle(thread_id, send), engine, lease=lease)
        await self._nursery.start(self._supervise, entry, name=SUPERVISE_TASK)
        return entry.handle

    async def _supervise(self, entry: _Entry, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        thread_id = entry.handle.thread_id
        self._entries[thread_id] = entry
        self.spawned += 1
        self._idle_watch(entry, entry.engine.idle_deadline)
        if self._closing:
            # Spawned in the step between _spawn's "closing?" check and this registration, after aclose
            # took its list: stop before the first op, so it never takes work it would not finish.
            entry.engine.request_stop(self._close_reason)
            entry.handle.close(evicted=False)
        try:
            # Not kept in this frame while the engine lives: it holds the temporary nursery of ``start``.
            running = entry.engine.run(task_status=task_status)
            del task_status
            await running
        finally:
            unconfirmed = entry.engine.unconfirmed
            if unconfirmed is not None and not unconfirmed.done.is_set():
                self._unconfirmed[thread_id] = unconfirmed
            if self._entries.get(thread_id) is entry:
                del self._entries[thread_id]
            entry.handle.close(evicted=entry.handle.evicted)
            if entry.lease is not None and self.keeper is not None:
                if isinstance(entry.engine.diverged, LeaseLost):
                    self.keeper.lose(thread_id, "a write was refused for its epoch")
                # Released before ``exited``: a successor on this host acquires only after it, so this can
                # never release the successor's lease. Shielded and bounded: one small write (failing, the
                # lease just expires); it runs when the engine stops at shutdown too.
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(self._config.final_write_seconds):
                        await self.keeper.release(entry.lease)
            entry.set_exited()
            if entry.engine.parked is not None and not self._closing and self._nursery is not None:
                # The engine stopped (from outside) while the runtime goes on, leaving a turn that waits for
                # an approval: a successor carries it on now, as a restart would, so the approval's
                # deadline keeps running without waiting for the next request to the thread.
                self._nursery.start_soon(self._carry_on, thread_id)

    async def _carry_on(self, thread_id: str) -> None:
        """Spawn the engine of a thread whose turn was parked (see ``_supervise``); a thread deleted
        meanwhile, or a shutdown, leaves nothing to carry on."""
        try:
            await self.handle(thread_id)
        except (NotFound, EngineUnavailable):
            pass
        except Exception:  # a store failure: the next request to the thread restores it (and retries)
            log.exception("could not carry on the parked turn of thread %s", thread_id)

    def _retire(self, engine: Engine, idle: bool) -> bool:
        """Stop routing requests to ``engine``; they wait for its exit and then spawn a successor.
        An idle retirement (eviction) is refused while anything is queued, so no accepted op is lost."""
        entry = self._entries.get(engine.thread_id)
        if entry is None or entry.engine is not engine or entry.handle.evicted or self._closing:
            return False
        if idle and entry.handle.busy():
            return False
        log.debug("retiring the engine of thread %s (%s)", engine.thread_id, "idle" if idle else "stopping")
        entry.handle.close(evicted=True)
        return True

    async def shutdown(self, thread_id: str, reason: str = "engine shut down") -> None:
        """Stop one thread's engine (its turn ends interrupted) and wait until it has exited. Requests
        arriving meanwhile wait for the exit and then restore a successor from the store."""
        entry = self._entries.get(thread_id)
        if entry is None:
            return
        entry.engine.request_stop(reason)
        entry.handle.close(evicted=True)
        await entry.exited.wait()

    async def aclose(self, reason: str = "server shutting down") -> None:
        """Interrupt every running turn, fail queued ops with EngineUnavailable, wait for all engines.

        An engine can still register after this begins: a spawn that passed its "closing?" check
        registers on the next step (and stops itself at once, see ``_supervise``). So this waits until
        no engine and no spawn is left, and only then cancels the nursery: every turn is recorded
        ``interrupted`` by its own engine, never cut short by that cancel. Bounded by the engines'
        final writes (``final_write_seconds``) and by a spawn's one store read. Cancelled (the Runtime
        calls it shielded), engines already told to stop still stop; the nursery is not cancelled.
        """
        self._closing = True
        self._close_reason = reason
        while self._entries or self._spawning:
            for entry in list(self._entries.values()):
                entry.engine.request_stop(reason)
                entry.handle.close(evicted=False)
            for entry in list(self._entries.values()):
                await entry.exited.wait()
            for spawning in list(self._spawning.values()):
                await spawning.wait()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel(reason=reason)
