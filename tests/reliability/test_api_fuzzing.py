"""API fuzzing: schemathesis (its ``st run`` command, in a subprocess) against ``/openapi.json`` of a live
server, with the bearer token supplied.

Every check schemathesis has is on: no 5xx (``not_a_server_error``), every status, content type,
header and body as documented, schema-violating requests rejected, schema-valid ones accepted (except
where docs/API.md documents a refusal that depends on state: see schemathesis.toml beside this file),
405 for undocumented methods, auth enforced, deleted resources gone. Independently of schemathesis, the
server itself counts every response it sends by status: none may be a 500.

Every operation is covered, ``GET /v1/threads/{id}/events`` included: schemathesis checks each event of
the stream against the document's ``itemSchema`` (and the JSON in its ``data`` against ``contentSchema``).
The stream never ends by design; schemathesis reads it until its request timeout, short for this one
operation (schemathesis.toml), then judges the events it got. The server counts the streams it served:
at least one must have been, or the route was not really tested.

``make test`` runs a few examples per operation; ``make reliability`` runs many, with two seeds.
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

import pytest
import trio

from tests.cancellation.harness import check_invariants
from tests.conftest import start_server
from tests.support import InFlight

from .support import AUTH, SEED, session_files, tree, unexpected_data_files

CONFIG = Path(__file__).with_name("schemathesis.toml")


class StatusCount:
    """Counts the status of every response the app sends (Quart's documented ``asgi_app`` wrapping)."""

    def __init__(self, app) -> None:
        self.statuses: collections.Counter = collections.Counter()
        self.event_streams = 0  # 200 responses with an SSE body
        self._inner = app.asgi_app
        app.asgi_app = self

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self._inner(scope, receive, send)

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.statuses[message["status"]] += 1
                headers = dict(message.get("headers", ()))
                if message["status"] == 200 and headers.get(b"content-type", b"").startswith(b"text/event-stream"):
                    self.event_streams += 1
            await send(message)

        await self._inner(scope, receive, counting_send)


async def fuzz(nursery: trio.Nursery, tmp_path: Path, *, examples: int, seed: int, limit: float) -> None:
    data_dir = tmp_path / "data"
    # A short request timeout: saves that wait for an idle engine get their (documented) 504 quickly.
    live = await start_server(nursery, data_dir, request_timeout=1.0)
    try:
        await _fuzz(live, tmp_path, examples=examples, seed=seed, limit=limit)
    finally:
        live.shutdown.set()  # a graceful stop, also when the test failed


async def _fuzz(live, tmp_path: Path, *, examples: int, seed: int, limit: float) -> None:
    data_dir = live.data_dir
    statuses = StatusCount(live.running.app)
    inflight = InFlight(live.running.app)
    workdir = tmp_path / "schemathesis"  # where st keeps its own files
    workdir.mkdir()
    outside = tree(tmp_path, skip=data_dir)  # everything but the data dir (and st's own files, below)
    args = [
        sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(CONFIG),
        "run", f"{live.url}/openapi.json", "--header", f"Authorization: {AUTH['Authorization']}",
        # All checks but "created resource not found": history control names its anchor (a turn, a session)
        # in the body, and the contract's 404 for an unknown anchor on a thread that exists is what that
        # check takes for a missing thread (see schemathesis.toml).
        "--checks", "all", "--exclude-checks", "ensure_resource_availability",
        "--max-examples", str(examples), "--seed", str(seed), "--workers", "1",
        "--request-timeout", "10", "--max-failures", "20", "--output-truncate", "false",
    ]
    with trio.fail_after(limit):
        result = await trio.run_process(args, cwd=workdir, capture_stdout=True, capture_stderr=True, check=False)
    output = (result.stdout + result.stderr).decode(errors="replace")
    summary = [line.strip() for line in output.splitlines() if re.search(r"\d+ generated|selected /", line)]
    print(f"\nschemathesis (seed {seed}, {examples} examples per operation): {'; '.join(summary)}")
    print(f"  responses by status (counted by the server): {dict(sorted(statuses.statuses.items()))}; "
          f"event streams served: {statuses.event_streams}")
    assert result.returncode == 0, f"schemathesis found problems (seed {seed}):\n{output[-20000:]}"
    assert sum(statuses.statuses.values()) > 0
    assert statuses.event_streams > 0
    assert statuses.statuses[500] == 0, f"500 responses: {statuses.statuses}"

    # Whatever the fuzzer sent: the store and the files agree, and nothing was written elsewhere.
    await inflight.settle()
    await check_invariants(live.runtime, data_dir)
    docs, temps, broken = session_files(data_dir)
    assert temps == [] and broken == []
    assert unexpected_data_files(data_dir) == []
    mine = workdir.name + "/"
    assert {k: v for k, v in tree(tmp_path, skip=data_dir).items() if not k.startswith(mine)} == outside
    print(f"  sessions saved by the fuzzer: {len(docs)}; threads: "
          f"{len(await live.runtime.list_threads(limit=500, include_archived=True))}")
    async with live.client() as client:
        assert (await client.health())["status"] == "ok"


async def test_schemathesis_finds_no_500_and_no_schema_violation(nursery, tmp_path):
    await fuzz(nursery, tmp_path, examples=10, seed=SEED, limit=120)


@pytest.mark.reliability
@pytest.mark.parametrize("seed", [SEED, SEED + 1])
async def test_reliability_schemathesis_long(nursery, tmp_path, seed):
    await fuzz(nursery, tmp_path, examples=300, seed=seed, limit=900)
