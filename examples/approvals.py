"""Approvals: a turn that wants to write a note waits for your yes; allow it, and read the note back.

    trio-runtime serve --tools demo          # the demo tools (write_note needs approval)
    python examples/approvals.py [--url http://127.0.0.1:7878] [--token TOKEN]

The scripted model's ``/tool NAME {json}`` line makes it call a tool offline, so this runs without a
real model. The approval is a stored record: a server restarted while it waits keeps it pending.
"""

from __future__ import annotations

import json
import sys

from _common import run, stream_reply
from web.client import Client

NOTE = {"name": "hello", "text": "Remember to water the plants."}


def wait_for_approval(client: Client, thread_id: str, turn_id: str, since: int) -> dict:
    """The turn's approval.requested payload, from the event stream (no polling)."""
    for event in client.events(thread_id, since_seq=since):
        if event.get("turn_id") != turn_id:
            continue
        if event["event"] == "approval.requested":
            return event["payload"]
        if event["event"] == "turn.completed":  # e.g. a server started without --tools demo
            sys.exit(f"error: the turn ended {event['payload']['status']} without asking: "
                     f"{event['payload'].get('error')}")
    raise RuntimeError("the event stream ended before the approval was requested")


def main(client: Client) -> None:
    thread = client.create_thread(title="approvals demo")
    tid = thread["id"]
    print(f"thread   {tid} (approval_policy {thread['approval_policy']})")
    since = client.get_thread(tid)["latest_seq"]
    turn = client.start_turn(tid, f"/tool write_note {json.dumps(NOTE)}")

    asked = wait_for_approval(client, tid, turn["id"], since)
    print(f"asked    {asked['tool']} {json.dumps(asked['input'])}")
    print(f"turn     {client.get_thread(tid)['turns'][-1]['status']}")
    pending = client.list_approvals(tid, status="pending")
    print(f"pending  {[a['tool'] for a in pending]} (the one asked: {pending[0]['id'] == asked['approval_id']}),"
          f" expires {pending[0]['expires_at']}")

    decided = client.decide_approval(tid, asked["approval_id"], "allow")
    print(f"decided  {decided['status']} by {decided['decided_by']}")
    done = stream_reply(client, tid, turn["id"], since, echo=False)
    print(f"status   {done['status']}")

    # The note, through the API: the tool call's item holds its input (the text written) and its result
    # (where the tool wrote it, under the server's data dir).
    detail = client.get_thread(tid)
    call = next(i for i in detail["items"] if i["turn_id"] == turn["id"] and i["kind"] == "tool_call")
    print(f"result   {call['metadata']['result']}")
    print(f"note     {call['metadata']['input']['text']}")
    reply = "".join(i["detail"] for i in detail["items"] if i["turn_id"] == turn["id"] and i["kind"] == "agent_message")
    print(f"reply    {reply}")


if __name__ == "__main__":
    run(main, __doc__)
