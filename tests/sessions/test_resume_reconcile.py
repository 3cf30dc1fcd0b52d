"""Resume (a new thread that starts from a session's messages) and the index's reconciliation with the
session directory when the runtime opens."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime import InvalidData, InvalidInput, NotFound
from runtime.transcript import word_count

from .conftest import LIMIT, read_session_file, run_turn, session_ids_listed, sessions_dir


async def _saved(rt, *prompts, **thread_fields):
    tid = (await rt.create_thread(**thread_fields))["id"]
    for prompt in prompts:
        await run_turn(rt, tid, prompt)
    return tid, (await rt.sessions.save(thread_id=tid, timeout=LIMIT))


async def test_resume_starts_a_thread_whose_engine_holds_the_session_messages(rt):
    _, saved = await _saved(rt, "hello there", "/think hmm\nwhat about this", title="Planning",
                            system_prompt="be brief", workspace="/ws")
    sid = saved["session_id"]
    session = saved["session"]

    resumed = await rt.sessions.resume(sid)
    assert resumed["session_id"] == sid
    assert resumed["message_count"] == len(session["messages"]) == 4
    assert resumed["summary"] == "Resumed 4 message(s) from session 'Planning'"
    new = resumed["thread_id"]
    record = await rt.thread_record(new)
    assert record["session_id"] == sid and record["title"] == "Planning"
    assert record["system_prompt"] == "be brief" and record["workspace"] == "/ws"
    assert (record["model"], record["mode"]) == ("scripted", "default")

    snapshot = await rt.get_session_snapshot(new)
    assert list(snapshot.messages) == session["messages"]
    assert snapshot.total_tokens == session["metadata"]["total_tokens"]
    assert snapshot.turn_in_progress is False

    prompt = "and now the next question please"
    end = await run_turn(rt, new, prompt)
    assert end["status"] == "completed"
    assert end["usage"]["input_tokens"] == word_count(session["messages"]) + len(prompt.split())
    assert end["usage"]["output_tokens"] == len(f"You said: {prompt}".split())

    # Saving the resumed thread carries the old history forward, plus the new turn.
    again = await rt.sessions.save(thread_id=new, session_id=sid, timeout=LIMIT)
    assert again["session"]["messages"][:4] == session["messages"]
    assert again["session"]["metadata"]["message_count"] == 6
    assert again["session"]["metadata"]["total_tokens"] == (
        session["metadata"]["total_tokens"] + end["usage"]["input_tokens"] + end["usage"]["output_tokens"])


async def test_resume_survives_a_restart_of_the_runtime(open_rt, data_dir):
    async with open_rt() as rt:
        _, saved = await _saved(rt, "hello there")
        new = (await rt.sessions.resume(saved["session_id"], model="m2", mode="plan"))["thread_id"]
        assert ((await rt.thread_record(new))["model"], (await rt.thread_record(new))["mode"]) == ("m2", "plan")
    async with open_rt() as rt:
        snapshot = await rt.get_session_snapshot(new)
        assert list(snapshot.messages) == saved["session"]["messages"]
        assert (snapshot.model, snapshot.mode) == ("m2", "plan")


async def test_resume_of_unknown_or_invalid_session_creates_no_thread(rt):
    with pytest.raises(NotFound, match="Session 'nope' not found"):
        await rt.sessions.resume("nope")
    with pytest.raises(InvalidInput):
        await rt.sessions.resume("../nope")
    assert await rt.list_threads(include_archived=True) == []


# ---- reconcile -------------------------------------------------------------------------------


@pytest.mark.files_only
async def test_index_reconciles_files_added_removed_or_edited_while_closed(open_rt, data_dir, tmp_path):
    from runtime import Runtime, RuntimeConfig

    async with open_rt() as rt:
        _, kept = await _saved(rt, "hello there")
        _, removed = await _saved(rt, "remove me later")
        _, edited = await _saved(rt, "edit me later")
    # A session made by another runtime (another data dir), copied in while ours is closed.
    async with Runtime.open(RuntimeConfig(data_dir=tmp_path / "elsewhere")) as other:
        _, imported = await _saved(other, "imported conversation")
    shutil.copy(tmp_path / "elsewhere" / "sessions" / f"{imported['session_id']}.json", sessions_dir(data_dir))
    (sessions_dir(data_dir) / f"{removed['session_id']}.json").unlink()
    doc = json.loads((sessions_dir(data_dir) / f"{edited['session_id']}.json").read_bytes())
    doc["metadata"]["title"] = "Edited by hand, Ünïcode"
    doc["metadata"]["archived"] = True
    (sessions_dir(data_dir) / f"{edited['session_id']}.json").write_text(json.dumps(doc))

    async with open_rt() as rt:
        listed = await session_ids_listed(rt, include_archived=True)
        assert set(listed) == {kept["session_id"], imported["session_id"], edited["session_id"]}
        assert await session_ids_listed(rt, search="imported conversation") == [imported["session_id"]]
        assert await session_ids_listed(rt, search="ünïcode", archived_only=True) == [edited["session_id"]]
        assert set(await session_ids_listed(rt)) == {kept["session_id"], imported["session_id"]}
        with pytest.raises(NotFound):
            await rt.sessions.get(removed["session_id"])
        got = await rt.sessions.get(imported["session_id"])
        assert got["messages"] == imported["session"]["messages"]
        # The imported session is a first-class session: it can be patched and resumed.
        patched = await rt.sessions.patch(imported["session_id"], title="mine now", timeout=LIMIT)
        assert patched["session"]["revision"] == 2
        assert (await rt.sessions.resume(imported["session_id"]))["message_count"] == 2


@pytest.mark.files_only
async def test_a_file_whose_metadata_names_another_id_never_writes_to_that_other_session(rt):
    """Files are addressed by name. A copy of A.json saved as B.json (a user duplicating a session)
    must not make operations on B write A's file."""
    _, saved = await _saved(rt, "hello there")
    a = saved["session_id"]
    a_bytes = (sessions_dir(rt) / f"{a}.json").read_bytes()
    shutil.copy(sessions_dir(rt) / f"{a}.json", sessions_dir(rt) / "copy-of-a.json")

    try:
        result = await rt.sessions.patch("copy-of-a", title="the copy", timeout=LIMIT)
    except InvalidData:  # refusing the mismatched file is acceptable too
        result = None
    assert (sessions_dir(rt) / f"{a}.json").read_bytes() == a_bytes, "PATCH of copy-of-a rewrote A's file"
    assert (await rt.sessions.get(a))["metadata"]["title"] == "hello there"
    [listed_a] = [m for m in await rt.sessions.list(limit=10) if m["id"] == a]
    assert listed_a["title"] == "hello there"
    if result is not None:
        assert result["session"]["id"] == "copy-of-a"
        assert read_session_file(rt, "copy-of-a")["metadata"]["title"] == "the copy"


@pytest.mark.files_only
async def test_a_copy_made_while_closed_does_not_take_over_the_original_in_the_index(open_rt, data_dir):
    """A user duplicates A.json as B.json and edits B's title (metadata.id still says A)."""
    async with open_rt() as rt:
        _, saved = await _saved(rt, "hello there")
    a = saved["session_id"]
    doc = json.loads((sessions_dir(data_dir) / f"{a}.json").read_bytes())
    doc["metadata"]["title"] = "edited copy"
    (sessions_dir(data_dir) / "copy-b.json").write_text(json.dumps(doc))

    async with open_rt() as rt:
        listed = {m["id"]: m for m in await rt.sessions.list(limit=10)}
        assert listed[a]["title"] == "hello there"
        assert listed[a]["size"] == (sessions_dir(rt) / f"{a}.json").stat().st_size
        assert set(listed) <= {a, "copy-b"}
        if "copy-b" in listed:
            assert listed["copy-b"]["title"] == "edited copy"


ODD_METADATA = {
    "total_tokens_text": {"total_tokens": "many"},
    "total_tokens_float": {"total_tokens": 12.5},
    "model_object": {"model": {"name": "x"}},
    "workspace_list": {"workspace": ["/a", "/b"]},
}


@pytest.mark.files_only
@pytest.mark.parametrize("edit", sorted(ODD_METADATA))
async def test_a_hand_edited_file_with_odd_optional_fields_breaks_neither_open_nor_listing(open_rt, data_dir, edit):
    async with open_rt() as rt:
        _, good = await _saved(rt, "hello there")
    doc = json.loads((sessions_dir(data_dir) / f"{good['session_id']}.json").read_bytes())
    doc["metadata"]["id"] = "odd"
    doc["metadata"].update(ODD_METADATA[edit])
    (sessions_dir(data_dir) / "odd.json").write_text(json.dumps(doc))

    async with open_rt() as rt:  # opening must not fail because of one odd file
        listed = await rt.sessions.list(limit=10, include_archived=True)
        assert good["session_id"] in [m["id"] for m in listed]
        assert all(isinstance(m["total_tokens"], int) for m in listed)
        try:
            await rt.sessions.get("odd")
        except InvalidData:
            pass
