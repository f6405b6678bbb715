"""The model-call pipeline: every model call jetmesh makes, replayed, budgeted and recorded.

One `ModelCaller` serves the step loop (one per step run) and the orchestrator's planner
and merge (`orchestrator.planner.Recorder`, one per purpose). For each call it

1. replays: the i-th call reuses the i-th recorded response (`ModelCalledData.response`),
   with no model call, no budget and no record (it was recorded when first made); with
   ``replay_only`` an unrecorded call stops instead (`StepStopped("replay_diverged")`);
2. budgets: awaits the ``before`` hook, then `ModelCallGuard.before_model_call` (which
   may refuse by raising); exactly one of ``after_model_call`` / ``release`` follows;
3. calls the model, prices the response (`pricing.cost_usd`), adds it to ``usage``;
4. records one `ModelCalledData` through ``record`` before the caller goes on.

`parse_json_answer` is the one parser for a model's JSON answer (plans, structured
answers, routing picks).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from jetmesh.bus.events import ModelCalledData

from .errors import StepStopped
from .models.pricing import cost_usd
from .models.types import Model, ModelRequest, ModelResponse, UsageTotals

__all__ = [
    "BeforeModelCall",
    "ModelCallGuard",
    "ModelCaller",
    "parse_json_answer",
]

BeforeModelCall = Callable[[ModelRequest], Awaitable[None]]
"""Awaited before every real (not replayed) model call, e.g. to reserve budget. What it
raises propagates to the caller."""


class ModelCallGuard(Protocol):
    """Budget control around every real (not replayed) model call.

    `before_model_call` returns a reservation token and may raise to refuse the call;
    exactly one of `after_model_call` (the call answered) / `release` (it raised or was
    cancelled) follows for each token.
    """

    async def before_model_call(self, request: ModelRequest, model: Model) -> object: ...

    async def after_model_call(self, token: object, response: ModelResponse,
                               cost_usd: float) -> None: ...

    async def release(self, token: object) -> None: ...


@dataclass
class ModelCaller:
    """Replays, budgets, makes and records the model calls of one step or one purpose."""

    record: Callable[[ModelCalledData], Awaitable[None]]
    """Where each new call's `ModelCalledData` goes (the ledger, a list)."""
    agent: str
    """Who makes the calls (`orchestrator` for plan and merge)."""
    recorded: Sequence[ModelCalledData] = ()
    """Earlier recorded calls, in call order: the i-th call reuses the i-th."""
    guard: ModelCallGuard | None = None
    before: BeforeModelCall | None = None
    purpose: str = "step"
    """The default `ModelCalledData.purpose`."""
    step_id: str | None = None
    worker: str | None = None
    replay_only: bool = False
    """Every call must come from ``recorded``: an unrecorded one raises
    `StepStopped("replay_diverged")` before any model is called."""
    usage: UsageTotals = field(default_factory=UsageTotals)
    """This run's real calls (replayed ones cost nothing); shared with the step's
    other counters when the loop passes its own."""
    replayed: int = 0
    """Calls served from ``recorded``."""

    @property
    def calls_so_far(self) -> int:
        """Calls made or replayed so far (the next one's ordinal)."""
        return self.usage.model_calls + self.replayed

    @property
    def next_is_replayed(self) -> bool:
        """The next call is served from the recording (its decisions were recorded when
        it was first made)."""
        return self.calls_so_far < len(self.recorded)

    async def call(self, model: Model, request: ModelRequest, purpose: str | None = None
                   ) -> ModelResponse:
        index = self.calls_so_far
        if index < len(self.recorded):
            self.replayed += 1
            return ModelResponse.model_validate(self.recorded[index].response)
        if self.replay_only:
            raise StepStopped("replay_diverged", f"model call #{index + 1} of the step is "
                              f"not in the recording ({len(self.recorded)} recorded)")
        if self.before is not None:
            await self.before(request)
        token = await self.guard.before_model_call(request, model) if self.guard else None
        start = time.perf_counter()
        try:
            response = await model.complete(request)
        except BaseException:
            if self.guard:
                await self.guard.release(token)
            raise
        latency_ms = (time.perf_counter() - start) * 1000
        cost = cost_usd(response.provider, response.model, response.usage)
        if self.guard:
            await self.guard.after_model_call(token, response, cost)
        self.usage.add_model_call(response.usage, cost)
        u = response.usage
        await self.record(ModelCalledData(
            step_id=self.step_id, agent=self.agent, worker=self.worker,
            purpose=purpose or self.purpose, provider=response.provider,
            model=response.model, input_tokens=u.input_tokens, output_tokens=u.output_tokens,
            cost_usd=cost, latency_ms=latency_ms, response=response.model_dump(mode="json"),
            cache_read_tokens=u.cache_read_tokens, cache_write_tokens=u.cache_write_tokens))
        return response


_FENCE = re.compile(r"```(?:json)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_json_answer(text: str) -> tuple[Any, str | None]:
    """The JSON in ``text`` (the whole text, else its first fenced block) and None, or
    None and why it could not be parsed."""
    stripped = text.strip()
    try:
        return json.loads(stripped), None
    except ValueError as exc:
        whole_error = str(exc)
    match = _FENCE.search(text)
    if match is None:
        return None, f"the answer is not JSON ({whole_error}) and has no ```json block"
    try:
        return json.loads(match.group(1)), None
    except ValueError as exc:
        return None, f"the ```json block is not valid JSON ({exc})"
