"""Fixtures for the runtime core tests (MockClock handling: see tests/support.py).

The store suite runs on both backends (issue 15): in the modules of BOTH_BACKENDS every test that opens a
Runtime runs twice, ``store_backend`` "sqlite" and "postgresql" (a fresh database of the throwaway cluster,
tests/support_pg.py; skipped with the reason where PostgreSQL cannot run). Elsewhere the backend is SQLite,
or the one TRIO_TEST_STORE names (``TRIO_TEST_STORE=postgresql pytest tests/runtime`` runs everything on
PostgreSQL once). A test that uses an SQLite-only seam marks itself ``sqlite_only`` with the reason."""

from __future__ import annotations

import os
from typing import AsyncIterator

import pytest

from runtime import Runtime
from tests import support
from tests.support_pg import pg_cluster  # noqa: F401  (a fixture pytest finds by name)

# The store suite: these modules run on both backends in `make test`.
BOTH_BACKENDS = {
    "test_store_durability", "test_store_snapshot", "test_turns", "test_history", "test_idempotency",
    "test_approvals", "test_event_bus", "test_boundary_state",
}
# The whole-suite switch (see the module docstring).
STORE_ENV = "TRIO_TEST_STORE"


def pytest_generate_tests(metafunc):
    if "store_backend" in metafunc.fixturenames and metafunc.module.__name__.rsplit(".", 1)[-1] in BOTH_BACKENDS:
        metafunc.parametrize("store_backend", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def store_backend(request) -> str:
    backend = getattr(request, "param", None) or os.environ.get(STORE_ENV, "sqlite")
    marker = request.node.get_closest_marker("sqlite_only")
    if backend == "postgresql" and marker is not None:
        pytest.skip(f"SQLite only: {marker.kwargs.get('reason') or (marker.args[0] if marker.args else '')}")
    return backend


@pytest.fixture
def store_url(store_backend, request) -> str | None:
    """None for SQLite; for PostgreSQL the URL of a fresh database of this test alone (dropped after it)."""
    if store_backend != "postgresql":
        yield None
        return
    cluster = request.getfixturevalue("pg_cluster")
    name = cluster.create_database()
    try:
        yield cluster.url(name)
    finally:
        cluster.drop_database(name)


@pytest.fixture
def open_runtime(tmp_path, store_url):
    """``async with open_runtime(**config_overrides) as rt`` opens a Runtime on ``tmp_path`` (or on the
    ``data_dir`` override), on the test's store backend."""

    def opener(**overrides):
        overrides.setdefault("store_url", store_url)
        return support.open_runtime(overrides.pop("data_dir", tmp_path), **overrides)

    return opener


@pytest.fixture
async def rt(open_runtime) -> AsyncIterator[Runtime]:
    async with open_runtime() as runtime:
        yield runtime


@pytest.fixture
async def thread_id(rt: Runtime) -> str:
    return (await rt.create_thread())["id"]
