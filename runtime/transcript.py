"""Messages and content blocks, and the one function that turns turn items into messages.

The engine appends each finished turn's items with ``apply_items`` and ``POST /v1/sessions`` rebuilds a
whole thread with ``build_messages``: both use the same fold, so a live snapshot and a rebuild from
the store agree by construction.

Messages are treated as immutable once built: appending to the last message replaces it with a new
dict, so a snapshot that holds an older list is never changed behind its back.

The shape of messages and blocks (API.md, Sessions) is checked here, once for every reader:
``messages_problem`` names the first thing wrong with a path (``messages[3].content[0].text: ...``), and
session files are refused with it. Messages an older version stored without that check (a thread's
``base_messages``) go through ``readable_messages`` instead, which keeps what it can read as text, so
no stored data can make a turn, a compaction or a save fail.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable

from .text import has_surrogate_in, valid_text, valid_value

log = logging.getLogger(__name__)

Message = dict[str, Any]

ROLES = ("user", "assistant")
BLOCK_TYPES = ("text", "thinking", "tool_use", "tool_result")

SUMMARY_PREFIX = "[Summary of earlier conversation]"
# A compaction summary quotes at most this many characters of the history it replaces.
SUMMARY_CHARS = 400


# ---- shape ------------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _expected(what: str, value: Any) -> str:
    return f"expected {what}, got {_json_type(value)}"


def _block_problem(block: Any) -> str | None:
    """What is wrong with one content block, as a path suffix and a reason (``.text: expected ...``)."""
    if not isinstance(block, dict):
        return ": " + _expected("an object", block)
    kind = block.get("type")
    if kind == "text" or kind == "thinking":
        if not isinstance(block.get("text"), str):
            return ".text: " + _expected("a string", block.get("text"))
    elif kind == "tool_use":
        for key in ("id", "name"):
            if not isinstance(block.get(key), str):
                return f".{key}: " + _expected("a string", block.get(key))
        if not isinstance(block.get("input"), dict):
            return ".input: " + _expected("an object", block.get("input"))
    elif kind == "tool_result":
        if not isinstance(block.get("tool_use_id"), str):
            return ".tool_use_id: " + _expected("a string", block.get("tool_use_id"))
        content = block.get("content")
        if isinstance(content, list):
            # The other common shape of a result: a list of text blocks.
            for index, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    return f".content[{index}]: expected a {{type: \"text\", text}} object"
        elif not isinstance(content, str):
            return ".content: " + _expected("a string or an array of text blocks", content)
        if "is_error" in block and not isinstance(block["is_error"], bool):
            return ".is_error: " + _expected("a boolean", block["is_error"])
    elif isinstance(kind, str):
        return f".type: expected one of {', '.join(BLOCK_TYPES)}, got {kind!r}"
    else:
        return ".type: " + _expected("a string", kind)
    return None


def messages_problem(messages: Any, path: str = "messages") -> str | None:
    """The first thing wrong with ``messages`` against API.md's shapes, as ``<path>: <reason>``; None
    when they are fine. Known fields are checked strictly (type and allowed values); unknown block
    types are refused (schema_version 1 has exactly four); extra fields are allowed and kept as they
    are. Linear in the number of blocks; it does not look inside strings (see ``runtime.text``)."""
    if not isinstance(messages, list):
        return f"{path}: " + _expected("an array", messages)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"{path}[{i}]: " + _expected("an object", message)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            shown = repr(role) if isinstance(role, str) else _json_type(role)
            return f'{path}[{i}].role: expected "user" or "assistant", got {shown}'
        content = message.get("content")
        if not isinstance(content, list):
            return f"{path}[{i}].content: " + _expected("an array", content)
        if "interrupted" in message and not isinstance(message["interrupted"], bool):
            return f"{path}[{i}].interrupted: " + _expected("a boolean", message["interrupted"])
        for j, block in enumerate(content):
            problem = _block_problem(block)
            if problem is not None:
                return f"{path}[{i}].content[{j}]{problem}"
    return None


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def readable_messages(messages: Any, source: str = "stored messages") -> list[Message]:
    """``messages`` as valid messages, for data stored without validation by an older version (a
    thread resumed from a file like ``content: ["hello"]``). Valid messages come back as they are.
    Otherwise nothing readable is dropped: a block without its type's shape becomes a text block with
    what it held (a string as it is, anything else as JSON), a message that is not an object with a
    user/assistant role becomes a user message of its text, and every lone surrogate becomes U+FFFD."""
    if messages_problem(messages) is None and not has_surrogate_in(messages):
        return list(messages)
    log.warning("%s: not valid (%s); read leniently, nothing readable dropped", source,
                messages_problem(messages) or "a lone surrogate")
    if not isinstance(messages, list):
        messages = [] if messages is None else [messages]
    out: list[Message] = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            out.append({"role": "user", "content": [{"type": "text", "text": _as_text(message)}]})
            continue
        content = message.get("content")
        blocks = content if isinstance(content, list) else ([] if content is None else [content])
        fixed: Message = {**message, "content": [
            block if _block_problem(block) is None else {"type": "text", "text": _as_text(block)}
            for block in blocks
        ]}
        if not isinstance(fixed.get("interrupted", False), bool):
            del fixed["interrupted"]
        out.append(fixed)
    return valid_value(out)


# A one-line preview of an item's or a turn's text (summaries, input_summary).
PREVIEW_CHARS = 120


def preview(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= PREVIEW_CHARS else line[: PREVIEW_CHARS - 1] + "…"


# ---- reading --------------------------------------------------------------------------------


def result_text(content: Any) -> str:
    """A tool result's text: a string, or the texts of a list of text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)
    return json.dumps(content, default=str)


def text_of(message: Message) -> str:
    """All text a person would read in a message (text, thinking and tool results)."""
    parts = []
    for block in message.get("content", ()):
        if not isinstance(block, dict):  # messages are validated; this keeps text_of total anyway
            continue
        kind = block.get("type")
        if kind in ("text", "thinking"):
            parts.append(block.get("text", ""))
        elif kind == "tool_result":
            parts.append(result_text(block.get("content")))
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
            # Item metadata is JSON in the store; an older version may have kept a lone surrogate there.
            use_id = valid_text(str(meta.get("tool_use_id") or item["id"]))
            tool_input = meta.get("input")
            _append_block(messages, "assistant", {
                "type": "tool_use", "id": use_id, "name": valid_text(str(meta.get("name") or "")),
                "input": valid_value(tool_input) if isinstance(tool_input, dict) else {},
            }, interrupted)
            if "result" in meta:
                block: dict[str, Any] = {"type": "tool_result", "tool_use_id": use_id,
                                         "content": valid_text(_as_text(meta["result"]))}
                if meta.get("is_error"):
                    block["is_error"] = True
                _append_block(messages, "user", block, False)
        elif kind == "context_compaction":
            messages[:] = [{"role": "user", "content": [{"type": "text", "text": f"{SUMMARY_PREFIX}\n{text}"}]}]


def build_messages(base: list[Message], items: Iterable[dict[str, Any]]) -> list[Message]:
    """``base`` (a resumed session's messages, as stored with the thread) and then the items folded in.
    ``base`` must be valid: ``records.engine_state`` passes it through ``readable_messages`` when it
    reads it (in a worker thread, as it is linear in the size of a resumed session)."""
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
