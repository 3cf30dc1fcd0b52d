"""The error map and routes through Quart's in-process test client (no socket: fast coverage)."""

from __future__ import annotations

import pytest
from quart import Blueprint

from runtime import Runtime, RuntimeConfig
from runtime import errors as rt
from web.app import create_app
from web.errors import STATUS_BY_ERROR, status_for
from web.settings import ServerSettings

AUTH = {"Authorization": "Bearer t"}


@pytest.fixture
async def app(tmp_path):
    async with Runtime.open(RuntimeConfig(data_dir=tmp_path)) as runtime:
        application = create_app(runtime, ServerSettings(data_dir=tmp_path, auth_token="t"), "t")
        boom = Blueprint("boom", __name__)

        @boom.route("/v1/test/raise/<name>")
        async def raise_named(name):
            if name == "unmapped":
                raise RuntimeError("secret detail that must not leak")
            raise getattr(rt, name)(f"{name} happened")

        application.register_blueprint(boom)
        yield application


@pytest.mark.parametrize("name,status,code", [
    ("NotFound", 404, "not_found"), ("InvalidInput", 400, "invalid_input"), ("InvalidData", 400, "invalid_data"),
    ("Conflict", 409, "conflict"), ("PreconditionFailed", 412, "precondition_failed"),
    ("PayloadTooLarge", 413, "payload_too_large"), ("StorageError", 500, "storage_error"),
    ("StorageFull", 507, "insufficient_storage"),
    ("EngineUnavailable", 503, "engine_unavailable"), ("EngineTimeout", 504, "timeout"),
])
async def test_each_runtime_error_maps_to_its_status(app, name, status, code):
    response = await app.test_client().get(f"/v1/test/raise/{name}", headers=AUTH)
    assert response.status_code == status
    assert await response.get_json() == {"error": {"status": status, "code": code, "message": f"{name} happened"}}


async def test_unmapped_errors_are_500_without_details(app):
    response = await app.test_client().get("/v1/test/raise/unmapped", headers=AUTH)
    body = await response.get_json()
    assert response.status_code == 500
    assert body == {"error": {"status": 500, "code": "internal", "message": "Internal server error"}}


def test_every_runtime_error_class_has_a_status():
    for cls in rt.RuntimeFailure.__subclasses__():
        assert cls in STATUS_BY_ERROR, cls
        assert status_for(cls("x")) == STATUS_BY_ERROR[cls]


async def test_routes_round_trip_in_process(app):
    client = app.test_client()
    created = await client.post("/v1/threads", json={"title": "in process"}, headers=AUTH)
    assert created.status_code == 201
    thread = await created.get_json()
    listed = await (await client.get("/v1/threads", headers=AUTH)).get_json()
    assert [t["id"] for t in listed] == [thread["id"]]
    missing = await client.get("/v1/threads/thr_nope", headers=AUTH)
    assert missing.status_code == 404
    assert (await client.get("/v1/threads")).status_code == 401
    assert (await client.get("/health")).status_code == 200


async def test_every_route_that_can_fail_on_storage_documents_a_full_disk(app):
    spec = await (await app.test_client().get("/openapi.json")).get_json()
    for path, method in [("/v1/threads", "post"), ("/v1/threads/{thread_id}", "patch"),
                         ("/v1/threads/{thread_id}/turns", "post"), ("/v1/threads/{thread_id}/compact", "post"),
                         ("/v1/sessions", "put")]:
        responses = spec["paths"][path][method]["responses"]
        assert {"500", "507"} <= set(responses), (path, method, sorted(responses))
        assert responses["507"]["description"] == "The disk is full: nothing was written"


async def test_a_deleted_mcp_server_answers_a_whole_204(tmp_path):
    """Every 204 has an empty body Quart can send on trio: ``Response(status=204)`` made a body whose iteration
    asked asyncio for its loop, so hypercorn logged "Error in ASGI Framework" and closed the connection after
    the headers (a client reusing it got "Server disconnected without sending a response")."""
    from tests.mcp.test_mcp_runtime import entry

    marks = tmp_path / "marks"
    marks.mkdir()
    data = tmp_path / "data"
    async with Runtime.open(RuntimeConfig(data_dir=data)) as runtime:
        client = create_app(runtime, ServerSettings(data_dir=data, auth_token="t"), "t").test_client()
        added = await client.post("/v1/mcp/servers", headers=AUTH, json={"name": "box", **entry(marks)})
        assert added.status_code == 201
        deleted = await client.delete("/v1/mcp/servers/box", headers=AUTH)
        assert deleted.status_code == 204
        assert await deleted.get_data() == b""
        assert (await client.get("/v1/mcp/servers", headers=AUTH)).status_code == 200
