"""Skill schema checks: the fast validator and the explaining one agree."""

from __future__ import annotations

from typing import Any

import pytest

from jetmesh.agents.spec import _validator, schema_errors

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z][0-9]{4}$"},
        "qty": {"type": "integer", "minimum": 1},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
    },
    "required": ["order_id"],
    "additionalProperties": False,
}


def test_the_fast_validator_is_used() -> None:
    fast, slow = _validator(SCHEMA)
    assert fast is not None, "jsonschema-rs should compile a plain 2020-12 schema"
    assert _validator(SCHEMA) == (fast, slow)  # compiled once per schema object


@pytest.mark.parametrize("data, where", [
    ({"order_id": "A1002"}, None),
    ({"order_id": "A1002", "qty": 2, "tags": ["x"]}, None),
    ({}, "(root)"),
    ({"order_id": "a1"}, "order_id"),
    ({"order_id": "A1002", "qty": 0}, "qty"),
    ({"order_id": "A1002", "tags": ["a", "b", "c"]}, "tags"),
    ({"order_id": "A1002", "extra": True}, "(root)"),
    ("not an object", "(root)"),
])
def test_valid_data_has_no_errors_and_invalid_data_is_explained(data: Any,
                                                                where: str | None) -> None:
    errors = schema_errors(SCHEMA, data)
    if where is None:
        assert errors == []
    else:
        assert errors and all(": " in e for e in errors)
        assert any(e.startswith(f"{where}: ") for e in errors), errors
