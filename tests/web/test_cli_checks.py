"""``trio-runtime serve`` refuses bad settings before anything starts: blank tokens (issue 11, defect 3),
with exit 2 and a message naming the flag or variable and what it accepts. ``main`` runs in-process with ``serve`` replaced, so an accepted setting is
seen as the ServerSettings it produced, and a setting that should have been refused fails the test
instead of starting a server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio

from runtime import Runtime, RuntimeConfig
from tests.support import E2E_LIMIT
from web import cli
from web.app import create_app
from web.auth import TOKEN_FILE, load_or_create_token
from web.settings import ServerSettings

ENV = ("TRIO_RUNTIME_TOKEN", "TRIO_RUNTIME_REQUEST_TIMEOUT", "TRIO_RUNTIME_DATA_DIR")


@pytest.fixture
def started(monkeypatch, tmp_path):
    """Runs ``main`` with the server replaced; returns the ServerSettings it would have served with."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    seen: list[ServerSettings] = []

    async def fake_serve(settings, runtime_config):
        seen.append(settings)

    monkeypatch.setattr(cli, "serve", fake_serve)

    def run(*flags: str) -> ServerSettings:
        assert cli.main(["serve", "--data-dir", str(tmp_path), *flags]) == 0
        assert len(seen) == 1
        return seen.pop()

    return run


def refused(started, capsys, *flags: str) -> str:
    with pytest.raises(SystemExit) as exited:
        started(*flags)
    assert exited.value.code == 2
    return capsys.readouterr().err


# ---- tokens -------------------------------------------------------------------------------------


@pytest.mark.parametrize("token, problem", [("", "is empty"), ("   ", "is only whitespace"), ("\t\n", "is only whitespace"),
                                            (" tok", "starts or ends with whitespace")])
def test_a_blank_auth_token_flag_is_refused(started, capsys, token, problem):
    err = refused(started, capsys, "--auth-token", token)
    assert f"error: --auth-token {problem}. Give a real token" in err


@pytest.mark.parametrize("token, problem", [("", "is empty"), ("  ", "is only whitespace")])
def test_a_blank_token_variable_is_refused_not_read_as_unset(started, capsys, monkeypatch, token, problem):
    monkeypatch.setenv("TRIO_RUNTIME_TOKEN", token)
    err = refused(started, capsys)
    assert f"error: TRIO_RUNTIME_TOKEN {problem}. Give a real token, or leave TRIO_RUNTIME_TOKEN unset" in err


def test_tokens_from_the_flag_the_variable_or_nowhere(started, monkeypatch):
    assert started().auth_token is None  # generated at start
    assert started("--auth-token", "flag-token").auth_token == "flag-token"
    monkeypatch.setenv("TRIO_RUNTIME_TOKEN", "env-token")
    assert started().auth_token == "env-token"
    assert started("--auth-token", "flag-token").auth_token == "flag-token"  # the flag wins


def test_an_empty_token_is_refused_by_the_real_process(tmp_path):
    """The defect as reported: ``--auth-token ""`` served with auth off (``?token=`` was accepted)."""
    args = [sys.executable, "-m", "web.cli", "serve", "--port", "0", "--data-dir", str(tmp_path), "--auth-token", ""]

    async def run() -> subprocess.CompletedProcess:
        with trio.fail_after(E2E_LIMIT):  # a server that started would never exit by itself
            return await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False,
                                          env={k: v for k, v in os.environ.items() if k not in ENV})

    result = trio.run(run)
    assert result.returncode == 2
    assert b"--auth-token is empty" in result.stderr and b"listening" not in result.stdout
    assert list(tmp_path.iterdir()) == []  # refused before anything was created


async def test_the_app_refuses_a_blank_token_whoever_calls_it(tmp_path):
    async with Runtime.open(RuntimeConfig(data_dir=tmp_path)) as runtime:
        for token in ("", "  "):
            with pytest.raises(ValueError, match="refusing to serve with this auth token"):
                create_app(runtime, ServerSettings(data_dir=tmp_path, auth_token=token), token)


def test_a_blank_token_file_is_replaced_by_a_new_token(tmp_path):
    path = tmp_path / TOKEN_FILE
    path.write_text("  \n")
    token, created = load_or_create_token(tmp_path)
    assert created is True and len(token) >= 32 and token.strip() == token
    assert path.read_text() == token + "\n" and path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_token(tmp_path) == (token, False)
