"""ScriptedModel, FunctionModel and the dry-run SimModel."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from jetmesh.agents.models import (
    FunctionModel,
    Message,
    Model,
    ModelError,
    ModelRequest,
    ModelResponse,
    ScriptedModel,
    SimModel,
    ToolCall,
    ToolDefinition,
    tool_call,
)


def req(text: str = "hello", **kw: object) -> ModelRequest:
    return ModelRequest(messages=[Message(role="user", content=text)], **kw)  # type: ignore[arg-type]


async def test_scripted_model_plays_items_in_order_and_records_requests() -> None:
    async def async_turn(request: ModelRequest) -> str:
        return f"async saw {len(request.messages)}"

    response = ModelResponse(provider="x", model="y", text="verbatim")
    call = tool_call("lookup", q="nats")
    model = ScriptedModel(call)
    model.enqueue(
        [ToolCall(id="a", name="t1"), ToolCall(id="b", name="t2")],
        "final",
        response,
        lambda r: r.messages[-1].content.upper(),
        async_turn,
    )
    assert isinstance(model, Model)
    assert model.remaining == 6

    first = await model.complete(req())
    assert first.tool_calls == [call] and first.stop_reason == "tool_use"
    assert first.provider == "sim" and first.usage.input_tokens > 0
    second = await model.complete(req())
    assert [c.name for c in second.tool_calls] == ["t1", "t2"]
    third = await model.complete(req())
    assert third.text == "final" and third.tool_calls == [] and third.stop_reason == "end_turn"
    assert await model.complete(req()) is response
    assert (await model.complete(req("shout"))).text == "SHOUT"
    assert (await model.complete(req())).text == "async saw 1"

    model.assert_complete()
    assert [r.messages[-1].content for r in model.requests] == [
        "hello",
        "hello",
        "hello",
        "hello",
        "shout",
        "hello",
    ]


async def test_scripted_model_exhausted_raises_model_error() -> None:
    model = ScriptedModel("only")
    await model.complete(req())
    with pytest.raises(ModelError, match="script exhausted"):
        await model.complete(req())


async def test_assert_complete_fails_while_items_remain() -> None:
    model = ScriptedModel("a", "b")
    await model.complete(req())
    with pytest.raises(AssertionError, match="1 scripted turn"):
        model.assert_complete()


def test_enqueue_rejects_non_items() -> None:
    with pytest.raises(TypeError):
        ScriptedModel(42)  # type: ignore[arg-type]


async def test_function_model_sync_and_async() -> None:
    sync = FunctionModel(lambda r: f"{len(r.tools)} tools")
    assert (await sync.complete(req())).text == "0 tools"

    async def turn(r: ModelRequest) -> ModelResponse:
        return ModelResponse(provider="sim", model="function", text="async", stop_reason="x")

    model = FunctionModel(turn, name="planner")
    assert (await model.complete(req())).text == "async"
    assert model.name == "planner" and len(model.requests) == 1


class Address(BaseModel):
    city: str
    zip: str = Field(min_length=5, max_length=5)


class SearchArgs(BaseModel):
    query: str
    limit: int = Field(ge=1, le=50)
    mode: Literal["fast", "deep"]
    address: Address
    tags: list[str] = Field(min_length=2)


class Report(BaseModel):
    summary: str
    score: float = Field(gt=0, lt=1)
    sources: list[str]
    author: Address | None


TOOLS = [
    ToolDefinition(name="search", input_schema=SearchArgs.model_json_schema()),
    ToolDefinition(name="ping"),
]


async def test_sim_dry_run_calls_each_tool_once_then_answers() -> None:
    model = SimModel()
    assert (model.provider, model.name) == ("sim", "dry-run")
    user = Message(role="user", content="find things")
    first = await model.complete(ModelRequest(messages=[user], tools=TOOLS))

    assert [c.name for c in first.tool_calls] == ["search", "ping"]
    assert len({c.id for c in first.tool_calls}) == 2
    jsonschema.validate(first.tool_calls[0].arguments, TOOLS[0].input_schema)
    SearchArgs.model_validate(first.tool_calls[0].arguments)
    assert first.tool_calls[1].arguments == {}

    history = [
        user,
        Message(role="assistant", tool_calls=first.tool_calls),
        Message(role="tool", tool_call_id=first.tool_calls[0].id, content='{"hits": 3}'),
        Message(role="tool", tool_call_id=first.tool_calls[1].id, content="pong"),
    ]
    second = await model.complete(ModelRequest(messages=history, tools=TOOLS))
    assert second.tool_calls == []
    assert second.text == "[simulated model] hits 3. pong."  # each result, in words
    assert second.usage.input_tokens > first.usage.input_tokens > 0
    assert second == await model.complete(ModelRequest(messages=history, tools=TOOLS))


async def test_sim_without_tools_echoes_the_whole_last_user_message() -> None:
    long_text = "x" * 5000 + " end"
    response = await SimModel().complete(req(long_text))
    assert response.text == "[simulated model] " + long_text
    assert response.usage.input_tokens == -(-len(long_text) // 4)
    assert response.usage.output_tokens == -(-len(response.text) // 4)


async def test_sim_output_schema_answer_is_valid_and_carries_the_digest() -> None:
    schema = Report.model_json_schema()
    response = await SimModel().complete(req("summarise", output_schema=schema))
    data = json.loads(response.text)
    jsonschema.validate(data, schema)
    report = Report.model_validate(data)
    assert report.summary == "[simulated model] summarise"
    assert report.sources == ["[simulated model] summarise"]


async def test_sim_latency_is_configurable() -> None:
    model = SimModel(latency_s=0.001)
    assert (await model.complete(req())).text == "[simulated model] hello"
