"""Quickstart: create a thread, start a turn, stream the reply live, save the session, list sessions.

    python examples/quickstart.py [--url http://127.0.0.1:7878] [--token TOKEN]
"""

from __future__ import annotations

from _common import run, stream_reply
from web.client import Client


def main(client: Client) -> None:
    thread = client.create_thread(title="quickstart")
    print(f"thread  {thread['id']}")
    since = client.get_thread(thread["id"])["latest_seq"]
    turn = client.start_turn(thread["id"], "Hello! Please say something back.")
    print(f"turn    {turn['id']} ({turn['status']})")
    print("reply   ", end="")
    done = stream_reply(client, thread["id"], turn["id"], since)
    usage = done["usage"]
    print(f"status  {done['status']}, {usage['input_tokens']} input + {usage['output_tokens']} output tokens")
    saved = client.save_session(thread_id=thread["id"])
    meta = saved["session"]["metadata"]
    print(f"saved   session {saved['session_id']} '{meta['title']}' revision {meta['revision']}, "
          f"{meta['message_count']} messages, {meta['total_tokens']} tokens")
    print("sessions:")
    for session in client.list_sessions(limit=5):
        print(f"  {session['id']}  {session['title']!r}  rev {session['revision']}  {session['message_count']} msgs")


if __name__ == "__main__":
    run(main, __doc__)
