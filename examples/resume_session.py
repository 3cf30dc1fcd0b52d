"""Resume a saved session into a new thread and continue the conversation.

The new thread's engine starts from the session's messages, so its first turn sees the whole history:
watch its input token count.

    python examples/resume_session.py [--url URL] [--token TOKEN]
"""

from __future__ import annotations

from _common import run, stream_reply
from web.client import Client


def main(client: Client) -> None:
    original = client.create_thread(title="resume demo")
    turn = client.start_turn(original["id"], "my favourite colour is green")
    stream_reply(client, original["id"], turn["id"], 0, echo=False)
    saved = client.save_session(thread_id=original["id"])
    print(f"saved session {saved['session_id']} with {saved['session']['metadata']['message_count']} messages")

    resumed = client.resume_thread(saved["session_id"])
    print(f"resumed into thread {resumed['thread_id']}: {resumed['summary']}")
    since = client.get_thread(resumed["thread_id"])["latest_seq"]
    next_turn = client.start_turn(resumed["thread_id"], "what did I say?")
    print("reply: ", end="")
    done = stream_reply(client, resumed["thread_id"], next_turn["id"], since)
    print(f"input tokens {done['usage']['input_tokens']} (history + the new prompt)")


if __name__ == "__main__":
    run(main, __doc__)
