"""Auth on /v1/*, public /health, and CORS for exactly the configured origins."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import start_server


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
