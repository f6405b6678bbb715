"""`--max-usd` against what a task really costs: at twice its cost it completes (the
per-step slices do not refuse a call for its upper-bound estimate), at half it fails
`budget_exceeded` without ever spending past the cap."""

from __future__ import annotations

from jetmesh.bus import events as ev
from jetmesh.orchestrator.state import TaskStatus

GOAL = "where is my order?"
INPUT = {"order_id": "A1001"}
AGENTS = ["triage", "support", "writer", "reviewer"]


async def test_twice_the_real_cost_completes_and_half_fails_without_overrun(make_mesh) -> None:
    mesh = await make_mesh(AGENTS)
    free = await mesh.client.result(
        await mesh.client.submit(GOAL, workflow="support", input=INPUT), timeout=60)
    assert free.status is TaskStatus.COMPLETED, free.reason
    cost = free.cost_usd
    assert cost > 0 and free.model_calls >= 4

    roomy = await mesh.client.result(await mesh.client.submit(
        GOAL, workflow="support", input=INPUT, budget=ev.Budget(max_usd=2 * cost)),
        timeout=60)
    assert roomy.status is TaskStatus.COMPLETED, roomy.reason
    assert roomy.cost_usd <= 2 * cost

    tight = await mesh.client.result(await mesh.client.submit(
        GOAL, workflow="support", input=INPUT, budget=ev.Budget(max_usd=cost / 2)),
        timeout=60)
    assert tight.status is TaskStatus.FAILED
    assert any(st.code == "budget_exceeded" for st in tight.steps.values()), tight.steps
    assert tight.cost_usd <= cost / 2  # it ran what fitted, and never overran


async def test_three_concurrent_steps_fit_in_twice_their_real_cost(make_mesh) -> None:
    """Each step's slice is a third of the budget; every step completes."""
    mesh = await make_mesh(["support"])
    orders = {"order_ids": ["A1001", "A1002", "A1003"]}
    free = await mesh.client.result(
        await mesh.client.submit("orders", workflow="fanout", input=orders), timeout=60)
    assert free.status is TaskStatus.COMPLETED, free.reason
    roomy = await mesh.client.result(await mesh.client.submit(
        "orders", workflow="fanout", input=orders, budget=ev.Budget(max_usd=2 * free.cost_usd)),
        timeout=60)
    assert roomy.status is TaskStatus.COMPLETED, roomy.reason
    assert roomy.cost_usd <= 2 * free.cost_usd
