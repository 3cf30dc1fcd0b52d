"""Take a conversation back: fork it at a turn, rewind it, retry a turn, save it and restore the save.

Each step prints what changed: the live turns (by prompt), how many messages the live history holds,
and for the restore the safety session that holds the history it replaced (restore that one to undo).
Rewound turns are never deleted: `GET /v1/threads/{id}?include_rewound=true` still lists them.

    python examples/rewind_and_fork.py [--url URL] [--token TOKEN]
"""

from __future__ import annotations

from _common import run, stream_reply
from web.client import Client

PROMPTS = ("my name is Ada", "I live in Paris", "I like green tea")


def turn(client: Client, thread_id: str, prompt: str) -> str:
    since = client.get_thread(thread_id)["latest_seq"]
    started = client.start_turn(thread_id, prompt)
    stream_reply(client, thread_id, started["id"], since, echo=False)
    return started["id"]


def show(client: Client, label: str, thread_id: str) -> None:
    """The live history as GET shows it: each turn's prompt, and the message count."""
    detail = client.get_thread(thread_id)
    prompts = [f"'{t['input_summary']}'" for t in detail["turns"]]
    messages = sum(1 for i in detail["items"] if i["kind"] in ("user_message", "agent_message"))
    print(f"{label:<10}{len(prompts)} turns [{', '.join(prompts)}], {messages} messages")


def main(client: Client) -> None:
    thread_id = client.create_thread(title="rewind demo")["id"]
    turns = [turn(client, thread_id, prompt) for prompt in PROMPTS]
    show(client, "start:", thread_id)

    fork = client.fork_thread(thread_id, through_turn_id=turns[0], title="fork at turn 1")
    print(f"fork:     new thread '{fork['thread']['title']}' with {len(fork['turn_ids'])} copied turn(s); "
          f"the source keeps its {len(turns)}")
    show(client, "  fork:", fork["thread"]["id"])

    rewound = client.rewind(thread_id, turns[2])
    print(f"rewind:   before turn 3, removed {len(rewound['removed_turn_ids'])} turn(s)")
    show(client, "  live:", thread_id)
    stored = client.get_thread(thread_id, include_rewound=True)["turns"]
    print(f"  stored: {len(stored)} turns, rewound flags {[t['rewound'] for t in stored]}")

    since = client.get_thread(thread_id)["latest_seq"]
    retried = client.retry(thread_id)
    done = stream_reply(client, thread_id, retried["id"], since, echo=False)
    print(f"retry:    turn 2 again ('{retried['input_summary']}'), retry_of is turn 2: "
          f"{retried['retry_of'] == turns[1]}, {done['status']}")
    show(client, "  live:", thread_id)

    saved = client.save_session(thread_id=thread_id, session_id="rewind-demo")
    meta = saved["session"]["metadata"]
    print(f"save:     session '{saved['session_id']}' revision {meta['revision']}, {meta['message_count']} messages")

    turn(client, thread_id, "actually I prefer coffee")
    show(client, "more:", thread_id)

    restored = client.restore(thread_id, saved["session_id"], if_match=meta["revision"])
    safety = client.get_session(restored["safety_session_id"])["metadata"]
    print(f"restore:  session '{restored['session_id']}' revision {restored['revision']}, "
          f"{restored['message_count']} messages are the live history again")
    print(f"  safety: '{safety['title']}', {safety['message_count']} messages (restore it to undo)")
    live = client.get_thread(thread_id, include_rewound=True)["turns"]
    rewound_count = sum(t["rewound"] for t in live)
    print(f"  turns:  {len(live) - rewound_count} live, {rewound_count} rewound (the history is the session's)")
    print(f"  saved now: {client.save_session(thread_id=thread_id)['session']['metadata']['message_count']} "
          f"messages")


if __name__ == "__main__":
    run(main, __doc__)
