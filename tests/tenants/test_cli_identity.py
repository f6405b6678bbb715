"""The CLI names who ran it on the ledger (`cli:<login>`): submissions (with --tenant)
and cancels."""

from __future__ import annotations

import asyncio
import re

from typer.testing import CliRunner

from jetmesh.bus import events as ev
from jetmesh.bus.events import PlanStep
from jetmesh.orchestrator.workflows import Workflow


async def test_cli_submit_and_cancel_carry_the_identity(make_mesh) -> None:
    from jetmesh.orchestrator.cli import app

    mesh = await make_mesh([])
    skill = "unserved_" + ev.new_id()[:8]  # no agent: the task stays open
    mesh.orchestrator.workflows.add(Workflow(name="cli-wait", steps=[
        PlanStep(id="a", skill=skill)]))
    runner = CliRunner()
    out = await asyncio.to_thread(runner.invoke, app, [
        "submit", "wait", "--workflow", "cli-wait", "--tenant", "t-cli", "--user", "u1",
        "--url", mesh.url])
    assert out.exit_code == 0, out.output
    found = re.search(r"task (\S+) submitted", out.stdout)
    assert found is not None, out.stdout
    tid = found.group(1)

    async def dispatched() -> None:
        async for entry in mesh.client.follow(tid):
            if isinstance(entry.event, ev.StepDispatched):
                return
    await asyncio.wait_for(dispatched(), 20)
    out = await asyncio.to_thread(runner.invoke, app, ["cancel", tid, "--url", mesh.url])
    assert out.exit_code == 0, out.output
    state = await mesh.client.result(tid, timeout=20)
    assert state.status.value == "canceled"
    entries = await mesh.client.events(tid)
    (sub,) = [e.event for e in entries if isinstance(e.event, ev.TaskSubmitted)]
    (cancel,) = [e.event for e in entries if isinstance(e.event, ev.CancelRequested)]
    assert sub.data.tenant == "t-cli" and sub.data.user_id == "u1"
    assert sub.data.submitted_by is not None and sub.data.submitted_by.startswith("cli:")
    assert cancel.data.by == sub.data.submitted_by
