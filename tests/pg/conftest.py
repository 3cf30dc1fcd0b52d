"""PostgreSQL fixtures (tests/support_pg.py): the cluster starts lazily, only for tests that ask for it."""

from tests.support_pg import pg_cluster, pg_dsn

__all__ = ["pg_cluster", "pg_dsn"]  # fixtures pytest finds by name
