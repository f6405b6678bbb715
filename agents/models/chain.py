"""A fallback chain of models: the primary first, the next one on a transient failure.

`FallbackChain` is itself a `Model`. A call goes to the first model; when it fails
transiently (5xx, 429, timeout, retries exhausted) or its circuit breaker is open
(`ModelCircuitOpen`), the same request goes to the next model, and so on. Errors that
another model would not fix (a bad key, an invalid request, a malformed answer) are
raised at once. The response is the answering model's own, so its ``provider`` and
``model`` (and hence the ledger and the cost) name the model that really answered.
When every model failed, `ModelChainExhausted` (transient) lists why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from jetmesh.agents.breakers import is_transient
from jetmesh.agents.models.errors import (
    ModelChainExhausted,
    ModelCircuitOpen,
    ModelError,
    ModelTransientError,
)
from jetmesh.agents.models.types import FailedAttempt, Model, ModelRequest, ModelResponse

__all__ = ["FallbackChain"]

log = logging.getLogger(__name__)


def _as_model_error(model: Model, exc: BaseException) -> ModelError:
    if isinstance(exc, ModelError):
        return exc
    wrapped = ModelTransientError(model.provider, model.name, f"{type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped


def _attempt(model: Model, error: ModelError) -> FailedAttempt:
    """What a failed member leaves in the answer's record: the error and its breaker."""
    states: dict[str, dict[str, Any]] = {}
    get = getattr(model, "breaker_states", None)
    if callable(get):
        states = get()
    name, state = next(iter(states.items()), (None, {}))
    return FailedAttempt(provider=model.provider, model=model.name, error=error.message[:500],
                         breaker=name, breaker_state=state.get("state"),
                         skipped=isinstance(error, ModelCircuitOpen))


class FallbackChain:
    """Models tried in order. ``provider``/``name`` are the primary's (used for budget
    estimates and display); responses carry the answering model's."""

    def __init__(self, models: Sequence[Model]) -> None:
        if not models:
            raise ValueError("a fallback chain needs at least one model")
        self.models: list[Model] = list(models)
        self.provider = self.models[0].provider
        self.name = self.models[0].name
        self.fallbacks_used = 0
        """Calls answered by a model other than the primary."""
        self.last_answered_by: str | None = None
        """``provider/model`` of the member that answered the latest call."""

    async def complete(self, request: ModelRequest) -> ModelResponse:
        errors: list[ModelError] = []
        tried: list[FailedAttempt] = []
        for index, model in enumerate(self.models):
            try:
                response = await model.complete(request)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                errors.append(_as_model_error(model, exc))
                tried.append(_attempt(model, errors[-1]))
                if index + 1 < len(self.models):
                    nxt = self.models[index + 1]
                    log.warning("%s/%s failed (%s); falling back to %s/%s", model.provider,
                                model.name, exc, nxt.provider, nxt.name)
                continue
            if index:
                self.fallbacks_used += 1
            if not response.provider or not response.model or tried:
                response = response.model_copy(update={
                    "provider": response.provider or model.provider,
                    "model": response.model or model.name,
                    "fallbacks": [*response.fallbacks, *tried]})
            self.last_answered_by = f"{response.provider}/{response.model}"
            return response
        if len(errors) == 1:
            raise errors[0]
        waits = [e.retry_after for e in errors
                 if isinstance(e, ModelTransientError) and e.retry_after is not None]
        summary = "; ".join(f"{e.provider}/{e.model}: {e.message}" for e in errors)
        raise ModelChainExhausted(
            self.provider, self.name,
            f"all {len(errors)} models of the fallback chain failed: {summary}",
            errors=errors, retry_after=min(waits) if waits else None,
        ) from errors[-1]

    def describe(self) -> str:
        """``anthropic/claude-sonnet-4-5 -> openai/gpt-4.1-mini``."""
        return " -> ".join(f"{m.provider}/{m.name}" for m in self.models)

    def breaker_states(self) -> dict[str, dict[str, Any]]:
        """States of the breakers in front of the chain's models."""
        states: dict[str, dict[str, Any]] = {}
        for m in self.models:
            get = getattr(m, "breaker_states", None)
            if callable(get):
                states.update(get())
        return states

    async def aclose(self) -> None:
        results = await asyncio.gather(*(m.aclose() for m in self.models),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def __repr__(self) -> str:
        return f"FallbackChain({self.describe()})"
