"""Header names live in bus/headers.py: no other module of the package spells one."""

from __future__ import annotations

import ast
from pathlib import Path

from jetmesh.bus import headers

ROOT = Path(headers.__file__).resolve().parent.parent
NAMES = {v for k, v in vars(headers).items() if k.isupper() and isinstance(v, str)
         and ("-" in v or v == headers.TRACEPARENT) and v != headers.NATS_PREFIX}
"""The names no other text could be (plain words such as Status are left out)."""
FIELD = "traceparent"
"""Also a field of events and commands: a model_copy(update={...}) key is the field."""


def _spelled(tree: ast.AST) -> list[tuple[int, str]]:
    fields: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "update" \
                and isinstance(node.value, ast.Dict):
            fields |= {id(k) for k in node.value.keys if k is not None}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and n.value in NAMES and id(n) not in fields]


def test_no_header_name_literal_outside_the_headers_module() -> None:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {"tests", ".venv", "build"} or rel == Path("bus/headers.py"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [f"{rel}:{line}: {value!r}" for line, value in _spelled(tree)]
    assert found == []


def test_the_rule_sees_a_literal() -> None:
    tree = ast.parse('h = {"Nats-Msg-Id": 1}\ne.model_copy(update={"traceparent": t})\n')
    assert _spelled(tree) == [(1, "Nats-Msg-Id")]
