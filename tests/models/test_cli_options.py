"""The ``--model-*`` flags reach the OpenAI backend, and bad values are refused before anything starts."""

from __future__ import annotations

import pytest

from web.cli import build_parser, model_factory_from_args

BASE = ["serve", "--model", "openai", "--model-base-url", "http://127.0.0.1:9/v1", "--model-name", "m"]


def factory_for(argv: list[str]):
    parser = build_parser()
    return model_factory_from_args(parser, parser.parse_args(argv))


def test_the_flags_configure_the_backend(monkeypatch):
    monkeypatch.delenv("TRIO_RUNTIME_MODEL_API_KEY", raising=False)
    model = factory_for(BASE + ["--model-read-timeout", "7.5", "--model-max-tokens", "64", "--model-tools", "demo"])()

    assert (model.base_url, model.model_name, model.read_timeout, model.max_tokens) == (
        "http://127.0.0.1:9/v1", "m", 7.5, 64)
    assert model.tools.names == ["get_time"]
    assert not model.has_api_key


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
