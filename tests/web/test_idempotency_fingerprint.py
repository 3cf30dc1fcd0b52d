"""The fingerprint of a keyed request (web/idempotency.py) is part of every stored answer: a retry matches its
record only if the fingerprint is computed from the same bytes as when the record was written, by this version
or an earlier one still within the 24 hours."""

from __future__ import annotations

import hashlib

from web.idempotency import fingerprint


def _spelled_out(method: str, path: str, query: bytes, body: bytes) -> str:
    # The documented construction: SHA-256 of each part prefixed by its length in 8 big-endian bytes.
    data = b""
    for part in (method.encode(), path.encode("utf-8", "surrogateescape"), query, body):
        data += len(part).to_bytes(8, "big") + part
    return hashlib.sha256(data).hexdigest()


def test_the_fingerprint_is_sha256_of_the_length_prefixed_parts():
    cases = [("POST", "/v1/threads", b"", b'{"title":"t"}'), ("PUT", "/v1/sessions", b"a=1&b=%20", b""),
             ("POST", "/v1/threads/thr_\udcff/turns", b"", "é 😀".encode()), ("PUT", "/", b"", b"x" * 300_000)]
    for case in cases:
        assert fingerprint(*case) == _spelled_out(*case), case
    # A known value, so that a change of the construction shows even if this file's copy changed with it.
    assert fingerprint("POST", "/v1/threads", b"", b"{}") == \
        hashlib.sha256(b"\0\0\0\0\0\0\0\x04POST\0\0\0\0\0\0\0\x0b/v1/threads\0\0\0\0\0\0\0\0"
                       b"\0\0\0\0\0\0\0\x02{}").hexdigest()


def test_parts_that_run_together_differently_have_different_fingerprints():
    assert fingerprint("POST", "/a", b"", b"bc") != fingerprint("POST", "/ab", b"", b"c")
    assert fingerprint("POST", "/a", b"b", b"") != fingerprint("POST", "/a", b"", b"b")
