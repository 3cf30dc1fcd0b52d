"""Model backends: the protocol every backend implements, and the offline scripted model."""

from .base import (
    ItemBreak, ModelBackend, ModelError, ModelEvent, ModelRequest, ReasoningDelta, Retrying, TextDelta, ToolCall,
    ToolResult, Usage,
)
from .scripted import ScriptedModel

__all__ = [
    "ItemBreak", "ModelBackend", "ModelError", "ModelEvent", "ModelRequest", "ReasoningDelta", "Retrying",
    "ScriptedModel", "TextDelta", "ToolCall", "ToolResult", "Usage",
]
