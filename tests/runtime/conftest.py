"""Fixtures for the runtime core tests (MockClock handling: see tests/support.py)."""

from __future__ import annotations

from typing import AsyncIterator

import pytest

from runtime import Runtime
from tests import support


@pytest.fixture
def open_runtime(tmp_path):
    """``async with open_runtime(**config_overrides) as rt`` opens a Runtime on ``tmp_path`` (or on the
    ``data_dir`` override)."""

    def opener(**overrides):
        return support.open_runtime(overrides.pop("data_dir", tmp_path), **overrides)

    return opener


@pytest.fixture
async def rt(open_runtime) -> AsyncIterator[Runtime]:
    async with open_runtime() as runtime:
        yield runtime


@pytest.fixture
async def thread_id(rt: Runtime) -> str:
    return (await rt.create_thread())["id"]
