"""Bearer-token auth for ``/v1/*`` (``Authorization: Bearer`` or ``?token=`` for EventSource clients)."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from quart import Quart, request

from .errors import error_response

TOKEN_FILE = "runtime.token"


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be a bearer token, or None. Blank: every client that sends nothing would match
    (``?token=``). Whitespace at either end: clients' Authorization headers are stripped, so it would never
    match there."""
    if not token.strip():
        return "is empty" if token == "" else "is only whitespace"
    if token != token.strip():
        return "starts or ends with whitespace"
    return None


def install(app: Quart, token: str | None) -> None:
    """``token`` None: no auth (the CLI allows that only with ``--insecure-no-auth`` on loopback). Any other
    token must pass ``token_problem``: an empty one would authorize every request that sends an empty one."""
    if token is None:
        return
    if problem := token_problem(token):
        raise ValueError(f"refusing to serve with this auth token: it {problem}")
    expected = token.encode()

    @app.before_request
    async def require_token():
        if not request.path.startswith("/v1/") or request.method == "OPTIONS":
            return None
        header = request.headers.get("Authorization", "")
        supplied = header[7:].strip() if header[:7].lower() == "bearer " else request.args.get("token")
        # compare_digest: the time taken does not reveal how much of a guess was right. An empty token never
        # authorizes (install refused an empty expected one; this says so again where the decision is made).
        if not supplied or not hmac.compare_digest(supplied.encode(), expected):
            response = error_response(401, "unauthorized",
                                      "Missing or wrong token: send 'Authorization: Bearer TOKEN' or ?token=TOKEN")
            response.headers["WWW-Authenticate"] = 'Bearer realm="trio-runtime"'
            return response
        return None


def load_or_create_token(data_dir: Path) -> tuple[str, bool]:
    """The token in ``<data-dir>/runtime.token``, created (mode 0600, atomically) if missing or blank.
    Returns ``(token, created)``; reusing it keeps existing clients working across restarts. A file holding
    only whitespace (truncated by hand, or by a full disk) is replaced, never read as an empty token."""
    path = data_dir / TOKEN_FILE
    try:
        token = path.read_text().strip()
        if token:
            return token, False
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return token, True
