"""Driving a task: wake-ups that arrive together share one ledger read, and a delivered
step result that follows on from the cached fold needs none."""

from __future__ import annotations

import asyncio

import pytest
from helpers import wait_for_entry
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from jetmesh.agents.models.sim import SimModel
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.errors import LedgerReadError
from jetmesh.bus.events import PlanStep
from jetmesh.bus.ledger import Ledger
from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings
from jetmesh.orchestrator.state import StepStatus, TaskStatus, fold
from jetmesh.orchestrator.testing import CountingLedger
from jetmesh.orchestrator.workflows import Workflow


@pytest.fixture
async def orch(bus):
    """An orchestrator whose ledger (the real one) counts its reads (`counted`)."""
    nc = await connect(bus.url)
    js = jetstream(nc)
    o = Orchestrator(nc, js, model=SimModel(), use_registry=False,
                     settings=OrchestratorSettings(tick_s=3600),
                     ledger=CountingLedger(Ledger(nc, js)))
    yield o
    await nc.close()


def count_reads(orch: Orchestrator, fail_on: int | None = None) -> list[str]:
    """The reads from now on (a fresh list), the `fail_on`-th failing."""
    counted = orch.ledger
    assert isinstance(counted, CountingLedger)
    counted.reads = []
    if fail_on is not None:
        counted.fail_on(fail_on, lambda: LedgerReadError("replica behind"))
    return counted.reads


async def test_three_wake_ups_at_once_cost_two_reads(orch: Orchestrator) -> None:
    """The first drive reads at once; the second waits for the task's lock and the
    third rides on it (the second's read comes after both were woken)."""
    tid, skill = ev.new_id(), "drive" + ev.new_id()[:8]  # no agent serves this skill
    orch.workflows.add(Workflow(name=skill, steps=[PlanStep(id="only", skill=skill,
                                                            input={})]))
    await orch.ledger.append(ev.TaskSubmitted(
        id=f"{tid}-submitted", subject=tid, data=ev.TaskSubmittedData(goal="x",
                                                                     workflow=skill)))
    reads = count_reads(orch)
    states = await asyncio.gather(*(orch.drive(tid) for _ in range(3)))
    assert len(reads) == 2
    assert states[1] is states[2]
    assert all(s.status is TaskStatus.WORKING for s in states)
    assert states[2].steps["only"].status is StepStatus.DISPATCHED


async def test_a_rider_gets_the_failure_of_the_drive_it_rode_on(orch: Orchestrator) -> None:
    """So its message is not acked on a drive that never happened (it is retried)."""
    tid = ev.new_id()
    reads = count_reads(orch, fail_on=2)
    results = await asyncio.gather(*(orch.drive(tid) for _ in range(3)),
                                   return_exceptions=True)
    assert len(reads) == 2
    assert not isinstance(results[0], BaseException)
    assert isinstance(results[1], LedgerReadError) and isinstance(results[2], LedgerReadError)


async def test_a_dollar_budget_is_split_with_what_the_workers_spent(orch: Orchestrator) -> None:
    """The worker's model costs are in its step's log; with a dollar budget the
    orchestrator must read them to give the next step the share that is left."""
    tid, skill = ev.new_id(), "slice" + ev.new_id()[:8]  # no agent serves this skill
    orch.workflows.add(Workflow(name=skill, steps=[
        PlanStep(id="a", skill=skill, input={}),
        PlanStep(id="b", skill=skill, input={}, depends_on=["a"])]))
    await orch.ledger.append(ev.TaskSubmitted(
        id=f"{tid}-submitted", subject=tid, data=ev.TaskSubmittedData(
            goal="x", workflow=skill, budget=ev.Budget(max_usd=1.0))))
    await orch.drive(tid)
    seq = await orch.ledger.append(ev.StepStarted(subject=tid, data=ev.StepStartedData(
        step_id="a", agent="w", worker="w-1")), expected_last_subject_seq=0)
    await orch.ledger.append(ev.ModelCalled(subject=tid, data=ev.ModelCalledData(
        step_id="a", agent="w", worker="w-1", provider="sim", model="m", cost_usd=0.4,
        response={})))
    await orch.ledger.append(ev.StepCompleted(subject=tid, data=ev.StepCompletedData(
        step_id="a", agent="w", output={})), expected_last_subject_seq=seq)
    state = await orch.drive(tid)
    assert state.steps["b"].status is StepStatus.DISPATCHED
    last = await orch.js.get_last_msg(subjects.STREAM_WORK, subjects.work(skill))
    cmd = ev.StepCommand.model_validate_json(last.data)
    assert cmd.step_id == "b"
    assert cmd.slice_usd == pytest.approx(0.6)
    # An orchestrator that first sees the task now (a restart: nothing cached) reads
    # its steps' logs too once it knows the budget counts dollars (issue 21: its first
    # read leaves them out), so it has the same fold.
    orch.cache.clear()
    again = await orch.drive(tid)
    assert again.cost_usd == pytest.approx(state.cost_usd) and again.cost_usd >= 0.4
    assert again.steps["a"].cost_usd == pytest.approx(0.4)


async def test_a_restarted_orchestrator_resends_unstarted_steps_marked_as_resent(
        orch: Orchestrator) -> None:
    """A dispatch in the ledger whose work command was lost (a crash between the two) is
    sent again by the next orchestrator to see the task, marked so the worker reads the
    step's line before running it (it may have run already)."""
    tid, skill = ev.new_id(), "resend" + ev.new_id()[:8]  # no agent serves this skill
    orch.workflows.add(Workflow(name=skill, steps=[PlanStep(id="only", skill=skill,
                                                            input={})]))
    await orch.ledger.append_many([
        ev.TaskSubmitted(id=f"{tid}-submitted", subject=tid,
                         data=ev.TaskSubmittedData(goal="x", workflow=skill)),
        ev.TaskPlanned(id=f"{tid}-planned", subject=tid, data=ev.TaskPlannedData(
            planner=f"workflow:{skill}", steps=[PlanStep(id="only", skill=skill, input={})])),
        ev.StepDispatched(subject=tid, data=ev.StepDispatchedData(
            step_id="only", skill=skill, input={}, attempt=1))])
    state = await orch.drive(tid)  # first sight of the task in this process
    assert state.steps["only"].status is StepStatus.DISPATCHED
    last = await orch.js.get_last_msg(subjects.STREAM_WORK, subjects.work(skill))
    assert last.headers is not None and last.headers.get(ev.RESENT_HEADER) == "restart"
    assert ev.StepCommand.model_validate_json(last.data).step_id == "only"


async def delivered(orch: Orchestrator, tid: str, step_id: str) -> Msg:
    """The last event of a step's line, as the orchestrator's step consumer delivers it
    (stream sequence, subject, the append's headers)."""
    sub = await orch.js.pull_subscribe(
        subjects.step_events(tid, step_id), stream=subjects.STREAM_LEDGER,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.LAST))
    try:
        return (await sub.fetch(1, timeout=5))[0]
    finally:
        await sub.unsubscribe()


async def planned_task(orch: Orchestrator, steps: list[str],
                       budget: ev.Budget | None = None) -> str:
    """A task of independent steps of a skill nobody serves, planned and dispatched."""
    tid, skill = ev.new_id(), "fold" + ev.new_id()[:8]
    orch.workflows.add(Workflow(name=skill, steps=[PlanStep(id=s, skill=skill, input={})
                                                   for s in steps]))
    await orch.ledger.append(ev.TaskSubmitted(
        id=f"{tid}-submitted", subject=tid,
        data=ev.TaskSubmittedData(goal="x", workflow=skill, budget=budget)))
    state = await orch.drive(tid)
    assert all(state.steps[s].status is StepStatus.DISPATCHED for s in steps)
    return tid


async def complete(orch: Orchestrator, tid: str, step_id: str, after: int | None = 0) -> int:
    """A worker's result on the step's line, fenced on `after` (None: not fenced)."""
    return await orch.ledger.append(ev.StepCompleted(subject=tid, data=ev.StepCompletedData(
        step_id=step_id, agent="w", output={"step": step_id})),
        expected_last_subject_seq=after)


async def test_results_that_follow_on_from_the_fold_are_folded_with_no_read(
        orch: Orchestrator) -> None:
    """Each result was fenced on its empty line, which is where the cached fold has the
    line: the orchestrator folds the delivered event and completes the task, reading
    nothing. A redelivered result is skipped (no read, nothing written twice)."""
    tid = await planned_task(orch, ["a", "b"])
    reads = count_reads(orch)
    await complete(orch, tid, "a")
    msg_a = await delivered(orch, tid, "a")
    await orch.intake.on_step_event(msg_a)
    assert orch.cache[tid].state.steps["a"].status is StepStatus.COMPLETED
    assert reads == []
    before = await orch.js.stream_info(subjects.STREAM_LEDGER)
    await orch.intake.on_step_event(msg_a)  # redelivered
    assert reads == []
    after = await orch.js.stream_info(subjects.STREAM_LEDGER)
    assert after.state.last_seq == before.state.last_seq
    await complete(orch, tid, "b")
    await orch.intake.on_step_event(await delivered(orch, tid, "b"))
    assert reads == []
    final = fold(tid, await orch.ledger.read(tid))
    assert final.status is TaskStatus.COMPLETED
    assert {s: final.steps[s].output for s in "ab"} == {"a": {"step": "a"}, "b": {"step": "b"}}


async def test_a_result_after_a_claim_the_fold_has_not_seen_is_read(
        orch: Orchestrator) -> None:
    """A redelivered step was claimed on its line: the result is fenced on the claim,
    which the cached fold lacks, so the drive reads the task (and gets the claim)."""
    tid = await planned_task(orch, ["a"])
    claim = await orch.ledger.append(ev.StepStarted(subject=tid, data=ev.StepStartedData(
        step_id="a", agent="w", worker="w-2", delivery=2)), expected_last_subject_seq=0)
    await complete(orch, tid, "a", after=claim)
    reads = count_reads(orch)
    await orch.intake.on_step_event(await delivered(orch, tid, "a"))
    assert len(reads) == 1
    state = orch.cache[tid].state
    assert state.status is TaskStatus.COMPLETED and state.steps["a"].worker == "w-2"


@pytest.mark.parametrize("case", ["unfenced", "dollar budget"])
async def test_results_the_fold_cannot_vouch_for_are_read(orch: Orchestrator,
                                                          case: str) -> None:
    """An unfenced result says nothing of its line; with a dollar budget the drive needs
    the steps' logs (their spend), which are never delivered to it."""
    budget = ev.Budget(max_usd=1.0) if case == "dollar budget" else None
    tid = await planned_task(orch, ["a"], budget)
    await complete(orch, tid, "a", after=None if case == "unfenced" else 0)
    reads = count_reads(orch)
    await orch.intake.on_step_event(await delivered(orch, tid, "a"))
    assert len(reads) == 1
    assert orch.cache[tid].state.status is TaskStatus.COMPLETED


async def cancel_unseen(orch: Orchestrator, tid: str) -> None:
    """A cancel stored in the ledger that the orchestrator's control consumer has not
    delivered yet (it comes on another consumer than the step results)."""
    await orch.ledger.append(ev.CancelRequested(subject=tid, source="test",
                                                data=ev.CancelRequestedData(reason="stop")))


async def test_a_step_stopped_by_an_unseen_cancel_cancels_the_task(orch: Orchestrator) -> None:
    """The worker stopped the step because of the cancel: the step's failure, folded
    from its delivery, would fail the task; the drive reads first and finds the cancel."""
    tid = await planned_task(orch, ["a"])
    await cancel_unseen(orch, tid)
    await orch.ledger.append(ev.StepFailed(subject=tid, data=ev.StepFailedData(
        step_id="a", agent="w", code="canceled", reason="stop", retryable=False)),
        expected_last_subject_seq=0)
    await orch.intake.on_step_event(await delivered(orch, tid, "a"))
    final = fold(tid, await orch.ledger.read(tid))
    assert final.status is TaskStatus.CANCELED


async def test_a_task_completed_from_deliveries_is_not_completed_over_an_unseen_cancel(
        orch: Orchestrator) -> None:
    """Its completion is conditioned on the control subject: the cancel refuses it, the
    drive reads, and the task ends canceled, with no completion in the ledger."""
    tid = await planned_task(orch, ["a"])
    await cancel_unseen(orch, tid)
    await complete(orch, tid, "a")
    await orch.intake.on_step_event(await delivered(orch, tid, "a"))
    entries = await orch.ledger.read(tid)
    assert fold(tid, entries).status is TaskStatus.CANCELED
    assert not any(isinstance(e.event, ev.TaskCompleted) for e in entries)


async def test_recovery_drives_again_a_task_whose_first_drive_failed(bus) -> None:
    """After a restart the bus may still be coming back: a task whose recovery drive
    fails is driven again until it goes through (before, it waited for an event that
    might never come)."""
    tid = ev.new_id()
    await bus.ledger.append(ev.TaskSubmitted(
        id=f"{tid}-submitted", subject=tid,
        data=ev.TaskSubmittedData(goal="x", workflow="no-such-workflow-" + tid)))
    nc = await connect(bus.url)
    js = jetstream(nc)
    failures = 0

    def fail(task_id: str, _: int) -> bool:
        nonlocal failures
        if task_id == tid and failures < 2:
            failures += 1
            return True
        return False

    o = Orchestrator(nc, js, model=SimModel(), use_registry=False,
                     settings=OrchestratorSettings(tick_s=3600, sweep_s=0),
                     ledger=CountingLedger(Ledger(nc, js), fail=fail,
                                           error=lambda: LedgerReadError("restarting")))
    await o.start()
    try:
        ended = await wait_for_entry(bus.ledger, tid, lambda e: isinstance(
            e.event, ev.TERMINAL_TASK_EVENTS), timeout=30)
    finally:
        await o.stop()
        await nc.close()
    assert failures == 2
    assert isinstance(ended.event, ev.TaskRejected | ev.TaskFailed), ended.event
