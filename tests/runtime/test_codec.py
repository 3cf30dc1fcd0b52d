"""runtime.codec: the same JSON as the stdlib, without one long GIL hold per big document (defect 8).

Results are compared with the stdlib's on the same input (bytes for ``dumps``, values and error
messages for ``loads``); that ``loads`` really slices is checked by counting the decoder's calls and
the span each one covers, not by timing.
"""

from __future__ import annotations

import json

import pytest

from runtime import codec

STDLIB = {"ensure_ascii": False, "separators": (",", ":")}


def stdlib_bytes(value) -> bytes:
    return json.dumps(value, **STDLIB).encode("utf-8")


def big_document(messages: int = 400, text_len: int = 4000) -> dict:
    """Over codec.SLICE_ABOVE: a session-shaped document with non-ASCII, escapes and numbers."""
    text = ("naïve café ☕ 😀 \"quoted\" back\\slash tab\t line\n sep\u2028 ctrl\x01 " * 200)[:text_len]
    return {
        "schema_version": 1,
        "metadata": {"id": "big", "title": "Grüße", "revision": 3, "total_tokens": 2**40, "archived": False},
        "messages": [{"role": "user" if i % 2 == 0 else "assistant",
                      "content": [{"type": "text", "text": f"{i} {text}"},
                                  {"type": "tool_use", "id": f"t{i}", "input": {"x": 1.5, "n": None, "ok": True}}]}
                     for i in range(messages)],
        "system_prompt": None,
    }


@pytest.mark.parametrize("value", [
    big_document(),
    {"text": "ascii only"},
    ["é", "😀", "\u2028\u2029"],
    ["\x00\x1f\x7f", '"\\/'],
    {"int": -(2**63), "max": 2**64 - 1, "nested": [[[]], {}], "bool": [True, False, None]},
], ids=["session", "ascii", "unicode", "controls", "ints"])
def test_dumps_writes_the_stdlib_bytes(value):
    assert codec.dumps(value) == stdlib_bytes(value)


def test_dumps_writes_floats_that_read_back_exactly():
    # orjson spells some exponents differently (1e-05 -> 0.00001), the value read back is the same float.
    value = {"floats": [0.1, -2.5e-8, 1e300, 1e-5, 123456789.0, 5e-324, 1.7976931348623157e308, -0.0]}
    assert json.loads(codec.dumps(value)) == value
    assert [repr(x) for x in json.loads(codec.dumps(value))["floats"]] == [repr(x) for x in value["floats"]]


@pytest.mark.parametrize("value", [
    {"big_int": 2**70, "neg": -(2**65)},
    {1: "int key", "nested": {2: [3]}},
], ids=["ints-beyond-64-bits", "non-string-keys"])
def test_dumps_falls_back_to_the_stdlib_for_what_orjson_refuses(value):
    assert codec.dumps(value) == stdlib_bytes(value)
    assert json.loads(codec.dumps(value)) == json.loads(stdlib_bytes(value))


def test_dumps_refuses_a_lone_surrogate_as_the_stdlib_encoding_does():
    with pytest.raises(UnicodeEncodeError):
        stdlib_bytes({"text": "\ud83d"})
    with pytest.raises(UnicodeEncodeError):
        codec.dumps({"text": "\ud83d"})


@pytest.mark.parametrize("make", [
    lambda doc: stdlib_bytes(doc),
    lambda doc: json.dumps(doc, indent=2).encode(),  # ASCII escapes, whitespace everywhere
    lambda doc: stdlib_bytes(doc).decode("utf-8"),  # str input
    lambda doc: b" \n\t" + stdlib_bytes(doc) + b"\r\n ",
], ids=["compact-bytes", "indented-ascii", "str", "surrounding-whitespace"])
def test_loads_of_a_big_document_equals_json_loads(make):
    data = make(big_document())
    assert len(data) > codec.SLICE_ABOVE
    assert codec.loads(data) == json.loads(data) == big_document()


def test_loads_keeps_what_only_the_stdlib_keeps():
    doc = big_document()
    doc["metadata"]["huge"] = 10**30  # beyond 64 bits: stays an exact int
    raw = stdlib_bytes(doc)
    # NaN, a lone surrogate escape and a UTF-8-encoded surrogate (json.loads decodes with surrogatepass)
    raw = raw.replace(b'"n":null', b'"n":NaN', 1).replace(b'"ok":true', b'"ok":"\\ud800"', 1)
    raw = raw.replace(b'"archived":false', b'"archived":"\xed\xa0\x80"', 1)
    got, expected = codec.loads(raw), json.loads(raw)
    assert got["metadata"]["huge"] == 10**30 and isinstance(got["metadata"]["huge"], int)
    assert got["metadata"]["archived"] == "\ud800"
    assert got["messages"][0]["content"][1]["input"]["ok"] == "\ud800"
    assert got["messages"][0]["content"][1]["input"]["n"] != got["messages"][0]["content"][1]["input"]["n"]  # NaN
    assert json.dumps(got) == json.dumps(expected)


def test_loads_of_an_empty_object_and_array_values():
    data = b'{"a":[],"b":{},"c":[ ],"pad":"' + b"x" * codec.SLICE_ABOVE + b'"}'
    assert codec.loads(data) == json.loads(data)


@pytest.mark.parametrize("damage", [
    lambda raw: raw[:-10],  # truncated
    lambda raw: raw + b"{}",  # extra data
    lambda raw: raw.replace(b'}]},{"role"', b'}],},{"role"', 1),  # trailing comma in an object
    lambda raw: raw.replace(b'],"system_prompt"', b',],"system_prompt"', 1),  # trailing comma in an array
    lambda raw: raw.replace(b'"metadata":', b'"metadata"', 1),  # missing colon
    lambda raw: raw.replace(b'"role":"user"', b'"role":"us\xffer"', 1),  # invalid UTF-8
    lambda raw: b"\xef\xbb\xbf" + raw,  # UTF-8 BOM (the stdlib accepts it on bytes)
    lambda raw: b'"' + raw.replace(b'"', b"'") + b'"',  # a string at the top
    lambda raw: b"[" + raw + b",]",  # a trailing comma in a top-level array
], ids=["truncated", "extra-data", "object-comma", "array-comma", "colon", "bad-utf8", "bom", "top-level-string",
        "top-array-comma"])
def test_loads_of_a_damaged_big_document_behaves_exactly_like_json_loads(damage):
    raw = damage(stdlib_bytes(big_document()))
    try:
        expected = json.loads(raw)
    except ValueError as exc:
        with pytest.raises(type(exc)) as got:
            codec.loads(raw)
        assert str(got.value) == str(exc)
    else:
        assert codec.loads(raw) == expected


class SpanSpy:
    """The decoder the walk uses, recording how much text each decode call covered."""

    def __init__(self, spans: list[int]) -> None:
        self.spans = spans

    def scan_once(self, s, idx):
        value, end = json.decoder.JSONDecoder().scan_once(s, idx)
        self.spans.append(end - idx)
        return value, end

    def raw_decode(self, s, idx=0):
        value, end = json.decoder.JSONDecoder().raw_decode(s, idx)
        self.spans.append(end - idx)
        return value, end


def test_loads_decodes_a_big_document_one_array_element_at_a_time(monkeypatch):
    doc = big_document(messages=300)
    raw = stdlib_bytes(doc)
    spans: list[int] = []
    monkeypatch.setattr(codec, "_DECODER", SpanSpy(spans))
    assert codec.loads(raw) == doc
    largest_message = max(len(json.dumps(m, ensure_ascii=False, separators=(",", ":"))) for m in doc["messages"])
    # each message (one more call for one that ran past a chunk of text), then metadata, schema_version
    # and system_prompt whole
    assert 300 + 3 <= len(spans) <= 300 + 3 + len(raw) // codec.TEXT_CHUNK
    assert max(spans) == largest_message < len(raw) // 100


def test_a_big_top_level_array_is_decoded_one_element_at_a_time(monkeypatch):
    messages = big_document(messages=300)["messages"]
    raw = stdlib_bytes(messages)
    spans: list[int] = []
    monkeypatch.setattr(codec, "_DECODER", SpanSpy(spans))
    assert codec.loads(raw) == messages
    assert 300 <= len(spans) <= 300 + len(raw) // codec.TEXT_CHUNK and max(spans) < len(raw) // 100


def test_a_small_document_is_decoded_in_one_call(monkeypatch):
    walks = []
    monkeypatch.setattr(codec, "_Walk", walks.append)
    assert codec.loads(b'{"messages":[1,2]}') == {"messages": [1, 2]}
    assert walks == []


SMALL_DOCS = [
    {"schema_version": 1, "metadata": {"id": "x", "n": 12345678901234567890123, "f": -1.25e-7},
     "messages": [{"role": "user", "content": [{"type": "text", "text": "héllo ☕ 😀 \"q\" \\ \n"}]},
                  12345, -0.5, 1e300, True, None, "ünïcode", [], {}, [[1, [2]], {"a": [3]}]],
     "empty": [], "obj": {}, "last": 987654321},
    [1, 22, 333, "é😀", {"k": [1, 2]}, [], 4444, -55555, 6.5e-5, False, None],
]


@pytest.mark.parametrize("doc", SMALL_DOCS, ids=["object", "array"])
@pytest.mark.parametrize("layout", ["compact", "indented", "ascii"])
def test_every_chunk_boundary_decodes_like_json_loads(monkeypatch, doc, layout):
    """Tiny chunks put a boundary inside every multi-byte character, number, key and escape."""
    raw = {"compact": stdlib_bytes(doc), "indented": json.dumps(doc, indent=3, ensure_ascii=False).encode(),
           "ascii": json.dumps(doc).encode()}[layout]
    monkeypatch.setattr(codec, "SLICE_ABOVE", 8)
    for chunk in range(1, 14):
        monkeypatch.setattr(codec, "TEXT_CHUNK", chunk)
        assert codec.loads(raw) == json.loads(raw), chunk


@pytest.mark.parametrize("damage", [
    lambda raw: raw[:-3], lambda raw: raw + b" x", lambda raw: raw.replace(b",", b",,", 1),
    lambda raw: raw.replace(b":", b" ", 1), lambda raw: raw.replace(b"\xc3\xa9", b"\xc3", 1),
    lambda raw: raw.replace(b'"k"', b"k", 1), lambda raw: raw.replace(b"12345", b"12a45", 1),
], ids=["truncated", "extra", "double-comma", "no-colon", "cut-utf8", "bare-key", "bad-number"])
def test_damage_at_any_chunk_boundary_raises_what_json_loads_raises(monkeypatch, damage):
    raw = damage(stdlib_bytes({**SMALL_DOCS[0], "obj": {"k": 1}}))
    with pytest.raises(ValueError) as expected:
        json.loads(raw)
    monkeypatch.setattr(codec, "SLICE_ABOVE", 8)
    for chunk in (1, 2, 3, 5, 8, 13, 64):
        monkeypatch.setattr(codec, "TEXT_CHUNK", chunk)
        with pytest.raises(type(expected.value)) as got:
            codec.loads(raw)
        assert str(got.value) == str(expected.value), chunk


def test_a_big_document_is_never_held_as_one_text(monkeypatch):
    raw = stdlib_bytes(big_document(messages=600))
    assert len(raw) > 2 * codec.TEXT_CHUNK
    held: list[int] = []
    real_more = codec._Walk.more

    def more(self):
        grew = real_more(self)
        held.append(len(self.text))
        return grew

    monkeypatch.setattr(codec._Walk, "more", more)
    assert codec.loads(raw) == big_document(messages=600)
    largest = max(len(stdlib_bytes(m)) for m in big_document(messages=600)["messages"])
    assert len(held) > 2 and max(held) <= codec.TEXT_CHUNK + largest


def test_a_big_decode_hands_the_gil_over_between_slices(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(codec, "let_others_run", lambda: calls.append("yield"))
    doc = big_document(messages=300)
    codec.loads(stdlib_bytes(doc))
    assert len(calls) >= 300 // codec.YIELD_ELEMENTS  # once per YIELD_ELEMENTS elements at least


def test_let_others_run_sleeps_at_most_once_per_interval(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(codec.time, "sleep", sleeps.append)
    monkeypatch.setattr(codec, "LET_OTHERS_RUN_EVERY", 3600.0)
    codec._yielded.at = float("-inf")  # not 0.0: perf_counter counts from boot, so under an hour after it
    for _ in range(1000):
        codec.let_others_run()
    assert sleeps == [0]  # time.sleep(0): releases the GIL
    monkeypatch.setattr(codec, "LET_OTHERS_RUN_EVERY", 0.0)
    for _ in range(5):
        codec.let_others_run()
    assert sleeps == [0] * 6


@pytest.mark.parametrize("value", [
    big_document(messages=700), big_document(messages=700)["messages"], big_document(messages=3),
    {"messages": [{"n": 2**70, "é": "ü"}] * 600, "k": {1: "int key below the top"}}, {1: "int key", "b": [1] * 600},
    {}, [], {"messages": []},
], ids=["document", "messages", "small", "fallback-batches", "int-key-top", "empty-dict", "empty-list", "empty-messages"])
def test_dumps_sliced_writes_what_dumps_writes(value):
    assert codec.dumps_sliced(value) == codec.dumps(value)
    assert json.loads(codec.dumps_sliced(value)) == json.loads(stdlib_bytes(value))


@pytest.mark.parametrize("value", [
    big_document(messages=700), big_document(messages=3), {"messages": [{"n": 2**70, "é": "ü"}] * 600, "k": 1},
    {"messages": []}, {"a": 1}, {1: "int key", "messages": [1] * 600}, [1, 2],
], ids=["batched", "small", "fallback-batches", "empty-messages", "no-messages", "int-key-top", "list"])
def test_dumps_sliced_span_says_where_the_value_of_a_key_lies(value):
    """Bench row 9: a save compares its messages' bytes with the previous file's, so the span must be
    exactly ``dumps(value["messages"])`` inside ``dumps(value)``, or None when it is not known."""
    data, span = codec.dumps_sliced_span(value, "messages")
    assert data == codec.dumps(value)
    if isinstance(value, dict) and "messages" in value and all(type(key) is str for key in value):
        assert span is not None and data[span[0]:span[1]] == codec.dumps(value["messages"])
    else:
        assert span is None


def test_dumps_sliced_hands_the_gil_over_between_batches(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(codec, "let_others_run", lambda: calls.append("yield"))
    doc = big_document(messages=3 * codec.ARRAY_BATCH + 1)
    codec.dumps_sliced(doc)
    assert len(calls) == 4  # one per batch of messages


def test_a_big_non_ascii_document_crosses_chunk_boundaries_without_decode_errors(monkeypatch):
    """Issue 16: each element that ran past the decoded text made the C scanner raise a JSONDecodeError,
    whose constructor counts the newlines of all the text before it (a quarter of decoding a 12 MB
    session); the next chunk is now decoded READ_AHEAD before the end, so no element runs past it."""
    raised = []

    class Counted(json.JSONDecodeError):
        def __init__(self, *args):
            raised.append(args[2])
            super().__init__(*args)

    doc = big_document(messages=400)
    raw = stdlib_bytes(doc)
    monkeypatch.setattr(codec, "TEXT_CHUNK", 256 * 1024)
    assert len(raw) // codec.TEXT_CHUNK >= 6 and not raw.isascii()  # several boundaries, sliced text
    monkeypatch.setattr(json.decoder, "JSONDecodeError", Counted)  # what the C scanner raises
    assert codec.loads(raw) == doc
    assert raised == []
    # A damaged document still raises the stdlib's own error (it is decoded again whole by json.loads).
    with pytest.raises(json.JSONDecodeError) as info:
        codec.loads(raw[:-2])
    monkeypatch.undo()
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(raw[:-2])
    assert str(info.value) == str(expected.value)


def test_a_big_decode_starts_no_collector_pass_and_leaves_the_collector_as_it_was():
    """Everything a big decode makes stays alive, so the cyclic collector's passes during it can free
    nothing (bench row 13b: 150-215 ms of json.loads' ~85 ms on a tool-heavy session): ``loads`` pauses
    it. The same bytes through json.loads start many passes, so the document is big enough to tell."""
    import gc

    doc = {"schema_version": 1, "messages": [{"role": "user", "content": [{"type": "text", "text": f"m{i}"},
                                                                           {"type": "tool_use", "input": {}}]}
                                             for i in range(20000)]}  # 80,000 containers
    data = json.dumps(doc).encode()
    assert len(data) > codec.SLICE_ABOVE
    passes: list[int] = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            passes.append(info["generation"])

    assert gc.isenabled()
    thresholds = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # CPython's own (a server's start sets a higher young one: web.cli)
    gc.collect()
    gc.callbacks.append(count)
    try:
        assert json.loads(data) == doc and len(passes) > 20  # without a pause: a pass per 700 containers
        gc.collect()
        passes.clear()
        assert codec.loads(data) == doc
        assert passes in ([], [0]) and gc.isenabled()  # at most the young pass that follows the decode
        gc.disable()  # a caller's own pause is left as it was
        try:
            assert codec.loads(data) == doc and not gc.isenabled()
        finally:
            gc.enable()
        with pytest.raises(json.JSONDecodeError):
            codec.loads(data[:-5])
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*thresholds)
