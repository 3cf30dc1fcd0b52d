"""Benchmark 13: deep validation of a 10 MB session file (issue 11, defect 6).

Every load of a session (GET, resume, PATCH, a save into an existing session whose index row is stale,
the start-up reconcile) runs ``parse_document``: ``json.loads`` plus the block-by-block check. The
baseline is ``json.loads`` alone on the same bytes, so the ratio is what validation adds. Two shapes of
about 10 MB: few large text blocks (a long chat), and ~150,000 small mixed blocks (a tool-heavy agent
session, the worst case for a per-block loop). In-process, no I/O: the bytes are already in memory.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from bench import datagen
from runtime.sessions.files import encode_document, parse_document

TARGET_MB = 10


def _document(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schema_version": 1,
            "metadata": {"id": "bench", "title": "bench", "created_at": datagen.TS, "updated_at": datagen.TS,
                         "revision": 1, "total_tokens": 0},
            "messages": messages, "system_prompt": None}


def large_blocks() -> bytes:
    """5 KB text blocks, one per message (the shape of benchmark 9)."""
    per = 5000
    messages = [{"role": "user" if i % 2 == 0 else "assistant",
                 "content": [{"type": "text", "text": datagen.text(per // 6 + 10, i)[:per]}]}
                for i in range(TARGET_MB * 1024 * 1024 // per)]
    return encode_document(_document(messages))


def small_blocks() -> bytes:
    """Pairs of a user turn (text + tool result) and an assistant turn (thinking + tool call + text)."""
    messages: list[dict[str, Any]] = []
    size, i = 0, 0
    while size < TARGET_MB * 1024 * 1024 * 0.9:
        pair = [
            {"role": "user", "content": [{"type": "text", "text": "hi there"},
                                         {"type": "tool_result", "tool_use_id": f"c{i}", "content": "ok"}]},
            {"role": "assistant", "content": [{"type": "thinking", "text": "hmm"},
                                              {"type": "tool_use", "id": f"c{i}", "name": "get_time",
                                               "input": {"a": 1}},
                                              {"type": "text", "text": "done"}]},
        ]
        messages += pair
        size += len(json.dumps(pair))
        i += 1
    return encode_document(_document(messages))


def best_ms(fns: tuple[Callable[[], Any], ...], reps: int) -> list[float]:
    """The fastest of ``reps`` runs of each function, in ms. The functions take turns, so a burst of
    load from other processes on the machine falls on both sides alike."""
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for index, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[index] = min(best[index], time.perf_counter() - t0)
    return [b * 1000 for b in best]


def bench_session_validation(sz) -> list:
    from bench.cases import Row  # bench.cases imports this module's function into BENCHMARKS

    reps = sz.pick(9, 3)
    rows = []
    # Targets: with few blocks the check is one scan of the raw bytes for surrogate escapes (~3 ms per
    # 10 MB here) on top of a fast decode, so up to 2x; with many blocks the per-block loop must stay
    # well under the decode's own per-object cost, so up to 1.5x.
    for row_id, label, data, target in (("13a", "large text blocks", large_blocks(), 2.0),
                                        ("13b", "small blocks", small_blocks(), 1.5)):
        blocks = sum(len(m["content"]) for m in json.loads(data)["messages"])
        baseline, ours = best_ms((lambda: json.loads(data), lambda: parse_document("bench", data)), reps)
        rows.append(Row(row_id, f"Validated load of a {len(data) / 1e6:.1f} MB session ({label})", "json.loads",
                        baseline, ours, "ms", target, False,
                        notes=f"{blocks:,} blocks; best of {reps}; parse_document = json.loads + deep check"))
    return rows
