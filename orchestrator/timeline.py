"""One human line per ledger event: for `jetmesh tail/show/submit` and A2A status messages."""

from __future__ import annotations

import json

from jetmesh.bus import events as ev


def _clip(value: object, n: int) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)[:n]


def describe(e: ev.Event, *, detail: bool = True) -> str:
    """What happened, in one line; `detail=False` leaves out payloads (outputs, results)."""
    match e:
        case ev.TaskSubmitted():
            return f"submitted: {e.data.goal or e.data.workflow or ''}" if detail else "submitted"
        case ev.TaskPlanned():
            return f"planned by {e.data.planner}: " + ", ".join(
                f"{s.id}({s.skill})" for s in e.data.steps)
        case ev.StepDispatched():
            return f"step {e.data.step_id} -> {e.data.skill} (attempt {e.data.attempt})"
        case ev.StepStarted():
            return f"step {e.data.step_id} started by {e.data.agent} on {e.data.worker}"
        case ev.ModelCalled():
            d = e.data
            where = d.purpose + (f" {d.step_id}" if d.step_id else "")
            line = f"model {d.provider}/{d.model} [{where}]"
            return line + (f" {d.input_tokens}+{d.output_tokens} tok ${d.cost_usd:.5f} "
                           f"{d.latency_ms:.0f}ms" if detail else "")
        case ev.ToolCalled():
            t = e.data
            if not detail:
                return f"tool {t.tool}" + (f" failed: {t.error}" if t.error else "")
            res = f"error: {t.error}" if t.error else _clip(t.output, 80)
            return f"tool {t.tool}({_clip(t.arguments, 60)}) -> {res}"
        case ev.EffectStarted():
            return f"effect starting: {e.data.tool} by {e.data.agent} on {e.data.worker}"
        case ev.PolicyDecided():
            return f"policy {e.data.decision} {e.data.tool} ({e.data.rule}): {e.data.reason}"
        case ev.ApprovalRequested():
            return (f"approval requested: {e.data.tool}({_clip(e.data.arguments, 80)}) - "
                    f"{e.data.reason}")
        case ev.ApprovalGranted():
            return f"approved {e.data.tool} by {e.data.by}"
        case ev.ApprovalDenied():
            return f"denied {e.data.tool} by {e.data.by}: {e.data.reason}"
        case ev.BudgetAlerted():
            alert = e.data
            return (f"spend alert: {alert.scope} {alert.who} at {alert.spent_usd:.6g} of "
                    f"{alert.cap_usd:g} USD this {alert.period} ({alert.share:.0%})")
        case ev.BudgetExceeded():
            return (f"budget exceeded ({e.data.kind}): limit {e.data.limit:g}, "
                    f"would be {e.data.would_be:.6g}")
        case ev.ModelRouted():
            r = e.data
            how = {"chosen": "", "stayed": " (budget: stayed)", "refused": " (refused)"}
            return (f"route {r.step_id} -> {r.tier} {r.provider}/{r.model} [{r.trigger}"
                    f"{', from ' + r.from_tier if r.from_tier else ''}]{how[r.outcome]}: "
                    f"{r.reason}")
        case ev.ContextCompacted():
            c = e.data
            return (f"context {c.step_id} compacted #{c.compaction}: messages "
                    f"{c.messages[0]}-{c.messages[1]} summarised, {c.tokens_before} -> "
                    f"{c.tokens_after} tok")
        case ev.McpToolsChanged():
            m = e.data
            return (f"MCP server {m.server} changed its tools ({m.action}): added {m.added}, "
                    f"removed {m.removed}, changed {m.changed}; {m.pinned_hash[:12]} -> "
                    f"{m.current_hash[:12]}")
        case ev.StepCompleted():
            return f"step {e.data.step_id} completed" + (
                f": {_clip(e.data.output, 100)}" if detail else "")
        case ev.StepFailed():
            return f"step {e.data.step_id} failed [{e.data.code}]: {e.data.reason}"
        case ev.TaskCompleted():
            return "completed" + (f": {_clip(e.data.result, 160)}" if detail else "")
        case ev.TaskFailed():
            return f"failed [{e.data.code}]: {e.data.reason}"
        case ev.TaskRejected():
            return f"rejected: {e.data.reason}"
        case ev.TaskCanceled():
            return f"canceled: {e.data.reason}"
        case ev.CancelRequested():
            return f"cancel requested: {e.data.reason}"
    return e.type
