"""What to do next for a task, decided from its state alone (pure; no I/O, no clock reads)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from jetmesh.orchestrator.errors import InputResolutionError
from jetmesh.orchestrator.state import StepStatus, TaskState
from jetmesh.orchestrator.workflows import resolve_input


@dataclass(frozen=True)
class Plan:
    """Plan the task (declared workflow or the LLM planner)."""


@dataclass(frozen=True)
class Dispatch:
    step_id: str
    skill: str
    input: dict[str, Any]
    attempt: int


@dataclass(frozen=True)
class FailStep:
    """Record a step failure the orchestrator observed (timeout); fenced on the step."""

    step_id: str
    code: str
    reason: str
    retryable: bool
    expected_seq: int
    attempt: int


@dataclass(frozen=True)
class Merge:
    """All steps completed and the plan asks for a merge call."""


@dataclass(frozen=True)
class Complete:
    result: dict[str, Any]


@dataclass(frozen=True)
class Fail:
    code: str
    reason: str


@dataclass(frozen=True)
class Cancel:
    reason: str


@dataclass(frozen=True)
class Wait:
    """Nothing to do until an event arrives or `until` passes."""

    until: datetime | None = None
    reason: str = ""


Action = Plan | Dispatch | FailStep | Merge | Complete | Fail | Cancel | Wait

NO_AGENT_WAIT_S = 3600.0
"""How long a dispatched step waits in the work stream for an agent offering its skill
when the task has no deadline and no explicit wait is set (JETMESH_NO_AGENT_WAIT_S)."""


def final_result(state: TaskState) -> dict[str, Any]:
    """Without a merge: every step's output, and the output of the last step(s)."""
    outputs = {sid: st.output or {} for sid, st in state.steps.items()}
    depended = {d for p in state.plan for d in p.depends_on}
    leaves = [p.id for p in state.plan if p.id not in depended]
    result: dict[str, Any] = {"steps": outputs}
    if len(leaves) == 1:
        result["output"] = outputs[leaves[0]]
    return result


def waiting_for_agents(state: TaskState, live_skills: set[str] | None
                       ) -> list[tuple[str, str, datetime | None]]:
    """Steps queued in the work stream that no live agent offers: (step, skill, since)."""
    if live_skills is None or state.terminal:
        return []
    return [(st.id, st.skill, st.dispatched_at) for st in state.steps.values()
            if st.status is StepStatus.DISPATCHED and st.skill not in live_skills]


def decide(
    state: TaskState, now: datetime, *, live_skills: set[str] | None = None,
    no_agent_wait_s: float | None = None, live_since: Mapping[str, datetime] | None = None,
) -> list[Action]:
    """The actions that move `state` forward. Empty: the task is terminal.

    A ready step is dispatched whether or not an agent offering its skill is live: its
    command waits in the skill's durable work stream until one comes. While none is
    live (`live_skills`, None: not checked) the step has no timeout; it waits until the
    task's deadline, or `no_agent_wait_s` after its dispatch if that is set, or
    NO_AGENT_WAIT_S with neither, and then the task fails `no_agent`. A step's timeout
    counts from its dispatch, or from when its skill came (back) to life
    (`live_since`), whichever is later.
    """
    if state.terminal or state.submitted is None:
        return []
    if state.cancel_requested is not None:
        return [Cancel(state.cancel_requested)]
    budget = state.submitted.budget
    deadline: datetime | None = None
    if budget and budget.deadline_s and state.created_at:
        deadline = state.created_at + timedelta(seconds=budget.deadline_s)
        if now >= deadline:
            return [Fail("deadline", f"deadline of {budget.deadline_s:g}s passed")]
    if not state.plan:
        return [Plan()]

    actions: list[Action] = []
    waits: list[datetime] = []
    outputs = {sid: st.output or {} for sid, st in state.steps.items()
               if st.status is StepStatus.COMPLETED}
    for p in state.plan:
        st = state.steps[p.id]
        if st.status is StepStatus.FAILED:
            if st.retryable and st.attempt <= p.retries:
                actions.append(Dispatch(p.id, p.skill, st.input or {}, st.attempt + 1))
                continue
            tries = f" after {st.attempt} attempts" if st.attempt > 1 else ""
            return [Fail("step_failed",
                         f"step {p.id} ({p.skill}) failed{tries} [{st.code}]: {st.reason}")]
        if st.status is StepStatus.PENDING:
            if not all(d in outputs for d in p.depends_on):
                continue
            try:
                step_input = resolve_input(
                    p.input, goal=state.submitted.goal, task_input=state.submitted.input,
                    outputs=outputs)
            except InputResolutionError as e:
                return [Fail("invalid_input", f"step {p.id}: {e}")]
            actions.append(Dispatch(p.id, p.skill, step_input, 1))
        elif st.status in (StepStatus.DISPATCHED, StepStatus.RUNNING) and st.dispatched_at \
                and not any(a.step_id == p.id for a in state.pending_approvals.values()):
            # (A step waiting for a human has the approval's own expiry instead.)
            if live_skills is not None and p.skill not in live_skills:
                if no_agent_wait_s is not None:
                    give_up = st.dispatched_at + timedelta(seconds=no_agent_wait_s)
                    waited = f"{no_agent_wait_s:g}s"
                else:
                    give_up = deadline or st.dispatched_at + timedelta(seconds=NO_AGENT_WAIT_S)
                    waited = f"{(give_up - st.dispatched_at).total_seconds():g}s"
                if now >= give_up:
                    return [Fail("no_agent", f"no live agent offers skill '{p.skill}' "
                                             f"(step {p.id} waited {waited})")]
                waits.append(give_up)
                continue
            since = st.dispatched_at
            back = (live_since or {}).get(p.skill)
            if back is not None and back > since:
                since = back
            timeout_at = since + timedelta(seconds=p.timeout_s)
            if now >= timeout_at:
                actions.append(FailStep(p.id, "timeout",
                                        f"no result within {p.timeout_s:g}s", True,
                                        st.last_seq, st.attempt))
            else:
                waits.append(timeout_at)
    if actions:
        return actions
    if all(state.steps[p.id].status is StepStatus.COMPLETED for p in state.plan):
        if state.merge:
            return [Merge()]
        return [Complete(final_result(state))]
    if deadline is not None:  # wake at the deadline even if no step reports by then
        waits.append(deadline)
    return [Wait(min(waits) if waits else None)]
