"""The test cluster fixture itself (tests/support_pg.py): who runs the server, its settings, a DSN that
connects, one fresh database per test, and nothing left behind after the session, also when a test failed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg

from tests.support_pg import PgCluster, process_alive

REPO = Path(__file__).resolve().parents[2]


def proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def test_server_runs_unprivileged_with_fsync_on(pg_cluster: PgCluster, pg_dsn: str):
    pid = pg_cluster.postmaster_pid()
    assert pid is not None
    uid = proc_uid(pid)
    assert uid != 0, "PostgreSQL must not run as root"
    assert uid == os.stat(pg_cluster.root).st_uid, "the temp dir belongs to the server's user"
    assert os.stat(pg_cluster.root).st_mode & 0o777 == 0o700
    assert pg_cluster.data_dir.is_dir() and (pg_cluster.data_dir / "PG_VERSION").is_file()
    with psycopg.connect(pg_dsn) as conn:
        settings = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', "
            "'listen_addresses', 'port')").fetchall())
        backend_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        # Read while the connection is open: its backend exits when it closes.
        backend_uid = proc_uid(backend_pid)
    assert settings == {"fsync": "on", "synchronous_commit": "on", "listen_addresses": "127.0.0.1",
                        "port": str(pg_cluster.port)}
    assert backend_uid == uid


def test_dsn_connects_to_a_fresh_database(pg_cluster: PgCluster, pg_dsn: str):
    with psycopg.connect(pg_dsn) as conn:
        db = conn.execute("SELECT current_database()").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
        assert conn.execute("SELECT id FROM t").fetchall() == [(1,)]
    assert pg_dsn.endswith(f"dbname={db} connect_timeout=10") or f"dbname={db} " in pg_dsn
    assert db.startswith("t") and db != "postgres"
    assert tables == 0
    # The URL form names the same server.
    with psycopg.connect(pg_cluster.url(db)) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 1


INNER_TESTS = '''
import os
from pathlib import Path

import psycopg

SEEN = Path(os.environ["PG_FIXTURE_PROBE"])


def test_a_writes(pg_cluster, pg_dsn):
    SEEN.joinpath("root").write_text(str(pg_cluster.root))
    SEEN.joinpath("pid").write_text(str(pg_cluster.postmaster_pid()))
    with psycopg.connect(pg_dsn) as conn:
        SEEN.joinpath("db_a").write_text(conn.execute("SELECT current_database()").fetchone()[0])
        conn.execute("CREATE TABLE marker (v text)")
        conn.execute("INSERT INTO marker VALUES ('a')")


def test_b_is_isolated(pg_cluster, pg_dsn):
    with psycopg.connect(pg_dsn) as conn:
        db = conn.execute("SELECT current_database()").fetchone()[0]
        assert db != SEEN.joinpath("db_a").read_text()
        assert conn.execute("SELECT to_regclass('public.marker')").fetchone()[0] is None
    SEEN.joinpath("db_b").write_text(db)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        names = {r[0] for r in admin.execute("SELECT datname FROM pg_database").fetchall()}
    SEEN.joinpath("dbs_during_b").write_text(" ".join(sorted(names)))


def test_c_fails(pg_dsn):
    assert False, "deliberate failure: teardown must still remove the cluster"
'''


def test_isolation_and_teardown_in_a_subprocess_session(tmp_path: Path):
    """A pytest session of its own: two tests' databases are isolated, a failing test does not keep the
    cluster alive, and afterwards neither the postmaster nor its temp dir is left."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text("from tests.support_pg import pg_cluster, pg_dsn  # noqa: F401\n")
    (suite / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    probe = tmp_path / "probe"
    probe.mkdir()
    env = {**os.environ, "PG_FIXTURE_PROBE": str(probe), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           "--rootdir", str(suite), str(suite)],
                          cwd=suite, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "1 failed, 2 passed" in out, out
    assert "deliberate failure" in out
    root = Path((probe / "root").read_text())
    pid = int((probe / "pid").read_text())
    db_a, db_b = (probe / "db_a").read_text(), (probe / "db_b").read_text()
    assert db_a != db_b
    # test_a's database was dropped after test_a; test_b's exists during test_b.
    during_b = (probe / "dbs_during_b").read_text().split()
    assert db_b in during_b and db_a not in during_b
    assert not root.exists(), f"the cluster's temp dir {root} was left behind"
    assert not process_alive(pid), f"the postmaster (pid {pid}) was left running"
    leftovers = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(root).encode() in (proc / "cmdline").read_bytes() \
                    and process_alive(int(proc.name)):
                leftovers.append(proc.name)
        except OSError:
            continue
    assert leftovers == [], f"processes started with {root} are still running: {leftovers}"
