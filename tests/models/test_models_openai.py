"""OpenAIModel: the real openai SDK against a local server speaking Chat Completions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from model_fakes import FakeServer

from jetmesh.agents.models import (
    Message,
    ModelAuthError,
    ModelRequest,
    ModelResponseError,
    ModelRetriesExhausted,
    ToolCall,
    ToolDefinition,
    cost_usd,
)
from jetmesh.agents.models.openai import OpenAIModel
from jetmesh.agents.models.retry import RetryPolicy

MODEL = "gpt-4.1-mini"
LOOKUP = ToolDefinition(
    name="lookup",
    description="Look a term up.",
    input_schema={"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
)


def completion(
    message: dict[str, Any], finish: str, prompt: int = 10, done: int = 5
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": done,
            "total_tokens": prompt + done,
        },
    }


def tool_calls_message(arguments: str) -> dict[str, Any]:
    return {
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "lookup", "arguments": arguments},
            }
        ],
    }


def error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "error", "code": None}}


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def model(fake_server: FakeServer, sleeps: Sleeps) -> AsyncIterator[OpenAIModel]:
    m = OpenAIModel(
        MODEL,
        api_key="test-key",
        base_url=fake_server.url + "/v1",
        retry=RetryPolicy(max_attempts=3, base_delay_s=0.001, sleep=sleeps),
    )
    yield m
    await m.aclose()


def ask(*messages: Message, **kw: Any) -> ModelRequest:
    return ModelRequest(
        system="Be brief.", messages=list(messages), tools=[LOOKUP], max_tokens=200, **kw
    )


async def test_tool_use_round_trip(model: OpenAIModel, fake_server: FakeServer) -> None:
    fake_server.enqueue(200, completion(tool_calls_message('{"q": "nats"}'), "tool_calls", 100, 20))
    fake_server.enqueue(200, completion({"content": "NATS is a bus."}, "stop", 150, 8))

    user = Message(role="user", content="What is NATS?")
    first = await model.complete(ask(user))
    assert first.provider == "openai"
    assert first.tool_calls == [ToolCall(id="call_1", name="lookup", arguments={"q": "nats"})]
    assert first.stop_reason == "tool_calls"
    assert first.raw["id"] == "chatcmpl-1"

    second = await model.complete(
        ask(
            user,
            Message(role="assistant", tool_calls=first.tool_calls),
            Message(role="tool", tool_call_id="call_1", content="a message bus"),
        )
    )
    assert second.text == "NATS is a bus."
    assert (second.usage.input_tokens, second.usage.output_tokens) == (150, 8)
    assert cost_usd("openai", second.model, second.usage) == pytest.approx(
        (150 * 0.4 + 8 * 1.6) / 1e6
    )

    assert [r.path for r in fake_server.requests] == ["/v1/chat/completions"] * 2
    assert fake_server.requests[0].headers["authorization"] == "Bearer test-key"
    sent = fake_server.requests[1].body
    assert sent["model"] == MODEL
    assert sent["max_tokens"] == 200  # a non-OpenAI base URL gets the widely supported field
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Look a term up.",
                "parameters": LOOKUP.input_schema,
            },
        }
    ]
    messages = sent["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1] == {"role": "user", "content": "What is NATS?"}
    assert messages[2]["role"] == "assistant"
    assert messages[2]["tool_calls"][0]["id"] == "call_1"
    assert messages[2]["tool_calls"][0]["type"] == "function"
    assert json.loads(messages[2]["tool_calls"][0]["function"]["arguments"]) == {"q": "nats"}
    assert messages[3] == {"role": "tool", "tool_call_id": "call_1", "content": "a message bus"}


async def test_rate_limited_then_success_honours_retry_after(
    model: OpenAIModel, fake_server: FakeServer, sleeps: Sleeps
) -> None:
    fake_server.enqueue(429, error_body("Rate limit reached"), {"retry-after": "1.25"})
    fake_server.enqueue(200, completion({"content": "done"}, "stop"))

    response = await model.complete(ask(Message(role="user", content="hi")))

    assert response.text == "done"
    assert len(fake_server.requests) == 2
    assert sleeps.delays == [1.25]


async def test_burst_of_500s_exhausts_retries(model: OpenAIModel, fake_server: FakeServer) -> None:
    fake_server.enqueue(500, error_body("server fell over"), times=3)

    with pytest.raises(ModelRetriesExhausted) as info:
        await model.complete(ask(Message(role="user", content="hi")))

    assert len(fake_server.requests) == 3
    assert info.value.attempts == 3
    assert str(info.value).startswith(f"openai/{MODEL}: 3 attempts failed, last: HTTP 500")
    assert "server fell over" in str(info.value)


@pytest.mark.parametrize(
    "body",
    [
        b"<html>oops",
        b'{"object": "chat.completion", "choices": 3}',
        completion(tool_calls_message('{"q": "nats"'), "tool_calls"),
        completion(tool_calls_message('["not", "an", "object"]'), "tool_calls"),
    ],
    ids=["bad-json", "wrong-shape", "bad-tool-arguments", "non-object-arguments"],
)
async def test_malformed_body_is_a_response_error(
    model: OpenAIModel, fake_server: FakeServer, body: Any
) -> None:
    fake_server.enqueue(200, body)

    with pytest.raises(ModelResponseError):
        await model.complete(ask(Message(role="user", content="hi")))
    assert len(fake_server.requests) == 1


async def test_401_is_an_auth_error_without_retry(
    model: OpenAIModel, fake_server: FakeServer
) -> None:
    fake_server.enqueue(401, error_body("Incorrect API key provided"))

    with pytest.raises(ModelAuthError) as info:
        await model.complete(ask(Message(role="user", content="hi")))

    assert info.value.status == 401
    assert len(fake_server.requests) == 1


async def test_output_schema_via_system_prompt_by_default(
    model: OpenAIModel, fake_server: FakeServer
) -> None:
    fake_server.enqueue(200, completion({"content": "{}"}, "stop"))
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}

    await model.complete(ask(Message(role="user", content="hi"), output_schema=schema))

    sent = fake_server.requests[0].body
    assert "response_format" not in sent
    assert "JSON Schema" in sent["messages"][0]["content"]


async def test_output_schema_via_response_format_when_supported(fake_server: FakeServer) -> None:
    model = OpenAIModel(
        MODEL, api_key="k", base_url=fake_server.url + "/v1", json_schema_response_format=True
    )
    fake_server.enqueue(200, completion({"content": "{}"}, "stop"))
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    try:
        await model.complete(ask(Message(role="user", content="hi"), output_schema=schema))
    finally:
        await model.aclose()

    sent = fake_server.requests[0].body
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}


async def test_local_server_needs_no_api_key(fake_server: FakeServer) -> None:
    model = OpenAIModel("llama3.2", base_url=fake_server.url + "/v1")
    fake_server.enqueue(200, completion({"content": "hello"}, "stop"))
    try:
        response = await model.complete(ModelRequest(messages=[Message(role="user", content="hi")]))
    finally:
        await model.aclose()
    assert response.text == "hello"
