"""``trio-runtime doctor --model-max-tokens N`` (issue 11: the flag was accepted and ignored).

With N given, the doctor asks the server for one streamed completion with ``max_tokens: N`` (the body
`serve` would send, minus the conversation) and reads only the status line: a server that refuses the
limit (too large for the context window, or a model that wants ``max_completion_tokens``) is named with
the fix, and nothing is generated beyond the first bytes. Without N, nothing but ``GET /models`` is sent.
"""

from __future__ import annotations

import io

import pytest
import trio

from web.cli import main
from web.doctor import diagnose, run_doctor

from .conftest import API_KEY, LIMIT
from .fake_openai import Reply, Stall, error_reply, text_reply


async def checks_with_limit(fake, max_tokens):
    with trio.fail_after(LIMIT):
        return await diagnose(fake.base_url, "fake-model", API_KEY, timeout=5.0, max_tokens=max_tokens)


async def test_the_cli_flag_reaches_the_check_request(fake, monkeypatch, capsys):
    fake.queue(text_reply("OK"))
    monkeypatch.setenv("TRIO_RUNTIME_MODEL_API_KEY", API_KEY)
    argv = ["doctor", "--model", "openai", "--model-base-url", fake.base_url, "--model-name", "fake-model",
            "--model-max-tokens", "64", "--timeout", "5"]

    with trio.fail_after(LIMIT):
        code = await trio.to_thread.run_sync(main, argv)

    assert code == 0
    [chat] = fake.chat_requests
    assert chat.body["max_tokens"] == 64
    assert (chat.body["model"], chat.body["stream"]) == ("fake-model", True)
    assert chat.headers["authorization"] == f"Bearer {API_KEY}"
    out = capsys.readouterr().out
    assert "ok    max_tokens: the server accepts max_tokens 64 for 'fake-model'" in out
    assert out.endswith("All checks passed.\n") and API_KEY not in out


async def test_a_limit_the_server_refuses_is_named_with_the_fix(fake):
    fake.queue(error_reply(400, f"max_tokens must be at most 2048 for this model (key {API_KEY})"))

    checks = await checks_with_limit(fake, 100_000)

    assert [(c.name, c.ok) for c in checks][-2:] == [("model listed", True), ("max_tokens", False)]
    assert checks[-1].message == (
        f"POST {fake.base_url}/chat/completions with max_tokens 100000 answered HTTP 400"
        " (max_tokens must be at most 2048 for this model (key ***)); lower --model-max-tokens,"
        " or leave it unset to use the server's own limit")


async def test_the_check_reads_no_answer_beyond_the_status(fake):
    fake.queue(Reply(steps=[Stall()]))  # a server that would keep generating: the doctor must not wait

    checks = await checks_with_limit(fake, 8)

    assert checks[-1].name == "max_tokens" and checks[-1].ok
    with trio.fail_after(LIMIT):
        await fake.disconnected.wait()  # the doctor closed the stream at once


async def test_without_a_limit_only_the_model_list_is_asked_for(fake):
    checks = await checks_with_limit(fake, None)

    assert [c.name for c in checks][-1] == "model listed"
    assert [r.path for r in fake.requests] == ["/v1/models"]


async def test_no_completion_is_asked_for_when_the_model_is_not_listed(fake):
    fake.models = ["other"]

    checks = await checks_with_limit(fake, 64)

    assert [c.name for c in checks if not c.ok] == ["model listed"]
    assert fake.chat_requests == []


def test_a_limit_below_one_is_refused_before_anything_is_asked(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["doctor", "--model", "openai", "--model-base-url", "http://127.0.0.1:9/v1", "--model-name", "m",
              "--model-max-tokens", "0"])
    assert exit_.value.code == 2
    assert "--model-max-tokens must be between 1 and 1000000 tokens: got 0" in capsys.readouterr().err


def test_the_scripted_backend_says_it_has_no_limit_to_check():
    out = io.StringIO()
    assert run_doctor(model="scripted", max_tokens=64, out=out) == 0
    assert "--model-max-tokens 64 does not apply to it" in out.getvalue()
