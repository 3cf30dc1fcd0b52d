"""The dashboard's files (web/pages.py) and the cookie sign-in (web/auth.py), through Quart's in-process
client (no socket: fast coverage of every path trick and header; tests/e2e/test_auth_cors.py drives the
same over a real server)."""

from __future__ import annotations

import gzip
import hashlib
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from runtime import Runtime, RuntimeConfig
from web import auth, pages
from web.app import create_app
from web.openapi import APIDOCS_DIR
from web.settings import ServerSettings

AUTH = {"Authorization": "Bearer t"}
ROOT = Path(__file__).resolve().parents[2]
HOST = {"Host": "127.0.0.1:7878"}
COOKIE_NAME = "trio_runtime_auth_7878"
OWN = "http://127.0.0.1:7878"


@pytest.fixture
async def runtime(tmp_path):
    async with Runtime.open(RuntimeConfig(data_dir=tmp_path / "data")) as rt:
        yield rt


def make_client(runtime, tmp_path, token="t", static=None):
    app = create_app(runtime, ServerSettings(data_dir=tmp_path / "data", auth_token=token), token)
    if static is not None:
        pages.install_files(app, static)
    return app.test_client(use_cookies=False)


@pytest.fixture
def static(tmp_path):
    root = tmp_path / "static"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><p>index</p>")
    (root / "app.js").write_text("console.log('app');")
    (root / "app.css").write_text("body{}")
    (root / "sub" / "icon.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / "blob.bin").write_bytes(b"\x00\x01")
    (root / ".hidden").write_text("secret")
    (tmp_path / "outside.txt").write_text("outside the folder")
    (root / "link.txt").symlink_to(tmp_path / "outside.txt")
    return root


def assert_security_headers(response):
    assert response.headers["Content-Security-Policy"] == pages.CSP
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"


async def test_index_and_static_files_are_served_with_type_etag_and_csp(runtime, tmp_path, static):
    client = make_client(runtime, tmp_path, static=static)
    expected = {"/": ("index.html", "text/html; charset=utf-8"),
                "/static/index.html": ("index.html", "text/html; charset=utf-8"),
                "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
                "/static/app.css": ("app.css", "text/css; charset=utf-8"),
                "/static/sub/icon.svg": ("sub/icon.svg", "image/svg+xml"),
                "/static/blob.bin": ("blob.bin", "application/octet-stream")}
    for url, (name, content_type) in expected.items():
        response = await client.get(url)  # no token: the page is public, it signs in itself
        body = (static / name).read_bytes()
        assert response.status_code == 200, url
        assert await response.get_data() == body
        assert response.headers["Content-Type"] == content_type
        assert response.headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        assert response.headers["Cache-Control"] == "no-cache"
        assert_security_headers(response)
        again = await client.get(url, headers={"If-None-Match": response.headers["ETag"]})
        assert again.status_code == 304 and await again.get_data() == b""
        assert again.headers["ETag"] == response.headers["ETag"]
        stale = await client.get(url, headers={"If-None-Match": '"0000"'})
        assert stale.status_code == 200 and await stale.get_data() == body


@pytest.mark.parametrize("path", [
    "/static/../auth.py", "/static/..%2fauth.py", "/static/%2e%2e/auth.py", "/static/sub/../../auth.py",
    "/static//etc/passwd", "/static/.hidden", "/static/link.txt", "/static/sub", "/static/sub/",
    "/static/", "/static/nope.js", "/static/app.js/", "/static/APP.JS", "/static/app.js%00.html",
    "/static/%2fetc%2fpasswd", "/static/..\\auth.py",
])
async def test_path_tricks_are_refused(runtime, tmp_path, static, path):
    client = make_client(runtime, tmp_path, static=static)
    response = await client.get(path)
    if response.status_code == 308:  # werkzeug merges '//' into '/' by a redirect: it must stay in /static/
        location = response.headers["Location"]
        assert location.startswith(("/static/", "http://localhost/static/")), location
        response = await client.get(location)
    assert response.status_code == 404
    data = await response.get_data()
    assert b"outside the folder" not in data and b"secret" not in data and b"import" not in data


async def test_the_shipped_files_are_package_data(runtime, tmp_path):
    """Every file the server would serve from web/static and web/apidocs matches pyproject's package-data, so a wheel
    (an installed server) has it; and the shipped index.html is what / answers."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["web"]
    for folder in (pages.STATIC_DIR, APIDOCS_DIR):
        shipped = pages.load_dir(folder)
        assert "index.html" in shipped
        for name in shipped:
            assert any(fnmatch(f"{folder.name}/{name}", pattern) for pattern in patterns), name
    response = await make_client(runtime, tmp_path).get("/")
    assert response.status_code == 200
    assert await response.get_data() == (pages.STATIC_DIR / "index.html").read_bytes()
    assert_security_headers(response)


def test_the_csp_forbids_inline_script_and_remote_origins():
    directives = {d.split()[0]: d.split()[1:] for d in pages.CSP.split("; ")}
    assert directives["default-src"] == ["'self'"] and directives["script-src"] == ["'self'"]
    assert directives["object-src"] == ["'none'"] and directives["frame-ancestors"] == ["'none'"]
    for sources in directives.values():
        for source in sources:
            assert source in ("'self'", "'none'", "data:"), source


async def sign_in(client, headers=AUTH):
    response = await client.post("/v1/auth/cookie", headers={**HOST, **headers})
    assert response.status_code == 204
    return response


async def test_cookie_sign_in_sets_an_httponly_strict_cookie_derived_from_the_token(runtime, tmp_path):
    client = make_client(runtime, tmp_path)
    response = await sign_in(client)
    cookie = response.headers["Set-Cookie"]
    attributes = [part.strip() for part in cookie.split(";")]
    assert attributes[0] == f"{COOKIE_NAME}={auth.cookie_value('t')}"
    assert "HttpOnly" in attributes and "SameSite=Strict" in attributes and "Path=/" in attributes
    assert f"Max-Age={auth.COOKIE_MAX_AGE}" in attributes
    assert not any(a.lower() == "secure" for a in attributes)  # plain http on 127.0.0.1 (see _set_cookie)
    assert "t" != auth.cookie_value("t") and len(auth.cookie_value("t")) == 43
    assert auth.cookie_value("t") != auth.cookie_value("u")
    # Without the bearer token there is no cookie to be had.
    refused = await client.post("/v1/auth/cookie", headers={**HOST, "Authorization": "Bearer wrong"})
    assert refused.status_code == 401 and "Set-Cookie" not in refused.headers


async def test_cookie_authorizes_reads_and_same_origin_writes_only(runtime, tmp_path):
    client = make_client(runtime, tmp_path)
    cookie = {"Cookie": f"{COOKIE_NAME}={auth.cookie_value('t')}", **HOST}
    assert (await client.get("/v1/threads", headers=cookie)).status_code == 200
    created = await client.post("/v1/threads", headers={**cookie, "Origin": OWN}, json={})
    assert created.status_code == 201
    thread_id = (await created.get_json())["id"]
    for origin in (None, "http://evil.example", "null", "http://127.0.0.1:7879", "https://127.0.0.1:7878",
                   OWN + "/"):
        headers = {**cookie, **({"Origin": origin} if origin is not None else {})}
        for method, url, body in (("POST", "/v1/threads", {}), ("PATCH", f"/v1/threads/{thread_id}", {"title": "x"}),
                                  ("PUT", "/v1/sessions", {"thread_id": thread_id}),
                                  ("DELETE", "/v1/sessions/nope", None)):
            response = await client.open(url, method=method, headers=headers, json=body)
            assert response.status_code == 403, (origin, method)
            error = (await response.get_json())["error"]
            assert error["code"] == "forbidden_origin" and OWN in error["message"]
    threads = await (await client.get("/v1/threads", headers=cookie)).get_json()
    assert [(t["id"], t.get("title")) for t in threads] == [(thread_id, None)]  # nothing refused took effect
    # Bearer requests are not checked for Origin.
    bearer = await client.post("/v1/threads", headers={**AUTH, "Origin": "http://evil.example"}, json={})
    assert bearer.status_code == 201


@pytest.mark.parametrize("cookie", ["", "x", auth.cookie_value("other-token"), auth.cookie_value("t") + "x"])
async def test_a_wrong_cookie_is_401(runtime, tmp_path, cookie):
    client = make_client(runtime, tmp_path)
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}", **HOST}
    response = await client.get("/v1/threads", headers=headers)
    assert response.status_code == 401 and (await response.get_json())["error"]["code"] == "unauthorized"
    write = await client.post("/v1/threads", headers={**headers, "Origin": OWN}, json={})
    assert write.status_code == 401
    assert await runtime.list_threads(limit=10) == []


async def test_the_cookie_of_another_port_or_a_wrong_bearer_does_not_authorize(runtime, tmp_path):
    client = make_client(runtime, tmp_path)
    value = auth.cookie_value("t")
    other_port = await client.get("/v1/threads", headers={**HOST, "Cookie": f"trio_runtime_auth_7879={value}"})
    assert other_port.status_code == 401
    # A request that sends a token is judged by it alone: a right cookie does not rescue a wrong token.
    wrong = await client.get("/v1/threads", headers={**HOST, "Cookie": f"{COOKIE_NAME}={value}",
                                                     "Authorization": "Bearer wrong"})
    assert wrong.status_code == 401


async def test_sign_out_expires_the_cookie_without_credentials(runtime, tmp_path):
    client = make_client(runtime, tmp_path)
    response = await client.delete("/v1/auth/cookie", headers=HOST)
    assert response.status_code == 204 and await response.get_data() == b""
    attributes = [part.strip() for part in response.headers["Set-Cookie"].split(";")]
    assert attributes[0] == f"{COOKIE_NAME}=" and "Max-Age=0" in attributes and "HttpOnly" in attributes


async def test_without_auth_the_cookie_route_answers_204_and_sets_nothing(runtime, tmp_path):
    app = create_app(runtime, ServerSettings(data_dir=tmp_path / "data", insecure_no_auth=True), None)
    client = app.test_client(use_cookies=False)
    response = await client.post("/v1/auth/cookie", headers=HOST)
    assert response.status_code == 204 and "Set-Cookie" not in response.headers
    assert (await client.get("/v1/threads", headers=HOST)).status_code == 200


async def test_without_auth_a_foreign_page_cannot_change_state(runtime, tmp_path):
    """With --insecure-no-auth any site's page could POST a "simple" text/plain body cross-origin and
    drive the agents; a state change that carries a foreign Origin is refused and changes nothing. Same
    origin, a --cors-origin, and clients that send no Origin (curl, scripts) are let in; reads too."""
    settings = ServerSettings(data_dir=tmp_path / "data", insecure_no_auth=True,
                              cors_origins=("http://editor.local",))
    client = create_app(runtime, settings, None).test_client(use_cookies=False)
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999"):
        refused = await client.post("/v1/threads", data="{}", headers={
            **HOST, "Origin": origin, "Content-Type": "text/plain"})
        assert refused.status_code == 403, origin
        assert (await refused.get_json())["error"]["code"] == "forbidden_origin"
    assert (await (await client.get("/v1/threads", headers={**HOST, "Origin": "http://evil.example"}))
            .get_json()) == []
    for headers in ({"Origin": OWN}, {"Origin": "http://editor.local"}, {}):
        created = await client.post("/v1/threads", json={}, headers={**HOST, **headers})
        assert created.status_code == 201, headers
    assert len((await (await client.get("/v1/threads", headers=HOST)).get_json())) == 3


async def test_the_cookie_routes_are_in_openapi(runtime, tmp_path):
    spec = await (await make_client(runtime, tmp_path).get("/openapi.json")).get_json()
    post = spec["paths"]["/v1/auth/cookie"]["post"]
    assert set(post["responses"]) == {"204", "400", "401", "403"} and post["security"] == [{"bearer": []}]
    assert [p["name"] for p in post["parameters"]] == ["Idempotency-Key"]
    delete = spec["paths"]["/v1/auth/cookie"]["delete"]
    assert set(delete["responses"]) == {"204"} and "security" not in delete
    # Every state change a cookie could make documents the Origin refusal; no read does.
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            cookie_write = "security" in op and method in ("post", "put", "patch", "delete")
            assert ("403" in op["responses"]) == cookie_write, (method, path)


async def test_sign_in_checks_an_idempotency_key_like_every_post(runtime, tmp_path):
    client = make_client(runtime, tmp_path)
    for _ in range(2):  # the same key twice: the same answer, nothing stored
        same = await client.post("/v1/auth/cookie", headers={**HOST, **AUTH, "Idempotency-Key": "k-1"})
        assert same.status_code == 204 and "Idempotent-Replayed" not in same.headers
        assert same.headers["Set-Cookie"].startswith(f"{COOKIE_NAME}={auth.cookie_value('t')};")
    bad = await client.post("/v1/auth/cookie", headers={**HOST, **AUTH, "Idempotency-Key": "has space"})
    assert bad.status_code == 400 and "Set-Cookie" not in bad.headers
    assert "Idempotency-Key" in (await bad.get_json())["error"]["message"]


async def test_no_file_of_the_working_directory_is_served(runtime, tmp_path, monkeypatch):
    """Quart's default /static route served ``./static`` of the directory the server started in, to anyone,
    without the token (issue 14); only the package's own files are served now."""
    workdir = tmp_path / "cwd"
    (workdir / "static").mkdir(parents=True)
    (workdir / "static" / "leak.txt").write_text("a file that happens to be there")
    monkeypatch.chdir(workdir)
    client = make_client(runtime, tmp_path)
    response = await client.get("/static/leak.txt")
    assert response.status_code == 404 and b"happens" not in await response.get_data()


async def test_text_files_go_gzipped_to_clients_that_accept_it(runtime, tmp_path, static):
    big = ("const line = 'the same words again and again';\n" * 200).encode()
    (static / "big.js").write_bytes(big)
    client = make_client(runtime, tmp_path, static=static)
    plain_etag = f'"{hashlib.sha256(big).hexdigest()[:32]}"'
    zipped = await client.get("/static/big.js", headers={"Accept-Encoding": "br, gzip;q=0.8"})
    assert zipped.status_code == 200 and zipped.headers["Content-Encoding"] == "gzip"
    data = await zipped.get_data()
    assert gzip.decompress(data) == big and len(data) < len(big) // 10
    assert zipped.headers["ETag"] == plain_etag[:-1] + '-gz"' and zipped.headers["Vary"] == "Accept-Encoding"
    assert zipped.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert_security_headers(zipped)
    assert await (await client.get("/static/big.js", headers={"Accept-Encoding": "gzip"})).get_data() == data
    again = await client.get("/static/big.js", headers={"Accept-Encoding": "gzip",
                                                        "If-None-Match": zipped.headers["ETag"]})
    assert again.status_code == 304
    # The plain file's ETag does not validate the gzipped one, nor the other way round.
    assert (await client.get("/static/big.js", headers={"Accept-Encoding": "gzip",
                                                        "If-None-Match": plain_etag})).status_code == 200
    for refused in ({}, {"Accept-Encoding": "gzip;q=0"}, {"Accept-Encoding": "identity"}):
        plain = await client.get("/static/big.js", headers=refused)
        assert "Content-Encoding" not in plain.headers and await plain.get_data() == big, refused
        assert plain.headers["ETag"] == plain_etag and plain.headers["Vary"] == "Accept-Encoding"
    # Small files and images are sent as they are.
    for url in ("/static/app.js", "/static/blob.bin"):
        small = await client.get(url, headers={"Accept-Encoding": "gzip"})
        assert "Content-Encoding" not in small.headers and "Vary" not in small.headers, url
