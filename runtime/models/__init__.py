"""Model backends: the protocol every backend implements, and the offline scripted model."""

from .base import (
    ItemBreak, ModelBackend, ModelError, ModelEvent, ModelRequest, ReasoningDelta, Retrying, TextDelta, ToolCall,
    ToolOutcome, ToolResult, ToolSpec, Truncated, Usage, ValidText,
)
from .openai_compat import OpenAICompatModel
from .scripted import ScriptedModel
from .tools import Tool, ToolContext, ToolRegistry

__all__ = [
    "ItemBreak", "ModelBackend", "ModelError", "ModelEvent", "ModelRequest", "ReasoningDelta", "Retrying",
    "OpenAICompatModel", "ScriptedModel", "TextDelta", "Tool", "ToolCall", "ToolContext", "ToolOutcome",
    "ToolRegistry", "ToolResult", "ToolSpec", "Truncated", "Usage", "ValidText",
]
