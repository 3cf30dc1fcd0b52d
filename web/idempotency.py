"""``Idempotency-Key`` for every POST and PUT under ``/v1``: one decorator, ``idempotent``, and two helpers
a route uses, ``claim`` and ``respond``.

The decorator reads the key (1-255 visible ASCII characters, else 400) and the raw body once (``read_body``
reuses it), and fingerprints the request: SHA-256 of method, path with query string and body. With a key,
it holds the key in the runtime's in-flight table (a second request with it meanwhile: 409
``idempotency_key_in_progress``), then looks up a stored answer: the same request gets it again byte for
byte with ``Idempotent-Replayed: true``; a different one gets 422 ``idempotency_key_reused``. Otherwise the
route runs: it makes a ``Claim`` (the status it answers with on success, and how its result becomes the
answer's bytes), passes it to the runtime, which stores the answer in the same transaction as the change,
and answers with ``claim.body``, so the first answer and every replay are the same bytes.

Only a success stores an answer: a request that failed (4xx, 5xx) or was cancelled made no change, so its
retry runs again (docs/design.md, "Idempotency"). The runtime knows nothing of this module.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import struct
from typing import Any, Callable

from quart import Response, g, jsonify, request

from runtime import codec
from runtime.errors import InvalidInput
from runtime.idempotency import NOT_READ, Claim, Stored

from .api import runtime

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
# API.md: 1-255 visible ASCII characters (0x21-0x7E: no space, no control character, nothing beyond ASCII).
KEY_PATTERN = r"^[\x21-\x7E]{1,255}$"
_KEY = re.compile(r"[\x21-\x7E]{1,255}\Z")
# For /openapi.json (RouteSpec.headers): name, description, pattern.
OPENAPI_HEADER = (HEADER, "Optional key that makes a retry of this request safe: the first request with it is "
                  "executed and its answer stored for 24 hours; the same request again gets that answer "
                  f"(header {REPLAYED}: true), a different one 422, one while the first runs 409",
                  "^[!-~]{1,255}$")
OPENAPI_ERRORS = (409, 422)


def parse_key() -> str | None:
    """The request's key, None without the header; InvalidInput naming the header when it is malformed."""
    values = request.headers.getlist(HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidInput(f"Give the {HEADER} header once, not {len(values)} times")
    key = values[0]
    if not _KEY.match(key):
        raise InvalidInput(f"The {HEADER} header must be 1-255 visible ASCII characters (no spaces or control "
                           f"characters), got {len(key)} character(s)")
    return key


_LENGTH = struct.Struct(">Q").pack  # a part's length prefix: 8 bytes, big-endian


def fingerprint(method: str, path: str, query: bytes, body: bytes) -> str:
    """SHA-256 of what makes two requests the same; each part is length-prefixed, so no two different
    requests can run together into the same bytes. The digest of exactly those bytes, whatever the call
    shape (stored records keep matching): the parts before the body are joined and hashed at once, the
    body (up to a session's megabytes) is hashed where it lies, not copied."""
    verb, where = method.encode(), path.encode("utf-8", "surrogateescape")
    digest = hashlib.sha256(b"".join((_LENGTH(len(verb)), verb, _LENGTH(len(where)), where,
                                      _LENGTH(len(query)), query, _LENGTH(len(body)))))
    digest.update(body)
    return digest.hexdigest()


def idempotent(view: Callable) -> Callable:
    """Wrap a POST/PUT view (see the module docstring). ``route`` sees the ``idempotent`` mark and documents
    the header and the 409/422 answers in /openapi.json."""

    @functools.wraps(view)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        key = parse_key()
        body = g.pop("raw_body", None)  # set when the request runs again here after a takeover (web/forward.py)
        if body is None:
            body = await request.get_data(cache=False)
        g.raw_body = g.request_body = body
        if key is None:
            return await view(*args, **kwargs)
        service = runtime().idempotency
        req = request._get_current_object()  # one context lookup for the three reads, not three
        with service.hold(key, fingerprint(req.method, req.path, req.query_string, body)) as slot:
            # Read on the spot when it can (SQLite): the route's change that follows is the schedule point.
            stored = service.lookup_now(key, slot.fingerprint)
            if stored is NOT_READ:
                stored = await service.lookup(key, slot.fingerprint)
            if stored is not None:
                return replay(stored)
            g.idempotency_slot = slot
            return await view(*args, **kwargs)

    wrapper.idempotent = True  # type: ignore[attr-defined]
    wrapper.openapi_headers = (OPENAPI_HEADER,)  # type: ignore[attr-defined]
    wrapper.openapi_errors = OPENAPI_ERRORS  # type: ignore[attr-defined]
    return wrapper


def claim(status: int, encode: Callable[[Any], bytes] = codec.dumps, *, headers: dict[str, str] | None = None,
          headers_of: Callable[[Any], dict[str, str]] | None = None) -> Claim | None:
    """The request's Claim (None without a key): pass it to the runtime call that makes the change."""
    slot = g.get("idempotency_slot")
    return None if slot is None else slot.claim(status, encode, headers, headers_of)


def respond(made: Claim | None, value: Any, status: int) -> Response:
    """The success answer: the claim's stored bytes when there is one, else ``value`` as JSON."""
    if made is not None:
        if made.body is not None:
            return Response(made.body, status=made.status, headers=made.headers, content_type="application/json")
        # The change succeeded but no record was written with it: a runtime path that forgot the claim.
        log.error("%s %s succeeded without storing its idempotency record", request.method, request.path)
    response = jsonify(value)
    response.status_code = status
    return response


def replay(stored: Stored) -> Response:
    return Response(stored.body, status=stored.status, headers={**stored.headers, REPLAYED: "true"},
                    content_type="application/json")
