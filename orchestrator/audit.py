"""The audit export of one task, built from its ledger entries only (`jetmesh audit`).

What was asked and by whom, the plan, every model call (model, tokens, cost), every tool
call with its arguments and result, every policy decision, every approval with who gave
it, the memories read and written (the `recall` / `remember` tool records, with the
provenance of each memory), budget refusals, cancellations and the outcome. Every record
names the ledger sequence it comes from, so each line can be checked against the ledger.

`build_audit` is pure (entries in, report out); `render_markdown` prints it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from jetmesh.bus import events as ev
from jetmesh.bus.ledger import LedgerEntry
from jetmesh.memory.tools import RECALL, REMEMBER


class _Rec(BaseModel):
    seq: int
    """The ledger sequence of the event this record comes from."""
    time: datetime
    source: str
    """Who wrote the event (`jetmesh/orchestrator`, `jetmesh/agent/<name>`, ...)."""


class AuditRequest(_Rec):
    goal: str
    input: dict[str, Any]
    workflow: str | None
    user_id: str | None
    tenant: str | None
    submitted_by: str | None
    """The authenticated identity that submitted it (None: not through the gateway)."""
    metadata: dict[str, str]
    budget: ev.Budget | None
    replay_of: str | None


class AuditPlan(_Rec):
    planner: str
    steps: list[ev.PlanStep]
    merge: bool


class AuditStep(BaseModel):
    step_id: str
    skill: str | None = None
    agent: str | None = None
    workers: list[str] = Field(default_factory=list)
    attempts: int = 0
    status: Literal["dispatched", "running", "completed", "failed"] = "dispatched"
    output: dict[str, Any] | None = None
    failure: str | None = None


class AuditModelCall(_Rec):
    step_id: str | None
    agent: str
    worker: str | None
    purpose: str
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cost_usd: float
    latency_ms: float


class AuditToolCall(_Rec):
    step_id: str
    agent: str
    worker: str | None
    tool: str
    call_id: str
    arguments: dict[str, Any]
    output: Any
    error: str | None
    side_effects: bool
    dry_run: bool
    cache_hit: bool
    idempotency_key: str


class AuditPolicyDecision(_Rec):
    step_id: str
    agent: str
    tool: str
    args_hash: str
    decision: str
    rule: str
    reason: str


class AuditApproval(_Rec):
    """A gated call: the request, and the decision on it (granted / denied / expired)."""

    step_id: str
    agent: str
    tool: str
    arguments: dict[str, Any]
    args_hash: str
    reason: str
    risk: str
    expires_at: datetime
    decision: Literal["granted", "denied", "expired", "pending"] = "pending"
    by: str | None = None
    """The approver's identity (or `timeout`)."""
    decision_reason: str | None = None
    decided_at: datetime | None = None
    decided_seq: int | None = None


class MemoryRef(BaseModel):
    id: str
    """The memory's id."""
    kind: str | None = None
    text: str | None = None
    task_id: str | None = None
    """Provenance: the task the memory came from."""
    step_id: str | None = None
    """Provenance: the step that stated it."""


class AuditMemory(_Rec):
    op: Literal["read", "write"]
    step_id: str
    agent: str
    query: str | None = None
    scope: str | None = None
    memories: list[MemoryRef] = Field(default_factory=list)
    error: str | None = None


class AuditBudget(_Rec):
    step_id: str | None
    agent: str
    kind: str
    limit: float
    would_be: float


class AuditBudgetAlert(_Rec):
    step_id: str | None
    scope: str
    who: str
    period: str
    cap_usd: float
    share: float
    spent_usd: float


class AuditCancel(_Rec):
    by: str | None
    reason: str


class AuditOutcome(_Rec):
    status: Literal["completed", "failed", "canceled", "rejected"]
    result: dict[str, Any] | None = None
    code: str | None = None
    reason: str | None = None


class AuditTotals(BaseModel):
    model_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    tool_calls: int = 0
    approvals: int = 0


class AuditReport(BaseModel):
    """Everything the ledger says about one task, for an auditor."""

    task_id: str
    events: int
    """Ledger events read (all of the task's subjects, step logs included)."""
    skipped: int = 0
    """Stored messages that did not decode (named by seq in `skipped_seqs`)."""
    skipped_seqs: list[int] = Field(default_factory=list)
    request: AuditRequest | None = None
    plan: AuditPlan | None = None
    steps: list[AuditStep] = Field(default_factory=list)
    model_calls: list[AuditModelCall] = Field(default_factory=list)
    tool_calls: list[AuditToolCall] = Field(default_factory=list)
    policy_decisions: list[AuditPolicyDecision] = Field(default_factory=list)
    approvals: list[AuditApproval] = Field(default_factory=list)
    memory: list[AuditMemory] = Field(default_factory=list)
    budget_refusals: list[AuditBudget] = Field(default_factory=list)
    budget_alerts: list[AuditBudgetAlert] = Field(default_factory=list)
    """Tenant or user spend caps this task's calls took to their alert share."""
    cancellations: list[AuditCancel] = Field(default_factory=list)
    outcome: AuditOutcome | None = None
    totals: AuditTotals = Field(default_factory=AuditTotals)


def _rec(entry: LedgerEntry) -> dict[str, Any]:
    return {"seq": entry.seq, "time": entry.event.time, "source": entry.event.source}


def _memory(entry: LedgerEntry, d: ev.ToolCalledData) -> AuditMemory | None:
    """The memory read or write a recall / remember tool record shows."""
    if d.tool == RECALL:
        out = d.output if isinstance(d.output, dict) else {}
        found = out.get("hits")
        hits: list[Any] = found if isinstance(found, list) else []
        return AuditMemory(
            **_rec(entry), op="read", step_id=d.step_id, agent=d.agent,
            query=str(d.arguments.get("query", "")), scope=out.get("scope")
            or d.arguments.get("scope"), error=d.error,
            memories=[MemoryRef(id=str(h.get("id")), kind=h.get("kind"), text=h.get("text"),
                                task_id=h.get("task_id"), step_id=h.get("step_id"))
                      for h in hits if isinstance(h, dict)])
    if d.tool == REMEMBER:
        out = d.output if isinstance(d.output, dict) else {}
        refs = [MemoryRef(id=str(out["id"]), kind="fact", text=d.arguments.get("text"),
                          task_id=entry.event.subject, step_id=d.step_id)] \
            if out.get("id") and not d.dry_run else []
        return AuditMemory(**_rec(entry), op="write", step_id=d.step_id, agent=d.agent,
                           memories=refs, error=d.error)
    return None


def build_audit(task_id: str, entries: list[LedgerEntry],
                skipped_seqs: list[int] | None = None) -> AuditReport:
    """Pure: the audit report of a task from its ledger entries, in ledger order."""
    r = AuditReport(task_id=task_id, events=len(entries), skipped=len(skipped_seqs or []),
                    skipped_seqs=list(skipped_seqs or []))
    steps: dict[str, AuditStep] = {}
    pending: dict[tuple[str, str, str], AuditApproval] = {}

    def step(step_id: str) -> AuditStep:
        return steps.setdefault(step_id, AuditStep(step_id=step_id))

    for entry in entries:
        e = entry.event
        if isinstance(e, ev.TaskSubmitted) and r.request is None:
            s = e.data
            r.request = AuditRequest(
                **_rec(entry), goal=s.goal, input=s.input, workflow=s.workflow,
                user_id=s.user_id, tenant=s.tenant, submitted_by=s.submitted_by,
                metadata=s.metadata, budget=s.budget, replay_of=s.replay_of)
        elif isinstance(e, ev.TaskPlanned):
            r.plan = AuditPlan(**_rec(entry), planner=e.data.planner, steps=e.data.steps,
                               merge=e.data.merge)
        elif isinstance(e, ev.StepDispatched):
            st = step(e.data.step_id)
            st.skill = e.data.skill
            st.attempts = max(st.attempts, e.data.attempt)
        elif isinstance(e, ev.StepStarted):
            st = step(e.data.step_id)
            st.agent = e.data.agent
            if e.data.worker not in st.workers:
                st.workers.append(e.data.worker)
            if st.status == "dispatched":
                st.status = "running"
        elif isinstance(e, ev.StepCompleted):
            st = step(e.data.step_id)
            st.agent = st.agent or e.data.agent
            st.status, st.output, st.failure = "completed", e.data.output, None
        elif isinstance(e, ev.StepFailed):
            st = step(e.data.step_id)
            if st.status != "completed":
                st.status, st.failure = "failed", f"{e.data.code}: {e.data.reason}"
        elif isinstance(e, ev.ModelCalled):
            d = e.data
            r.model_calls.append(AuditModelCall(
                **_rec(entry), step_id=d.step_id, agent=d.agent, worker=d.worker,
                purpose=d.purpose, provider=d.provider, model=d.model,
                input_tokens=d.input_tokens, output_tokens=d.output_tokens,
                cache_read_tokens=d.cache_read_tokens, cost_usd=d.cost_usd,
                latency_ms=d.latency_ms))
        elif isinstance(e, ev.ToolCalled):
            t = e.data
            r.tool_calls.append(AuditToolCall(
                **_rec(entry), step_id=t.step_id, agent=t.agent, worker=t.worker,
                tool=t.tool, call_id=t.call_id, arguments=t.arguments, output=t.output,
                error=t.error, side_effects=t.side_effects, dry_run=t.dry_run,
                cache_hit=t.cache_hit, idempotency_key=t.idempotency_key))
            mem = _memory(entry, t)
            if mem is not None:
                r.memory.append(mem)
        elif isinstance(e, ev.PolicyDecided):
            d2 = e.data
            r.policy_decisions.append(AuditPolicyDecision(
                **_rec(entry), step_id=d2.step_id, agent=d2.agent, tool=d2.tool,
                args_hash=d2.args_hash, decision=d2.decision, rule=d2.rule,
                reason=d2.reason))
            key = (d2.step_id, d2.tool, d2.args_hash)
            if d2.rule == "approval-timeout" and key in pending:
                a = pending.pop(key)
                a.decision, a.by, a.decision_reason = "expired", "timeout", d2.reason
                a.decided_at, a.decided_seq = e.time, entry.seq
        elif isinstance(e, ev.ApprovalRequested):
            d3 = e.data
            approval = AuditApproval(
                **_rec(entry), step_id=d3.step_id, agent=d3.agent, tool=d3.tool,
                arguments=d3.arguments, args_hash=d3.args_hash, reason=d3.reason,
                risk=d3.risk, expires_at=d3.expires_at)
            r.approvals.append(approval)
            pending[(d3.step_id, d3.tool, d3.args_hash)] = approval
        elif isinstance(e, ev.ApprovalGranted | ev.ApprovalDenied):
            d4 = e.data
            found = pending.pop((d4.step_id, d4.tool, d4.args_hash), None)
            if found is not None:  # the first decision on a request counts (the guard's)
                found.decision = "granted" if isinstance(e, ev.ApprovalGranted) else "denied"
                found.by, found.decision_reason = d4.by, d4.reason
                found.decided_at, found.decided_seq = e.time, entry.seq
        elif isinstance(e, ev.BudgetExceeded):
            d5 = e.data
            r.budget_refusals.append(AuditBudget(
                **_rec(entry), step_id=d5.step_id, agent=d5.agent, kind=d5.kind,
                limit=d5.limit, would_be=d5.would_be))
        elif isinstance(e, ev.BudgetAlerted):
            d6 = e.data
            r.budget_alerts.append(AuditBudgetAlert(
                **_rec(entry), step_id=d6.step_id, scope=d6.scope, who=d6.who,
                period=d6.period, cap_usd=d6.cap_usd, share=d6.share,
                spent_usd=d6.spent_usd))
        elif isinstance(e, ev.CancelRequested):
            r.cancellations.append(AuditCancel(**_rec(entry), by=e.data.by,
                                               reason=e.data.reason))
        elif isinstance(e, ev.TERMINAL_TASK_EVENTS) and r.outcome is None:
            if isinstance(e, ev.TaskCompleted):
                r.outcome = AuditOutcome(**_rec(entry), status="completed",
                                         result=e.data.result)
            elif isinstance(e, ev.TaskFailed):
                r.outcome = AuditOutcome(**_rec(entry), status="failed", code=e.data.code,
                                         reason=e.data.reason)
            elif isinstance(e, ev.TaskCanceled):
                r.outcome = AuditOutcome(**_rec(entry), status="canceled",
                                         reason=e.data.reason)
            elif isinstance(e, ev.TaskRejected):
                r.outcome = AuditOutcome(**_rec(entry), status="rejected",
                                         reason=e.data.reason)
    r.steps = list(steps.values())
    r.totals = AuditTotals(
        model_calls=len(r.model_calls),
        input_tokens=sum(m.input_tokens for m in r.model_calls),
        output_tokens=sum(m.output_tokens for m in r.model_calls),
        cost_usd=sum(m.cost_usd for m in r.model_calls),
        tool_calls=len(r.tool_calls), approvals=len(r.approvals))
    return r


# ----------------------------------------------------------------------------- markdown


def _cell(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str,
                                                           sort_keys=True)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def render_markdown(r: AuditReport) -> str:
    """The report as Markdown (long values shortened; `--format json` has them whole)."""
    lines = [f"# Audit of task {r.task_id}", ""]
    o = r.outcome
    lines.append(f"Outcome: **{o.status}** at {o.time.isoformat()} (seq {o.seq})" if o
                 else "Outcome: **not finished**")
    lines += [f"Ledger events read: {r.events}; undecodable: {r.skipped}", ""]
    lines += ["## Request", ""]
    if r.request is None:
        lines.append("No submission in the ledger.")
    else:
        q = r.request
        lines += _table(["field", "value"], [
            ["seq", q.seq], ["time", q.time.isoformat()], ["goal", q.goal],
            ["input", q.input], ["workflow", q.workflow or "-"],
            ["user", q.user_id or "-"], ["tenant", q.tenant or "-"],
            ["submitted by", q.submitted_by or "-"], ["budget", q.budget.model_dump(
                exclude_none=True) if q.budget else "-"], ["metadata", q.metadata]])
    lines += ["", "## Plan", ""]
    if r.plan is None:
        lines.append("No plan in the ledger.")
    else:
        lines.append(f"Planner `{r.plan.planner}` (seq {r.plan.seq})"
                     + (", results merged by a model call" if r.plan.merge else ""))
        lines += [""] + _table(["step", "skill", "depends on", "input"], [
            [s.id, s.skill, ", ".join(s.depends_on) or "-", s.input] for s in r.plan.steps])
    lines += ["", "## Steps", ""] + _table(
        ["step", "skill", "agent", "workers", "attempts", "status", "output / failure"],
        [[s.step_id, s.skill or "-", s.agent or "-", ", ".join(s.workers) or "-",
          s.attempts, s.status, s.failure or s.output or "-"] for s in r.steps])
    t = r.totals
    lines += ["", "## Model calls", "",
              f"{t.model_calls} calls, {t.input_tokens} input + {t.output_tokens} output "
              f"tokens, ${t.cost_usd:.6f}", ""]
    lines += _table(["seq", "step", "agent", "purpose", "model", "in", "out", "cost $",
                     "ms"],
                    [[m.seq, m.step_id or "-", m.agent, m.purpose,
                      f"{m.provider}/{m.model}", m.input_tokens, m.output_tokens,
                      f"{m.cost_usd:.6f}", f"{m.latency_ms:.0f}"] for m in r.model_calls])
    lines += ["", "## Tool calls", ""] + _table(
        ["seq", "step", "agent", "tool", "arguments", "result", "effect"],
        [[c.seq, c.step_id, c.agent, c.tool, c.arguments,
          f"error: {c.error}" if c.error else c.output,
          "dry-run" if c.dry_run else "yes" if c.side_effects else "no"]
         for c in r.tool_calls])
    lines += ["", "## Policy decisions", ""] + _table(
        ["seq", "step", "tool", "decision", "rule", "reason", "args hash"],
        [[p.seq, p.step_id, p.tool, p.decision, p.rule, p.reason or "-", p.args_hash[:12]]
         for p in r.policy_decisions])
    lines += ["", "## Approvals", ""] + _table(
        ["requested seq", "step", "tool", "arguments", "decision", "by", "reason",
         "decided seq"],
        [[a.seq, a.step_id, a.tool, a.arguments, a.decision, a.by or "-",
          a.decision_reason or "-", a.decided_seq or "-"] for a in r.approvals])
    lines += ["", "## Memory", ""] + _table(
        ["seq", "op", "step", "query", "memories (id ← task/step)"],
        [[m.seq, m.op, m.step_id, m.query or "-",
          "; ".join(f"{x.id} ← {x.task_id or '?'}/{x.step_id or '?'}" for x in m.memories)
          or (f"error: {m.error}" if m.error else "none")] for m in r.memory])
    if r.budget_refusals:
        lines += ["", "## Budget refusals", ""] + _table(
            ["seq", "step", "kind", "limit", "would be"],
            [[b.seq, b.step_id or "-", b.kind, b.limit, b.would_be]
             for b in r.budget_refusals])
    if r.budget_alerts:
        lines += ["", "## Spend cap alerts", ""] + _table(
            ["seq", "step", "cap", "spent", "share"],
            [[a.seq, a.step_id or "-", f"{a.scope} {a.who} {a.period} ${a.cap_usd:g}",
              f"${a.spent_usd:.6f}", f"{a.share:.0%}"] for a in r.budget_alerts])
    if r.cancellations:
        lines += ["", "## Cancellations", ""] + _table(
            ["seq", "by", "reason"], [[c.seq, c.by or "-", c.reason] for c in r.cancellations])
    lines += ["", "## Outcome", ""]
    if o is None:
        lines.append("Not finished.")
    else:
        lines += _table(["field", "value"], [
            ["status", o.status], ["seq", o.seq], ["time", o.time.isoformat()],
            ["result", o.result if o.result is not None else "-"],
            ["code", o.code or "-"], ["reason", o.reason or "-"]])
    return "\n".join(lines) + "\n"
