"""The step loop: one skill step run as model turns and tool calls, with no bus.

`run_step` records every model call and tool call through a `StepRecorder` (the runtime
appends them to the ledger) and can replay a step from those records: model calls go
through the one model-call pipeline (`agents.calls.ModelCaller`: the i-th model call
reuses the i-th recorded response), and a tool call whose idempotency key was
recorded reuses its recorded result. A redelivered step therefore never runs a
side-effecting tool twice, and replaying a finished step makes zero model calls.

`run_step` turns every step-level problem into a failed `StepOutcome` with a
machine-readable code; it raises only for cancellation and for exceptions raised by the
caller's own ``before_model_call`` hook (e.g. a budget refusal) or recorder.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from jetmesh.bus.events import (
    ContextCompactedData,
    ModelCalledData,
    ModelRoutedData,
    PlanContext,
    ToolCalledData,
    new_id,
)
from jetmesh.bus.tracecontext import tool_traceparent
from jetmesh.bus.tracing import current_traceparent

from .calls import BeforeModelCall, ModelCaller, ModelCallGuard, parse_json_answer
from .compaction import Compactor, request_tokens
from .errors import StepStopped, UnknownSkill
from .models.errors import ModelError, ModelRetriesExhausted, ModelTransientError
from .models.types import Message, Model, ModelRequest, ToolCall, UsageTotals
from .policy import args_hash
from .routing import CLASSIFIER_SCHEMA, Routing, estimate_call, validator_errors
from .spec import AgentSpec, SkillSpec, schema_errors
from .toolcache import ToolCache, cache_key
from .tools import (
    Tool,
    ToolContext,
    ToolResult,
    describe_validation_error,
    idempotency_key,
)

__all__ = [
    "BeforeModelCall",
    "ListRecorder",
    "StepGuard",
    "StepOutcome",
    "StepRecorder",
    "StepReplay",
    "build_system_prompt",
    "parse_json_answer",
    "run_step",
]

MAX_OUTPUT_CORRECTIONS = 1
"""Corrective turns after an invalid structured answer before the step fails."""


class StepGuard(ModelCallGuard, Protocol):
    """Runtime controls around every real (not replayed) call: budgets and policy.

    The model-call part is `ModelCallGuard` (its `before_model_call` may raise
    `StepStopped`). `before_tool_call` returns None to allow the call or a denial the
    model is told (recorded as the tool's error), and may raise `StepStopped`.
    """

    async def before_tool_call(self, tool: Tool, arguments: dict[str, Any],
                               key: str) -> str | None: ...

    async def headroom_usd(self) -> float | None:
        """Dollars the task's budget still has for new calls (spent and reserved taken off);
        None: no dollar limit. Routing asks it before it moves to a dearer tier."""
        ...

    def answer(self, tool: str, args_hash: str) -> str | None:
        """The user's answer to a question tool's call (`Tool.asks_user`) that
        `before_tool_call` allowed: the answer it waited for."""
        ...

    async def before_effect(self, tool: Tool, arguments: dict[str, Any], key: str, *,
                            recheck: bool = False) -> None:
        """Right before a side-effecting tool runs (and again when the tool calls
        `ToolContext.begin_effect` at its effect, with ``recheck``): raise `ClaimLost`
        if this replica no longer holds the step."""
        ...


class StepRecorder(Protocol):
    """Where the loop reports what it did (the runtime appends these to the ledger).

    Each call completes before the loop goes on; an exception propagates out of
    `run_step`, so a step never continues past an unrecorded side effect.
    """

    async def record_model_call(self, data: ModelCalledData) -> None: ...

    async def record_tool_call(self, data: ToolCalledData, *, event_id: str | None = None
                               ) -> None:
        """`event_id`: the ToolCalled event's id, chosen before the call (its span id
        derives from it, and the call was given that span as its trace parent)."""

    async def record_route(self, data: ModelRoutedData) -> None: ...

    async def record_compaction(self, data: ContextCompactedData) -> None: ...


@dataclass
class StepReplay:
    """Previously recorded calls of one step, read back from the ledger."""

    model_responses: list[ModelCalledData] = field(default_factory=list)
    """In call order: the i-th model call of the step uses the i-th entry."""
    tool_results: dict[str, ToolCalledData] = field(default_factory=dict)
    """By idempotency key: such a call reuses the recorded output or error."""
    in_doubt: set[tuple[str, str]] = field(default_factory=set)
    """(tool, args hash) of side-effecting calls an earlier claim was cleared to make (its
    PolicyDecided is on the step's line) but never recorded: a crash may have come
    between the effect and the record. Such a call asks the tool's ``reconcile`` first."""

    @classmethod
    def from_records(
        cls, model_calls: Iterable[ModelCalledData], tool_calls: Iterable[ToolCalledData],
        cleared: Iterable[tuple[str, str]] = (),
    ) -> StepReplay:
        """Build from a step's recorded events, in ledger order; ``cleared``: the (tool,
        args hash) of its PolicyDecided events."""
        tools = list(tool_calls)
        done = {(t.tool, args_hash(t.tool, t.arguments)) for t in tools}
        return cls(
            model_responses=list(model_calls),
            tool_results={t.idempotency_key: t for t in tools},
            in_doubt=set(cleared) - done,
        )


@dataclass
class ListRecorder:
    """An in-memory `StepRecorder`, for tests and local runs."""

    model_calls: list[ModelCalledData] = field(default_factory=list)
    tool_calls: list[ToolCalledData] = field(default_factory=list)
    routes: list[ModelRoutedData] = field(default_factory=list)
    compactions: list[ContextCompactedData] = field(default_factory=list)

    async def record_model_call(self, data: ModelCalledData) -> None:
        self.model_calls.append(data)

    async def record_tool_call(self, data: ToolCalledData, *, event_id: str | None = None
                               ) -> None:
        self.tool_calls.append(data)

    async def record_route(self, data: ModelRoutedData) -> None:
        self.routes.append(data)

    async def record_compaction(self, data: ContextCompactedData) -> None:
        self.compactions.append(data)

    def replay(self) -> StepReplay:
        """A `StepReplay` of everything recorded so far."""
        return StepReplay.from_records(self.model_calls, self.tool_calls)


class StepOutcome(UsageTotals):
    """The result of one step. Counters (`UsageTotals`, and those below) cover this run
    only: replayed calls cost nothing."""

    status: Literal["completed", "failed"]
    output: dict[str, Any] | None = None
    """Valid against the skill's output schema (when completed)."""
    code: str | None = None
    """When failed: invalid_input, tool_limit, max_turns, invalid_output, model_error,
    timeout or error (the StepFailed codes)."""
    reason: str | None = None
    retryable: bool = False
    """True when running the step again may succeed (transient model error, timeout)."""
    replayed_model_calls: int = 0
    replayed_tool_calls: int = 0
    tool_cache_hits: int = 0
    """Read-only tool calls served from the tool-result cache."""
    tier: str | None = None
    """The model tier the step ended on (routed skills)."""

    @property
    def ok(self) -> bool:
        return self.status == "completed"


_PROMPTS: dict[int, tuple[SkillSpec, str, str]] = {}
"""id(skill) -> (skill, instructions, prompt): a step's prompt depends only on its agent's
instructions and its (frozen) skill, so it is built once, not on every step."""


def build_system_prompt(spec: AgentSpec, skill: SkillSpec) -> str:
    """Instructions, then the skill, then (structured skills) the answer format."""
    hit = _PROMPTS.get(id(skill))
    if hit is not None and hit[0] is skill and hit[1] == spec.instructions:
        return hit[2]
    prompt = _compose_system_prompt(spec.instructions, skill)
    if len(_PROMPTS) > 1024:
        _PROMPTS.clear()
    _PROMPTS[id(skill)] = (skill, spec.instructions, prompt)
    return prompt


def _compose_system_prompt(instructions: str, skill: SkillSpec) -> str:
    parts = [instructions.strip()] if instructions.strip() else []
    parts.append(
        f"Current skill: {skill.name} (`{skill.id}`).\n{skill.description}\n"
        "The user message holds the step input as JSON."
    )
    if skill.structured:
        schema = json.dumps(skill.output_schema, ensure_ascii=False, sort_keys=True)
        parts.append(
            "Your final answer must be one JSON object, with no other text, valid against "
            f"this JSON Schema:\n{schema}"
        )
    return "\n\n".join(parts)


@dataclass
class _Run:
    """Mutable state of one `run_step` call."""

    spec: AgentSpec
    skill: SkillSpec
    ctx: ToolContext
    recorder: StepRecorder
    replay: StepReplay
    models: ModelCaller
    """The step's model calls: replayed, budgeted, recorded (counts into ``usage``)."""
    guard: StepGuard | None = None
    replay_only: bool = False
    """Every call must come from `replay`: an unrecorded one stops the step
    (`replay_diverged`) before any model is called or any tool runs."""
    dry_run_effects: bool = False
    """Side-effecting tools are not run: a "would call" result is recorded instead."""
    attempt: int = 1
    tiers: Mapping[str, Model] | None = None
    """Models by tier name for routed skills (None: the step's model serves every tier)."""
    tool_cache: ToolCache | None = None
    conversation: PlanContext | None = None
    """The earlier turns of the task's conversation (added to the instructions)."""
    tool_cache_hits: int = 0
    tier: str | None = None
    replayed_tool_calls: int = 0

    @property
    def usage(self) -> UsageTotals:
        return self.models.usage

    def outcome(
        self,
        status: Literal["completed", "failed"],
        *,
        output: dict[str, Any] | None = None,
        code: str | None = None,
        reason: str | None = None,
        retryable: bool = False,
    ) -> StepOutcome:
        return StepOutcome(
            status=status,
            output=output,
            code=code,
            reason=reason,
            retryable=retryable,
            **self.usage.model_dump(),
            replayed_model_calls=self.models.replayed,
            replayed_tool_calls=self.replayed_tool_calls,
            tool_cache_hits=self.tool_cache_hits,
            tier=self.tier,
        )

    def failed(self, code: str, reason: str, *, retryable: bool = False) -> StepOutcome:
        return self.outcome("failed", code=code, reason=reason, retryable=retryable)

    @property
    def calls_so_far(self) -> int:
        """Model calls of the step made or replayed so far (the next one's ordinal)."""
        return self.models.calls_so_far

    @property
    def next_is_replayed(self) -> bool:
        """The step's next model call is served from the recording (its decisions were
        recorded when it was first made)."""
        return self.models.next_is_replayed

    async def call_tool(
        self,
        tool: Tool | None,
        name: str,
        call_id: str,
        arguments: dict[str, Any],
        offered: list[Tool] | None = None,
    ) -> ToolResult:
        key = idempotency_key(self.ctx.task_id, self.ctx.step_id, name, arguments)
        recorded = self.replay.tool_results.get(key)
        if recorded is not None:
            self.replayed_tool_calls += 1
            output = recorded.output
            if output is not None and not isinstance(output, dict):
                output = {"result": output}
            return ToolResult(
                ok=recorded.error is None,
                output=output,
                error=recorded.error,
                latency_ms=recorded.latency_ms,
            )
        if self.replay_only:
            raise StepStopped("replay_diverged", f"tool call {name!r} with these arguments is "
                              "not in the recording")
        event_id = new_id()  # the record's id, known before the call: see Recorder
        dry_run = tool is not None and tool.side_effects and self.dry_run_effects
        cache_hit = False
        if dry_run:
            result = ToolResult(ok=True, output={"dry_run": True, "would_call": name,
                                                 "arguments": arguments})
        elif tool is None:
            known = ", ".join(t.name for t in offered or ()) or "none"
            result = ToolResult(
                ok=False,
                error=f"unknown tool {name!r}; the tools you can call are: {known}",
                kind="invalid_arguments",
            )
        else:
            denial = (await self.guard.before_tool_call(tool, arguments, key)
                      if self.guard else None)
            call_ctx = replace(self.ctx, idempotency_key=key,
                               traceparent=tool_traceparent(current_traceparent(), event_id))
            if denial is None and tool.side_effects and self.guard is not None:
                # The claim is checked (and the intent recorded) as late as the runtime
                # can: after the policy and any approval wait, right before the call.
                await self.guard.before_effect(tool, arguments, key)
                call_ctx = replace(
                    call_ctx, loop=asyncio.get_running_loop(),
                    effect_gate=functools.partial(self.guard.before_effect, tool,
                                                  arguments, key, recheck=True))
            if denial is None and tool.asks_user and self.guard is not None:
                call_ctx = replace(call_ctx, answer=self.guard.answer(
                    name, args_hash(name, arguments)))
            if denial is not None:
                result = ToolResult(ok=False, error=denial, kind="denied")
            elif tool.side_effects and (name, args_hash(name, arguments)) in \
                    self.replay.in_doubt:
                result = (await tool.reconciled(arguments, call_ctx)
                          or await tool.invoke(arguments, call_ctx))
            else:
                result, cache_hit = await self._invoke_cached(tool, arguments, call_ctx)
        self.usage.tool_calls += 1
        self.tool_cache_hits += cache_hit
        await self.recorder.record_tool_call(
            ToolCalledData(
                step_id=self.ctx.step_id,
                agent=self.spec.name,
                worker=self.ctx.worker,
                tool=name,
                call_id=call_id,
                arguments=arguments,
                output=result.output,
                error=result.error,
                latency_ms=result.latency_ms,
                side_effects=tool.side_effects if tool is not None else False,
                idempotency_key=key,
                dry_run=dry_run,
                cache_hit=cache_hit,
            ),
            event_id=event_id,
        )
        return result

    async def _invoke_cached(self, tool: Tool, arguments: dict[str, Any], ctx: ToolContext
                             ) -> tuple[ToolResult, bool]:
        """Run a tool, or serve a read-only one from the tool-result cache; (result, hit)."""
        rule = self.spec.cost.tool_cache.get(tool.name)
        if rule is None or self.tool_cache is None or tool.side_effects or tool.risk != "read":
            return await tool.invoke(arguments, ctx), False
        key = cache_key(rule, self.ctx.task_id, tool.name, arguments)
        cached = await self.tool_cache.get(key)
        if cached is not None:
            return ToolResult(ok=True, output=cached), True
        result = await tool.invoke(arguments, ctx)
        if result.ok and result.output is not None:
            await self.tool_cache.put(key, result.output, rule.ttl_s)
        return result, False


_DIRECT_FAILURE_CODES: dict[str, tuple[str, bool]] = {
    "invalid_arguments": ("invalid_input", False),
    "timeout": ("timeout", True),
    "exception": ("error", False),
    "invalid_output": ("invalid_output", False),
}


async def _run_direct(run: _Run, tool: Tool, step_input: dict[str, Any]) -> StepOutcome:
    try:
        tool.input_model.model_validate(step_input)
    except ValidationError as exc:
        what = f"step input invalid for tool {tool.name!r}"
        return run.failed("invalid_input", describe_validation_error(exc, what=what))
    result = await run.call_tool(tool, tool.name, "direct", step_input)
    if not result.ok:
        code, retryable = _DIRECT_FAILURE_CODES.get(result.kind or "", ("error", False))
        return run.failed(code, result.error or "tool failed", retryable=retryable)
    output = result.output or {}
    errors = schema_errors(run.skill.output_schema, output)
    if errors:
        return run.failed("invalid_output", "; ".join(errors))
    return run.outcome("completed", output=output)


def _tool_limit_reason(run: _Run, call: ToolCall) -> str:
    limit = run.spec.limits.max_tool_calls
    return (
        f"step exceeded its tool-call limit (limits.max_tool_calls={limit}): the model "
        f"asked for call {limit + 1} ({call.name!r})"
    )


@dataclass
class _Router:
    """The routing state of one step (see agents.routing): the tier it runs on, and the
    budget-checked moves between tiers, each recorded."""

    run: _Run
    routing: Routing
    default: Model
    """The step's own model: serves every tier the step has no model for."""
    idx: int = 0

    def model_for(self, i: int) -> Model:
        tier = self.routing.tiers[i]
        tiers = self.run.tiers
        return tiers.get(tier.name, self.default) if tiers is not None else self.default

    @property
    def model(self) -> Model:
        return self.model_for(self.idx)

    async def _affords(self, i: int, request: ModelRequest
                       ) -> tuple[bool, float | None, float | None]:
        """(one call on tier i fits the budget, its estimate, the headroom)."""
        run = self.run
        if run.next_is_replayed or run.replay_only or run.guard is None:
            return True, None, None
        headroom = await run.guard.headroom_usd()
        if headroom is None:
            return True, None, None
        model = self.model_for(i)
        usd, _ = estimate_call(request, model.provider, model.name)
        return usd <= headroom + 1e-12, usd, headroom

    async def _record(self, i: int, trigger: str, reason: str, *, from_tier: int | None = None,
                      outcome: str = "chosen", estimate: float | None = None,
                      headroom: float | None = None) -> None:
        run = self.run
        run.tier = self.routing.tiers[self.idx].name
        if run.next_is_replayed or run.replay_only:
            return  # decided when the call was first made, and recorded then
        model = self.model_for(i)
        await run.recorder.record_route(ModelRoutedData.model_validate({
            "step_id": run.ctx.step_id, "agent": run.spec.name, "worker": run.ctx.worker,
            "skill": run.skill.id, "tier": self.routing.tiers[i].name,
            "provider": model.provider, "model": model.name, "trigger": trigger,
            "reason": reason, "outcome": outcome, "estimate_usd": estimate,
            "headroom_usd": headroom, "model_call": run.calls_so_far,
            "from_tier": None if from_tier is None else self.routing.tiers[from_tier].name}))

    async def _classify(self, step_input: dict[str, Any]) -> tuple[int, str] | None:
        """The classifier's pick (tier index, reason), or None when it gives none."""
        spec = self.routing.classifier
        assert spec is not None
        names = [t.name for t in self.routing.tiers]
        model = self.model_for(self.routing.index(spec.tier) if spec.tier else 0)
        schema = {**CLASSIFIER_SCHEMA, "properties": {
            **CLASSIFIER_SCHEMA["properties"], "tier": {"type": "string", "enum": names}}}
        request = ModelRequest(
            system=f"{spec.instructions}\nTiers, cheapest first: {', '.join(names)}.",
            messages=[Message(role="user", content=json.dumps(
                {"skill": self.run.skill.id, "input": step_input}, ensure_ascii=False,
                sort_keys=True))],
            output_schema=schema, max_tokens=spec.max_tokens)
        try:
            response = await self.run.models.call(model, request, purpose="route")
        except ModelError:
            return None
        data, problem = parse_json_answer(response.text)
        if problem is None and isinstance(data, dict) and data.get("tier") in names:
            why = str(data.get("reason") or "")[:200]
            return names.index(data["tier"]), (f"classifier {model.provider}/{model.name}: "
                                               f"{data['tier']}" + (f" ({why})" if why else ""))
        return None

    async def start(self, step_input: dict[str, Any], request: ModelRequest
                    ) -> StepOutcome | None:
        """Choose the starting tier; a failed outcome when the budget rules it out."""
        routing = self.routing
        want, started_by, reason = routing.start(step_input, self.run.attempt)
        trigger: str = started_by
        if trigger == "default" and routing.classifier is not None:
            picked = await self._classify(step_input)
            if picked is not None:
                want, reason = picked
                trigger = "classifier"
            else:
                reason = "the default tier (the classifier gave no usable answer)"
        ok, est, head = await self._affords(want, request)
        if ok:
            self.idx = want
            await self._record(want, trigger, reason, estimate=est, headroom=head)
            return None
        wanted = routing.tiers[want].name
        why = (f"remaining budget ${head:.6f} cannot cover one call on {wanted} "
               f"(up to ${est:.6f})")
        if routing.on_budget == "fail" or want == 0:
            self.idx = want
            await self._record(want, "budget", why, outcome="refused", estimate=est,
                               headroom=head)
            return self.run.failed("budget_exceeded", f"routing: {why}")
        self.idx = 0
        for j in range(want - 1, 0, -1):
            if (await self._affords(j, request))[0]:
                self.idx = j
                break
        await self._record(self.idx, "budget", f"{why}; stayed on "
                           f"{routing.tiers[self.idx].name} ({reason} wanted {wanted})",
                           outcome="stayed", estimate=est, headroom=head)
        return None

    async def escalate(self, kind: str, problem: str, request: ModelRequest
                       ) -> StepOutcome | bool:
        """Move one tier up after `kind` (True), stay (False), or fail the step."""
        routing = self.routing
        if kind not in routing.escalate_on or self.idx + 1 >= len(routing.tiers):
            return False
        up = self.idx + 1
        ok, est, head = await self._affords(up, request)
        wanted = routing.tiers[up].name
        if ok:
            was, self.idx = self.idx, up
            await self._record(up, kind, problem[:500], from_tier=was, estimate=est,
                               headroom=head)
            return True
        why = (f"{kind} ({problem[:200]}), but the remaining budget ${head:.6f} cannot "
               f"cover one call on {wanted} (up to ${est:.6f})")
        if routing.on_budget == "fail":
            await self._record(up, "budget", why, from_tier=self.idx, outcome="refused",
                               estimate=est, headroom=head)
            return self.run.failed("budget_exceeded", f"routing: {why}")
        await self._record(self.idx, "budget", why + f"; stayed on {routing.tiers[self.idx].name}",
                           from_tier=self.idx, outcome="stayed", estimate=est, headroom=head)
        return False


async def _compacted(run: _Run, compactor: Compactor, messages: list[Message],
                     request_base: dict[str, Any], model: Model) -> list[Message]:
    """The messages to send: compacted first when the request would pass the limit."""
    view = compactor.view(messages)
    limit = compactor.policy.limit()
    if limit is None:
        return view
    before = request_tokens(ModelRequest(messages=view, **request_base))
    if before <= limit:
        return view
    live = not (run.next_is_replayed or run.replay_only)  # else recorded when first made
    ctx = run.ctx
    replaced = compactor.compact(
        messages, lambda name, args: idempotency_key(ctx.task_id, ctx.step_id, name, args))
    if replaced is None:
        return view
    span, ordinals, keys = replaced
    summary_call = None
    if compactor.policy.summarizer == "model":
        summary_call = run.calls_so_far
        try:
            written = await run.models.call(model, compactor.summary_request(
                messages[span[0]:span[1]]), purpose="compact")
            compactor.merge_written(written.text)
        except ModelError:
            pass  # the extracted summary stands
    view = compactor.view(messages)
    after = request_tokens(ModelRequest(messages=view, **request_base))
    if live:
        assert compactor.summary is not None
        await run.recorder.record_compaction(ContextCompactedData(
            step_id=ctx.step_id, agent=run.spec.name, worker=ctx.worker,
            summary=compactor.summary, messages=span, model_calls=ordinals, tool_calls=keys,
            tokens_before=before, tokens_after=after, compaction=compactor.count,
            summary_call=summary_call))
    return view


def _correction(problem: str) -> Message:
    return Message(
        role="user",
        content=(
            f"Your final answer is invalid: {problem}. Reply again with only one JSON "
            "object valid against the output schema given in the instructions."
        ),
    )


async def _run_model(
    run: _Run,
    step_input: dict[str, Any],
    model: Model,
) -> StepOutcome:
    spec, skill, limits = run.spec, run.skill, run.spec.limits
    offered = spec.tools_for(skill.id)
    tools = {t.name: t for t in offered}
    cost = spec.cost
    validators = cost.validators.get(skill.id, [])
    request_base = {
        "system": build_system_prompt(spec, skill)
        + (run.conversation.as_prompt() if run.conversation else ""),
        "tools": [t.definition() for t in offered],
        "output_schema": skill.output_schema if skill.structured else None,
        "max_tokens": spec.model.max_tokens,
        "temperature": spec.model.temperature,
        "cache_prefix": cost.prompt_cache,
    }
    messages = [
        Message(role="user", content=json.dumps(step_input, ensure_ascii=False, sort_keys=True))
    ]
    compactor = (Compactor(cost.compaction, intent=f"{skill.name} ({skill.id}): "
                           f"{skill.description}"[:300])
                 if cost.compaction is not None and cost.compaction.applies(skill.id) else None)
    routing = cost.routing.get(skill.id)
    router = _Router(run, routing, model) if routing is not None else None
    if router is not None:
        refused = await router.start(
            step_input, ModelRequest(messages=list(messages), **request_base))
        if refused is not None:
            return refused
    corrections = 0
    for _turn in range(limits.max_turns):
        current = router.model if router else model
        view = (await _compacted(run, compactor, messages, request_base, current)
                if compactor is not None else list(messages))
        request = ModelRequest(messages=view, **request_base)
        ordinal = run.calls_so_far
        try:
            response = await run.models.call(current, request)
        except ModelError as exc:
            transient = isinstance(exc, ModelTransientError | ModelRetriesExhausted)
            return run.failed("model_error", str(exc), retryable=transient)
        if compactor is not None:
            compactor.note_model_call(len(messages), ordinal)
        messages.append(
            Message(role="assistant", content=response.text, tool_calls=response.tool_calls)
        )
        if response.tool_calls:
            for call in response.tool_calls:
                if run.usage.tool_calls + run.replayed_tool_calls >= limits.max_tool_calls:
                    return run.failed("tool_limit", _tool_limit_reason(run, call))
                tool = tools.get(call.name)
                result = await run.call_tool(tool, call.name, call.id, call.arguments, offered)
                content = (
                    tool.content_for_model(result)
                    if tool is not None
                    else (result.error or "unknown tool")
                )
                messages.append(
                    Message(
                        role="tool", content=content, tool_call_id=call.id, is_error=not result.ok
                    )
                )
            continue
        kind = "invalid_output"
        if not skill.structured:
            data: Any = {"text": response.text}
            problem = None
        else:
            data, problem = parse_json_answer(response.text)
        if problem is None:
            errors = schema_errors(skill.output_schema, data) if skill.structured else []
            if not errors and isinstance(data, dict):
                checks = validator_errors(validators, data)
                if not checks:
                    confidence = router.routing.confidence(data) if router else None
                    if router is None or confidence is None \
                            or confidence >= router.routing.min_confidence:
                        return run.outcome("completed", output=data)
                    low = (f"confidence {confidence:g} is below "
                           f"{router.routing.min_confidence:g}")
                    moved = await router.escalate("low_confidence", low, request)
                    if isinstance(moved, StepOutcome):
                        return moved
                    if not moved:
                        return run.outcome("completed", output=data)  # the best there is
                    messages.append(Message(role="user", content=(
                        f"Your answer's {low}. Check the step input and tool results "
                        "again and give your final answer.")))
                    continue
                problem, kind = "; ".join(checks), "validator"
            else:
                problem = "; ".join(errors) or "the answer must be a JSON object"
        if router is not None:
            moved = await router.escalate(kind, problem, request)
            if isinstance(moved, StepOutcome):
                return moved
            if moved:
                messages.append(_correction(problem))
                continue
        if corrections >= MAX_OUTPUT_CORRECTIONS:
            label = "validators failed" if kind == "validator" else "final answer invalid"
            return run.failed("invalid_output",
                              f"{label} after {corrections} correction(s): {problem}")
        corrections += 1
        messages.append(_correction(problem))
    return run.failed(
        "max_turns",
        f"step reached its turn limit (limits.max_turns={limits.max_turns}) without a final answer",
    )


async def run_step(
    spec: AgentSpec,
    skill_id: str,
    step_input: dict[str, Any],
    model: Model,
    *,
    ctx: ToolContext,
    recorder: StepRecorder,
    replay: StepReplay | None = None,
    before_model_call: BeforeModelCall | None = None,
    guard: StepGuard | None = None,
    replay_only: bool = False,
    dry_run_effects: bool = False,
    attempt: int = 1,
    tiers: Mapping[str, Model] | None = None,
    tool_cache: ToolCache | None = None,
    conversation: PlanContext | None = None,
) -> StepOutcome:
    """Run one step of ``spec``'s skill ``skill_id`` on ``step_input``.

    Direct skills (``spec.direct``) call their tool with the step input and no model.
    Other skills loop: model turn, then its tool calls (each checked against
    ``limits.max_tool_calls`` first), until a final answer valid against the skill's
    output schema or a limit ends the step. ``limits.step_timeout_s`` bounds the whole
    step (code ``timeout``). Cancellation propagates.

    ``replay_only``: every call is served from ``replay`` and an unrecorded one fails the
    step ``replay_diverged`` (no model is called, no tool runs). ``dry_run_effects``:
    side-effecting tools are not run; the call is recorded with ``dry_run`` and a
    "would call" output.

    Cost levers (``spec.cost``): a routed skill runs on the models of ``tiers`` (by tier
    name; a tier missing there runs on ``model``), starting by its rules, ``attempt`` or
    classifier and escalating as its routing says; ``tool_cache`` serves the read-only
    tools that have a cache rule; compaction and prompt caching as configured.
    ``conversation``: the earlier turns of the task's context (orchestrator.context),
    added to the instructions.
    """
    unknown: UnknownSkill | None = None
    try:
        skill = spec.skill(skill_id)
    except UnknownSkill as exc:  # the placeholder skill only carries the failure
        skill, unknown = SkillSpec(id=skill_id, name=skill_id, description=""), exc
    replay = replay or StepReplay()
    run = _Run(
        spec=spec,
        skill=skill,
        ctx=ctx,
        recorder=recorder,
        replay=replay,
        models=ModelCaller(
            record=recorder.record_model_call, agent=spec.name,
            recorded=replay.model_responses, guard=guard, before=before_model_call,
            step_id=ctx.step_id, worker=ctx.worker, replay_only=replay_only),
        guard=guard,
        replay_only=replay_only,
        dry_run_effects=dry_run_effects,
        attempt=attempt,
        tiers=tiers,
        tool_cache=tool_cache,
        conversation=conversation,
    )
    if unknown is not None:
        return run.failed("invalid_input", str(unknown))
    size = len(json.dumps(step_input, ensure_ascii=False, default=str).encode("utf-8"))
    if size > spec.limits.max_input_bytes:
        limit = spec.limits.max_input_bytes
        return run.failed(
            "invalid_input", f"step input is {size} bytes, over limits.max_input_bytes={limit}"
        )
    errors = schema_errors(run.skill.input_schema, step_input)
    if errors:
        return run.failed("invalid_input", "step input invalid: " + "; ".join(errors))
    deadline = asyncio.timeout(spec.limits.step_timeout_s)
    try:
        async with deadline:
            direct_tool = spec.tool(spec.direct[skill_id]) if skill_id in spec.direct else None
            if direct_tool is not None:
                return await _run_direct(run, direct_tool, step_input)
            return await _run_model(run, step_input, model)
    except StepStopped as stop:
        return run.failed(stop.code, stop.reason, retryable=stop.retryable)
    except TimeoutError:
        if not deadline.expired():
            raise
        return run.failed(
            "timeout",
            f"step exceeded limits.step_timeout_s={spec.limits.step_timeout_s:g}",
            retryable=True,
        )
