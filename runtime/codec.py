"""JSON for big documents (session files, a resumed thread's base messages) without stalling the loop.

The stdlib codec holds the GIL for a whole document: encoding a 12 MB session took ~95 ms and decoding
it ~35 ms in one C call each, and a worker thread does not help, because the event loop cannot run
while another thread holds the GIL. So:

- ``dumps`` uses orjson (~2 ms for the same 12 MB; the same bytes as the stdlib's compact UTF-8 output
  for strings, ints and structure) and falls back to the stdlib for what orjson refuses (integers
  beyond 64 bits, non-string keys). Two differences: some floats are spelled differently (``1e-05`` is
  ``0.00001``; both read back as the same float), and NaN and infinities become ``null`` (the stdlib
  writes ``NaN``, which is not JSON).
- ``loads`` keeps the stdlib decoder (orjson silently turns integers beyond 64 bits into floats, and is
  no faster on text-heavy documents) but runs it in slices: a big document's top-level array (a
  thread's base messages), or the arrays at the top of a big object (a session's ``messages``), are
  decoded one element at a time, and the bytes are turned into text a
  megabyte at a time, so no single C call holds the GIL for more than about a millisecond; the
  interpreter hands the GIL to the event loop between slices. Anything the sliced walk does not
  expect is decoded again by ``json.loads`` as a whole, so results and error messages are exactly
  the stdlib's.

Both block; callers that handle big documents run them in a worker thread.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any

import orjson

# Below this a document is decoded in one call (~3 ms per MB): slicing would only add overhead.
SLICE_ABOVE = 1 << 20
# Bytes turned into text per call while slicing (~1 ms each).
TEXT_CHUNK = 1 << 20

_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, as json.decoder skips it


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, as ``json.dumps(value, ensure_ascii=False, separators=(",", ":"))`` encoded
    to UTF-8 would give (float spelling, NaN and infinities aside: see the module docstring)."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: a big int, a non-str key, a lone surrogate, depth > 254
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def loads(data: bytes | str) -> Any:
    """``json.loads(data)``, decoded in slices when the document is big (see the module docstring)."""
    if len(data) <= SLICE_ABOVE:
        return json.loads(data)
    if isinstance(data, (bytes, bytearray)):
        if data[:3] == codecs.BOM_UTF8 or 0 in data[:4]:  # not plain UTF-8: leave it to json.loads
            return json.loads(data)
        text = _text(data)
    else:
        text = data
    try:
        return _sliced(text)
    except (ValueError, IndexError, RecursionError):
        return json.loads(data)  # raises the stdlib's own error for it (or decodes what we did not expect)


def _text(data: bytes | bytearray) -> str:
    """``data.decode("utf-8", "surrogatepass")`` (what json.loads does with UTF-8 bytes), a chunk at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogatepass")
    view = memoryview(data)
    parts = [decoder.decode(view[start:start + TEXT_CHUNK]) for start in range(0, len(view), TEXT_CHUNK)]
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts)


def _sliced(text: str) -> Any:
    """Decode ``text`` whose top level is an array (element by element) or an object (each of its
    array values element by element)."""
    i = _WS.match(text, 0).end()
    if text[i] == "[":
        value, i = _array(text, i)
    elif text[i] == "{":
        value, i = _object(text, i)
    else:
        raise ValueError("neither an object nor an array")
    if _WS.match(text, i).end() != len(text):
        raise ValueError("extra data")
    return value


def _object(text: str, i: int) -> tuple[dict[str, Any], int]:
    result: dict[str, Any] = {}
    i = _WS.match(text, i + 1).end()
    if text[i] == "}":
        i += 1
    else:
        while True:
            if text[i] != '"':
                raise ValueError("expected a key")
            key, i = json.decoder.scanstring(text, i + 1)
            i = _WS.match(text, i).end()
            if text[i] != ":":
                raise ValueError("expected ':'")
            i = _WS.match(text, i + 1).end()
            if text[i] == "[":
                result[key], i = _array(text, i)
            else:
                result[key], i = _DECODER.raw_decode(text, i)
            i = _WS.match(text, i).end()
            if text[i] == ",":
                i = _WS.match(text, i + 1).end()
            elif text[i] == "}":
                i += 1
                break
            else:
                raise ValueError("expected ',' or '}'")
    return result, i


def _array(text: str, i: int) -> tuple[list[Any], int]:
    items: list[Any] = []
    i = _WS.match(text, i + 1).end()
    if text[i] == "]":
        return items, i + 1
    while True:
        value, i = _DECODER.raw_decode(text, i)
        items.append(value)
        i = _WS.match(text, i).end()
        if text[i] == ",":
            i = _WS.match(text, i + 1).end()
        elif text[i] == "]":
            return items, i + 1
        else:
            raise ValueError("expected ',' or ']'")
