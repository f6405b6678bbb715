"""Task state as a pure fold of ledger events (A2A task states). No I/O here."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from jetmesh.agents.models.types import UsageTotals
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.ledger import LedgerEntry, is_log_seq
from jetmesh.bus.tracecontext import task_traceparent


class TaskStatus(StrEnum):
    """A2A task states."""

    SUBMITTED = "submitted"
    WORKING = "working"
    INPUT_REQUIRED = "input-required"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    REJECTED = "rejected"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELED, TaskStatus.REJECTED}
)


class StepStatus(StrEnum):
    PENDING = "pending"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (StepStatus.COMPLETED, StepStatus.FAILED)


class StepState(UsageTotals):
    id: str
    skill: str
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    """Latest dispatched attempt (0: never dispatched)."""
    input: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    agent: str | None = None
    worker: str | None = None
    code: str | None = None
    reason: str | None = None
    retryable: bool = False
    dispatched_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    last_seq: int = 0
    """Last stream sequence on this step's line (for fenced appends; its log of model
    and read-only tool calls does not count)."""
    holder: str | None = None
    """The worker holding the step's line: the one of its latest claim (a StepStarted on
    the line), or, on a line not claimed yet, the writer of its first fenced append (a
    first delivery's claim); `orchestrator` once the orchestrator failed the attempt."""
    logged: str | None = None
    """The worker of a first delivery's logged start (not a claim), while the line has
    no holder yet."""


class IgnoredEvent(BaseModel):
    """An event the fold did not count, and why (shown by `jetmesh show`)."""

    seq: int
    type: str
    step_id: str | None = None
    reason: str


MAX_IGNORED = 100
"""Ignored events kept in a fold (all are counted in `ignored_count`)."""

ORCHESTRATOR = "orchestrator"
"""The `agent` of the orchestrator's own step failures, and the holder they leave."""


class TaskState(UsageTotals):
    """Everything known about one task, derived from its events only."""

    task_id: str
    status: TaskStatus = TaskStatus.SUBMITTED
    submitted: ev.TaskSubmittedData | None = None
    traceparent: str | None = None
    """The task's root trace context (bus.tracecontext), which its events carry."""
    planner: str | None = None
    plan: list[ev.PlanStep] = Field(default_factory=list)
    merge: bool = False
    context: ev.PlanContext | None = None
    """The earlier turns of its conversation it was planned with (orchestrator.context)."""
    steps: dict[str, StepState] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    code: str | None = None
    reason: str | None = None
    cancel_requested: str | None = None
    created_at: datetime | None = None
    planned_at: datetime | None = None
    updated_at: datetime | None = None
    last_seq: int = 0
    """Highest stream sequence folded."""
    pending_approvals: dict[str, ev.ApprovalRequestedData] = Field(default_factory=dict)
    """Gated tool calls waiting for a human, by `approval_key`."""
    decisions: dict[str, str] = Field(default_factory=dict)
    """First decision per `approval_key`: granted or denied (later ones do not count)."""
    budget_exceeded: list[ev.BudgetExceededData] = Field(default_factory=list)
    orchestrator_calls: list[ev.ModelCalledData] = Field(default_factory=list)
    """The orchestrator's own model calls (plan, merge), for replay."""
    ignored: list[IgnoredEvent] = Field(default_factory=list)
    """Events that did not count (the first MAX_IGNORED): step events not written by the
    step's holder, events of steps never dispatched, step events off their subject."""
    ignored_count: int = 0

    @property
    def terminal(self) -> bool:
        return self.status.terminal


def approval_key(step_id: str, tool: str, args_hash: str) -> str:
    """What an approval binds to (within one task): the step, the tool, the arguments."""
    return f"{step_id}/{tool}/{args_hash}"


def _ignore(state: TaskState, entry: LedgerEntry, step_id: str | None, reason: str
            ) -> TaskState:
    state.ignored_count += 1
    if len(state.ignored) < MAX_IGNORED:
        state.ignored.append(IgnoredEvent(seq=entry.seq, type=entry.event.type,
                                          step_id=step_id, reason=reason))
    return state


def _end(state: TaskState, status: TaskStatus, code: str | None, reason: str | None) -> None:
    """The task's end: nothing is pending any more (a gated call of a finished task
    waits for nobody)."""
    state.status, state.code, state.reason = status, code, reason
    state.pending_approvals.clear()


def _not_holder(st: StepState, worker: str | None) -> str | None:
    """Why a record written by `worker` does not count on this step now (None: it does).

    The holder at this point of the step's line: the worker of its latest claim, else
    the writer of its first fenced append, else (nothing on the line yet) the worker of
    a first delivery's logged start. Records that name no worker (the orchestrator's,
    or written before records named one) count."""
    if worker is None:
        return None
    holder = st.holder if st.holder is not None else st.logged
    if holder is None or holder == worker:
        return None
    return f"written by {worker}, not the step's holder {holder}"


def _by_orchestrator(e: ev.Event) -> bool:
    return isinstance(e, ev.StepFailed) and e.data.agent == ORCHESTRATOR


_STEP_EVENTS = (ev.StepStarted, ev.ToolCalled, ev.StepCompleted, ev.StepFailed,
                ev.PolicyDecided, ev.ApprovalRequested)
_OTHER_STEP_EVENTS = (ev.EffectStarted, ev.ModelRouted, ev.ContextCompacted, ev.BudgetAlerted)
"""Step events this fold keeps the line's sequence of but does not otherwise use."""


def apply(state: TaskState, entry: LedgerEntry, *, check_seq: bool = True) -> TaskState:
    """Fold one event into `state` (mutates and returns it). Never raises on valid events.

    Terminal states stay terminal: later step events still count toward usage and step
    records (a late step result is audit history) but never change the task's status,
    and control messages after the end (a cancel, an approval) change nothing.

    A step's events count only from its subject, for a step that was dispatched, and
    (results, model and tool calls) only when written by the step's holder at that
    point of its line (see `_not_holder`); the others are listed in `ignored`.
    """
    e = entry.event
    if is_log_seq(entry.seq):
        pass  # a step's log record (stream JM_LOG): `last_seq` is a ledger sequence
    elif check_seq and entry.seq <= state.last_seq:
        return state  # already folded (replays are idempotent)
    else:
        state.last_seq = max(state.last_seq, entry.seq)
    if e.time and (state.updated_at is None or e.time > state.updated_at):
        state.updated_at = e.time
    step_id = subjects.step_id_of(entry.subject)
    if step_id is not None:
        return _apply_step(state, entry, step_id)
    terminal = state.terminal

    match e:
        case ev.TaskSubmitted():
            if state.submitted is None:
                state.submitted = e.data
                state.created_at = e.time
                state.traceparent = task_traceparent(state.task_id, e.traceparent)
        case ev.TaskRejected():
            if not terminal:
                _end(state, TaskStatus.REJECTED, "rejected", e.data.reason)
        case ev.TaskPlanned():
            if not state.plan:
                state.planner, state.plan, state.merge = e.data.planner, e.data.steps, \
                    e.data.merge
                state.context = e.data.context
                state.planned_at = e.time
                for p in e.data.steps:
                    if p.id not in state.steps:
                        state.steps[p.id] = StepState(id=p.id, skill=p.skill)
            if not terminal:
                state.status = TaskStatus.WORKING
        case ev.StepDispatched():
            st = state.steps.get(e.data.step_id)
            if st is None:
                return _ignore(state, entry, e.data.step_id, "step not in the plan")
            if e.data.attempt >= st.attempt:
                st.attempt = e.data.attempt
                st.input = e.data.input
                st.dispatched_at = e.time
                if not st.status.terminal or st.status == StepStatus.FAILED:
                    st.status = StepStatus.DISPATCHED
                    st.code = st.reason = None
        case ev.ModelCalled() if e.data.step_id is None:
            _count_model(state, None, e.data)
            state.orchestrator_calls.append(e.data)
        case ev.CancelRequested():
            if not terminal and state.cancel_requested is None:
                state.cancel_requested = e.data.reason
        case ev.ApprovalGranted() | ev.ApprovalDenied():
            key = approval_key(e.data.step_id, e.data.tool, e.data.args_hash)
            if not terminal and key not in state.decisions:
                state.decisions[key] = (
                    "granted" if isinstance(e, ev.ApprovalGranted) else "denied")
                state.pending_approvals.pop(key, None)
                if not state.pending_approvals and state.status is TaskStatus.INPUT_REQUIRED:
                    state.status = TaskStatus.WORKING
        case ev.BudgetExceeded() if e.data.step_id is None:
            state.budget_exceeded.append(e.data)
        case ev.TaskCompleted():
            if not terminal:
                _end(state, TaskStatus.COMPLETED, None, None)
                state.result = e.data.result
        case ev.TaskFailed():
            if not terminal:
                _end(state, TaskStatus.FAILED, e.data.code, e.data.reason)
        case ev.TaskCanceled():
            if not terminal:
                _end(state, TaskStatus.CANCELED, "canceled", e.data.reason)
        case _:
            data_step = getattr(e.data, "step_id", None)
            return _ignore(state, entry, data_step if isinstance(data_step, str) else None,
                           "a step's event off its step's subject")
    return state


def _count_model(state: TaskState, st: StepState | None, d: ev.ModelCalledData) -> None:
    state.model_calls += 1
    state.cost_usd += d.cost_usd
    state.input_tokens += d.input_tokens
    state.output_tokens += d.output_tokens
    if st is not None:
        st.model_calls += 1
        st.cost_usd += d.cost_usd
        st.input_tokens += d.input_tokens
        st.output_tokens += d.output_tokens


def _apply_step(state: TaskState, entry: LedgerEntry, step_id: str) -> TaskState:
    """An event on a step's line or log (see `apply`)."""
    e = entry.event
    on_line = not subjects.is_step_log(entry.subject)
    st = state.steps.get(step_id)
    if st is not None and on_line:
        st.last_seq = entry.seq  # the line's last sequence (fences), whatever counts
    known = isinstance(e, (*_STEP_EVENTS, ev.ModelCalled, ev.BudgetExceeded,
                           *_OTHER_STEP_EVENTS))
    if not known or getattr(e.data, "step_id", None) != step_id:
        return _ignore(state, entry, step_id, "not an event of this step's subject")
    if st is None:
        return _ignore(state, entry, step_id, "step never dispatched")
    if st.attempt == 0 and not _by_orchestrator(e):
        return _ignore(state, entry, step_id, "step never dispatched")
    terminal = state.terminal
    worker = getattr(e.data, "worker", None)
    worker = worker if isinstance(worker, str) else None

    match e:
        case ev.StepStarted():
            if on_line:  # a claim: the line is this worker's from here
                st.holder, st.logged = e.data.worker, None
            elif st.holder is None:
                st.logged = e.data.worker
            else:
                return _ignore(state, entry, step_id,
                               f"a start logged by {e.data.worker} after {st.holder} "
                               "claimed the step")
            if not st.status.terminal:
                st.status = StepStatus.RUNNING
                st.agent, st.worker, st.started_at = e.data.agent, e.data.worker, e.time
        case ev.ModelCalled():
            why = _not_holder(st, worker)
            if why:
                return _ignore(state, entry, step_id, why)
            _count_model(state, st, e.data)
        case ev.ToolCalled():
            if on_line and st.holder is None and worker is not None:
                st.holder = worker  # its first fenced append claims the line
            why = _not_holder(st, worker)
            if why:
                return _ignore(state, entry, step_id, why)
            state.tool_calls += 1
            st.tool_calls += 1
        case ev.StepCompleted() | ev.StepFailed():
            if _by_orchestrator(e):
                st.holder, st.logged = ORCHESTRATOR, None  # that attempt's holding ends
            else:
                if st.holder is None and worker is not None:
                    st.holder = worker
                why = _not_holder(st, worker)
                if why:
                    return _ignore(state, entry, step_id, why)
            if isinstance(e, ev.StepCompleted):
                if not st.status.terminal:
                    st.status, st.output, st.finished_at = StepStatus.COMPLETED, \
                        e.data.output, e.time
                    st.agent = e.data.agent
            elif not st.status.terminal and e.data.attempt >= st.attempt:
                st.status, st.finished_at = StepStatus.FAILED, e.time
                st.code, st.reason, st.retryable = e.data.code, e.data.reason, \
                    e.data.retryable
        case ev.PolicyDecided():
            if e.data.rule == "approval-timeout":  # the wait expired: a denial
                key = approval_key(e.data.step_id, e.data.tool, e.data.args_hash)
                if key not in state.decisions:
                    state.decisions[key] = "denied"
                    state.pending_approvals.pop(key, None)
                    if not terminal and not state.pending_approvals and \
                            state.status is TaskStatus.INPUT_REQUIRED:
                        state.status = TaskStatus.WORKING
        case ev.ApprovalRequested():
            key = approval_key(e.data.step_id, e.data.tool, e.data.args_hash)
            if not terminal and key not in state.decisions:
                state.pending_approvals[key] = e.data
                state.status = TaskStatus.INPUT_REQUIRED
        case ev.BudgetExceeded():
            state.budget_exceeded.append(e.data)
        case _:  # another record of the step's line (a claim check before an effect)
            if on_line and st.holder is None and worker is not None:
                st.holder = worker
    return state



def fold(task_id: str, entries: Iterable[LedgerEntry], state: TaskState | None = None
         ) -> TaskState:
    """Fold `entries` (in stream order) into a task state."""
    st = state or TaskState(task_id=task_id)
    for entry in entries:
        apply(st, entry)
    return st
