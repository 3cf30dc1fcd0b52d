"""Every bad input gets a JSON error with the right status and changes nothing."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import start_server

AUTH = {"Authorization": "Bearer test-token"}


@pytest.fixture
async def http(server):
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH) as h:
        yield h


def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"]["status"] == status and body["error"]["code"] == code
    for fragment in fragments:
        assert fragment in body["error"]["message"]


async def _thread_count(http) -> int:
    return len((await http.get("/v1/threads", params={"include_archived": "true"})).json())


@pytest.mark.parametrize("body,fragment", [
    (b"{not json", "Malformed JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"text"', "must be a JSON object"),
    (b'{"title": 5}', "'title' must be a string"),
    (b'{"archived": "yes"}', "'archived' must be a boolean"),
    (b'{"titel": "typo"}', "Unknown field 'titel'"),
    (b"\xff\xfe", "Malformed JSON"),
    (b"[" * 100000 + b"]" * 100000, "Malformed JSON"),
])
async def test_bad_thread_bodies_are_400_and_create_nothing(http, body, fragment):
    response = await http.post("/v1/threads", content=body)
    assert_error(response, 400, "invalid_input", fragment)
    assert await _thread_count(http) == 0


async def test_turn_body_errors_name_the_field(http):
    thread = (await http.post("/v1/threads", json={})).json()
    assert_error(await http.post(f"/v1/threads/{thread['id']}/turns", json={}), 400, "invalid_input",
                 "Missing required field 'prompt'")
    assert_error(await http.post(f"/v1/threads/{thread['id']}/turns", json={"prompt": "   "}), 400,
                 "invalid_input", "prompt must not be empty")
    assert_error(await http.post(f"/v1/threads/{thread['id']}/turns", json={"prompt": ["x"]}), 400,
                 "invalid_input", "'prompt' must be a string")
    assert_error(await http.patch(f"/v1/threads/{thread['id']}", json={}), 400, "invalid_input", "at least one")
    assert (await http.get(f"/v1/threads/{thread['id']}")).json()["turns"] == []


async def test_bad_query_parameters_are_400(http):
    assert_error(await http.get("/v1/threads", params={"limit": "ten"}), 400, "invalid_input", "'limit'")
    assert_error(await http.get("/v1/threads", params={"include_archived": "maybe"}), 400, "invalid_input")


async def test_unknown_route_is_404_and_wrong_method_is_405(http):
    assert_error(await http.get("/v1/nothing-here"), 404, "not_found")
    assert_error(await http.delete("/v1/threads"), 405, "method_not_allowed")
    assert_error(await http.put("/health"), 405, "method_not_allowed")


async def test_oversize_body_is_413_without_reading_it_all(nursery, tmp_path):
    live = await start_server(nursery, tmp_path / "d", max_body=1024)
    async with httpx.AsyncClient(base_url=live.url, headers=AUTH) as http:
        response = await http.post("/v1/threads", content=b'{"title": "' + b"x" * 5000 + b'"}')
        assert_error(response, 413, "payload_too_large")

        async def chunks():
            for _ in range(10):
                yield b"x" * 512

        response = await http.post("/v1/threads", content=chunks())  # chunked: no Content-Length
        assert_error(response, 413, "payload_too_large")
        assert (await http.get("/v1/threads")).json() == []
    live.shutdown.set()
