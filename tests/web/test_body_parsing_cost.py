"""What every request with a JSON body pays in web/schemas.py (issue 16, POST /v1/threads: peer row 3a and
bench row 15): the field checks are made once per body class, and ``provided`` makes no deep copy. The
answers stay what they were: values, defaults, and each kind of refusal."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from runtime.errors import InvalidInput
from web import schemas


def test_hints_are_unwrapped_once_per_class_not_per_request(monkeypatch):
    calls = []
    real = typing.get_args
    monkeypatch.setattr(typing, "get_args", lambda tp: calls.append(tp) or real(tp))
    first = schemas.parse_body(schemas.CreateThreadBody, {"title": "t0"})
    after_first = len(calls)
    for i in range(1, 6):
        parsed = schemas.parse_body(schemas.CreateThreadBody, {"title": f"t{i}", "archived": True})
        assert (parsed.title, parsed.archived, parsed.model) == (f"t{i}", True, None)
    assert len(calls) == after_first  # nothing unwrapped again for the next five
    assert (first.title, first.archived, first.approval_policy) == ("t0", False, None)


@pytest.mark.parametrize("data, message", [
    ({"nope": 1}, "Unknown field 'nope' (allowed: id, model, workspace, mode, system_prompt, title, archived,"
                  " approval_policy)"),
    ({"title": 5}, "Field 'title' must be a string"),
    ({"archived": None}, "Field 'archived' must be a boolean, not null"),
    ({"archived": 1}, "Field 'archived' must be a boolean"),
    ({"title": "\ud800"}, "Field 'title' must be valid Unicode text (it holds a lone surrogate)"),
    ([], "The request body must be a JSON object"),
])
def test_each_refusal_is_the_same(data, message):
    with pytest.raises(InvalidInput) as caught:
        schemas.parse_body(schemas.CreateThreadBody, data)
    assert str(caught.value) == message


def test_a_missing_required_field_is_named():
    @dataclasses.dataclass
    class Needs:
        name: str
        size: int | None = None

    with pytest.raises(InvalidInput, match=r"^Missing required field 'name'$"):
        schemas.parse_body(Needs, {"size": 3})
    assert schemas.parse_body(Needs, {"name": "x", "size": None}) == Needs("x", None)


def test_provided_gives_the_set_fields_with_the_parsed_values_themselves():
    body = schemas.parse_body(schemas.McpServerBody, {"name": "s", "command": "run", "env": {"A": "1"},
                                                      "args": ["--x"], "enabled": False})
    got = schemas.provided(body)
    assert got == {"name": "s", "command": "run", "env": {"A": "1"}, "args": ["--x"], "enabled": False}
    assert list(got) == ["command", "args", "env", "enabled", "name"]  # the class's field order, as before
    # No deep copy: the parsed JSON's own containers (dataclasses.asdict copied each one).
    assert got["env"] is body.env and got["args"] is body.args
    assert schemas.provided(schemas.parse_body(schemas.UpdateThreadBody, {"title": "t"})) == {"title": "t"}


def test_a_nullable_field_with_an_enum_lists_null_among_its_values():
    # PATCH /v1/threads/{id} takes "approval_policy": null as "unchanged" (like every other field); its schema
    # must say so, or a client validating against /openapi.json refuses what the server accepts (the long
    # schemathesis run found it: "schema-violating request accepted").
    from web.schemas import CreateThreadBody, DecideApprovalBody, UpdateThreadBody, json_schema

    components: dict = {}
    for body in (UpdateThreadBody, CreateThreadBody, DecideApprovalBody):
        json_schema(body, components)
    for name in ("UpdateThreadBody", "CreateThreadBody"):
        field = components[name]["properties"]["approval_policy"]
        assert field["type"] == ["string", "null"] and field["enum"] == ["ask", "auto", "deny", None], field
    decision = components["DecideApprovalBody"]["properties"]["decision"]
    assert decision == {"type": "string", "enum": ["allow", "deny"]}  # not nullable: no null
