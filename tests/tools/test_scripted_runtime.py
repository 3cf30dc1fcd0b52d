"""The scripted model's ``/tool`` directive behind a real Runtime (real SQLite, the real engine, real
note files), with the demo registry as RuntimeConfig.tools: what a client sees of the call, its result,
the answer and the session blocks. Only ``get_time`` runs here: it needs no approval, so the engine's
run_tool runs it at once. MockClock throughout."""

from __future__ import annotations

from runtime.models.scripted import ScriptedModel
from runtime.models.tools import demo_registry
from tests.runtime.helpers import items_of, run_turn
from tests.support import open_runtime


async def test_a_tool_directive_turn_records_the_call_the_result_and_the_answer(tmp_path, autojump_clock):
    registry = demo_registry()
    async with open_runtime(tmp_path, tools=registry,
                            model_factory=ScriptedModel) as rt:
        thread = await rt.create_thread()

        record = await run_turn(rt, thread["id"], "/tool get_time {}")

        assert record["status"] == "completed"
        detail = await rt.get_thread(thread["id"])
        items = items_of(detail, record["id"])
        assert [(i["kind"], i["status"]) for i in items] == [
            ("user_message", "completed"), ("tool_call", "completed"), ("agent_message", "completed")]
        now = items[1]["metadata"]["result"]
        assert {k: items[1]["metadata"][k] for k in ("tool_use_id", "name", "input", "is_error")} == {
            "tool_use_id": "call_1", "name": "get_time", "input": {}, "is_error": False}
        assert items[2]["detail"] == f"Tool get_time returned: {now}"
        assert record["usage"] == {"input_tokens": 3, "output_tokens": 4}
        assert registry.runs == {"get_time": 1}

        # The next turn sees the blocks in its history: its call is numbered after the first.
        second = await run_turn(rt, thread["id"], "/tool get_time")
        later = items_of(await rt.get_thread(thread["id"]), second["id"])
        assert later[1]["metadata"]["tool_use_id"] == "call_2"
        snapshot = await rt.get_session_snapshot(thread["id"])
        assert list(snapshot.messages)[:4] == [
            {"role": "user", "content": [{"type": "text", "text": "/tool get_time {}"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_time", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": now}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"Tool get_time returned: {now}"}]},
        ]
        assert registry.runs == {"get_time": 2}


async def test_without_tools_the_directive_fails_the_turn_with_the_hint(tmp_path, autojump_clock):
    async with open_runtime(tmp_path) as rt:
        thread = await rt.create_thread()

        record = await run_turn(rt, thread["id"], "/tool get_time")

        assert record["status"] == "failed"
        assert record["error"] == ("/tool get_time: no tools are offered to the model (start the server with"
                                   " --tools demo)")
