"""Events are on disk before anyone sees them (issue 11, suspected: with ``synchronous=NORMAL`` an OS
crash could lose commits whose events were already sent over SSE, and their seq would be reused).

In WAL mode SQLite's ``synchronous=NORMAL`` syncs the WAL only at checkpoints: a commit survives a
process crash but not an OS crash or power loss, yet the store publishes a batch's events as soon as
COMMIT returns. ``FULL`` syncs the WAL in every COMMIT, so "published" implies "durable" and a seq a
client has seen is never handed out again. Two checks: the writer connection's setting (always), and
the real order of system calls, traced with strace: every publish comes after an fdatasync of the WAL
that followed the previous publish.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from tests.support import E2E_LIMIT

# SQLite's numbering of ``PRAGMA synchronous`` (https://sqlite.org/pragma.html#pragma_synchronous).
SYNCHRONOUS_FULL = 2
PUBLISHES = 4


async def test_the_store_writer_commits_with_synchronous_full(rt):
    setting, _ = await rt.store.write(fn=lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])

    assert setting == SYNCHRONOUS_FULL


CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import trio
    from runtime.store import EventDraft, Store

    def publish(events):
        for event in events:
            os.write(1, f"published {{event.seq}}\\n".encode())

    async def main(path):
        async with Store.open(Path(path), publish) as store:
            await store.write(statements=[("INSERT INTO threads (id, created_at, updated_at, model, mode)"
                                           " VALUES ('thr_x', 't', 't', 'm', 'default')", ())])
            os.write(1, b"begin\\n")
            for index in range({count}):
                await store.write(events=[EventDraft("thr_x", "item.delta", {{"delta": str(index)}})])

    trio.run(main, sys.argv[1])
""")


def strace_usable() -> bool:
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-o", "/dev/null", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not strace_usable(), reason="strace is not installed or ptrace is not permitted here")
async def test_every_event_is_synced_to_the_wal_before_it_is_published(tmp_path: Path):
    trace = tmp_path / "strace.log"
    db = tmp_path / "runtime.sqlite3"
    with trio.fail_after(E2E_LIMIT):
        result = await trio.run_process(
            ["strace", "-f", "-y", "-e", "trace=fsync,fdatasync,write", "-o", str(trace),
             sys.executable, "-c", CHILD.format(count=PUBLISHES), str(db)],
            capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.decode().split("\n")[1:-1] == [f"published {seq}" for seq in range(1, PUBLISHES + 1)]

    # The calls that matter, in the order the kernel saw them (all threads): WAL syncs and publishes.
    steps = []
    for line in trace.read_text().splitlines():
        if re.search(r"f(data)?sync\(\d+<[^>]*runtime\.sqlite3-wal>\)\s+= 0", line):
            steps.append("sync")
        elif (found := re.search(r'write\(1<[^>]*>, "(published \d+|begin)\\n"', line)):
            steps.append(found.group(1))
    steps = steps[steps.index("begin") + 1:]
    publishes = [s for s in steps if s != "sync"]
    assert publishes == [f"published {seq}" for seq in range(1, PUBLISHES + 1)]
    # Between two publishes (and before the first) the WAL was synced: each publish followed a durable commit.
    assert steps[0] == "sync", steps
    for before, after in zip(steps, steps[1:]):
        assert not (before.startswith("published") and after.startswith("published")), steps
