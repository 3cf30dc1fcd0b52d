"""The baseline server: a bare quart-trio app on hypercorn's trio worker, configured like ours
(one worker, no access log), with only what the baselines need:

- ``GET /health``: the same JSON body as trio-runtime's health route;
- ``GET /sse``: a server-sent event stream fed by an in-memory broadcast (a bounded trio memory
  channel per subscriber, like ours, frames written the same way);
- ``POST /publish``: broadcast one event to every subscriber and answer 200.

Run: ``python -m bench.bare_server --port 0``; prints ``bare listening on http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
from functools import partial

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import Response, jsonify
from quart_trio import QuartTrio

app = QuartTrio("bare")
SUBS: set[trio.MemorySendChannel] = set()
SEQ = 0


@app.route("/health")
async def health():
    return jsonify({"status": "ok", "service": "trio-runtime", "mode": "local"})


@app.route("/publish", methods=["POST"])
async def publish():
    global SEQ
    SEQ += 1
    data = json.dumps({"seq": SEQ, "event": "tick", "payload": {"n": SEQ}}, separators=(",", ":"))
    frame = f"id: {SEQ}\nevent: tick\ndata: {data}\n\n".encode()
    for sub in tuple(SUBS):
        try:
            sub.send_nowait(frame)
        except (trio.WouldBlock, trio.BrokenResourceError):
            SUBS.discard(sub)
            sub.close()
    return jsonify({"seq": SEQ, "subscribers": len(SUBS)})


@app.route("/sse")
async def sse():
    send, receive = trio.open_memory_channel[bytes](1024)
    SUBS.add(send)

    async def frames():
        try:
            yield b": hello\n\n"
            async for frame in receive:
                yield frame
        finally:
            SUBS.discard(send)
            send.close()

    response = Response(frames(), content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.timeout = None
    return response


async def main(port: int) -> None:
    app.config["RESPONSE_TIMEOUT"] = None
    hyper = HyperConfig()
    hyper.bind = [f"127.0.0.1:{port}"]
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.graceful_timeout = 1
    stop = trio.Event()

    async def shutdown_trigger() -> None:
        await stop.wait()
        for sub in tuple(SUBS):
            sub.close()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                async for _ in signals:
                    stop.set()
                    return

            nursery.start_soon(on_signal)
            binds = await nursery.start(partial(hypercorn_serve, app, hyper, shutdown_trigger=shutdown_trigger))
            print(f"bare listening on {binds[0]}", flush=True)
            await stop.wait()
            await trio.sleep(0)
        # hypercorn returns after the trigger; cancel the signal watcher if it is still there


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level="WARNING")
    trio.run(main, args.port)
