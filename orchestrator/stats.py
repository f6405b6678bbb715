"""Cost per outcome across tasks: a projection of finished tasks kept in NATS KV.

The telemetry role writes one record per finished task (`task_summary`, pure, derived
from the task's ledger entries) to the `jm-stats` bucket under `task.<task_id>`, before
it exports the task's trace. The key is the task, so a redelivered end (a restart) puts
the same value again: every task counts once. `jetmesh stats` reads the records (not
the ledger) and aggregates them (`aggregate`, pure) over a time window, by workflow,
tenant, agent, skill or model.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, field_validator

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.kvscan import current_entries
from jetmesh.bus.ledger import LedgerEntry
from jetmesh.orchestrator.state import TaskState, fold

log = logging.getLogger("jetmesh.telemetry")

STATS_TTL_S = 30 * 86400.0
NO_TENANT = "(none)"
"""The tenant group of tasks submitted without one (and of records written before tenants)."""
"""How long a task's record is kept in the projection."""
BY = ("workflow", "tenant", "agent", "skill", "model")


_COUNTS = ("cost_usd", "model_calls", "tool_calls", "tokens", "input_tokens",
           "cache_read_tokens", "cache_write_tokens", "tool_cache_hits", "escalations")
"""What a task's record counts per agent and per model (older records lack the later
ones: they count 0)."""


def _row() -> dict[str, float]:
    return {k: 0.0 if k == "cost_usd" else 0 for k in _COUNTS}


def cache_hit_rate(group: dict[str, Any]) -> float | None:
    """Share of the input tokens read from a prompt cache (None: no input)."""
    n = group.get("input_tokens", 0)
    return group.get("cache_read_tokens", 0) / n if n else None


def _key(task_id: str) -> str:
    return f"task.{subjects.check_id(task_id, 'task id')}"


def task_summary(task_id: str, entries: Sequence[LedgerEntry], *,
                 state: TaskState | None = None) -> dict[str, Any] | None:
    """One finished task's figures, from its ledger entries only (None: not finished).
    `state`: the entries' fold, when the caller has it (it is not folded again)."""
    if state is None:
        state = fold(task_id, entries)
    if not state.terminal:
        return None
    end = next(e for e in entries if isinstance(e.event, ev.TERMINAL_TASK_EVENTS))
    start = state.created_at or entries[0].event.time
    agents: dict[str, dict[str, float]] = {}
    models: dict[str, dict[str, float]] = {}
    skills: dict[str, dict[str, float]] = {}
    """Per skill: what the task's steps of that skill did (the orchestrator's own plan
    and merge calls belong to no skill)."""

    def skill_row(step_id: str | None) -> dict[str, float] | None:
        st = state.steps.get(step_id) if step_id else None
        return skills.setdefault(st.skill, _row()) if st is not None else None
    approvals = {"requested": 0, "granted": 0, "denied": 0}
    budget_refusals = retries = spend_alerts = 0
    wait_s = 0.0
    asked: dict[str, datetime] = {}
    silent_failures = 0
    for entry in entries:
        e = entry.event
        match e:
            case ev.ModelCalled():
                d = e.data
                rows = [agents.setdefault(d.agent, _row()),
                        models.setdefault(f"{d.provider}/{d.model}", _row())]
                srow = skill_row(d.step_id)
                for row in rows if srow is None else [*rows, srow]:
                    row["cost_usd"] += d.cost_usd
                    row["model_calls"] += 1
                    row["tokens"] += d.input_tokens + d.output_tokens
                    row["input_tokens"] += d.input_tokens
                    row["cache_read_tokens"] += d.cache_read_tokens
                    row["cache_write_tokens"] += d.cache_write_tokens
            case ev.ToolCalled():
                for tr in (agents.setdefault(e.data.agent, _row()), skill_row(e.data.step_id)):
                    if tr is not None:
                        tr["tool_calls"] += 1
                        tr["tool_cache_hits"] += e.data.cache_hit
            case ev.ModelRouted():
                escalated = e.data.from_tier is not None and e.data.outcome == "chosen"
                for er in (agents.setdefault(e.data.agent, _row()), skill_row(e.data.step_id)):
                    if er is not None:
                        er["escalations"] += escalated
                silent_failures += e.data.trigger == "validator"
            case ev.ApprovalRequested():
                approvals["requested"] += 1
                asked[f"{e.data.step_id}/{e.data.tool}/{e.data.args_hash}"] = e.time
            case ev.ApprovalGranted() | ev.ApprovalDenied():
                approvals["granted" if isinstance(e, ev.ApprovalGranted) else "denied"] += 1
                at = asked.pop(f"{e.data.step_id}/{e.data.tool}/{e.data.args_hash}", None)
                if at is not None:
                    wait_s += (e.time - at).total_seconds()
            case ev.BudgetExceeded():
                budget_refusals += 1
            case ev.BudgetAlerted():  # a tenant's or user's spend reached its alert share
                spend_alerts += 1
            case ev.StepDispatched() if e.data.attempt > 1:
                retries += 1
            case _:
                pass
    submitted = state.submitted
    return {
        "task_id": task_id,
        "workflow": (submitted.workflow if submitted else None) or "(planned)",
        "tenant": (submitted.tenant if submitted else None) or NO_TENANT,
        "user_id": submitted.user_id if submitted else None,
        "status": state.status.value,
        "code": state.code,
        "started_at": start.isoformat(),
        "ended_at": end.event.time.isoformat(),
        "duration_s": (end.event.time - start).total_seconds(),
        "cost_usd": state.cost_usd,
        "input_tokens": state.input_tokens,
        "output_tokens": state.output_tokens,
        "model_calls": state.model_calls,
        "tool_calls": state.tool_calls,
        "approvals": approvals,
        "approval_wait_s": wait_s,
        "budget_refusals": budget_refusals,
        "spend_alerts": spend_alerts,
        "retries": retries,
        "silent_failures_caught": silent_failures,
        "agents": agents,
        "skills": skills,
        "models": models,
    }


def summary_record(summary: dict[str, Any]) -> tuple[str, bytes]:
    """A task's record as stored: (its key in the bucket, its bytes)."""
    return _key(summary["task_id"]), json.dumps(summary, sort_keys=True).encode()


async def put_summary(js: JetStreamContext, summary: dict[str, Any], *,
                      kv: KeyValue | None = None) -> None:
    """Store one task's record (the same value again for the same task: idempotent).
    `kv`: the bucket, when the caller keeps it (no lookup per record)."""
    bucket = kv or await js.key_value(subjects.BUCKET_STATS)
    await bucket.put(*summary_record(summary))


async def read_summaries(js: JetStreamContext) -> list[dict[str, Any]]:
    """Every task record in the projection."""
    try:
        await js.key_value(subjects.BUCKET_STATS)
    except (BucketNotFoundError, NotFoundError):
        return []
    out: list[dict[str, Any]] = []
    for e in await current_entries(js, subjects.BUCKET_STATS):
        try:
            _RECORD.validate_json(e.value)
            out.append(json.loads(e.value))
        except ValidationError as err:  # not the telemetry role's: left out, said once
            log.warning("jm-stats: record %s is not readable, left out: %s", e.key,
                        str(err).splitlines()[0])
    return out


class _Counts(BaseModel):
    model_config = ConfigDict(extra="allow")
    tool_calls: int = 0
    model_calls: int = 0
    cost_usd: float = 0.0


class _Record(BaseModel):
    """What `aggregate` reads of a record (others kept as they are)."""

    model_config = ConfigDict(extra="allow")
    task_id: str
    status: str
    code: str | None = None
    workflow: str | None = None
    tenant: str | None = None
    ended_at: str
    duration_s: float
    cost_usd: float
    input_tokens: int
    output_tokens: int
    tool_calls: int
    retries: int = 0
    budget_refusals: int = 0
    approval_wait_s: float = 0.0
    spend_alerts: int = 0
    silent_failures_caught: int = 0
    approvals: dict[str, int]
    agents: dict[str, _Counts] = {}
    skills: dict[str, _Counts] = {}
    models: dict[str, _Counts] = {}

    @field_validator("ended_at")
    @classmethod
    def _when(cls, v: str) -> str:
        datetime.fromisoformat(v)  # a ValueError is a validation error
        return v


_RECORD = TypeAdapter(_Record)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_status: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
        if r["status"] != "completed" and r.get("code"):
            reasons[r["code"]] = reasons.get(r["code"], 0) + 1
    n = len(rows)
    done = [r for r in rows if r["status"] == "completed"]
    asked = sum(1 for r in rows if r["approvals"]["requested"])
    lat = sorted(r["duration_s"] for r in rows)
    cost = sum(r["cost_usd"] for r in rows)
    return {
        "tasks": n,
        "by_outcome": by_status,
        "completion_rate": len(done) / n if n else None,
        "cost_usd": cost,
        "cost_per_completed_task": cost / len(done) if done else None,
        "tokens_per_task": sum(r["input_tokens"] + r["output_tokens"] for r in rows) / n
        if n else None,
        "tool_calls_per_task": sum(r["tool_calls"] for r in rows) / n if n else None,
        "escalation_rate": asked / n if n else None,
        "approvals": {k: sum(r["approvals"][k] for r in rows)
                      for k in ("requested", "granted", "denied")},
        "approval_wait_s": sum(r["approval_wait_s"] for r in rows),
        "budget_refusals": sum(r["budget_refusals"] for r in rows),
        "spend_alerts": sum(r.get("spend_alerts", 0) for r in rows),  # older records: 0
        "retries": sum(r["retries"] for r in rows),
        "silent_failures_caught": sum(r.get("silent_failures_caught", 0) for r in rows),
        "failure_reasons": reasons,
        "latency_s": {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "p99": _pct(lat, 99)},
    }


def aggregate(records: Iterable[dict[str, Any]], *, since: datetime | None = None,
              by: str | None = None) -> dict[str, Any]:
    """The figures over the records that ended at or after `since`; with `by`
    (workflow, tenant, agent, skill, model) also per group (a task counts in every agent's,
    skill's or model's group it used; cost and calls there are that group's own: a skill's
    are its steps', without the orchestrator's plan and merge calls)."""
    rows = [r for r in records
            if since is None or datetime.fromisoformat(r["ended_at"]) >= since]
    out: dict[str, Any] = {"all": _figures(rows)}
    if by in ("workflow", "tenant"):  # whole tasks, grouped
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(r.get(by) or NO_TENANT, []).append(r)
        out[f"by_{by}"] = {k: _figures(v) for k, v in sorted(groups.items())}
    elif by in ("agent", "skill", "model"):
        table = {"agent": "agents", "skill": "skills", "model": "models"}[by]
        per: dict[str, dict[str, Any]] = {}
        for r in rows:
            for name, row in r.get(table, {}).items():  # records before skills: none
                g = per.setdefault(name, {"tasks": 0, "completed": 0, **_row()})
                g["tasks"] += 1
                g["completed"] += r["status"] == "completed"
                for k in _COUNTS:
                    g[k] += row.get(k, 0)
        for g in per.values():
            g["prompt_cache_hit_rate"] = cache_hit_rate(g)
        out[f"by_{by}"] = dict(sorted(per.items()))
    elif by is not None:
        raise ValueError(f"--by must be one of {', '.join(BY)}")
    return out
