"""Anthropic Messages API provider (official ``anthropic`` SDK, tool use)."""

from __future__ import annotations

import json
from typing import Any, cast

import anthropic
from anthropic.types import Message as AnthropicMessage

from jetmesh.agents.models._http import map_sdk_error
from jetmesh.agents.models.errors import ModelError, ModelResponseError
from jetmesh.agents.models.retry import RetryPolicy, call_with_retries
from jetmesh.agents.models.switch import check_model_request_allowed
from jetmesh.agents.models.types import (
    ModelRequest,
    ModelResponse,
    ToolCall,
    Usage,
)
from jetmesh.bus.tracing import traced

__all__ = ["DEFAULT_ANTHROPIC_MODEL", "AnthropicModel", "to_anthropic_request"]

DEFAULT_ANTHROPIC_MODEL = "claude-sonnet-4-5"


def output_schema_instruction(schema: dict[str, Any]) -> str:
    """System-prompt text asking for a JSON answer matching ``schema``."""
    return (
        "Give your final answer as a single JSON value, with no other text, that is valid "
        "against this JSON Schema:\n" + json.dumps(schema, sort_keys=True)
    )


def to_anthropic_request(request: ModelRequest, model: str) -> dict[str, Any]:
    """Neutral request → Messages API body (pure).

    Tool results become ``tool_result`` blocks in a user turn; consecutive turns of the
    same role are merged, since the API expects user and assistant to alternate.
    """
    messages: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for m in request.messages:
        if m.role == "user":
            add("user", [{"type": "text", "text": m.content}])
        elif m.role == "assistant":
            blocks: list[dict[str, Any]] = []
            if m.content:
                blocks.append({"type": "text", "text": m.content})
            blocks += [
                {"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}
                for c in m.tool_calls
            ]
            add("assistant", blocks or [{"type": "text", "text": ""}])
        else:
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": m.tool_call_id or "",
                "content": m.content,
            }
            if m.is_error:
                block["is_error"] = True
            add("user", [block])

    system = request.system
    if request.output_schema is not None:
        instruction = output_schema_instruction(request.output_schema)
        system = f"{system}\n\n{instruction}" if system else instruction
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_tokens,
        "messages": messages,
    }
    tools = [
        {"name": t.name, "description": t.description, "input_schema": t.input_schema}
        for t in request.tools
    ]
    if request.cache_prefix:
        _mark_cacheable(system, tools, messages, body)
    elif system:
        body["system"] = system
    if tools:
        body["tools"] = tools
    if request.temperature is not None:
        body["temperature"] = request.temperature
    return body


CACHE_CONTROL: dict[str, Any] = {"type": "ephemeral"}
"""The prompt-cache breakpoint marker (5-minute cache)."""


def _mark_cacheable(system: str, tools: list[dict[str, Any]],
                    messages: list[dict[str, Any]], body: dict[str, Any]) -> None:
    """Two cache breakpoints: the stable prefix (tools, then system: the breakpoint on
    the system block covers both, on the last tool when there is no system prompt) and
    the last block of the conversation, so the next turn of a step reads everything
    before its new messages from the cache."""
    if system:
        body["system"] = [{"type": "text", "text": system, "cache_control": CACHE_CONTROL}]
    elif tools:
        tools[-1] = {**tools[-1], "cache_control": CACHE_CONTROL}
    if messages and messages[-1]["content"]:
        last = messages[-1]["content"]
        last[-1] = {**last[-1], "cache_control": CACHE_CONTROL}


def from_anthropic_response(message: AnthropicMessage, model: str) -> ModelResponse:
    """Validated Messages API response → neutral response (pure)."""
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in message.content:
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "tool_use":
            if not isinstance(block.input, dict):
                raise ModelResponseError(
                    "anthropic", model, f"tool_use {block.id} input is not an object"
                )
            calls.append(ToolCall(id=block.id, name=block.name, arguments=block.input))
    return ModelResponse(
        provider="anthropic",
        model=message.model or model,
        text="".join(texts),
        tool_calls=calls,
        usage=_usage(message),
        stop_reason=message.stop_reason or "",
        raw=message.model_dump(mode="json"),
    )


def _usage(message: AnthropicMessage) -> Usage:
    """Anthropic counts cache reads and writes apart from ``input_tokens``; jetmesh's
    ``input_tokens`` is the whole input, of which the cache fields are parts."""
    u = message.usage
    read = u.cache_read_input_tokens or 0
    write = u.cache_creation_input_tokens or 0
    return Usage(input_tokens=u.input_tokens + read + write, output_tokens=u.output_tokens,
                 cache_read_tokens=read, cache_write_tokens=write)


class AnthropicModel:
    """Claude through the Messages API, with jetmesh's retries and error tree."""

    provider = "anthropic"

    def __init__(
        self,
        name: str = DEFAULT_ANTHROPIC_MODEL,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        client: anthropic.AsyncAnthropic | None = None,
    ) -> None:
        self.name = name
        self.retry = retry or RetryPolicy()
        # `traced`: each call carries the step's trace context (and a live span).
        self._client = client or anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=0,
            http_client=traced(anthropic.DefaultAsyncHttpxClient(timeout=timeout_s)),
        )

    @property
    def base_url(self) -> str:
        return str(self._client.base_url)

    async def complete(self, request: ModelRequest) -> ModelResponse:
        check_model_request_allowed(self.provider, self.name, self.base_url)
        body = to_anthropic_request(request, self.name)
        return await call_with_retries(
            lambda: self._once(body), provider=self.provider, model=self.name, policy=self.retry
        )

    async def _once(self, body: dict[str, Any]) -> ModelResponse:
        try:
            raw = await self._client.messages.with_raw_response.create(**body)
            data = json.loads(cast(Any, raw).http_response.content)
            message = AnthropicMessage.model_validate(data)
        except ModelError:
            raise
        except (anthropic.APIError, ValueError) as exc:
            # ValueError covers bad JSON and pydantic.ValidationError (wrong shape).
            raise map_sdk_error(anthropic, exc, self.provider, self.name) from exc
        return from_anthropic_response(message, self.name)

    async def aclose(self) -> None:
        await self._client.close()
