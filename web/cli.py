"""``trio-runtime serve``: the Runtime and hypercorn's trio worker in one trio run.

Shutdown order on SIGINT/SIGTERM: end open SSE streams, stop accepting and give in-flight requests
``graceful_seconds`` (writes to clients included: see web/server.py), then leave the Runtime (running
turns end ``interrupted``, the store flushes), then exit 0. A second signal during that exits at once
with ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM), as a kill would: the store and the
session files are crash-safe, so nothing is left half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import math
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import trio
from hypercorn.trio import serve as hypercorn_serve

from runtime import Runtime, RuntimeConfig, __version__
from runtime.models.openai_compat import DEFAULT_READ_TIMEOUT, OpenAICompatModel
from runtime.config import DEFAULT_APPROVAL_TIMEOUT, DEFAULT_LEASE_TTL
from runtime.store import is_postgres_url
from runtime.models.tools import RUN_LOG_ENV, ToolRegistry, demo_registry

from . import server
from .app import create_app
from .auth import TOKEN_FILE, load_or_create_token, token_problem
from .doctor import API_KEY_ENV, BASE_URL_ENV, DEFAULT_DOCTOR_TIMEOUT, MODEL_NAME_ENV, run_doctor
from .settings import (
    APPROVAL_SECONDS, DEFAULT_DATA_DIR, DEFAULT_GRACEFUL_SECONDS, DEFAULT_HOST, DEFAULT_MAX_BODY, DEFAULT_PORT,
    DEFAULT_REQUEST_TIMEOUT, DEFAULT_SSE_KEEPALIVE, DEFAULT_SSE_SEND_TIMEOUT, IDLE_EVICT, MAX_BODY, MAX_TOKENS, PORT,
    SECONDS, Bound, ServerSettings, is_loopback, show,
)

log = logging.getLogger("trio_runtime")

TOKEN_ENV = "TRIO_RUNTIME_TOKEN"
REQUEST_TIMEOUT_ENV = "TRIO_RUNTIME_REQUEST_TIMEOUT"
STORE_ENV = "TRIO_RUNTIME_STORE"

# The numeric flags and the values they accept: (flag, its argparse dest, the Bound). Checked after
# parsing (``check_numbers``) so that every refusal names the flag and the range in one format.
SERVE_NUMBERS = (
    ("--port", "port", PORT),
    ("--request-timeout", "request_timeout", SECONDS),
    ("--max-body", "max_body", MAX_BODY),
    ("--sse-keepalive", "sse_keepalive", SECONDS),
    ("--sse-send-timeout", "sse_send_timeout", SECONDS),
    ("--graceful-timeout", "graceful_timeout", SECONDS),
    ("--idle-evict", "idle_evict", IDLE_EVICT),
    ("--approval-timeout", "approval_timeout", APPROVAL_SECONDS),
    ("--lease-ttl", "lease_ttl", SECONDS),
)
MODEL_NUMBERS = (
    ("--model-read-timeout", "model_read_timeout", SECONDS),
    ("--model-max-tokens", "model_max_tokens", MAX_TOKENS),
)
DOCTOR_NUMBERS = (("--timeout", "timeout", SECONDS),)
SESSION_STORAGE_ENV = "TRIO_RUNTIME_SESSION_STORAGE"
SESSION_STORAGES = ("files", "store")  # RuntimeConfig.session_storage


def _env(name: str, default: str | None = None) -> str | None:
    """An environment variable; set but empty counts as unset (except the token: see ``auth_token_from``)."""
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  flags: tuple[tuple[str, str, Bound], ...]) -> None:
    """``parser.error`` (exit 2) naming the first flag whose value is outside its range; None is "not given"."""
    for flag, dest, bound in flags:
        value = getattr(args, dest, None)
        if value is not None and value not in bound:
            parser.error(f"{flag} must be {bound}: got {show(value)}")


def request_timeout_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> float:
    """``--request-timeout``, else TRIO_RUNTIME_REQUEST_TIMEOUT, else the default; a bad variable is refused
    by name (it is read here, not as the flag's default, so that the message can say where it came from)."""
    if args.request_timeout is not None:
        return args.request_timeout
    raw = _env(REQUEST_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_REQUEST_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if value not in SECONDS:
        parser.error(f"{REQUEST_TIMEOUT_ENV} must be {SECONDS}: got {raw!r}")
    return value


def auth_token_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """``--auth-token``, else TRIO_RUNTIME_TOKEN, else None (a token is generated). A token that is empty or
    only whitespace is refused wherever it comes from: ``--auth-token "$UNSET"`` in a script used to turn
    auth off. An empty variable is refused too rather than read as unset: set on purpose, it is the same
    script bug; to use the generated token, unset it."""
    source, token = "--auth-token", args.auth_token
    if token is None and os.environ.get(TOKEN_ENV) is not None:
        source, token = TOKEN_ENV, os.environ[TOKEN_ENV]
    if token is not None and (problem := token_problem(token)):
        parser.error(f"{source} {problem}. Give a real token, or leave {TOKEN_ENV} unset and --auth-token out "
                     "to use the generated one.")
    return token


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model backend options, shared by ``serve`` and ``doctor``. The API key has no flag on purpose:
    command lines end up in ``ps`` and shell history; it is read from TRIO_RUNTIME_MODEL_API_KEY only."""
    parser.add_argument("--model", choices=("scripted", "openai"), default="scripted",
                        help="model backend: the offline scripted model, or an OpenAI-compatible server")
    parser.add_argument("--model-base-url", default=_env(BASE_URL_ENV), metavar="URL",
                        help=f"the server's OpenAI API base, e.g. http://127.0.0.1:8080/v1 [{BASE_URL_ENV}]")
    parser.add_argument("--model-name", default=_env(MODEL_NAME_ENV), metavar="NAME",
                        help=f"the model to ask for, as GET <base>/models lists it [{MODEL_NAME_ENV}]")
    parser.add_argument("--tools", "--model-tools", dest="tools", choices=("none", "demo"), default="none",
                        help="tools offered to the model, whatever the backend: none (default), or demo (get_time;"
                             " write_note and wait, which need approval). --model-tools is an old alias")
    parser.add_argument("--model-read-timeout", type=float, default=DEFAULT_READ_TIMEOUT, metavar="SECONDS",
                        help="a turn fails when the model server sends nothing for this long (default 60)")
    parser.add_argument("--model-max-tokens", type=int, default=None, metavar="N",
                        help="ask the server to stop each answer after N tokens (default: the server's limit)")


def model_factory_from_args(parser: argparse.ArgumentParser,
                            args: argparse.Namespace) -> Callable[[], OpenAICompatModel] | None:
    """The RuntimeConfig.model_factory for the chosen backend (None: the scripted model). Refuses (exit 2)
    model flags outside their range, whichever backend is chosen."""
    check_numbers(parser, args, MODEL_NUMBERS)
    if args.model == "scripted":
        return None
    missing = [flag for flag, value in (("--model-base-url", args.model_base_url), ("--model-name", args.model_name))
               if not value]
    if missing:
        parser.error(f"--model openai needs {' and '.join(missing)} (or {BASE_URL_ENV} / {MODEL_NAME_ENV})")
    api_key = _env(API_KEY_ENV)
    log.info("model backend: openai at %s, model %r, API key %s, max tokens: %s", args.model_base_url,
             args.model_name, "set" if api_key else "not set", args.model_max_tokens or "server's limit")
    return lambda: OpenAICompatModel(args.model_base_url, args.model_name, api_key,
                                     read_timeout=args.model_read_timeout, max_tokens=args.model_max_tokens)


def tools_from_args(args: argparse.Namespace) -> ToolRegistry | None:
    """The RuntimeConfig.tools for ``--tools`` (None: no tools). The engine offers them to every backend."""
    run_log = os.environ.get(RUN_LOG_ENV)  # a test seam (see runtime.models.tools.RUN_LOG_ENV)
    tools = demo_registry(run_log=Path(run_log) if run_log else None) if args.tools == "demo" else None
    log.info("tools offered to the model: %s", ", ".join(tools.names) if tools else "none")
    return tools


def store_url_from(parser: argparse.ArgumentParser, value: str | None) -> str | None:
    """``--store``: "sqlite" (or nothing) is the default store (None); a postgresql:// URL is PostgreSQL;
    anything else exits 2 (the message never repeats the value: a URL may hold a password)."""
    if value in (None, "", "sqlite"):
        return None
    if not is_postgres_url(value):
        parser.error("--store must be sqlite or a postgresql:// URL")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trio-runtime", description="A local agent runtime server.")
    parser.add_argument("--version", action="version", version=f"trio-runtime {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (0 picks a free one; default 7878; {PORT})")
    serve.add_argument("--data-dir", type=Path, default=Path(_env("TRIO_RUNTIME_DATA_DIR", str(DEFAULT_DATA_DIR))),
                       help="where the database and sessions live [TRIO_RUNTIME_DATA_DIR]")
    auth = serve.add_mutually_exclusive_group()
    auth.add_argument("--auth-token", default=None,
                      help=f"bearer token clients must send [{TOKEN_ENV}]; default: generated")
    auth.add_argument("--insecure-no-auth", action="store_true", help="no auth (loopback hosts only)")
    serve.add_argument("--request-timeout", type=float, default=None,
                       help=f"seconds a request may wait on an engine [{REQUEST_TIMEOUT_ENV}] (default 10; {SECONDS})")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="allow this browser origin (repeatable); CORS is off without it")
    serve.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY,
                       help=f"largest request body in bytes (default 8 MiB; {MAX_BODY})")
    serve.add_argument("--sse-keepalive", type=float, default=DEFAULT_SSE_KEEPALIVE,
                       help=f"seconds between SSE keepalive comments (default 15; {SECONDS})")
    serve.add_argument("--sse-send-timeout", type=float, default=DEFAULT_SSE_SEND_TIMEOUT,
                       help="a client that takes no data for this many seconds is dropped, e.g. an SSE client that "
                            f"stopped reading (default 10; {SECONDS})")
    serve.add_argument("--graceful-timeout", type=float, default=DEFAULT_GRACEFUL_SECONDS,
                       help=f"seconds in-flight requests get to finish after SIGINT/SIGTERM (default 3; {SECONDS})")
    serve.add_argument("--idle-evict", type=float, default=None,
                       help=f"seconds before an idle engine is evicted (default 600; {IDLE_EVICT})")
    add_model_arguments(serve)
    serve.add_argument("--approval-timeout", type=float, default=DEFAULT_APPROVAL_TIMEOUT, metavar="SECONDS",
                       help="a tool call nobody allows or denies for this long is denied as expired"
                            f" (default 300; {APPROVAL_SECONDS})")
    serve.add_argument("--store", default=_env(STORE_ENV, "sqlite"), metavar="URL",
                       help="the database: sqlite (default: the data dir's SQLite file) or a postgresql:// URL shared"
                            f" by several hosts [{STORE_ENV}]")
    serve.add_argument("--host-id", default=None,
                       help="this host's name among the hosts of one PostgreSQL (default: generated once, kept in"
                            " <data-dir>/host_id)")
    serve.add_argument("--advertise-url", default=None, metavar="URL",
                       help="the URL other hosts forward this host's threads' requests to (default: the bound URL)")
    serve.add_argument("--lease-ttl", type=float, default=DEFAULT_LEASE_TTL, metavar="SECONDS",
                       help=f"seconds a thread's lease lasts unless its owner renews it (default 10; {SECONDS})")
    serve.add_argument("--session-storage", choices=SESSION_STORAGES,
                       default=_env(SESSION_STORAGE_ENV, "files"),
                       help="where saved sessions live: 'files' (JSON files under <data-dir>/sessions; the default)"
                            " or 'store' (the database, in the change's own transaction; always with PostgreSQL;"
                            f" {SESSION_STORAGE_ENV})")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    doctor = commands.add_parser("doctor", help="check that the configured model backend is reachable and serves"
                                                " the model; exit 0 if so, 1 with what is wrong")
    add_model_arguments(doctor)
    doctor.add_argument("--timeout", type=float, default=DEFAULT_DOCTOR_TIMEOUT, metavar="SECONDS",
                        help="bound on the check request (default 10)")
    doctor.add_argument("--data-dir", type=Path, default=Path(_env("TRIO_RUNTIME_DATA_DIR", str(DEFAULT_DATA_DIR))),
                        help="whose mcp.json servers to check (each is started, its tools listed, then stopped)"
                             " [TRIO_RUNTIME_DATA_DIR]")
    return parser


def settings_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServerSettings:
    """The serve flags and their environment variables, each checked (exit 2 with the reason otherwise)."""
    check_numbers(parser, args, SERVE_NUMBERS)
    return ServerSettings(
        host=args.host, port=args.port, data_dir=args.data_dir, auth_token=auth_token_from(parser, args),
        insecure_no_auth=args.insecure_no_auth, request_timeout=request_timeout_from(parser, args),
        cors_origins=tuple(args.cors_origin), max_body=args.max_body, sse_keepalive=args.sse_keepalive,
        sse_send_timeout=args.sse_send_timeout, graceful_seconds=args.graceful_timeout, log_level=args.log_level,
    )


@dataclasses.dataclass(frozen=True)
class RunningServer:
    url: str
    token: str | None
    runtime: Runtime
    app: Any


# hypercorn's default access line leaves the query string out; this one logs the whole URL, as most servers
# do (the query string after the '?', empty when there is none), with status, size and seconds taken.
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s?%(q)s HTTP/%(H)s" %(s)s %(b)s %(L)ss "%(a)s"'


def sign_in_line(url: str, token: str | None) -> str:
    """``open URL/#token=TOKEN``: the token rides in the fragment, which a browser never sends to the
    server; the page reads it, drops it from the address bar and exchanges it for the cookie (web/auth.py).
    Percent-encoded, so a token given with --auth-token survives in a URL whatever it holds."""
    return f"open {url}/" if token is None else f"open {url}/#token={quote(token, safe='')}"


async def run_server(settings: ServerSettings, runtime_config: RuntimeConfig, *, shutdown: trio.Event,
                     task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until ``shutdown`` is set, then shut down in order (see the module docstring).
    Reports a RunningServer (real URL, token) through ``task_status`` once it accepts connections.

    Once ``shutdown`` is set it returns within ``settings.graceful_seconds`` plus the Runtime's own close,
    whatever clients do: every write to a client is cut at the end of the grace (web/server.py)."""
    token = settings.auth_token
    if token is None and not settings.insecure_no_auth:
        token, created = load_or_create_token(settings.data_dir)
        where = settings.data_dir / TOKEN_FILE
        if created:
            print(f"trio-runtime auth token: {token} (saved to {where})", flush=True)
        else:
            print(f"trio-runtime auth token: read from {where}", flush=True)
    server.install()
    hyper = server.ServerConfig()
    hyper.bind = [f"[{settings.host}]:{settings.port}" if ":" in settings.host else f"{settings.host}:{settings.port}"]
    # An access log (each request's line, path and query string included) only at --log-level debug. No
    # URL the server receives holds the token when clients use the header or the dashboard's cookie.
    hyper.accesslog = logging.getLogger("hypercorn.access") if settings.log_level == "debug" else None
    hyper.access_log_format = ACCESS_LOG_FORMAT
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.graceful_timeout = settings.graceful_seconds
    hyper.send_bounds = bounds = server.SendBounds(settings.sse_send_timeout)
    async with Runtime.open(runtime_config) as rt:
        app = create_app(rt, settings, token)

        async def stop_serving() -> None:
            await shutdown.wait()
            # hypercorn gives in-flight requests the grace from now, but cannot stop a write that waits on
            # a client (its writes are shielded): cut those at the same moment.
            bounds.cut_off(trio.current_time() + settings.graceful_seconds)
            app.config["TRIO_RUNTIME_STREAMS"].close_all()  # SSE streams would otherwise run out the grace

        # hypercorn returns once stop_serving returned and in-flight requests finished (or the grace ran out)
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(hypercorn_serve, app, hyper, shutdown_trigger=stop_serving))
            url = binds[0] if binds else f"http://{settings.host}:{settings.port}"
            if rt.advertise_url is None:  # --advertise-url not given: the bound URL (other hosts forward there)
                rt.advertise_url = url
            print(f"trio-runtime listening on {url}", flush=True)
            print(f"trio-runtime dashboard: {sign_in_line(url, token)}", flush=True)
            task_status.started(RunningServer(url, token, rt, app))
        log.info("stopped accepting; interrupting running turns and flushing the store")
    log.info("shutdown complete")


async def serve(settings: ServerSettings, runtime_config: RuntimeConfig) -> None:
    """``run_server`` until SIGINT or SIGTERM; a second signal while it shuts down exits at once."""
    shutdown = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def on_signal() -> None:
            # Keeps reading signals for the whole shutdown: a signal nobody reads is swallowed, and
            # "press Ctrl-C again" is how people stop a server whose shutdown takes too long.
            async for signum in signals:
                name = signal.Signals(signum).name
                if not shutdown.is_set():
                    log.info("received %s, shutting down (send it again to exit at once)", name)
                    shutdown.set()
                    continue
                code = 128 + signum  # the shell's code for "killed by this signal"
                log.warning("received %s again during shutdown: exiting at once with code %d", name, code)
                sys.stdout.flush()
                sys.stderr.flush()
                # Like a kill: no cleanup runs. Safe for the data: SQLite (WAL) and the atomic session
                # writes are built to survive kill -9 at any point (tests/reliability/test_kill9.py).
                os._exit(code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(on_signal)
            await run_server(settings, runtime_config, shutdown=shutdown)
            nursery.cancel_scope.cancel()


# Container allocations (net of frees) between two young-generation collections; CPython's default is 700
# (3.13 raised it to 2,000). Under 50 keep-alive connections a collection every ~16 requests found the
# objects of every request in flight alive, promoted them and walked them again in the older generation:
# at 10,000 `/health` costs 1.9% fewer instructions and serves ~3% more requests per CPU second (issue 16,
# the floor under load). What it can cost: up to that many young objects waiting (~1-2 MB), and cyclic
# garbage is found a little later.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """The collector's settings for a server process, set once before it starts serving.

    A full garbage collection walks every tracked object, and what start-up made (modules, classes, the
    parser) lives as long as the process: it is moved out of the collector's reach once. A 12 MB session's
    parse makes thousands of containers and so triggers full collections; each held the GIL, and with it
    the event loop, for 30-60 ms before (docs/design.md, big sessions). The older generations keep
    CPython's thresholds."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "doctor":
        check_numbers(parser, args, MODEL_NUMBERS + DOCTOR_NUMBERS)
        return run_doctor(model=args.model, base_url=args.model_base_url, model_name=args.model_name,
                          api_key=_env(API_KEY_ENV), timeout=args.timeout, max_tokens=args.model_max_tokens,
                          data_dir=args.data_dir)
    settings = settings_from_args(parser, args)
    if settings.insecure_no_auth and not is_loopback(settings.host):
        parser.error(f"--insecure-no-auth is refused on the non-loopback host {settings.host!r}: "
                     "anyone on the network could drive your agents. Use --auth-token instead.")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    model_factory = model_factory_from_args(parser, args)
    if args.session_storage not in SESSION_STORAGES:  # argparse checks a flag's value, not an env default
        parser.error(f"{SESSION_STORAGE_ENV} must be one of: {', '.join(SESSION_STORAGES)}, "
                     f"not {args.session_storage!r}")
    config = RuntimeConfig(data_dir=settings.data_dir, model_factory=model_factory,
                           session_storage=args.session_storage,
                           default_model=args.model_name if model_factory else "scripted",
                           tools=tools_from_args(args), approval_timeout=args.approval_timeout,
                           store_url=store_url_from(parser, args.store), host_id=args.host_id,
                           advertise_url=args.advertise_url, lease_ttl=args.lease_ttl,
                           **({"idle_evict_seconds": args.idle_evict} if args.idle_evict is not None else {}))
    tune_gc()
    trio.run(serve, settings, config)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
