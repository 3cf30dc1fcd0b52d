"""Threads and turns against a real server on a real socket."""

from __future__ import annotations

import pytest

from tests.e2e.helpers import api_error, collect_until, turn_of, wait_turn_end
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


# ---- a page of turns (issue 16: a huge thread as cheap to read as a small one) --------------------------------


async def _turns(client, thread_id: str, prompts: list[str]) -> list[str]:
    ids = []
    for prompt in prompts:
        turn = await client.start_turn(thread_id, prompt)
        await wait_turn_end(client, thread_id, turn["id"])
        ids.append(turn["id"])
    return ids


def _check_page(page: dict, turn_ids: list[str]) -> None:
    """The page's turns are ``turn_ids`` in order, and its items exactly theirs, in their order."""
    assert [t["id"] for t in page["turns"]] == turn_ids
    assert [i["id"] for i in page["items"]] == [i for t in page["turns"] for i in t["item_ids"]]
    assert {i["turn_id"] for i in page["items"]} == set(turn_ids)
    assert all(len(t["item_ids"]) == 2 for t in page["turns"])


async def test_thread_detail_pages_turns_latest_first_with_cursors(client):
    thread = await client.create_thread()
    tid = thread["id"]
    ids = await _turns(client, tid, [f"prompt {n}" for n in range(25)])

    latest = await client.get_thread(tid)  # the default page: the latest 20 turns, oldest first
    _check_page(latest, ids[5:])
    assert latest["page"]["turns_limit"] == 20 and latest["page"]["before"] is None
    assert latest["items"][0]["detail"] == "prompt 5" and latest["items"][-1]["detail"] == "You said: prompt 24"
    older = await client.get_thread(tid, before=latest["page"]["next_before"])
    _check_page(older, ids[:5])
    assert older["page"]["next_before"] is None and older["page"]["before"] == latest["page"]["next_before"]
    assert older["latest_seq"] == latest["latest_seq"]

    # Small pages, followed to the oldest: every turn exactly once, no gap.
    seen: list[list[str]] = []
    cursor = None
    for _ in range(10):
        page = await client.get_thread(tid, turns_limit=7, before=cursor)
        seen.append([t["id"] for t in page["turns"]])
        _check_page(page, seen[-1])
        cursor = page["page"]["next_before"]
        if cursor is None:
            break
    assert [len(p) for p in seen] == [7, 7, 7, 4]
    assert [t for p in reversed(seen) for t in p] == ids

    # Rewound turns leave the live pages; include_rewound pages over every stored turn.
    await client.rewind(tid, ids[22])
    live = await client.get_thread(tid)
    _check_page(live, ids[2:22])
    everything = await client.get_thread(tid, include_rewound=True)
    _check_page(everything, ids[5:])
    assert [t["rewound"] for t in everything["turns"]] == [False] * 17 + [True] * 3
    rest = await client.get_thread(tid, include_rewound=True, before=everything["page"]["next_before"])
    _check_page(rest, ids[:5])
    assert rest["page"]["next_before"] is None


async def test_thread_detail_turns_limit_is_clamped_and_a_bad_cursor_is_a_400(client):
    tid = (await client.create_thread())["id"]
    ids = await _turns(client, tid, ["one", "two", "three"])

    assert [t["id"] for t in (await client.get_thread(tid, turns_limit=0))["turns"]] == ids[2:]
    assert [t["id"] for t in (await client.get_thread(tid, turns_limit=-4))["turns"]] == ids[2:]
    page = await client.get_thread(tid, turns_limit=100_000)
    assert [t["id"] for t in page["turns"]] == ids and page["page"]["turns_limit"] == 1000
    assert page["page"]["next_before"] is None
    one = await client.get_thread(tid, turns_limit=1)
    two = await client.get_thread(tid, turns_limit=2, before=one["page"]["next_before"])
    assert [t["id"] for t in two["turns"]] == ids[:2]
    await api_error(client.get_thread(tid, turns_limit="many"), 400, "invalid_input", "turns_limit")

    for bad in ("garbage", "", "t0", "t-1", "t1x", "t01", "T3", "u3", "t", " t3", "t" + "9" * 30, "%%%", "\u00e9t\u00e9"):
        if bad == "":
            continue  # an empty cursor is no cursor (the latest page), as for every empty query parameter
        error = await api_error(client.get_thread(tid, before=bad), 400, "invalid_input", "'before'",
                                "next_before")
        assert error.status == 400
    # A cursor past the first turn gives an empty, last page (a turn's ord is never reused).
    empty = await client.get_thread(tid, before="t1")
    assert empty["turns"] == [] and empty["items"] == [] and empty["page"]["next_before"] is None
    assert (await client.get_thread(tid, before=""))["turns"][-1]["id"] == ids[-1]
    assert (await client.get_thread(tid))["thread"]["id"] == tid  # the server answers on after the 400s
