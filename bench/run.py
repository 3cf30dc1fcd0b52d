"""``python -m bench.run [--quick] [--only NAME[,NAME...]]``: run the benchmarks of issue 6, print one
table and write bench/results.json. Every benchmark measures its own baseline in the same run.

Servers under load run in their own process (``trio-runtime serve`` or bench/bare_server.py); the load
generator (wrk when installed, else a Python generator on trio) is this process or wrk's. Both share
the machine's cores, as they would on any single host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from bench.cases import BENCHMARKS, Row
from bench.util import WRK, Sizes, fmt, raise_fd_limit, selected

RESULTS = Path(__file__).resolve().parent / "results.json"


def table(rows: list[Row]) -> str:
    head = ("#", "benchmark", "baseline", "ours", "unit", "ratio", "target", "result", "load generator")
    body = [(r.id, r.name, f"{fmt(r.baseline)} ({r.baseline_label})", fmt(r.ours), r.unit, f"{r.ratio:.2f}x",
             r.target_text, "PASS" if r.passed else "MISS", r.generator) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller data and shorter load runs")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args(argv)
    names = selected(parser, args.only, BENCHMARKS)
    raise_fd_limit()
    sizes = Sizes(quick=args.quick)
    print(f"trio-runtime benchmarks ({'quick' if args.quick else 'full'}); load generator: "
          f"{'wrk (' + WRK + ')' if WRK else 'python (wrk not installed)'}; {os.cpu_count()} cores; "
          "servers run in their own processes and share the cores with the load generator", flush=True)
    rows: list[Row] = []
    failures: dict[str, str] = {}
    started = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        print(f"-- {name} ...", end=" ", flush=True)
        try:
            got = BENCHMARKS[name](sizes)
        except Exception:
            failures[name] = traceback.format_exc()
            print("FAILED", flush=True)
            print(failures[name], file=sys.stderr)
            continue
        rows += got
        print(f"{time.perf_counter() - t0:.1f} s: " + "; ".join(
            f"{r.id} {fmt(r.ours)} {r.unit} vs {fmt(r.baseline)} = {r.ratio:.2f}x {'PASS' if r.passed else 'MISS'}"
            for r in got), flush=True)
    print()
    print(table(rows))
    for r in rows:
        if r.notes:
            print(f"  [{r.id}] {r.notes}")
    missed = [r.id for r in rows if not r.passed]
    print(f"\n{len(rows) - len(missed)} PASS, {len(missed)} MISS" + (f" ({', '.join(missed)})" if missed else "")
          + (f", {len(failures)} FAILED to run ({', '.join(failures)})" if failures else "")
          + f"; {time.perf_counter() - started:.0f} s")
    args.output.write_text(json.dumps({
        "quick": args.quick, "generator": "wrk" if WRK else "python", "cores": os.cpu_count(),
        "python": platform.python_version(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": [r.as_dict() for r in rows], "failed": failures,
    }, indent=2) + "\n")
    print(f"results written to {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
