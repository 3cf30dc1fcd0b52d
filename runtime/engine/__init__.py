"""Engines: one trio task per live thread that owns its state, and what drives them.

- ``engine.py`` — the engine itself: the op loop, turns, approvals, compaction, history control.
- ``ops.py`` — the ops an engine reads from its inbox, and their replies.
- ``handle.py`` — the caller's side of one engine's inbox (send an op, await its reply, eviction).
- ``history.py`` — fork, rewind, retry, restore and delete: checked and applied as one store write.
- ``manager.py`` — the ThreadManager: starts, supervises, repairs and evicts engines.
"""

from .engine import Engine
from .handle import EngineEvicted, EngineHandle
from .manager import ThreadManager

__all__ = ["Engine", "EngineEvicted", "EngineHandle", "ThreadManager"]
