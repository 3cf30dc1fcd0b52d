"""Portable sessions: the document an export hands out and an import takes back, and its Markdown form.

An export in ``json`` is the stored file's bytes as they are (``SessionService.read_document``); an
import decodes and checks a document exactly as a session file is checked on load
(``sessions.files.document_problem``), except that its ``metadata.id`` need not match a file name yet.
Both functions here block (a document can be 8-12 MB): callers run them in a worker thread, where they
hand the GIL to the event loop between messages (``codec.let_others_run``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .. import codec
from ..errors import InvalidInput
from .files import document_problem, validate_session_id
from ..transcript import result_text

# format -> (Content-Type, file name extension) of an export.
FORMATS = {
    "json": ("application/json", "json"),
    "markdown": ("text/markdown; charset=utf-8", "md"),
}
ROLE_HEADINGS = {"user": "User", "assistant": "Assistant"}
_BACKTICKS = re.compile(r"`+")


def check_format(format: object) -> str:
    if format not in FORMATS:
        raise InvalidInput(f"Cannot export a session as {format!r}: format must be one of: {', '.join(FORMATS)}")
    return format  # type: ignore[return-value]


def decode_import(data: bytes, session_id: str | None) -> tuple[dict[str, Any], str]:
    """The document in ``data`` with ``metadata.revision`` set to 1 (every other field, unknown ones
    too, kept as it is, in its order), and the id it is imported as: ``session_id`` when given, else
    the document's own ``metadata.id``. Raises InvalidInput naming the first bad path; nothing is
    written here."""
    label = f" '{session_id}'" if session_id is not None else ""
    try:
        doc = codec.loads(data)
        problem = document_problem(doc, data, None)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"Failed to import session{label}: the body is not a JSON document: {exc}") from exc
    except RecursionError as exc:  # the decoder or the surrogate walk, on a document nested too deeply
        raise InvalidInput(f"Failed to import session{label}: the document is nested too deeply") from exc
    if problem is None:
        try:
            validate_session_id(doc["metadata"]["id"])
        except InvalidInput as exc:
            problem = f"metadata.id: {exc.message}"
    if problem is not None:
        raise InvalidInput(f"Failed to import session{label}: {problem}")
    target = session_id if session_id is not None else doc["metadata"]["id"]
    # Created here, so revision 1; assigning an existing key keeps its place, so a document exported at
    # revision 1 encodes back to the very same bytes.
    doc["metadata"]["revision"] = 1
    doc["metadata"]["id"] = target
    return doc, target


def _fence(text: str, info: str = "") -> str:
    """``text`` as a fenced code block whose fence is longer than any run of backticks inside it."""
    longest = max((len(run) for run in _BACKTICKS.findall(text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.split("\n"))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _block(block: dict[str, Any]) -> str:
    kind = block["type"]
    if kind == "text":
        return block["text"]
    if kind == "thinking":
        return _quote(f"**Thinking**\n\n{block['text']}")
    if kind == "tool_use":
        # JSON of the tool's input as the stdlib writes it (pretty-printed): a person reads this.
        body = json.dumps(block["input"], ensure_ascii=False, indent=2, default=str)
        return f"**Tool call** `{block['name']}` (id `{block['id']}`)\n\n" + _fence(body, "json")
    error = " (error)" if block.get("is_error") else ""
    return f"**Tool result**{error} for `{block['tool_use_id']}`\n\n" + _fence(result_text(block["content"]))


def render_markdown(doc: dict[str, Any]) -> bytes:
    """A readable transcript of a validated document: the title, the system prompt if any, then each
    message under its role's heading; thinking is a quoted "Thinking" block, tool calls show their
    name and input as JSON, tool results their content ("error" when ``is_error``)."""
    meta = doc["metadata"]
    parts = [f"# {_one_line(meta['title'])}",
             f"Session `{meta['id']}`, {len(doc['messages'])} message(s), updated {meta['updated_at']}"]
    if doc.get("system_prompt"):
        parts += ["## System prompt", doc["system_prompt"]]
    for message in doc["messages"]:
        codec.let_others_run()
        heading = f"## {ROLE_HEADINGS[message['role']]}"
        if message.get("interrupted"):
            heading += " (interrupted)"
        parts.append(heading)
        parts += [_block(block) for block in message["content"]]
    return ("\n\n".join(parts) + "\n").encode("utf-8")
