"""A model backend for any OpenAI-compatible chat completions server (llama.cpp server, vLLM, Ollama, OpenAI).

One turn is one or more streaming ``POST {base_url}/chat/completions`` requests (``stream: true``,
``stream_options.include_usage``), each sending the offered tools (``request.tools``, only when the
request has a ``run_tool``) and the whole conversation: the system prompt, the thread's
history converted to OpenAI messages (see ``openai_messages``), the new prompt, and what the turn added so
far. A request is *a round*; a turn takes another round when

- the model asked for tools: each call becomes a ToolCall event, is run by the engine through
  ``request.run_tool`` (approval, the recorded start and the run are the engine's), becomes a ToolResult
  event, and the results are sent back (at most ``max_tool_rounds`` such rounds, then the turn fails); or
- the client steered text into the turn: steers are read between rounds and once the answer is complete,
  sent as user messages, and answered in a further round.

Streaming: the body is parsed as server-sent events as the bytes arrive; each ``content`` delta becomes a
TextDelta at once, ``reasoning_content`` (or ``reasoning``, as some servers name it) a ReasoningDelta, with
an ItemBreak wherever the stream switches between the two.

Unicode: ``json.loads`` accepts a lone surrogate escape (``"\\ud83d"``), and a server may send an emoji's
two UTF-16 halves in two chunks. Deltas are yielded as decoded (the engine's ``ValidText`` joins the halves
or replaces a lone one with U+FFFD); what this backend keeps itself (the round's text, tool call names
and arguments, tool results) is repaired once whole, before it is sent back to the server.

Length: with ``max_tokens`` set, every round asks the server to stop after that many tokens (its
``finish_reason`` is then ``length``); unset, the server's own limit applies, which for llama.cpp is the
context window. Either way a ``length`` finish is announced with a Truncated event and the turn completes
with the text so far.

Usage: the server's own counts from its final usage chunk, summed over the turn's rounds. A server that
sends no usage (older llama.cpp builds, some proxies) gets an estimate for that round instead: one token
per ``ESTIMATE_CHARS_PER_TOKEN`` (4) characters, rounded up, of the text sent (message contents and tool
call arguments) and of the text received (reply, reasoning and tool call arguments). A Usage event with
the running total follows every round, so a turn that fails later still records what it used.

Failures all end as ModelError, whose message names the server and what to do about it: connection
refused, DNS failure, connect timeout, 401/403 (API key), 404 (model or base URL), other 4xx, malformed
chunks, a stream error object, a stall (no byte for ``read_timeout`` seconds), and a stream that ends
mid-answer (the text streamed so far stays with the engine). HTTP 429 and 5xx are retried with capped
exponential backoff (honouring a shorter-than-the-cap ``Retry-After``), but only while the request has
produced no output; each retry is announced with a Retrying event whose ``attempt`` counts the turn's
retries so far.

Cancellation (an interrupt): nothing here catches ``trio.Cancelled``. The request is not drained: leaving
the ``client.stream`` block closes the response, which closes its connection (httpcore closes the socket
under a short shield), so the server sees the disconnect at once. A tool call waiting in ``run_tool`` at
that moment (for its approval, or running) is cancelled with it; what that leaves is the engine's to say.

The API key is only ever put in the ``Authorization`` header. It is not logged, not in ``repr``, and it
is scrubbed from any error text a server echoes back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import socket
import uuid
from typing import Any, AsyncIterator, Callable, Iterable

import httpx
import trio

from ..text import valid_text, valid_value
from ..transcript import result_text
from .base import (
    ItemBreak, ModelError, ModelEvent, ModelRequest, ReasoningDelta, Retrying, TextDelta, ToolCall, ToolOutcome,
    ToolResult, ToolSpec, Truncated, Usage,
)

log = logging.getLogger(__name__)

# Seconds without a single byte from the server before a stream counts as stalled (the default).
DEFAULT_READ_TIMEOUT = 60.0
# Seconds to open the TCP (and TLS) connection.
DEFAULT_CONNECT_TIMEOUT = 10.0
# Retries of a 429/5xx answer before the turn fails; with the backoff below they wait 0.5+1+2+4 = 7.5 s.
DEFAULT_MAX_RETRIES = 4
DEFAULT_BACKOFF_BASE = 0.5
# No single wait between retries is longer than this, whatever Retry-After asks for.
DEFAULT_BACKOFF_MAX = 8.0
# Tool rounds one turn may take before the model must answer in text; guards against a model looping on tools.
DEFAULT_MAX_TOOL_ROUNDS = 8
# The usage estimate's ratio: OpenAI's rule of thumb of about 4 characters per token of English text.
ESTIMATE_CHARS_PER_TOKEN = 4
# One server-sent event may not be longer than this; a longer one is a broken or hostile server.
MAX_EVENT_BYTES = 1024 * 1024
# How much of an error response's body is read for its message.
ERROR_BODY_BYTES = 4096
# Error text quoted from a server is cut to this many characters.
ERROR_DETAIL_CHARS = 300

INTERRUPTED_TOOL_RESULT = "No result: the tool call was interrupted before it finished."


# ---- conversation -> OpenAI messages ---------------------------------------------------------------


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content or () if isinstance(b, dict)]


def openai_messages(system_prompt: str | None, history: Iterable[dict[str, Any]],
                    prompt: str | None = None) -> list[dict[str, Any]]:
    """Our messages (API.md's content blocks) as OpenAI chat messages.

    user text → a user message; assistant text and tool_use → one assistant message with ``tool_calls``;
    tool_result → a ``tool`` message right after the call it answers; thinking blocks are dropped (they
    were the model's own scratch work). OpenAI-style servers reject a tool call left without an answer,
    so a call that was interrupted before its result gets a short "no result" answer, and a result
    whose call is not in the history (e.g. after a compaction) is sent as user text."""
    out: list[dict[str, Any]] = []
    if system_prompt:
        out.append({"role": "system", "content": system_prompt})
    pending: list[str] = []  # tool call ids of the last assistant message still awaiting a result

    def close_pending() -> None:
        for call_id in pending:
            out.append({"role": "tool", "tool_call_id": call_id, "content": INTERRUPTED_TOOL_RESULT})
        pending.clear()

    for message in history:
        role = message.get("role")
        blocks = _blocks(message)
        if role == "assistant":
            close_pending()
            texts = [b.get("text", "") for b in blocks if b.get("type") == "text" and b.get("text")]
            calls = [b for b in blocks if b.get("type") == "tool_use"]
            if not texts and not calls:
                continue
            entry: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts) if texts else None}
            if calls:
                entry["tool_calls"] = [
                    {"id": str(c.get("id")), "type": "function",
                     "function": {"name": str(c.get("name", "")), "arguments": json.dumps(c.get("input") or {})}}
                    for c in calls
                ]
                pending.extend(str(c.get("id")) for c in calls)
            out.append(entry)
        elif role == "user":
            texts = []
            for block in blocks:
                kind = block.get("type")
                if kind == "text" and block.get("text"):
                    texts.append(block["text"])
                elif kind == "tool_result":
                    use_id = str(block.get("tool_use_id"))
                    content = result_text(block.get("content"))
                    if use_id in pending:
                        pending.remove(use_id)
                        out.append({"role": "tool", "tool_call_id": use_id, "content": content})
                    else:
                        texts.append(f"[Result of tool call {use_id}]\n{content}")
            close_pending()
            if texts:
                out.append({"role": "user", "content": "\n\n".join(texts)})
        # other roles (none in our sessions) are not sent
    close_pending()
    if prompt is not None:
        out.append({"role": "user", "content": prompt})
    return out


def openai_tools(tools: Iterable[ToolSpec]) -> list[dict[str, Any]]:
    """The ``tools`` field of a chat completion request."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
            for t in tools]


def _message_chars(messages: Iterable[dict[str, Any]]) -> int:
    total = 0
    for message in messages:
        total += len(message.get("content") or "")
        for call in message.get("tool_calls") or ():
            total += len(call["function"]["name"]) + len(call["function"]["arguments"])
    return total


def estimate_tokens(chars: int) -> int:
    """The documented fallback: one token per ESTIMATE_CHARS_PER_TOKEN characters, rounded up."""
    return math.ceil(chars / ESTIMATE_CHARS_PER_TOKEN)


# ---- one round's state -----------------------------------------------------------------------------


@dataclasses.dataclass
class _PendingCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclasses.dataclass
class _Round:
    """What one request produced so far."""

    text: list[str] = dataclasses.field(default_factory=list)
    calls: dict[int, _PendingCall] = dataclasses.field(default_factory=dict)
    usage: Usage | None = None
    finish_reason: str | None = None
    output_chars: int = 0

    @property
    def started(self) -> bool:
        """Whether any output arrived: from then on a failure is final (no retry)."""
        return self.output_chars > 0 or bool(self.calls)


@dataclasses.dataclass
class _TurnState:
    retries: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    # What the last streamed delta was ("text" or "reasoning"), to put an ItemBreak between the two.
    last_kind: str | None = None


class _Malformed(Exception):
    """A chunk that is not what the OpenAI streaming format promises."""


# ---- the backend -----------------------------------------------------------------------------------


class OpenAICompatModel:
    """Streams chat completions from an OpenAI-compatible server (see the module docstring).

    ``http_client`` is a seam for tests: a factory for the ``httpx.AsyncClient`` a turn uses (e.g. one
    with an ``httpx.MockTransport``); the timeouts are passed per request, so it needs none of its own.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model_name: str,
        api_key: str | None = None,
        *,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS,
        max_tokens: int | None = None,
        http_client: Callable[[], httpx.AsyncClient] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self._api_key = api_key or None
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_tool_rounds = max_tool_rounds
        self.max_tokens = max_tokens
        self._http_client = http_client or httpx.AsyncClient

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAICompatModel(base_url={self.base_url!r}, model_name={self.model_name!r})"

    @property
    def has_api_key(self) -> bool:
        return self._api_key is not None

    # ---- public ------------------------------------------------------------------------------

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        """The turn's events (see the module docstring). Raises ModelError and nothing else on a model
        failure; cancellation propagates and closes the HTTP stream on its way out."""
        messages = openai_messages(request.system_prompt, request.history, request.prompt)
        tools = openai_tools(request.offered_tools)
        turn = _TurnState()
        tool_rounds = 0
        async with self._http_client() as client:
            while True:
                rnd = _Round()
                input_chars = _message_chars(messages)
                async with contextlib.aclosing(self._exchange(client, messages, tools, rnd, turn)) as events:
                    async for event in events:
                        yield event
                if rnd.finish_reason == "length":
                    yield Truncated()
                turn.input_tokens += rnd.usage.input_tokens if rnd.usage else estimate_tokens(input_chars)
                turn.output_tokens += rnd.usage.output_tokens if rnd.usage else estimate_tokens(rnd.output_chars)
                yield Usage(turn.input_tokens, turn.output_tokens)
                # Joined before repair: a pair split across two chunks is one character again.
                text = valid_text("".join(rnd.text))
                if rnd.calls:
                    tool_rounds += 1
                    if tool_rounds > self.max_tool_rounds:
                        raise ModelError(
                            f"The model kept calling tools for {self.max_tool_rounds} rounds without answering;"
                            " the turn was stopped (limit: max_tool_rounds)")
                    async with contextlib.aclosing(self._run_tools(request, rnd, text, messages)) as events:
                        async for event in events:
                            yield event
                    turn.last_kind = None
                    messages.extend(self._steers(request))
                    continue
                steers = self._steers(request)
                if not steers:
                    return
                if text:
                    messages.append({"role": "assistant", "content": text})
                messages.extend(steers)
                turn.last_kind = None
                yield ItemBreak()

    # ---- rounds ------------------------------------------------------------------------------

    @staticmethod
    def _steers(request: ModelRequest) -> list[dict[str, Any]]:
        steers = []
        while True:
            try:
                steers.append({"role": "user", "content": request.steers.receive_nowait()})
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return steers

    def _body(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.max_tokens is not None:
            # ``max_tokens`` rather than OpenAI's newer ``max_completion_tokens``: it is the one every local
            # server (llama.cpp, vLLM, Ollama) reads, and OpenAI still accepts it for chat models.
            body["max_tokens"] = self.max_tokens
        if tools:
            body["tools"] = tools
        return body

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.read_timeout, connect=self.connect_timeout, pool=self.connect_timeout)

    async def _exchange(self, client: httpx.AsyncClient, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                        rnd: _Round, turn: _TurnState) -> AsyncIterator[ModelEvent]:
        """One round: POST, retrying 429/5xx while nothing streamed, then stream the answer into ``rnd``."""
        url = f"{self.base_url}/chat/completions"
        body = self._body(messages, tools)
        request_retries = 0
        while True:
            log.debug("POST %s (model %s, %d messages)", url, self.model_name, len(messages))
            try:
                async with client.stream("POST", url, json=body, headers=self._headers(),
                                         timeout=self._timeout()) as response:
                    if response.status_code == 200:
                        async with contextlib.aclosing(self._read_answer(response, rnd, turn)) as events:
                            async for event in events:
                                yield event
                        return
                    status = response.status_code
                    detail = await self._error_detail(response)
                    retry_after = _retry_after(response.headers.get("retry-after"))
            except httpx.HTTPError as exc:
                raise self._transport_failure(exc, rnd) from exc
            except httpx.InvalidURL as exc:
                raise ModelError(f"The model server URL {url!r} is not valid: {exc}") from exc
            except httpx.StreamError as exc:  # only a bug of ours could cause it; still a clear turn failure
                raise ModelError(f"Reading the answer from the model server at {self.base_url} failed: {exc}") from exc
            retryable = status == 429 or status >= 500
            if not retryable or request_retries >= self.max_retries:
                raise ModelError(self._status_message(status, detail, request_retries))
            request_retries += 1
            turn.retries += 1
            delay = min(self.backoff_max, self.backoff_base * 2 ** (request_retries - 1))
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.backoff_max))
            reason = f"HTTP {status}" + (f": {detail}" if detail else "")
            log.warning("model server at %s answered %s; retry %d of %d in %.2f s",
                        self.base_url, reason, request_retries, self.max_retries, delay)
            yield Retrying(turn.retries, reason)
            await trio.sleep(delay)

    async def _read_answer(self, response: httpx.Response, rnd: _Round,
                           turn: _TurnState) -> AsyncIterator[ModelEvent]:
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            # The server ignored ``stream: true`` and sent the whole completion at once.
            raw = await response.aread()
            for event in self._chunk_events(self._parse_json(raw), rnd, turn, whole=True):
                yield event
            return
        if content_type not in ("", "text/event-stream"):
            raise ModelError(
                f"The model server at {self.base_url} answered with Content-Type {content_type!r} instead of an"
                " event stream; check the base URL (it usually ends in /v1)")
        async with contextlib.aclosing(_sse_data(response, f"The model server at {self.base_url}")) as datas:
            async for data in datas:
                if data.strip() == b"[DONE]":
                    return  # the end; not waiting for the server to close the body
                for event in self._chunk_events(self._parse_json(data), rnd, turn, whole=False):
                    yield event
        if rnd.finish_reason is None:
            raise ModelError(self._cut_off_message(rnd, "ended the stream"))

    def _parse_json(self, data: bytes | str) -> Any:
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ModelError(f"The model server at {self.base_url} sent a malformed stream chunk"
                             f" (not JSON): {self._snippet(data)}") from exc

    def _chunk_events(self, chunk: Any, rnd: _Round, turn: _TurnState, *, whole: bool) -> list[ModelEvent]:
        try:
            return list(self._chunk_events_unchecked(chunk, rnd, turn, whole))
        except _Malformed as exc:
            raise ModelError(f"The model server at {self.base_url} sent a malformed stream chunk ({exc}):"
                             f" {self._snippet(json.dumps(chunk))}") from exc

    def _chunk_events_unchecked(self, chunk: Any, rnd: _Round, turn: _TurnState,
                                whole: bool) -> Iterable[ModelEvent]:
        if not isinstance(chunk, dict):
            raise _Malformed("expected a JSON object")
        if chunk.get("error") is not None:
            raise ModelError(f"The model server at {self.base_url} reported an error"
                             f"{' mid-answer' if rnd.started else ''}: {self._scrub(error_text(chunk))}")
        usage = chunk.get("usage")
        if usage is not None:
            rnd.usage = _parse_usage(usage)
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise _Malformed("'choices' is not a list")
        for choice in choices:
            if not isinstance(choice, dict):
                raise _Malformed("a choice is not an object")
            if choice.get("index", 0) != 0:
                continue  # we ask for one completion; ignore extra ones a server might send
            delta = choice.get("message" if whole else "delta") or {}
            if not isinstance(delta, dict):
                raise _Malformed("'delta' is not an object")
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                if not isinstance(reasoning, str):
                    raise _Malformed("reasoning is not a string")
                if turn.last_kind == "text":
                    yield ItemBreak()
                turn.last_kind = "reasoning"
                rnd.output_chars += len(reasoning)
                yield ReasoningDelta(reasoning)
            content = delta.get("content")
            if content:
                if not isinstance(content, str):
                    raise _Malformed("'content' is not a string")
                if turn.last_kind == "reasoning":
                    yield ItemBreak()
                turn.last_kind = "text"
                rnd.output_chars += len(content)
                rnd.text.append(content)
                yield TextDelta(content)
            tool_calls = delta.get("tool_calls")
            if tool_calls:
                if not isinstance(tool_calls, list):
                    raise _Malformed("'tool_calls' is not a list")
                for position, part in enumerate(tool_calls):
                    self._add_call_part(rnd, position, part)
            finish = choice.get("finish_reason")
            if finish is not None:
                rnd.finish_reason = str(finish)

    @staticmethod
    def _add_call_part(rnd: _Round, position: int, part: Any) -> None:
        """Tool calls stream in pieces keyed by ``index``: the id and name first, the arguments in fragments."""
        if not isinstance(part, dict):
            raise _Malformed("a tool call is not an object")
        index = part.get("index", position)
        if not isinstance(index, int):
            raise _Malformed("a tool call's 'index' is not an integer")
        call = rnd.calls.setdefault(index, _PendingCall())
        if part.get("id"):
            call.id = str(part["id"])
        function = part.get("function") or {}
        if not isinstance(function, dict):
            raise _Malformed("a tool call's 'function' is not an object")
        if function.get("name") and not call.name:
            call.name = str(function["name"])
        arguments = function.get("arguments")
        if arguments:
            # Some servers send the arguments as an object instead of a JSON string.
            fragment = arguments if isinstance(arguments, str) else json.dumps(arguments)
            call.arguments += fragment
            rnd.output_chars += len(fragment)

    async def _run_tools(self, request: ModelRequest, rnd: _Round, text: str,
                         messages: list[dict[str, Any]]) -> AsyncIterator[ModelEvent]:
        """Announce each tool call of the round, have the engine run it (``request.run_tool``), and answer
        it, in the order the model made them. Arguments that are not a JSON object never reach the engine:
        the model gets an error result saying so."""
        calls = [rnd.calls[i] for i in sorted(rnd.calls)]
        for call in calls:
            if not call.id:  # some servers omit ids; the transcript needs one to pair call and result
                call.id = f"call_{uuid.uuid4().hex[:16]}"
            # Streamed in fragments like the text: repaired once whole (see runtime.text).
            call.id, call.name = valid_text(call.id), valid_text(call.name)
            call.arguments = valid_text(call.arguments)
        messages.append({
            "role": "assistant", "content": text or None,
            "tool_calls": [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments
                                                                          or "{}"}} for c in calls],
        })
        for call in calls:
            arguments, problem = _parse_arguments(call.arguments)
            arguments = valid_value(arguments)  # the JSON may itself escape a lone surrogate
            tool_call = ToolCall(call.id, call.name, arguments)
            yield tool_call
            if problem is None and request.run_tool is None:
                problem = "no tools are offered to the model"
            if problem is not None:
                outcome = ToolOutcome(f"Tool '{call.name}' was not run: {problem}", is_error=True)
            else:
                outcome = await request.run_tool(tool_call)
            yield ToolResult(call.id, outcome.content, outcome.is_error)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": outcome.content})

    # ---- errors ------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """Remove the API key from text a server sent back (some echo the key they rejected)."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _snippet(self, data: bytes | str) -> str:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        text = " ".join(self._scrub(text).split())
        return text if len(text) <= ERROR_DETAIL_CHARS else text[: ERROR_DETAIL_CHARS - 1] + "…"

    async def _error_detail(self, response: httpx.Response) -> str:
        """The message of an error response, read from at most ERROR_BODY_BYTES of its body."""
        raw = b""
        async with contextlib.aclosing(response.aiter_bytes()) as pieces:
            async for piece in pieces:
                raw += piece
                if len(raw) >= ERROR_BODY_BYTES:
                    break
        try:
            text = error_text(json.loads(raw))
        except ValueError:
            text = raw.decode("utf-8", "replace")
        return self._snippet(text)

    def _status_message(self, status: int, detail: str, retries: int) -> str:
        where = f"The model server at {self.base_url}"
        quoted = f": {detail}" if detail else ""
        if status in (401, 403):
            hint = ("check the API key" if self._api_key
                    else "it needs an API key and none is set")
            return f"{where} refused the request (HTTP {status}, bad or missing API key){quoted}; {hint}"
        if status == 404:
            return (f"{where} answered HTTP 404 for model '{self.model_name}'{quoted}; the model is not served"
                    " there, or the base URL is wrong (OpenAI-compatible servers usually serve under /v1)")
        tries = f" after {retries} {'retry' if retries == 1 else 'retries'}" if retries else ""
        if status == 429:
            return f"{where} is rate limiting requests (HTTP 429){tries}{quoted}"
        if status >= 500:
            return f"{where} failed with HTTP {status}{tries}{quoted}"
        return f"{where} rejected the request (HTTP {status}){quoted}"

    def _cut_off_message(self, rnd: _Round, what: str) -> str:
        if rnd.started:
            return f"The model server at {self.base_url} {what} mid-answer; the text so far is kept"
        return f"The model server at {self.base_url} {what} before answering"

    def _transport_failure(self, exc: httpx.HTTPError, rnd: _Round) -> ModelError:
        where = f"the model server at {self.base_url}"
        connect_problem = describe_connect_error(exc, self.base_url, self.connect_timeout)
        if connect_problem is not None:
            return ModelError(connect_problem)
        if isinstance(exc, httpx.ReadTimeout):
            if rnd.started:
                return ModelError(f"The model stream from {where} stalled: nothing arrived for"
                                  f" {self.read_timeout:g} s (read timeout); the text so far is kept")
            return ModelError(f"The model server at {self.base_url} did not answer within {self.read_timeout:g} s"
                              " (read timeout)")
        if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
            return ModelError(self._cut_off_message(rnd, "closed the connection") + f" ({self._scrub(str(exc))})")
        if isinstance(exc, httpx.UnsupportedProtocol):
            return ModelError(f"The model server URL {self.base_url!r} is not usable: {exc}")
        return ModelError(f"The request to {where} failed: {type(exc).__name__}: {self._scrub(str(exc))}")


# ---- helpers -------------------------------------------------------------------------------------


def describe_connect_error(exc: httpx.HTTPError, base_url: str, connect_timeout: float) -> str | None:
    """A sentence saying why no connection to ``base_url`` could be made, or None when ``exc`` is not a
    connection failure. Shared with ``trio-runtime doctor``."""
    where = f"the model server at {base_url}"
    if isinstance(exc, httpx.ConnectTimeout):
        return f"Timed out connecting to {where} after {connect_timeout:g} s"
    if not isinstance(exc, httpx.ConnectError):
        return None
    causes = _os_errors(exc)
    dns = next((c for c in causes if isinstance(c, socket.gaierror)), None)
    if dns is not None:
        host = httpx.URL(base_url).host
        return (f"Cannot connect to {where}: the host name '{host}' could not be resolved"
                f" (DNS failure: {dns.strerror or dns})")
    if any(c.errno == errno.ECONNREFUSED for c in causes):
        return f"Cannot connect to {where}: connection refused (is the server running?)"
    return f"Cannot connect to {where}: {exc or type(exc).__name__}"


async def _sse_data(response: httpx.Response, where: str) -> AsyncIterator[bytes]:
    """The ``data`` of each server-sent event, as soon as its closing blank line arrives.

    Lines end in LF or CRLF; comments (``: keepalive``) and other fields are skipped; several ``data``
    lines of one event are joined with LF, as the SSE spec says. (``aiter_bytes`` is called without a
    chunk size on purpose: with one, httpx holds bytes back until a whole chunk arrived.)"""
    buffer = b""
    data: list[bytes] = []
    size = 0
    async with contextlib.aclosing(response.aiter_bytes()) as pieces:
        async for piece in pieces:
            buffer += piece
            while True:
                newline = buffer.find(b"\n")
                if newline < 0:
                    break
                line, buffer = buffer[:newline].rstrip(b"\r"), buffer[newline + 1:]
                if not line:
                    if data:
                        yield b"\n".join(data)
                        data, size = [], 0
                    continue
                if line.startswith(b"data:"):
                    value = line[5:]
                    data.append(value[1:] if value.startswith(b" ") else value)
                    size += len(value)
            if size + len(buffer) > MAX_EVENT_BYTES:
                raise ModelError(f"{where} sent a stream event longer than {MAX_EVENT_BYTES} bytes")
    if data:  # a final event without its blank line
        yield b"\n".join(data)


def _parse_usage(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        raise _Malformed("'usage' is not an object")
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        raise _Malformed("'usage' lacks integer prompt_tokens/completion_tokens")
    return Usage(prompt, completion)


def _parse_arguments(raw: str) -> tuple[dict[str, Any], str | None]:
    """The model's tool arguments as a dict, and why they are unusable (None when they are fine)."""
    if not raw.strip():
        return {}, None
    try:
        value = json.loads(raw)
    except ValueError:
        return {"_raw": raw}, "its arguments were not valid JSON"
    if not isinstance(value, dict):
        return {"_value": value}, "its arguments were not a JSON object"
    return value, None


def error_text(body: Any) -> str:
    """The human part of an error body, in the shapes servers use: OpenAI/vLLM/llama.cpp
    ``{"error": {"message"}}``, Ollama ``{"error": "..."}``, FastAPI ``{"detail": ...}``."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("message") or error)
        if error is not None:
            return str(error)
        for key in ("detail", "message"):
            if body.get(key) is not None:
                return str(body[key])
    return json.dumps(body)


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored; the backoff applies instead)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 and math.isfinite(seconds) else None


def _os_errors(exc: BaseException) -> list[OSError]:
    """Every OSError under httpx's exception: down the ``__cause__``/``__context__`` chain and into
    exception groups (trio's ``open_tcp_stream`` reports one error per address it tried in a group)."""
    found: list[OSError] = []
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            found.append(current)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)
    return found
