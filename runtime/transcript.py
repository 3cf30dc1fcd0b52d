"""Messages and content blocks, and the one function that turns turn items into messages.

The engine appends each finished turn's items with ``apply_items`` and ``POST /v1/sessions`` rebuilds a
whole thread with ``build_messages``: both use the same fold, so a live snapshot and a rebuild from
the store agree by construction.

Messages are treated as immutable once built: appending to the last message replaces it with a new
dict, so a snapshot that holds an older list is never changed behind its back.
"""

from __future__ import annotations

from typing import Any, Iterable

Message = dict[str, Any]

SUMMARY_PREFIX = "[Summary of earlier conversation]"
# A compaction summary quotes at most this many characters of the history it replaces.
SUMMARY_CHARS = 400


def text_of(message: Message) -> str:
    """All text a person would read in a message (text, thinking and tool results)."""
    parts = []
    for block in message.get("content", ()):
        kind = block.get("type")
        if kind in ("text", "thinking"):
            parts.append(block.get("text", ""))
        elif kind == "tool_result":
            content = block.get("content")
            parts.append(content if isinstance(content, str) else str(content))
    return "\n".join(p for p in parts if p)


def word_count(messages: Iterable[Message]) -> int:
    return sum(len(text_of(m).split()) for m in messages)


def _append_block(messages: list[Message], role: str, block: dict[str, Any], interrupted: bool) -> None:
    if messages and messages[-1]["role"] == role:
        last = messages[-1]
        new = {**last, "content": [*last["content"], block]}
    else:
        new = {"role": role, "content": [block]}
        messages.append(new)
    if interrupted:
        new["interrupted"] = True
    messages[-1] = new


def apply_items(messages: list[Message], items: Iterable[dict[str, Any]]) -> None:
    """Fold finished turn items into ``messages`` in place (see the module docstring)."""
    for item in items:
        if item["status"] in ("queued", "in_progress"):
            continue
        kind = item["kind"]
        text = item.get("detail") or ""
        interrupted = item["status"] == "interrupted"
        meta = item.get("metadata") or {}
        if kind == "user_message":
            _append_block(messages, "user", {"type": "text", "text": text}, False)
        elif kind == "agent_message":
            if text:
                _append_block(messages, "assistant", {"type": "text", "text": text}, interrupted)
        elif kind == "agent_reasoning":
            if text:
                _append_block(messages, "assistant", {"type": "thinking", "text": text}, interrupted)
        elif kind == "tool_call":
            use_id = meta.get("tool_use_id") or item["id"]
            _append_block(messages, "assistant", {
                "type": "tool_use", "id": use_id, "name": meta.get("name", ""), "input": meta.get("input", {}),
            }, interrupted)
            if "result" in meta:
                block: dict[str, Any] = {"type": "tool_result", "tool_use_id": use_id, "content": meta["result"]}
                if meta.get("is_error"):
                    block["is_error"] = True
                _append_block(messages, "user", block, False)
        elif kind == "context_compaction":
            messages[:] = [{"role": "user", "content": [{"type": "text", "text": f"{SUMMARY_PREFIX}\n{text}"}]}]


def build_messages(base: list[Message], items: Iterable[dict[str, Any]]) -> list[Message]:
    messages = list(base)
    apply_items(messages, items)
    return messages


def summarize(messages: list[Message]) -> str:
    """A deterministic summary for compaction: who said what, trimmed to SUMMARY_CHARS."""
    lines = [f"{m['role']}: {' '.join(text_of(m).split())}" for m in messages]
    summary = "\n".join(lines)
    if len(summary) > SUMMARY_CHARS:
        summary = summary[: SUMMARY_CHARS - 1] + "…"
    return f"{len(messages)} earlier message(s).\n{summary}"


def first_user_text(messages: list[Message]) -> str:
    for message in messages:
        if message["role"] == "user":
            text = text_of(message).strip()
            if text:
                return text
    return ""


def derive_title(text: str, limit: int = 50) -> str:
    """Titles are trimmed, single-line and at most ``limit`` characters."""
    title = " ".join(text.split())
    return title[:limit].rstrip()
