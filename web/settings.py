"""Server settings: CLI flags and their environment equivalents, with documented defaults."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
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
class Bound:
    """The values a numeric flag accepts. Both ends are included; NaN and infinities never are."""

    low: float
    high: float
    unit: str = ""

    def __contains__(self, value: float) -> bool:
        return math.isfinite(value) and self.low <= value <= self.high

    def __str__(self) -> str:
        return f"between {show(self.low)} and {show(self.high)}{' ' + self.unit if self.unit else ''}"


def show(value: float) -> str:
    """A number as a person would write it: 1024 not 1024.0 or 1.024e+03; 0.1; nan; inf."""
    return str(int(value)) if math.isfinite(value) and value == int(value) else f"{value:g}"


# Accepted ranges of the numeric flags and environment variables. The low ends keep a value from
# disabling what it bounds (a 0 s keepalive spins, a 0 s timeout fails every request); the high ends
# catch a unit mistake (milliseconds typed as seconds) and stay far from what a deployment needs.
PORT = Bound(0, 65535)
SECONDS = Bound(0.1, 3600, "seconds")  # every timeout, the keepalive and the grace period
IDLE_EVICT = Bound(1, 7 * 24 * 3600, "seconds")  # up to a week
MAX_BODY = Bound(1024, 1024**3, "bytes")  # 1 KiB to 1 GiB: a body is held in memory while it is parsed
MAX_TOKENS = Bound(1, 1_000_000, "tokens")
# A person may take a while to answer an approval, but a week unanswered is a forgotten turn.
APPROVAL_SECONDS = Bound(0.1, 7 * 24 * 3600, "seconds")  # the largest context windows served today are about 1M tokens


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
