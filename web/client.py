"""A small typed HTTP client for trio-runtime, sync (``Client``) and async (``AsyncClient``).

The examples and the end-to-end tests share it, so URL building, auth and error handling live in one
place. Every method is defined once in ``_Api``; the sync and async classes differ only in how they
send. Errors raise ``ApiError`` carrying the server's JSON error body.
"""

from __future__ import annotations

import json
import os
from urllib.parse import quote
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import httpx

DEFAULT_URL = "http://127.0.0.1:7878"
DEFAULT_TOKEN_FILE = Path(".trio-runtime") / "runtime.token"


class ApiError(Exception):
    """The server answered with an error status; ``body`` is its JSON error object when it sent one."""

    def __init__(self, status: int, code: str, message: str, body: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body


class ServerUnreachable(Exception):
    """No server answered at the URL (connection refused, DNS failure, timeout)."""


def default_url() -> str:
    return os.environ.get("TRIO_RUNTIME_URL") or DEFAULT_URL


def default_token(data_dir: Path | None = None) -> str | None:
    """``TRIO_RUNTIME_TOKEN``, else the token file the server wrote in its data dir."""
    token = os.environ.get("TRIO_RUNTIME_TOKEN")
    if token:
        return token
    data = data_dir or Path(os.environ.get("TRIO_RUNTIME_DATA_DIR") or DEFAULT_TOKEN_FILE.parent)
    try:
        return (data / DEFAULT_TOKEN_FILE.name).read_text().strip() or None
    except OSError:
        return None


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        err = body["error"]
        raise ApiError(err["status"], err["code"], err["message"], body)
    except (ValueError, KeyError, TypeError):
        raise ApiError(response.status_code, "http_error", response.text[:200]) from None


def _decode(response: httpx.Response) -> Any:
    _raise_for(response)
    if response.status_code == 204 or not response.content:
        return None
    return response.json()


def _raw(response: httpx.Response) -> bytes:
    _raise_for(response)
    return response.content


class SseParser:
    """Feed it lines of a ``text/event-stream``; it returns each event's JSON envelope when complete."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self.keepalives = 0

    def feed(self, line: str) -> dict[str, Any] | None:
        if line == "":
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return json.loads(data)
        if line.startswith(":"):
            self.keepalives += 1
        elif line.startswith("data:"):
            self._data.append(line[5:].lstrip(" "))
        return None


class _Api:
    """Every endpoint, once. ``_call`` returns a value (sync) or an awaitable (async)."""

    def _call(self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None,
              headers: dict[str, str] | None = None, transform: Callable[[Any], Any] | None = None,
              content: bytes | None = None, raw: bool = False) -> Any:
        """``content``: body bytes sent as they are (instead of ``json_body``); ``raw``: the answer's
        bytes (for ``transform``), not its JSON."""
        raise NotImplementedError

    # health
    def health(self):
        return self._call("GET", "/health")

    def info(self):
        return self._call("GET", "/v1/runtime/info")

    # threads. Every POST/PUT takes ``idempotency_key``: sent as the Idempotency-Key header, it makes a
    # retry of the same call safe (the server answers it with the first call's stored answer).
    def create_thread(self, *, idempotency_key: str | None = None, **fields: Any):
        """``fields``: the CreateThreadBody fields, ``id`` and ``approval_policy`` included."""
        return self._call("POST", "/v1/threads", json_body=fields, headers=_key(idempotency_key))

    def list_threads(self, *, limit: int | None = None, include_archived: bool = False, archived_only: bool = False):
        return self._call("GET", "/v1/threads", params=_params(limit=limit, include_archived=include_archived,
                                                               archived_only=archived_only))

    def get_thread(self, thread_id: str, *, include_rewound: bool = False, turns_limit: int | None = None,
                   before: str | None = None):
        """A page of the thread's turns (the latest by default); ``before=page["next_before"]`` pages back."""
        return self._call("GET", f"/v1/threads/{_q(thread_id)}",
                          params=_params(include_rewound=include_rewound, turns_limit=turns_limit, before=before))

    def update_thread(self, thread_id: str, **changes: Any):
        return self._call("PATCH", f"/v1/threads/{_q(thread_id)}", json_body=changes)

    # approvals (a tool call that needs a person's yes; API.md "Tools and approvals")
    def list_approvals(self, thread_id: str | None = None, status: str | None = None, *, limit: int | None = None):
        """The approvals of one thread, or of every thread when ``thread_id`` is None, oldest first; ``status``
        filters (pending, allowed, denied, expired, canceled). Returns the list, not the wrapper object."""
        path = f"/v1/threads/{_q(thread_id)}/approvals" if thread_id is not None else "/v1/approvals"
        return self._call("GET", path, params=_params(status=status, limit=limit),
                          transform=lambda body: body["approvals"])

    def decide_approval(self, thread_id: str, approval_id: str, decision: str, *, remember: bool = False,
                        message: str | None = None, idempotency_key: str | None = None):
        """``decision``: "allow" or "deny". ``remember`` (with allow) allows that tool for the rest of the
        thread; ``message`` (with deny) reaches the model as ``denied by user: <message>``."""
        body: dict[str, Any] = {"decision": decision, **_params(remember=remember, message=message)}
        return self._call("POST", f"/v1/threads/{_q(thread_id)}/approvals/{_q(approval_id)}", json_body=body,
                          headers=_key(idempotency_key))

    # turns
    def start_turn(self, thread_id: str, prompt: str, *, idempotency_key: str | None = None, **options: Any):
        return self._call("POST", f"/v1/threads/{_q(thread_id)}/turns", json_body={"prompt": prompt, **options},
                          headers=_key(idempotency_key))

    def steer(self, thread_id: str, turn_id: str, prompt: str, *, idempotency_key: str | None = None):
        return self._call("POST", f"/v1/threads/{_q(thread_id)}/turns/{_q(turn_id)}/steer", json_body={"prompt": prompt},
                          headers=_key(idempotency_key))

    def interrupt(self, thread_id: str, turn_id: str, *, idempotency_key: str | None = None):
        return self._call("POST", f"/v1/threads/{_q(thread_id)}/turns/{_q(turn_id)}/interrupt",
                          headers=_key(idempotency_key))

    def compact(self, thread_id: str, reason: str | None = None, *, idempotency_key: str | None = None):
        return self._call("POST", f"/v1/threads/{_q(thread_id)}/compact", json_body=_params(reason=reason),
                          headers=_key(idempotency_key))

    # history control: anchors are turn ids; ``if_busy`` is "reject" (the server's default) or "interrupt"
    def fork_thread(self, thread_id: str, *, through_turn_id: str | None = None, title: str | None = None,
                    id: str | None = None):
        return self._call("POST", f"/v1/threads/{_q(thread_id)}/fork",
                          json_body=_params(through_turn_id=through_turn_id, title=title, id=id))

    def rewind(self, thread_id: str, before_turn_id: str, *, if_busy: str | None = None):
        return self._call("POST", f"/v1/threads/{_q(thread_id)}/rewind",
                          json_body={"before_turn_id": before_turn_id, **_params(if_busy=if_busy)})

    def retry(self, thread_id: str, turn_id: str | None = None, *, model: str | None = None,
              mode: str | None = None, if_busy: str | None = None):
        return self._call("POST", f"/v1/threads/{_q(thread_id)}/retry",
                          json_body=_params(turn_id=turn_id, model=model, mode=mode, if_busy=if_busy))

    def restore(self, thread_id: str, session_id: str, *, if_busy: str | None = None, if_match: int | None = None):
        return self._call("POST", f"/v1/threads/{_q(thread_id)}/restore",
                          json_body={"session_id": session_id, **_params(if_busy=if_busy)},
                          headers=_if_match(if_match))

    def delete_thread(self, thread_id: str, *, if_busy: str | None = None):
        return self._call("DELETE", f"/v1/threads/{_q(thread_id)}", params=_params(if_busy=if_busy))

    # sessions
    def save_session(self, *, thread_id: str | None = None, session_id: str | None = None,
                     wait_for_idle: bool = False, if_match: int | None = None, idempotency_key: str | None = None):
        body = _params(thread_id=thread_id, session_id=session_id)
        if wait_for_idle:
            body["wait_for_idle"] = True
        return self._call("PUT", "/v1/sessions", json_body=body,
                          headers={**(_if_match(if_match) or {}), **(_key(idempotency_key) or {})} or None)

    def rebuild_session(self, thread_id: str, title: str | None = None, *, idempotency_key: str | None = None):
        return self._call("POST", "/v1/sessions", json_body=_params(thread_id=thread_id, title=title),
                          headers=_key(idempotency_key))

    def list_sessions(self, *, limit: int | None = None, search: str | None = None, include_archived: bool = False,
                      archived_only: bool = False, sort: str | None = None):
        return self._call("GET", "/v1/sessions", transform=lambda body: body["sessions"], params=_params(
            limit=limit, search=search, include_archived=include_archived, archived_only=archived_only, sort=sort))

    def get_session(self, session_id: str):
        return self._call("GET", f"/v1/sessions/{_q(session_id)}")

    def patch_session(self, session_id: str, *, title: str | None = None, archived: bool | None = None,
                      if_match: int | None = None):
        return self._call("PATCH", f"/v1/sessions/{_q(session_id)}", json_body=_params(title=title, archived=archived),
                          headers=_if_match(if_match))

    def delete_session(self, session_id: str):
        return self._call("DELETE", f"/v1/sessions/{_q(session_id)}")

    def resume_thread(self, session_id: str, *, idempotency_key: str | None = None, **options: Any):
        return self._call("POST", f"/v1/sessions/{_q(session_id)}/resume-thread", json_body=options,
                          headers=_key(idempotency_key))

    def export_session(self, session_id: str, format: str = "json"):
        """The session as its export gives it: ``json`` the stored document's bytes as they are,
        ``markdown`` the transcript as text."""
        return self._call("GET", f"/v1/sessions/{_q(session_id)}/export", params={"format": format}, raw=True,
                          transform=(lambda data: data.decode("utf-8")) if format == "markdown" else None)

    def import_session(self, document: dict[str, Any] | bytes, session_id: str | None = None):
        """Import a document (a dict, or the bytes of a ``json`` export, sent as they are) as a new
        session: ``{session_id, revision}``."""
        data = document if isinstance(document, bytes) else json.dumps(document, ensure_ascii=False).encode("utf-8")
        return self._call("POST", "/v1/sessions/import", params=_params(id=session_id), content=data,
                          headers={"Content-Type": "application/json"})


def _q(segment: str) -> str:
    """Quote an id as one path segment, so no id can reach another route ('../threads')."""
    return quote(segment, safe="")


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None and v is not False}


def _if_match(revision: int | None) -> dict[str, str] | None:
    return {"If-Match": f'"{revision}"'} if revision is not None else None


def _key(idempotency_key: str | None) -> dict[str, str] | None:
    return {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class Client(_Api):
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.token = token
        self._http = httpx.Client(base_url=self.url, headers=_headers(token), timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method, path, *, json_body=None, params=None, headers=None, transform=None, content=None,
              raw=False):
        try:
            response = self._http.request(method, path, json=json_body, params=params, headers=headers,
                                          content=content)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"Cannot reach trio-runtime at {self.url}: {exc}") from exc
        value = _raw(response) if raw else _decode(response)
        return transform(value) if transform else value

    def events(self, thread_id: str, since_seq: int = 0) -> Iterator[dict[str, Any]]:
        """Yield event envelopes (replay, then live) until the caller stops iterating."""
        parser = SseParser()
        try:
            with self._http.stream("GET", f"/v1/threads/{_q(thread_id)}/events", params={"since_seq": since_seq},
                                   timeout=httpx.Timeout(None, connect=10.0)) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"Lost the event stream from {self.url}: {exc}") from exc


class AsyncClient(_Api):
    """The same API for trio (or asyncio) code: every method returns an awaitable."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.token = token
        self._http = httpx.AsyncClient(base_url=self.url, headers=_headers(token), timeout=timeout)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method, path, *, json_body=None, params=None, headers=None, transform=None,
                    content=None, raw=False):
        try:
            response = await self._http.request(method, path, json=json_body, params=params, headers=headers,
                                                content=content)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"Cannot reach trio-runtime at {self.url}: {exc}") from exc
        value = _raw(response) if raw else _decode(response)
        return transform(value) if transform else value

    async def events(self, thread_id: str, since_seq: int = 0) -> AsyncIterator[dict[str, Any]]:
        parser = SseParser()
        try:
            async with self._http.stream("GET", f"/v1/threads/{_q(thread_id)}/events", params={"since_seq": since_seq},
                                         timeout=httpx.Timeout(None, connect=10.0)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for(response)
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"Lost the event stream from {self.url}: {exc}") from exc
