"""Forwarding a request to the host that owns its thread (several hosts on one PostgreSQL, issue 15).

A runtime call that needs a thread's engine raises ``NotOwner(owner, advertise_url)`` before any change when
another live host holds the thread's lease. The error map (web/errors.py) hands it here: the original
request (method, path, query, body, every end-to-end header: the token, Idempotency-Key, content type) is
sent to the owner's advertise URL with ``X-Trio-Runtime-Forwarded-By: <this host>``, and the owner's answer
is returned as it is. Rules:

- Loop guard: a request that already carries that header is never forwarded again (503 ``not_owner``,
  naming the owner): two hosts that disagree about the owner for a moment cannot bounce a request.
- Bounded: connecting takes at most CONNECT_TIMEOUT; the answer at most the request timeout plus
  ANSWER_MARGIN (the owner bounds its own engine waits by the same request timeout).
- Owner unreachable (the connection was refused or timed out: the request never reached it, so it did
  nothing): wait, at most the lease ttl + TAKEOVER_MARGIN, for its lease to expire by the database clock,
  take the thread over (epoch bump, recovery) and serve the request here. Otherwise 503.
- A read timeout or a broken answer after the request was sent: the owner may have done it, so it is not
  retried (504 / 502); the client retries with its Idempotency-Key.
- The client going away cancels the forward: httpcore closes that connection (nothing leaks).
- Event streams are never forwarded (they are read from the database on every host).

The hop uses httpcore's connection pool directly, not httpx on top of it (issue 16): httpx's layers (auth,
redirects, URL and header models, none of which a forward uses) were about a third of the forwarding host's
client time in py-spy. The request line is the one the client sent (ASGI ``raw_path`` and query string, not
re-encoded).
"""

from __future__ import annotations

import functools
import logging
from typing import Any
from urllib.parse import urlsplit

import httpcore
import trio
from quart import Response, current_app, g, request

from runtime.errors import NotOwner, RuntimeFailure

log = logging.getLogger(__name__)

FORWARDED_BY = "X-Trio-Runtime-Forwarded-By"
# Hosts of one cluster are on one network (one machine in the tests): a connect that takes this long means
# the owner is gone or stopped (SIGSTOP), and the lease decides what happens next.
CONNECT_TIMEOUT = 2.0
# The owner answers within its request timeout (its engine waits are bounded by it); this covers the hop.
ANSWER_MARGIN = 5.0
# After the owner's lease expired, one more second for the database clock and our takeover write.
TAKEOVER_MARGIN = 1.0
# How often the lease is re-read while waiting for a dead owner's lease to expire.
LEASE_POLL = 0.1
# Takeovers and re-forwards of one request at most (an owner that changes twice while we forward).
MAX_HOPS = 3
# RFC 9110 7.6.1 hop-by-hop fields, plus what the hop (_send) and hypercorn set themselves for each connection.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length",
                        "content-encoding", "date", "server"})
CLIENT_KEY = "TRIO_RUNTIME_FORWARD_CLIENT"
# Set on the loop guard's 503: "I am not the owner" (as opposed to an owner's own 503, passed on as it is).
NOT_OWNER_HEADER = "X-Trio-Runtime-Not-Owner"


# What the hop can fail with (httpcore's errors): never reached the owner; the answer timed out; anything else
# after the request may have been sent (a broken or refused answer).
UNREACHABLE = (httpcore.ConnectError, httpcore.ConnectTimeout, httpcore.PoolTimeout)
BROKEN = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, httpcore.ProxyError)


def client() -> httpcore.AsyncConnectionPool:
    """The app's one pooled client (keep-alive connections to the other hosts: no handshake per request).
    No proxies, no redirects, no environment settings: the hop goes straight to the owner's advertise URL."""
    existing = current_app.config.get(CLIENT_KEY)
    if existing is None:
        existing = current_app.config[CLIENT_KEY] = httpcore.AsyncConnectionPool()
    return existing


async def aclose(app: Any) -> None:
    existing = app.config.pop(CLIENT_KEY, None)
    if existing is not None:
        await existing.aclose()


def _error(status: int, code: str, message: str) -> Response:
    from .errors import error_response  # the one error shape

    return error_response(status, code, message)


def _host_id() -> str:
    rt = current_app.config["TRIO_RUNTIME"]
    return str(rt.config.host_id or "")


async def _body() -> bytes:
    """The request body as the client sent it (the routes keep a copy in ``g.request_body``)."""
    body = g.get("request_body")
    if body is None:
        body = await request.get_data(cache=True)
    return bytes(body)


@functools.lru_cache(maxsize=64)
def _origin(url: str) -> tuple[bytes, bytes, int, bytes, bytes]:
    """An advertise URL as httpcore's parts: scheme, host, port, its path prefix (no trailing slash), and the
    Host header."""
    parts = urlsplit(url)
    scheme = (parts.scheme or "http").encode("ascii")
    port = parts.port or (443 if scheme == b"https" else 80)
    host = (parts.hostname or "").encode("idna")
    return scheme, host, port, parts.path.rstrip("/").encode("ascii"), parts.netloc.encode("idna")


async def _send(url: str, body: bytes) -> Response:
    scheme, host, port, prefix, netloc = _origin(url)
    headers = [(b"Host", netloc)]
    headers += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in request.headers.items()
                if name.lower() not in HOP_BY_HOP]
    headers += [(FORWARDED_BY.encode("ascii"), _host_id().encode("latin-1")),
                (b"Content-Length", str(len(body)).encode("ascii"))]
    settings = current_app.config["TRIO_RUNTIME_SETTINGS"]
    # The path as the client sent it (still percent-encoded), and its query string unchanged.
    path = request.scope.get("raw_path") or request.path.encode("utf-8")
    target = prefix + path + (b"?" + request.query_string if request.query_string else b"")
    answer = await client().request(
        request.method.encode("ascii"), httpcore.URL(scheme=scheme, host=host, port=port, target=target),
        headers=headers, content=body,
        extensions={"timeout": {"connect": CONNECT_TIMEOUT, "read": settings.request_timeout + ANSWER_MARGIN,
                                "write": CONNECT_TIMEOUT, "pool": CONNECT_TIMEOUT}})
    kept = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in answer.headers
            if name.decode("latin-1").lower() not in HOP_BY_HOP]
    return Response(answer.content, status=answer.status, headers=kept)


async def _take_over(exc: NotOwner) -> bool:
    """Wait (bounded by the ttl + TAKEOVER_MARGIN) for the unreachable owner's lease to expire, then take the
    thread here. False when another host holds it live at the end (it may be reachable: forward again)."""
    rt = current_app.config["TRIO_RUNTIME"]
    cluster = getattr(rt, "cluster", None)
    if cluster is None or exc.thread_id is None:
        return False
    with trio.move_on_after(cluster.keeper.ttl + TAKEOVER_MARGIN):
        while True:
            lease = await cluster.keeper.lookup(exc.thread_id)
            if lease is None or not lease.live or lease.owner == cluster.host_id:
                break
            if (lease.owner, lease.advertise_url) != (exc.owner_host_id, exc.advertise_url):
                return False  # a new owner appeared meanwhile
            await trio.sleep(LEASE_POLL)
        try:
            await rt.manager.handle(exc.thread_id)
        except NotOwner:
            return False
        return True
    return False


async def _serve_here() -> Any:
    """Run this request's view again on this host (after a takeover), with the body already read."""
    g.raw_body = await _body()
    view = current_app.view_functions[request.url_rule.endpoint]
    return await current_app.make_response(await current_app.ensure_async(view)(**(request.view_args or {})))


async def not_owner(exc: NotOwner) -> Response:
    """The response for a request whose thread another host owns (see the module docstring)."""
    from .errors import status_for

    if request.headers.get(FORWARDED_BY):
        refused = _error(503, exc.code, f"{exc.message}; the request was already forwarded by host "
                                        f"'{request.headers.get(FORWARDED_BY)}', so it is not forwarded again")
        refused.headers[NOT_OWNER_HEADER] = "1"  # the forwarding host looks the owner up again
        return refused
    body = await _body()
    rt = current_app.config["TRIO_RUNTIME"]
    keeper = rt.cluster.keeper if getattr(rt, "cluster", None) is not None else None
    for _ in range(MAX_HOPS):
        answer = None
        if exc.advertise_url:
            try:
                answer = await _send(exc.advertise_url, body)
            except UNREACHABLE as error:
                # Never reached the owner: nothing happened there.
                log.warning("owner %s of thread %s unreachable at %s: %s", exc.owner_host_id, exc.thread_id,
                            exc.advertise_url, error)
            except httpcore.TimeoutException:
                return _error(504, "timeout", f"Host '{exc.owner_host_id}' ({exc.advertise_url}) did not answer in "
                                              f"time; the request may have been done there: retry with the same "
                                              f"Idempotency-Key")
            except BROKEN as error:
                return _error(502, "bad_gateway", f"Host '{exc.owner_host_id}' ({exc.advertise_url}) broke off its "
                                                  f"answer ({type(error).__name__}); the request may have been done "
                                                  f"there: retry with the same Idempotency-Key")
            if answer is not None and (answer.status_code != 503 or answer.headers.get(NOT_OWNER_HEADER) != "1"):
                return answer
        # Unreachable, or not the owner any more (it released the thread and another took it): look again.
        if keeper is not None and exc.thread_id:
            keeper.forget_owner(exc.thread_id)
        if answer is None and not await _take_over(exc):
            lease = await keeper.lookup(exc.thread_id) if keeper is not None and exc.thread_id else None
            if lease is not None and lease.live and lease.owner != exc.owner_host_id and lease.advertise_url:
                exc = NotOwner(lease.owner or "", lease.advertise_url, exc.thread_id)
                continue  # another host took it meanwhile: forward there
            return _error(503, exc.code, f"{exc.message}, and that host cannot be reached; retry later")
        try:
            return await _serve_here()
        except NotOwner as again:
            exc = again
        except RuntimeFailure as error:
            return _error(status_for(error), error.code, error.message)
    return _error(503, exc.code, f"{exc.message}; the thread changed hosts too often while forwarding, retry")
