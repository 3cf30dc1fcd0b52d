"""Request bodies and response records as dataclasses: the one source for validation and OpenAPI.

``parse_body`` validates a decoded JSON value against a body dataclass (exact types, unknown fields
rejected so a typo is never silently ignored) and ``json_schema`` turns any of these dataclasses into
the JSON Schema that ``/openapi.json`` publishes.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, ClassVar, Union

from runtime.errors import InvalidInput
from runtime.sessions.files import SESSION_ID_RE

MISSING = dataclasses.MISSING

# Constraints a field documents in /openapi.json (``field(metadata={"schema": ...})``). The runtime enforces
# them with its own messages; the schema says what a client may send. ``\S``: not blank (Python's ``str.isspace``
# and ``re``'s ``\s`` agree on what blank means, and so does the runtime's ``strip``/``split``).
NON_BLANK = {"pattern": r"\S"}
SESSION_ID = {"pattern": SESSION_ID_RE.pattern.replace("\\Z", "$")}
# Path parameters documented beyond "a string", by name.
PATH_PARAMS: dict[str, dict[str, Any]] = {"session_id": SESSION_ID}


def _documented(default: Any = MISSING, **schema: Any) -> Any:
    return dataclasses.field(default=default, metadata={"schema": schema})


# ---- request bodies ------------------------------------------------------------------------


@dataclasses.dataclass
class CreateThreadBody:
    # The caller's thread id (409 if taken); without it the server makes one (``thr_…``).
    id: str | None = _documented(None, **SESSION_ID)
    model: str | None = None
    workspace: str | None = None
    mode: str | None = None
    system_prompt: str | None = None
    title: str | None = None
    archived: bool = False
    approval_policy: str | None = _documented(None, enum=["ask", "auto", "deny"])


@dataclasses.dataclass
class UpdateThreadBody:
    at_least_one: ClassVar[bool] = True  # a body that sets nothing is 400
    archived: bool | None = None
    model: str | None = None
    mode: str | None = None
    title: str | None = None
    system_prompt: str | None = None
    approval_policy: str | None = _documented(None, enum=["ask", "auto", "deny"])


@dataclasses.dataclass
class DecideApprovalBody:
    decision: str = _documented(enum=["allow", "deny"])
    remember: bool = False
    message: str | None = None


@dataclasses.dataclass
class ApprovalRecord:
    id: str
    thread_id: str
    turn_id: str
    item_id: str
    tool: str
    input: dict[str, Any]
    status: str  # pending | allowed | denied | expired | canceled
    created_at: str
    expires_at: str
    resolved_at: str | None
    decided_by: str | None  # client | timeout | policy | interrupt
    message: str | None


@dataclasses.dataclass
class ApprovalList:
    approvals: list[ApprovalRecord]


@dataclasses.dataclass
class StartTurnBody:
    prompt: str = _documented(**NON_BLANK)
    model: str | None = None
    mode: str | None = None


@dataclasses.dataclass
class SteerBody:
    prompt: str = _documented(**NON_BLANK)


@dataclasses.dataclass
class EmptyBody:
    pass


@dataclasses.dataclass
class CompactBody:
    reason: str | None = None


@dataclasses.dataclass
class SaveSessionBody:
    thread_id: str | None = None
    session_id: str | None = _documented(None, **SESSION_ID)
    wait_for_idle: bool = False


@dataclasses.dataclass
class RebuildSessionBody:
    thread_id: str = _documented(**NON_BLANK)
    title: str | None = _documented(None, **NON_BLANK)


@dataclasses.dataclass
class PatchSessionBody:
    at_least_one: ClassVar[bool] = True
    title: str | None = _documented(None, **NON_BLANK)
    archived: bool | None = None


IF_BUSY = _documented("reject", enum=["reject", "interrupt"])


@dataclasses.dataclass
class ForkBody:
    through_turn_id: str | None = _documented(None, **NON_BLANK)
    title: str | None = _documented(None, **NON_BLANK)
    id: str | None = _documented(None, **SESSION_ID)  # a thread id follows the session id rule


@dataclasses.dataclass
class RewindBody:
    before_turn_id: str = _documented(**NON_BLANK)
    if_busy: str = IF_BUSY


@dataclasses.dataclass
class RetryBody:
    turn_id: str | None = _documented(None, **NON_BLANK)
    model: str | None = None
    mode: str | None = None
    if_busy: str = IF_BUSY


@dataclasses.dataclass
class RestoreBody:
    session_id: str = _documented(**SESSION_ID)
    if_busy: str = IF_BUSY


@dataclasses.dataclass
class ResumeSessionBody:
    model: str | None = None
    mode: str | None = None


# ---- response records (documentation only: the runtime builds these as dicts) -----------------


@dataclasses.dataclass
class ErrorDetail:
    status: int
    code: str
    message: str


@dataclasses.dataclass
class ErrorResponse:
    error: ErrorDetail


@dataclasses.dataclass
class Health:
    status: str
    service: str
    mode: str


@dataclasses.dataclass
class RuntimeInfo:
    version: str
    data_dir: str
    model_backend: str
    uptime_seconds: float
    live_engines: int
    subscribers: int
    store: str
    host_id: str
    advertise_url: str | None


@dataclasses.dataclass
class ForkedFrom:
    thread_id: str
    through_turn_id: str | None


@dataclasses.dataclass
class LeaseOwner:
    """The host that runs the thread's engine (several hosts on one PostgreSQL): its lease in the database."""

    host_id: str
    advertise_url: str | None
    epoch: int
    expires_at: str  # database clock


@dataclasses.dataclass
class ThreadRecord:
    id: str
    created_at: str
    updated_at: str
    model: str
    workspace: str | None
    mode: str
    archived: bool
    title: str | None
    system_prompt: str | None
    latest_turn_id: str | None
    session_id: str | None
    forked_from: ForkedFrom | None = None
    approval_policy: str = "ask"  # ask | auto | deny
    allowed_tools: list[str] = dataclasses.field(default_factory=list)  # allowed for the rest of the thread
    # PostgreSQL only (absent on SQLite): the lease's owner, null when no live host holds it.
    owner: LeaseOwner | None = None


@dataclasses.dataclass
class Usage:
    input_tokens: int
    output_tokens: int


@dataclasses.dataclass
class TurnRecord:
    id: str
    thread_id: str
    status: str
    input_summary: str
    created_at: str
    started_at: str | None
    ended_at: str | None
    duration_ms: int | None
    usage: Usage | None
    error: str | None
    item_ids: list[str]
    steer_count: int
    rewound: bool = False  # left the live history (listed only with include_rewound=true)
    retry_of: str | None = None  # the turn this one retried


@dataclasses.dataclass
class TurnItemRecord:
    id: str
    turn_id: str
    kind: str
    status: str
    summary: str
    detail: str | None
    metadata: dict[str, Any] | None
    started_at: str | None
    ended_at: str | None


@dataclasses.dataclass
class TurnsPage:
    turns_limit: int  # the page size used (turns_limit clamped to 1..1000; default 20)
    before: str | None  # the cursor this page was asked with (null: the latest turns)
    next_before: str | None  # the cursor of the older turns; null when this page has the oldest one


@dataclasses.dataclass
class ThreadDetail:
    thread: ThreadRecord
    turns: list[TurnRecord]
    items: list[TurnItemRecord]
    latest_seq: int
    page: TurnsPage


@dataclasses.dataclass
class ForkResult:
    thread: ThreadRecord
    forked_from: ForkedFrom
    turn_ids: list[str]


@dataclasses.dataclass
class RewindResult:
    thread: ThreadRecord
    removed_turn_ids: list[str]
    latest_seq: int


@dataclasses.dataclass
class RestoreResult:
    thread: ThreadRecord
    session_id: str
    revision: int
    message_count: int
    safety_session_id: str


@dataclasses.dataclass
class CompactResult:
    turn_id: str
    item: TurnItemRecord
    summary: str


@dataclasses.dataclass
class SessionMetadata:
    id: str
    title: str
    created_at: str
    updated_at: str
    message_count: int
    total_tokens: int
    model: str | None
    workspace: str | None
    mode: str | None
    archived: bool
    revision: int


@dataclasses.dataclass
class SessionDocument:
    metadata: SessionMetadata
    messages: list[dict[str, Any]]
    system_prompt: str | None
    schema_version: int = 1  # the stored file's bytes are served as they are, its schema_version too


@dataclasses.dataclass
class SaveSessionResult:
    session_id: str
    thread_id: str
    turn_in_progress: bool
    session: SessionDocument


@dataclasses.dataclass
class RebuildSessionResult:
    session_id: str
    thread_id: str
    message_count: int
    title: str


@dataclasses.dataclass
class SessionList:
    sessions: list[SessionMetadata]


@dataclasses.dataclass
class PatchSessionResult:
    session: SessionMetadata
    changes: dict[str, Any]


@dataclasses.dataclass
class ImportResult:
    session_id: str
    revision: int


@dataclasses.dataclass
class ResumeResult:
    thread_id: str
    session_id: str
    message_count: int
    summary: str


# ---- validation ----------------------------------------------------------------------------

_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", dict: "an object",
          list: "an array"}


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _matches(value: Any, hint: Any) -> bool:
    base = typing.get_origin(hint) or hint
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, base)


@functools.cache
def _body_fields(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """A body class's resolved hints and fields, made once per class: ``typing.get_type_hints`` evaluates
    every annotation string again on each call (~1.5% of a request's main-thread time, issue 16). Callers
    only read them."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


@functools.cache
def _field_checks(cls: type) -> tuple[tuple[str, Any, bool, bool], ...]:
    """Per field of a body class, made once per class: its name, its hint without ``| None``, whether null
    is allowed, whether it is required (``typing.get_origin``/``get_args`` on every field of every request
    were ~40% of ``parse_body``, issue 16)."""
    hints, fields = _body_fields(cls)
    return tuple((name, *_unwrap_optional(hints[name]),
                  field.default is MISSING and field.default_factory is MISSING) for name, field in fields.items())


def parse_body(cls: type, data: Any) -> Any:
    """Validate decoded JSON against ``cls``; InvalidInput names the offending field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidInput("The request body must be a JSON object")
    _, fields = _body_fields(cls)
    if not data.keys() <= fields.keys():
        unknown = sorted(set(data) - set(fields))
        allowed = ", ".join(fields) or "none"
        raise InvalidInput(f"Unknown field '{unknown[0]}' (allowed: {allowed})")
    kwargs = {}
    for name, hint, optional, required in _field_checks(cls):
        if name not in data:
            if required:
                raise InvalidInput(f"Missing required field '{name}'")
            continue
        value = data[name]
        if value is None:
            if not optional:
                raise InvalidInput(f"Field '{name}' must be {_NAMES.get(hint, hint)}, not null")
        elif not _matches(value, hint):
            raise InvalidInput(f"Field '{name}' must be {_NAMES.get(typing.get_origin(hint) or hint, hint)}")
        elif isinstance(value, str) and not _is_unicode(value):
            # JSON may escape a lone surrogate (\ud800); such a string cannot be stored (SQLite, UTF-8 files).
            raise InvalidInput(f"Field '{name}' must be valid Unicode text (it holds a lone surrogate)")
        kwargs[name] = value
    return cls(**kwargs)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def provided(body: Any) -> dict[str, Any]:
    """The fields of a parsed PATCH-style body that the client actually set (non-null). The values are the
    parsed JSON's own (a body holds no dataclasses, and nothing else holds its values), not the deep copies
    ``dataclasses.asdict`` made (~10x the cost, issue 16)."""
    return {name: value for name in _body_fields(type(body))[1] if (value := getattr(body, name)) is not None}


# ---- JSON Schema ---------------------------------------------------------------------------


def required_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.default is MISSING and f.default_factory is MISSING]


def _constrained(schema: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """``schema`` of a field plus its documented constraints (which apply to its non-null values). ``pattern``
    applies to strings only, but ``enum`` to every value: a field that may be null lists null among its values
    (the fuzz test found PATCH accepting ``"approval_policy": null``, "unchanged", against an enum without it)."""
    if not extra:
        return schema
    if schema.get("type") == "string":
        return {**schema, **extra}
    if schema.get("type") == ["string", "null"]:
        extra = {**extra, "enum": [*extra["enum"], None]} if "enum" in extra else extra
        return {**schema, **extra}
    return schema


def json_schema(hint: Any, components: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema for a type hint; dataclasses become ``#/components/schemas`` references."""
    hint, optional = _unwrap_optional(hint)
    schema: dict[str, Any]
    if dataclasses.is_dataclass(hint):
        name = hint.__name__
        if name not in components:
            components[name] = {}  # placeholder against recursion
            hints = typing.get_type_hints(hint)
            props = {f.name: _constrained(json_schema(hints[f.name], components), f.metadata.get("schema"))
                     for f in dataclasses.fields(hint)}
            required = required_fields(hint)
            body: dict[str, Any] = {"type": "object", "properties": props}
            if name.endswith("Body"):  # request bodies reject unknown fields; responses may grow
                body["additionalProperties"] = False
            if required:
                body["required"] = required
            if getattr(hint, "at_least_one", False):  # at least one field present and not null
                body["anyOf"] = [{"required": [f.name], "properties": {f.name: {"not": {"type": "null"}}}}
                                 for f in dataclasses.fields(hint)]
            components[name] = body
        schema = {"$ref": f"#/components/schemas/{name}"}
        if optional:
            schema = {"anyOf": [schema, {"type": "null"}]}
        return schema
    origin = typing.get_origin(hint) or hint
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        schema = {"type": "array", "items": json_schema(item, components) if item is not Any else {}}
    elif origin is dict:
        schema = {"type": "object"}
    elif origin is bool:
        schema = {"type": "boolean"}
    elif origin is int:
        schema = {"type": "integer"}
    elif origin is float:
        schema = {"type": "number"}
    elif origin is str:
        schema = {"type": "string"}
    else:
        schema = {}
    if optional and "type" in schema:
        schema = {**schema, "type": [schema["type"], "null"]}
    return schema


# ---- MCP servers (API.md "Tools from MCP servers") ------------------------------------------------


@dataclasses.dataclass
class McpServerConfig:
    """The configurable fields of an MCP server, shared by the add and the update bodies (not a body itself)."""

    command: str | None = None
    args: list[str] | None = None
    env: dict[str, str] | None = None
    url: str | None = None
    headers: dict[str, str] | None = None
    enabled: bool | None = None
    approval: str | None = _documented(None, enum=["ask", "auto", "writes"])
    enabled_tools: list[str] | None = None
    disabled_tools: list[str] | None = None
    startup_timeout: float | None = None
    tool_timeout: float | None = None


@dataclasses.dataclass(kw_only=True)
class McpServerBody(McpServerConfig):
    name: str = _documented(pattern="^[A-Za-z0-9_-]{1,64}$")


@dataclasses.dataclass
class UpdateMcpServerBody(McpServerConfig):
    at_least_one: ClassVar[bool] = True  # a body that sets nothing is 400


@dataclasses.dataclass
class McpServerRecord:
    name: str
    transport: str  # stdio | http
    enabled: bool
    status: str  # starting | ready | failed | disabled
    tools_count: int
    config: dict[str, Any]  # env and headers values redacted
    error: str | None = None


@dataclasses.dataclass
class McpServerList:
    servers: list[McpServerRecord]
    # What is wrong with mcp.json now (re-read on every GET), naming the file; null when it is fine. While it
    # is set, every change answers 409 with the same reason (the API never overwrites a file it cannot parse).
    file_error: str | None


@dataclasses.dataclass
class McpToolRecord:
    name: str  # <server>__<tool>
    server: str
    description: str
    input_schema: dict[str, Any]
    read_only: bool


@dataclasses.dataclass
class McpToolList:
    tools: list[McpToolRecord]
