"""Task state as a pure fold of ledger events (A2A task states). No I/O here."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.ledger import LedgerEntry


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


class StepState(BaseModel):
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
    model_calls: int = 0
    tool_calls: int = 0
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    last_seq: int = 0
    """Last stream sequence on this step's line (for fenced appends; its log of model
    and read-only tool calls does not count)."""


class TaskState(BaseModel):
    """Everything known about one task, derived from its events only."""

    task_id: str
    status: TaskStatus = TaskStatus.SUBMITTED
    submitted: ev.TaskSubmittedData | None = None
    planner: str | None = None
    plan: list[ev.PlanStep] = Field(default_factory=list)
    merge: bool = False
    steps: dict[str, StepState] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    code: str | None = None
    reason: str | None = None
    cancel_requested: str | None = None
    created_at: datetime | None = None
    planned_at: datetime | None = None
    updated_at: datetime | None = None
    model_calls: int = 0
    tool_calls: int = 0
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    last_seq: int = 0
    """Highest stream sequence folded."""
    pending_approvals: dict[str, ev.ApprovalRequestedData] = Field(default_factory=dict)
    """Gated tool calls waiting for a human, by `approval_key`."""
    decisions: dict[str, str] = Field(default_factory=dict)
    """First decision per `approval_key`: granted or denied (later ones do not count)."""
    budget_exceeded: list[ev.BudgetExceededData] = Field(default_factory=list)
    orchestrator_calls: list[ev.ModelCalledData] = Field(default_factory=list)
    """The orchestrator's own model calls (plan, merge), for replay."""

    @property
    def terminal(self) -> bool:
        return self.status.terminal


def approval_key(step_id: str, tool: str, args_hash: str) -> str:
    """What an approval binds to (within one task): the step, the tool, the arguments."""
    return f"{step_id}/{tool}/{args_hash}"


def _step(state: TaskState, step_id: str, skill: str = "?") -> StepState:
    st = state.steps.get(step_id)
    if st is None:
        st = state.steps[step_id] = StepState(id=step_id, skill=skill)
    return st


def apply(state: TaskState, entry: LedgerEntry, *, check_seq: bool = True) -> TaskState:
    """Fold one event into `state` (mutates and returns it). Never raises on valid events.

    Terminal states stay terminal: later events still count toward usage and step
    records (a late step result is audit history) but never change the task's status.
    """
    e = entry.event
    if check_seq and entry.seq <= state.last_seq:
        return state  # already folded (replays are idempotent)
    state.last_seq = max(state.last_seq, entry.seq)
    if e.time and (state.updated_at is None or e.time > state.updated_at):
        state.updated_at = e.time
    terminal = state.terminal

    match e:
        case ev.TaskSubmitted():
            if state.submitted is None:
                state.submitted = e.data
                state.created_at = e.time
        case ev.TaskRejected():
            if not terminal:
                state.status, state.code, state.reason = TaskStatus.REJECTED, "rejected", \
                    e.data.reason
        case ev.TaskPlanned():
            if not state.plan:
                state.planner, state.plan, state.merge = e.data.planner, e.data.steps, \
                    e.data.merge
                state.planned_at = e.time
                for p in e.data.steps:
                    _step(state, p.id, p.skill)
            if not terminal:
                state.status = TaskStatus.WORKING
        case ev.StepDispatched():
            st = _step(state, e.data.step_id, e.data.skill)
            if e.data.attempt >= st.attempt:
                st.attempt = e.data.attempt
                st.input = e.data.input
                st.dispatched_at = e.time
                if not st.status.terminal or st.status == StepStatus.FAILED:
                    st.status = StepStatus.DISPATCHED
                    st.code = st.reason = None
        case ev.StepStarted():
            st = _step(state, e.data.step_id)
            if not subjects.is_step_log(entry.subject):  # a claim, not a logged start
                st.last_seq = entry.seq
            if not st.status.terminal:
                st.status = StepStatus.RUNNING
                st.agent, st.worker, st.started_at = e.data.agent, e.data.worker, e.time
        case ev.ModelCalled():
            d = e.data
            state.model_calls += 1
            state.cost_usd += d.cost_usd
            state.input_tokens += d.input_tokens
            state.output_tokens += d.output_tokens
            if d.step_id:
                st = _step(state, d.step_id)
                if not subjects.is_step_log(entry.subject):
                    st.last_seq = entry.seq
                st.model_calls += 1
                st.cost_usd += d.cost_usd
                st.input_tokens += d.input_tokens
                st.output_tokens += d.output_tokens
            else:
                state.orchestrator_calls.append(d)
        case ev.ToolCalled():
            state.tool_calls += 1
            st = _step(state, e.data.step_id)
            if not subjects.is_step_log(entry.subject):
                st.last_seq = entry.seq
            st.tool_calls += 1
        case ev.StepCompleted():
            st = _step(state, e.data.step_id)
            st.last_seq = entry.seq
            if not st.status.terminal:
                st.status, st.output, st.finished_at = StepStatus.COMPLETED, e.data.output, e.time
                st.agent = e.data.agent
        case ev.StepFailed():
            st = _step(state, e.data.step_id)
            st.last_seq = entry.seq
            if not st.status.terminal and e.data.attempt >= st.attempt:
                st.status, st.finished_at = StepStatus.FAILED, e.time
                st.code, st.reason, st.retryable = e.data.code, e.data.reason, e.data.retryable
        case ev.CancelRequested():
            if state.cancel_requested is None:
                state.cancel_requested = e.data.reason
        case ev.PolicyDecided():
            st = _step(state, e.data.step_id)
            st.last_seq = entry.seq
            if e.data.rule == "approval-timeout":  # the wait expired: a denial
                key = approval_key(e.data.step_id, e.data.tool, e.data.args_hash)
                if key not in state.decisions:
                    state.decisions[key] = "denied"
                    state.pending_approvals.pop(key, None)
                    if not terminal and not state.pending_approvals and \
                            state.status is TaskStatus.INPUT_REQUIRED:
                        state.status = TaskStatus.WORKING
        case ev.ApprovalRequested():
            st = _step(state, e.data.step_id)
            st.last_seq = entry.seq
            key = approval_key(e.data.step_id, e.data.tool, e.data.args_hash)
            if key not in state.decisions:
                state.pending_approvals[key] = e.data
                if not terminal:
                    state.status = TaskStatus.INPUT_REQUIRED
        case ev.ApprovalGranted() | ev.ApprovalDenied():
            key = approval_key(e.data.step_id, e.data.tool, e.data.args_hash)
            if key not in state.decisions:
                state.decisions[key] = (
                    "granted" if isinstance(e, ev.ApprovalGranted) else "denied")
                state.pending_approvals.pop(key, None)
                if not terminal and not state.pending_approvals and \
                        state.status is TaskStatus.INPUT_REQUIRED:
                    state.status = TaskStatus.WORKING
        case ev.BudgetExceeded():
            state.budget_exceeded.append(e.data)
            if e.data.step_id:
                _step(state, e.data.step_id).last_seq = entry.seq
        case ev.TaskCompleted():
            if not terminal:
                state.status, state.result = TaskStatus.COMPLETED, e.data.result
        case ev.TaskFailed():
            if not terminal:
                state.status, state.code, state.reason = TaskStatus.FAILED, e.data.code, \
                    e.data.reason
        case ev.TaskCanceled():
            if not terminal:
                state.status, state.code, state.reason = TaskStatus.CANCELED, "canceled", \
                    e.data.reason
    return state


def fold(task_id: str, entries: Iterable[LedgerEntry], state: TaskState | None = None
         ) -> TaskState:
    """Fold `entries` (in stream order) into a task state."""
    st = state or TaskState(task_id=task_id)
    for entry in entries:
        apply(st, entry)
    return st
