"""example_for_schema: plain cases and pydantic-generated schemas validated with jsonschema."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Annotated, Any, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from jetmesh.agents.models import example_for_schema


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "string"}, "example"),
        ({"type": "string", "enum": ["b", "a"]}, "b"),
        ({"const": 7}, 7),
        ({"type": "string", "format": "date"}, "2024-01-01"),
        ({"type": "string", "format": "email"}, "user@example.com"),
        ({"type": "string", "minLength": 10}, "examplexxx"),
        ({"type": "string", "maxLength": 3}, "exa"),
        ({"type": "integer"}, 0),
        ({"type": "integer", "minimum": 5}, 5),
        ({"type": "integer", "maximum": -2}, -2),
        ({"type": "integer", "exclusiveMinimum": 5}, 6),
        ({"type": "integer", "minimum": 3, "multipleOf": 4}, 4),
        ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, 0.5),
        ({"type": "number", "minimum": 2.5}, 2.5),
        ({"type": "boolean"}, False),
        ({"type": "null"}, None),
        ({"type": ["null", "integer"]}, 0),
        ({"type": "array", "items": {"type": "integer"}}, [0]),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 3}, [0, 0, 0]),
        ({"type": "array", "items": {"type": "integer"}, "maxItems": 0}, []),
        ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, 0),
        ({"oneOf": [{"type": "boolean"}, {"type": "string"}]}, False),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "string", "default": "d"}},
                "required": ["a"],
            },
            {"a": 0, "b": "d"},
        ),
        (
            {"$ref": "#/definitions/X", "definitions": {"X": {"type": "string", "enum": ["x"]}}},
            "x",
        ),
        ({}, None),
    ],
)
def test_examples(schema: dict[str, Any], expected: Any) -> None:
    assert example_for_schema(schema) == expected
    jsonschema.validate(example_for_schema(schema), schema)


def test_text_fills_plain_strings_only() -> None:
    schema = {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "e": {"enum": ["x"]},
            "d": {"type": "string", "format": "date"},
            "n": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["s", "e", "d", "n"],
    }
    assert example_for_schema(schema, text="DIGEST") == {
        "s": "DIGEST",
        "e": "x",
        "d": "2024-01-01",
        "n": ["DIGEST"],
    }


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Leaf(BaseModel):
    when: dt.date
    email: str = Field(json_schema_extra={"format": "email"})
    ratio: Annotated[float, Field(gt=0, le=1)]


class Tree(BaseModel):
    name: str = Field(min_length=3, max_length=8)
    color: Color
    kind: Literal["a", "b"]
    leaves: list[Leaf] = Field(min_length=1)
    children: list[Tree] = Field(default_factory=list)
    parent: Tree | None
    meta: dict[str, int]
    pair: tuple[int, str]
    count: int = Field(ge=10, lt=20, multiple_of=5)


@pytest.mark.parametrize("model", [Leaf, Tree])
@pytest.mark.parametrize("text", [None, "a longer digest text"])
def test_pydantic_schemas_round_trip(model: type[BaseModel], text: str | None) -> None:
    schema = model.model_json_schema()
    value = example_for_schema(schema, text=text)
    jsonschema.validate(value, schema)
    model.model_validate(value)


def test_recursive_required_ref_is_cut_at_null_branch() -> None:
    value = example_for_schema(Tree.model_json_schema())
    assert value["parent"] is None
    assert value["children"] == []
