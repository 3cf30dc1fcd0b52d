"""``trio-runtime doctor``: check that the configured model backend can serve turns, and say exactly
what is wrong when it cannot.

For the ``openai`` backend it asks ``GET {base_url}/models`` (one request, bounded by ``timeout``) and
reads the answer as a list of checks: the configuration is complete, the server is reachable, the API
key is accepted, the URL is an OpenAI-compatible API, and the configured model is listed. With
``--model-max-tokens N`` it then asks for one streamed completion with ``max_tokens: N``, as ``serve``
would, and reads only its status: servers refuse a limit they cannot honour (larger than the context
window, or a model that only takes ``max_completion_tokens``) before they generate anything, and
closing the stream at once keeps the check from waiting for N tokens. Each failed check names the thing
and the fix. Exit code 0 when every check passed, 1 otherwise. The API key is sent in the Authorization
header only and never printed.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

import httpx
import trio

from runtime.models.openai_compat import DEFAULT_CONNECT_TIMEOUT, describe_connect_error, error_text

# Environment variables of the model options (the CLI flags' defaults).
API_KEY_ENV = "TRIO_RUNTIME_MODEL_API_KEY"
BASE_URL_ENV = "TRIO_RUNTIME_MODEL_BASE_URL"
MODEL_NAME_ENV = "TRIO_RUNTIME_MODEL_NAME"
# The whole doctor request (connect + answer) gets this long: a healthy server lists its models at once.
DEFAULT_DOCTOR_TIMEOUT = 10.0
# At most this many served model names are quoted when the configured one is missing.
MAX_LISTED_MODELS = 20
# The one message of the max_tokens check: short, so the server's prompt processing costs nothing.
MAX_TOKENS_PROBE = "Say OK."


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    message: str


async def diagnose(base_url: str | None, model_name: str | None, api_key: str | None, *,
                   timeout: float = DEFAULT_DOCTOR_TIMEOUT, max_tokens: int | None = None,
                   http_client: Callable[[], httpx.AsyncClient] | None = None) -> list[Check]:
    """The checks for an OpenAI-compatible backend, in order; stops at the first one that makes the
    rest meaningless. One HTTP request (two with ``max_tokens``), each bounded by ``timeout``;
    cancelling it leaves nothing behind (a started completion is closed, not drained)."""
    checks: list[Check] = []
    missing = [flag for flag, value in (("--model-base-url", base_url), ("--model-name", model_name)) if not value]
    if missing:
        checks.append(Check("configuration", False, f"{' and '.join(missing)} must be given with --model openai"
                                                    f" (or set {BASE_URL_ENV} / {MODEL_NAME_ENV})"))
        return checks
    assert base_url is not None and model_name is not None
    base = base_url.rstrip("/")
    try:
        url = httpx.URL(base)
    except httpx.InvalidURL as exc:
        checks.append(Check("configuration", False, f"the base URL {base_url!r} is not a valid URL: {exc}"))
        return checks
    if url.scheme not in ("http", "https") or not url.host:
        checks.append(Check("configuration", False, f"the base URL {base_url!r} must start with http:// or https://"
                                                    " and name a host, e.g. http://127.0.0.1:8080/v1"))
        return checks
    checks.append(Check("configuration", True, f"model '{model_name}' at {base}"
                                               f" ({'with' if api_key else 'without'} an API key)"))

    models_url = f"{base}/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    started = trio.current_time()
    try:
        async with (http_client or httpx.AsyncClient)() as client:
            response = await client.get(models_url, headers=headers,
                                        timeout=httpx.Timeout(timeout, connect=min(timeout, DEFAULT_CONNECT_TIMEOUT)))
    except httpx.HTTPError as exc:
        problem = describe_connect_error(exc, base, min(timeout, DEFAULT_CONNECT_TIMEOUT))
        if problem is None:
            problem = f"GET {models_url} failed: {type(exc).__name__}: {exc}"
            if isinstance(exc, httpx.ReadTimeout):
                problem = f"GET {models_url} got no answer within {timeout:g} s"
        checks.append(Check("server reachable", False, _scrub(problem, api_key)))
        return checks
    elapsed_ms = round((trio.current_time() - started) * 1000)
    checks.append(Check("server reachable", True, f"GET {models_url} answered HTTP {response.status_code}"
                                                  f" in {elapsed_ms} ms"))
    detail = _scrub(_detail(response), api_key)
    quoted = f" ({detail})" if detail else ""

    if response.status_code in (401, 403):
        fix = (f"check the key in {API_KEY_ENV}" if api_key
               else f"the server needs one: set {API_KEY_ENV}")
        checks.append(Check("API key", False, f"rejected with HTTP {response.status_code}{quoted}; {fix}"))
        return checks
    checks.append(Check("API key", True, "accepted" if api_key else "none set, and the server asked for none"))

    if response.status_code == 404:
        checks.append(Check("OpenAI-compatible API", False,
                            f"GET {models_url} answered HTTP 404{quoted}: the base URL is probably wrong; it is"
                            " the part before /chat/completions and usually ends in /v1"
                            " (e.g. http://127.0.0.1:8080/v1)"))
        return checks
    if response.status_code != 200:
        checks.append(Check("OpenAI-compatible API", False,
                            f"GET {models_url} answered HTTP {response.status_code}{quoted}"))
        return checks
    served = _model_ids(response)
    if served is None:
        checks.append(Check("OpenAI-compatible API", False,
                            f"GET {models_url} did not answer with an OpenAI model list"
                            f" ({{\"data\": [{{\"id\": ...}}]}}); is this the API's base URL?"))
        return checks
    checks.append(Check("OpenAI-compatible API", True, f"{len(served)} model(s) listed"))

    if model_name in served:
        checks.append(Check("model listed", True, f"'{model_name}' is served"))
        if max_tokens is not None:
            checks.append(await _check_max_tokens(base, model_name, headers, max_tokens, timeout, http_client))
    else:
        shown = ", ".join(repr(m) for m in served[:MAX_LISTED_MODELS]) or "none"
        more = f" and {len(served) - MAX_LISTED_MODELS} more" if len(served) > MAX_LISTED_MODELS else ""
        checks.append(Check("model listed", False,
                            f"'{model_name}' is not served at {base}; it serves {shown}{more}. Pass one of those"
                            " with --model-name (a llama.cpp server lists its model under its alias or file name)"))
    return checks


async def _check_max_tokens(base: str, model_name: str, headers: dict[str, str], max_tokens: int, timeout: float,
                            http_client: Callable[[], httpx.AsyncClient] | None) -> Check:
    """One streamed completion with ``max_tokens``; only its status (and an error's body) is read."""
    url = f"{base}/chat/completions"
    body = {"model": model_name, "messages": [{"role": "user", "content": MAX_TOKENS_PROBE}], "stream": True,
            "max_tokens": max_tokens}
    api_key = headers.get("Authorization", "").removeprefix("Bearer ") or None
    try:
        async with (http_client or httpx.AsyncClient)() as client:
            async with client.stream("POST", url, json=body, headers=headers,
                                     timeout=httpx.Timeout(timeout, connect=min(timeout, DEFAULT_CONNECT_TIMEOUT))
                                     ) as response:
                if response.status_code == 200:
                    # Accepted: leaving the block closes the stream before the model writes N tokens.
                    return Check("max_tokens", True, f"the server accepts max_tokens {max_tokens} for '{model_name}'")
                await response.aread()
    except httpx.HTTPError as exc:
        problem = f"POST {url} with max_tokens {max_tokens} failed: {type(exc).__name__}: {exc}"
        if isinstance(exc, httpx.ReadTimeout):
            problem = f"POST {url} with max_tokens {max_tokens} got no answer within {timeout:g} s"
        return Check("max_tokens", False, _scrub(problem, api_key))
    detail = _scrub(_detail(response), api_key)
    quoted = f" ({detail})" if detail else ""
    return Check("max_tokens", False, f"POST {url} with max_tokens {max_tokens} answered HTTP {response.status_code}"
                                      f"{quoted}; lower --model-max-tokens, or leave it unset to use the server's"
                                      " own limit")


def _scrub(text: str, api_key: str | None) -> str:
    return text.replace(api_key, "***") if api_key else text


def _detail(response: httpx.Response) -> str:
    if response.status_code == 200:
        return ""
    try:
        text = error_text(response.json())
    except ValueError:
        text = response.text
    text = " ".join(text.split())
    return text[:300]


def _model_ids(response: httpx.Response) -> list[str] | None:
    """The ids of an OpenAI model list, or None if the body is not one."""
    try:
        body: Any = response.json()
    except ValueError:
        return None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    ids = [entry.get("id") for entry in data if isinstance(entry, dict)]
    return [i for i in ids if isinstance(i, str)]


def format_report(backend: str, checks: list[Check]) -> str:
    lines = [f"trio-runtime doctor: model backend '{backend}'"]
    lines += [f"  {'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.message}" for c in checks]
    problems = sum(not c.ok for c in checks)
    lines.append("All checks passed." if not problems else
                 f"{problems} problem{'s' if problems != 1 else ''} found.")
    return "\n".join(lines)


async def diagnose_mcp(data_dir: Path) -> list[Check]:
    """One check per MCP server of ``<data_dir>/mcp.json``: each enabled one is started as ``serve`` would
    (all in parallel, each bounded by its ``startup_timeout``), its tools listed, then stopped (its process
    killed and reaped). Nothing is checked without the file. Errors are the servers' redacted statuses."""
    from runtime.mcp import McpServers
    from runtime.mcp.config import FILE_NAME

    if not (data_dir / FILE_NAME).exists():
        return []
    servers = McpServers(data_dir)
    async with trio.open_nursery() as nursery:
        await nursery.start(servers.run)
        views = servers.servers()
        await servers.aclose()
    if servers.load_error is not None:
        return [Check(FILE_NAME, False, servers.load_error)]
    checks = []
    for view in views:
        name = f"MCP server '{view['name']}'"
        if view["status"] == "ready":
            checks.append(Check(name, True, f"started ({view['transport']}), {view['tools_count']} tools"))
        elif view["status"] == "disabled":
            checks.append(Check(name, True, "disabled (not started)"))
        else:
            checks.append(Check(name, False, view.get("error") or view["status"]))
    return checks


def run_doctor(*, model: str, base_url: str | None = None, model_name: str | None = None,
               api_key: str | None = None, timeout: float = DEFAULT_DOCTOR_TIMEOUT, max_tokens: int | None = None,
               out: TextIO | None = None, data_dir: Path | None = None) -> int:
    """The ``doctor`` command: print the report, return the exit code (0 all good, 1 a problem).
    With ``data_dir``, the MCP servers of its ``mcp.json`` are checked too."""
    out = out or sys.stdout
    if data_dir is not None:
        mcp_checks = trio.run(diagnose_mcp, data_dir)
        if mcp_checks:
            code = run_doctor(model=model, base_url=base_url, model_name=model_name, api_key=api_key,
                              timeout=timeout, max_tokens=max_tokens, out=out)
            print(format_report("mcp", mcp_checks).replace("model backend 'mcp'", "MCP servers"), file=out)
            return code or (0 if all(c.ok for c in mcp_checks) else 1)
    if model == "scripted":
        unused = f"; --model-max-tokens {max_tokens} does not apply to it" if max_tokens is not None else ""
        print(format_report(model, [Check("backend", True, "the built-in offline scripted model; nothing to"
                                                           f" reach{unused}")]), file=out)
        return 0
    if model != "openai":
        print(format_report(model, [Check("backend", False, f"unknown model backend {model!r}")]), file=out)
        return 1
    checks = trio.run(functools.partial(diagnose, base_url, model_name, api_key, timeout=timeout,
                                        max_tokens=max_tokens))
    print(format_report(model, checks), file=out)
    return 0 if all(c.ok for c in checks) else 1
