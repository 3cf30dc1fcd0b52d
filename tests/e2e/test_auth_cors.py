"""Auth on /v1/*, public /health, and CORS for exactly the configured origins."""

from __future__ import annotations

import signal

import httpx
import pytest
import trio

from tests import support
from tests.conftest import E2E_LIMIT, start_server
from tests.e2e.process import ServerProcess
from web.client import SseParser
from web.pages import CSP, STATIC_DIR, load_dir


@pytest.fixture
async def cors_server(nursery, tmp_path):
    live = await start_server(nursery, tmp_path / "d", cors_origins=("http://app.example",))
    yield live
    live.shutdown.set()


async def test_v1_needs_the_token_and_health_does_not(server):
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get("/health")).json() == {"status": "ok", "service": "trio-runtime", "mode": "local"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="}):
            response = await http.get("/v1/threads", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await http.get("/v1/threads", params={"token": "wrong"})).status_code == 401
        # An empty token never authorizes (issue 11, defect 3).
        assert (await http.get("/v1/threads", params={"token": ""})).status_code == 401
        assert (await http.get("/v1/threads?token")).status_code == 401
        assert (await http.get("/v1/threads", params={"token": "test-token"})).status_code == 200
        assert (await http.get("/v1/threads", headers={"Authorization": "Bearer test-token"})).status_code == 200
        # An unauthenticated write changes nothing.
        assert (await http.post("/v1/threads", json={})).status_code == 401
        assert (await http.get("/v1/threads", params={"token": "test-token"})).json() == []


async def test_runtime_info_reports_the_server(server):
    async with server.client() as c:
        info = await c.info()
    assert info["model_backend"] == "scripted" and info["data_dir"] == str(server.data_dir)
    assert info["live_engines"] == 0 and info["version"]
    # Issue 15: the store's kind (never its URL), this host's id and the URL other hosts forward to (bound).
    assert info["store"] == ("postgresql" if support.on_postgresql() else "sqlite")
    assert info["advertise_url"] == server.url
    assert info["host_id"] == (server.data_dir / "host_id").read_text().strip()


async def test_no_token_file_or_auth_with_insecure_no_auth(nursery, tmp_path):
    live = await start_server(nursery, tmp_path / "d", auth_token=None, insecure_no_auth=True)
    assert live.token is None
    async with httpx.AsyncClient(base_url=live.url) as http:
        assert (await http.get("/v1/threads")).status_code == 200
    assert not (tmp_path / "d" / "runtime.token").exists()
    live.shutdown.set()


async def test_generated_token_is_written_0600_and_reused(nursery, tmp_path):
    data = tmp_path / "d"
    live = await start_server(nursery, data, auth_token=None)
    token_file = data / "runtime.token"
    assert token_file.read_text().strip() == live.token and len(live.token) >= 32
    assert token_file.stat().st_mode & 0o777 == 0o600
    async with httpx.AsyncClient(base_url=live.url, headers={"Authorization": f"Bearer {live.token}"}) as http:
        assert (await http.get("/v1/threads")).status_code == 200
    live.shutdown.set()


async def test_cors_preflight_allows_only_configured_origins(cors_server):
    preflight = {"Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "authorization"}
    async with httpx.AsyncClient(base_url=cors_server.url) as http:
        ok = await http.options("/v1/sessions", headers={**preflight, "Origin": "http://app.example"})
        assert ok.status_code == 204
        assert ok.headers["Access-Control-Allow-Origin"] == "http://app.example"
        assert "PUT" in ok.headers["Access-Control-Allow-Methods"]
        assert "Authorization" in ok.headers["Access-Control-Allow-Headers"]

        denied = await http.options("/v1/sessions", headers={**preflight, "Origin": "http://evil.example"})
        assert denied.status_code == 403 and "Access-Control-Allow-Origin" not in denied.headers

        simple = await http.get("/v1/threads", headers={"Origin": "http://app.example",
                                                        "Authorization": "Bearer test-token"})
        assert simple.headers["Access-Control-Allow-Origin"] == "http://app.example"
        other = await http.get("/v1/threads", headers={"Origin": "http://evil.example",
                                                       "Authorization": "Bearer test-token"})
        assert "Access-Control-Allow-Origin" not in other.headers


async def test_cors_is_off_by_default(server):
    async with httpx.AsyncClient(base_url=server.url) as http:
        response = await http.options("/v1/threads", headers={"Origin": "http://app.example",
                                                              "Access-Control-Request-Method": "GET"})
        assert response.status_code == 403 and "Access-Control-Allow-Origin" not in response.headers


async def test_openapi_lists_every_route_and_docs_render(server):
    async with httpx.AsyncClient(base_url=server.url) as http:
        spec = (await http.get("/openapi.json")).json()
        docs = await http.get("/docs")
    assert docs.status_code == 200 and "openapi.json" in docs.text
    expected = {
        ("get", "/health"), ("get", "/v1/runtime/info"), ("post", "/v1/threads"), ("get", "/v1/threads"),
        ("get", "/v1/threads/{thread_id}"), ("patch", "/v1/threads/{thread_id}"),
        ("post", "/v1/threads/{thread_id}/turns"), ("post", "/v1/threads/{thread_id}/turns/{turn_id}/steer"),
        ("post", "/v1/threads/{thread_id}/turns/{turn_id}/interrupt"), ("post", "/v1/threads/{thread_id}/compact"),
        ("get", "/v1/threads/{thread_id}/events"), ("put", "/v1/sessions"), ("post", "/v1/sessions"),
        ("get", "/v1/sessions"), ("get", "/v1/sessions/{session_id}"), ("patch", "/v1/sessions/{session_id}"),
        ("delete", "/v1/sessions/{session_id}"), ("post", "/v1/sessions/{session_id}/resume-thread"),
        ("get", "/v1/sessions/{session_id}/export"), ("post", "/v1/sessions/import"),
    }
    listed = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert expected <= listed
    create = spec["paths"]["/v1/threads"]["post"]
    # Nothing in it is required: the body may be left out, and JSON null counts as {}.
    assert create["requestBody"]["required"] is False
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "anyOf": [{"$ref": "#/components/schemas/CreateThreadBody"}, {"type": "null"}]}
    body_schema = spec["components"]["schemas"]["CreateThreadBody"]
    assert body_schema["additionalProperties"] is False and body_schema["properties"]["archived"] == {
        "type": "boolean"}
    assert "201" in create["responses"] and "401" in create["responses"]

    # The event stream is described event by event (OpenAPI 3.2 sequential media): each event's fields,
    # and the JSON envelope in its data.
    assert spec["openapi"] == "3.2.0"
    stream = spec["paths"]["/v1/threads/{thread_id}/events"]["get"]["responses"]["200"]["content"]
    assert list(stream) == ["text/event-stream"] and "schema" not in stream["text/event-stream"]
    item = stream["text/event-stream"]["itemSchema"]
    assert item["required"] == ["id", "event", "data"]
    assert item["properties"]["data"] == {"type": "string", "contentMediaType": "application/json",
                                          "contentSchema": {"$ref": "#/components/schemas/EventEnvelope"}}
    envelope = spec["components"]["schemas"]["EventEnvelope"]
    assert envelope["required"] == ["seq", "timestamp", "thread_id", "event", "payload"]


# The dashboard's sign-in against the real `trio-runtime serve` process (issue 14). Direct cookie headers,
# as a browser sends them, rather than a client cookie jar: what is sent is what the test says.

SECRET = "e2e-Secret-Token-7f3a"  # distinct enough that finding it in the output cannot be a coincidence


def parse_set_cookie(header: str) -> tuple[str, str, list[str]]:
    first, *attributes = [part.strip() for part in header.split(";")]
    name, _, value = first.partition("=")
    return name, value, attributes


async def sign_in(http: httpx.AsyncClient, token: str) -> dict[str, str]:
    """POST /v1/auth/cookie with the bearer token; the Cookie header a browser would send afterwards."""
    response = await http.post("/v1/auth/cookie", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 204 and response.content == b""
    name, value, attributes = parse_set_cookie(response.headers["Set-Cookie"])
    assert "HttpOnly" in attributes and "SameSite=Strict" in attributes and "Path=/" in attributes
    return {"Cookie": f"{name}={value}"}


async def read_events_until_turn_end(http: httpx.AsyncClient, thread_id: str, turn_id: str,
                                     headers: dict[str, str]) -> list[dict]:
    parser, seen = SseParser(), []
    with trio.fail_after(E2E_LIMIT):
        async with http.stream("GET", f"/v1/threads/{thread_id}/events",
                               headers={**headers, "Accept": "text/event-stream"}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    seen.append(event)
                    if event["event"] == "turn.completed" and event.get("turn_id") == turn_id:
                        return seen
    raise AssertionError(f"event stream ended early: {seen}")


async def test_dashboard_sign_in_flow_keeps_the_token_out_of_every_logged_url(tmp_path):
    """Access logging on (--log-level debug), the page's whole flow with httpx: load the page, trade the token
    for the cookie, create a thread and a turn and read its events with the cookie only. The token appears
    in the output once, in the sign-in line (in the URL's fragment, which a browser never sends); it is in
    no access-log line. The same log does record query strings: a ?token= guess shows up in it."""
    proc = await ServerProcess(tmp_path / "data", "--log-level", "debug", token=SECRET).start()
    try:
        async with httpx.AsyncClient(base_url=proc.url, timeout=E2E_LIMIT) as http:
            page = await http.get("/")
            assert page.status_code == 200 and page.headers["Content-Security-Policy"] == CSP
            cookie = await sign_in(http, SECRET)
            cookie_value = cookie["Cookie"].partition("=")[2]
            assert SECRET not in cookie_value
            own = {**cookie, "Origin": proc.url}
            thread = await http.post("/v1/threads", headers=own, json={"title": "signed in"})
            assert thread.status_code == 201
            thread_id = thread.json()["id"]
            turn = await http.post(f"/v1/threads/{thread_id}/turns", headers=own, json={"prompt": "hello there"})
            assert turn.status_code == 201
            events = await read_events_until_turn_end(http, thread_id, turn.json()["id"], cookie)
            assert events[-1]["payload"]["status"] == "completed"
            assert (await http.get(f"/v1/threads/{thread_id}", headers=cookie)).json()["thread"]["title"] == "signed in"
            # The control: a token sent in a URL (the old EventSource way) is logged with the query string.
            guess = await http.get("/v1/threads", params={"token": "logged-guess-91c2"})
            assert guess.status_code == 401
        proc.process.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
        output = await proc.drain()
    finally:
        proc.kill()
    lines = output.splitlines()
    assert [line for line in lines if SECRET in line] == [
        f"trio-runtime dashboard: open {proc.url}/#token={SECRET}"]
    access = [line for line in lines if "hypercorn.access" in line]
    logged_paths = " ".join(access)
    for request in ("GET /?", "POST /v1/auth/cookie?", "POST /v1/threads?", f"POST /v1/threads/{thread_id}/turns?",
                    f"GET /v1/threads/{thread_id}/events?"):
        assert f'"{request} HTTP/1.1"' in logged_paths, request
    assert "token=logged-guess-91c2" in logged_paths
    assert not [line for line in access if SECRET in line or cookie_value in line]


async def test_cross_origin_and_originless_writes_with_the_cookie_are_403_and_change_nothing(tmp_path):
    proc = await ServerProcess(tmp_path / "data", token=SECRET).start()
    try:
        async with httpx.AsyncClient(base_url=proc.url, timeout=E2E_LIMIT) as http:
            cookie = await sign_in(http, SECRET)
            created = await http.post("/v1/threads", headers={**cookie, "Origin": proc.url}, json={"title": "a"})
            assert created.status_code == 201
            thread_id = created.json()["id"]
            port = int(proc.url.rsplit(":", 1)[1])
            for origin in ("http://evil.example", f"http://127.0.0.1:{port + 1}", "null", None):
                headers = {**cookie, **({"Origin": origin} if origin else {})}
                for method, url, body in (("POST", "/v1/threads", {}),
                                          ("PATCH", f"/v1/threads/{thread_id}", {"title": "changed"}),
                                          ("POST", f"/v1/threads/{thread_id}/turns", {"prompt": "hi"}),
                                          ("DELETE", f"/v1/threads/{thread_id}", None)):
                    response = await http.request(method, url, headers=headers, json=body)
                    assert response.status_code == 403, (origin, method, url)
                    assert response.json()["error"]["code"] == "forbidden_origin"
            # Nothing of it happened: one thread, its title, no turn.
            threads = (await http.get("/v1/threads", headers=cookie)).json()
            assert [(t["id"], t["title"]) for t in threads] == [(thread_id, "a")]
            assert (await http.get(f"/v1/threads/{thread_id}", headers=cookie)).json()["turns"] == []
            # The same requests with the bearer token are not checked for Origin.
            bearer = {"Authorization": f"Bearer {SECRET}", "Origin": "http://evil.example"}
            patched = await http.patch(f"/v1/threads/{thread_id}", headers=bearer, json={"title": "b"})
            assert patched.status_code == 200 and patched.json()["title"] == "b"
            # The server still answers.
            assert (await http.get("/health")).json()["status"] == "ok"
    finally:
        proc.kill()


async def test_the_cookie_survives_a_restart_and_dies_with_a_new_token(tmp_path):
    data = tmp_path / "data"
    proc = await ServerProcess(data, token=SECRET).start()
    try:
        async with httpx.AsyncClient(base_url=proc.url, timeout=E2E_LIMIT) as http:
            cookie = await sign_in(http, SECRET)
            assert (await http.get("/v1/threads", headers=cookie)).status_code == 200
        proc.process.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
    finally:
        proc.kill()
    name, value = cookie["Cookie"].split("=", 1)
    for token, status in ((SECRET, 200), ("another-token-entirely", 401)):
        again = await ServerProcess(data, token=token).start()
        try:
            port = again.url.rsplit(":", 1)[1]
            # The port changed (--port 0), so the browser's cookie for this one carries the new port's name.
            headers = {"Cookie": f"trio_runtime_auth_{port}={value}"}
            async with httpx.AsyncClient(base_url=again.url, timeout=E2E_LIMIT) as http:
                response = await http.get("/v1/threads", headers=headers)
                assert response.status_code == status, token
                if status == 401:
                    assert response.json()["error"]["code"] == "unauthorized"
                    write = await http.post("/v1/threads", headers={**headers, "Origin": again.url}, json={})
                    assert write.status_code == 401
                    assert (await http.get("/v1/threads", headers={"Authorization": f"Bearer {token}"})).json() == []
        finally:
            again.kill()


async def test_static_files_carry_a_csp_without_inline_script_or_remote_origins(tmp_path):
    proc = await ServerProcess(tmp_path / "data", token=SECRET).start()
    try:
        async with httpx.AsyncClient(base_url=proc.url, timeout=E2E_LIMIT) as http:
            shipped = sorted(load_dir(STATIC_DIR))
            assert "index.html" in shipped
            for url in ["/", *(f"/static/{name}" for name in shipped), "/static/nope.js"]:
                response = await http.get(url)
                assert response.status_code == (404 if url.endswith("nope.js") else 200), url
                policy = response.headers["Content-Security-Policy"]
                assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy
                directives = {d.split()[0]: d.split()[1:] for d in policy.split(";") if d.strip()}
                assert directives["script-src"] == ["'self'"] and directives["default-src"] == ["'self'"]
                assert all(source in ("'self'", "'none'", "data:") for sources in directives.values()
                           for source in sources), policy
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                assert response.headers["Referrer-Policy"] == "no-referrer"
                if response.status_code == 200:
                    name = "index.html" if url == "/" else url.removeprefix("/static/")
                    assert response.content == (STATIC_DIR / name).read_bytes()
    finally:
        proc.kill()
