"""EngineHandle: how everyone but the engine talks to it.

``request`` is the oneshot pattern: open a zero-buffer channel, move its send side into the op, wait on
the receive side under the caller's deadline, and close the receive side on every exit path. Closing
it is what makes a requester that gave up harmless: the engine's reply then fails at once with
BrokenResourceError, which it treats as normal, instead of blocking forever.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import outcome
import trio

from . import ops
from ..errors import EngineTimeout, EngineUnavailable

T = TypeVar("T")


class EngineEvicted(Exception):
    """The engine was evicted before it accepted the op: nothing happened, so a retry is safe."""


class EngineHandle:
    __slots__ = ("thread_id", "_inbox", "evicted")  # one per live engine (issue 16: RSS per idle engine)

    def __init__(self, thread_id: str, inbox: trio.MemorySendChannel[ops.Op]) -> None:
        self.thread_id = thread_id
        self._inbox = inbox
        self.evicted = False

    def close(self, *, evicted: bool) -> None:
        """Stop accepting ops. Ops already queued are still served (eviction) or failed (shutdown)."""
        self.evicted = evicted
        self._inbox.close()

    def busy(self) -> bool:
        """Ops are queued, or submitters are waiting for room."""
        stats = self._inbox.statistics()
        return bool(stats.current_buffer_used or stats.tasks_waiting_send)

    async def submit(self, op: ops.Op) -> None:
        """Queue ``op``, waiting for room in the inbox (backpressure). A cancellation while waiting
        leaves nothing queued, and ``op.reply`` still belongs to the caller."""
        try:
            await self._inbox.send(op)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            if self.evicted:
                raise EngineEvicted() from exc
            raise EngineUnavailable(f"The engine for thread '{self.thread_id}' is not running") from exc

    async def _submit_read(self, op: ops.Op) -> None:
        """``submit`` for an op that changes nothing (a snapshot): with room in the inbox, queue it
        without the scheduling round a blocking send costs; the reply's receive is the checkpoint."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._inbox.send_nowait(op)
        except trio.WouldBlock:
            await self.submit(op)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            if self.evicted:
                raise EngineEvicted() from exc
            raise EngineUnavailable(f"The engine for thread '{self.thread_id}' is not running") from exc

    async def request(self, make_op: Callable[[ops.Reply], ops.Op], *, deadline: float, what: str) -> object:
        """Submit an op and wait for its one reply before ``deadline`` (trio clock).

        Raises EngineTimeout when the inbox stays full or the reply is late, EngineUnavailable when the
        engine stops first. If cancelled, the op may already have been queued; the engine then
        finds the oneshot closed and drops its reply.
        """
        reply_tx, reply_rx = trio.open_memory_channel[outcome.Outcome](0)
        with reply_rx:
            op = make_op(reply_tx)
            try:
                with trio.fail_at(deadline):
                    try:
                        if isinstance(op, ops.GetSessionSnapshot):
                            await self._submit_read(op)
                        else:
                            await self.submit(op)
                    except BaseException:
                        reply_tx.close()  # never handed over: ours to close
                        raise
                    result = await reply_rx.receive()
            except trio.TooSlowError as exc:
                raise EngineTimeout(f"Timed out waiting for the engine of thread '{self.thread_id}' to {what}") from exc
            except trio.EndOfChannel as exc:
                raise EngineUnavailable(
                    f"The engine for thread '{self.thread_id}' stopped before it could {what}"
                ) from exc
        return result.unwrap()
