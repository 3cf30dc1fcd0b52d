"""Shared bits of the examples: ``--url``/``--token`` and a clear exit when no server answers."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from web.client import ApiError, Client, ServerUnreachable, default_token, default_url


def connect(description: str) -> Client:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default=default_url(), help="server URL [TRIO_RUNTIME_URL] (default %(default)s)")
    parser.add_argument("--token", default=None,
                        help="bearer token [TRIO_RUNTIME_TOKEN]; default: .trio-runtime/runtime.token")
    args = parser.parse_args()
    client = Client(args.url, args.token or default_token())
    try:
        client.health()
    except ServerUnreachable:
        sys.exit(f"error: no trio-runtime server answers at {args.url} (start one with `make serve`)")
    return client


def run(main: Callable[[Client], None], description: str) -> None:
    client = connect(description)
    try:
        with client:
            main(client)
    except ApiError as exc:
        sys.exit(f"error: the server said {exc.status} {exc.code}: {exc.message}")
    except ServerUnreachable as exc:
        sys.exit(f"error: {exc}")


def stream_reply(client: Client, thread_id: str, turn_id: str, since_seq: int, *, echo: bool = True) -> dict:
    """Print the turn's text as it streams; return its turn.completed payload."""
    for event in client.events(thread_id, since_seq=since_seq):
        if event.get("turn_id") != turn_id:
            continue
        if event["event"] == "item.delta" and echo:
            print(event["payload"]["delta"], end="", flush=True)
        elif event["event"] == "turn.completed":
            if echo:
                print()
            return event["payload"]
    raise RuntimeError("the event stream ended before the turn completed")
