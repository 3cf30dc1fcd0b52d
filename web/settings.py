"""Server settings: CLI flags and their environment equivalents, with documented defaults."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7878
DEFAULT_DATA_DIR = Path("./.trio-runtime")
DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_MAX_BODY = 8 * 1024 * 1024
# SSE comment every 15 s keeps proxies and idle-connection reapers from closing a quiet stream.
DEFAULT_SSE_KEEPALIVE = 15.0
# After SIGINT/SIGTERM, in-flight requests get this long to finish before they are cancelled.
DEFAULT_GRACEFUL_SECONDS = 3.0
# A write to a client that takes nothing for this long drops the connection (API.md v1.1, hardening
# rules: "an SSE client that stops reading is dropped after --sse-send-timeout (default 10 s)").
DEFAULT_SSE_SEND_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = DEFAULT_DATA_DIR
    auth_token: str | None = None
    insecure_no_auth: bool = False
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    cors_origins: tuple[str, ...] = ()
    max_body: int = DEFAULT_MAX_BODY
    sse_keepalive: float = DEFAULT_SSE_KEEPALIVE
    sse_send_timeout: float = DEFAULT_SSE_SEND_TIMEOUT
    graceful_seconds: float = DEFAULT_GRACEFUL_SECONDS
    log_level: str = "info"


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
