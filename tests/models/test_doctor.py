"""``trio-runtime doctor`` against the fake server: each problem is named with its fix, exit code 0/1."""

from __future__ import annotations

import io
import socket

import trio

from web.doctor import API_KEY_ENV, Check, diagnose, format_report, run_doctor

from .conftest import API_KEY, LIMIT
from .fake_openai import Reply, error_reply


async def checks_for(fake, model_name="fake-model", api_key=API_KEY, base_url=None) -> list[Check]:
    with trio.fail_after(LIMIT):
        return await diagnose(base_url or fake.base_url, model_name, api_key, timeout=5.0)


def failed(checks: list[Check]) -> list[tuple[str, str]]:
    return [(c.name, c.message) for c in checks if not c.ok]


async def test_a_healthy_backend_passes_every_check(fake):
    checks = await checks_for(fake)

    assert [(c.name, c.ok) for c in checks] == [
        ("configuration", True), ("server reachable", True), ("API key", True), ("OpenAI-compatible API", True),
        ("model listed", True)]
    [request] = fake.requests
    assert (request.method, request.path) == ("GET", "/v1/models")
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    report = format_report("openai", checks)
    assert report.endswith("All checks passed.") and API_KEY not in report


async def test_a_model_that_is_not_served_is_named_with_what_is(fake):
    fake.models = ["gemma-3-270m", "qwen"]

    checks = await checks_for(fake, model_name="llama")

    assert failed(checks) == [("model listed", f"'llama' is not served at {fake.base_url}; it serves 'gemma-3-270m',"
                                                " 'qwen'. Pass one of those with --model-name (a llama.cpp server"
                                                " lists its model under its alias or file name)")]
    assert format_report("openai", checks).endswith("1 problem found.")


async def test_a_rejected_key_names_the_environment_variable(fake):
    fake.models_reply = error_reply(401, f"Incorrect API key provided: {API_KEY}")

    checks = await checks_for(fake)

    assert failed(checks) == [("API key", "rejected with HTTP 401 (Incorrect API key provided: ***);"
                                          f" check the key in {API_KEY_ENV}")]


async def test_a_missing_key_says_to_set_one(fake):
    fake.models_reply = error_reply(401, "You didn't provide an API key")

    checks = await checks_for(fake, api_key=None)

    assert failed(checks)[0][1].endswith(f"the server needs one: set {API_KEY_ENV}")


async def test_a_base_url_without_v1_is_diagnosed_from_the_404(fake):
    checks = await checks_for(fake, base_url=fake.base_url.removesuffix("/v1"))

    [(name, message)] = failed(checks)
    assert name == "OpenAI-compatible API"
    assert "answered HTTP 404" in message and "usually ends in /v1" in message


async def test_an_answer_that_is_not_a_model_list_is_called_out(fake):
    fake.models_reply = Reply(body={"hello": "world"})

    checks = await checks_for(fake)

    assert failed(checks)[0][0] == "OpenAI-compatible API"
    assert "did not answer with an OpenAI model list" in failed(checks)[0][1]


async def test_missing_configuration_is_named_without_a_request(fake):
    checks = await diagnose(None, None, None)

    assert failed(checks) == [("configuration", "--model-base-url and --model-name must be given with --model openai"
                                                " (or set TRIO_RUNTIME_MODEL_BASE_URL / TRIO_RUNTIME_MODEL_NAME)")]
    assert fake.requests == []


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_run_doctor_prints_the_report_and_exits_1_when_the_server_is_down():
    port = unused_port()
    out = io.StringIO()

    code = run_doctor(model="openai", base_url=f"http://127.0.0.1:{port}/v1", model_name="m", api_key=API_KEY,
                      timeout=5.0, out=out)

    assert code == 1
    assert out.getvalue() == (
        "trio-runtime doctor: model backend 'openai'\n"
        f"  ok    configuration: model 'm' at http://127.0.0.1:{port}/v1 (with an API key)\n"
        f"  FAIL  server reachable: Cannot connect to the model server at http://127.0.0.1:{port}/v1:"
        " connection refused (is the server running?)\n"
        "1 problem found.\n")


def test_run_doctor_has_nothing_to_check_for_the_scripted_model():
    out = io.StringIO()
    assert run_doctor(model="scripted", out=out) == 0
    assert "All checks passed." in out.getvalue()
