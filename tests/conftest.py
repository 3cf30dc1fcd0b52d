"""Shared fixtures. Test policy: anything timed runs on trio's MockClock (``autojump_clock``); the
end-to-end tests use a real server on a real loopback socket (real clock), with a hard ``fail_after``
on every wait so a bug fails the test instead of hanging the suite."""

from __future__ import annotations

import dataclasses
import gc
from functools import partial
from pathlib import Path

import pytest
import trio

from runtime import RuntimeConfig
from web.cli import RunningServer, run_server
from web.client import AsyncClient
from web.settings import ServerSettings

from tests import support
from tests.support import E2E_LIMIT

__all__ = ["E2E_LIMIT", "LiveServer", "start_server"]


@pytest.fixture(autouse=True)
def keep_gc_thresholds():
    """Every test leaves the collector's thresholds as it found them. ``web.cli.main`` sets them for the
    process it runs in (``tune_gc``: a young threshold of 10,000), which in a test is pytest's; a test that
    ran ``main`` left that to every later test (tests/models/test_cli_options.py did), and a check that
    counts collector passes then saw far fewer."""
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


@dataclasses.dataclass
class LiveServer:
    running: RunningServer
    data_dir: Path
    shutdown: trio.Event

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def token(self) -> str | None:
        return self.running.token

    @property
    def runtime(self):
        return self.running.runtime

    def client(self, token: str | None | bool = True) -> AsyncClient:
        return AsyncClient(self.url, self.token if token is True else (token or None))


async def start_server(nursery: trio.Nursery, data_dir: Path, **settings_overrides) -> LiveServer:
    settings = ServerSettings(**{"host": "127.0.0.1", "port": 0, "data_dir": data_dir, "auth_token": "test-token",
                                 **settings_overrides})
    shutdown = trio.Event()
    config = RuntimeConfig(data_dir=data_dir, session_storage=support.SESSION_STORAGE,
                           store_url=support.store_url_for(data_dir))
    running = await nursery.start(partial(run_server, settings, config,
                                          shutdown=shutdown))
    return LiveServer(running, data_dir, shutdown)


def pytest_collection_modifyitems(config, items):
    """In a whole-suite run on PostgreSQL (TRIO_TEST_STORE=postgresql) a test marked ``sqlite_only`` is
    skipped with its reason (an SQLite seam: trace callbacks, the database file itself), never run weakened."""
    if not support.on_postgresql():
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("store_backend") == "sqlite":
            continue  # the SQLite half of a both-backends test (tests/runtime/conftest.py) runs on SQLite
        marker = item.get_closest_marker("sqlite_only")
        if marker is not None:
            reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
            item.add_marker(pytest.mark.skip(reason=f"SQLite only: {reason}"))


@pytest.fixture
async def server(nursery, tmp_path):
    live = await start_server(nursery, tmp_path / "data")
    yield live
    live.shutdown.set()


@pytest.fixture
async def client(server):
    async with server.client() as c:
        yield c
