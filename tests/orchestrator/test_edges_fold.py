"""Trust at the edges, in the pure fold and `decide` (issue 14): nothing changes a task
after its end, a step's result and usage count only from the step's holder, events of
steps never dispatched are ignored (and reported), and a skill with no live agent waits
in the work stream instead of failing the task after 30 s."""

from __future__ import annotations

from datetime import timedelta

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.ledger import LedgerEntry, subject_for
from jetmesh.orchestrator import decide as d
from jetmesh.orchestrator.state import StepStatus, TaskState, TaskStatus, fold

TASK = "edge-task"


def entries(evs: list[ev.Event]) -> list[LedgerEntry]:
    return [LedgerEntry(i + 1, subject_for(e), e) for i, e in enumerate(evs)]


def started(step: str, worker: str, *, claim: bool = True) -> ev.StepStarted:
    return ev.StepStarted(subject=TASK, data=ev.StepStartedData(
        step_id=step, agent="x", worker=worker, claim=claim))


def completed(step: str, worker: str | None, output: dict[str, object]) -> ev.StepCompleted:
    return ev.StepCompleted(subject=TASK, data=ev.StepCompletedData(
        step_id=step, agent="x", worker=worker, output=output))


def model_call(step: str, worker: str, usd: float) -> ev.ModelCalled:
    return ev.ModelCalled(subject=TASK, data=ev.ModelCalledData(
        step_id=step, agent="x", worker=worker, provider="sim", model="m", cost_usd=usd,
        input_tokens=10, response={}))


def head(steps: list[str], dispatched: list[str], *, skill: str = "think",
         budget: ev.Budget | None = None) -> list[ev.Event]:
    return [
        ev.TaskSubmitted(subject=TASK, data=ev.TaskSubmittedData(goal="g", budget=budget)),
        ev.TaskPlanned(subject=TASK, data=ev.TaskPlannedData(
            planner="workflow:x", steps=[ev.PlanStep(id=s, skill=skill) for s in steps])),
        *(ev.StepDispatched(subject=TASK, data=ev.StepDispatchedData(
            step_id=s, skill=skill, input={}, attempt=1)) for s in dispatched),
    ]


def asked(step: str = "a") -> ev.ApprovalRequested:
    return ev.ApprovalRequested(subject=TASK, data=ev.ApprovalRequestedData(
        step_id=step, agent="x", tool="refund", arguments={"n": 1}, args_hash="h",
        reason="over $200", risk="irreversible", expires_at=ev.utcnow()))


def granted(step: str = "a") -> ev.ApprovalGranted:
    return ev.ApprovalGranted(subject=TASK, data=ev.ApprovalDecisionData(
        step_id=step, tool="refund", args_hash="h"))


# ---------------------------------------------------------------- (6) after the end


def test_a_finished_task_has_no_pending_approval_and_ignores_later_controls() -> None:
    """`jetmesh show` said "waiting for approval" after a cancel; a cancel or an
    approval after the end was folded as if the task were still open."""
    evs = [*head(["a"], ["a"]), started("a", "w1"), asked(),
           ev.TaskCanceled(subject=TASK, data=ev.TaskCanceledData(reason="stop"))]
    state = fold(TASK, entries(evs))
    assert state.status is TaskStatus.CANCELED
    assert state.pending_approvals == {}
    late = fold(TASK, entries([*evs, granted(), ev.CancelRequested(
        subject=TASK, data=ev.CancelRequestedData(reason="again")), asked()]))
    assert late.status is TaskStatus.CANCELED
    assert late.pending_approvals == {} and late.decisions == {}
    assert late.cancel_requested is None
    assert d.decide(late, ev.utcnow()) == []


def test_a_completed_task_ignores_a_late_cancel() -> None:
    evs = [*head(["a"], ["a"]), started("a", "w1"), completed("a", "w1", {"ok": 1}),
           ev.TaskCompleted(subject=TASK, data=ev.TaskCompletedData(result={"ok": 1})),
           ev.CancelRequested(subject=TASK, data=ev.CancelRequestedData())]
    state = fold(TASK, entries(evs))
    assert state.status is TaskStatus.COMPLETED and state.cancel_requested is None


# ---------------------------------------------------------------- (7) the step's holder


def test_a_result_written_by_a_worker_that_lost_the_claim_does_not_count() -> None:
    """w1 held the step, w2 claimed it (a redelivery): w1's late result, appended
    around the fence, is audit history; w2's result is the step's."""
    evs = [*head(["a"], ["a"]), started("a", "w1"), started("a", "w2"),
           completed("a", "w1", {"by": "zombie"})]
    state = fold(TASK, entries(evs))
    assert state.steps["a"].status is not StepStatus.COMPLETED
    assert state.steps["a"].output is None
    assert [i.reason for i in state.ignored] == ["written by w1, not the step's holder w2"]
    assert state.steps["a"].last_seq == len(evs)  # the line's last sequence all the same
    state = fold(TASK, entries([*evs, completed("a", "w2", {"by": "holder"})]))
    assert state.steps["a"].status is StepStatus.COMPLETED
    assert state.steps["a"].output == {"by": "holder"}


def test_the_first_fenced_append_on_an_empty_line_claims_the_step() -> None:
    """A first delivery logs its start (the orchestrator does not read logs): its first
    append on the line is its claim; a different worker's result after it is not."""
    evs = [*head(["a"], ["a"]), completed("a", "w1", {"by": "w1"})]
    assert fold(TASK, entries(evs)).steps["a"].output == {"by": "w1"}
    tool = ev.ToolCalled(subject=TASK, data=ev.ToolCalledData(
        step_id="a", agent="x", worker="w1", tool="refund", call_id="c",
        idempotency_key="k", side_effects=True))
    state = fold(TASK, entries([*head(["a"], ["a"]), tool, completed("a", "w9", {})]))
    assert state.steps["a"].status is StepStatus.DISPATCHED
    assert len(state.ignored) == 1


def test_a_zombie_workers_model_calls_do_not_count_toward_usage() -> None:
    evs = [*head(["a"], ["a"]), started("a", "w1", claim=False), model_call("a", "w1", 0.1),
           started("a", "w2"), model_call("a", "w1", 5.0), model_call("a", "w2", 0.2),
           completed("a", "w2", {})]
    state = fold(TASK, entries(evs))
    assert state.cost_usd == 0.1 + 0.2
    assert state.model_calls == 2 and state.steps["a"].model_calls == 2
    assert state.input_tokens == 20
    assert state.steps["a"].status is StepStatus.COMPLETED
    assert len(state.ignored) == 1 and state.ignored[0].type == "jetmesh.model.called.v1"


def test_events_of_steps_never_dispatched_are_ignored_and_reported() -> None:
    """A result for a planned step not yet dispatched, or for a step the plan does not
    have, would otherwise complete it (or add a phantom step to the task's result)."""
    evs = [*head(["a", "b"], ["a"]), completed("b", "w1", {"forged": True}),
           completed("zz", "w1", {"forged": True}), completed("a", "w2", {"ok": 1})]
    state = fold(TASK, entries(evs))
    assert state.steps["b"].status is StepStatus.PENDING and state.steps["b"].output is None
    assert "zz" not in state.steps
    assert {(i.step_id, i.reason) for i in state.ignored} == {
        ("b", "step never dispatched"), ("zz", "step never dispatched")}
    assert state.steps["a"].status is StepStatus.COMPLETED


def test_the_orchestrators_own_failure_of_an_undispatched_step_counts() -> None:
    """The schema gate fails a step before it is dispatched: that is not a forgery."""
    failed = ev.StepFailed(subject=TASK, source="jetmesh/orchestrator", data=ev.StepFailedData(
        step_id="a", agent="orchestrator", code="invalid_input", reason="bad", attempt=1))
    state = fold(TASK, entries([*head(["a"], []), failed]))
    assert state.steps["a"].status is StepStatus.FAILED and not state.ignored


# ---------------------------------------------------------------- (8) no live agent


def planned(deadline_s: float | None = None) -> TaskState:
    budget = ev.Budget(deadline_s=deadline_s) if deadline_s else None
    return fold(TASK, entries(head(["a"], [], budget=budget)))


def test_a_step_whose_skill_has_no_live_agent_is_queued_not_failed() -> None:
    state = planned()
    assert state.planned_at is not None
    actions = d.decide(state, state.planned_at, live_skills=set())
    assert actions == [d.Dispatch("a", "think", {}, 1)]


def test_a_queued_step_waits_for_an_agent_up_to_an_hour_without_a_deadline() -> None:
    state = fold(TASK, entries(head(["a"], ["a"])))
    at = state.steps["a"].dispatched_at
    assert at is not None
    # Long past the step's own timeout (120 s) and the old 30 s: still waiting.
    later = at + timedelta(seconds=600)
    acts = d.decide(state, later, live_skills=set())
    assert acts == [d.Wait(at + timedelta(hours=1))]
    failed = d.decide(state, at + timedelta(hours=1), live_skills=set())
    assert len(failed) == 1 and isinstance(failed[0], d.Fail)
    assert failed[0].code == "no_agent" and "think" in failed[0].reason
    # The explicit override (JETMESH_NO_AGENT_WAIT_S) still bounds it.
    short = d.decide(state, at + timedelta(seconds=31), live_skills=set(),
                     no_agent_wait_s=30)
    assert isinstance(short[0], d.Fail) and short[0].code == "no_agent"


def test_a_queued_step_is_bounded_by_the_tasks_deadline() -> None:
    state = fold(TASK, entries(head(["a"], ["a"], budget=ev.Budget(deadline_s=900))))
    assert state.created_at is not None
    acts = d.decide(state, state.created_at + timedelta(seconds=600), live_skills=set())
    assert acts == [d.Wait(state.created_at + timedelta(seconds=900))]
    end = d.decide(state, state.created_at + timedelta(seconds=900), live_skills=set())
    assert isinstance(end[0], d.Fail) and end[0].code == "deadline"


def test_a_step_timeout_counts_from_when_its_skill_came_back() -> None:
    state = fold(TASK, entries(head(["a"], ["a"])))
    at = state.steps["a"].dispatched_at
    assert at is not None
    back = at + timedelta(seconds=600)
    acts = d.decide(state, back + timedelta(seconds=1), live_skills={"think"},
                    live_since={"think": back})
    assert acts == [d.Wait(back + timedelta(seconds=120))]


def test_waiting_for_an_agent_is_visible() -> None:
    state = fold(TASK, entries(head(["a"], ["a"])))
    at = state.steps["a"].dispatched_at
    assert d.waiting_for_agents(state, set()) == [("a", "think", at)]
    assert d.waiting_for_agents(state, {"think"}) == []
    assert subjects.work("think") == "jm.work.think"


def test_an_ignored_event_on_a_steps_line_still_moves_its_fence() -> None:
    """The orchestrator fences its own step failures (timeouts) on the line's last
    sequence: an event it does not count is on the line all the same."""
    off = ev.TaskCompleted(subject=TASK, data=ev.TaskCompletedData(result={"forged": 1}))
    evs = [*head(["a"], ["a"]), started("a", "w1")]
    log = entries(evs)
    log.append(LedgerEntry(len(log) + 1, subjects.step_events(TASK, "a"), off))
    state = fold(TASK, log)
    assert state.status is TaskStatus.WORKING and state.result is None
    assert state.steps["a"].last_seq == len(log)
    assert state.ignored[0].reason == "not an event of this step's subject"
