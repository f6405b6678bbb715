"""`decide` on folded states: when the orchestrator must wake up by itself."""

from __future__ import annotations

from datetime import timedelta

from jetmesh.bus import events as ev
from jetmesh.bus.ledger import LedgerEntry, subject_for
from jetmesh.orchestrator import decide as d
from jetmesh.orchestrator.state import fold

TASK = "deadline-task"


def state_with_a_running_step(deadline_s: float | None):
    budget = ev.Budget(deadline_s=deadline_s) if deadline_s else None
    events = [
        ev.TaskSubmitted(subject=TASK, data=ev.TaskSubmittedData(goal="g", budget=budget)),
        ev.TaskPlanned(subject=TASK, data=ev.TaskPlannedData(
            planner="workflow:x", steps=[ev.PlanStep(id="s1", skill="think", timeout_s=300)])),
        ev.StepDispatched(subject=TASK, data=ev.StepDispatchedData(
            step_id="s1", skill="think", input={}, attempt=1)),
    ]
    return fold(TASK, [LedgerEntry(i + 1, subject_for(e), e) for i, e in enumerate(events)])


def test_a_task_with_a_deadline_wakes_at_the_deadline_not_at_the_step_timeout() -> None:
    """With no event from its worker (dead, or its report lost), a task still fails at
    its deadline: the orchestrator's timer is set for it."""
    state = state_with_a_running_step(deadline_s=5)
    assert state.created_at is not None
    deadline = state.created_at + timedelta(seconds=5)
    actions = d.decide(state, state.created_at + timedelta(seconds=1))
    assert actions == [d.Wait(deadline)]
    failed = d.decide(state, deadline)
    assert len(failed) == 1 and isinstance(failed[0], d.Fail) and failed[0].code == "deadline"


def test_without_a_deadline_the_step_timeout_is_the_wake_up() -> None:
    state = state_with_a_running_step(deadline_s=None)
    assert state.created_at is not None
    actions = d.decide(state, state.created_at + timedelta(seconds=1))
    dispatched_at = state.steps["s1"].dispatched_at
    assert dispatched_at is not None
    assert actions == [d.Wait(dispatched_at + timedelta(seconds=300))]
