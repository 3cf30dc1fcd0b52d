"""The dashboard's files: ``GET /`` (``index.html``) and ``GET /static/<path>``, from ``web/static/``
(package data: pyproject.toml ships them in the wheel), public (the page signs itself in: web/auth.py).

The files are read once, when the app is made, into a table keyed by their path under the folder; a
request is answered from that table or gets 404. So no request path, however it is spelt (``..``, encoded
slashes, absolute paths, symlinks added later), can reach another file. Files whose name starts with a dot
are left out. Each file has an ETag (its SHA-256): the names carry no hash, so the answer says
``Cache-Control: no-cache`` (the browser asks again each time and gets a 304 while the file is unchanged).
Text files are sent gzipped to clients that accept it (``Vary: Accept-Encoding``; that variant's ETag ends
in ``-gz``).

Every answer here carries SECURITY_HEADERS: a Content-Security-Policy that allows only this origin's
own files (no inline script, no inline style, no remote origin), nosniff and no-referrer.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import mimetypes
from functools import partial
from pathlib import Path

import trio

from quart import Blueprint, Quart, Response, current_app, request

from .errors import error_response

STATIC_DIR = Path(__file__).with_name("static")

# default-src 'self' and nothing else: no inline script or style, no eval, no remote origin; data: images
# only (small icons). connect-src 'self' covers fetch and EventSource to this server. object-src and
# base-uri close the plugin and <base> tricks that default-src does not; frame-ancestors forbids framing
# (clickjacking). form-action: a <form> can post only here.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",  # a file is only ever what its Content-Type says
    "Referrer-Policy": "no-referrer",  # links out of the page do not tell where they came from
    "Cross-Origin-Opener-Policy": "same-origin",
}
# Content types by suffix, fixed here rather than taken from the system's mime.types (which varies, and
# gave .js as application/x-javascript on some systems).
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".json": "application/json", ".map": "application/json", ".svg": "image/svg+xml",
    ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2", ".txt": "text/plain; charset=utf-8",
}
CACHE_CONTROL = "no-cache"

bp = Blueprint("pages", __name__)


# Text files at least this big are also sent gzipped to a client that accepts it (smaller ones gain less
# than the header costs). Compressed on first request, in a worker thread, and kept: Swagger UI's bundle
# (1.7 MB) goes out as ~0.5 MB. Level 6: zlib's default, most of level 9's gain for a fraction of its time.
GZIP_MIN_SIZE = 1024
GZIP_LEVEL = 6
COMPRESSIBLE = ("text/", "application/json", "image/svg+xml")


@dataclasses.dataclass
class StaticFile:
    body: bytes
    content_type: str
    etag: str
    gzipped: bytes | None = None  # filled on first use (see gzipped_body)

    @property
    def compressible(self) -> bool:
        return len(self.body) >= GZIP_MIN_SIZE and self.content_type.startswith(COMPRESSIBLE)

    @property
    def gzip_etag(self) -> str:
        return self.etag[:-1] + '-gz"'  # another representation, another ETag (RFC 9110 8.8.3)

    async def gzipped_body(self) -> bytes:
        """The gzip of ``body``, made once (mtime 0: the same bytes every time). A cancellation leaves it
        unmade (the thread's result is dropped) and the next request makes it."""
        if self.gzipped is None:
            self.gzipped = await trio.to_thread.run_sync(partial(gzip.compress, self.body, GZIP_LEVEL, mtime=0))
        return self.gzipped


def load_dir(root: Path) -> dict[str, StaticFile]:
    """Every regular file under ``root`` (not followed through symlinks, no dot-files), keyed by its
    '/'-separated path relative to ``root``. A missing folder is an empty table."""
    files: dict[str, StaticFile] = {}
    if not root.is_dir():
        return files
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or path.is_symlink() or not path.is_file():
            continue
        body = path.read_bytes()
        content_type = CONTENT_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] \
            or "application/octet-stream"
        files[relative.as_posix()] = StaticFile(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')
    return files


def install(app: Quart) -> None:
    install_files(app, STATIC_DIR)
    app.register_blueprint(bp)


def install_files(app: Quart, root: Path) -> None:
    """Serve the files under ``root`` (a test seam: the shipped folder is STATIC_DIR)."""
    app.config["TRIO_RUNTIME_STATIC"] = load_dir(root)


async def serve_file(table: dict[str, StaticFile], name: str, *, csp: str = CSP) -> Response:
    """``name`` from ``table`` with its type, ETag and the security headers; 304 when the client's
    If-None-Match names its ETag; 404 JSON when the table has no such name."""
    file = table.get(name)
    if file is None:
        response = error_response(404, "not_found", f"No such file: /{request.path.lstrip('/')}")
        response.headers.update({**SECURITY_HEADERS, "Content-Security-Policy": csp})
        return response
    gzipped = file.compressible and request.accept_encodings["gzip"] > 0
    etag = file.gzip_etag if gzipped else file.etag
    if etag in {tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")}:
        response = Response("", status=304)
    elif gzipped:
        response = Response(await file.gzipped_body(), content_type=file.content_type)
        response.headers["Content-Encoding"] = "gzip"
    else:
        response = Response(file.body, content_type=file.content_type)
    response.headers.update({**SECURITY_HEADERS, "Content-Security-Policy": csp,
                             "ETag": etag, "Cache-Control": CACHE_CONTROL})
    if file.compressible:
        response.headers["Vary"] = "Accept-Encoding"
    return response


@bp.route("/", methods=["GET"])
async def index():
    return await serve_file(current_app.config["TRIO_RUNTIME_STATIC"], "index.html")


@bp.route("/static/<path:name>", methods=["GET"])
async def static_file(name: str):
    return await serve_file(current_app.config["TRIO_RUNTIME_STATIC"], name)
