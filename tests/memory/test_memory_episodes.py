"""Episodes built from ledger entries (pure: no bus, no store)."""

from __future__ import annotations

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.ledger import LedgerEntry
from jetmesh.memory.episodes import build_episode, render

T = "t1"


def entry(seq: int, event: ev.Event) -> LedgerEntry:
    step = getattr(event.data, "step_id", None)
    if isinstance(event, ev.StepStarted | ev.ToolCalled | ev.StepCompleted | ev.StepFailed) or (
        isinstance(event, ev.ModelCalled) and step
    ):
        subject = subjects.step_events(T, step)
    else:
        subject = subjects.task_events(T)
    return LedgerEntry(seq, subject, event)


def model_call(step: str, cost: float) -> ev.ModelCalled:
    return ev.ModelCalled(subject=T, data=ev.ModelCalledData(
        step_id=step, agent="researcher", provider="sim", model="m", cost_usd=cost,
        response={}))


def ledger() -> list[LedgerEntry]:
    events: list[ev.Event] = [
        ev.TaskSubmitted(subject=T, data=ev.TaskSubmittedData(
            goal="How long do refunds take?", user_id="alice smith", workflow="ask")),
        ev.TaskPlanned(subject=T, data=ev.TaskPlannedData(planner="workflow:ask", steps=[
            ev.PlanStep(id="s1", skill="research", input={})])),
        ev.StepDispatched(subject=T, data=ev.StepDispatchedData(
            step_id="s1", skill="research", input={"question": "How long do refunds take?"})),
        ev.StepStarted(subject=T, data=ev.StepStartedData(step_id="s1", agent="researcher",
                                                          worker="w1")),
        model_call("s1", 0.25),
        ev.StepFailed(subject=T, data=ev.StepFailedData(
            step_id="s1", agent="researcher", code="timeout", reason="too slow",
            retryable=True)),
        ev.StepDispatched(subject=T, data=ev.StepDispatchedData(
            step_id="s1", skill="research", input={"question": "How long do refunds take?"},
            attempt=2)),
        ev.StepStarted(subject=T, data=ev.StepStartedData(step_id="s1", agent="researcher",
                                                          worker="w2", attempt=2)),
        model_call("s1", 0.5),
        model_call(None, 0.125),  # type: ignore[arg-type]  # the orchestrator's merge
        ev.StepCompleted(subject=T, data=ev.StepCompletedData(
            step_id="s1", agent="researcher", attempt=2,
            output={"answer": "Within 7 days.", "facts": ["Refunds take 7 days."]})),
        ev.TaskCompleted(subject=T, data=ev.TaskCompletedData(result={
            "steps": {"s1": {"answer": "Within 7 days."}}, "output": {"answer": "Within 7 days."}
        })),
    ]
    return [entry(i + 1, e) for i, e in enumerate(events)]


def test_each_step_attempt_is_an_episode_with_its_own_events_and_cost() -> None:
    entries = ledger()
    failed = build_episode(entries, 6)
    done = build_episode(entries, 11)
    assert failed is not None and done is not None
    assert failed.episode_id == "t1:s1" and done.episode_id == "t1:s1#2"
    assert failed.outcome == "failed (timeout): too slow"
    assert failed.ledger_seqs == [1, 3, 4, 5, 6]
    assert done.ledger_seqs == [1, 7, 8, 9, 11]
    assert (failed.cost_usd, done.cost_usd) == (0.25, 0.5)
    assert done.request == "[research] question: How long do refunds take?"
    assert done.outcome == "answer: Within 7 days.; facts: Refunds take 7 days."
    assert (done.user_id, done.agent_id, done.step_id) == ("alice_smith", "researcher", "s1")


def test_the_task_is_an_episode_with_its_goal_result_and_total_cost() -> None:
    episode = build_episode(ledger(), 12)
    assert episode is not None
    assert episode.episode_id == "t1:task" and episode.step_id is None
    assert episode.request == "How long do refunds take? [workflow ask]"
    assert episode.outcome == "answer: Within 7 days."
    assert episode.cost_usd == 0.875
    assert episode.ledger_seqs == [1, 2, 6, 11, 12]


def test_events_that_finish_nothing_or_are_missing_give_no_episode() -> None:
    assert build_episode(ledger(), 4) is None
    assert build_episode(ledger(), 99) is None


def test_render_flattens_json_and_truncates() -> None:
    assert render({"a": [1, "x"], "b": {"c": None}}) == "a: 1, x; b: c: null"
    assert len(render("y" * 10_000, limit=100)) == 100
