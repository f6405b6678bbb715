"""The test harness users get (jetmesh.orchestrator.testing): a mesh in memory, and one on
a nats-server of its own."""

from __future__ import annotations

import pytest

from jetmesh.agents.builtin import get_agent
from jetmesh.bus import events as ev
from jetmesh.orchestrator.state import StepStatus, TaskStatus
from jetmesh.orchestrator.testing import memory_mesh, mesh
from jetmesh.orchestrator.workflows import Workflow

CHAIN = Workflow(name="chain", steps=[
    ev.PlanStep(id="look", skill="lookup_order", input={"order_id": {"$ref": "task.input.id"}}),
    ev.PlanStep(id="again", skill="lookup_order", depends_on=["look"],
                input={"order_id": {"$ref": "steps.look.output.order_id"}})])


async def test_a_task_runs_on_in_memory_ports_with_no_server() -> None:
    m = memory_mesh([get_agent("orders")], workflows=[CHAIN])
    state = await m.submit("twice", workflow="chain", input={"id": "A1001"})
    tid = state.task_id
    assert state.steps["look"].status is StepStatus.DISPATCHED
    assert state.steps["again"].status is StepStatus.PENDING
    [first] = m.commands(tid)
    assert (first.step_id, first.input) == ("look", {"order_id": "A1001"})
    state = await m.complete(tid, "look", {"order_id": "A1002"})
    assert [c.step_id for c in m.commands(tid)] == ["look", "again"]
    assert m.commands(tid)[1].input == {"order_id": "A1002"}  # resolved from the output
    await m.complete(tid, "again", {"order_id": "A1002", "status": "shipped"})
    final = await m.state(tid)
    assert final.status is TaskStatus.COMPLETED
    assert final.result == {"steps": {"look": {"order_id": "A1002"},
                                      "again": {"order_id": "A1002", "status": "shipped"}},
                            "output": {"order_id": "A1002", "status": "shipped"}}


async def test_in_memory_a_retryable_failure_is_dispatched_again_then_fails_the_task() -> None:
    once = Workflow(name="once", steps=[ev.PlanStep(id="s", skill="lookup_order", retries=1,
                                                    input={"order_id": "A1001"})])
    m = memory_mesh([get_agent("orders")], workflows=[once])
    tid = (await m.submit("x", workflow="once")).task_id
    await m.fail(tid, "s", "flaky", retryable=True)
    assert [c.attempt for c in m.commands(tid)] == [1, 2]
    await m.fail(tid, "s", "flaky", retryable=True)
    final = await m.state(tid)
    assert final.status is TaskStatus.FAILED and final.code == "step_failed"


@pytest.mark.timeout(60)
async def test_a_mesh_on_an_embedded_server_of_its_own_runs_a_task() -> None:
    async with mesh(["orders"]) as m:
        tid = await m.submit("where is it?", workflow="skill:lookup_order",
                             input={"order_id": "A1001"})
        state = await m.result(tid, timeout=30)
    assert state.status is TaskStatus.COMPLETED, (state.code, state.reason)
    assert state.result is not None and state.result["output"]["order_id"] == "A1001"
