"""Runtime: the one public object of ``runtime/``. It owns the store, the event bus, the engines'
supervisor nursery and the session store, and offers every operation the server exposes.

Every method that waits on an engine takes ``timeout`` (seconds) and raises EngineTimeout when it
expires, EngineUnavailable when the engine stops first; the engine itself is never left waiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
import time
from typing import Any, AsyncIterator, Callable

import trio

from . import codec
from .clock import new_id, utc_now
from .config import RuntimeConfig, resolve_host_id
from .engine import ops
from .engine.handle import EngineEvicted
from .engine.manager import ThreadManager
from .errors import Conflict, EngineTimeout, InvalidInput, NotFound, NotOwner
from .events import EventBus, EventStream
from .idempotency import Claim, Idempotency, record_claim
from .models.base import ModelBackend
from .models.scripted import ScriptedModel
from .sessions import SessionService
from .store import EventDraft, Store, WriteRequest, is_postgres_url, open_store, records
from .store.records import BASE_PIECES, write_base
from .threads_detail import DetailCache
from .version import __version__

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
LIST_LIMIT_MAX = 500
THREAD_FIELDS = ("model", "workspace", "mode", "system_prompt", "title", "archived")


THREAD_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")


def validate_thread_id(thread_id: object) -> str:
    """A caller-supplied thread id: checked before it is stored, like a session id."""
    if not isinstance(thread_id, str) or not THREAD_ID_RE.match(thread_id):
        shown = repr(thread_id) if len(repr(thread_id)) <= 40 else repr(thread_id)[:37] + "..."
        raise InvalidInput(f"Invalid thread id {shown}: use 1-128 letters, digits, '_' or '-', starting with a "
                           f"letter or digit")
    return thread_id


APPROVAL_POLICIES = ("ask", "auto", "deny")


def validate_policy(policy: object) -> str:
    if policy not in APPROVAL_POLICIES:
        raise InvalidInput(f"approval_policy must be one of: {', '.join(APPROVAL_POLICIES)}")
    return policy  # type: ignore[return-value]


def _check_id(value: object, name: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{name} must be a non-blank string")


def _if_busy(value: str) -> str:
    if value not in ops.IF_BUSY:
        raise InvalidInput(f"if_busy must be one of: {', '.join(ops.IF_BUSY)}")
    return value


def clamp_limit(limit: int | None, default: int = 50) -> int:
    return max(1, min(LIST_LIMIT_MAX, default if limit is None else int(limit)))


def _thread_record(conn: Any, thread_id: str) -> dict[str, Any] | None:
    row = records.get_thread_row(conn, thread_id)
    return None if row is None else records.thread_record(row)


class Runtime:
    """Open with ``async with Runtime.open(config) as rt:``; leaving the block interrupts running
    turns (they end ``interrupted``), fails queued ops with EngineUnavailable and flushes the store."""

    def __init__(self, config: RuntimeConfig, store: Store, bus: EventBus, manager: ThreadManager,
                 backend: ModelBackend) -> None:
        self.config = config
        self.store = store
        self.bus = bus
        self.manager = manager
        self.backend = backend
        self.started_monotonic = time.monotonic()
        # Where other hosts forward this host's threads' requests (issue 15): --advertise-url, else the URL the
        # server bound (web/cli.py sets it once it knows the port).
        self.advertise_url: str | None = config.advertise_url
        self.idempotency = Idempotency(store, config.idempotency_ttl)
        self.sessions = SessionService(self)
        self.details = DetailCache()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, config: RuntimeConfig) -> AsyncIterator["Runtime"]:
        backend: ModelBackend = config.model_factory() if config.model_factory else ScriptedModel()  # type: ignore[assignment]
        bus = EventBus(config.subscriber_buffer)
        # The data dir holds this host's own files (host_id, mcp.json, logs) whichever store holds the rest.
        await trio.to_thread.run_sync(functools.partial(config.data_dir.mkdir, parents=True, exist_ok=True))
        # The host id is resolved once here (the CLI may have done it): never None while the runtime runs.
        # "sqlite" as a store URL is the default store (the CLI's --store sqlite, TRIO_RUNTIME_STORE=sqlite).
        config = dataclasses.replace(
            config, host_id=config.host_id or await trio.to_thread.run_sync(resolve_host_id, config.data_dir),
            store_url=config.store_url if is_postgres_url(config.store_url) else None)
        async with open_store(config, bus.publish) as store:
            manager = ThreadManager(store, backend, config)
            runtime = cls(config, store, bus, manager, backend)
            await runtime.sessions.open()
            async with trio.open_nursery() as nursery:
                await nursery.start(manager.run)
                if getattr(store, "kind", "sqlite") == "postgresql":
                    await runtime._start_cluster(nursery)
                # MCP servers: each a supervised task in this nursery; their tools join the built-ins
                # (started in parallel, each bounded by its startup_timeout; a failing one is only a status).
                from .mcp import McpServers, RuntimeTools  # the tool layer sits above the core

                runtime.mcp = McpServers(config.data_dir, store)
                manager.tools = RuntimeTools(config.tools, runtime.mcp)
                try:
                    await nursery.start(runtime.mcp.run)
                    await runtime._carry_on_turns()
                    yield runtime
                finally:
                    # Shielded so that a cancelled caller still gets turns recorded as interrupted;
                    # bounded because every engine's final write is bounded (final_write_seconds).
                    with trio.CancelScope(shield=True):
                        await manager.aclose()
                        # Undo files of committed session changes still being dropped: a few unlinks,
                        # bounded like a commit; any left are dropped at the next start (the journal says so).
                        with trio.move_on_after(runtime.sessions.commit_timeout) as waited:
                            await runtime.sessions.cleaned()
                        if waited.cancelled_caught:
                            log.warning("undo files of committed session changes were not all dropped within"
                                        " %g s; the next start drops them", runtime.sessions.commit_timeout)
                    if getattr(runtime, "cluster", None) is not None:
                        runtime.cluster.close()  # after the engines released their leases
                    # After the turns ended (their MCP calls are cancelled): stop every server; each
                    # task kills and reaps its child, and the nursery waits for them.
                    await runtime.mcp.aclose()

    async def _start_cluster(self, nursery: trio.Nursery) -> None:
        """Several hosts on one PostgreSQL (runtime/cluster): leases for engines, the LISTEN connection
        that wakes this host's event streams, and the sweeper of dead owners' turns. Streams are polled
        from the events table (see EventBus.polled)."""
        from .cluster.host import Cluster

        self.bus.polled = True
        self.cluster = Cluster(self, self.config.store_url or "", self.config.host_id or "", self.config.lease_ttl)
        self.manager.attach_keeper(self.cluster.keeper)
        await nursery.start(self.cluster.run)

    def _owned(self, fn: Callable[[Any], Any], pick: Callable[[Any], list[dict[str, Any]]]) -> Callable[[Any], Any]:
        """``fn`` (a store read) whose ThreadRecords (``pick(result)``) get ``owner`` in the SAME read (one
        snapshot, one hop) on PostgreSQL; ``fn`` itself on SQLite (its records have no such field)."""
        if getattr(self, "cluster", None) is None:
            return fn

        def read(conn: Any) -> Any:
            from .cluster.host import add_owners

            result = fn(conn)
            if result is not None:
                add_owners(conn, pick(result))
            return result

        return read

    # ---- engine requests -------------------------------------------------------------------

    async def _request(self, thread_id: str, make_op: Callable[[ops.Reply], ops.Op], *, timeout: float,
                       what: str) -> Any:
        deadline = trio.current_time() + timeout
        while True:
            handle = self.manager.live_handle(thread_id)  # the hot path: the engine is running
            if handle is None:
                try:
                    with trio.fail_at(deadline):
                        handle = await self.manager.handle(thread_id)
                except trio.TooSlowError as exc:
                    raise EngineTimeout(f"Timed out starting the engine of thread '{thread_id}' to {what}") from exc
            try:
                return await handle.request(make_op, deadline=deadline, what=what)
            except EngineEvicted:
                continue  # evicted before it accepted the op: nothing happened, ask its successor

    # ---- threads ---------------------------------------------------------------------------

    async def create_thread(self, *, model: str | None = None, workspace: str | None = None,
                            mode: str | None = None, system_prompt: str | None = None, title: str | None = None,
                            archived: bool = False, base_messages: list[dict[str, Any]] | None = None,
                            base_tokens: int = 0, session_id: str | None = None,
                            base_messages_json: bytes | list[bytes | memoryview] | None = None,
                            thread_id: str | None = None,
                            claim: Claim | None = None, answer: Any = None,
                            approval_policy: str | None = None) -> dict[str, Any]:
        """``base_messages_json``: the base messages already encoded by a caller that did it in a worker
        thread: bytes, or the pieces of ``codec.dumps_parts`` (resume), which are never joined on SQLite
        (``write_base``); otherwise ``base_messages`` are encoded here, on the loop.

        ``thread_id``: the caller's id (InvalidInput unless it matches the session id pattern; Conflict
        if a thread has it: checked inside the insert's own write, so two creates of one id cannot both
        pass). ``claim``: its record is written in the same transaction; it records ``answer`` when given
        (resume answers with its own result), else the thread record. One store write: cancelled after it
        was queued, the thread is still created (and its claim's key stays in progress until then)."""
        policy = validate_policy(approval_policy or "ask")
        given = thread_id is not None
        thread_id = validate_thread_id(thread_id) if given else new_id("thr")
        if base_messages_json is None and base_messages:
            base_messages_json = codec.dumps(base_messages)
        now = utc_now()
        record = {
            "id": thread_id, "created_at": now, "updated_at": now, "model": model or self.config.default_model,
            "workspace": workspace, "mode": mode or self.config.default_mode, "archived": bool(archived),
            "title": title, "system_prompt": system_prompt, "latest_turn_id": None, "session_id": session_id,
            "forked_from": None, "approval_policy": policy, "allowed_tools": [],
        }
        pieces = base_messages_json if isinstance(base_messages_json, list) else None
        insert = (
            "INSERT INTO threads (id, created_at, updated_at, model, workspace, mode, archived, title,"
            " system_prompt, session_id, base_messages, base_tokens, approval_policy)"
            f" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {'CAST(? AS TEXT)' if pieces is None else BASE_PIECES}, ?, ?)",
            # UTF-8 bytes that become TEXT inside SQLite, in the writer thread (pieces: see write_base).
            (thread_id, now, now, record["model"], workspace, record["mode"], int(bool(archived)), title,
             system_prompt, session_id, base_messages_json, base_tokens, policy))
        claimed = record_claim(claim, self._as_answer(record) if answer is None else answer)

        def refuse_taken(conn: Any) -> None:
            # A refusal (not an IntegrityError turned 500): the write undoes only itself (see WriteRequest.fn).
            if conn.execute("SELECT 1 FROM threads WHERE id = ?", (thread_id,)).fetchone() is not None:
                raise Conflict(f"Thread '{thread_id}' already exists; choose another id")

        def insert_with_pieces(conn: Any) -> None:
            if given:
                refuse_taken(conn)
            assert pieces is not None
            write_base(conn, insert, pieces)

        request = self.store.submit(WriteRequest(
            [insert, *claimed] if pieces is None else claimed,
            [EventDraft(thread_id, "thread.started", {"thread": record})],
            insert_with_pieces if pieces is not None else refuse_taken if given else None,
            action="create a thread"))
        if claim is not None:
            claim.pending = request
        await request.done.wait()
        assert request.result is not None
        request.result.unwrap()
        return self._as_answer(record)

    def _as_answer(self, record: dict[str, Any]) -> dict[str, Any]:
        """A new thread's record as the answer: on PostgreSQL with ``owner`` null (creating a thread takes no
        lease; its first engine request does), so every ThreadRecord there has the field."""
        return record if getattr(self, "cluster", None) is None else {**record, "owner": None}

    async def _with_owner(self, result: dict[str, Any]) -> dict[str, Any]:
        """``result["thread"]`` (a history change's answer) with its ``owner`` read from the database on
        PostgreSQL, as GET shows it; ``result`` itself on SQLite."""
        if getattr(self, "cluster", None) is None or not isinstance(result.get("thread"), dict):
            return result
        from .cluster.host import add_owners

        await self.store.read(functools.partial(add_owners, found=[result["thread"]]), inline=True)
        return result

    async def list_threads(self, *, limit: int | None = None, include_archived: bool = False,
                           archived_only: bool = False) -> list[dict[str, Any]]:
        return await self.store.read(self._owned(functools.partial(
            records.list_threads, limit=clamp_limit(limit), include_archived=include_archived,
            archived_only=archived_only), lambda found: found), inline=True)

    async def get_thread(self, thread_id: str, *, include_rewound: bool = False, turns_limit: int | None = None,
                         before: str | None = None) -> dict[str, Any]:
        """ThreadDetail: a page of turns with their items (records.thread_detail; default the latest)."""
        detail = await self.store.read(self._owned(functools.partial(
            records.thread_detail, thread_id=thread_id, include_rewound=include_rewound, turns_limit=turns_limit,
            before=before),
            lambda found: [found["thread"]]), inline=True)
        if detail is None:
            raise NotFound(f"Thread '{thread_id}' not found")
        return detail

    async def get_thread_json(self, thread_id: str, *, include_rewound: bool = False, turns_limit: int | None = None,
                              before: str | None = None) -> bytes:
        """``get_thread`` encoded (codec.dumps), the same bytes again while the database is unchanged
        (runtime/threads_detail.py)."""
        return await self.details.encoded(
            self.store, (thread_id, include_rewound, turns_limit, before), functools.partial(
                self.get_thread, thread_id, include_rewound=include_rewound, turns_limit=turns_limit, before=before))

    async def thread_record(self, thread_id: str) -> dict[str, Any]:
        record = await self.store.read(self._owned(
            functools.partial(_thread_record, thread_id=thread_id), lambda found: [found]), inline=True)
        if record is None:
            raise NotFound(f"Thread '{thread_id}' not found")
        return record

    # ---- approvals ---------------------------------------------------------------------------

    async def list_approvals(self, *, thread_id: str | None = None, status: str | None = None,
                             limit: int | None = None) -> list[dict[str, Any]]:
        """Approvals oldest first, of one thread (NotFound if unknown) or of all; ``status`` filters."""
        if status is not None and status not in records.APPROVAL_STATUSES:
            raise InvalidInput(f"status must be one of: {', '.join(records.APPROVAL_STATUSES)}")
        if thread_id is not None:
            await self.thread_record(thread_id)
        return await self.store.read(functools.partial(records.list_approvals, thread_id=thread_id, status=status,
                                                       limit=clamp_limit(limit)), inline=True)

    async def decide_approval(self, thread_id: str, approval_id: str, decision: str, *, remember: bool = False,
                              message: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                              claim: Claim | None = None) -> dict[str, Any]:
        """Allow or deny a pending approval: the waiting turn goes on (the tool runs, or the model gets the
        denial). NotFound for an approval of another thread or an unknown one; Conflict once resolved. The
        decision is one write on the engine's lane; cancelled before the engine took it, nothing happened."""
        if decision not in ("allow", "deny"):
            raise InvalidInput('decision must be "allow" or "deny"')
        record = await self.store.read(functools.partial(records.get_approval, approval_id=approval_id), inline=True)
        if record is None or record["thread_id"] != thread_id:
            await self.thread_record(thread_id)
            raise NotFound(f"Approval '{approval_id}' not found in thread '{thread_id}'")
        if record["status"] != "pending":
            raise Conflict(f"Approval '{approval_id}' is already {record['status']}")
        return await self._request(thread_id, lambda r: ops.DecideApproval(
            approval_id=approval_id, decision=decision, remember=remember, message=message, claim=claim, reply=r),
            timeout=timeout, what="decide the approval")

    async def _carry_on_turns(self) -> None:
        """Start the engines of threads whose turn outlived the last process (waiting for an approval, or
        going on after a tool whose outcome is unknown), so deadlines run and turns go on without a request."""
        for thread_id in await self.store.read(records.threads_with_active_turns):
            try:
                await self.manager.handle(thread_id)
            except NotOwner:
                continue  # another live host runs it (several hosts on one PostgreSQL)
            except Exception:  # one thread must never stop the server from starting
                log.exception("could not carry on the turn of thread %s", thread_id)

    async def update_thread(self, thread_id: str, changes: dict[str, Any], *,
                            timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        if not changes:
            raise InvalidInput("Give at least one of: archived, model, mode, title, system_prompt, approval_policy")
        if "approval_policy" in changes:
            validate_policy(changes["approval_policy"])
        await self._request(thread_id, lambda r: ops.UpdateThread(changes=changes, reply=r),
                            timeout=timeout, what="update the thread")
        # Read back from the store: the engine does not track links that sessions write (session_id).
        return await self.thread_record(thread_id)

    # ---- turns -----------------------------------------------------------------------------

    async def start_turn(self, thread_id: str, prompt: str, *, model: str | None = None, mode: str | None = None,
                         timeout: float = DEFAULT_TIMEOUT, claim: Claim | None = None) -> dict[str, Any]:
        if not prompt or not prompt.strip():
            raise InvalidInput("prompt must not be empty")
        return await self._request(
            thread_id, lambda r: ops.StartTurn(prompt=prompt, model=model, mode=mode, reply=r, claim=claim),
            timeout=timeout, what="start a turn")

    async def _check_turn(self, thread_id: str, turn_id: str) -> dict[str, Any]:
        turn = await self.store.read(functools.partial(records.get_turn, turn_id=turn_id), inline=True)
        if turn is None or turn["thread_id"] != thread_id:
            # Distinguish an unknown thread from an unknown turn for the error message.
            await self.thread_record(thread_id)
            raise NotFound(f"Turn '{turn_id}' not found in thread '{thread_id}'")
        return turn

    async def steer_turn(self, thread_id: str, turn_id: str, prompt: str, *,
                         timeout: float = DEFAULT_TIMEOUT, claim: Claim | None = None) -> dict[str, Any]:
        if not prompt or not prompt.strip():
            raise InvalidInput("prompt must not be empty")
        await self._check_turn(thread_id, turn_id)
        return await self._request(thread_id, lambda r: ops.Steer(turn_id=turn_id, prompt=prompt, reply=r, claim=claim),
                                   timeout=timeout, what="steer the turn")

    async def interrupt_turn(self, thread_id: str, turn_id: str, *,
                             timeout: float = DEFAULT_TIMEOUT, claim: Claim | None = None) -> dict[str, Any]:
        await self._check_turn(thread_id, turn_id)
        return await self._request(thread_id, lambda r: ops.Interrupt(turn_id=turn_id, reply=r, claim=claim),
                                   timeout=timeout, what="interrupt the turn")

    async def compact(self, thread_id: str, reason: str | None = None, *,
                      timeout: float = DEFAULT_TIMEOUT, claim: Claim | None = None) -> dict[str, Any]:
        return await self._request(thread_id, lambda r: ops.Compact(reason=reason, reply=r, claim=claim),
                                   timeout=timeout, what="compact the thread")

    async def get_session_snapshot(self, thread_id: str, *, wait_for_idle: bool = False,
                                   timeout: float = DEFAULT_TIMEOUT) -> ops.SessionSnapshot:
        return await self._request(
            thread_id, lambda r: ops.GetSessionSnapshot(wait_for_idle=wait_for_idle, reply=r),
            timeout=timeout, what="answer a session snapshot")

    async def shutdown_thread(self, thread_id: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Stop the thread's engine: its turn ends interrupted (one waiting for an approval is parked and
        carried on by a successor at once), ops queued behind fail with EngineUnavailable at once, and the
        next use restores a new engine from the store."""
        try:
            with trio.fail_after(timeout):
                await self.manager.shutdown(thread_id)
        except trio.TooSlowError as exc:
            raise EngineTimeout(f"Timed out shutting down the engine of thread '{thread_id}'") from exc

    # ---- history control (runtime.engine.history; each one engine op and one store write) ----------
    #
    # Each is checked completely inside its one write and applied whole or not at all. A timeout (504)
    # means the engine did not answer in time: the change may still be applied, whole, afterwards (an
    # Idempotency-Key tells which on retry). Cancelled before the op was queued, nothing happens.

    async def fork_thread(self, thread_id: str, *, through_turn_id: str | None = None, title: str | None = None,
                          new_thread_id: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                          claim: Claim | None = None) -> dict[str, Any]:
        """A new thread with copies of the source's live turns through ``through_turn_id`` (default: the
        latest finished one). The source does not change; a turn running there keeps running."""
        if through_turn_id is not None:
            _check_id(through_turn_id, "through_turn_id")
        new_id_ = validate_thread_id(new_thread_id) if new_thread_id is not None else new_id("thr")
        if title is not None and not title.strip():
            raise InvalidInput("title must not be blank")
        return await self._with_owner(await self._request(thread_id, lambda r: ops.Fork(
            through_turn_id=through_turn_id, title=title, new_thread_id=new_id_, claim=claim, reply=r),
            timeout=timeout, what="fork the thread"))

    async def rewind_thread(self, thread_id: str, before_turn_id: str, *, if_busy: str = "reject",
                            timeout: float = DEFAULT_TIMEOUT, claim: Claim | None = None) -> dict[str, Any]:
        """``before_turn_id`` and every later turn leave the live history (they stay stored, flagged)."""
        _check_id(before_turn_id, "before_turn_id")
        if_busy = _if_busy(if_busy)
        return await self._with_owner(await self._request(thread_id, lambda r: ops.Rewind(
            before_turn_id=before_turn_id, if_busy=if_busy, claim=claim, reply=r),
            timeout=timeout, what="rewind the thread"))

    async def retry_turn(self, thread_id: str, turn_id: str | None = None, *, model: str | None = None,
                         mode: str | None = None, if_busy: str = "reject", timeout: float = DEFAULT_TIMEOUT,
                         claim: Claim | None = None) -> dict[str, Any]:
        """Rewind before ``turn_id`` (default: the latest turn) and start a new turn with its prompt, as
        one change; answers with the new turn's record (``retry_of``: the old turn)."""
        if turn_id is not None:
            _check_id(turn_id, "turn_id")
        if_busy = _if_busy(if_busy)
        return await self._request(thread_id, lambda r: ops.Retry(
            turn_id=turn_id, model=model, mode=mode, if_busy=if_busy, claim=claim, reply=r),
            timeout=timeout, what="retry a turn")

    async def restore_thread(self, thread_id: str, session_id: str, *, if_busy: str = "reject",
                             if_match: int | str | None = None, timeout: float = DEFAULT_TIMEOUT,
                             claim: Claim | None = None) -> dict[str, Any]:
        """Replace the live history with a saved session's (see SessionService.restore)."""
        return await self._with_owner(await self.sessions.restore(
            thread_id, session_id, if_busy=_if_busy(if_busy), if_match=if_match, timeout=timeout, claim=claim))

    async def delete_thread(self, thread_id: str, *, if_busy: str = "reject", timeout: float = DEFAULT_TIMEOUT) -> None:
        """Delete the thread with its turns, items and events; its engine stops and its streams end."""
        if_busy = _if_busy(if_busy)
        await self._request(thread_id, lambda r: ops.DeleteThread(if_busy=if_busy, reply=r),
                            timeout=timeout, what="delete the thread")

    # ---- events ----------------------------------------------------------------------------

    async def subscribe(self, thread_id: str, since_seq: int = 0, *,
                        render: records.Render | None = None) -> EventStream:
        """Check the thread exists (NotFound), then return its replay-then-live event stream (``render``: its
        stored events come as records.EncodedEvents pages made by it, see EventBus.subscribe)."""
        if await self.store.read(functools.partial(records.get_thread_row, thread_id=thread_id), inline=True) is None:
            raise NotFound(f"Thread '{thread_id}' not found")
        return self.bus.subscribe(self.store, thread_id, since_seq, render)

    def info(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "data_dir": str(self.config.data_dir),
            "model_backend": getattr(self.backend, "name", type(self.backend).__name__),
            # Issue 15: which store (never its URL, which may hold a password) and this host's name and URL.
            "store": self.store.kind,
            "host_id": self.config.host_id,
            "advertise_url": self.advertise_url,
            "uptime_seconds": round(time.monotonic() - self.started_monotonic, 3),
            "live_engines": self.manager.live_count,
            "subscribers": self.bus.subscriber_count,
        }
