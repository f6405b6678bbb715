"""AnthropicModel: the real anthropic SDK against a local server speaking the Messages API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from model_fakes import FakeServer

from jetmesh.agents.models import (
    Message,
    ModelAuthError,
    ModelRequest,
    ModelResponseError,
    ModelRetriesExhausted,
    ToolDefinition,
    cost_usd,
)
from jetmesh.agents.models.anthropic import AnthropicModel
from jetmesh.agents.models.retry import RetryPolicy

MODEL = "claude-sonnet-4-5"
LOOKUP = ToolDefinition(
    name="lookup",
    description="Look a term up.",
    input_schema={"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
)


def message_body(
    content: list[dict[str, object]], stop: str, inp: int, out: int
) -> dict[str, object]:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": inp, "output_tokens": out},
    }


def error_body(kind: str, message: str) -> dict[str, object]:
    return {"type": "error", "error": {"type": kind, "message": message}}


class Sleeps:
    """A RetryPolicy sleep that records the delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def model(fake_server: FakeServer, sleeps: Sleeps) -> AsyncIterator[AnthropicModel]:
    m = AnthropicModel(
        MODEL,
        api_key="test-key",
        base_url=fake_server.url,
        retry=RetryPolicy(max_attempts=3, base_delay_s=0.001, sleep=sleeps),
    )
    yield m
    await m.aclose()


def ask(*messages: Message) -> ModelRequest:
    return ModelRequest(system="Be brief.", messages=list(messages), tools=[LOOKUP], max_tokens=200)


async def test_tool_use_round_trip(model: AnthropicModel, fake_server: FakeServer) -> None:
    fake_server.enqueue(
        200,
        message_body(
            [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_01", "name": "lookup", "input": {"q": "nats"}},
            ],
            "tool_use",
            120,
            30,
        ),
    )
    fake_server.enqueue(
        200, message_body([{"type": "text", "text": "NATS is a bus."}], "end_turn", 180, 10)
    )

    user = Message(role="user", content="What is NATS?")
    first = await model.complete(ask(user))
    assert first.provider == "anthropic"
    assert first.text == "Let me look."
    assert [(c.id, c.name, c.arguments) for c in first.tool_calls] == [
        ("toolu_01", "lookup", {"q": "nats"})
    ]
    assert first.stop_reason == "tool_use"
    assert first.usage.input_tokens == 120 and first.usage.output_tokens == 30
    assert first.raw["id"] == "msg_01"

    second = await model.complete(
        ask(
            user,
            Message(role="assistant", content=first.text, tool_calls=first.tool_calls),
            Message(role="tool", tool_call_id="toolu_01", content="a message bus"),
        )
    )
    assert second.text == "NATS is a bus."
    assert second.tool_calls == []
    assert cost_usd("anthropic", second.model, second.usage) == pytest.approx(
        (180 * 3.0 + 10 * 15.0) / 1e6
    )

    assert [r.path for r in fake_server.requests] == ["/v1/messages", "/v1/messages"]
    headers = fake_server.requests[0].headers
    # SDK 2.x sends the key as a bearer token; older versions used x-api-key.
    assert (
        headers.get("x-api-key") == "test-key" or headers.get("authorization") == "Bearer test-key"
    )
    sent = fake_server.requests[1].body
    assert sent["model"] == MODEL
    assert sent["system"] == "Be brief."
    assert sent["max_tokens"] == 200
    assert sent["tools"] == [
        {"name": "lookup", "description": "Look a term up.", "input_schema": LOOKUP.input_schema}
    ]
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "What is NATS?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_01", "name": "lookup", "input": {"q": "nats"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "a message bus"}
            ],
        },
    ]


async def test_tool_error_result_is_flagged(model: AnthropicModel, fake_server: FakeServer) -> None:
    fake_server.enqueue(200, message_body([{"type": "text", "text": "ok"}], "end_turn", 1, 1))
    await model.complete(
        ask(
            Message(role="user", content="go"),
            Message(role="assistant", tool_calls=[{"id": "t1", "name": "lookup"}]),  # type: ignore[list-item]
            Message(role="tool", tool_call_id="t1", content="boom", is_error=True),
            Message(role="user", content="try again"),
        )
    )
    last = fake_server.requests[0].body["messages"][-1]
    assert last == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "boom", "is_error": True},
            {"type": "text", "text": "try again"},
        ],
    }


async def test_rate_limited_then_success_honours_retry_after(
    model: AnthropicModel, fake_server: FakeServer, sleeps: Sleeps
) -> None:
    fake_server.enqueue(429, error_body("rate_limit_error", "slow down"), {"retry-after": "2.5"})
    fake_server.enqueue(200, message_body([{"type": "text", "text": "done"}], "end_turn", 5, 1))

    response = await model.complete(ask(Message(role="user", content="hi")))

    assert response.text == "done"
    assert len(fake_server.requests) == 2
    assert sleeps.delays == [2.5]


async def test_burst_of_500s_exhausts_retries(
    model: AnthropicModel, fake_server: FakeServer, sleeps: Sleeps
) -> None:
    fake_server.enqueue(500, error_body("api_error", "internal boom"), times=3)

    with pytest.raises(ModelRetriesExhausted) as info:
        await model.complete(ask(Message(role="user", content="hi")))

    err = info.value
    assert len(fake_server.requests) == 3
    assert err.attempts == 3
    assert err.last_error.status == 500
    assert str(err).startswith(f"anthropic/{MODEL}: 3 attempts failed, last: HTTP 500")
    assert "internal boom" in str(err)
    assert len(sleeps.delays) == 2
    assert all(0 <= d <= 0.002 for d in sleeps.delays)


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"type": "message", "content": "nope"}'],
    ids=["bad-json", "wrong-shape"],
)
async def test_malformed_body_is_a_response_error(
    model: AnthropicModel, fake_server: FakeServer, body: bytes
) -> None:
    fake_server.enqueue(200, body)

    with pytest.raises(ModelResponseError):
        await model.complete(ask(Message(role="user", content="hi")))
    assert len(fake_server.requests) == 1


async def test_401_is_an_auth_error_without_retry(
    model: AnthropicModel, fake_server: FakeServer
) -> None:
    fake_server.enqueue(401, error_body("authentication_error", "invalid x-api-key"))

    with pytest.raises(ModelAuthError) as info:
        await model.complete(ask(Message(role="user", content="hi")))

    assert info.value.status == 401
    assert "invalid x-api-key" in str(info.value)
    assert len(fake_server.requests) == 1


async def test_output_schema_goes_into_the_system_prompt(
    model: AnthropicModel, fake_server: FakeServer
) -> None:
    fake_server.enqueue(200, message_body([{"type": "text", "text": "{}"}], "end_turn", 1, 1))
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    await model.complete(
        ModelRequest(messages=[Message(role="user", content="hi")], output_schema=schema)
    )
    system = fake_server.requests[0].body["system"]
    assert "JSON Schema" in system and '"answer"' in system
