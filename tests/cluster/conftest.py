"""Several hosts on one PostgreSQL, end to end (issue 15, "Proof"): real ``trio-runtime serve`` processes
on real sockets, one throwaway database per test (tests/support_pg.py), one shared auth token.

``cluster(n)`` starts ``n`` hosts ``h1..hn`` with ``--store postgresql://...``, ``--host-id`` and a short
``--lease-ttl``; each host's ``--advertise-url`` is its bound URL (the default). Every host is SIGKILLed
and reaped when the block ends, also after a failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import trio

from tests.conftest import E2E_LIMIT
from tests.e2e.process import ServerProcess
from tests.reliability.support import _drain
from tests.support_pg import PgCluster, pg_cluster
from web.client import AsyncClient

__all__ = ["pg_cluster"]

# Lease length of the test clusters (seconds): short, so a failover is quick, and long enough that a
# loaded 2-core machine still renews in time (a renewal runs every ttl/3).
LEASE_TTL = 3.0
TOKEN = "cluster-token"


@dataclasses.dataclass
class Host:
    host_id: str
    server: ServerProcess
    client: AsyncClient

    @property
    def url(self) -> str:
        assert self.server.url is not None
        return self.server.url

    @property
    def pid(self) -> int:
        assert self.server.process is not None
        return self.server.process.pid

    def log(self) -> str:
        return "".join(self.server.output)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """A ``postgresql://`` URL (the form ``--store`` takes) of a fresh database of this test alone."""
    name = pg_cluster.create_database()
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.drop_database(name)


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, store_url: str, n: int = 3, *extra: str,
                  lease_ttl: float = LEASE_TTL) -> AsyncIterator[list[Host]]:
    hosts: list[Host] = []
    servers: list[ServerProcess] = []
    try:
        async with trio.open_nursery() as nursery, contextlib.AsyncExitStack() as clients:
            for index in range(1, n + 1):
                host_id = f"h{index}"
                server = ServerProcess(tmp_path / host_id, "--store", store_url, "--host-id", host_id,
                                       "--lease-ttl", str(lease_ttl), *extra, token=TOKEN)
                servers.append(server)
                await server.start()
                nursery.start_soon(_drain, server)
                client = await clients.enter_async_context(AsyncClient(server.url, TOKEN, timeout=E2E_LIMIT))
                hosts.append(Host(host_id, server, client))
            try:
                yield hosts
            finally:
                await _reap(servers)
                nursery.cancel_scope.cancel()
    finally:
        await _reap(servers)


async def _reap(servers: list[ServerProcess]) -> None:
    """SIGKILL (a SIGSTOPped process dies of it too) and reap every host, so none outlives its test.
    Shielded so a failing or cancelled test still reaps; bounded by E2E_LIMIT."""
    with trio.CancelScope(shield=True), trio.move_on_after(E2E_LIMIT):
        for server in servers:
            server.kill()
            if server.process is not None:
                await server.process.wait()
