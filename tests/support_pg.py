"""A throwaway PostgreSQL cluster for the tests (issue 15): started lazily, once per pytest session, by the
first test that asks for it, and removed at the end of the session, also when tests failed.

Why this shape:
- PostgreSQL refuses to run as root, and CI runs as root: as root the cluster is created and run by the
  unprivileged ``postgres`` user of Debian's package (``runuser -u postgres --``), in a temp dir it owns.
  As any other user it runs as that user.
- Debian's binaries live in ``/usr/lib/postgresql/<ver>/bin`` (not on PATH); ``make test`` installs the
  package when it is missing (Makefile, ``test-tools``). Without them the tests that need a cluster are
  skipped with the reason, never passed.
- ``fsync`` stays on (the default; checked at start): the store's durability is tested on this cluster.
  ``initdb --no-sync`` only skips syncing initdb's own files of a cluster that is deleted at the end.
- The server listens on 127.0.0.1 on a port picked free just before the start (retried if another
  process takes it meanwhile) and on a unix socket in the temp dir.
- Every test gets a fresh database (``CREATE DATABASE ... TEMPLATE``, milliseconds), dropped after it.
- Teardown: ``pg_ctl stop -m immediate``, then the postmaster's pid is killed if it is still there, then
  the temp dir is removed. It runs from the session fixture's finalizer and, as a last resort, at
  interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The unprivileged user of Debian's postgresql package, used when the tests run as root.
PG_USER_WHEN_ROOT = "postgres"
# Start/stop timeouts for pg_ctl (seconds): generous because the suite runs on a loaded 2-core machine.
PG_CTL_TIMEOUT = 60
# A port picked free may be taken by another process before the postmaster binds it: retry this often.
START_ATTEMPTS = 3
# Server settings for a small test cluster. fsync/synchronous_commit are PostgreSQL's defaults, spelled
# out because the tests rely on them.
SERVER_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "listen_addresses": "127.0.0.1",
    "max_connections": "60",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
}
# Where the template for every test's database comes from.
TEMPLATE_DB = "template1"


class PgUnavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says why (tests skip with it)."""


def find_bin_dir() -> Path | None:
    """The directory holding initdb/pg_ctl/postgres: PG_BIN_DIR, then Debian's newest version, then PATH."""
    if os.environ.get("PG_BIN_DIR"):
        return Path(os.environ["PG_BIN_DIR"])
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if versions:
        return Path(versions[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its parent, here init) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgCluster:
    """A running throwaway cluster. ``dsn(dbname)`` is a libpq connection string over TCP on 127.0.0.1."""

    bin_dir: Path
    root: Path            # the temp dir (owned by ``os_user``); data in root/data, socket in root
    os_user: str          # the OS user the server runs as
    port: int = 0
    _db_counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _stopped: bool = False

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=10"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", self.os_user, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, cwd=self.root)

    # --- lifecycle -------------------------------------------------------------------------------------
    def init_and_start(self) -> None:
        self._run("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync", "--locale=C")
        last: subprocess.CompletedProcess | None = None
        for _ in range(START_ATTEMPTS):
            self.port = free_port()
            opts = " ".join(f"-c {k}={v}" for k, v in SERVER_SETTINGS.items())
            opts += f" -p {self.port} -k {self.root}"
            last = self._run("pg_ctl", "start", "-w", "-t", str(PG_CTL_TIMEOUT), "-D", str(self.data_dir),
                             "-l", str(self.log_file), "-o", opts, check=False)
            if last.returncode == 0:
                return
            log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
            if "could not bind" not in log and "already in use" not in log:
                break
        raise RuntimeError(f"could not start the test PostgreSQL cluster in {self.root}: pg_ctl said "
                           f"{(last.stdout + last.stderr).strip() if last else ''!r}; server log: "
                           f"{self.log_file.read_text(errors='replace')[-2000:] if self.log_file.exists() else ''}")

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the server (immediate: nothing to keep) and remove the temp dir. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        pid = self.postmaster_pid()
        if pid is not None:
            with contextlib.suppress(Exception):
                self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-t", str(PG_CTL_TIMEOUT),
                          "-D", str(self.data_dir), check=False)
            # If pg_ctl could not stop it (or timed out), the postmaster goes the hard way; its children
            # exit when it is gone (they watch the postmaster's pipe).
            if process_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + PG_CTL_TIMEOUT
                while process_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)

    # --- databases -------------------------------------------------------------------------------------
    def admin(self):
        import psycopg
        return psycopg.connect(self.dsn(), autocommit=True)

    def create_database(self) -> str:
        name = f"t{os.getpid()}_{next(self._db_counter)}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE {TEMPLATE_DB}')
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_cluster() -> PgCluster:
    """Start a cluster, or raise PgUnavailable with the reason it cannot run here (also used by bench/)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PgUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found: `make test` installs Debian's "
                    "postgresql package when it runs as root with apt-get; or set PG_BIN_DIR")
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam(PG_USER_WHEN_ROOT)
        except KeyError:
            raise PgUnavailable(f"running as root and there is no unprivileged '{PG_USER_WHEN_ROOT}' user to run "
                                "PostgreSQL as (PostgreSQL refuses root); install Debian's postgresql package") from None
        if shutil.which("runuser") is None:
            raise PgUnavailable("running as root and `runuser` is missing: cannot start PostgreSQL as an unprivileged user")
        os_user, uid, gid = PG_USER_WHEN_ROOT, entry.pw_uid, entry.pw_gid
    else:
        os_user, uid, gid = pwd.getpwuid(os.geteuid()).pw_name, os.geteuid(), os.getegid()
    root = Path(tempfile.mkdtemp(prefix="trio-runtime-pg-"))
    os.chown(root, uid, gid)
    os.chmod(root, 0o700)
    cluster = PgCluster(bin_dir=bin_dir, root=root, os_user=os_user)
    # Registered before the start so a half-started cluster is removed too.
    atexit.register(cluster.stop)
    try:
        cluster.init_and_start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """The session's cluster: started by the first test that needs it, stopped and deleted at the end."""
    try:
        cluster = start_cluster()
    except PgUnavailable as e:
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> Iterator[str]:
    """A libpq DSN of a fresh, empty database of this test alone (dropped after the test)."""
    name = pg_cluster.create_database()
    try:
        yield pg_cluster.dsn(name)
    finally:
        pg_cluster.drop_database(name)
