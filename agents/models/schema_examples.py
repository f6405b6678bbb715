"""Deterministic example values for JSON Schemas (used by the simulated model)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["example_for_schema"]

_FORMAT_EXAMPLES: dict[str, str] = {
    "date": "2024-01-01",
    "date-time": "2024-01-01T00:00:00Z",
    "time": "00:00:00",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-0000-0000-000000000000",
    "hostname": "example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "duration": "P1D",
}

_MAX_DEPTH = 32


class _Cycle(Exception):
    """A $ref points back into itself; the caller picks another branch."""


def example_for_schema(schema: dict[str, Any] | bool, *, text: str | None = None) -> Any:
    """Return a value valid against ``schema`` (best effort for ``pattern``).

    Every plain string field (no enum, const or format) gets ``text`` when given, so the
    simulated model can put its digest into structured answers. ``$ref`` is resolved
    against ``$defs`` / ``definitions`` of the root schema, as pydantic emits them.
    Recursive references end at the first branch (null, empty array, omitted optional
    property) that does not recurse.
    """
    root = schema if isinstance(schema, dict) else {}
    return _Gen(root, text).value(schema, ())


class _Gen:
    def __init__(self, root: dict[str, Any], text: str | None) -> None:
        self.root = root
        self.text = text

    def resolve(self, ref: str) -> dict[str, Any]:
        if not ref.startswith("#"):
            raise ValueError(f"only local $ref is supported, got {ref!r}")
        node: Any = self.root
        for part in ref.lstrip("#").strip("/").split("/"):
            if not part:
                continue
            node = node[part.replace("~1", "/").replace("~0", "~")]
        if not isinstance(node, dict):
            raise ValueError(f"$ref {ref!r} does not point at a schema")
        return node

    def value(self, schema: dict[str, Any] | bool, refs: tuple[str, ...]) -> Any:
        if schema is True or schema is False:
            return self.text
        if len(refs) > _MAX_DEPTH:
            raise _Cycle
        if "$ref" in schema:
            ref = schema["$ref"]
            if ref in refs:
                raise _Cycle
            siblings = {k: v for k, v in schema.items() if k != "$ref"}
            target = {**self.resolve(ref), **siblings}
            return self.value(target, (*refs, ref))
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return schema["enum"][0]
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.first_branch(schema[key], refs)
        if "allOf" in schema:
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self.resolve(part["$ref"]) if "$ref" in part else part
                merged = _merge(merged, part)
            return self.value(merged, refs)

        kind = schema.get("type")
        if isinstance(kind, list):
            non_null = [k for k in kind if k != "null"]
            if not non_null:
                return None
            kind = non_null[0]
        if kind is None:
            if "properties" in schema or "required" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                return self.text
        if kind == "object":
            return self.object(schema, refs)
        if kind == "array":
            return self.array(schema, refs)
        if kind == "string":
            return self.string(schema)
        if kind == "integer":
            return _integer(schema)
        if kind == "number":
            return _number(schema)
        if kind == "boolean":
            return False
        if kind == "null":
            return None
        raise ValueError(f"unsupported JSON Schema type {kind!r}")

    def first_branch(self, branches: list[Any], refs: tuple[str, ...]) -> Any:
        for branch in branches:
            try:
                return self.value(branch, refs)
            except _Cycle:
                continue
        raise _Cycle

    def object(self, schema: dict[str, Any], refs: tuple[str, ...]) -> dict[str, Any]:
        props: dict[str, Any] = schema.get("properties", {})
        required = list(schema.get("required", []))
        out: dict[str, Any] = {}
        for name in required:
            out[name] = self.value(props.get(name, {}), refs)
        for name, sub in props.items():
            if name in out:
                continue
            if isinstance(sub, dict) and "default" in sub:
                out[name] = sub["default"]
                continue
            try:
                out[name] = self.value(sub, refs)
            except _Cycle:
                continue
        return out

    def array(self, schema: dict[str, Any], refs: tuple[str, ...]) -> list[Any]:
        prefix: list[Any] = schema.get("prefixItems", [])
        out = [self.value(item, refs) for item in prefix]
        items = schema.get("items", {})
        min_items = int(schema.get("minItems", 0))
        max_items = schema.get("maxItems")
        want = max(min_items, len(out) + 1 if items is not False else len(out))
        if max_items is not None:
            want = min(want, int(max_items))
        while len(out) < want:
            try:
                out.append(self.value(items, refs))
            except _Cycle:
                if len(out) >= min_items:
                    break
                raise
        return out

    def string(self, schema: dict[str, Any]) -> str:
        fmt = schema.get("format")
        if fmt in _FORMAT_EXAMPLES:
            return _FORMAT_EXAMPLES[fmt]
        value = self.text if self.text is not None else "example"
        min_len = int(schema.get("minLength", 0))
        if len(value) < min_len:
            value = value + "x" * (min_len - len(value))
        max_len = schema.get("maxLength")
        if max_len is not None:
            value = value[: int(max_len)]
        return value


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {**a, **b}
    if "properties" in a or "properties" in b:
        out["properties"] = {**a.get("properties", {}), **b.get("properties", {})}
    if "required" in a or "required" in b:
        out["required"] = list(dict.fromkeys([*a.get("required", []), *b.get("required", [])]))
    return out


def _bounds(schema: dict[str, Any]) -> tuple[float | None, bool, float | None, bool]:
    low: float | None = schema.get("minimum")
    low_excl = False
    excl_minimum = schema.get("exclusiveMinimum")
    if isinstance(excl_minimum, int | float) and not isinstance(excl_minimum, bool):
        low, low_excl = float(excl_minimum), True
    high: float | None = schema.get("maximum")
    high_excl = False
    excl_maximum = schema.get("exclusiveMaximum")
    if isinstance(excl_maximum, int | float) and not isinstance(excl_maximum, bool):
        high, high_excl = float(excl_maximum), True
    return low, low_excl, high, high_excl


def _integer(schema: dict[str, Any]) -> int:
    low, low_excl, high, high_excl = _bounds(schema)
    lo = None if low is None else (math.floor(low) + 1 if low_excl else math.ceil(low))
    hi = None if high is None else (math.ceil(high) - 1 if high_excl else math.floor(high))
    value = 0
    if lo is not None and value < lo:
        value = lo
    if hi is not None and value > hi:
        value = hi
    step = schema.get("multipleOf")
    if isinstance(step, int) and step > 0 and value % step:
        value += step - value % step
    return value


def _number(schema: dict[str, Any]) -> float:
    low, low_excl, high, high_excl = _bounds(schema)

    def ok(v: float) -> bool:
        if low is not None and (v <= low if low_excl else v < low):
            return False
        return not (high is not None and (v >= high if high_excl else v > high))

    candidates: list[float] = [0.0]
    if low is not None:
        candidates += [float(low), float(low) + 1.0]
    if high is not None:
        candidates += [float(high), float(high) - 1.0]
    if low is not None and high is not None:
        candidates.append((float(low) + float(high)) / 2)
    for v in candidates:
        if ok(v):
            return v
    return candidates[-1]
