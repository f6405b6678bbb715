"""OpenAI Chat Completions provider (official ``openai`` SDK), for OpenAI and any
OpenAI-compatible server (Ollama, vLLM, llama.cpp) via ``base_url``."""

from __future__ import annotations

import json
import os
from typing import Any, Literal, cast

import openai
from openai.types.chat import ChatCompletion

from jetmesh.agents.models._http import map_sdk_error
from jetmesh.agents.models.anthropic import output_schema_instruction
from jetmesh.agents.models.errors import ModelError, ModelResponseError
from jetmesh.agents.models.retry import RetryPolicy, call_with_retries
from jetmesh.agents.models.switch import check_model_request_allowed
from jetmesh.agents.models.types import ModelRequest, ModelResponse, ToolCall, Usage
from jetmesh.bus.tracing import traced

__all__ = ["DEFAULT_OPENAI_MODEL", "OpenAIModel", "to_openai_request"]

DEFAULT_OPENAI_MODEL = "gpt-4.1-mini"
TOOL_ERROR_PREFIX = "[tool error] "
"""Chat Completions has no is_error flag on tool messages; errors carry this prefix."""

MaxTokensField = Literal["max_tokens", "max_completion_tokens"]


def to_openai_request(
    request: ModelRequest,
    model: str,
    *,
    json_schema_response_format: bool = False,
    max_tokens_field: MaxTokensField = "max_tokens",
) -> dict[str, Any]:
    """Neutral request → Chat Completions body (pure)."""
    system = request.system
    response_format: dict[str, Any] | None = None
    if request.output_schema is not None:
        if json_schema_response_format:
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.output_schema},
            }
        else:
            instruction = output_schema_instruction(request.output_schema)
            system = f"{system}\n\n{instruction}" if system else instruction

    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    for m in request.messages:
        if m.role == "user":
            messages.append({"role": "user", "content": m.content})
        elif m.role == "assistant":
            out: dict[str, Any] = {"role": "assistant", "content": m.content or None}
            if m.tool_calls:
                out["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                    }
                    for c in m.tool_calls
                ]
            messages.append(out)
        else:
            content = TOOL_ERROR_PREFIX + m.content if m.is_error else m.content
            messages.append(
                {"role": "tool", "tool_call_id": m.tool_call_id or "", "content": content}
            )

    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        max_tokens_field: request.max_tokens,
    }
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.input_schema,
                },
            }
            for t in request.tools
        ]
    if response_format is not None:
        body["response_format"] = response_format
    if request.temperature is not None:
        body["temperature"] = request.temperature
    return body


def from_openai_response(completion: ChatCompletion, model: str) -> ModelResponse:
    """Validated Chat Completions response → neutral response (pure).

    Raises `ModelResponseError` for no choices or tool arguments that are not a JSON
    object (an empty arguments string means no arguments).
    """
    if not completion.choices:
        raise ModelResponseError("openai", model, "response has no choices")
    choice = completion.choices[0]
    calls: list[ToolCall] = []
    for call in choice.message.tool_calls or []:
        if call.type != "function":
            raise ModelResponseError("openai", model, f"unsupported tool call type {call.type!r}")
        text = call.function.arguments
        try:
            arguments = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise ModelResponseError(
                "openai",
                model,
                f"tool call {call.id} ({call.function.name}): arguments are not "
                f"valid JSON: {exc}: {text[:200]!r}",
            ) from exc
        if not isinstance(arguments, dict):
            raise ModelResponseError(
                "openai",
                model,
                f"tool call {call.id} ({call.function.name}): arguments are "
                f"not a JSON object: {text[:200]!r}",
            )
        calls.append(ToolCall(id=call.id, name=call.function.name, arguments=arguments))
    usage = completion.usage
    return ModelResponse(
        provider="openai",
        model=completion.model or model,
        text=choice.message.content or "",
        tool_calls=calls,
        usage=Usage(
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
            # Automatic prompt caching: the cached part of prompt_tokens.
            cache_read_tokens=(usage.prompt_tokens_details.cached_tokens or 0)
            if usage and usage.prompt_tokens_details else 0,
        ),
        stop_reason=choice.finish_reason or "",
        raw=completion.model_dump(mode="json"),
    )


class OpenAIModel:
    """A Chat Completions model, with jetmesh's retries and error tree.

    ``json_schema_response_format``: the server supports ``response_format`` of type
    ``json_schema`` (OpenAI does; many compatible servers do not), otherwise an output
    schema is requested through the system prompt. ``max_tokens_field`` defaults to
    ``max_completion_tokens`` on api.openai.com and ``max_tokens`` elsewhere.
    """

    provider = "openai"

    def __init__(
        self,
        name: str = DEFAULT_OPENAI_MODEL,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        json_schema_response_format: bool | None = None,
        max_tokens_field: MaxTokensField | None = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        self.name = name
        self.retry = retry or RetryPolicy()
        if client is None:
            if api_key is None and not os.environ.get("OPENAI_API_KEY") and base_url:
                api_key = "unused"  # local OpenAI-compatible servers need no key
            client = openai.AsyncOpenAI(  # `traced`: see AnthropicModel
                api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=0,
                http_client=traced(openai.DefaultAsyncHttpxClient(timeout=timeout_s)),
            )
        self._client = client
        official = self._client.base_url.host == "api.openai.com"
        self.json_schema_response_format = (
            official if json_schema_response_format is None else json_schema_response_format
        )
        self.max_tokens_field: MaxTokensField = max_tokens_field or (
            "max_completion_tokens" if official else "max_tokens"
        )

    @property
    def base_url(self) -> str:
        return str(self._client.base_url)

    async def complete(self, request: ModelRequest) -> ModelResponse:
        check_model_request_allowed(self.provider, self.name, self.base_url)
        body = to_openai_request(
            request,
            self.name,
            json_schema_response_format=self.json_schema_response_format,
            max_tokens_field=self.max_tokens_field,
        )
        return await call_with_retries(
            lambda: self._once(body), provider=self.provider, model=self.name, policy=self.retry
        )

    async def _once(self, body: dict[str, Any]) -> ModelResponse:
        try:
            raw = await self._client.chat.completions.with_raw_response.create(**body)
            data = json.loads(cast(Any, raw).http_response.content)
            completion = ChatCompletion.model_validate(data)
        except ModelError:
            raise
        except (openai.APIError, ValueError) as exc:
            # ValueError covers bad JSON and pydantic.ValidationError (wrong shape).
            raise map_sdk_error(openai, exc, self.provider, self.name) from exc
        return from_openai_response(completion, self.name)

    async def aclose(self) -> None:
        await self._client.close()
