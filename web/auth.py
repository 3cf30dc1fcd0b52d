"""Auth for ``/v1/*``: a bearer token (``Authorization: Bearer``, or ``?token=`` for older EventSource
clients), or the dashboard's cookie, which ``POST /v1/auth/cookie`` sets in exchange for the token.

The cookie's value is an HMAC of a fixed label keyed by the token (``cookie_value``): the server keeps no
session table, so the cookie stays valid across restarts while the token is unchanged, stops working when
the token changes, and a cookie that leaks does not reveal the token (docs/design.md, "Dashboard sign-in").
A cookie-authenticated request that changes state must carry an ``Origin`` equal to the server's own
origin, else 403 ``forbidden_origin``: that is the CSRF defence (a bearer request cannot be forged by
another page, so it is not checked).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Callable

from quart import Blueprint, Quart, Response, current_app, request

from . import idempotency
from .api import route
from .errors import error_response

TOKEN_FILE = "runtime.token"

# The cookie's name is this prefix and the server's port: cookies are not kept apart by port, so two
# servers on one host (127.0.0.1:7878 and 127.0.0.1:7879, each with its own token) would otherwise
# overwrite each other's sign-in in the same browser.
COOKIE_PREFIX = "trio_runtime_auth_"
# What the HMAC signs. Changing it (v2) signs out every page without changing the token.
COOKIE_LABEL = b"trio-runtime dashboard cookie v1"
# How long a browser keeps the cookie: a month of not opening the page, then the page asks for the
# token again (the startup line prints the sign-in URL). The cookie is only as valid as the token.
COOKIE_MAX_AGE = 30 * 24 * 3600
# Methods that change state (RFC 9110 "unsafe" methods the API has); OPTIONS is answered by web/cors.py.
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

bp = Blueprint("auth", __name__, url_prefix="/v1/auth")


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be a bearer token, or None. Blank: every client that sends nothing would match
    (``?token=``). Whitespace at either end: clients' Authorization headers are stripped, so it would never
    match there."""
    if not token.strip():
        return "is empty" if token == "" else "is only whitespace"
    if token != token.strip():
        return "starts or ends with whitespace"
    return None


def cookie_value(token: str) -> str:
    """HMAC-SHA256 of COOKIE_LABEL keyed by the token, base64url without padding (43 characters)."""
    digest = hmac.new(token.encode(), COOKIE_LABEL, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def cookie_name() -> str:
    """COOKIE_PREFIX and the port of the host the request was made to (80/443 when the Host has none)."""
    host = request.host
    port = host.rpartition(":")[2] if not host.endswith("]") else ""
    if not port.isdigit():
        port = "443" if request.scheme == "https" else "80"
    return COOKIE_PREFIX + port


def own_origin() -> str:
    """The origin the request was made to: scheme://host[:port] from the Host header. A page served by this
    server sends exactly this as its Origin. Trusting Host is safe here: a forged Host changes nothing for a
    browser on another site, whose Origin is its own; and a DNS-rebound name (Host = Origin = evil.example)
    never carries the cookie, which the browser keeps for 127.0.0.1."""
    return f"{request.scheme}://{request.host}"


def install(app: Quart, token: str | None, cors_origins: tuple[str, ...] = ()) -> Callable[[], Response | None]:
    """Returns the check every request passes (None: let in; else the refusal to send), which web/app.py
    runs in its one before-request hook.

    ``token`` None: no auth (the CLI allows that only with ``--insecure-no-auth`` on loopback). Any other
    token must pass ``token_problem``: an empty one would authorize every request that sends an empty one.

    Without auth a page of ANY site the user visits could drive the agents: a "simple" cross-origin POST
    (``text/plain``, no preflight) reaches the route, and the body is parsed whatever its type. So a
    state change that carries an ``Origin`` must come from the server's own origin or a ``--cors-origin``
    (403 ``forbidden_origin`` otherwise). Browsers send Origin with every POST/PUT/PATCH/DELETE; clients
    that are not browsers (curl, scripts, the typed client) send none and are let in, as before."""
    app.config["TRIO_RUNTIME_COOKIE"] = None
    if token is None:
        trusted = frozenset(cors_origins)

        def refuse_foreign_pages() -> Response | None:
            if not request.path.startswith("/v1/") or request.method not in STATE_CHANGING:
                return None
            origin = request.headers.get("Origin")
            if origin is None or origin == own_origin() or origin in trusted:
                return None
            return error_response(
                403, "forbidden_origin",
                f"Refusing a {request.method} from origin {origin!r} on a server without auth: only "
                f"{own_origin()} (or a --cors-origin) may change state")
        return refuse_foreign_pages
    if problem := token_problem(token):
        raise ValueError(f"refusing to serve with this auth token: it {problem}")
    expected = token.encode()
    expected_cookie = cookie_value(token).encode()
    app.config["TRIO_RUNTIME_COOKIE"] = expected_cookie.decode()

    def require_token() -> Response | None:
        if not request.path.startswith("/v1/") or request.method == "OPTIONS":
            return None
        if request.path.rstrip("/") == "/v1/auth/cookie" and request.method == "DELETE":
            return None  # signing out needs no credentials: it only expires the cookie (sign_out)
        header = request.headers.get("Authorization")
        if header is None and "token" not in request.args:
            return _check_cookie(request.cookies.get(cookie_name()), expected_cookie)
        header = header or ""
        supplied = header[7:].strip() if header[:7].lower() == "bearer " else request.args.get("token")
        # compare_digest: the time taken does not reveal how much of a guess was right. An empty token never
        # authorizes (install refused an empty expected one; this says so again where the decision is made).
        if not supplied or not hmac.compare_digest(supplied.encode(), expected):
            return _unauthorized()
        return None

    return require_token


def _check_cookie(supplied: str | None, expected: bytes) -> Response | None:
    """No credentials but perhaps the cookie: 401 without a right one; 403 for a state change whose Origin
    is missing or another origin's (a browser sends Origin with every fetch that is not a GET or HEAD)."""
    if not supplied or not hmac.compare_digest(supplied.encode(), expected):
        return _unauthorized()
    if request.method in STATE_CHANGING:
        origin = request.headers.get("Origin")
        if origin != own_origin():
            return error_response(
                403, "forbidden_origin",
                f"Refusing a cookie-authenticated {request.method} from origin {origin!r}: it must come from "
                f"{own_origin()} (or send 'Authorization: Bearer TOKEN')")
    return None


def _unauthorized() -> Response:
    response = error_response(401, "unauthorized", "Missing or wrong token: send 'Authorization: Bearer TOKEN' "
                                                   "or ?token=TOKEN, or sign in at / for the cookie")
    response.headers["WWW-Authenticate"] = 'Bearer realm="trio-runtime"'
    return response


def _set_cookie(response: Response, value: str, max_age: int) -> None:
    # No Secure attribute: the server speaks plain http on 127.0.0.1, and a browser never sends a Secure
    # cookie over http (it would never come back). Loopback traffic does not leave the machine; for a
    # remote host, put TLS in front and the cookie still works (Secure would only be an addition).
    response.set_cookie(cookie_name(), value, max_age=max_age, path="/", httponly=True, samesite="Strict")


@route(bp, "/cookie", "POST", summary="Exchange the bearer token for the dashboard's sign-in cookie "
       "(HttpOnly, SameSite=Strict); 204, no cookie when the server runs without auth", status=204,
       errors=(400,), headers=((idempotency.HEADER, "Accepted like on every POST, and checked (400 when "
                                "malformed), but nothing is stored: every call answers the same",
                                idempotency.OPENAPI_HEADER[2]),))
async def sign_in():
    idempotency.parse_key()  # the rule every POST keeps: a malformed key is a 400, not silently ignored
    response = Response("", status=204)
    value = current_app.config["TRIO_RUNTIME_COOKIE"]
    if value is not None:  # None: --insecure-no-auth, where every request is let in and no cookie is needed
        _set_cookie(response, value, COOKIE_MAX_AGE)
    return response


@route(bp, "/cookie", "DELETE", summary="Sign out: expire the sign-in cookie (no credentials needed)",
       status=204, public=True)
async def sign_out():
    response = Response("", status=204)
    _set_cookie(response, "", 0)
    return response


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
