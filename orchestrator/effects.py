"""The orchestrator's effect executor: carries out what `decide` chose.

Each action becomes ledger events and work commands; one round's go out in one
pipelined batch (`flush`) and are folded into the task's cached fold as they are
acknowledged, so the orchestrator never reads back what it just wrote. Nothing here
decides: a plan is made and folded in, and the next round of `decide` dispatches it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from jetmesh.agents.guard import estimate
from jetmesh.agents.models.errors import (
    ModelError,
    ModelRetriesExhausted,
    ModelTransientError,
)
from jetmesh.agents.models.types import Model, ModelRequest, ModelResponse
from jetmesh.agents.spec import schema_errors
from jetmesh.bus import events as ev
from jetmesh.bus import headers as hdr
from jetmesh.bus import subjects
from jetmesh.bus.budgets import BudgetRefused, Budgets, Reservation
from jetmesh.bus.ledger import LedgerEntry, subject_for
from jetmesh.bus.ledger_port import TaskLedger
from jetmesh.bus.settings import BusSettings
from jetmesh.bus.streams import ensure_consumer, work_consumer_config
from jetmesh.orchestrator import decide as d
from jetmesh.orchestrator.cache import Fold, Origin, TaskCache, pending_entry
from jetmesh.orchestrator.context import Contexts, for_planner
from jetmesh.orchestrator.errors import PlanError
from jetmesh.orchestrator.planner import Recorder, merge_with_model, plan_with_model
from jetmesh.orchestrator.skills import LiveSkills
from jetmesh.orchestrator.state import StepStatus, TaskState
from jetmesh.orchestrator.workflows import WorkflowRegistry

log = logging.getLogger("jetmesh.orchestrator")

SOURCE = "jetmesh/orchestrator"


class Command(NamedTuple):
    """A work command: published to a skill's work queue in the batch of its dispatch."""

    subject: str
    data: bytes
    headers: dict[str, str]


def end_id(task_id: str) -> str:
    """The id of a task's terminal event, whichever it is: of two ends decided at once
    (two replicas, a stale fold) JetStream stores only the first."""
    return f"{task_id}-end"


def failed(task_id: str, code: str, reason: str) -> ev.TaskFailed:
    return ev.TaskFailed(id=end_id(task_id), subject=task_id, source=SOURCE,
                         data=ev.TaskFailedData(code=code, reason=reason))


@dataclass
class BudgetGuard:
    """Reserves the orchestrator's own calls (plan, merge) on the task's budget."""

    book: Budgets
    task_id: str
    budget: ev.Budget

    async def before_model_call(self, request: ModelRequest, model: Model) -> object:
        usd, tokens = estimate(request, model)
        return await self.book.reserve(self.task_id, self.budget, usd=usd, tokens=tokens)

    async def after_model_call(self, token: object, response: ModelResponse,
                               cost_usd: float) -> None:
        assert isinstance(token, Reservation)
        u = response.usage
        await self.book.settle(token, usd=cost_usd, tokens=u.input_tokens + u.output_tokens)

    async def release(self, token: object) -> None:
        assert isinstance(token, Reservation)
        await self.book.release(token)


@dataclass
class Round:
    """One round's output: the events and commands of its batch."""

    events: list[ev.Event]
    commands: list[Command]


class Effects:
    """Turns actions into events and commands, and stores them."""

    def __init__(self, ledger: TaskLedger, js: JetStreamContext | None, cache: TaskCache, *,
                 model: Model, workflows: WorkflowRegistry, skills: LiveSkills,
                 book: Budgets, bus_settings: BusSettings) -> None:
        self.ledger, self.js, self.cache = ledger, js, cache
        self.model, self.workflows, self.skills = model, workflows, skills
        self.book, self.bus_settings = book, bus_settings
        self.contexts = Contexts(js, ledger)
        """The earlier turns of a task's conversation context (orchestrator.context)."""
        self._work_consumers: set[str] = set()
        """Skills whose work consumer this process made sure of (`_ensure_work_consumers`)."""

    # ------------------------------------------------------------------ one round

    async def execute(self, state: TaskState, actions: list[d.Action],
                      carried: list[ev.Event], guard: tuple[str, int] | None = None
                      ) -> tuple[TaskState, list[ev.Event]]:
        """Carry out one round of decisions; `carried`: events already folded in that go
        out first, in the same batch; `guard`: see `flush`. Returns the state and the
        events folded in but not stored yet (a new plan: stored with the dispatches the
        next round of `decide` makes of it)."""
        tid = state.task_id
        out = Round([], [])
        for a in actions:
            match a:
                case d.Plan():
                    # Folded in now; it goes out first, in the batch of its dispatches.
                    return state, [*carried, *self.prefold(state, await self.plan(state))]
                case d.FailStep():
                    if carried:
                        state = await self.flush(state, Round([], []), carried)
                    # Fenced on the step subject: a result that arrived meanwhile wins.
                    await self.ledger.append(ev.StepFailed(
                        subject=tid, source=SOURCE, data=ev.StepFailedData(
                            step_id=a.step_id, agent="orchestrator", code=a.code,
                            reason=a.reason, retryable=a.retryable, attempt=a.attempt)),
                        expected_last_subject_seq=a.expected_seq, validate=False)
                    return await self.cache.load(tid), []
                case d.Merge():
                    out.events += await self.merge(state)
                case d.Complete():
                    out.events.append(ev.TaskCompleted(
                        id=end_id(tid), subject=tid, source=SOURCE,
                        data=ev.TaskCompletedData(result=a.result)))
                case d.Fail():
                    out.events += self._cascade_cancel(state, a.reason)
                    out.events.append(failed(tid, a.code, a.reason))
                case d.Cancel():
                    out.events.append(ev.TaskCanceled(
                        id=end_id(tid), subject=tid, source=SOURCE,
                        data=ev.TaskCanceledData(reason=a.reason)))
                case d.Dispatch():
                    self._dispatch(state, a, out)
                case d.Wait():
                    pass
        return await self.flush(state, out, carried, guard), []

    def prefold(self, state: TaskState, events: list[ev.Event]) -> list[ev.Event]:
        """Fold events into the task's fold before they are appended (they go out with
        the next batch, whose acks then only record their sequence numbers)."""
        fold = self.cache.get(state.task_id)
        if fold is None or fold.state is not state:
            fold = Fold(state)  # not cached (a drive that failed half-way): still folded
        for e in events:
            fold.take(pending_entry(e), Origin.PENDING)
        return list(events)

    async def flush(self, state: TaskState, out: Round, carried: list[ev.Event],
                    guard: tuple[str, int] | None = None) -> TaskState:
        """Append `carried` (already folded in) and the round's events, and publish its
        commands, in one pipelined batch, then fold the events in. If JetStream dropped
        any as a duplicate (another replica, or an earlier delivery, made the same
        decision first), the state is read again instead. `guard` (subject, last
        sequence): the task's completion is stored only on that condition
        (AppendConflict otherwise; the events before it in the batch, such as the
        merge's model call, are stored)."""
        events, commands = out.events, out.commands
        if not events and not commands and not carried:
            return state
        await self._ensure_work_consumers(commands)
        if state.traceparent:  # every event of the task carries its trace context
            def stamped(es: list[ev.Event]) -> list[ev.Event]:
                return [e if e.traceparent else e.model_copy(
                    update={"traceparent": state.traceparent}) for e in es]
            events, carried = stamped(events), stamped(carried)
        batch = [*carried, *events]
        expect = [guard if isinstance(e, ev.TaskCompleted) else None for e in batch] \
            if guard else []
        acks = await self.ledger.append_pipelined(batch, validate=False, also=commands,
                                                  expect=expect)
        fold = self.cache.get(state.task_id)
        if fold is None or fold.state is not state or any(a.duplicate for a in acks):
            self.cache.forget(state.task_id)
            return await self.cache.load(state.task_id)
        for ack in acks[:len(carried)]:
            fold.stored(ack)
        for event, ack in zip(events, acks[len(carried):], strict=False):
            fold.take(LedgerEntry(ack.seq, subject_for(event), event), Origin.LOCAL)
        return state

    # ------------------------------------------------------------------ dispatch

    def _cascade_cancel(self, state: TaskState, reason: str) -> list[ev.Event]:
        """Tell every worker running a step of this task to stop (deadline, failure)."""
        running = [st for st in state.steps.values()
                   if st.status in (StepStatus.DISPATCHED, StepStatus.RUNNING)]
        if running and state.cancel_requested is None:
            return [ev.CancelRequested(
                id=f"{state.task_id}-cancel-cascade", subject=state.task_id, source=SOURCE,
                data=ev.CancelRequestedData(reason=reason, by="orchestrator"))]
        return []

    def _dispatch(self, state: TaskState, a: d.Dispatch, out: Round) -> None:
        """The events and the work command of one dispatch (sent by `flush`).

        Schema gate: an input that does not match the skill's input schema fails the
        step here and never reaches a worker. Deterministic ids: a replica or a
        redelivery dispatching the same attempt again is dropped by JetStream's
        duplicate window, on the ledger and on the work queue.
        """
        tid = state.task_id
        skill = (self.skills.current() or {}).get(a.skill)
        errors = schema_errors(skill.input_schema, a.input) if skill else []
        if errors:
            out.events.append(ev.StepFailed(
                id=f"{tid}-{a.step_id}-invalid-{a.attempt}", subject=tid, source=SOURCE,
                data=ev.StepFailedData(
                    step_id=a.step_id, agent="orchestrator", code="invalid_input",
                    reason=f"input does not match skill '{a.skill}': " + "; ".join(errors[:10]),
                    retryable=False, attempt=a.attempt)))
            return
        out.events.append(ev.StepDispatched(
            id=f"{tid}-{a.step_id}-dispatch-{a.attempt}", subject=tid, source=SOURCE,
            data=ev.StepDispatchedData(step_id=a.step_id, skill=a.skill, input=a.input,
                                       attempt=a.attempt)))
        out.commands.append(self.command(state, a))

    def _work_subject(self, skill: str, tenant: str | None) -> str:
        """A tenant's step goes to its private agents' subject when one of them serving
        the skill is live, else to the skill's shared subject: another tenant's private
        agent never sees it (bus.subjects.private_work)."""
        directory = self.skills.directory
        if tenant is not None and directory is not None and any(
                a.private_to(tenant) for a in directory.agents(skill=skill)):
            return subjects.private_work(skill, tenant)
        return subjects.work(skill)

    def command(self, state: TaskState, a: d.Dispatch) -> Command:
        sub = state.submitted
        assert sub is not None
        budget = sub.budget
        slice_usd = None
        if budget and budget.max_usd is not None:
            # Each step gets a fair share of what is left, split across unfinished steps.
            open_steps = sum(1 for st in state.steps.values() if not st.status.terminal)
            slice_usd = max(0.0, budget.max_usd - state.cost_usd) / max(1, open_steps)
        deadline: datetime | None = None
        if budget and budget.deadline_s and state.created_at:
            deadline = state.created_at + timedelta(seconds=budget.deadline_s)
        cmd = ev.StepCommand(task_id=state.task_id, step_id=a.step_id, skill=a.skill,
                             input=a.input, attempt=a.attempt, user_id=sub.user_id,
                             tenant=sub.tenant, budget=budget, slice_usd=slice_usd,
                             deadline=deadline, traceparent=state.traceparent,
                             context=state.context if state.context and state.context.turns
                             else None)
        return Command(self._work_subject(a.skill, sub.tenant),
                       cmd.model_dump_json(exclude_none=True).encode(),
                       {hdr.MSG_ID: f"{state.task_id}-{a.step_id}-{a.attempt}",
                        **({hdr.TRACEPARENT: state.traceparent} if state.traceparent else {})})

    async def republish_dispatched(self, state: TaskState) -> None:
        """First sight of a task in this process (a restart, a replica taking over): a
        step recorded as dispatched but never started may have lost its work command in
        a crash between the ledger append and the publish. Publishing it again is safe:
        the same Nats-Msg-Id is dropped as a duplicate, and a worker skips a step that
        already has its result."""
        if state.terminal or state.submitted is None:
            return
        redo = [self.command(state, d.Dispatch(st.id, st.skill, st.input or {}, st.attempt))
                for st in state.steps.values()
                if st.status is StepStatus.DISPATCHED and st.input is not None]
        if redo:
            await self.ledger.append_pipelined([], validate=False, also=[
                Command(c.subject, c.data, {**c.headers, hdr.RESENT: "restart"})
                for c in redo])

    async def _ensure_work_consumers(self, commands: list[Command]) -> None:
        """Before a skill's first command from this process: its durable work consumer
        exists (created as its workers create it), so a step for a skill whose agents
        are not up yet waits in the work queue for them rather than being swept as work
        nobody takes (bus.sweep)."""
        if self.js is None:  # in-memory ports: no work stream
            return
        for c in commands:
            if subjects.is_private_work(c.subject):
                continue  # its live private agents made its consumer
            skill = c.subject.rsplit(".", 1)[-1]
            if skill in self._work_consumers:
                continue
            await ensure_consumer(self.js, subjects.STREAM_WORK,
                                  work_consumer_config(skill, self.bus_settings))
            self._work_consumers.add(skill)

    # ------------------------------------------------------------------ model calls

    def _guard(self, state: TaskState) -> BudgetGuard | None:
        budget = state.submitted.budget if state.submitted else None
        if budget is None or (budget.max_usd is None and budget.max_tokens is None):
            return None
        return BudgetGuard(self.book, state.task_id, budget)

    def _recorder(self, state: TaskState, purpose: str) -> Recorder:
        return Recorder(purpose, [c for c in state.orchestrator_calls if c.purpose == purpose],
                        self._guard(state))

    @staticmethod
    def _calls(state: TaskState, recorder: Recorder) -> list[ev.Event]:
        return [ev.ModelCalled(subject=state.task_id, source=SOURCE, data=c)
                for c in recorder.new]

    def _model_failure(self, state: TaskState, recorder: Recorder, what: str,
                       bug_code: str, e: Exception) -> list[ev.Event]:
        """The task fails when its planner or merger call does, instead of waiting for
        a redelivery that fails the same way (and, after the last, for nothing: the task
        stayed unplanned, its submission dead-lettered). The model layer has already
        retried and fallen back along its chain by the time a ModelError gets here.
        A bus error is raised on: the drive is retried, nothing is decided on it."""
        if isinstance(e, NatsError | OSError | TimeoutError):
            raise e
        tid = state.task_id
        if isinstance(e, ModelError):
            code = ("model_unavailable" if isinstance(
                e, ModelTransientError | ModelRetriesExhausted) else "model_error")
            log.warning("task %s: %s failed: %s", tid, what, e)
            reason = f"{what}: {e}"
        else:  # a bug of ours: loud in the log, and the task ends
            log.exception("task %s: %s raised", tid, what)
            code, reason = bug_code, f"{what}: internal error {type(e).__name__}: {e}"
        return [*self._calls(state, recorder), failed(tid, code, reason[:2000])]

    async def plan(self, state: TaskState) -> list[ev.Event]:
        tid = state.task_id
        sub = state.submitted
        assert sub is not None
        if sub.replay_of is not None:
            from jetmesh.orchestrator.replay import replayed_plan

            return await replayed_plan(self.ledger, state)
        context = await self.contexts.turns(state)  # None: the task names no context
        if sub.workflow:
            wf = self.workflows.get(sub.workflow)
            if wf is None:  # registry changed since submission
                return [failed(tid, "unknown_workflow", f"unknown workflow '{sub.workflow}'")]
            return [ev.TaskPlanned(
                id=f"{tid}-planned", subject=tid, source=SOURCE, data=ev.TaskPlannedData(
                    planner=f"workflow:{wf.name}", steps=wf.steps, merge=wf.merge,
                    context=context))]
        live = await self.skills.for_planner(sub.tenant)
        skills = sorted((live or {}).values(), key=lambda s: (s.id != "triage", s.id))
        recorder = self._recorder(state, "plan")
        try:
            steps, merge = await plan_with_model(self.model, sub.goal, sub.input, skills,
                                                 recorder, context=for_planner(context))
        except BudgetRefused as e:
            return [*self._calls(state, recorder),
                    failed(tid, "budget_exceeded", f"planning: {e}")]
        except PlanError as e:
            detail = ("; ".join(str(x) for x in e.errors[:5])) if e.errors else ""
            return [*self._calls(state, recorder),
                    failed(tid, "plan_failed", f"{e.reason}{': ' + detail if detail else ''}")]
        except Exception as e:
            return self._model_failure(state, recorder, "planning", "plan_failed", e)
        return [*self._calls(state, recorder), ev.TaskPlanned(
            id=f"{tid}-planned", subject=tid, source=SOURCE, data=ev.TaskPlannedData(
                planner=f"llm:{self.model.provider}/{self.model.name}", steps=steps,
                merge=merge, context=context))]

    async def merge(self, state: TaskState) -> list[ev.Event]:
        tid = state.task_id
        sub = state.submitted
        assert sub is not None
        outputs = {p.id: state.steps[p.id].output or {} for p in state.plan}
        if sub.replay_of is not None and sub.fork is None:
            from jetmesh.orchestrator.replay import replayed_merge

            return await replayed_merge(self.ledger, state, outputs)
        recorder = self._recorder(state, "merge")
        try:
            result = await merge_with_model(self.model, sub.goal, outputs, recorder)
        except BudgetRefused as e:
            return [*self._calls(state, recorder),
                    failed(tid, "budget_exceeded", f"merging: {e}")]
        except Exception as e:
            return self._model_failure(state, recorder, "merging", "merge_failed", e)
        return [*self._calls(state, recorder), ev.TaskCompleted(
            id=end_id(tid), subject=tid, source=SOURCE,
            data=ev.TaskCompletedData(result=result))]
