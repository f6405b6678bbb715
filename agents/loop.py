"""The step loop: one skill step run as model turns and tool calls, with no bus.

`run_step` records every model call and tool call through a `StepRecorder` (the runtime
appends them to the ledger) and can replay a step from those records: the i-th model
call reuses the i-th recorded response, and a tool call whose idempotency key was
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
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ValidationError

from jetmesh.bus.events import ModelCalledData, ToolCalledData

from .errors import StepStopped, UnknownSkill
from .models.errors import ModelError, ModelRetriesExhausted, ModelTransientError
from .models.pricing import cost_usd
from .models.types import Message, Model, ModelRequest, ModelResponse, ToolCall
from .policy import args_hash
from .spec import AgentSpec, SkillSpec, schema_errors
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

BeforeModelCall = Callable[[ModelRequest], Awaitable[None]]
"""Awaited before every real (not replayed) model call, e.g. to reserve budget. What it
raises propagates out of `run_step`."""

MAX_OUTPUT_CORRECTIONS = 1
"""Corrective turns after an invalid structured answer before the step fails."""


class StepGuard(Protocol):
    """Runtime controls around every real (not replayed) call: budgets and policy.

    `before_model_call` returns a reservation token and may raise `StepStopped`;
    exactly one of `after_model_call` / `release` follows for each token.
    `before_tool_call` returns None to allow the call or a denial the model is told
    (recorded as the tool's error), and may raise `StepStopped`.
    """

    async def before_model_call(self, request: ModelRequest, model: Model) -> object: ...

    async def after_model_call(self, token: object, response: ModelResponse,
                               cost_usd: float) -> None: ...

    async def release(self, token: object) -> None: ...

    async def before_tool_call(self, tool: Tool, arguments: dict[str, Any],
                               key: str) -> str | None: ...

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

    async def record_tool_call(self, data: ToolCalledData) -> None: ...


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

    async def record_model_call(self, data: ModelCalledData) -> None:
        self.model_calls.append(data)

    async def record_tool_call(self, data: ToolCalledData) -> None:
        self.tool_calls.append(data)

    def replay(self) -> StepReplay:
        """A `StepReplay` of everything recorded so far."""
        return StepReplay.from_records(self.model_calls, self.tool_calls)


class StepOutcome(BaseModel):
    """The result of one step. Counters cover this run only: replayed calls cost nothing."""

    status: Literal["completed", "failed"]
    output: dict[str, Any] | None = None
    """Valid against the skill's output schema (when completed)."""
    code: str | None = None
    """When failed: invalid_input, tool_limit, max_turns, invalid_output, model_error,
    timeout or error (the StepFailed codes)."""
    reason: str | None = None
    retryable: bool = False
    """True when running the step again may succeed (transient model error, timeout)."""
    model_calls: int = 0
    """Model calls made (replayed ones excluded)."""
    tool_calls: int = 0
    """Tools executed (replayed ones excluded)."""
    replayed_model_calls: int = 0
    replayed_tool_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

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


@dataclass
class _Run:
    """Mutable state of one `run_step` call."""

    spec: AgentSpec
    skill: SkillSpec
    ctx: ToolContext
    recorder: StepRecorder
    replay: StepReplay
    guard: StepGuard | None = None
    replay_only: bool = False
    """Every call must come from `replay`: an unrecorded one stops the step
    (`replay_diverged`) before any model is called or any tool runs."""
    dry_run_effects: bool = False
    """Side-effecting tools are not run: a "would call" result is recorded instead."""
    model_calls: int = 0
    tool_calls: int = 0
    replayed_model_calls: int = 0
    replayed_tool_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0

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
            model_calls=self.model_calls,
            tool_calls=self.tool_calls,
            replayed_model_calls=self.replayed_model_calls,
            replayed_tool_calls=self.replayed_tool_calls,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cost_usd=self.cost,
        )

    def failed(self, code: str, reason: str, *, retryable: bool = False) -> StepOutcome:
        return self.outcome("failed", code=code, reason=reason, retryable=retryable)

    async def call_model(
        self, model: Model, request: ModelRequest, before: BeforeModelCall | None
    ) -> ModelResponse:
        index = self.model_calls + self.replayed_model_calls
        if index < len(self.replay.model_responses):
            self.replayed_model_calls += 1
            return ModelResponse.model_validate(self.replay.model_responses[index].response)
        if self.replay_only:
            raise StepStopped("replay_diverged", f"model call #{index + 1} of the step is "
                              f"not in the recording ({len(self.replay.model_responses)} "
                              "recorded)")
        if before is not None:
            await before(request)
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
        self.model_calls += 1
        self.input_tokens += response.usage.input_tokens
        self.output_tokens += response.usage.output_tokens
        self.cost += cost
        await self.recorder.record_model_call(
            ModelCalledData(
                step_id=self.ctx.step_id,
                agent=self.spec.name,
                worker=self.ctx.worker,
                purpose="step",
                provider=response.provider,
                model=response.model,
                input_tokens=response.usage.input_tokens,
                output_tokens=response.usage.output_tokens,
                cost_usd=cost,
                latency_ms=latency_ms,
                response=response.model_dump(mode="json"),
            )
        )
        return response

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
        dry_run = tool is not None and tool.side_effects and self.dry_run_effects
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
            call_ctx = replace(self.ctx, idempotency_key=key)
            if denial is None and tool.side_effects and self.guard is not None:
                # The claim is checked (and the intent recorded) as late as the runtime
                # can: after the policy and any approval wait, right before the call.
                await self.guard.before_effect(tool, arguments, key)
                call_ctx = replace(
                    call_ctx, loop=asyncio.get_running_loop(),
                    effect_gate=functools.partial(self.guard.before_effect, tool,
                                                  arguments, key, recheck=True))
            if denial is not None:
                result = ToolResult(ok=False, error=denial, kind="denied")
            elif tool.side_effects and (name, args_hash(name, arguments)) in \
                    self.replay.in_doubt:
                result = (await tool.reconciled(arguments, call_ctx)
                          or await tool.invoke(arguments, call_ctx))
            else:
                result = await tool.invoke(arguments, call_ctx)
        self.tool_calls += 1
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
            )
        )
        return result


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


async def _run_model(
    run: _Run,
    step_input: dict[str, Any],
    model: Model,
    before: BeforeModelCall | None,
) -> StepOutcome:
    spec, skill, limits = run.spec, run.skill, run.spec.limits
    offered = spec.tools_for(skill.id)
    tools = {t.name: t for t in offered}
    request_base = {
        "system": build_system_prompt(spec, skill),
        "tools": [t.definition() for t in offered],
        "output_schema": skill.output_schema if skill.structured else None,
        "max_tokens": spec.model.max_tokens,
        "temperature": spec.model.temperature,
    }
    messages = [
        Message(role="user", content=json.dumps(step_input, ensure_ascii=False, sort_keys=True))
    ]
    corrections = 0
    for _turn in range(limits.max_turns):
        request = ModelRequest(messages=list(messages), **request_base)
        try:
            response = await run.call_model(model, request, before)
        except ModelError as exc:
            transient = isinstance(exc, ModelTransientError | ModelRetriesExhausted)
            return run.failed("model_error", str(exc), retryable=transient)
        messages.append(
            Message(role="assistant", content=response.text, tool_calls=response.tool_calls)
        )
        if response.tool_calls:
            for call in response.tool_calls:
                if run.tool_calls + run.replayed_tool_calls >= limits.max_tool_calls:
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
        if not skill.structured:
            return run.outcome("completed", output={"text": response.text})
        data, problem = parse_json_answer(response.text)
        if problem is None:
            errors = schema_errors(skill.output_schema, data)
            if not errors and isinstance(data, dict):
                return run.outcome("completed", output=data)
            problem = "; ".join(errors) or "the answer must be a JSON object"
        if corrections >= MAX_OUTPUT_CORRECTIONS:
            reason = f"final answer invalid after {corrections} correction(s): {problem}"
            return run.failed("invalid_output", reason)
        corrections += 1
        messages.append(
            Message(
                role="user",
                content=(
                    f"Your final answer is invalid: {problem}. Reply again with only one JSON "
                    "object valid against the output schema given in the instructions."
                ),
            )
        )
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
    """
    unknown: UnknownSkill | None = None
    try:
        skill = spec.skill(skill_id)
    except UnknownSkill as exc:  # the placeholder skill only carries the failure
        skill, unknown = SkillSpec(id=skill_id, name=skill_id, description=""), exc
    run = _Run(
        spec=spec,
        skill=skill,
        ctx=ctx,
        recorder=recorder,
        replay=replay or StepReplay(),
        guard=guard,
        replay_only=replay_only,
        dry_run_effects=dry_run_effects,
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
            return await _run_model(run, step_input, model, before_model_call)
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
