"""The runtime's controls around a step: budgets, tool policy and approvals.

These live in code, outside the prompt: whatever the model says, a call that would
overrun the task's budget is not made, a denied tool does not run, and a gated tool
runs only after an approval bound to its exact arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.aio.client import Client as NATS

from jetmesh.agents.errors import StepStopped
from jetmesh.agents.models.types import Model, ModelRequest, ModelResponse
from jetmesh.agents.policy import DEFAULT_POLICY, Policy, args_hash
from jetmesh.agents.routing import estimate_call
from jetmesh.agents.tools import Tool
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.budgets import BudgetRefused, Budgets, Reservation
from jetmesh.bus.killswitch import KillRule, KillSwitchView
from jetmesh.bus.ledger import Ledger
from jetmesh.bus.spendcaps import SpendBook, SpendReservation, post_alert


def estimate(request: ModelRequest, model: Model) -> tuple[float, int]:
    """An upper bound of a call's cost: the prompt's size plus the full output allowance."""
    return estimate_call(request, model.provider, model.name)


APPROVAL_TIMEOUT = "approval-timeout"
"""The rule of the PolicyDecided event a worker appends when an approval expires."""
KILLSWITCH_RULE = "killswitch"
"""The rule prefix (`killswitch:<key>`) of a PolicyDecided refusal by the kill switch."""


@dataclass(frozen=True)
class _Reserved:
    """A model call's reservations: on the task's budget and on the period caps."""

    task: Reservation | None
    period: SpendReservation | None


def decision_event(entries: list[Any], step_id: str, tool: str, h: str
                   ) -> ev.ApprovalGranted | ev.ApprovalDenied | None:
    """The first granted/denied decision for this exact call, in ledger order."""
    for e in entries:
        event = e.event
        if isinstance(event, ev.ApprovalGranted | ev.ApprovalDenied) and (
                event.data.step_id, event.data.tool, event.data.args_hash) == (step_id, tool, h):
            return event
    return None


def told(event: ev.ApprovalGranted | ev.ApprovalDenied | None) -> str | None:
    """A decision as the loop reports it: "granted", or "denied: <reason> (by <who>)"."""
    if event is None:
        return None
    return "granted" if isinstance(event, ev.ApprovalGranted) else \
        f"denied: {event.data.reason or 'no reason given'} (by {event.data.by})"



@dataclass
class RuntimeGuard:
    """`StepGuard` for one step run by a worker."""

    nc: NATS
    ledger: Ledger
    book: Budgets
    cmd: ev.StepCommand
    agent: str
    source: str
    append: Any
    """The step's fenced append (FencedRecorder._append)."""
    policy: Policy = field(default_factory=lambda: DEFAULT_POLICY)
    approval_timeout_s: float = 300.0
    answers: dict[tuple[str, str], str] = field(default_factory=dict)
    """(tool, args hash) -> the user's answer, for the step's questions answered."""
    step_spent_usd: float = 0.0
    effect_gate: Callable[[Tool, dict[str, Any], str, bool], Awaitable[None]] | None = None
    """The step's claim check before a side effect (FencedRecorder.begin_effect)."""
    claim_check: Callable[[], Awaitable[None]] | None = None
    """The step's claim check before a paid model call (FencedRecorder.check_claim): a
    replica that lost the step does not pay for more calls."""
    killswitch: KillSwitchView | None = None
    """Disabled tools, agents and MCP servers (bus.killswitch), checked before each call."""
    spend: SpendBook | None = None
    """Daily / monthly caps per tenant and user (bus.spendcaps), reserved per call."""

    async def _killed(self, rule: KillRule, tool: str, h: str) -> str:
        """Record the kill switch's refusal as a policy decision; the model's message."""
        await self.append(ev.PolicyDecided(
            subject=self.cmd.task_id, source=self.source, data=ev.PolicyDecidedData(
                step_id=self.cmd.step_id, agent=self.agent, tool=tool, args_hash=h,
                decision="deny", rule=f"{KILLSWITCH_RULE}:{rule.key}",
                reason=rule.describe())))
        return f"denied by policy: {rule.describe()}. Do not retry this call."

    async def _exceeded(self, kind: str, limit: float, would_be: float) -> StepStopped:
        await self.append(ev.BudgetExceeded(
            subject=self.cmd.task_id, source=self.source, data=ev.BudgetExceededData(
                step_id=self.cmd.step_id, agent=self.agent, kind=kind, limit=limit,
                would_be=would_be)))
        return StepStopped("budget_exceeded",
                           f"{kind} budget {limit:g} would be exceeded ({would_be:.6g}); "
                           "the call was not made")

    async def before_effect(self, tool: Tool, arguments: dict[str, Any], key: str, *,
                            recheck: bool = False) -> None:
        if self.effect_gate is not None:
            await self.effect_gate(tool, arguments, key, recheck)

    async def before_model_call(self, request: ModelRequest, model: Model) -> object:
        if self.claim_check is not None:
            await self.claim_check()
        if self.killswitch is not None:
            rule = self.killswitch.check(None, self.agent, self.cmd.tenant)
            if rule is not None:  # the whole agent is disabled: no further model call
                await self._killed(rule, "*", "")
                raise StepStopped("disabled", rule.describe())
        budget = self.cmd.budget
        task_limited = budget is not None and (budget.max_usd is not None
                                               or budget.max_tokens is not None)
        capped = self.spend is not None and self.spend.applies(self.cmd.tenant,
                                                               self.cmd.user_id)
        if not task_limited and not capped:
            return None
        usd, tokens = estimate(request, model)
        task_res: Reservation | None = None
        if budget is not None and task_limited:
            # Only the task's own counter refuses: the step's slice (its fair share of
            # what is left) is no limit, since an upper-bound estimate of one call can be
            # larger than a share the step's real calls fit in easily. The slice steers
            # `headroom_usd` (model routing takes a cheaper tier when it is tight).
            try:
                task_res = await self.book.reserve(self.cmd.task_id, budget, usd=usd,
                                                   tokens=tokens)
            except BudgetRefused as e:
                raise await self._exceeded(e.kind, e.limit, e.would_be) from e
        if self.spend is None or not capped:
            return task_res
        try:
            period = await self.spend.reserve(self.cmd.tenant, self.cmd.user_id, usd)
        except BudgetRefused as e:
            if task_res is not None:
                await self.book.release(task_res)
            raise await self._exceeded(e.kind, e.limit, e.would_be) from e
        return _Reserved(task_res, period)

    async def headroom_usd(self) -> float | None:
        """What the task's dollar budget has left after spent and reserved; None: no
        dollar limit. The step's slice is not counted: like `before_model_call`, a tier
        is ruled out only when one call on it could overrun the task."""
        budget = self.cmd.budget
        if budget is None or budget.max_usd is None:
            return None
        usage = await self.book.usage(self.cmd.task_id)
        return max(0.0, budget.max_usd - usage.spent_usd - usage.reserved_usd)

    async def after_model_call(self, token: object, response: ModelResponse,
                               cost: float) -> None:
        self.step_spent_usd += cost
        period = token.period if isinstance(token, _Reserved) else None
        if isinstance(token, _Reserved):
            token = token.task
        if isinstance(token, Reservation):
            u = response.usage
            await self.book.settle(token, usd=cost, tokens=u.input_tokens + u.output_tokens)
        if period is not None and self.spend is not None:
            for alert in await self.spend.settle(period, cost, task_id=self.cmd.task_id,
                                                 step_id=self.cmd.step_id):
                await self.append(ev.BudgetAlerted(
                    subject=self.cmd.task_id, source=self.source, data=ev.BudgetAlertedData(
                        step_id=self.cmd.step_id, agent=self.agent, scope=alert.scope,
                        who=alert.who, period=alert.period, key=alert.key,
                        cap_usd=alert.cap_usd, share=alert.share,
                        spent_usd=alert.spent_usd)))
                if self.spend.caps.webhook_url:
                    await post_alert(self.spend.caps.webhook_url, alert)

    async def release(self, token: object) -> None:
        if isinstance(token, _Reserved):
            if token.period is not None and self.spend is not None:
                await self.spend.release(token.period)
            token = token.task
        if isinstance(token, Reservation):
            await self.book.release(token)

    async def before_tool_call(self, tool: Tool, arguments: dict[str, Any], key: str
                               ) -> str | None:
        if self.killswitch is not None:
            rule = self.killswitch.check(tool.name, self.agent, self.cmd.tenant)
            if rule is not None:
                return await self._killed(rule, tool.name, args_hash(tool.name, arguments))
        budget = self.cmd.budget
        if budget is not None and budget.max_tool_calls is not None:
            try:
                await self.book.count_tool_call(self.cmd.task_id, budget)
            except BudgetRefused as e:
                raise await self._exceeded(e.kind, e.limit, e.would_be) from e
        if tool.asks_user:  # always asked: the answer comes as an approval's reason
            question = str(arguments.get("question", ""))[:2000]
            return await self._approval(tool, arguments, args_hash(tool.name, arguments),
                                        f"question for the user: {question}")
        if tool.risk == "read":
            return None
        h = args_hash(tool.name, arguments)
        decision = self.policy.decide(tool.name, tool.risk, arguments)
        await self.append(ev.PolicyDecided(
            subject=self.cmd.task_id, source=self.source, data=ev.PolicyDecidedData(
                step_id=self.cmd.step_id, agent=self.agent, tool=tool.name, args_hash=h,
                decision=decision.action, rule=decision.rule, reason=decision.reason)))
        if decision.action == "allow":
            return None
        if decision.action == "deny":
            return f"denied by policy: {decision.reason}. Do not retry this call."
        return await self._approval(tool, arguments, h, decision.reason)

    async def _approval(self, tool: Tool, arguments: dict[str, Any], h: str, reason: str
                        ) -> str | None:
        """Wait for a human decision bound to this step, tool and argument hash."""
        # Approvals have a subject of their own, which only the approver role may write.
        control = subjects.task_approval(self.cmd.task_id)
        got = asyncio.Event()
        heard: list[bool] = []  # a decision for this call was heard on the subject

        async def on_msg(msg: Any) -> None:
            with contextlib.suppress(Exception):
                e = ev.decode_event(msg.data)
                if isinstance(e, ev.ApprovalGranted | ev.ApprovalDenied) \
                        and e.data.step_id == self.cmd.step_id and e.data.tool == tool.name \
                        and e.data.args_hash == h:
                    heard.append(True)
            got.set()

        async def read_decision() -> str | None:
            """The first decision in the ledger; when one was heard but the stream has
            not stored it yet (a core subscriber can hear a message before JetStream
            has it on disk), read again for a moment rather than wait for the next."""
            pause, give_up = 0.01, asyncio.get_running_loop().time() + 5.0
            while True:
                entries = await self.ledger.read(self.cmd.task_id, subject=control)
                found = decided(entries)
                if found is not None or not heard \
                        or asyncio.get_running_loop().time() > give_up:
                    return found
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.25)

        answer: list[str] = []  # a granted decision's reason (a question's answer)

        def decided(entries: list[Any]) -> str | None:
            event = decision_event(entries, self.cmd.step_id, tool.name, h)
            if isinstance(event, ev.ApprovalGranted):
                answer.append(event.data.reason)
            return told(event)

        sub = await self.nc.subscribe(control, cb=on_msg)  # before reading: no gap
        try:
            entries = await self.ledger.read(self.cmd.task_id, subject=control)
            found = decided(entries)
            if found is None:
                expires = datetime.now(UTC) + timedelta(seconds=self.approval_timeout_s)
                await self.append(ev.ApprovalRequested(
                    subject=self.cmd.task_id, source=self.source,
                    data=ev.ApprovalRequestedData(
                        step_id=self.cmd.step_id, agent=self.agent, tool=tool.name,
                        arguments=arguments, args_hash=h, reason=reason, risk=tool.risk,
                        expires_at=expires)))
                while found is None:
                    left = (expires - datetime.now(UTC)).total_seconds()
                    if left <= 0:
                        # Expiry is recorded on the step's own subject (an agent may not
                        # write a task's approval subject).
                        await self.append(ev.PolicyDecided(
                            subject=self.cmd.task_id, source=self.source,
                            data=ev.PolicyDecidedData(
                                step_id=self.cmd.step_id, agent=self.agent, tool=tool.name,
                                args_hash=h, decision="deny", rule=APPROVAL_TIMEOUT,
                                reason="no approval given in time")))
                        found = "denied: no approval given in time (by timeout)"
                        break
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(got.wait(), left)
                    got.clear()
                    found = await read_decision()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if found == "granted":
            if tool.asks_user:
                self.answers[(tool.name, h)] = answer[-1] if answer else ""
            return None
        if tool.asks_user:
            return (f"the user did not answer ({found}). Go on without the answer, or end "
                    "the step saying what you needed.")
        return f"{tool.name} was not approved ({found}). Do not retry this call."

    def answer(self, tool: str, h: str) -> str | None:
        """The answer given to this step's question `tool` with arguments hash `h`."""
        return self.answers.get((tool, h))
