"""Property tests of the pure fold: never raises, terminal stays terminal, deterministic."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from jetmesh.bus import events as ev
from jetmesh.bus.ledger import LedgerEntry, subject_for
from jetmesh.orchestrator.state import TERMINAL, StepStatus, TaskStatus, fold

TASK = "t1"
steps = st.sampled_from(["a", "b", "c"])
skills = st.sampled_from(["triage", "research"])
text = st.text(max_size=20)
workers = st.sampled_from(["w1", "w2"])


def _events() -> st.SearchStrategy[ev.Event]:
    return st.one_of(
        st.builds(lambda g: ev.TaskSubmitted(subject=TASK, data=ev.TaskSubmittedData(goal=g)),
                  text),
        st.builds(lambda r: ev.TaskRejected(subject=TASK, data=ev.TaskRejectedData(reason=r)),
                  text),
        st.builds(lambda ids, sk: ev.TaskPlanned(subject=TASK, data=ev.TaskPlannedData(
            planner="workflow:x", steps=[ev.PlanStep(id=i, skill=sk) for i in ids])),
            st.lists(steps, unique=True, max_size=3), skills),
        st.builds(lambda s, sk, a: ev.StepDispatched(subject=TASK, data=ev.StepDispatchedData(
            step_id=s, skill=sk, input={}, attempt=a)), steps, skills, st.integers(1, 3)),
        st.builds(lambda s, w, c: ev.StepStarted(subject=TASK, data=ev.StepStartedData(
            step_id=s, agent="x", worker=w, claim=c)), steps, workers, st.booleans()),
        st.builds(lambda s, c, w: ev.ModelCalled(subject=TASK, data=ev.ModelCalledData(
            step_id=s, agent="x", worker=w, provider="sim", model="m", cost_usd=c,
            input_tokens=3, response={})), st.one_of(st.none(), steps),
            st.floats(0, 1, allow_nan=False), st.one_of(st.none(), workers)),
        st.builds(lambda s: ev.ToolCalled(subject=TASK, data=ev.ToolCalledData(
            step_id=s, agent="x", tool="t", call_id="c", idempotency_key="k")), steps),
        st.builds(lambda s, w: ev.StepCompleted(subject=TASK, data=ev.StepCompletedData(
            step_id=s, agent="x", output={"text": "ok"}, worker=w)), steps,
            st.one_of(st.none(), workers)),
        st.builds(lambda s, r: ev.StepFailed(subject=TASK, data=ev.StepFailedData(
            step_id=s, code="error", reason="boom", retryable=r)), steps, st.booleans()),
        st.just(ev.TaskCompleted(subject=TASK, data=ev.TaskCompletedData(result={"a": 1}))),
        st.just(ev.TaskFailed(subject=TASK, data=ev.TaskFailedData(code="x", reason="y"))),
        st.just(ev.TaskCanceled(subject=TASK, data=ev.TaskCanceledData())),
        st.just(ev.CancelRequested(subject=TASK, data=ev.CancelRequestedData())),
        st.builds(lambda s, h: ev.ApprovalRequested(subject=TASK, data=ev.ApprovalRequestedData(
            step_id=s, agent="x", tool="refund", arguments={"n": h}, args_hash=h,
            reason="r", risk="irreversible", expires_at=ev.utcnow())), steps,
            st.sampled_from(["h1", "h2"])),
        st.builds(lambda s, h, granted: (ev.ApprovalGranted if granted else ev.ApprovalDenied)(
            subject=TASK, data=ev.ApprovalDecisionData(step_id=s, tool="refund",
                                                       args_hash=h)),
            steps, st.sampled_from(["h1", "h2"]), st.booleans()),
        st.builds(lambda s, h, rule: ev.PolicyDecided(subject=TASK, data=ev.PolicyDecidedData(
            step_id=s, agent="x", tool="refund", args_hash=h, decision="deny", rule=rule)),
            steps, st.sampled_from(["h1", "h2"]),
            st.sampled_from(["approval-timeout", "rules[0]:x"])),
        st.builds(lambda s: ev.BudgetExceeded(subject=TASK, data=ev.BudgetExceededData(
            step_id=s, agent="x", kind="usd", limit=1.0, would_be=2.0)), steps),
    )


def entries(evs: list[ev.Event]) -> list[LedgerEntry]:
    return [LedgerEntry(i + 1, subject_for(e), e) for i, e in enumerate(evs)]


@settings(max_examples=300, deadline=None)
@given(st.lists(_events(), max_size=40))
def test_fold_never_raises_and_terminal_states_stay_terminal(evs: list[ev.Event]) -> None:
    log = entries(evs)
    state = fold(TASK, [])
    first_terminal: TaskStatus | None = None
    for entry in log:
        state = fold(TASK, [entry], state)
        if first_terminal is None and state.status in TERMINAL:
            first_terminal = state.status
        if first_terminal is not None:
            assert state.status == first_terminal
    assert state.last_seq == len(log)
    if state.status is TaskStatus.INPUT_REQUIRED:
        assert state.pending_approvals, "input-required with nothing pending"
    if state.status in TERMINAL:
        assert not state.pending_approvals, "a finished task waits for an approval"
    # Usage counts only what was not ignored, and every step's usage is in the task's.
    assert state.model_calls >= sum(s.model_calls for s in state.steps.values())
    assert set(state.steps) <= {p.id for p in state.plan}, "a step not in the plan"


@settings(max_examples=200, deadline=None)
@given(st.lists(_events(), max_size=40))
def test_fold_is_deterministic_and_idempotent(evs: list[ev.Event]) -> None:
    log = entries(evs)
    once = fold(TASK, log)
    assert fold(TASK, log) == once
    # Folding the same entries again into the folded state changes nothing.
    assert fold(TASK, log, once.model_copy(deep=True)) == once


def test_fold_happy_path_counts_usage_and_results() -> None:
    evs: list[ev.Event] = [
        ev.TaskSubmitted(subject=TASK, data=ev.TaskSubmittedData(goal="g")),
        ev.TaskPlanned(subject=TASK, data=ev.TaskPlannedData(
            planner="workflow:w", steps=[ev.PlanStep(id="a", skill="triage")])),
        ev.StepDispatched(subject=TASK, data=ev.StepDispatchedData(
            step_id="a", skill="triage", input={"q": 1})),
        ev.StepStarted(subject=TASK, data=ev.StepStartedData(step_id="a", agent="x",
                                                               worker="w")),
        ev.ModelCalled(subject=TASK, data=ev.ModelCalledData(
            step_id="a", agent="x", provider="sim", model="m", cost_usd=0.5, input_tokens=10,
            output_tokens=5, response={})),
        ev.StepCompleted(subject=TASK, data=ev.StepCompletedData(
            step_id="a", agent="x", output={"text": "done"})),
        ev.TaskCompleted(subject=TASK, data=ev.TaskCompletedData(result={"text": "done"})),
    ]
    s = fold(TASK, entries(evs))
    assert s.status is TaskStatus.COMPLETED
    assert s.steps["a"].status is StepStatus.COMPLETED
    assert s.steps["a"].output == {"text": "done"}
    assert s.cost_usd == 0.5 and s.input_tokens == 10 and s.output_tokens == 5
    assert s.steps["a"].last_seq == 6
    assert s.last_seq == 7
