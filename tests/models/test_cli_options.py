"""The ``--model-*`` flags reach the OpenAI backend, and bad values are refused before anything starts."""

from __future__ import annotations

import pytest

from runtime.config import DEFAULT_APPROVAL_TIMEOUT
from web.cli import build_parser, model_factory_from_args, settings_from_args, tools_from_args

BASE = ["serve", "--model", "openai", "--model-base-url", "http://127.0.0.1:9/v1", "--model-name", "m"]


def factory_for(argv: list[str]):
    parser = build_parser()
    return model_factory_from_args(parser, parser.parse_args(argv))


def test_the_flags_configure_the_backend(monkeypatch):
    monkeypatch.delenv("TRIO_RUNTIME_MODEL_API_KEY", raising=False)
    model = factory_for(BASE + ["--model-read-timeout", "7.5", "--model-max-tokens", "64", "--model-tools", "demo"])()

    assert (model.base_url, model.model_name, model.read_timeout, model.max_tokens) == (
        "http://127.0.0.1:9/v1", "m", 7.5, 64)
    assert not hasattr(model, "tools")  # the backend has no tools of its own: the engine offers them
    assert not model.has_api_key


@pytest.mark.parametrize("argv, names", [
    (["serve"], None),
    (["serve", "--tools", "none"], None),
    (["serve", "--tools", "demo"], ["get_time", "wait", "write_note"]),
    (["serve", "--model-tools", "demo"], ["get_time", "wait", "write_note"]),  # the old name stays an alias
    (BASE + ["--tools", "demo"], ["get_time", "wait", "write_note"]),  # for the OpenAI backend alike
    (["doctor", "--model-tools", "demo"], ["get_time", "wait", "write_note"]),
])
def test_tools_come_from_the_tools_flag_for_every_backend(argv, names):
    tools = tools_from_args(build_parser().parse_args(argv))

    assert (tools.names if tools is not None else None) == names
    if tools is not None:
        assert [(t.name, t.needs_approval, t.writes) for t in map(tools.get, tools.names)] == [
            ("get_time", False, False), ("wait", True, False), ("write_note", True, True)]


def test_each_server_gets_a_registry_of_its_own():
    parser = build_parser()
    first, second = (tools_from_args(parser.parse_args(["serve", "--tools", "demo"])) for _ in range(2))
    assert first is not second


@pytest.mark.parametrize("argv, seconds", [
    ([], DEFAULT_APPROVAL_TIMEOUT), (["--approval-timeout", "2.5"], 2.5), (["--approval-timeout", "86400"], 86400.0)])
def test_the_approval_timeout_flag(argv, seconds):
    parser = build_parser()
    args = parser.parse_args(["serve", *argv])
    settings_from_args(parser, args)  # accepted

    assert DEFAULT_APPROVAL_TIMEOUT == 300.0
    assert args.approval_timeout == seconds


@pytest.mark.parametrize("value, message", [
    ("0", "--approval-timeout must be between 0.1 and 604800 seconds: got 0"),
    ("-1", "--approval-timeout must be between 0.1 and 604800 seconds: got -1"),
    ("nan", "--approval-timeout must be between 0.1 and 604800 seconds: got nan"),
    ("soon", "--approval-timeout: invalid float value: 'soon'"),
])
def test_a_bad_approval_timeout_is_refused_with_the_flag_named(capsys, value, message):
    parser = build_parser()
    with pytest.raises(SystemExit) as exited:
        settings_from_args(parser, parser.parse_args(["serve", "--approval-timeout", value]))

    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_tools_value_is_refused(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--tools", "all"])

    assert exited.value.code == 2
    assert "argument --tools/--model-tools: invalid choice: 'all'" in capsys.readouterr().err


def test_by_default_the_server_decides_the_answer_length():
    assert factory_for(BASE)().max_tokens is None


@pytest.mark.parametrize("flags, message", [
    (["--model-max-tokens", "0"], "--model-max-tokens must be between 1 and 1000000 tokens: got 0"),
    (["--model-max-tokens", "-5"], "--model-max-tokens must be between 1 and 1000000 tokens: got -5"),
    (["--model-max-tokens", "many"], "--model-max-tokens: invalid int value: 'many'"),
    (["--model-read-timeout", "0"], "--model-read-timeout must be between 0.1 and 3600 seconds: got 0"),
])
def test_bad_values_are_refused_with_the_flag_named(capsys, flags, message):
    with pytest.raises(SystemExit) as exited:
        factory_for(BASE + flags)

    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, names, seconds", [
    (["serve"], None, 300.0),
    (["serve", "--tools", "demo", "--approval-timeout", "12"], ["get_time", "wait", "write_note"], 12.0),
    (["serve", "--model", "openai", "--model-base-url", "http://127.0.0.1:9/v1", "--model-name", "m",
      "--model-tools", "demo"], ["get_time", "wait", "write_note"], 300.0),
])
def test_serve_hands_the_tools_and_the_approval_timeout_to_the_runtime(monkeypatch, tmp_path, argv, names, seconds):
    """What ``main`` builds for the Runtime, caught at ``trio.run`` (nothing is served)."""
    import web.cli as cli

    ran = []
    monkeypatch.setattr(cli.trio, "run", lambda fn, settings, config: ran.append(config))
    monkeypatch.setattr(cli.gc, "freeze", lambda: None)  # a test process must stay collectable

    assert cli.main([*argv, "--data-dir", str(tmp_path), "--port", "0"]) == 0

    [config] = ran
    assert (config.tools.names if config.tools is not None else None) == names
    assert config.approval_timeout == seconds
