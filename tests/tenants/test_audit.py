"""`jetmesh audit`: a refund task approved by a human, checked field by field against
the ledger (request, plan, model calls, tool calls, policy, approval, memory, outcome)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from jetmesh.agents.builtin.support import issue_refund, refunds_file
from jetmesh.agents.models.sim import FunctionModel, tool_call
from jetmesh.agents.models.types import ModelRequest
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.bus import events as ev
from jetmesh.bus.connection import connect
from jetmesh.bus.events import PlanStep
from jetmesh.memory import MemorySettings, MemoryStore
from jetmesh.memory.client import MemoryClient
from jetmesh.memory.service import MemoryService
from jetmesh.memory.tools import make_memory_tools
from jetmesh.orchestrator.audit import AuditReport, build_audit, render_markdown
from jetmesh.orchestrator.workflows import Workflow


def refund_agent(request: ModelRequest) -> Any:
    """Recall, refund $230 (gated), remember, answer."""
    done = [m for m in request.messages if m.role == "tool"]
    if len(done) == 0:
        return tool_call("recall", query="refund for a damaged order", scope="user")
    if len(done) == 1:
        return tool_call("issue_refund", order_id="A1029", amount_usd=230,
                         reason="arrived damaged")
    if len(done) == 2:
        return tool_call("remember", text="A1029 was refunded $230 for damage.")
    return "Refunded $230 on A1029."


@pytest.fixture
async def memory(bus, tmp_path: Path):  # type: ignore[no-untyped-def]
    store = await MemoryStore.open(MemorySettings(data_dir=tmp_path / "mem",
                                                  embedder="hash", hash_dims=256))
    service = MemoryService(bus.nc, bus.js, store, episodes=False)
    await service.start()
    nc = await connect(bus.url)
    yield store, MemoryClient(nc)
    await nc.close()
    await service.stop()
    await store.close()


async def test_audit_of_an_approved_refund_matches_the_ledger(
        make_mesh, memory, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JETMESH_DATA_DIR", str(tmp_path))
    store, client = memory
    earlier = await store.add_note("Damaged orders get a full refund.", user_id="u-ann",
                                   agent_id="auditee", task_id="t-earlier", step_id="s9")
    spec = AgentSpec(
        name="auditee", description="Refunds with memory.", instructions="Help.",
        tools=[issue_refund, *make_memory_tools(client)],
        skills=[SkillSpec(id="refund_help", name="Refund", description="Refunds.")])
    mesh = await make_mesh([spec], worker_model=FunctionModel(refund_agent, name="refunder"))
    mesh.orchestrator.workflows.add(Workflow(name="refund-audit", steps=[
        PlanStep(id="only", skill="refund_help", input={"question": {"$ref": "task.goal"}})]))
    tid = await mesh.client.submit("refund A1029, it arrived damaged",
                                   workflow="refund-audit", user_id="u-ann")

    async def asked() -> ev.ApprovalRequested:
        async for entry in mesh.client.follow(tid):
            if isinstance(entry.event, ev.ApprovalRequested):
                return entry.event
        raise AssertionError("no approval requested")
    request = await asyncio.wait_for(asked(), 30)
    await mesh.client.approve(tid, by="approver:alice")
    state = await mesh.client.result(tid, timeout=30)
    assert state.status.value == "completed"
    entries = await mesh.client.ledger.read(tid)
    report = build_audit(tid, entries)

    def only(kind: type) -> list[Any]:
        return [e for e in entries if isinstance(e.event, kind)]

    # What was asked, by whom.
    (sub,) = only(ev.TaskSubmitted)
    assert report.request is not None and report.request.seq == sub.seq
    assert (report.request.goal, report.request.user_id, report.request.workflow) == (
        sub.event.data.goal, "u-ann", "refund-audit")
    # The plan.
    (plan,) = only(ev.TaskPlanned)
    assert report.plan is not None and report.plan.seq == plan.seq
    assert report.plan.steps == plan.event.data.steps and report.plan.planner == \
        "workflow:refund-audit"
    # Every model call: model, tokens, cost.
    models = only(ev.ModelCalled)
    assert len(models) == 4 and len(report.model_calls) == 4
    for rec, e in zip(report.model_calls, models, strict=True):
        d = e.event.data
        assert (rec.seq, rec.model, rec.provider, rec.input_tokens, rec.output_tokens,
                rec.cost_usd, rec.step_id) == (e.seq, "refunder", d.provider, d.input_tokens,
                                               d.output_tokens, d.cost_usd, "only")
    assert report.totals.cost_usd == pytest.approx(sum(e.event.data.cost_usd for e in models))
    assert report.totals.input_tokens == sum(e.event.data.input_tokens for e in models)
    # Every tool call with arguments and results.
    tools = only(ev.ToolCalled)
    assert [t.tool for t in report.tool_calls] == ["recall", "issue_refund", "remember"]
    for rec, e in zip(report.tool_calls, tools, strict=True):
        d = e.event.data
        assert (rec.seq, rec.arguments, rec.output, rec.error, rec.side_effects) == (
            e.seq, d.arguments, d.output, d.error, d.side_effects)
    refund = report.tool_calls[1]
    assert refund.arguments == {"order_id": "A1029", "amount_usd": 230,
                                "reason": "arrived damaged"}
    assert refund.error is None and refund.output["refund_id"]
    assert len(refunds_file().read_text().splitlines()) == 1  # it ran, once
    # Policy decisions and the approval, with the approver.
    decisions = only(ev.PolicyDecided)
    assert [(p.seq, p.tool, p.decision, p.rule) for p in report.policy_decisions] == [
        (e.seq, e.event.data.tool, e.event.data.decision, e.event.data.rule)
        for e in decisions]
    assert ("issue_refund", "approve") in {(p.tool, p.decision)
                                           for p in report.policy_decisions}
    (granted,) = only(ev.ApprovalGranted)
    (approval,) = report.approvals
    assert approval.seq == only(ev.ApprovalRequested)[0].seq
    assert (approval.decision, approval.by, approval.decided_seq, approval.args_hash,
            approval.arguments) == ("granted", "approver:alice", granted.seq,
                                    request.data.args_hash, request.data.arguments)
    # Memories read and written, with provenance.
    read, wrote = report.memory
    assert read.op == "read" and read.seq == tools[0].seq
    assert [(m.id, m.task_id, m.step_id) for m in read.memories] == [
        (earlier.id, "t-earlier", "s9")]
    assert wrote.op == "write" and wrote.seq == tools[2].seq
    assert [(m.id, m.task_id, m.step_id) for m in wrote.memories] == [
        (tools[2].event.data.output["id"], tid, "only")]
    # The outcome.
    (end,) = only(ev.TaskCompleted)
    assert report.outcome is not None and (report.outcome.status, report.outcome.seq,
                                           report.outcome.result) == (
        "completed", end.seq, end.event.data.result)
    assert [(s.step_id, s.status, s.agent) for s in report.steps] == [
        ("only", "completed", "auditee")]
    # The CLI gives the same report (JSON) and a Markdown rendering of it.
    from jetmesh.orchestrator.cli import app

    runner = CliRunner()
    out = await asyncio.to_thread(runner.invoke, app, ["audit", tid, "--format", "json",
                                                       "--url", mesh.url])
    assert out.exit_code == 0, out.output
    assert AuditReport.model_validate_json(out.stdout) == report
    md = await asyncio.to_thread(runner.invoke, app, ["audit", tid, "--url", mesh.url])
    assert md.exit_code == 0 and md.stdout == render_markdown(report)
    assert "approver:alice" in md.stdout and "| granted |" in md.stdout
    missing = await asyncio.to_thread(runner.invoke, app, ["audit", "no-such-task",
                                                           "--url", mesh.url])
    assert missing.exit_code == 1
    json.loads(out.stdout)  # plain JSON for other tools
