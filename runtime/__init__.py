"""trio-runtime's core: engines, ops, the durable store, events and sessions. Knows nothing of HTTP."""

from .config import RuntimeConfig
from .core import Runtime
from .errors import (
    Conflict, EngineTimeout, EngineUnavailable, IdempotencyKeyInProgress, IdempotencyKeyReused, InvalidData, InvalidInput, NotFound, PayloadTooLarge,
    PreconditionFailed, RuntimeFailure, StorageError, StorageFull,
)
from .engine.ops import SessionSnapshot
from .version import __version__

__all__ = [
    "Conflict", "EngineTimeout", "EngineUnavailable", "IdempotencyKeyInProgress",
    "IdempotencyKeyReused", "InvalidData", "InvalidInput", "NotFound",
    "PayloadTooLarge", "PreconditionFailed", "Runtime", "RuntimeConfig", "RuntimeFailure", "SessionSnapshot",
    "StorageError", "StorageFull", "__version__",
]
