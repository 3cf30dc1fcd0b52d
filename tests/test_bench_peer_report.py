"""bench/peer/report.py, the table and JSON of ``make bench-peer``: the ratio reads "how many times better
ours is" whatever the unit, and the JSON keeps every figure. No server, no LangGraph needed."""

from __future__ import annotations

import json
import math

from bench.peer.report import PeerRow, results_json, table


def test_ratio_is_ours_better_by_for_rates_and_latencies():
    rate = PeerRow("2a", "turns", "turns/s", peer=100.0, ours=125.0, higher_is_better=True)
    latency = PeerRow("1", "round trip", "ms", peer=1000.0, ours=12.5, higher_is_better=False)
    behind = PeerRow("4", "state", "req/s", peer=1000.0, ours=800.0, higher_is_better=True)
    assert (rate.ratio, rate.ahead) == (1.25, "ours")
    assert (latency.ratio, latency.ahead) == (80.0, "ours")
    assert (behind.ratio, behind.ahead) == (0.8, "LangGraph")
    baseline = PeerRow("F2", "floor", "req/s", 1000.0, 1000.0, True, peer_label="bare quart-trio")
    assert (baseline.ratio, baseline.ahead) == (1.0, "tie")


def test_a_missing_figure_has_no_ratio():
    row = PeerRow("3b", "create", "req/s", peer=0.0, ours=500.0, higher_is_better=True)
    assert math.isnan(row.ratio) and row.ahead == "-"
    assert row.as_dict()["ratio"] is None


def test_table_lines_and_cells():
    rows = [PeerRow("1", "round trip", "ms", 1006.0, 11.4, False),
            PeerRow("F2", "floor", "req/s", 1500.0, 1270.0, True, peer_label="bare quart-trio")]
    lines = table(rows).splitlines()
    assert len(lines) == 4
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "#", "workload", "peer", "ours", "unit", "ratio (ours better by)", "ahead"]
    assert [c.strip() for c in lines[2].strip("|").split("|")] == ["1", "round trip", "1,006", "11.4", "ms", "88.25x", "ours"]
    assert [c.strip() for c in lines[3].strip("|").split("|")] == [
        "F2", "floor", "1,500 (bare quart-trio)", "1,270", "req/s", "0.85x", "bare quart-trio"]
    assert len({len(line) for line in lines}) == 1  # every column padded to one width


def test_results_json_keeps_meta_rows_and_failures():
    rows = [PeerRow("3a", "create", "req/s", 610.0, 1177.0, True, notes="p50 80 vs 40 ms", extra={"fill_s": 12})]
    doc = json.loads(results_json(rows, {"cores": 2, "generator": "wrk"}, {"state": "Traceback ..."}))
    assert doc["cores"] == 2 and doc["generator"] == "wrk"
    assert doc["failed"] == {"state": "Traceback ..."}
    (row,) = doc["rows"]
    assert row == {"id": "3a", "name": "create", "unit": "req/s", "peer": 610.0, "ours": 1177.0,
                   "higher_is_better": True, "peer_label": "LangGraph", "ours_label": "trio-runtime",
                   "generator": "", "notes": "p50 80 vs 40 ms", "extra": {"fill_s": 12}, "ratio": 1.9295,
                   "ahead": "ours"}
