"""What timeouts, conflicts and interrupts look like, and that the engine stays healthy through them.

    python examples/timeouts_and_cancellation.py [--url URL] [--token TOKEN]

Uses a ``/hang`` turn (the scripted model streams nothing until interrupted). The 504 step waits for the
server's --request-timeout (10 s by default).
"""

from __future__ import annotations

import time

from _common import run
from web.client import ApiError, Client, ServerUnreachable


def main(client: Client) -> None:
    thread = client.create_thread(title="timeouts")
    turn = client.start_turn(thread["id"], "/hang")
    print(f"started /hang turn {turn['id']}")

    try:
        client.start_turn(thread["id"], "a second turn")
    except ApiError as exc:
        print(f"second turn:       {exc.status} {exc.code}: {exc.message}")

    # A client-side deadline: give up after 0.5 s. The server notices the disconnect and cancels the
    # request; nothing is saved and the engine is unaffected.
    with Client(client.url, client.token, timeout=0.5) as impatient:
        try:
            impatient.save_session(thread_id=thread["id"], wait_for_idle=True)
        except ServerUnreachable as exc:
            print(f"client deadline:   gave up after 0.5 s ({type(exc.__cause__).__name__})")

    start = time.monotonic()
    try:
        client.save_session(thread_id=thread["id"], wait_for_idle=True)
    except ApiError as exc:
        print(f"server deadline:   {exc.status} {exc.code} after {time.monotonic() - start:.1f} s: {exc.message}")

    saved = client.save_session(thread_id=thread["id"])
    print(f"save without wait: 200, turn_in_progress={saved['turn_in_progress']} (answered at once)")

    ended = client.interrupt(thread["id"], turn["id"])
    print(f"interrupt:         turn is now {ended['status']}")
    try:
        client.interrupt(thread["id"], turn["id"])
    except ApiError as exc:
        print(f"interrupt again:   {exc.status} {exc.code}")

    healthy = client.start_turn(thread["id"], "are you still there?")
    print(f"engine healthy:    new turn {healthy['status']}")


if __name__ == "__main__":
    run(main, __doc__)
