"""Evaluation suites (`evals/*.yaml`, schema in evals/README.md): cases run through a live
mesh and scored on what the ledger recorded (`jetmesh eval run`, `jetmesh eval compare`).

A case is one task (goal, workflow or skill, input, user, budget) and its checks: the
task's final status, tools that must / must not be called (in any order, in order, or
exactly), checks on the result (a dotted path, then equals / contains / regex / JSON
Schema / min / max / exists), and limits (cost, tool calls, latency). A run's score is
the share of its checks that hold; a case runs `runs` times and its median score puts it
in a tier: pass above `pass_above`, fail below `fail_below`, soft in between.

With models (`AGENT=provider:model`), each run first runs the case as it is, then forks
it from the first step of an agent whose model is replaced (`jetmesh fork`, side effects
dry-run): the steps before are not paid again, and the fork is what is scored (its tool
calls and costs include the reused steps').

Task ids are `ev-<run id>-<case>-<n>`: the same run id again (an eval restarted after a
crash) submits nothing new for runs already submitted, so no case is paid twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import statistics
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jetmesh.agents.models.types import Model
from jetmesh.agents.routing import as_text, lookup
from jetmesh.agents.spec import schema_errors
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.ledger import LedgerEntry
from jetmesh.bus.subjects import check_id
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.state import TaskState, fold

__all__ = [
    "Case",
    "CaseResult",
    "RunResult",
    "Suite",
    "compare_reports",
    "load_suite",
    "run_suite",
    "score_run",
    "suite_from_ledger",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolChecks(_Model):
    must_call: list[str] = Field(default_factory=list)
    """Tools that must run (a call that ran, or a fork's dry-run "would call")."""
    must_not_call: list[str] = Field(default_factory=list)
    """Tools that must not run (asked for but denied or left unapproved is not running)."""
    order: Literal["any", "in_order", "exact"] = "any"
    """`in_order`: must_call appear in this order among the calls; `exact`: the calls
    that ran are exactly must_call, in order."""


class ResultCheck(_Model):
    path: str = ""
    """Dotted path into the task's result (`output.answer`, `steps.order0.status`, a list
    index as a number); empty: the whole result."""
    equals: Any = None
    contains: str | None = None
    """A substring of the value's text (its JSON when not a string)."""
    regex: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    min: float | None = None
    max: float | None = None
    exists: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Limits(_Model):
    max_cost_usd: float | None = None
    max_tool_calls: int | None = None
    max_latency_s: float | None = None


class JudgeCheck(_Model):
    """An LLM-as-judge rubric: the judge model scores the value at `path` from 0 to 1."""

    rubric: str
    path: str = ""
    """Dotted path into the result (empty: the whole result)."""
    model: str | None = None
    """`provider:model` of the judge (default: the suite's `judge_model`, else the run's)."""


class Checks(_Model):
    status: str | None = "completed"
    """The task's final status (None: any)."""
    tools: ToolChecks = Field(default_factory=ToolChecks)
    result: list[ResultCheck] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    judge: list[JudgeCheck] = Field(default_factory=list)


class Case(_Model):
    id: str
    description: str = ""
    goal: str = ""
    workflow: str | None = None
    skill: str | None = None
    """One skill on the input (the workflow `skill:<id>`)."""
    input: dict[str, Any] = Field(default_factory=dict)
    user: str | None = None
    budget: ev.Budget | None = None
    runs: int | None = Field(default=None, ge=1)
    approvals: Literal["approve", "deny"] | None = None
    """A human's answer to every gated call of the task (None: nobody answers; the
    call waits until the approval times out, a denial)."""
    checks: Checks = Field(default_factory=Checks)

    @field_validator("id")
    @classmethod
    def _token(cls, v: str) -> str:
        return check_id(v, "case id")

    def target_workflow(self) -> str | None:
        return f"skill:{self.skill}" if self.skill else self.workflow


class Suite(_Model):
    name: str
    description: str = ""
    runs: int = Field(default=3, ge=1)
    pass_above: float = 0.8
    fail_below: float = 0.5
    judge_model: str | None = None
    """`provider:model` of the judge for rubrics that name none."""
    cases: list[Case]


def load_suite(path: Path) -> Suite:
    """A suite from YAML (ValueError with the reason if it is not one)."""
    try:
        return Suite.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


# ----------------------------------------------------------------------------- scoring


class Check(BaseModel):
    name: str
    ok: bool
    detail: str = ""
    value: float | None = None
    """A judge's score (0..1), counted instead of ok."""


class RunResult(BaseModel):
    task_id: str
    status: str
    score: float
    checks: list[Check]
    cost_usd: float
    tokens: int
    model_calls: int
    tool_calls: list[str]
    latency_s: float
    forked_from: str | None = None


class CaseResult(BaseModel):
    id: str
    tier: Literal["pass", "soft", "fail"]
    score: float
    runs: list[RunResult]


def _result_checks(rc: ResultCheck, result: dict[str, Any] | None) -> list[Check]:
    name = f"result.{rc.path}" if rc.path else "result"
    found, value = lookup(result, rc.path) if result is not None else (False, None)
    out: list[Check] = []
    if rc.exists is not None:
        out.append(Check(name=f"{name} exists", ok=found == rc.exists))
    if not found:
        if rc.exists is None or rc.exists:
            wanted = [k for k in ("equals", "contains", "regex", "schema_", "min", "max")
                      if getattr(rc, k) is not None]
            out += [Check(name=f"{name} {k.rstrip('_')}", ok=False, detail="no such path")
                    for k in wanted]
        return out
    if rc.equals is not None:
        out.append(Check(name=f"{name} equals", ok=value == rc.equals,
                         detail="" if value == rc.equals else as_text(value)[:80]))
    if rc.contains is not None:
        out.append(Check(name=f"{name} contains {rc.contains!r}", ok=rc.contains in as_text(value)))
    if rc.regex is not None:
        out.append(Check(name=f"{name} matches /{rc.regex}/",
                         ok=re.search(rc.regex, as_text(value)) is not None))
    if rc.schema_ is not None:
        errors = schema_errors(rc.schema_, value)
        out.append(Check(name=f"{name} schema", ok=not errors, detail="; ".join(errors[:3])))
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if rc.min is not None:
        out.append(Check(name=f"{name} >= {rc.min:g}", ok=number is not None and number >= rc.min))
    if rc.max is not None:
        out.append(Check(name=f"{name} <= {rc.max:g}", ok=number is not None and number <= rc.max))
    return out


def _tool_checks(tc: ToolChecks, ran: list[str]) -> list[Check]:
    out = [Check(name=f"calls {t}", ok=t in ran) for t in tc.must_call]
    out += [Check(name=f"never calls {t}", ok=t not in ran) for t in tc.must_not_call]
    if tc.order == "in_order" and tc.must_call:
        it = iter(ran)
        ok = all(any(t == r for r in it) for t in tc.must_call)
        out.append(Check(name="calls in order", ok=ok, detail=",".join(ran)))
    elif tc.order == "exact":
        out.append(Check(name="calls exactly", ok=ran == tc.must_call, detail=",".join(ran)))
    return out


def _tools_ran(entries: list[LedgerEntry], state: TaskState,
               steps: set[str] | None = None) -> list[tuple[int, str, str]]:
    """(seq, step, tool) of tool calls that ran (no error), the step holder's, once per
    idempotency key; `steps`: only these steps."""
    ignored = {i.seq for i in state.ignored}
    seen: set[str] = set()
    out: list[tuple[int, str, str]] = []
    for e in entries:
        d = e.event.data
        if not isinstance(e.event, ev.ToolCalled) or e.seq in ignored:
            continue
        assert isinstance(d, ev.ToolCalledData)
        if d.idempotency_key in seen or d.error is not None:
            continue
        seen.add(d.idempotency_key)
        if steps is None or d.step_id in steps:
            out.append((e.seq, d.step_id, d.tool))
    return out


def score_run(case: Case, entries: list[LedgerEntry], *,
              base: list[LedgerEntry] | None = None) -> RunResult:
    """Score one run of `case` from its task's ledger entries. `base`: a fork's original,
    whose steps the fork reused (their tool calls and costs count for the fork)."""
    tid = entries[0].event.subject if entries else "?"
    state = fold(tid, entries)
    calls = _tools_ran(entries, state)
    cost, tokens, model_calls = state.cost_usd, state.input_tokens + state.output_tokens, \
        state.model_calls
    for c in state.orchestrator_calls:  # the eval's own judge calls are not the case's
        if c.purpose.startswith("judge:"):
            cost -= c.cost_usd
            tokens -= c.input_tokens + c.output_tokens
            model_calls -= 1
    forked_from = state.submitted.replay_of if state.submitted else None
    fork = state.submitted.fork if state.submitted else None
    if base is not None and forked_from is not None and fork is not None:
        from jetmesh.agents.replay import rerun_steps

        orig = fold(forked_from, base)
        reused = set(orig.steps) - rerun_steps(orig.plan, fork)
        calls += _tools_ran(base, orig, reused)
        calls.sort(key=lambda c: [p.id for p in orig.plan].index(c[1])
                   if c[1] in orig.steps else 0)
        for sid in reused:
            st = orig.steps[sid]
            cost += st.cost_usd
            tokens += st.input_tokens + st.output_tokens
    ran = [c[2] for c in calls]
    latency = ((state.updated_at - state.created_at).total_seconds()
               if state.updated_at and state.created_at else 0.0)
    chk: list[Check] = []
    if case.checks.status is not None:
        chk.append(Check(name=f"status {case.checks.status}",
                         ok=state.status.value == case.checks.status,
                         detail=state.reason or state.status.value))
    chk += _tool_checks(case.checks.tools, ran)
    for rc in case.checks.result:
        chk += _result_checks(rc, state.result)
    lim = case.checks.limits
    if lim.max_cost_usd is not None:
        chk.append(Check(name=f"cost <= ${lim.max_cost_usd:g}", ok=cost <= lim.max_cost_usd,
                         detail=f"${cost:.5f}"))
    if lim.max_tool_calls is not None:
        chk.append(Check(name=f"tool calls <= {lim.max_tool_calls}",
                         ok=len(ran) <= lim.max_tool_calls, detail=str(len(ran))))
    if lim.max_latency_s is not None:
        chk.append(Check(name=f"latency <= {lim.max_latency_s:g}s",
                         ok=latency <= lim.max_latency_s, detail=f"{latency:.2f}s"))
    score = _score(chk)
    return RunResult(task_id=tid, status=state.status.value, score=score, checks=chk,
                     cost_usd=cost, tokens=tokens, model_calls=model_calls, tool_calls=ran,
                     latency_s=latency, forked_from=forked_from)


def _score(checks: list[Check]) -> float:
    if not checks:
        return 1.0
    return sum(c.value if c.value is not None else float(c.ok) for c in checks) / len(checks)


JUDGE_SYSTEM = (
    "You are an evaluation judge. Score how well the answer meets the rubric, from 0 (not "
    "at all) to 1 (fully). Judge only the answer given; answer with JSON only."
)
JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["score", "reason"],
    "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1},
                   "reason": {"type": "string"}},
}


def _judge_model(target: str) -> Model:
    """The judge (`provider:model`), made in this process: the operator names it."""
    from jetmesh.agents.models.factory import create_model

    provider, _, name = target.partition(":")
    return create_model(provider, name or None)


def judge_purpose(rubric: str, value: Any, model: str) -> str:
    """The `purpose` a judge call is recorded under: what was judged, by whom."""
    key = hashlib.sha256(json.dumps([rubric, value, model], sort_keys=True,
                                    default=str).encode()).hexdigest()[:24]
    return f"judge:{key}"


async def judge_checks(client: Client, case: Case, task_id: str,
                       result: dict[str, Any] | None, judge: Model | None,
                       default_model: str | None) -> list[Check]:
    """Score the case's rubrics. Each judge call is recorded on the task (a ModelCalled,
    purpose `judge:<key>`), and a recorded one is reused: re-scoring makes no call."""
    from jetmesh.agents.calls import ModelCaller, parse_json_answer
    from jetmesh.agents.models.types import Message, ModelRequest

    async def record(data: ev.ModelCalledData) -> None:
        await client.ledger.append(ev.ModelCalled(subject=task_id, source="jetmesh/eval",
                                                  data=data))

    out: list[Check] = []
    if not case.checks.judge:
        return out
    recorded = {c.purpose: c for c in fold(task_id, await client.events(task_id))
                .orchestrator_calls if c.purpose.startswith("judge:")}
    for jc in case.checks.judge:
        name = f"judge {jc.rubric[:40]}"
        found, value = lookup(result, jc.path) if result is not None else (False, None)
        if not found:
            out.append(Check(name=name, ok=False, detail="no such path", value=0.0))
            continue
        target = jc.model or default_model
        model = judge if jc.model is None and judge is not None else \
            _judge_model(target) if target else None
        if model is None:
            out.append(Check(name=name, ok=False, detail="no judge model", value=0.0))
            continue
        label = target or f"{model.provider}:{model.name}"
        purpose = judge_purpose(jc.rubric, value, label)
        rec = recorded.get(purpose)
        calls = ModelCaller(record=record, agent="eval-judge", purpose=purpose,
                            recorded=[rec] if rec is not None else [])
        request = ModelRequest(system=JUDGE_SYSTEM, messages=[Message(
            role="user", content=json.dumps({"rubric": jc.rubric, "answer": value},
                                            ensure_ascii=False, default=str))],
            output_schema=JUDGE_SCHEMA, max_tokens=512)
        response = await calls.call(model, request)
        verdict, problem = parse_json_answer(response.text)
        try:
            if problem is not None:
                raise ValueError(problem)
            score = min(1.0, max(0.0, float(verdict["score"])))
            reason = str(verdict.get("reason", ""))
        except (ValueError, KeyError, TypeError) as e:
            out.append(Check(name=name, ok=False, detail=f"judge answer unreadable: {e}",
                             value=0.0))
            continue
        out.append(Check(name=name, ok=score >= 0.5, detail=reason[:200], value=score))
    return out


def tier(score: float, suite: Suite) -> Literal["pass", "soft", "fail"]:
    if score > suite.pass_above or score == 1.0:
        return "pass"
    if score < suite.fail_below:
        return "fail"
    return "soft"


# ----------------------------------------------------------------------------- running


def task_id_for(run_id: str, case: Case, n: int, suffix: str = "") -> str:
    return check_id(f"ev-{run_id}-{case.id}-{n}{suffix}"[:200], "task id")


async def _submit_once(client: Client, sub: ev.TaskSubmission) -> str:
    """Submit unless the ledger already has the task (a restarted eval run)."""
    state = await client.state(sub.task_id)
    if state.submitted is None:
        from jetmesh.orchestrator.replay import submit

        await submit(client, sub)
    return sub.task_id


async def _finish(client: Client, task_id: str, case: Case, timeout: float) -> None:
    """Wait for the task's end, answering its gated calls as the case says."""
    async def follow() -> None:
        async for entry in client.follow(task_id):
            e = entry.event
            if isinstance(e, ev.ApprovalRequested) and case.approvals is not None:
                # Bound to exactly this call (step, tool, arguments' hash), as `jetmesh
                # approve` is; the id makes a resumed run's answer the same event, and a
                # decision after another (or after the task's end) changes nothing.
                data = ev.ApprovalDecisionData(
                    step_id=e.data.step_id, tool=e.data.tool, args_hash=e.data.args_hash,
                    by="eval", reason="" if case.approvals == "approve" else
                    "denied by the eval case")
                decision: ev.Event = (
                    ev.ApprovalGranted(id=f"{e.id}-eval", subject=task_id,
                                       source="jetmesh/eval", data=data)
                    if case.approvals == "approve" else
                    ev.ApprovalDenied(id=f"{e.id}-eval", subject=task_id,
                                      source="jetmesh/eval", data=data))
                await client.ledger.append(decision)

    await asyncio.wait_for(follow(), timeout)


def _fork_step(orig: TaskState, models: dict[str, str]) -> str | None:
    """The first step (plan order) run by an agent whose model is replaced."""
    for p in orig.plan:
        st = orig.steps.get(p.id)
        if st is not None and st.agent in models:
            return p.id
    return None


async def run_case(client: Client, suite: Suite, case: Case, run_id: str, n: int, *,
                   models: dict[str, str] | None = None, timeout: float = 120.0,
                   judge: Model | None = None) -> RunResult:
    run = await _run_case(client, suite, case, run_id, n, models=models, timeout=timeout)
    if not case.checks.judge:
        return run
    state = await client.state(run.task_id)
    extra = await judge_checks(client, case, run.task_id, state.result, judge,
                               suite.judge_model)
    checks = run.checks + extra
    return run.model_copy(update={"checks": checks, "score": _score(checks)})


async def _run_case(client: Client, suite: Suite, case: Case, run_id: str, n: int, *,
                    models: dict[str, str] | None = None, timeout: float = 120.0
                    ) -> RunResult:
    sub = ev.TaskSubmission(
        task_id=task_id_for(run_id, case, n), goal=case.goal, input=case.input,
        workflow=case.target_workflow(), user_id=case.user, budget=case.budget,
        metadata={"eval_suite": suite.name, "eval_case": case.id})
    tid = await _submit_once(client, sub)
    await _finish(client, tid, case, timeout)
    entries = await client.events(tid)
    if not models:
        return score_run(case, entries)
    from jetmesh.orchestrator.replay import fork_submission

    orig = fold(tid, entries)
    step = _fork_step(orig, models)
    if step is None:  # no step of a replaced agent ran: the run is the run
        return score_run(case, entries)
    variant = hashlib.sha256(json.dumps(models, sort_keys=True).encode()).hexdigest()[:10]
    fork = fork_submission(orig, step, models=models,
                           task_id=task_id_for(run_id, case, n, f"-m{variant}"))
    fid = await _submit_once(client, fork)
    await _finish(client, fid, case, timeout)
    return score_run(case, await client.events(fid), base=entries)


async def run_suite(client: Client, suite: Suite, *, run_id: str,
                    models: dict[str, str] | None = None, runs: int | None = None,
                    concurrency: int = 8, timeout: float = 120.0,
                    judge: Model | None = None) -> list[CaseResult]:
    sem = asyncio.Semaphore(concurrency)

    async def one(case: Case, n: int) -> RunResult:
        async with sem:
            return await run_case(client, suite, case, run_id, n, models=models,
                                  timeout=timeout, judge=judge)

    plan = [(case, n) for case in suite.cases for n in range(runs or case.runs or suite.runs)]
    results = await asyncio.gather(*(one(c, n) for c, n in plan))
    out: list[CaseResult] = []
    for case in suite.cases:
        mine = [r for (c, _), r in zip(plan, results, strict=True) if c is case]
        score = statistics.median(r.score for r in mine)
        out.append(CaseResult(id=case.id, tier=tier(score, suite), score=score, runs=mine))
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summary(results: list[CaseResult]) -> dict[str, Any]:
    runs = [r for c in results for r in c.runs]
    tiers = {t: sum(c.tier == t for c in results) for t in ("pass", "soft", "fail")}
    tool_checks = [k for r in runs for k in r.checks if k.name.startswith(("calls", "never"))]
    cost = sum(r.cost_usd for r in runs)
    lat = [r.latency_s for r in runs]
    return {
        "cases": len(results), **tiers,
        "pass_rate": tiers["pass"] / len(results) if results else 0.0,
        "tool_accuracy": (sum(k.ok for k in tool_checks) / len(tool_checks)
                          if tool_checks else 1.0),
        "cost_usd": cost,
        "cost_per_case": cost / len(results) if results else 0.0,
        "cost_per_pass": cost / tiers["pass"] if tiers["pass"] else None,
        "tokens": sum(r.tokens for r in runs),
        "latency_p50_s": _pct(lat, 0.5), "latency_p95_s": _pct(lat, 0.95),
    }


def report(suite: Suite, run_id: str, models: dict[str, str] | None,
           results: list[CaseResult]) -> dict[str, Any]:
    return {"suite": suite.name, "run_id": run_id, "models": models or {},
            "summary": summary(results), "cases": [c.model_dump() for c in results]}


def markdown(rep: dict[str, Any]) -> str:
    s = rep["summary"]
    lines = [f"# Eval {rep['suite']} ({rep['run_id']})", "",
             f"models: {json.dumps(rep['models'])}", "",
             f"pass {s['pass']} · soft {s['soft']} · fail {s['fail']} of {s['cases']} · "
             f"tool accuracy {s['tool_accuracy']:.0%} · ${s['cost_usd']:.5f} · "
             f"p50 {s['latency_p50_s']:.2f}s · p95 {s['latency_p95_s']:.2f}s", "",
             "| case | tier | score | cost | tokens | failed checks |",
             "|---|---|---|---|---|---|"]
    for c in rep["cases"]:
        failed = sorted({k["name"] for r in c["runs"] for k in r["checks"] if not k["ok"]})
        cost = sum(r["cost_usd"] for r in c["runs"]) / max(1, len(c["runs"]))
        tokens = sum(r["tokens"] for r in c["runs"]) // max(1, len(c["runs"]))
        lines.append(f"| {c['id']} | {c['tier']} | {c['score']:.2f} | ${cost:.5f} | {tokens} "
                     f"| {'; '.join(failed)} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- from the ledger


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """`24h`, `30m`, `7d`, `90s` ago, or an ISO time (ValueError otherwise)."""
    now = now or datetime.now(UTC)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", value.strip())
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return now - timedelta(seconds=float(m.group(1)) * unit)
    t = datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _sampled(task_id: str, fraction: float) -> bool:
    """A stable sample: the same tasks for the same fraction, run after run."""
    digest = hashlib.sha256(task_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def case_from_task(state: TaskState, entries: list[LedgerEntry]) -> Case:
    """A case that expects what the recorded task did: its status, the tools that ran
    (exactly, in order) and its result."""
    sub = state.submitted
    assert sub is not None
    ran = [t for _, _, t in _tools_ran(entries, state)]
    checks = Checks(status=state.status.value,
                    tools=ToolChecks(must_call=ran, order="exact"),
                    result=[ResultCheck(path="", equals=state.result)]
                    if state.result is not None else [])
    return Case(id=f"t-{state.task_id}"[:120], description=f"recorded task {state.task_id}",
                goal=sub.goal, workflow=sub.workflow, input=sub.input, user=sub.user_id,
                budget=sub.budget, checks=checks)


async def suite_from_ledger(client: Client, *, since: datetime, sample: float = 1.0,
                            workflow: str | None = None, name: str = "recorded",
                            limit: int = 1000) -> Suite:
    """Finished tasks submitted since `since` (not replays, forks or eval runs), a stable
    `sample` of them, as a suite whose references are their recorded outcomes."""
    raw = await client.ledger.read_raw(subjects.ALL_TASK_EVENTS)
    chosen: list[str] = []
    for _, subject, data in raw:
        try:
            event = ev.decode_event(data)
        except ValueError:
            continue
        if not isinstance(event, ev.TaskSubmitted) or event.time < since:
            continue
        d = event.data
        if d.replay_of is not None or "eval_case" in d.metadata:
            continue
        if workflow is not None and d.workflow != workflow:
            continue
        tid = subjects.task_id_of(subject)
        if tid is not None and _sampled(tid, sample):
            chosen.append(tid)
    cases: list[Case] = []
    for tid in chosen[:limit]:
        entries = await client.events(tid)
        state = fold(tid, entries)
        if state.terminal and state.status.value != "rejected":
            cases.append(case_from_task(state, entries))
    return Suite(name=name, description=f"{len(cases)} recorded tasks since "
                                        f"{since.isoformat()}", runs=1, cases=cases)


def suite_yaml(suite: Suite) -> str:
    return yaml.safe_dump(suite.model_dump(mode="json", by_alias=True, exclude_defaults=True),
                          sort_keys=False, allow_unicode=True)


def compare_reports(base: dict[str, Any], new: dict[str, Any], threshold: float = 0.0
                    ) -> list[str]:
    """Regressions of `new` against `base` (empty: none): a pass rate lower by more than
    `threshold`, or a case whose tier got worse."""
    out: list[str] = []
    b, n = base["summary"]["pass_rate"], new["summary"]["pass_rate"]
    if n < b - threshold:
        out.append(f"pass rate {b:.0%} -> {n:.0%}")
    rank = {"fail": 0, "soft": 1, "pass": 2}
    old = {c["id"]: c["tier"] for c in base["cases"]}
    for c in new["cases"]:
        was = old.get(c["id"])
        if was is not None and rank[c["tier"]] < rank[was]:
            out.append(f"case {c['id']}: {was} -> {c['tier']}")
    return out
