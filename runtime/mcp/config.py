"""MCP server configuration: the ``<data-dir>/mcp.json`` file (``{"mcpServers": {NAME: {...}}}``, the shape
other MCP clients use), its validation and its redaction (its all-or-nothing rewrite: runtime/mcp/changes.py).

``env`` (stdio) and ``headers`` (streamable HTTP) hold secrets (API keys, tokens): their values are written
to the file (mode 0600) and handed to the server, and nowhere else. ``redacted`` is the only shape that
leaves this package for a response, a log line or an error; ``scrub`` removes any secret value from a text
(an error message that quotes a command line or a URL).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

from ..errors import InvalidData, InvalidInput

__all__ = ["APPROVALS", "FILE_NAME", "NAME_RE", "REDACTED", "ServerConfig", "load", "parse", "scrub",
           "validate_name"]

FILE_NAME = "mcp.json"
# API.md "Tools from MCP servers": server names.
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
APPROVALS = ("ask", "auto", "writes")
# API.md defaults: a server gets 10 s to start and list its tools, a call 60 s.
DEFAULT_STARTUP_TIMEOUT = 10.0
DEFAULT_TOOL_TIMEOUT = 60.0
# Upper bound for either timeout (a day): past it a number is a mistake, and trio needs a finite deadline.
MAX_TIMEOUT = 86_400.0
# What a redacted ``env``/``headers`` value reads as. A PATCH that sends it back keeps the stored value, so
# a client may send a GET's ``config`` back with one field changed without wiping a secret.
REDACTED = "<redacted>"
# Length caps on what the file and the API accept (a command line, not a document).
MAX_STRING = 4096
MAX_ITEMS = 256
FIELDS = ("command", "args", "env", "url", "headers", "enabled", "approval", "enabled_tools", "disabled_tools",
          "startup_timeout", "tool_timeout")


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 40 else repr(name)[:37] + "..."
        raise InvalidInput(f"Invalid MCP server name {shown}: use 1-64 letters, digits, '_' or '-'")
    return name


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    url: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    enabled: bool = True
    approval: str = "ask"
    enabled_tools: tuple[str, ...] | None = None
    disabled_tools: tuple[str, ...] = ()
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    tool_timeout: float = DEFAULT_TOOL_TIMEOUT

    @property
    def transport(self) -> str:
        return "stdio" if self.command is not None else "http"

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(v for v in (*self.env.values(), *self.headers.values()) if v)

    def to_file(self) -> dict[str, Any]:
        """The file's entry (with secrets; only ``save`` writes it)."""
        out: dict[str, Any] = {}
        if self.command is not None:
            out.update(command=self.command, args=list(self.args), env=dict(self.env))
        else:
            out.update(url=self.url, headers=dict(self.headers))
        out.update(enabled=self.enabled, approval=self.approval)
        if self.enabled_tools is not None:
            out["enabled_tools"] = list(self.enabled_tools)
        out.update(disabled_tools=list(self.disabled_tools), startup_timeout=self.startup_timeout,
                   tool_timeout=self.tool_timeout)
        return out

    def redacted(self) -> dict[str, Any]:
        """The entry with every ``env``/``headers`` value replaced by REDACTED (keys stay: they say what
        is set, not what it is)."""
        out = self.to_file()
        for key in ("env", "headers"):
            if key in out:
                out[key] = {k: REDACTED for k in out[key]}
        return out

    def allows(self, tool: str) -> bool:
        """Whether the server's ``enabled_tools``/``disabled_tools`` let the model see ``tool``."""
        if self.enabled_tools is not None and tool not in self.enabled_tools:
            return False
        return tool not in self.disabled_tools


def scrub(text: str, config: ServerConfig) -> str:
    """``text`` with every secret value of ``config`` replaced by REDACTED."""
    for value in sorted(config.secrets, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


def _string(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_STRING or "\x00" in value:
        raise InvalidInput(f"{what} must be a non-blank string of at most {MAX_STRING} characters")
    return value


def _strings(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise InvalidInput(f"{what} must be a list of at most {MAX_ITEMS} strings")
    return tuple(_arg(v, what) for v in value)


def _arg(value: object, what: str) -> str:
    # Arguments may be blank ("" is a real argument), never anything but a string.
    if not isinstance(value, str) or len(value) > MAX_STRING or "\x00" in value:
        raise InvalidInput(f"each item of {what} must be a string of at most {MAX_STRING} characters")
    return value


def _mapping(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > MAX_ITEMS:
        raise InvalidInput(f"{what} must be an object of at most {MAX_ITEMS} string values")
    for k, v in value.items():
        if not isinstance(k, str) or not k or len(k) > MAX_STRING or "\x00" in k or "=" in k:
            raise InvalidInput(f"{what} has an invalid key: keys are non-empty strings")
        if not isinstance(v, str) or len(v) > MAX_STRING or "\x00" in v:
            # The value is never quoted: it may be a secret.
            raise InvalidInput(f"{what}[{k!r}] must be a string of at most {MAX_STRING} characters")
    return dict(value)


def _timeout(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (
            0 < value <= MAX_TIMEOUT):
        raise InvalidInput(f"{what} must be a number of seconds above 0 and at most {MAX_TIMEOUT:g}")
    return float(value)


def parse(name: str, data: object, *, where: str = "") -> ServerConfig:
    """A ServerConfig from a file entry or a request body (without ``name``); InvalidInput naming the
    field (and ``where``: the server) when anything is wrong. Unknown fields are refused, so a typo is
    never silently ignored."""
    validate_name(name)
    label = where or f"MCP server '{name}'"
    if not isinstance(data, dict):
        raise InvalidInput(f"{label}: the configuration must be a JSON object")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InvalidInput(f"{label}: unknown field(s) {', '.join(map(repr, unknown[:5]))} (known: {', '.join(FIELDS)})")
    has_command, has_url = data.get("command") is not None, data.get("url") is not None
    if has_command == has_url:
        raise InvalidInput(f"{label}: give either 'command' (stdio) or 'url' (streamable HTTP), not both or neither")
    kwargs: dict[str, Any] = {}
    if has_command:
        if data.get("url") is not None or data.get("headers"):
            raise InvalidInput(f"{label}: 'headers' belongs to 'url' servers, not 'command' ones")
        kwargs["command"] = _string(data["command"], f"{label}: command")
        if data.get("args") is not None:
            kwargs["args"] = _strings(data["args"], f"{label}: args")
        if data.get("env") is not None:
            kwargs["env"] = _mapping(data["env"], f"{label}: env")
    else:
        if data.get("args") or data.get("env"):
            raise InvalidInput(f"{label}: 'args' and 'env' belong to 'command' servers, not 'url' ones")
        url = _string(data["url"], f"{label}: url")
        if not re.match(r"https?://", url):
            raise InvalidInput(f"{label}: url must start with http:// or https://")
        kwargs["url"] = url
        if data.get("headers") is not None:
            kwargs["headers"] = _mapping(data["headers"], f"{label}: headers")
    if "enabled" in data:
        if not isinstance(data["enabled"], bool):
            raise InvalidInput(f"{label}: enabled must be true or false")
        kwargs["enabled"] = data["enabled"]
    if "approval" in data:
        if data["approval"] not in APPROVALS:
            raise InvalidInput(f"{label}: approval must be one of: {', '.join(APPROVALS)}")
        kwargs["approval"] = data["approval"]
    if data.get("enabled_tools") is not None:
        kwargs["enabled_tools"] = _strings(data["enabled_tools"], f"{label}: enabled_tools")
    if data.get("disabled_tools") is not None:
        kwargs["disabled_tools"] = _strings(data["disabled_tools"], f"{label}: disabled_tools")
    for key in ("startup_timeout", "tool_timeout"):
        if data.get(key) is not None:
            kwargs[key] = _timeout(data[key], f"{label}: {key}")
    return ServerConfig(name=name, **kwargs)


def merge(current: ServerConfig, patch: dict[str, Any]) -> ServerConfig:
    """``current`` with the fields of ``patch`` replaced (PATCH). A REDACTED value in ``env``/``headers``
    keeps the stored one; a ``command`` replaces a ``url`` server and the other way round."""
    if not isinstance(patch, dict):
        raise InvalidInput(f"MCP server '{current.name}': the body must be a JSON object")
    data = current.to_file()
    if patch.get("command") is not None:
        data.pop("url", None), data.pop("headers", None)
    if patch.get("url") is not None:
        data.pop("command", None), data.pop("args", None), data.pop("env", None)
    for key in ("env", "headers"):
        if isinstance(patch.get(key), dict):
            old = getattr(current, key)
            patch = {**patch, key: {k: old.get(k, v) if v == REDACTED else v for k, v in patch[key].items()}}
            if any(v == REDACTED for v in patch[key].values()):
                raise InvalidInput(f"MCP server '{current.name}': {key} has a {REDACTED!r} value for a key that"
                                   f" is not set")
    data.update(patch)
    return parse(current.name, data)


def path_of(data_dir: Path) -> Path:
    return data_dir / FILE_NAME


def load(data_dir: Path) -> dict[str, ServerConfig]:
    """The servers of ``<data_dir>/mcp.json``, in file order ({} without the file). InvalidData naming the
    file and the problem when it cannot be used (the runtime then starts without MCP servers, and every
    change re-reads it and is refused until it is fixed)."""
    path = path_of(data_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise InvalidData(f"Cannot read {path}: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidData(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("mcpServers", {}), dict):
        raise InvalidData(f"{path} must be an object with an object 'mcpServers'")
    servers: dict[str, ServerConfig] = {}
    for name, entry in doc.get("mcpServers", {}).items():
        try:
            servers[name] = parse(name, entry)
        except InvalidInput as exc:
            raise InvalidData(f"{path}: {exc.message}") from exc
    return servers
