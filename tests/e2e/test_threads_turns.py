"""Threads and turns against a real server on a real socket."""

from __future__ import annotations

import pytest

from tests.e2e.helpers import collect_until, turn_of, wait_turn_end
from web.client import ApiError


async def test_thread_crud_and_listing_order(client):
    first = await client.create_thread(title="first", model="m1", workspace="/w", system_prompt="be brief")
    assert first["title"] == "first" and first["model"] == "m1" and first["archived"] is False
    second = await client.create_thread(title="second")
    assert second["model"] == "scripted" and second["mode"] == "default"
    listed = await client.list_threads()
    assert [t["id"] for t in listed] == [second["id"], first["id"]]

    updated = await client.update_thread(first["id"], title="renamed", mode="plan")
    assert updated["title"] == "renamed" and updated["mode"] == "plan"
    assert [t["id"] for t in await client.list_threads()] == [first["id"], second["id"]]

    await client.update_thread(second["id"], archived=True)
    assert [t["id"] for t in await client.list_threads()] == [first["id"]]
    assert [t["id"] for t in await client.list_threads(archived_only=True)] == [second["id"]]
    assert len(await client.list_threads(include_archived=True)) == 2
    assert len(await client.list_threads(limit=1, include_archived=True)) == 1

    detail = await client.get_thread(first["id"])
    assert detail["thread"]["title"] == "renamed" and detail["turns"] == [] and detail["latest_seq"] > 0


async def test_limit_is_clamped_to_one_through_five_hundred(client):
    for _ in range(3):
        await client.create_thread()
    assert len(await client.list_threads(limit=0)) == 1
    assert len(await client.list_threads(limit=-5)) == 1
    assert len(await client.list_threads(limit=100000)) == 3


async def test_turn_lifecycle_usage_and_items(client):
    thread = await client.create_thread()
    turn = await client.start_turn(thread["id"], "hello there")
    assert turn["status"] == "in_progress" and turn["thread_id"] == thread["id"]
    end = await wait_turn_end(client, thread["id"], turn["id"])
    assert end["payload"]["status"] == "completed"
    assert end["payload"]["usage"] == {"input_tokens": 2, "output_tokens": 4}

    detail = await client.get_thread(thread["id"])
    record = turn_of(detail, turn["id"])
    assert record["status"] == "completed" and record["usage"] == {"input_tokens": 2, "output_tokens": 4}
    assert record["ended_at"] and record["duration_ms"] >= 0
    kinds = [(i["kind"], i["status"], i["detail"]) for i in detail["items"]]
    assert kinds == [("user_message", "completed", "hello there"),
                     ("agent_message", "completed", "You said: hello there")]
    assert record["item_ids"] == [i["id"] for i in detail["items"]]
    assert detail["thread"]["latest_turn_id"] == turn["id"]

    # The second turn's input counts the whole history (4 + 2 words) plus its own prompt.
    second = await client.start_turn(thread["id"], "again")
    end = await wait_turn_end(client, thread["id"], second["id"])
    assert end["payload"]["usage"] == {"input_tokens": 7, "output_tokens": 3}


async def test_second_turn_while_one_runs_is_409_and_interrupt_ends_it(client):
    thread = await client.create_thread()
    turn = await client.start_turn(thread["id"], "/hang")
    with pytest.raises(ApiError) as info:
        await client.start_turn(thread["id"], "another")
    assert info.value.status == 409 and info.value.code == "conflict"

    ended = await client.interrupt(thread["id"], turn["id"])
    assert ended["status"] == "interrupted" and ended["id"] == turn["id"]
    with pytest.raises(ApiError) as info:
        await client.interrupt(thread["id"], turn["id"])
    assert info.value.status == 409
    after = await client.start_turn(thread["id"], "now it works")
    assert after["status"] == "in_progress"


async def test_steer_joins_the_running_turn(client):
    thread = await client.create_thread()
    turn = await client.start_turn(thread["id"], "/slow 1\nfirst part of a long answer")
    steered = await client.steer(thread["id"], turn["id"], "and also this")
    assert steered["steer_count"] == 1
    events = await collect_until(client, thread["id"],
                                 lambda e: e["event"] == "turn.completed" and e.get("turn_id") == turn["id"])
    assert any(e["event"] == "turn.steered" and e["payload"]["prompt"] == "and also this" for e in events)
    detail = await client.get_thread(thread["id"])
    assert turn_of(detail, turn["id"])["steer_count"] == 1
    agent_texts = [i["detail"] for i in detail["items"] if i["kind"] == "agent_message"]
    assert agent_texts[-1] == "You said: and also this"
    with pytest.raises(ApiError) as info:
        await client.steer(thread["id"], turn["id"], "too late")
    assert info.value.status == 409


async def test_failed_turn_reports_the_model_error(client):
    thread = await client.create_thread()
    turn = await client.start_turn(thread["id"], "/fail the model fell over")
    end = await wait_turn_end(client, thread["id"], turn["id"])
    assert end["payload"]["status"] == "failed" and end["payload"]["error"] == "the model fell over"
    detail = await client.get_thread(thread["id"])
    assert turn_of(detail, turn["id"])["error"] == "the model fell over"
    assert detail["items"][-1]["kind"] == "error"


async def test_compact_replaces_history_and_conflicts_with_a_running_turn(client):
    thread = await client.create_thread()
    turn = await client.start_turn(thread["id"], "remember the number seven")
    await wait_turn_end(client, thread["id"], turn["id"])
    result = await client.compact(thread["id"], reason="too long")
    assert result["item"]["kind"] == "context_compaction" and "seven" in result["summary"]
    hang = await client.start_turn(thread["id"], "/hang")
    with pytest.raises(ApiError) as info:
        await client.compact(thread["id"])
    assert info.value.status == 409
    await client.interrupt(thread["id"], hang["id"])


async def test_unknown_thread_and_turn_are_404(client):
    thread = await client.create_thread()
    for call in (client.get_thread("thr_missing"), client.start_turn("thr_missing", "hi"),
                 client.update_thread("thr_missing", title="x"), client.compact("thr_missing"),
                 client.interrupt(thread["id"], "turn_missing"), client.steer(thread["id"], "turn_missing", "x")):
        with pytest.raises(ApiError) as info:
            await call
        assert info.value.status == 404 and info.value.code == "not_found"


async def test_patch_after_a_save_reports_the_session_link(client):
    thread = await client.create_thread()
    turn = await client.start_turn(thread["id"], "hello")
    await wait_turn_end(client, thread["id"], turn["id"])
    saved = await client.save_session(thread_id=thread["id"])
    updated = await client.update_thread(thread["id"], title="linked")
    assert updated["session_id"] == saved["session_id"] and updated["title"] == "linked"
