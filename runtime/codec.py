"""JSON for big documents (session files, a resumed thread's base messages) without stalling the loop.

The stdlib codec holds the GIL for a whole document: encoding a 12 MB session took ~95 ms and decoding
it ~35 ms in one C call each, and a worker thread does not help, because the event loop cannot run
while another thread holds the GIL. So:

- ``dumps`` uses orjson (~2-17 ms for the same 12 MB; the same bytes as the stdlib's compact UTF-8 output
  for strings, ints and structure) and falls back to the stdlib for what orjson refuses (integers
  beyond 64 bits, non-string keys). Two differences: some floats are spelled differently (``1e-05`` is
  ``0.00001``; both read back as the same float), and NaN and infinities become ``null`` (the stdlib
  writes ``NaN``, which is not JSON). ``dumps_sliced`` makes the same bytes in slices.
- ``loads`` keeps the stdlib decoder (orjson silently turns integers beyond 64 bits into floats, and is
  no faster on text-heavy documents) but runs it in slices: a big document's top-level array (a
  thread's base messages), or the arrays at the top of a big object (a session's ``messages``), are
  decoded one element at a time, and the bytes are turned into text a megabyte at a time as the walk
  reaches them, so no single C call holds the GIL for more than about a millisecond, and the GIL is
  handed to the event loop between slices (``let_others_run``). Anything the sliced walk does not expect is decoded
  again by ``json.loads`` as a whole, so results and error messages are exactly the stdlib's.

Both block; callers that handle big documents run them in a worker thread.
"""

from __future__ import annotations

import codecs
import contextlib
import gc
import json
import re
import threading
import time
from typing import Any, Iterator

import orjson

# Below this a document is decoded in one call (~3 ms per MB): slicing would only add overhead.
SLICE_ABOVE = 1 << 20
# Bytes turned into text per call while slicing (~1 ms each); also about the most text held at once.
TEXT_CHUNK = 1 << 20

# When less than this much decoded text is left, the next chunk is decoded before the next array element
# is: an element that runs past the text makes the C scanner raise a JSONDecodeError, whose constructor
# counts the newlines of the whole text before it (~0.3 ms per MB; two per chunk boundary were a quarter of
# decoding a 12 MB non-ASCII session, profiled for issue 16). Only an element longer than this still can.
READ_AHEAD = 64 * 1024
# Array elements decoded between two calls of let_others_run (which itself acts at most every 2 ms).
YIELD_ELEMENTS = 64
# Elements per orjson call in dumps_sliced: ~1.3 MB of 5 KB messages, ~1.5 ms.
ARRAY_BATCH = 256
# How often a worker thread slicing a big document hands the GIL over (see let_others_run): the event
# loop waits at most about this long for the GIL, where the interpreter's switch interval is 5 ms.
LET_OTHERS_RUN_EVERY = 0.002

_DECODER = json.JSONDecoder()
_yielded = threading.local()
_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, as json.decoder skips it


def let_others_run() -> None:
    """Between two slices of work in a worker thread: hand the GIL to a thread that waits for it (the
    event loop), at most every LET_OTHERS_RUN_EVERY.

    A thread that runs Python steadily keeps the GIL until the interpreter's switch interval (5 ms)
    forces a hand-over, and the event loop needs the GIL back after every system call (each socket
    read, write and poll): a socket echo on the loop answered in ~25 ms (p99) while a 12 MB session was
    decoded in a worker thread, against ~2-6 ms with these hand-overs (``make bench`` rows 14a-c
    measure /health the same way). ``time.sleep(0)`` releases the GIL and sleeps the kernel's timer
    slack (~50-90 µs here), long enough for the waiting loop to take it (a bare release is retaken
    before the waiter wakes). The price is the worker's speed: ~5 % on a quiet machine, more when the
    cores are busy (each sleep then waits for a core): benchmark 13b, ~75,000 small messages, took
    1.3-1.75x json.loads against 1.0-1.3x with one json.loads call."""
    now = time.perf_counter()
    if now - getattr(_yielded, "at", 0.0) >= LET_OTHERS_RUN_EVERY:
        time.sleep(0)
        _yielded.at = time.perf_counter()


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, as ``json.dumps(value, ensure_ascii=False, separators=(",", ":"))`` encoded
    to UTF-8 would give (float spelling, NaN and infinities aside: see the module docstring)."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: a big int, a non-str key, a lone surrogate, depth > 254
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def dumps_sliced(value: Any) -> bytes:
    """``dumps(value)``, the same bytes, made in slices for a worker thread: a big list ARRAY_BATCH
    elements per orjson call, and a dict (a session document) one entry at a time, with
    ``let_others_run`` in between. One orjson call on a freshly decoded 12 MB session held the GIL
    ~15-20 ms (most of it turning its strings into UTF-8); a batch takes ~1.5 ms. Only the final join
    is one call, a plain copy (``bytes.join`` lets go of the GIL while it copies a megabyte or more)."""
    return b"".join(dumps_parts(value))


def dumps_sliced_span(value: Any, key: str) -> tuple[bytes, tuple[int, int] | None]:
    """``dumps_sliced(value)`` and where the value of ``value[key]`` lies in those bytes (start, end), for a
    dict ``value`` encoded an entry at a time; None when it has no such entry or went whole to orjson.
    A session save compares its messages' bytes with the previous file's (runtime/sessions/filedocs.py)."""
    parts: list[Any] = []
    spans: dict[str, tuple[int, int]] = {}
    _slices(value, parts, top=True, spans=spans)
    data, span = b"".join(parts), spans.get(key)
    if span is None:
        return data, None
    start = sum(len(part) for part in parts[:span[0]])
    return data, (start, start + sum(len(part) for part in parts[span[0]:span[1]]))


def dumps_parts(value: Any) -> list[bytes | memoryview]:
    """``dumps_sliced(value)`` as the pieces it joins (their concatenation is those bytes), for a
    consumer that writes them one by one and so never needs one 12 MB buffer (a resumed thread's base
    messages go to SQLite by incremental blob I/O: runtime.core ``create_thread``)."""
    parts: list[Any] = []
    _slices(value, parts, top=True)
    return parts


def _slices(value: Any, parts: list[Any], top: bool, spans: dict[str, tuple[int, int]] | None = None) -> None:
    if isinstance(value, list) and len(value) > ARRAY_BATCH:
        for start in range(0, len(value), ARRAY_BATCH):
            let_others_run()
            batch = memoryview(dumps(value[start:start + ARRAY_BATCH]))
            parts += (b"," if start else b"[", batch[1:-1])  # each batch without its brackets
        parts.append(b"]")
    elif top and isinstance(value, dict) and value and all(type(key) is str for key in value):
        for n, (key, item) in enumerate(value.items()):
            parts += (b"," if n else b"{", dumps(key), b":")
            first = len(parts)
            _slices(item, parts, top=False)
            if spans is not None:
                spans[key] = (first, len(parts))  # the parts of this entry's value
        parts.append(b"}")
    else:
        parts.append(dumps(value))


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """CPython's cyclic garbage collector off for the block (back on after it, if it was on).

    For a decode whose every new container stays alive (a big document, a boundary state's messages).
    With the collector on, every 700 new containers start a young-generation pass that can free none of
    them, and the growth they add starts full passes over the whole heap: a tool-heavy 8.5 MB session
    (~150,000 blocks, bench row 13b) took 150-215 ms in ``json.loads`` with the collector on against
    ~85 ms with it off, and a boundary state's decode paid 30-50 ms of full passes on about every second
    start of a huge thread (bench row 16d). Paused, one young pass looks at them once afterwards; full
    passes still come when the heap has grown by a quarter, as always. No cycle is freed meanwhile
    (reference counting frees everything else); the process-wide switch is only off for the decode, and
    another thread's pause overlapping this one just ends early (its decode is then no worse off than
    without a pause)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def loads(data: bytes | str) -> Any:
    """``json.loads(data)``, decoded in slices when the document is big (see the module docstring), with
    the collector paused (``collector_paused``): everything a decode makes is still alive when it ends."""
    if len(data) <= SLICE_ABOVE:
        return json.loads(data)
    with collector_paused():
        return _loads_big(data)


def _loads_big(data: bytes | str) -> Any:
    if isinstance(data, (bytes, bytearray)) and (data[:3] == codecs.BOM_UTF8 or 0 in data[:4]):
        return json.loads(data)  # not plain UTF-8 (a BOM, UTF-16 or -32): the stdlib detects and decodes it
    try:
        return _Walk(data).document()
    except (ValueError, IndexError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        return json.loads(data)  # raises the stdlib's own error for it (or decodes what we did not expect)


class _Walk:
    """A document's top levels walked by hand, every value below them decoded by the stdlib's decoder.

    Bytes are turned into text a chunk at a time, as the walk reaches them (never one 12 MB string:
    building it is one long call too), and text already walked is dropped when the next chunk comes.
    A value that runs past the decoded text is decoded again once more text is there (a number that
    ends exactly at the end of the text, too: it might go on)."""

    def __init__(self, data: bytes | bytearray | str) -> None:
        self.i = 0
        if isinstance(data, str):
            self.text, self.data, self.eof = data, memoryview(b""), True
        elif data.isascii():  # ASCII turns into text as fast as memory copies (~1 ms for 10 MB): at once
            self.text, self.data, self.eof = data.decode("ascii"), memoryview(b""), True
        else:
            self.text, self.data, self.eof = "", memoryview(data), False
        self.pos = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogatepass")  # as json.loads decodes bytes

    def more(self) -> bool:
        """Decode the next chunk (dropping the text before ``i``); False at the end of the document."""
        if self.eof:
            return False
        chunk = self.data[self.pos:self.pos + TEXT_CHUNK]
        self.pos += len(chunk)
        self.eof = self.pos >= len(self.data)
        self.text = self.text[self.i:] + self.decoder.decode(chunk, self.eof)
        self.i = 0
        return True

    def peek(self) -> str:
        """The next character that is not whitespace (``i`` moves to it)."""
        while True:
            self.i = _WS.match(self.text, self.i).end()
            if self.i < len(self.text):
                return self.text[self.i]
            if not self.more():
                raise ValueError("unexpected end of the document")

    def decoded(self, decode) -> Any:
        """``decode(text, i) -> (value, end)`` at ``i``, with more text until the value is whole."""
        let_others_run()
        while True:
            try:
                value, end = decode(self.text, self.i)
            except ValueError:
                if self.more():
                    continue
                raise
            if end == len(self.text) and self.more():
                continue
            self.i = end
            return value

    def document(self) -> Any:
        first = self.peek()
        if first == "[":
            value = self.array()
        elif first == "{":
            value = self.object()
        else:
            raise ValueError("neither an object nor an array")
        while True:
            self.i = _WS.match(self.text, self.i).end()
            if self.i < len(self.text):
                raise ValueError("extra data")
            if not self.more():
                return value

    def object(self) -> dict[str, Any]:
        """An object at ``i``: each array value element by element, other values whole."""
        result: dict[str, Any] = {}
        self.i += 1
        if self.peek() == "}":
            self.i += 1
            return result
        while True:
            if self.peek() != '"':
                raise ValueError("expected a key")
            key = self.decoded(lambda text, i: json.decoder.scanstring(text, i + 1))
            if self.peek() != ":":
                raise ValueError("expected ':'")
            self.i += 1
            result[key] = self.array() if self.peek() == "[" else self.decoded(_DECODER.raw_decode)
            after = self.peek()
            self.i += 1
            if after == "}":
                return result
            if after != ",":
                raise ValueError("expected ',' or '}'")

    def array(self) -> list[Any]:
        """An array at ``i``, element by element: each one by the stdlib's C scanner straight (no Python
        wrapper in between: tool-heavy sessions have ~100,000 small elements), ``decoded`` only for one
        that runs past the decoded text (rare: the next chunk is decoded READ_AHEAD before the end), and
        ``let_others_run`` every YIELD_ELEMENTS elements."""
        items: list[Any] = []
        append, scan = items.append, _DECODER.scan_once
        self.i += 1
        if self.peek() == "]":
            self.i += 1
            return items
        count = 0
        while True:
            count += 1
            if count % YIELD_ELEMENTS == 0:
                let_others_run()
            if not self.eof and len(self.text) - self.i < READ_AHEAD:
                self.more()
            text = self.text
            try:
                value, end = scan(text, self.i)
            except (StopIteration, ValueError):
                end = -1
            if 0 < end < len(text):
                self.i = end
            else:  # it runs past the decoded text (a number may go on), or it is bad: the careful way
                value = self.decoded(_DECODER.raw_decode)
            append(value)
            text, i = self.text, self.i
            if i < len(text) and text[i] == ",":  # compact JSON: the next element follows at once
                self.i = i + 1
                if self.i < len(text) and text[self.i] not in " \t\n\r":
                    continue
                self.peek()
                continue
            after = self.peek()
            self.i += 1
            if after == "]":
                return items
            if after != ",":
                raise ValueError("expected ',' or ']'")
            self.peek()
