"""Small helpers for the runtime tests: waiting on events (never on sleeps) and reading the store."""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from pathlib import Path
from typing import Any, Callable

import trio
import trio.testing

from runtime import Runtime
from runtime.engine import ops
from runtime.store import Event, records

# Upper bound on any wait for events. Under the MockClock a hang becomes a quick TooSlowError;
# real-clock tests pass their own smaller bound.
EVENT_WAIT_LIMIT = 1000.0


def words(text: str) -> int:
    return len(text.split())


async def stored_events(rt: Runtime, thread_id: str, since_seq: int = 0) -> list[Event]:
    """Every stored event of the thread with ``seq > since_seq``, read from the store page by page."""
    out: list[Event] = []
    while True:
        page = await rt.store.read(functools.partial(records.events_after, thread_id=thread_id,
                                                     since_seq=since_seq))
        out.extend(page)
        if len(page) < records.EVENT_PAGE:
            return out
        since_seq = page[-1].seq


async def collect_events(rt: Runtime, thread_id: str, until: Callable[[Event], bool], *, since_seq: int = 0,
                         limit: float = EVENT_WAIT_LIMIT) -> list[Event]:
    """Subscribe (replay then live) and collect events up to and including the first one ``until`` accepts."""
    events: list[Event] = []
    with trio.fail_after(limit):
        async with contextlib.aclosing(await rt.subscribe(thread_id, since_seq)) as stream:
            async for event in stream:
                events.append(event)
                if until(event):
                    return events
    raise AssertionError(f"event stream ended before the awaited event; got {[e.event for e in events]}")


def turn_completed(turn_id: str) -> Callable[[Event], bool]:
    return lambda e: e.event == "turn.completed" and e.turn_id == turn_id


def nth(name: str, n: int, turn_id: str | None = None) -> Callable[[Event], bool]:
    """Accepts the n-th event named ``name`` (of ``turn_id`` if given)."""
    seen = 0

    def accept(event: Event) -> bool:
        nonlocal seen
        if event.event == name and (turn_id is None or event.turn_id == turn_id):
            seen += 1
        return seen >= n

    return accept


async def wait_turn_end(rt: Runtime, thread_id: str, turn_id: str) -> Event:
    """The turn's ``turn.completed`` event, waiting for it on the event stream."""
    return (await collect_events(rt, thread_id, turn_completed(turn_id)))[-1]


async def turn_record(rt: Runtime, thread_id: str, turn_id: str) -> dict[str, Any]:
    detail = await rt.get_thread(thread_id)
    return next(t for t in detail["turns"] if t["id"] == turn_id)


async def run_turn(rt: Runtime, thread_id: str, prompt: str) -> dict[str, Any]:
    """Start a turn, wait for its end on the event stream, return its stored TurnRecord."""
    turn = await rt.start_turn(thread_id, prompt)
    await wait_turn_end(rt, thread_id, turn["id"])
    return await turn_record(rt, thread_id, turn["id"])


def items_of(detail: dict[str, Any], turn_id: str) -> list[dict[str, Any]]:
    return [item for item in detail["items"] if item["turn_id"] == turn_id]


async def block_engine(rt: Runtime, thread_id: str) -> trio.MemoryReceiveChannel:
    """Wedge the thread's op loop deterministically.

    Queues a GetSessionSnapshot whose oneshot we hold but do not read: the engine answers snapshots
    inline, so its op loop sits in that reply send (bounded by ``reply_send_seconds``) and takes no
    other op meanwhile. Read or close the returned channel to release it.
    """
    handle = await rt.manager.handle(thread_id)
    reply_tx, reply_rx = trio.open_memory_channel(0)
    await handle.submit(ops.GetSessionSnapshot(reply=reply_tx))
    await trio.testing.wait_all_tasks_blocked()
    return reply_rx


def inbox_used(rt: Runtime, thread_id: str) -> int:
    """Ops waiting in the engine's inbox (white-box: reads the engine's private channel)."""
    engine = rt.manager.engine(thread_id)
    assert engine is not None
    return engine._inbox.statistics().current_buffer_used


def crash_image(live_dir: Path, crash_dir: Path) -> int:
    """Copy the live database as a crash would leave it (a consistent SQLite backup taken while the
    runtime runs, without its shutdown writes); returns the highest event seq in the copy."""
    crash_dir.mkdir(parents=True)
    src = sqlite3.connect(live_dir / "runtime.sqlite3")
    dst = sqlite3.connect(crash_dir / "runtime.sqlite3")
    try:
        src.backup(dst)
        (max_seq,) = dst.execute("SELECT MAX(seq) FROM events").fetchone()
        return max_seq
    finally:
        src.close()
        dst.close()


class ReplyProbe:
    """Stands between the engine and a requester's real oneshot (``inner``, the send side) and records what
    each reply attempt came to: ``"delivered"``, ``"would_block"``, or the name of the exception the send
    raised. ``before_send`` runs once, just before the engine's first attempt, to make something happen in
    that very step (a requester's cancellation)."""

    def __init__(self, inner: ops.Reply, before_send: Callable[[], object] | None = None) -> None:
        self.inner = inner
        self.log: list[str] = []
        self._before_send = before_send

    def _record(self, attempt: Callable[[], object]) -> None:
        try:
            attempt()
        except trio.WouldBlock:
            self.log.append("would_block")
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.log.append(type(exc).__name__)
            raise
        self.log.append("delivered")

    def send_nowait(self, value: Any) -> None:
        if self._before_send is not None:
            hook, self._before_send = self._before_send, None
            hook()
        self._record(lambda: self.inner.send_nowait(value))

    async def send(self, value: Any) -> None:
        try:
            await self.inner.send(value)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.log.append(type(exc).__name__)
            raise
        self.log.append("delivered")

    def statistics(self) -> Any:
        return self.inner.statistics()

    def close(self) -> None:
        self.inner.close()

    async def __aenter__(self) -> "ReplyProbe":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.inner.close()


class GatedModel:
    """The scripted model behind a gate: each turn waits for ``gate`` before it streams, and
    ``finished`` is set when a stream has ended. Lets a test act at an exact point of a turn."""

    name = "gated-scripted"

    def __init__(self) -> None:
        from runtime.models.scripted import ScriptedModel

        self.inner = ScriptedModel()
        self.gate = trio.Event()
        self.finished = trio.Event()

    async def stream(self, request):
        await self.gate.wait()
        try:
            async for event in self.inner.stream(request):
                yield event
        finally:
            self.finished.set()
