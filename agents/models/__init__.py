"""jetmesh.agents.models: neutral model types, providers, the sim model and pricing.

Provider SDKs (anthropic, openai) load only when a provider model is created.
"""

from jetmesh.agents.breakers import (
    BREAKERS,
    BreakerModel,
    BreakerRegistry,
    CircuitBreaker,
    breaker_states,
    describe_breakers,
    is_transient,
)
from jetmesh.agents.models.chain import FallbackChain
from jetmesh.agents.models.errors import (
    ModelAuthError,
    ModelCallsDisabled,
    ModelChainExhausted,
    ModelCircuitOpen,
    ModelConfigError,
    ModelError,
    ModelRateLimited,
    ModelRequestError,
    ModelResponseError,
    ModelRetriesExhausted,
    ModelTransientError,
)
from jetmesh.agents.models.factory import (
    ModelSettings,
    create_model,
    create_model_chain,
    describe_default_model,
)
from jetmesh.agents.models.pricing import cost_usd
from jetmesh.agents.models.retry import RetryPolicy
from jetmesh.agents.models.schema_examples import example_for_schema
from jetmesh.agents.models.sim import FunctionModel, ScriptedModel, SimModel, tool_call
from jetmesh.agents.models.switch import allow_model_requests
from jetmesh.agents.models.types import (
    FailedAttempt,
    Message,
    Model,
    ModelRequest,
    ModelResponse,
    ToolCall,
    ToolDefinition,
    Usage,
    UsageTotals,
)

__all__ = [
    "BREAKERS",
    "BreakerModel",
    "BreakerRegistry",
    "CircuitBreaker",
    "FailedAttempt",
    "FallbackChain",
    "FunctionModel",
    "Message",
    "Model",
    "ModelAuthError",
    "ModelCallsDisabled",
    "ModelChainExhausted",
    "ModelCircuitOpen",
    "ModelConfigError",
    "ModelError",
    "ModelRateLimited",
    "ModelRequest",
    "ModelRequestError",
    "ModelResponse",
    "ModelResponseError",
    "ModelRetriesExhausted",
    "ModelSettings",
    "ModelTransientError",
    "RetryPolicy",
    "ScriptedModel",
    "SimModel",
    "ToolCall",
    "ToolDefinition",
    "Usage",
    "UsageTotals",
    "allow_model_requests",
    "breaker_states",
    "cost_usd",
    "create_model",
    "create_model_chain",
    "describe_breakers",
    "describe_default_model",
    "example_for_schema",
    "is_transient",
    "tool_call",
]
