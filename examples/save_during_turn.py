"""Save a session while a turn is still streaming, then again after it completes.

The first save answers at once with the state at the last turn boundary (``turn_in_progress: true``);
the second one includes the finished reply. Both are revisions of the same session.

    python examples/save_during_turn.py [--url URL] [--token TOKEN]
"""

from __future__ import annotations

from _common import run, stream_reply
from web.client import Client


def main(client: Client) -> None:
    thread = client.create_thread(title="save during a turn")
    first = client.start_turn(thread["id"], "a short first question")
    stream_reply(client, thread["id"], first["id"], 0, echo=False)

    since = client.get_thread(thread["id"])["latest_seq"]
    slow = client.start_turn(thread["id"], "/slow 2\nthis answer takes two seconds to stream word by word")
    print(f"started a /slow turn {slow['id']}")
    during = client.save_session(thread_id=thread["id"])
    meta = during["session"]["metadata"]
    print(f"saved mid-turn:  revision {meta['revision']}, turn_in_progress={during['turn_in_progress']}, "
          f"{meta['message_count']} messages")

    done = stream_reply(client, thread["id"], slow["id"], since, echo=False)
    print(f"turn finished:   {done['status']}")
    after = client.save_session(thread_id=thread["id"], session_id=during["session_id"])
    meta = after["session"]["metadata"]
    print(f"saved after it:  revision {meta['revision']}, turn_in_progress={after['turn_in_progress']}, "
          f"{meta['message_count']} messages")
    last = after["session"]["messages"][-1]
    print(f"last message:    {last['role']}: {last['content'][0]['text']}")


if __name__ == "__main__":
    run(main, __doc__)
