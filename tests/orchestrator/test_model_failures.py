"""A planner or merger call that fails ends the task with the reason, not a task that
stays unplanned (its submission retried until dead-lettered, then nothing); a bus error
on the way is retried, nothing decided on it."""

from __future__ import annotations

import json

import pytest
from nats.errors import TimeoutError as NatsTimeoutError

from jetmesh.agents.builtin import get_agent
from jetmesh.agents.models.errors import ModelAuthError, ModelRateLimited
from jetmesh.agents.models.sim import SimModel
from jetmesh.agents.models.types import ModelRequest, ModelResponse
from jetmesh.bus import events as ev
from jetmesh.orchestrator.state import TaskStatus
from jetmesh.orchestrator.testing import memory_mesh


class FailsAfter:
    """The simulated model for the first `ok` calls, then `error` on every call."""

    provider, name = "sim", "fails-after"

    def __init__(self, ok: int, error: BaseException) -> None:
        self.ok, self.error, self.calls = ok, error, 0
        self.sim = SimModel()

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.calls += 1
        if self.calls > self.ok:
            raise self.error
        return await self.sim.complete(request)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize(("error", "code", "says"), [
    (ModelRateLimited("sim", "m", "429 slow down"), "model_unavailable", "429 slow down"),
    (ModelAuthError("sim", "m", "bad key"), "model_error", "bad key"),
    (RuntimeError("adapter bug"), "plan_failed", "internal error RuntimeError: adapter bug"),
])
async def test_a_failing_planner_call_fails_the_task_with_its_reason(error, code, says) -> None:
    m = memory_mesh([get_agent("orders")], planner=FailsAfter(0, error))
    state = await m.submit("where is order A1001?")
    assert state.status is TaskStatus.FAILED, state.status
    assert (state.code, state.reason.startswith("planning: ")) == (code, True)
    assert says in state.reason
    assert m.commands(state.task_id) == []
    stored = await m.state(state.task_id)  # on the ledger, not only in the cache
    assert (stored.status, stored.code) == (TaskStatus.FAILED, code)


class PlansTwoThenFails:
    """Answers the planner with a two-step plan (so a merge follows), then `error`."""

    provider, name = "sim", "plans-two"

    def __init__(self, error: BaseException) -> None:
        self.error, self.calls = error, 0

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.calls += 1
        if self.calls > 1:
            raise self.error
        plan = {"steps": [{"id": f"s{i}", "skill": "lookup_order",
                           "input": {"order_id": f"A100{i}"}} for i in (1, 2)],
                "merge": True}
        return ModelResponse(provider=self.provider, model=self.name, text=json.dumps(plan))

    async def aclose(self) -> None:
        pass


async def test_a_failing_merge_call_fails_the_task_after_its_steps() -> None:
    m = memory_mesh([get_agent("orders")], planner=PlansTwoThenFails(
        ModelAuthError("sim", "m", "key revoked")))
    state = await m.submit("where are orders A1001 and A1002?")
    tid = state.task_id
    assert [c.step_id for c in m.commands(tid)] == ["s1", "s2"], (state.status, state.reason)
    for cmd in m.commands(tid):
        state = await m.complete(tid, cmd.step_id, {"order_id": cmd.input["order_id"],
                                                    "status": "shipped"})
    assert state.status is TaskStatus.FAILED, state.status
    assert (state.code, state.reason) == ("model_error", "merging: sim/m: key revoked")
    assert (await m.state(tid)).code == "model_error"


async def test_a_bus_error_while_planning_is_raised_for_a_retry_not_decided_on() -> None:
    model = FailsAfter(0, NatsTimeoutError())
    m = memory_mesh([get_agent("orders")], planner=model)
    with pytest.raises(NatsTimeoutError):
        await m.submit("where is order A1001?", task_id="t-bus-blip")
    stored = await m.state("t-bus-blip")
    assert not stored.status.terminal
    model.ok = 10  # the bus is back: the retried drive plans
    state = await m.orchestrator.drive("t-bus-blip")
    assert state.status is not TaskStatus.FAILED and m.commands("t-bus-blip")
    assert isinstance(stored.submitted, ev.TaskSubmittedData)
