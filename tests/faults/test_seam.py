"""The fault seam itself behaves like a failing disk (so the suites built on it prove something)."""

from __future__ import annotations

import errno
import sqlite3

import pytest

from .seam import FaultPlan


def test_a_commit_fault_rolls_the_transaction_back_like_sqlite(tmp_path):
    plan = FaultPlan()
    conn = sqlite3.connect(tmp_path / "db", isolation_level=None, factory=plan.connection_factory())
    conn.execute("CREATE TABLE t (x)")
    plan.arm(fail_at=3, kind="sqlite_full")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full") as info:
        conn.execute("COMMIT")
    assert info.value.sqlite_errorcode == sqlite3.SQLITE_FULL
    assert plan.fired == "sqlite:COMMIT" and plan.log == ["sqlite:BEGIN", "sqlite:INSERT", "sqlite:COMMIT"]
    assert not conn.in_transaction
    with pytest.raises(sqlite3.OperationalError, match="no transaction is active"):
        conn.execute("ROLLBACK")  # exactly what the writer met in production
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0


def test_a_statement_fault_keeps_the_transaction_unless_asked_to_roll_back(tmp_path):
    plan = FaultPlan()
    conn = sqlite3.connect(tmp_path / "db", isolation_level=None, factory=plan.connection_factory())
    conn.execute("CREATE TABLE t (x)")
    plan.arm(fail_at=2, kind="sqlite_ioerr")
    conn.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        conn.execute("INSERT INTO t VALUES (1)")
    assert conn.in_transaction
    conn.execute("ROLLBACK")
    plan.arm(fail_at=2, kind="sqlite_full", rollback=True)
    conn.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("INSERT INTO t VALUES (1)")
    assert not conn.in_transaction


def test_reader_connections_are_not_counted(tmp_path):
    plan = FaultPlan()
    conn = sqlite3.connect(tmp_path / "db", isolation_level=None, factory=plan.connection_factory())
    plan.arm(fail_at=1)
    conn.execute("SELECT 1")
    assert plan.count == 0 and plan.fired is None


@pytest.mark.parametrize(("kind", "code"), [("enospc", errno.ENOSPC), ("eio", errno.EIO), ("erofs", errno.EROFS)])
def test_file_faults_fail_the_kth_file_operation(tmp_path, kind, code):
    plan = FaultPlan()
    fs = plan.file_system()
    target = tmp_path / "s.json"
    plan.arm(fail_at=None, kind=kind)
    tmp = fs.stage(target, b"{}")
    fs.publish(tmp, target)
    assert plan.log == ["file:write_data", "file:fsync_file", "file:replace", "file:fsync_dir"]
    plan.arm(fail_at=2, kind=kind)
    with pytest.raises(OSError) as info:
        fs.stage(target, b"{}")
    assert info.value.errno == code and plan.fired == "file:fsync_file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]  # the temp file was discarded
