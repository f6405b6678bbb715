"""Neutral model-layer types shared by every provider, the worker loop and the ledger."""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field


class ToolDefinition(BaseModel):
    """A tool as offered to a model."""

    model_config = ConfigDict(frozen=True)

    name: str
    """Tool name, unique within one request."""
    description: str = ""
    """What the tool does, shown to the model."""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    """JSON Schema of the tool's arguments (an object schema)."""


class ToolCall(BaseModel):
    """A model's request to call one tool."""

    id: str
    """Provider-assigned call id; the tool result must echo it."""
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class Message(BaseModel):
    """One conversation turn in provider-neutral form."""

    role: Literal["user", "assistant", "tool"]
    content: str = ""
    """Text content (for role=tool: the tool result or error, as text)."""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    """Tool calls made by the assistant in this turn."""
    tool_call_id: str | None = None
    """For role=tool: the id of the call this answers."""
    is_error: bool = False
    """For role=tool: the result is an error the model should correct."""


class Usage(BaseModel):
    """Token usage of one model call."""

    input_tokens: int = 0
    """All input tokens, cached ones included (the cache fields are parts of it)."""
    output_tokens: int = 0
    cache_read_tokens: int = 0
    """Input tokens read from the provider's prompt cache (priced at its cache-read price)."""
    cache_write_tokens: int = 0
    """Input tokens written to the provider's prompt cache (its cache-write price)."""


class UsageTotals(BaseModel):
    """What a run used, summed: a step run (`StepOutcome`), a step and a task as folded
    from the ledger (`orchestrator.state`). The one declaration of these counters."""

    model_calls: int = 0
    """Model calls made (replayed ones excluded)."""
    tool_calls: int = 0
    """Tools executed (replayed ones excluded)."""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def add_model_call(self, usage: Usage, cost: float) -> None:
        """Count one model call's tokens and cost."""
        self.model_calls += 1
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.cost_usd += cost


class ModelRequest(BaseModel):
    """Everything a provider needs for one call."""

    system: str = ""
    messages: list[Message]
    tools: list[ToolDefinition] = Field(default_factory=list)
    output_schema: dict[str, Any] | None = None
    """When set, the final answer must be JSON matching this schema."""
    max_tokens: int = 1024
    temperature: float | None = None
    cache_prefix: bool = False
    """Mark the stable prefix (tools, system prompt) and the conversation so far as
    cacheable where the provider needs it marked (Anthropic ``cache_control``)."""


class FailedAttempt(BaseModel):
    """A member of a fallback chain that did not answer a call (a later one did)."""

    provider: str
    model: str
    error: str
    """Why it did not answer (the transient error, or its open breaker)."""
    breaker: str | None = None
    """The circuit breaker in front of it, when it has one."""
    breaker_state: str | None = None
    """That breaker's state right after this attempt: `open` when this failure tripped
    it or it was already open (`skipped`)."""
    skipped: bool = False
    """Not called at all: its breaker was open."""


class ModelResponse(BaseModel):
    """One model call's result."""

    provider: str
    model: str
    text: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    stop_reason: str = ""
    raw: dict[str, Any] = Field(default_factory=dict)
    """The full vendor response body, kept so a run can be replayed without the model."""
    fallbacks: list[FailedAttempt] = Field(default_factory=list)
    """The chain members tried before the one that answered, in order (recorded with the
    call, so traces show fallbacks and breaker trips)."""


@runtime_checkable
class Model(Protocol):
    """A chat model with tool use.

    Lifecycle: a Model is created once per agent process and may serve concurrent
    `complete` calls; it owns any HTTP client and releases it in `aclose`.
    """

    provider: str
    name: str

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Run one call. Raises `jetmesh.agents.models.errors.ModelError` subclasses."""
        ...

    async def aclose(self) -> None: ...
