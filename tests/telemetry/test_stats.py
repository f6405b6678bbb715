"""`jetmesh stats` from the telemetry role's KV projection: every figure equals a count
made independently from the ledger."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path

import pytest
from mesh_fixtures import wait_live
from pydantic import BaseModel

from jetmesh.agents.builtin.support import issue_refund
from jetmesh.agents.models.sim import FunctionModel, tool_call
from jetmesh.agents.models.types import ModelRequest, ToolCall
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.agents.worker import Worker
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.events import PlanStep
from jetmesh.orchestrator.stats import aggregate, read_summaries
from jetmesh.orchestrator.workflows import Workflow

ORDERS = ["A1001", "A1002", "A1003"]


def test_task_summary_counts_approvals_and_their_wait() -> None:
    from datetime import UTC, datetime, timedelta

    from jetmesh.bus.ledger import LedgerEntry, subject_for
    from jetmesh.orchestrator.stats import task_summary

    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def at(s: float) -> datetime:
        return t0 + timedelta(seconds=s)

    def task(tid: str, granted: bool) -> list[LedgerEntry]:
        decision = ev.ApprovalGranted if granted else ev.ApprovalDenied
        events: list[ev.Event] = [
            ev.TaskSubmitted(subject=tid, time=at(0), data=ev.TaskSubmittedData(workflow="w")),
            ev.TaskPlanned(subject=tid, time=at(0), data=ev.TaskPlannedData(
                planner="workflow:w", steps=[ev.PlanStep(id="s", skill="k")])),
            ev.StepDispatched(subject=tid, time=at(0), data=ev.StepDispatchedData(
                step_id="s", skill="k", input={})),
            ev.ApprovalRequested(subject=tid, time=at(1), data=ev.ApprovalRequestedData(
                step_id="s", agent="a", tool="refund", arguments={}, args_hash="h",
                reason="over $200", risk="write", expires_at=at(100))),
            decision(subject=tid, time=at(4), data=ev.ApprovalDecisionData(
                step_id="s", tool="refund", args_hash="h")),
            ev.TaskCompleted(subject=tid, time=at(5), data=ev.TaskCompletedData(result={}))
            if granted else ev.TaskFailed(subject=tid, time=at(5), data=ev.TaskFailedData(
                code="denied", reason="refund denied")),
        ]
        return [LedgerEntry(i + 1, subject_for(e), e) for i, e in enumerate(events)]

    ok = task_summary("a1", task("a1", True))
    no = task_summary("d1", task("d1", False))
    assert ok is not None and no is not None
    assert ok["approvals"] == {"requested": 1, "granted": 1, "denied": 0}
    assert no["approvals"] == {"requested": 1, "granted": 0, "denied": 1}
    assert ok["approval_wait_s"] == 3.0 and ok["duration_s"] == 5.0
    figs = aggregate([ok, no])["all"]
    assert figs["escalation_rate"] == 1.0
    assert figs["approvals"] == {"requested": 2, "granted": 1, "denied": 1}
    assert figs["by_outcome"] == {"completed": 1, "failed": 1}
    assert figs["failure_reasons"] == {"denied": 1}
    assert task_summary("a1", task("a1", True)[:-1]) is None  # not finished


# ------------------------------------------------------- a known mix, approvals included

def _mix(n: int) -> dict[str, int]:
    """How many tasks of each kind make `n`: completed, budget-refused, deadline-failed,
    approved, denied and rejected."""
    kinds = {"ok": 0.35, "budget": 0.15, "deadline": 0.1, "approve": 0.15, "deny": 0.15}
    counts = {k: max(1, int(n * share)) for k, share in kinds.items()}
    counts["reject"] = max(1, n - sum(counts.values()))
    return counts


class Ask(BaseModel):
    question: str


REFUNDER = AgentSpec(
    name="refunder-stats", description="Refunds what it is asked to.", instructions="Refund.",
    tools=[issue_refund],
    skills=[SkillSpec.from_models("refund-stats", "Refund", "Refunds.", input_model=Ask)])


def refunds_230(request: ModelRequest) -> list[ToolCall] | str:
    """Asks for a $230 refund (over the approval threshold), then reports the outcome."""
    told = [m for m in request.messages if m.role == "tool"]
    if not told:
        return [tool_call("issue_refund", order_id="A1029", amount_usd=230, reason="asked")]
    return "done: " + told[-1].content[:200]


async def _stats_over_a_mix(make_mesh, bus, n: int, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mesh = await make_mesh(["support"])
    wnc = await connect(bus.url)
    gated = Worker(REFUNDER, FunctionModel(refunds_230), wnc, jetstream(wnc),
                   replica="refunder-stats")
    await gated.start()
    mesh.workers.append(gated)
    await wait_live(bus.js, {REFUNDER.name})
    mesh.orchestrator.workflows.add(Workflow(name="assist-stats", steps=[PlanStep(
        id="only", skill="refund-stats", input={"question": {"$ref": "task.goal"}})]))
    run = uuid.uuid4().hex[:6]
    mix = _mix(n)
    ids: dict[str, list[str]] = {k: [] for k in mix}
    fan = {"workflow": "fanout", "input": {"order_ids": ORDERS}}
    for kind, count in mix.items():
        for i in range(count):
            tid = f"{kind}-{run}-{i}"
            if kind == "ok":  # of two tenants, alternately
                await mesh.client.submit("orders", task_id=tid, tenant=f"t{i % 2}-{run}",
                                         **fan)
            elif kind == "budget":
                await mesh.client.submit("orders", task_id=tid, budget=ev.Budget(max_usd=1e-9),
                                         **fan)
            elif kind == "deadline":  # ends long before a fan-out could (no approval)
                await mesh.client.submit("orders", task_id=tid,
                                         budget=ev.Budget(deadline_s=0.001), **fan)
            elif kind in ("approve", "deny"):
                await mesh.client.submit("refund please", task_id=tid, workflow="assist-stats")
            else:
                await mesh.client.submit("x", task_id=tid, workflow="no-such-workflow")
            ids[kind].append(tid)

    async def answer(tid: str, grant: bool) -> None:
        async for entry in mesh.client.follow(tid):
            if isinstance(entry.event, ev.ApprovalRequested):
                if grant:
                    await mesh.client.approve(tid, by="stats-test")
                else:
                    await mesh.client.deny(tid, by="stats-test", reason="no")
                return
        raise AssertionError(f"{tid} never asked for approval")

    await asyncio.wait_for(asyncio.gather(
        *(answer(t, True) for t in ids["approve"]),
        *(answer(t, False) for t in ids["deny"])), 120)
    every = [t for group in ids.values() for t in group]
    for t in every:
        await mesh.client.result(t, timeout=60)

    # Independently, from the ledger.
    outcome: dict[str, int] = {}
    reasons: dict[str, int] = {}
    approvals = {"requested": 0, "granted": 0, "denied": 0}
    cost = 0.0
    tokens = tools = refusals = escalated = 0
    by_skill: dict[str, dict[str, float]] = {}
    for t in every:
        entries = await mesh.client.events(t)
        plan = next((e.event.data.steps for e in entries
                     if isinstance(e.event, ev.TaskPlanned)), [])
        skill_of = {p.id: p.skill for p in plan}
        used: set[str] = set()
        for e in entries:  # a step's calls count for its skill; plan and merge for none
            if isinstance(e.event, ev.ModelCalled | ev.ToolCalled) \
                    and e.event.data.step_id in skill_of:
                skill = skill_of[e.event.data.step_id]
                g = by_skill.setdefault(skill, {"tasks": 0, "model_calls": 0,
                                                "tool_calls": 0, "cost_usd": 0.0})
                used.add(skill)
                if isinstance(e.event, ev.ModelCalled):
                    g["model_calls"] += 1
                    g["cost_usd"] += e.event.data.cost_usd
                else:
                    g["tool_calls"] += 1
        for skill in used:
            by_skill[skill]["tasks"] += 1
        end = next(e.event for e in entries if isinstance(e.event, ev.TERMINAL_TASK_EVENTS))
        kind = end.type.split(".")[2]
        outcome[kind] = outcome.get(kind, 0) + 1
        if isinstance(end, ev.TaskFailed):
            reasons[end.data.code] = reasons.get(end.data.code, 0) + 1
        elif isinstance(end, ev.TaskRejected):
            reasons["rejected"] = reasons.get("rejected", 0) + 1
        asked = 0
        for e in entries:
            if isinstance(e.event, ev.ModelCalled):
                cost += e.event.data.cost_usd
                tokens += e.event.data.input_tokens + e.event.data.output_tokens
            tools += isinstance(e.event, ev.ToolCalled)
            refusals += isinstance(e.event, ev.BudgetExceeded)
            asked += isinstance(e.event, ev.ApprovalRequested)
            approvals["granted"] += isinstance(e.event, ev.ApprovalGranted)
            approvals["denied"] += isinstance(e.event, ev.ApprovalDenied)
        approvals["requested"] += asked
        escalated += asked > 0
    # The mix is what was asked for: denied refunds are told to the model, which answers.
    assert approvals == {"requested": mix["approve"] + mix["deny"],
                         "granted": mix["approve"], "denied": mix["deny"]}
    assert outcome.get("completed") == mix["ok"] + mix["approve"] + mix["deny"], outcome
    assert outcome.get("rejected") == mix["reject"]
    assert outcome.get("failed") == mix["budget"] + mix["deadline"], reasons
    assert refusals >= mix["budget"]

    mine = set(every)
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        records = [r for r in await read_summaries(bus.js) if r["task_id"] in mine]
        if len(records) == len(every):
            break
        assert asyncio.get_running_loop().time() < deadline, len(records)
        await asyncio.sleep(0.1)
    a = aggregate(records)["all"]
    assert a["tasks"] == len(every)
    assert a["by_outcome"] == outcome
    assert a["completion_rate"] == pytest.approx(outcome["completed"] / len(every))
    assert a["cost_usd"] == pytest.approx(cost)
    assert a["cost_per_completed_task"] == pytest.approx(cost / outcome["completed"])
    assert a["tokens_per_task"] == pytest.approx(tokens / len(every))
    assert a["tool_calls_per_task"] == pytest.approx(tools / len(every))
    assert a["budget_refusals"] == refusals
    assert a["approvals"] == approvals
    assert a["escalation_rate"] == pytest.approx(escalated / len(every))
    assert a["approval_wait_s"] > 0
    assert a["failure_reasons"] == reasons, reasons
    by_wf = aggregate(records, by="workflow")["by_workflow"]
    assert by_wf["assist-stats"]["approvals"] == approvals
    assert by_wf["fanout"]["tasks"] == mix["ok"] + mix["budget"] + mix["deadline"]
    assert by_wf["no-such-workflow"]["tasks"] == mix["reject"]
    by_tenant = aggregate(records, by="tenant")["by_tenant"]
    assert {k: v["tasks"] for k, v in by_tenant.items()} == {
        f"t0-{run}": (mix["ok"] + 1) // 2, f"t1-{run}": mix["ok"] // 2,
        "(none)": len(every) - mix["ok"]}
    assert by_tenant[f"t0-{run}"]["by_outcome"] == {"completed": (mix["ok"] + 1) // 2}
    by_agent = aggregate(records, by="agent")["by_agent"]
    assert by_agent["support"]["tool_calls"] + by_agent[REFUNDER.name]["tool_calls"] == tools
    got_skill = aggregate(records, by="skill")["by_skill"]
    assert set(got_skill) == set(by_skill) and len(by_skill) >= 2, (got_skill, by_skill)
    for skill, want in by_skill.items():
        g = got_skill[skill]
        assert (g["tasks"], g["model_calls"], g["tool_calls"]) == (
            want["tasks"], want["model_calls"], want["tool_calls"]), skill
        assert g["cost_usd"] == pytest.approx(want["cost_usd"])

    # The CLI answers from the projection (JSON).
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "jetmesh"), "stats", "--json", "--since", "1h",
        "--by", "tenant", "--url", bus.url, "--data-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    out, errs = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, errs.decode()
    cli = json.loads(out)
    assert cli["all"]["tasks"] >= len(every)  # the bucket also holds other tests' tasks
    assert cli["by_tenant"][f"t1-{run}"]["tasks"] == mix["ok"] // 2
    assert subjects.BUCKET_STATS == "jm-stats"


async def test_stats_over_200_tasks_with_approvals_and_denials(make_mesh, telemetry, bus,
                                                               monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("JETMESH_DATA_DIR", str(tmp_path))  # where the refunds land
    await _stats_over_a_mix(make_mesh, bus, 200, tmp_path)
