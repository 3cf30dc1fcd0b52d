"""``McpServers``: the runtime's MCP servers, each a supervised task in the runtime's nursery, and
``RuntimeTools``: the built-in tools and every ready server's tools behind the one registry-like object the
engine calls (``ThreadManager.tools``).

A server's task (``_supervise``) starts the server (stdio: a child process through the SDK's
``stdio_client``), initializes an MCP ``ClientSession`` and lists its tools, bounded by ``startup_timeout``;
then it is ``ready`` until the server exits (its stdout ends), when it is ``failed`` with the reason and
restarted after a capped backoff. Stopping a server (DELETE, disable, a config change, reconnect, shutdown)
cancels its task: the SDK's process wrapper kills the child and reaps it in a shielded wait, so no child
process outlives its task. One server failing never touches the runtime or another server: every
failure is caught in its own task and becomes its status.

Each start gets a fresh ``_Server`` object; a stopped task may finish its cleanup after its successor
started, and only ever writes to its own object.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import anyio
import jsonschema
import trio

from ..errors import Conflict, InvalidData, NotFound, StorageError
from ..models.base import ToolOutcome, ToolSpec
from ..text import valid_text
from ..sessions import COMMIT_TIMEOUT
from ..store import WriteRequest
from . import changes as mcp_changes
from . import config as mcp_config
from .config import ServerConfig

log = logging.getLogger(__name__)

__all__ = ["McpServers", "McpTool", "RuntimeTools", "TOOL_SEPARATOR", "exposed_name"]

# ``<server>__<tool>``: API.md "Tools from MCP servers".
TOOL_SEPARATOR = "__"
# The longest function name OpenAI's API accepts (its documented limit, 64); every exposed MCP tool name fits.
MAX_TOOL_NAME = 64
# Hex digits of the SHA-256 of ``<server>__<tool>`` that end a shortened name (32 bits: two tools of one
# runtime sharing a 55-character beginning and a hash is not a practical case; a duplicate name is left out
# anyway, see McpServers.tools).
TOOL_HASH_CHARS = 8
# A shortened name keeps at least this much of the server's name (which server it is, at a glance).
MIN_SERVER_CHARS = 8
# Tool names the model can be offered (OpenAI's function-name rule); a server's tool named otherwise is
# left out (logged), since no backend could call it.
TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Every stdio server runs under this launcher (run with ``python -I -S``; its docstring says why).
LAUNCHER = Path(__file__).with_name("launcher.py")
# A ready streamable-HTTP server is pinged (MCP's ``ping``) this often, so that its death is seen without
# waiting for a call to fail; a few seconds keeps the cost one tiny request per interval.
HTTP_PING_SECONDS = 5.0
# How long a ping may take before the server counts as dead: far above a healthy answer (milliseconds)
# even on a loaded 2-core machine, so a slow moment is not a failure.
HTTP_PING_TIMEOUT = 10.0
# Restart backoff after a server exits or fails to start: doubles from the first to the cap (a crashing
# server costs at most one start every RESTART_BACKOFF_MAX seconds); reset once the server was ready.
RESTART_BACKOFF_FIRST = 0.5
RESTART_BACKOFF_MAX = 30.0
# How long sending MCP's cancellation notification may take after a call is interrupted or times out:
# one line written to the server's stdin, so a second is plenty; past it the server is wedged and the
# notification is dropped (the call is abandoned either way).
CANCEL_NOTICE_SECONDS = 1.0
# How long a route waits for a stopped server's process to be gone before answering (the kill is SIGKILL
# and a reap: milliseconds; the bound only keeps a wedged reap from holding the request).
STOP_WAIT_SECONDS = 10.0
# Results longer than this are cut (the same bound as built-in tools: runtime.models.tools).
MAX_RESULT_CHARS = 16_000
# Status changes kept per server (tests and diagnostics read the last ones).
TRANSITIONS_KEPT = 20


def exposed_name(server: str, tool: str) -> str:
    """The name the model and the API see for ``tool`` of ``server``: ``<server>__<tool>``, or, when that is
    longer than MAX_TOOL_NAME, ``<server, cut>__<tool, cut>_<hash>``: the server's name is cut first (to at
    least MIN_SERVER_CHARS) so the model still reads the tool's name; the hash is of the whole name, so the
    result is stable across restarts and two long names that share their beginnings still differ."""
    full = f"{server}{TOOL_SEPARATOR}{tool}"
    if len(full) <= MAX_TOOL_NAME:
        return full
    digest = hashlib.sha256(full.encode("utf-8")).hexdigest()[:TOOL_HASH_CHARS]
    room = MAX_TOOL_NAME - len(TOOL_SEPARATOR) - 1 - TOOL_HASH_CHARS  # for the two cut parts
    server_part = server[:max(MIN_SERVER_CHARS, room - len(tool))]
    return f"{server_part}{TOOL_SEPARATOR}{tool[:room - len(server_part)]}_{digest}"


class McpTool:
    """One server tool as the engine sees it. ``needs_approval`` is always True so that the thread's
    policy applies first (``auto`` allows, ``deny`` denies); under ``ask`` the server's ``approval``
    decides through ``asks_under_ask``."""

    def __init__(self, server: ServerConfig, tool: Any) -> None:
        self.server = server.name
        self.tool = tool.name
        self.name = exposed_name(server.name, tool.name)
        self.description = tool.description or tool.title or tool.name
        self.input_schema: dict[str, Any] = dict(tool.inputSchema or {"type": "object"})
        annotations = tool.annotations
        self.read_only = bool(annotations is not None and annotations.readOnlyHint)
        self.writes = not self.read_only
        self.needs_approval = True
        self.asks_under_ask = {"ask": True, "auto": False}.get(server.approval, not self.read_only)
        self.validator = jsonschema.Draft202012Validator(self.input_schema)

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.input_schema)

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "server": self.server, "tool": self.tool, "description": self.description,
                "input_schema": self.input_schema, "read_only": self.read_only}


class _Server:
    """One start of one server: its config, status, session and tools."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.status = "starting" if config.enabled else "disabled"
        self.error: str | None = None
        self.session: Any = None
        self.tools: dict[str, McpTool] = {}
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.settled = trio.Event()  # left "starting" once (ready or failed), or stopped
        self.changed = trio.Event()
        self.calls: set[trio.CancelScope] = set()  # calls in flight on the current session
        self.restarts = 0
        self.was_ready = False
        self.transitions: collections.deque[tuple[str, str | None]] = collections.deque(maxlen=TRANSITIONS_KEPT)
        if not config.enabled:
            self.done.set()
            self.settled.set()

    def set(self, status: str, error: str | None = None) -> None:
        self.status = status
        self.error = None if error is None else mcp_config.scrub(error, self.config)
        if status != "ready":
            self.session, self.tools = None, {}
            for call in self.calls:
                call.cancel()
        if status != "starting":
            self.settled.set()
        self.transitions.append((status, self.error))
        self.changed.set()
        self.changed = trio.Event()

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.config.name, "transport": self.config.transport,
                               "enabled": self.config.enabled, "status": self.status}
        if self.error is not None:
            out["error"] = self.error
        out.update(tools_count=len(self.tools), config=self.config.redacted())
        return out


def _leaf(exc: BaseException) -> BaseException:
    """The first non-group exception of ``exc`` (anyio's task groups on trio wrap errors in groups)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    exc = _leaf(exc)
    error = getattr(exc, "error", None)  # mcp.shared.exceptions.McpError carries ErrorData
    message = getattr(error, "message", None) or str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        message = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return valid_text(message)


def _resolve(cfg: ServerConfig) -> str:
    """The server's program as an absolute path, looked up on the PATH the server gets (the SDK's default
    environment plus ``env``), so that a missing program is an error naming it at once rather than an
    exit of the launcher."""
    from mcp.client.stdio import get_default_environment

    assert cfg.command is not None
    path = {**get_default_environment(), **cfg.env}.get("PATH", os.defpath)
    found = shutil.which(cfg.command, path=path)
    if found is None:
        if os.sep in cfg.command and os.path.exists(cfg.command):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), cfg.command)
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), cfg.command)
    return os.path.abspath(found)


def _result_text(result: Any) -> str:
    """A CallToolResult as one text: the text blocks joined; structured content as JSON when there is
    no text; other blocks named (an image is not text the model can read here)."""
    parts: list[str] = []
    for block in result.content or ():
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource" and hasattr(block.resource, "text"):
            parts.append(block.resource.text)
        else:
            parts.append(f"[{kind or 'unknown'} content omitted]")
    if not parts and result.structuredContent is not None:
        parts.append(json.dumps(result.structuredContent, ensure_ascii=False, default=str))
    text = valid_text("\n".join(parts))
    if len(text) > MAX_RESULT_CHARS:
        text = text[: MAX_RESULT_CHARS - 1] + "…"
    return text


def _exited(tool: McpTool) -> ToolOutcome:
    return ToolOutcome(f"Tool '{tool.name}' failed: MCP server '{tool.server}' exited during the call (it is being"
                       " restarted; the call may or may not have had its effect)", is_error=True)


class McpServers:
    """The runtime's MCP servers (see the module docstring). ``run`` is started in the runtime's nursery;
    ``aclose`` stops every server. Changes (``add``, ``update``, ``delete``) re-read ``mcp.json``, rewrite it
    all-or-nothing through the store (runtime/mcp/changes.py), then start/stop processes so that they
    follow the file; ``reconnect`` restarts one. One change at a time (``_lock``)."""

    def __init__(self, data_dir: Path, store: Any = None, fs: Any = None) -> None:
        self.data_dir = data_dir
        self.store = store  # the runtime's Store: changes commit through it (None: read-only use, doctor)
        self.files = mcp_changes.McpFile(data_dir, fs)
        self._unknown: mcp_changes.FileChange | None = None  # a change whose write outlived its bound
        self._servers: dict[str, _Server] = {}
        self._nursery: trio.Nursery | None = None
        self._scope = trio.CancelScope()
        self._lock = trio.Lock()
        self.load_error: str | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start every enabled server of ``mcp.json`` in parallel; report started once each is ready or
        failed (each bounded by its ``startup_timeout``), then supervise until ``aclose``."""
        await self._recover()
        try:
            configs = mcp_config.load(self.data_dir)
        except InvalidData as exc:
            self.load_error = exc.message
            log.error("MCP servers not started: %s", exc.message)
            configs = {}
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for cfg in configs.values():
                    self._start(cfg)
                for server in list(self._servers.values()):
                    await server.settled.wait()  # bounded: startup_timeout, then "failed"
                task_status.started()
                await trio.sleep_forever()

    async def aclose(self) -> None:
        """Stop every server: cancels their tasks; each kills and reaps its child (see the module doc)."""
        self._scope.cancel()

    def _start(self, cfg: ServerConfig) -> _Server:
        server = _Server(cfg)
        self._servers[cfg.name] = server
        if cfg.enabled:
            assert self._nursery is not None
            self._nursery.start_soon(self._supervise, server, name=f"mcp server {cfg.name}")
        return server

    def _stop(self, name: str) -> _Server | None:
        server = self._servers.pop(name, None)
        if server is not None:
            server.scope.cancel()
        return server

    async def _supervise(self, server: _Server) -> None:
        backoff = RESTART_BACKOFF_FIRST
        try:
            with server.scope:
                while True:
                    try:
                        await self._connect(server)
                    except Exception as exc:  # any failure of this server is its status, never the runtime's
                        server.set("failed", _describe(exc))
                    log.warning("MCP server '%s' failed: %s", server.config.name, server.error)
                    if server.was_ready:
                        backoff = RESTART_BACKOFF_FIRST  # it was up: a fresh failure starts the backoff over
                        server.was_ready = False
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
                    server.restarts += 1
                    server.set("starting")
        finally:
            server.session, server.tools = None, {}
            for call in server.calls:
                call.cancel()
            server.done.set()
            server.settled.set()

    async def _connect(self, server: _Server) -> None:
        """One life of the server: start, initialize, list tools (bounded by ``startup_timeout``), then
        return when its stream ends. Raises on a failed start."""
        # ``life`` is cancelled when a wedged HTTP server is given up: its transport's cleanup (a session
        # DELETE to that server) must not wait for httpx's timeouts before the restart.
        with trio.CancelScope() as life:
            await self._connect_once(server, life)

    async def _connect_once(self, server: _Server, life: trio.CancelScope) -> None:
        from mcp import ClientSession

        cfg = server.config
        async with self._transport(cfg) as (read, write):
            closed = trio.Event()
            forward_tx, forward_rx = anyio.create_memory_object_stream[Any](0)

            async def pump() -> None:
                # Forwards the server's messages to the session; the end of the server's stream (its
                # process exited, or the HTTP connection ended) is how its death is noticed.
                try:
                    async with forward_tx:
                        async for message in read:
                            await forward_tx.send(message)
                finally:
                    closed.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump)
                async with ClientSession(forward_rx, write) as session:
                    with trio.move_on_after(cfg.startup_timeout) as startup:
                        await session.initialize()
                        tools = await self._list_tools(session, cfg)
                    if startup.cancelled_caught:
                        raise TimeoutError(f"the server did not start within its startup_timeout of"
                                           f" {cfg.startup_timeout:g} s")
                    server.session, server.tools = session, tools
                    server.was_ready = True
                    server.set("ready")
                    if cfg.transport == "http":
                        try:
                            await self._watch_http(session, closed)
                        except TimeoutError as exc:
                            server.set("failed", str(exc))
                            life.cancel()
                            return
                    else:
                        await closed.wait()
                    server.set("failed", "the server closed its connection (it exited); restarting")
                nursery.cancel_scope.cancel()

    @staticmethod
    async def _watch_http(session: Any, closed: trio.Event) -> None:
        """Until ``closed``, ping a streamable-HTTP server every HTTP_PING_SECONDS: there is no process to
        watch, so a dead server is only seen when a request fails. A refused connection crashes the SDK's
        transport (its exception ends ``_connect``, hence the status); a server that accepts but does not
        answer within HTTP_PING_TIMEOUT raises TimeoutError here. Either way the server is ``failed`` with
        the reason, its calls in flight get an error result, and the restart backoff reconnects it."""
        while not closed.is_set():
            with trio.move_on_after(HTTP_PING_SECONDS):
                await closed.wait()
                return
            with trio.move_on_after(HTTP_PING_TIMEOUT) as ping:
                await session.send_ping()
            if ping.cancelled_caught:
                raise TimeoutError(f"the server did not answer a ping within {HTTP_PING_TIMEOUT:g} s;"
                                   f" reconnecting")

    @contextlib.asynccontextmanager
    async def _transport(self, cfg: ServerConfig) -> Any:
        if cfg.command is not None:
            from mcp.client.stdio import StdioServerParameters, stdio_client

            # The server runs under the launcher (see runtime/mcp/launcher.py: it dies with the runtime even
            # on kill -9, and its stderr goes to a log file per server in the data dir, rotated there; it
            # is the server's own output, the runtime's log never quotes it).
            logs = self.data_dir / "mcp-logs"
            logs.mkdir(exist_ok=True)
            log_path = logs / f"{cfg.name}.stderr.log"
            command = _resolve(cfg)
            params = StdioServerParameters(
                command=sys.executable,
                args=["-I", "-S", str(LAUNCHER), str(os.getpid()), str(log_path), command, *cfg.args],
                env=dict(cfg.env) or None)
            # The launcher's own stderr (only a Python error of the launcher itself would reach it).
            with open(log_path, "ab") as errlog:
                async with stdio_client(params, errlog=errlog) as streams:
                    yield streams
        else:
            from mcp.client.streamable_http import streamable_http_client
            from mcp.shared._httpx_utils import create_mcp_http_client

            async with create_mcp_http_client(headers=dict(cfg.headers) or None) as client:
                async with streamable_http_client(cfg.url, http_client=client) as (read, write, _):
                    yield read, write

    @staticmethod
    async def _list_tools(session: Any, cfg: ServerConfig) -> dict[str, McpTool]:
        tools: dict[str, McpTool] = {}
        cursor = None
        while True:
            page = await session.list_tools(cursor=cursor) if cursor else await session.list_tools()
            for tool in page.tools:
                if not TOOL_NAME_RE.fullmatch(tool.name):
                    log.warning("MCP server '%s': tool %r left out (its name has characters a model cannot"
                                " call)", cfg.name, tool.name[:80])
                    continue
                if not cfg.allows(tool.name):
                    continue
                try:
                    tools[tool.name] = McpTool(cfg, tool)
                except jsonschema.SchemaError as exc:
                    log.warning("MCP server '%s': tool %r left out (invalid input schema: %s)", cfg.name,
                                tool.name, exc.message[:200])
            cursor = page.nextCursor
            if not cursor:
                return tools

    # ---- reading ----------------------------------------------------------------------------------

    def servers(self) -> list[dict[str, Any]]:
        return [server.view() for server in self._servers.values()]

    def server(self, name: str) -> dict[str, Any]:
        return self._get(name).view()

    def _get(self, name: str) -> _Server:
        mcp_config.validate_name(name)
        server = self._servers.get(name)
        if server is None:
            raise NotFound(f"MCP server '{name}' not found")
        return server

    def tools(self) -> Iterator[McpTool]:
        """Every ready server's tools, each exposed name once: if two tools end up with the same name (server
        ``a`` tool ``b__c`` and server ``a__b`` tool ``c``), the server earlier in ``mcp.json`` keeps it."""
        seen: set[str] = set()
        for server in list(self._servers.values()):
            if server.status == "ready":
                for tool in server.tools.values():
                    if tool.name not in seen:
                        seen.add(tool.name)
                        yield tool

    def tool(self, name: str) -> McpTool | None:
        """The tool exposed as ``name`` (the one ``tools`` lists), None if no ready server offers it."""
        return next((tool for tool in self.tools() if tool.name == name), None)

    def state(self, name: str) -> _Server | None:
        """The current start of server ``name`` (tests wait on its ``changed``/``settled``)."""
        return self._servers.get(name)

    # ---- calls -----------------------------------------------------------------------------------------

    async def call(self, tool: McpTool, arguments: dict[str, Any]) -> ToolOutcome:
        """Call ``tool`` on its server, bounded by the server's ``tool_timeout``. Never raises for the
        call's own failure (it is an error outcome). Cancelled (an interrupt), it sends MCP's cancellation
        notification for the request and re-raises; a timeout sends it too."""
        from mcp import types

        server = self._servers.get(tool.server)
        session = server.session if server is not None else None
        if server is None or session is None:
            why = "it is not configured" if server is None else f"it is {server.status}" + (
                f" ({server.error})" if server.error else "")
            return ToolOutcome(f"Tool '{tool.name}' failed: MCP server '{tool.server}' is not ready: {why}",
                               is_error=True)
        timeout = server.config.tool_timeout
        # The SDK numbers requests itself and takes the number before its first await, so the id read here
        # is the id of the call below (needed for the cancellation notification; the 1.x client sends none).
        request_id = session._request_id

        async def notify_cancelled(reason: str) -> None:
            note = types.ClientNotification(types.CancelledNotification(
                params=types.CancelledNotificationParams(requestId=request_id, reason=reason)))
            with trio.move_on_after(CANCEL_NOTICE_SECONDS):
                try:
                    await session.send_notification(note)
                except Exception:  # the server is gone: nothing to tell
                    pass

        # Cancelled by the server's task when the server's connection ends (it exited): the SDK would leave
        # the call waiting for an answer that cannot come.
        lost = trio.CancelScope()
        server.calls.add(lost)
        try:
            with lost:
                with trio.fail_after(timeout):
                    result = await session.call_tool(tool.tool, arguments)
        except trio.TooSlowError:
            await notify_cancelled("tool_timeout")
            return ToolOutcome(f"Tool '{tool.name}' did not finish within {timeout:g} s (tool_timeout of MCP"
                               f" server '{tool.server}')", is_error=True)
        except trio.Cancelled:
            # Shielded so the server hears the request is cancelled although this task is being cancelled;
            # bounded by CANCEL_NOTICE_SECONDS inside notify_cancelled.
            with trio.CancelScope(shield=True):
                await notify_cancelled("interrupted")
            raise
        except Exception as exc:
            if getattr(getattr(_leaf(exc), "error", None), "code", None) == types.CONNECTION_CLOSED:
                # The server's end closed while the call waited: the SDK answers pending calls so when its
                # reader ends, which may come before the supervisor's cancel of ``lost``; the same event.
                # Wait (briefly: the supervisor sees the same end of stream) until the status says so, so
                # that whoever reads this result and then the status never sees the dead start "ready".
                with trio.move_on_after(STOP_WAIT_SECONDS):
                    while server.session is session:
                        await server.changed.wait()
                return _exited(tool)
            message = mcp_config.scrub(_describe(exc), server.config)
            return ToolOutcome(f"Tool '{tool.name}' failed: MCP server '{tool.server}': {message}", is_error=True)
        finally:
            server.calls.discard(lost)
        if lost.cancelled_caught:
            return _exited(tool)
        text = mcp_config.scrub(_result_text(result), server.config)
        return ToolOutcome(text, is_error=bool(result.isError))

    # ---- changes (API) ----------------------------------------------------------------------------
    #
    # Every change re-reads mcp.json (a hand edit is never lost, and a file fixed by hand unblocks changes
    # without a restart), commits the new file with its journal row and idempotency record in one store
    # write (runtime/mcp/changes.py), settles it from the journal, and then the processes follow the
    # committed file, with no checkpoint between the settle and the process change.

    async def file_error(self) -> str | None:
        """What is wrong with mcp.json now (re-read), or None; also what the next change will be refused for."""
        try:
            await trio.to_thread.run_sync(mcp_config.load, self.data_dir, abandon_on_cancel=True)
        except InvalidData as exc:
            self.load_error = exc.message
        else:
            self.load_error = None
        return self.load_error

    async def _read_file(self) -> dict[str, ServerConfig]:
        """The servers of mcp.json as the file says now (an earlier change left unsettled settled first);
        Conflict naming the file and the problem when it cannot be used (a change would drop the user's
        file: refused, never overwritten)."""
        await self._settle_unknown()
        try:
            configs = await trio.to_thread.run_sync(mcp_config.load, self.data_dir, abandon_on_cancel=True)
        except InvalidData as exc:
            self.load_error = exc.message
            raise Conflict(f"MCP servers cannot be changed while {mcp_config.FILE_NAME} is invalid ({exc.message});"
                           f" fix the file (the API never overwrites it), then retry") from exc
        self.load_error = None
        return configs

    async def _recover(self) -> None:
        """Start-up: settle every mcp.json change a crash interrupted (from the journal), then empty it."""
        if self.store is None:
            return
        pending = await trio.to_thread.run_sync(self.files.pending)
        committed = await self.store.read(mcp_changes.committed_tokens)
        for change in pending:
            await trio.to_thread.run_sync(self.files.settle, change, change.token in committed)
        if pending or committed:
            # Before the rows go: every undo file's removal (here, or at run time after a COMMIT) durable,
            # so none can come back after a power loss without the row that says its change committed.
            await trio.to_thread.run_sync(self.files.fsync_dir)
        if committed:
            await self.store.write([("DELETE FROM mcp_commits", ())], action="empty the mcp.json journal")

    async def _commit(self, configs: dict[str, ServerConfig], action: str, claim: Any = None,
                      answer: Any = None) -> None:
        """Write ``configs`` to mcp.json with the journal row and ``claim``'s record (answer ``answer``) in
        one store write, and settle it. Returns once the change is final (committed) or raises (nothing
        changed). Called under ``_lock``."""
        assert self.store is not None, "MCP server changes need the runtime's store"
        change = self.files.change()
        request = self.store.submit(WriteRequest(
            fn=mcp_changes.writer_fn(self.files, change, configs, claim, answer, action), action=action))
        if claim is not None:
            claim.pending = request  # a retry waits (409 in progress) while this write may still commit
        # Shielded: from the submit on, the write commits or fails whatever the requester does, and the
        # file must be settled from its outcome before the lock is released and the processes follow.
        # Bounded by COMMIT_TIMEOUT for the writer (it only waits on SQLite and the file system), then one
        # read and one thread that moves at most three files.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(COMMIT_TIMEOUT):
                await request.done.wait()
            if not request.done.is_set():
                self._unknown = change  # settled before the next change, once the writer has taken it
                raise StorageError(f"Failed to {action}: the store did not commit within {COMMIT_TIMEOUT:g} s;"
                                   f" the change is settled before the next one")
            committed = await self.store.read(functools.partial(mcp_changes.is_committed, token=change.token))
            try:
                await trio.to_thread.run_sync(self.files.settle, change, committed)
            except OSError as exc:
                # Committed: the change stands, only its undo file is left. Not committed: the file may still
                # be the new one. Either way the next change (or the next start) settles it first.
                self._unknown = change
                log.error("mcp.json change %s not settled (%s); settled before the next change", change.token, exc)
                if not committed:
                    raise StorageError(f"Failed to {action}: could not restore {mcp_config.FILE_NAME} ({exc})") from exc
        assert request.result is not None
        request.result.unwrap()  # the write's own error (nothing changed)
        if not committed:  # cannot happen: a write that succeeded committed its journal row
            raise StorageError(f"Failed to {action}: the change did not commit")

    async def _settle_unknown(self) -> None:
        """A change whose write outlived its bound (or whose settle failed): wait for the writer to be past
        it (an empty write, queued after it), then settle it from the journal. The change that called this
        then makes the processes follow the file. Still stuck: StorageError, and it stays unknown."""
        change = self._unknown
        if change is None:
            return
        with trio.CancelScope(shield=True):  # as in _commit: bounded by COMMIT_TIMEOUT, then a settle
            with trio.move_on_after(COMMIT_TIMEOUT) as bound:
                await self.store.write(action="wait for an earlier mcp.json change")
            if bound.cancelled_caught:  # never settle while the earlier write may still commit
                raise StorageError(f"Failed to settle an earlier change of {mcp_config.FILE_NAME}: the store did"
                                   f" not commit within {COMMIT_TIMEOUT:g} s")
            committed = await self.store.read(functools.partial(mcp_changes.is_committed, token=change.token))
            try:
                await trio.to_thread.run_sync(self.files.settle, change, committed)
            except OSError as exc:
                raise StorageError(f"Failed to settle an earlier change of {mcp_config.FILE_NAME} ({exc})") from exc
        self._unknown = None

    def _follow(self, configs: dict[str, ServerConfig], restart: str | None = None) -> tuple[
            list[_Server], dict[str, _Server]]:
        """Make the running servers follow ``configs`` (the committed file): stop those not in it, (re)start
        those whose config differs (and ``restart``), keep the file's order. Synchronous: no checkpoint.
        Returns (the stopped starts, the new starts by name)."""
        stopped: list[_Server] = []
        started: dict[str, _Server] = {}
        for name in [n for n in self._servers if n not in configs]:
            old = self._stop(name)
            if old is not None:
                stopped.append(old)
        for name, cfg in configs.items():
            server = self._servers.get(name)
            if server is None or server.config != cfg or name == restart:
                old = self._stop(name)
                if old is not None:
                    stopped.append(old)
                started[name] = self._start(cfg)
        self._servers = {n: self._servers[n] for n in configs}
        return stopped, started

    async def _settle(self, server: _Server) -> dict[str, Any]:
        """Wait (cancellable; bounded by the startup timeout) until a started server is ready or failed."""
        with trio.move_on_after(server.config.startup_timeout + 1.0):
            await server.settled.wait()
        return server.view()

    async def _gone(self, servers: list[_Server]) -> None:
        with trio.move_on_after(STOP_WAIT_SECONDS):
            for server in servers:
                await server.done.wait()

    async def add(self, name: str, body: dict[str, Any], *, claim: Any = None) -> dict[str, Any]:
        """Add server ``name``. With ``claim`` (an Idempotency-Key), its record is written with the file
        change (answer: the new server ``starting``) and, once the server settled, replaced by the final
        answer; a crash or a cancellation in between leaves the first, a 201 all the same."""
        cfg = mcp_config.parse(name, body)
        async with self._lock:
            configs = await self._read_file()
            if name in configs:
                raise Conflict(f"MCP server '{name}' already exists; PATCH it or DELETE it first")
            configs[name] = cfg
            await self._commit(configs, f"add MCP server '{name}'", claim, _Server(cfg).view())
            stopped, started = self._follow(configs)
        await self._gone(stopped)
        view = await self._settle(started[name])
        if claim is not None and claim.encode(view) != claim.body:
            first = claim.body, claim.headers
            try:
                await self.store.write([claim.statement(view)], action=f"record the answer of adding MCP server"
                                                                       f" '{name}'")
            except StorageError:
                claim.body, claim.headers = first  # the stored (first) answer stays the answer
                log.warning("MCP server '%s' added; its final answer was not stored (a replay says starting)", name)
        return view

    async def update(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            configs = await self._read_file()
            if name not in configs:
                mcp_config.validate_name(name)
                raise NotFound(f"MCP server '{name}' not found")
            configs[name] = mcp_config.merge(configs[name], patch)
            await self._commit(configs, f"change MCP server '{name}'")
            stopped, started = self._follow(configs, restart=name)
        await self._gone(stopped)
        return await self._settle(started[name])

    async def delete(self, name: str) -> None:
        async with self._lock:
            configs = await self._read_file()
            if name not in configs:
                mcp_config.validate_name(name)
                raise NotFound(f"MCP server '{name}' not found")
            del configs[name]
            await self._commit(configs, f"delete MCP server '{name}'")
            stopped, _ = self._follow(configs)
        await self._gone(stopped)

    async def reconnect(self, name: str) -> dict[str, Any]:
        async with self._lock:
            current = self._get(name)
            if not current.config.enabled:
                raise Conflict(f"MCP server '{name}' is disabled; enable it (PATCH enabled: true) to connect it")
            order = list(self._servers)
            old = self._stop(name)
            server = self._start(current.config)
            self._servers = {n: self._servers[n] for n in order}
        await self._gone([old] if old is not None else [])
        return await self._settle(server)


class RuntimeTools:
    """The built-in tools (RuntimeConfig.tools, may be None) and the MCP servers' tools, behind the
    registry interface the engine uses (``get``, ``spec``, ``len``, ``call``). Built-in names win."""

    def __init__(self, builtins: Any, servers: McpServers) -> None:
        self.builtins = builtins
        self.servers = servers

    def get(self, name: str) -> Any:
        tool = self.builtins.get(name) if self.builtins is not None else None
        return tool if tool is not None else self.servers.tool(name)

    def spec(self) -> tuple[ToolSpec, ...]:
        builtin = tuple(self.builtins.spec()) if self.builtins is not None else ()
        taken = {spec.name for spec in builtin}
        return builtin + tuple(tool.spec for tool in self.servers.tools() if tool.name not in taken)

    def __len__(self) -> int:
        return (len(self.builtins) if self.builtins is not None else 0) + sum(1 for _ in self.servers.tools())

    async def call(self, name: str, arguments: Any, context: Any) -> ToolOutcome:
        if self.builtins is not None and self.builtins.get(name) is not None:
            return await self.builtins.call(name, arguments, context)
        tool = self.servers.tool(name)
        if tool is None:
            return ToolOutcome(f"Tool '{name}' is not available (its MCP server is not ready or no longer offers"
                               f" it)", is_error=True)
        error = jsonschema.exceptions.best_match(tool.validator.iter_errors(arguments))
        if error is not None:
            reason = error.message if len(error.message) <= 300 else error.message[:299] + "…"
            return ToolOutcome(f"Invalid input for tool '{name}': {error.json_path}: {reason}", is_error=True)
        return await self.servers.call(tool, arguments)

