"""Every example runs against a real server and prints what its README section promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.conftest import E2E_LIMIT, start_server
from tests.e2e.helpers import start_tool_server

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
async def live(nursery, tmp_path):
    server = await start_server(nursery, tmp_path / "data", request_timeout=1.0)
    yield server
    server.shutdown.set()


@pytest.fixture
async def live_tools(nursery, tmp_path):
    """A server as ``trio-runtime serve --tools demo`` starts it."""
    server = await start_tool_server(nursery, tmp_path / "data", settings={"request_timeout": 1.0})
    yield server
    server.shutdown.set()


async def run_example(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    with trio.fail_after(E2E_LIMIT):
        return await trio.run_process([sys.executable, str(EXAMPLES / name), *args], capture_stdout=True,
                                      capture_stderr=True, check=False, env={**os.environ, **(env or {})})


def lines(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_quickstart(live):
    out = lines(await run_example("quickstart.py", "--url", live.url, "--token", live.token))
    assert "reply   You said: Hello! Please say something back." in out
    assert "status  completed, 5 input + 7 output tokens" in out
    assert "revision 1, 2 messages, 12 tokens" in out
    assert "'quickstart'  rev 1  2 msgs" in out


async def test_save_during_turn(live):
    out = lines(await run_example("save_during_turn.py", "--url", live.url, "--token", live.token))
    assert "saved mid-turn:  revision 1, turn_in_progress=True, 2 messages" in out
    assert "saved after it:  revision 2, turn_in_progress=False, 4 messages" in out
    assert "last message:    assistant: You said: this answer takes two seconds" in out


async def test_resume_session(live):
    # URL and token from the environment, as a user would set them.
    out = lines(await run_example("resume_session.py",
                                  env={"TRIO_RUNTIME_URL": live.url, "TRIO_RUNTIME_TOKEN": live.token}))
    assert "Resumed 2 message(s) from session 'resume demo'" in out
    assert "reply: You said: what did I say?" in out
    assert "input tokens 16 (history + the new prompt)" in out


async def test_timeouts_and_cancellation(live):
    out = lines(await run_example("timeouts_and_cancellation.py", "--url", live.url, "--token", live.token))
    assert "second turn:       409 conflict" in out
    assert "client deadline:   gave up after 0.5 s (ReadTimeout)" in out
    assert "server deadline:   504 timeout" in out
    assert "save without wait: 200, turn_in_progress=True" in out
    assert "interrupt:         turn is now interrupted" in out
    assert "interrupt again:   409 conflict" in out
    assert "engine healthy:    new turn in_progress" in out


async def test_examples_exit_nonzero_when_no_server_answers():
    result = await run_example("quickstart.py", "--url", "http://127.0.0.1:9", "--token", "x")
    assert result.returncode == 1
    assert "no trio-runtime server answers at http://127.0.0.1:9" in result.stderr.decode()


async def test_examples_report_a_wrong_token_clearly(live):
    result = await run_example("quickstart.py", "--url", live.url, "--token", "wrong")
    assert result.returncode == 1
    assert "the server said 401 unauthorized" in result.stderr.decode()


async def test_rewind_and_fork(live):
    out = lines(await run_example("rewind_and_fork.py", "--url", live.url, "--token", live.token))
    assert "start:    3 turns ['my name is Ada', 'I live in Paris', 'I like green tea'], 6 messages" in out
    assert "fork:     new thread 'fork at turn 1' with 1 copied turn(s); the source keeps its 3" in out
    assert "  fork:   1 turns ['my name is Ada'], 2 messages" in out
    assert "rewind:   before turn 3, removed 1 turn(s)" in out
    assert "  stored: 3 turns, rewound flags [False, False, True]" in out
    assert "retry:    turn 2 again ('I live in Paris'), retry_of is turn 2: True, completed" in out
    assert out.count("  live:   2 turns ['my name is Ada', 'I live in Paris'], 4 messages") == 2
    assert "save:     session 'rewind-demo' revision 1, 4 messages" in out
    assert "more:     3 turns ['my name is Ada', 'I live in Paris', 'actually I prefer coffee'], 6 messages" in out
    assert "restore:  session 'rewind-demo' revision 1, 4 messages are the live history again" in out
    assert "  safety: 'Before restore: rewind demo', 6 messages (restore it to undo)" in out
    assert "  turns:  0 live, 5 rewound (the history is the session's)" in out
    assert "  saved now: 4 messages" in out


async def test_approvals(live_tools):
    out = lines(await run_example("approvals.py", "--url", live_tools.url, "--token", live_tools.token))
    thread_id = out.split()[1]
    written = f"Wrote note 'hello' (29 characters) to notes/{thread_id}/hello.txt"
    assert "thread   thr_" in out and "(approval_policy ask)" in out
    assert 'asked    write_note {"name": "hello", "text": "Remember to water the plants."}' in out
    assert "turn     awaiting_approval" in out
    assert "pending  ['write_note'] (the one asked: True), expires " in out
    assert "decided  allowed by client" in out
    assert "status   completed" in out
    assert f"result   {written}" in out
    assert "note     Remember to water the plants." in out
    assert f"reply    Tool write_note returned: {written}" in out
    note = live_tools.data_dir / "notes" / thread_id / "hello.txt"
    assert note.read_text() == "Remember to water the plants."


async def test_approvals_says_why_on_a_server_without_tools(live):
    result = await run_example("approvals.py", "--url", live.url, "--token", live.token)
    assert result.returncode == 1
    assert ("error: the turn ended failed without asking: /tool write_note: no tools are offered to the model"
            " (start the server with --tools demo)") in result.stderr.decode()
