"""Models that run without a provider: scripted, function-backed and the dry-run sim."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias

from jetmesh.agents.models.errors import ModelError
from jetmesh.agents.models.schema_examples import example_for_schema
from jetmesh.agents.models.types import (
    Message,
    ModelRequest,
    ModelResponse,
    ToolCall,
    ToolDefinition,
    Usage,
)

__all__ = [
    "FunctionModel",
    "ModelFunction",
    "ScriptItem",
    "ScriptedModel",
    "SimModel",
    "estimate_usage",
    "tool_call",
]

FunctionResult: TypeAlias = ModelResponse | str | ToolCall | Sequence[ToolCall]
ModelFunction: TypeAlias = Callable[[ModelRequest], FunctionResult | Awaitable[FunctionResult]]
"""A turn function: gets the request, returns a response or a final text (sync or async)."""
ScriptItem: TypeAlias = ModelResponse | str | ToolCall | Sequence[ToolCall] | ModelFunction
"""One scripted turn: a response, a final text, tool call(s) or a turn function."""

_call_ids = itertools.count(1)


def tool_call(name: str, /, **arguments: Any) -> ToolCall:
    """Build a `ToolCall` with a fresh process-unique id (for scripts)."""
    return ToolCall(id=f"call_{next(_call_ids)}", name=name, arguments=arguments)


_JSON_LENGTHS: dict[tuple[Any, ...], tuple[tuple[Any, ...], int]] = {}
"""key -> (the objects the key names by id, JSON length); see `_json_len`."""


def _json_len(value: ToolDefinition | dict[str, Any]) -> int:
    """The length of a tool definition's JSON, or of ``json.dumps`` of a schema, cached.

    Every call of a step repeats the same tool definitions (the `Tool` caches them) and
    output schema, and schemas are not mutated (the validator cache in
    `jetmesh.agents.spec` relies on it too). A request's output schema is a shallow copy
    of its skill's, so its values are the same objects: the key is the identity of the
    definition, or the keys and the identities of the values of the schema. The entry
    holds those objects, so none of its ids is reused by another object while it lives.
    """
    if isinstance(value, ToolDefinition):
        held: tuple[Any, ...] = (value,)
        key: tuple[Any, ...] = ("tool", id(value))
    else:
        held = tuple(value.values())
        key = ("schema", tuple(value), tuple(map(id, held)))
    hit = _JSON_LENGTHS.get(key)
    if hit is not None:
        return hit[1]
    n = len(value.model_dump_json() if isinstance(value, ToolDefinition) else json.dumps(value))
    if len(_JSON_LENGTHS) > 1024:
        _JSON_LENGTHS.clear()
    _JSON_LENGTHS[key] = (held, n)
    return n


def _chars(request: ModelRequest) -> int:
    n = len(request.system)
    for m in request.messages:
        n += len(m.content)
        n += sum(len(c.name) + len(json.dumps(c.arguments)) for c in m.tool_calls)
    n += sum(_json_len(t) for t in request.tools)
    if request.output_schema is not None:
        n += _json_len(request.output_schema)
    return n


def estimate_usage(request: ModelRequest, text: str, tool_calls: Sequence[ToolCall]) -> Usage:
    """Token usage estimated as ceil(chars / 4) of the request and of the response."""
    out_chars = len(text) + sum(len(c.name) + len(json.dumps(c.arguments)) for c in tool_calls)
    return Usage(
        input_tokens=math.ceil(_chars(request) / 4), output_tokens=math.ceil(out_chars / 4)
    )


def _to_response(
    result: ModelResponse | str | ToolCall | Sequence[ToolCall],
    request: ModelRequest,
    provider: str,
    model: str,
) -> ModelResponse:
    if isinstance(result, ModelResponse):
        return result
    if isinstance(result, str):
        return ModelResponse(
            provider=provider,
            model=model,
            text=result,
            usage=estimate_usage(request, result, []),
            stop_reason="end_turn",
        )
    calls = [result] if isinstance(result, ToolCall) else list(result)
    if not all(isinstance(c, ToolCall) for c in calls):
        raise TypeError(f"not a script item: {result!r}")
    return ModelResponse(
        provider=provider,
        model=model,
        tool_calls=calls,
        usage=estimate_usage(request, "", calls),
        stop_reason="tool_use",
    )


async def _call(fn: ModelFunction, request: ModelRequest) -> FunctionResult:
    result = fn(request)
    if inspect.isawaitable(result):
        return await result
    return result


class ScriptedModel:
    """A model that plays back a queue of turns, for tests and benchmarks.

    Each `complete` pops the next item; an empty queue raises `ModelError`
    ("script exhausted"). `requests` records every request in order.
    """

    def __init__(self, *items: ScriptItem, name: str = "scripted", provider: str = "sim") -> None:
        self.provider = provider
        self.name = name
        self.requests: list[ModelRequest] = []
        """Every request received, in order."""
        self._queue: deque[ScriptItem] = deque()
        self.enqueue(*items)

    def enqueue(self, *items: ScriptItem) -> None:
        """Append turns to the script."""
        for item in items:
            if not (
                isinstance(item, ModelResponse | str | ToolCall | list | tuple) or callable(item)
            ):
                raise TypeError(f"not a script item: {item!r}")
            self._queue.append(item)

    @property
    def remaining(self) -> int:
        """Turns not yet played."""
        return len(self._queue)

    def assert_complete(self) -> None:
        """Raise AssertionError unless every scripted turn was played."""
        if self._queue:
            raise AssertionError(
                f"{self.provider}/{self.name}: {len(self._queue)} scripted turn(s) not played"
            )

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.requests.append(request)
        if not self._queue:
            raise ModelError(
                self.provider,
                self.name,
                f"script exhausted after {len(self.requests) - 1} call(s)",
            )
        item = self._queue.popleft()
        if callable(item) and not isinstance(item, ModelResponse | ToolCall):
            result: ModelResponse | str | ToolCall | Sequence[ToolCall] = await _call(item, request)
        else:
            result = item
        return _to_response(result, request, self.provider, self.name)

    async def aclose(self) -> None:
        return None


class FunctionModel:
    """A model whose every turn is computed by a function of the request."""

    def __init__(
        self, function: ModelFunction, *, name: str = "function", provider: str = "sim"
    ) -> None:
        self.provider = provider
        self.name = name
        self.function = function
        self.requests: list[ModelRequest] = []
        """Every request received, in order."""

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.requests.append(request)
        result = await _call(self.function, request)
        return _to_response(result, request, self.provider, self.name)

    async def aclose(self) -> None:
        return None


def _tool_results(messages: Sequence[Message]) -> list[dict[str, Any]]:
    names = {c.id: c.name for m in messages for c in m.tool_calls}
    results: list[dict[str, Any]] = []
    for m in messages:
        if m.role != "tool":
            continue
        try:
            content: Any = json.loads(m.content)
        except ValueError:
            content = m.content
        entry: dict[str, Any] = {"tool": names.get(m.tool_call_id or "", ""), "result": content}
        if m.is_error:
            entry["is_error"] = True
        results.append(entry)
    return results


def _first_user_object(messages: Sequence[Message]) -> dict[str, Any]:
    """The first user message, when it is a JSON object (a step input)."""
    first = next((m.content for m in messages if m.role == "user"), "")
    try:
        data = json.loads(first)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _prefer_given(args: Any, given: dict[str, Any], schema: dict[str, Any]) -> Any:
    """Use values from the step input for same-named arguments, when still schema-valid.

    So a dry run of `lookup_order` on a step whose input has `order_id: "A1001"` looks up
    that order rather than a placeholder.
    """
    if not isinstance(args, dict) or not given:
        return args
    from jetmesh.agents.spec import schema_errors

    merged = {**args, **{k: v for k, v in given.items() if k in args}}
    if merged == args:
        return args
    if not schema_errors(schema, merged):
        return merged
    return args


def sim_digest(request: ModelRequest) -> str:
    """The dry-run answer text: ``[sim] `` + the JSON of every tool result in the
    conversation or, when there are none, the whole last user message."""
    results = _tool_results(request.messages)
    if results:
        return "[sim] " + json.dumps(results, sort_keys=True, ensure_ascii=False)
    last_user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
    return "[sim] " + last_user


class SimModel:
    """The dry-run model used when no API key is configured.

    Turn 1 (no tool results yet, tools offered): calls every offered tool once, in offered
    order, with arguments generated from its input schema. Afterwards it answers with
    `sim_digest`; with an ``output_schema`` the answer is JSON valid against it whose
    string fields hold the digest. Deterministic; usage is estimated from text size.
    """

    provider = "sim"

    def __init__(self, *, name: str = "dry-run", latency_s: float = 0.0) -> None:
        self.name = name
        self.latency_s = latency_s
        """Simulated latency per call, for benchmarks."""

    async def complete(self, request: ModelRequest) -> ModelResponse:
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        has_results = any(m.role == "tool" for m in request.messages)
        if request.tools and not has_results:
            calls = []
            given = _first_user_object(request.messages)
            for i, tool in enumerate(request.tools, start=1):
                args = _prefer_given(example_for_schema(tool.input_schema), given,
                                     tool.input_schema)
                calls.append(
                    ToolCall(
                        id=f"sim_{i}",
                        name=tool.name,
                        arguments=args if isinstance(args, dict) else {},
                    )
                )
            return _to_response(calls, request, self.provider, self.name)
        digest = sim_digest(request)
        if request.output_schema is not None:
            text = json.dumps(
                example_for_schema(request.output_schema, text=digest), ensure_ascii=False
            )
        else:
            text = digest
        return _to_response(text, request, self.provider, self.name)

    async def aclose(self) -> None:
        return None
