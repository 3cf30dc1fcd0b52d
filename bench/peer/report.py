"""The side-by-side table and JSON of ``make bench-peer`` (bench/peer/run.py measures, this module only
formats): one row per workload, LangGraph's figure, ours, and how many times better ours is.

The ratio always reads the same way whatever the unit: above 1 we are ahead (ours/peer for a rate,
peer/ours for a latency), below 1 the peer is. Kept free of I/O so tests/bench checks it without servers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.util import fmt


@dataclass
class PeerRow:
    id: str
    name: str
    unit: str
    peer: float
    ours: float
    higher_is_better: bool  # True for a rate (req/s, turns/s), False for a latency
    peer_label: str = "LangGraph"
    ours_label: str = "trio-runtime"
    generator: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """How many times better ours is than the peer's (> 1: we are ahead); nan when either is missing."""
        if not (self.peer > 0 and self.ours > 0):
            return float("nan")
        return self.ours / self.peer if self.higher_is_better else self.peer / self.ours

    @property
    def ahead(self) -> str:
        r = self.ratio
        if r != r:
            return "-"
        return "ours" if r > 1 else self.peer_label if r < 1 else "tie"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not out["extra"]:
            del out["extra"]
        ratio = self.ratio
        return {**out, "ratio": None if ratio != ratio else round(ratio, 4), "ahead": self.ahead}


def table(rows: list[PeerRow]) -> str:
    """A Markdown table (README's Performance section shows it as printed)."""
    head = ("#", "workload", "peer", "ours", "unit", "ratio (ours better by)", "ahead")
    body = [(r.id, r.name, f"{fmt(r.peer)}" + ("" if r.peer_label == "LangGraph" else f" ({r.peer_label})"),
             fmt(r.ours), r.unit, "-" if r.ratio != r.ratio else f"{r.ratio:.2f}x", r.ahead) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]

    def line(cells: tuple) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(b) for b in body)])


def results_json(rows: list[PeerRow], meta: dict[str, Any], failed: dict[str, str]) -> str:
    """bench/peer-results.json: the run's facts (``meta``), every row, and the workloads that failed."""
    return json.dumps({**meta, "rows": [r.as_dict() for r in rows], "failed": failed}, indent=2) + "\n"
