"""The dry-run model's usage estimate, whose schema lengths are cached."""

from __future__ import annotations

import json
import math

from jetmesh.agents.models.sim import estimate_usage
from jetmesh.agents.models.types import Message, ModelRequest, ToolDefinition


def fresh_input_tokens(request: ModelRequest) -> int:
    """The estimate computed from scratch, as documented: ceil(request chars / 4)."""
    n = len(request.system)
    for m in request.messages:
        n += len(m.content)
        n += sum(len(c.name) + len(json.dumps(c.arguments)) for c in m.tool_calls)
    n += sum(len(t.model_dump_json()) for t in request.tools)
    if request.output_schema is not None:
        n += len(json.dumps(request.output_schema))
    return math.ceil(n / 4)


def test_usage_estimate_matches_a_fresh_count_across_tools_and_schemas() -> None:
    short = ToolDefinition(name="a", description="x")
    long = ToolDefinition(name="a", description="x" * 400)
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    other = {"type": "object", "properties": {"answer": {"type": "string"}, "n": {}}}
    msgs = [Message(role="user", content="hi")]
    requests = [
        ModelRequest(messages=msgs, tools=[short], output_schema=schema),
        ModelRequest(messages=msgs, tools=[long], output_schema=schema),  # a copy of schema
        ModelRequest(messages=msgs, tools=[short, long], output_schema=other),
        ModelRequest(messages=msgs, tools=[short], output_schema={**schema, "title": "T"}),
        ModelRequest(messages=msgs, output_schema={}),
        ModelRequest(messages=msgs),
    ]
    for _ in range(2):  # the second round is served from the cache
        got = [estimate_usage(r, "", []).input_tokens for r in requests]
        assert got == [fresh_input_tokens(r) for r in requests]
    assert len(set(got[:4])) == 4  # each differs from the others in tools or schema
