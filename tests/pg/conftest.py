"""PostgreSQL fixtures (tests/support_pg.py): the cluster starts lazily, only for tests that ask for it."""

import pytest

from tests.support_pg import pg_cluster, pg_dsn

__all__ = ["pg_cluster", "pg_dsn"]  # fixtures pytest finds by name


@pytest.fixture
def pg_url(pg_cluster):
    """The URL of a fresh database of its own on the shared throwaway cluster, dropped after the test."""
    name = pg_cluster.create_database()
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.drop_database(name)
