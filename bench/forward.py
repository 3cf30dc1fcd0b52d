"""Row fwd1 (issue 15): a request forwarded by a host that does not own the thread, against the same request
sent straight to the owner. Two ``trio-runtime serve`` processes on one PostgreSQL (the tests' throwaway
cluster, tests/support_pg.py); host h1 owns the thread; each sample is ``PATCH /v1/threads/{id}`` (an engine
op and one store commit: the kind of request that is forwarded), alternately direct to h1 and through h2,
one keep-alive client per target, sequential. ``python -m bench.forward [N]`` prints the two p50s.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.util import HOST, TOKEN, ours  # noqa: E402
from tests.support_pg import PgUnavailable, start_cluster  # noqa: E402

# Lease ttl of the two hosts: the default; nothing expires during the run.
LEASE_TTL = "10"
WARMUP = 20


def measure(n: int) -> dict[str, list[float]]:
    cluster = start_cluster()
    try:
        url = cluster.url(cluster.create_database())
        with tempfile.TemporaryDirectory() as tmp:
            one = ours(Path(tmp) / "h1", "--store", url, "--host-id", "h1", "--lease-ttl", LEASE_TTL).start()
            try:
                two = ours(Path(tmp) / "h2", "--store", url, "--host-id", "h2", "--lease-ttl", LEASE_TTL).start()
                try:
                    return _run(f"http://{HOST}:{one.port}", f"http://{HOST}:{two.port}", n)
                finally:
                    two.stop()
            finally:
                one.stop()
    finally:
        cluster.stop()


def _run(owner: str, other: str, n: int) -> dict[str, list[float]]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(headers=headers, timeout=30) as direct, httpx.Client(headers=headers, timeout=30) as forwarded:
        tid = direct.post(f"{owner}/v1/threads", json={"title": "bench"}).json()["id"]
        direct.patch(f"{owner}/v1/threads/{tid}", json={"title": "owned"}).raise_for_status()  # h1 takes the lease
        out: dict[str, list[float]] = {"direct": [], "forwarded": []}
        for i in range(n + WARMUP):
            for name, client, base in (("direct", direct, owner), ("forwarded", forwarded, other)):
                t0 = time.perf_counter()
                response = client.patch(f"{base}/v1/threads/{tid}", json={"title": f"t{i}"})
                took = time.perf_counter() - t0
                response.raise_for_status()
                if i >= WARMUP:
                    out[name].append(took)
        owner_id = direct.get(f"{owner}/v1/threads/{tid}").json()["thread"]["owner"]["host_id"]
        assert owner_id == "h1", f"h1 must own the thread throughout, found {owner_id}"
    return out


def p50_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def bench_forward(sz) -> list:
    from bench.cases import Row

    n = sz.pick(300, 60)
    try:
        got = measure(n)
    except PgUnavailable as e:
        raise RuntimeError(f"no PostgreSQL for the forward row: {e}") from None
    d, f = got["direct"], got["forwarded"]
    p99 = lambda v: sorted(v)[int(len(v) * 0.99) - 1] * 1000  # noqa: E731
    return [Row("fwd1", "forwarded PATCH thread p50 (non-owner -> owner)", "direct to the owner", p50_ms(d),
                p50_ms(f), "ms", 1.5, False, generator="python (httpx, sequential)",
                notes=f"p99 {p99(f):.2f} vs {p99(d):.2f} ms; n={n}; two serve processes on one PostgreSQL")]


def main(argv: list[str]) -> int:
    got = measure(int(argv[0]) if argv else 200)
    print(f"direct p50 {p50_ms(got['direct']):.2f} ms | forwarded p50 {p50_ms(got['forwarded']):.2f} ms | "
          f"ratio {p50_ms(got['forwarded']) / p50_ms(got['direct']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
