"""PostgreSQL fixtures (tests/support_pg.py): the cluster starts lazily, only for tests that ask for it."""

from tests.support_pg import pg_cluster, pg_dsn  # noqa: F401  (fixtures)
