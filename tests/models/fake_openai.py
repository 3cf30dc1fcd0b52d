"""A fake OpenAI-compatible server for the tests, on a real loopback socket (raw trio + HTTP/1.1).

Each ``POST /v1/chat/completions`` takes the next queued Reply; a Reply is an HTTP status and a list of
steps the server performs in order while streaming a chunked ``text/event-stream`` body:

- a dict: one chunk, sent as ``data: <json>`` and a blank line;
- ``Raw(b"...")``: bytes sent as they are (malformed chunks, keepalive comments);
- ``Wait(event)``: send nothing until the test sets ``event``;
- ``Stall()``: send nothing more, ever; the server only watches for the client to go away;
- ``Close()``: drop the connection mid-body (no terminating chunk), as a crashing server does.

Every request is recorded (path, lower-cased headers, JSON body). ``disconnected`` is set when a client
goes away while the server still streams to it (the interrupt tests wait on it). ``GET /v1/models``
lists ``models`` unless ``models_reply`` overrides it. Every response says ``Connection: close``: one
request per connection keeps the disconnect bookkeeping exact.
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from functools import partial
from typing import Any

import trio

# A request head longer than this is a bug in the test, not something to serve.
MAX_HEAD = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Raw:
    data: bytes


@dataclasses.dataclass(frozen=True)
class Wait:
    event: trio.Event


@dataclasses.dataclass(frozen=True)
class Stall:
    pass


@dataclasses.dataclass(frozen=True)
class Close:
    pass


@dataclasses.dataclass
class Reply:
    status: int = 200
    steps: list[Any] = dataclasses.field(default_factory=list)
    # For a non-streamed answer (errors, /models, a server that ignores stream: true): the JSON body.
    body: Any = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    done: bool = True  # end a stream with ``data: [DONE]``
    content_type: str | None = None


@dataclasses.dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body["messages"]


# ---- reply builders ------------------------------------------------------------------------------


def chunk(content: str | None = None, *, reasoning: str | None = None, tool_calls: list[dict] | None = None,
          finish: str | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "fake-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def usage_chunk(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "fake-model", "choices": [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def text_reply(*pieces: str, usage: tuple[int, int] | None = (10, 3), reasoning: tuple[str, ...] = ()) -> Reply:
    """Streams ``reasoning`` pieces, then ``pieces`` as content deltas, a stop chunk, the usage chunk."""
    steps: list[Any] = [{"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "fake-model",
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None}]}]
    steps += [chunk(reasoning=r) for r in reasoning]
    steps += [chunk(p) for p in pieces]
    steps.append(chunk(finish="stop"))
    if usage is not None:
        steps.append(usage_chunk(*usage))
    return Reply(steps=steps)


def tool_reply(call_id: str, name: str, argument_parts: list[str], *, usage: tuple[int, int] | None = (20, 5),
               text: str | None = None) -> Reply:
    """A tool call streamed the way OpenAI does: id and name first, then the arguments in fragments."""
    steps: list[Any] = []
    if text:
        steps.append(chunk(text))
    steps.append(chunk(tool_calls=[{"index": 0, "id": call_id, "type": "function",
                                    "function": {"name": name, "arguments": ""}}]))
    steps += [chunk(tool_calls=[{"index": 0, "function": {"arguments": part}}]) for part in argument_parts]
    steps.append(chunk(finish="tool_calls"))
    if usage is not None:
        steps.append(usage_chunk(*usage))
    return Reply(steps=steps)


def error_reply(status: int, message: str, *, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status=status, body={"error": {"message": message, "type": "invalid_request_error"}},
                 headers=headers or {})


# ---- the server ----------------------------------------------------------------------------------

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


class FakeOpenAI:
    def __init__(self, models: tuple[str, ...] = ("fake-model",)) -> None:
        self.replies: deque[Reply] = deque()
        self.requests: list[Recorded] = []
        self.models = list(models)
        self.models_reply: Reply | None = None
        self.disconnected = trio.Event()
        self.port = 0
        self._arrived = trio.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def chat_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def queue(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def wait_for_chat_requests(self, count: int) -> None:
        """Return once ``count`` chat requests arrived (the caller bounds the wait)."""
        while len(self.chat_requests) < count:
            await self._arrived.wait()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()

    # ---- one connection ------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                request = await self._read_request(stream)
                if request is None:
                    return
                self.requests.append(request)
                self._arrived.set()
                self._arrived = trio.Event()
                await self._respond(stream, request)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.disconnected.set()

    async def _read_request(self, stream: trio.SocketStream) -> Recorded | None:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = await stream.receive_some()
            if not piece or len(data) > MAX_HEAD:
                return None
            data += piece
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            piece = await stream.receive_some()
            if not piece:
                return None
            rest += piece
        body = json.loads(rest) if rest else None
        return Recorded(method, path, headers, body)

    async def _respond(self, stream: trio.SocketStream, request: Recorded) -> None:
        if request.path == "/v1/models" and request.method == "GET":
            reply = self.models_reply or Reply(body={"object": "list", "data": [
                {"id": m, "object": "model", "owned_by": "fake"} for m in self.models]})
        elif request.path == "/v1/chat/completions" and request.method == "POST":
            reply = self.replies.popleft() if self.replies else error_reply(500, "fake server: no reply queued")
        else:
            reply = error_reply(404, f"fake server: no route {request.method} {request.path}")
        if reply.status != 200 or reply.body is not None:
            await self._send_whole(stream, reply)
        else:
            await self._send_stream(stream, reply)

    @staticmethod
    def _head(status: int, headers: dict[str, str]) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def _send_whole(self, stream: trio.SocketStream, reply: Reply) -> None:
        payload = json.dumps(reply.body).encode() if not isinstance(reply.body, bytes) else reply.body
        headers = {"Content-Type": reply.content_type or "application/json", "Content-Length": str(len(payload)),
                   **reply.headers}
        await stream.send_all(self._head(reply.status, headers) + payload)

    async def _send_stream(self, stream: trio.SocketStream, reply: Reply) -> None:
        headers = {"Content-Type": reply.content_type or "text/event-stream", "Transfer-Encoding": "chunked",
                   "Cache-Control": "no-cache", **reply.headers}
        await stream.send_all(self._head(reply.status, headers))

        async def send(data: bytes) -> None:
            await stream.send_all(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        for step in reply.steps:
            if isinstance(step, dict):
                await send(b"data: " + json.dumps(step).encode() + b"\n\n")
            elif isinstance(step, Raw):
                await send(step.data)
            elif isinstance(step, Wait):
                await step.event.wait()
            elif isinstance(step, Stall):
                await self._until_client_leaves(stream)
                return
            elif isinstance(step, Close):
                return  # ``async with stream`` closes the socket without the terminating chunk
            else:
                raise TypeError(f"unknown step {step!r}")
        if reply.done:
            await send(b"data: [DONE]\n\n")
        await stream.send_all(b"0\r\n\r\n")

    async def _until_client_leaves(self, stream: trio.SocketStream) -> None:
        """A stalled server: it sends nothing, and notices when the client closes the connection."""
        while await stream.receive_some():
            pass
        self.disconnected.set()
