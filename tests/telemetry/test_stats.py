"""`jetmesh stats` from the telemetry role's KV projection: every figure equals a count
made independently from the ledger."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path

import pytest

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.orchestrator.stats import aggregate, read_summaries

ORDERS = ["A1001", "A1002", "A1003"]


async def test_stats_over_a_known_mix_match_the_ledger(make_mesh, telemetry, bus, tmp_path
                                                       ) -> None:
    mesh = await make_mesh(["support"])
    run = uuid.uuid4().hex[:6]
    completed = [await mesh.client.submit("orders", workflow="fanout", task_id=f"ok-{run}-{i}",
                                          input={"order_ids": ORDERS}) for i in range(6)]
    refused = [await mesh.client.submit("orders", workflow="fanout", task_id=f"bu-{run}-{i}",
                                        input={"order_ids": ORDERS},
                                        budget=ev.Budget(max_usd=1e-9)) for i in range(3)]
    rejected = [await mesh.client.submit("x", workflow="no-such-workflow",
                                         task_id=f"rj-{run}-{i}") for i in range(2)]
    ids = completed + refused + rejected
    for t in ids:
        await mesh.client.result(t, timeout=30)

    # Independently, from the ledger: outcomes, cost, tokens, tool calls, refusals.
    outcome: dict[str, int] = {}
    reasons: dict[str, int] = {}
    cost = 0.0
    tokens = tools = refusals = 0
    for t in ids:
        entries = await mesh.client.events(t)
        end = next(e.event for e in entries if isinstance(e.event, ev.TERMINAL_TASK_EVENTS))
        kind = end.type.split(".")[2]
        outcome[kind] = outcome.get(kind, 0) + 1
        if isinstance(end, ev.TaskFailed):
            reasons[end.data.code] = reasons.get(end.data.code, 0) + 1
        elif isinstance(end, ev.TaskRejected):
            reasons["rejected"] = reasons.get("rejected", 0) + 1
        for e in entries:
            if isinstance(e.event, ev.ModelCalled):
                cost += e.event.data.cost_usd
                tokens += e.event.data.input_tokens + e.event.data.output_tokens
            tools += isinstance(e.event, ev.ToolCalled)
            refusals += isinstance(e.event, ev.BudgetExceeded)
    assert outcome.get("completed") == 6 and outcome.get("rejected") == 2
    assert outcome.get("failed") == 3 and refusals >= 3

    mine = set(ids)
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        records = [r for r in await read_summaries(bus.js) if r["task_id"] in mine]
        if len(records) == len(ids):
            break
        assert asyncio.get_running_loop().time() < deadline, len(records)
        await asyncio.sleep(0.1)
    figs = aggregate(records, by="workflow")
    a = figs["all"]
    assert a["tasks"] == len(ids)
    assert a["by_outcome"] == outcome
    assert a["completion_rate"] == pytest.approx(6 / len(ids))
    assert a["cost_usd"] == pytest.approx(cost)
    assert a["cost_per_completed_task"] == pytest.approx(cost / 6)
    assert a["tokens_per_task"] == pytest.approx(tokens / len(ids))
    assert a["tool_calls_per_task"] == pytest.approx(tools / len(ids))
    assert a["budget_refusals"] == refusals
    assert a["failure_reasons"] == reasons and sum(reasons.values()) == 5, reasons
    assert figs["by_workflow"]["fanout"]["tasks"] == 9
    assert figs["by_workflow"]["no-such-workflow"]["tasks"] == 2
    by_agent = aggregate(records, by="agent")["by_agent"]
    assert by_agent["support"]["tool_calls"] == tools

    # The CLI answers from the projection (JSON).
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "jetmesh"), "stats", "--json", "--since", "1h",
        "--url", bus.url, "--data-dir", str(tmp_path), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    out, errs = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, errs.decode()
    cli = json.loads(out)
    assert cli["all"]["tasks"] >= len(ids)  # the bucket also holds other tests' tasks
    assert subjects.BUCKET_STATS == "jm-stats"


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
