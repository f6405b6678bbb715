"""Replaying and forking recorded tasks, on the worker's side (`jetmesh replay`, `fork`).

A replayed task is a new task whose submission names the original (`replay_of`). Each of
its steps either is served from the original's records of the same step (every model
response and tool result; an unrecorded call fails the step `replay_diverged`, so no
model is called and no side effect runs) or, in a fork, from `fork.from_step` on, runs
again: with its own model if the fork names one for the agent, and with its side
effects dry-run ("would call", recorded, never executed) unless the fork asks for real
ones. What a step does is derived from the submission and the plan in the ledger, never
taken from the step command alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from jetmesh.agents.loop import StepOutcome, StepReplay
from jetmesh.agents.models.errors import ModelError
from jetmesh.agents.models.types import Model, ModelRequest, ModelResponse
from jetmesh.agents.tools import idempotency_key
from jetmesh.bus import subjects
from jetmesh.bus.events import (
    ForkSpec,
    PlanStep,
    StepDispatched,
    StepDispatchedData,
    StepFailed,
    StepFailedData,
    StepReplaySource,
    TaskPlanned,
    TaskSubmitted,
    TaskSubmittedData,
)
from jetmesh.bus.ledger import Ledger, LedgerEntry

__all__ = [
    "FORK_MODEL_MODULES_ENV",
    "RecordedStep",
    "RecordingOnlyModel",
    "downstream",
    "fork_model",
    "recorded_outcome",
    "recording_of",
    "rekey",
    "rerun_steps",
    "step_source",
]

FORK_MODEL_MODULES_ENV = "JETMESH_FORK_MODEL_MODULES"
"""Comma-separated module prefixes a fork may name as `sim:<module>:<attr>` models (a
fork's submission comes from any client; a worker imports only what this allows)."""


def downstream(plan: Iterable[PlanStep], from_step: str) -> set[str]:
    """`from_step` and every step that depends on it, directly or not."""
    steps = list(plan)
    found = {from_step}
    grew = True
    while grew:
        grew = False
        for p in steps:
            if p.id not in found and found & set(p.depends_on):
                found.add(p.id)
                grew = True
    return found


def rerun_steps(plan: Iterable[PlanStep], fork: ForkSpec) -> set[str]:
    """The steps a fork runs again: `from_step`, `steps`, and everything downstream."""
    steps = list(plan)
    out: set[str] = set()
    for start in [fork.from_step, *fork.steps]:
        out |= downstream(steps, start)
    return out


def step_source(sub: TaskSubmittedData, plan: Iterable[PlanStep] | None, step_id: str,
                agent: str | None = None) -> StepReplaySource | None:
    """How `step_id` of a task with submission `sub` runs (None: not a replay)."""
    if sub.replay_of is None:
        return None
    if sub.fork is None or step_id not in rerun_steps(plan or [], sub.fork):
        return StepReplaySource(of=sub.replay_of)
    model = sub.fork.models.get(agent) if agent is not None else None
    return StepReplaySource(of=sub.replay_of, rerun=True, effects=sub.fork.effects,
                            model=model)


@dataclass
class RecordedStep(StepReplay):
    """A step's recording as a replay serves it: its calls, and how its attempts that
    failed ended (a failure that no recorded response explains, such as a provider
    error or a timeout, is served as recorded once the recording runs out)."""

    failures: list[StepFailedData] = field(default_factory=list)


def rekey(replay: StepReplay, task_id: str, step_id: str,
          original: Iterable[LedgerEntry] = ()) -> RecordedStep:
    """The original task's step replay, its tool results keyed as the new task's calls
    with the same arguments are (idempotency keys include the task id); `original`: the
    original step's entries, for its failures."""
    tools = {}
    for t in replay.tool_results.values():
        key = idempotency_key(task_id, step_id, t.tool, t.arguments)
        tools[key] = t.model_copy(update={"idempotency_key": key})
    failures = [e.event.data for e in original if isinstance(e.event, StepFailed)]
    return RecordedStep(model_responses=list(replay.model_responses), tool_results=tools,
                        in_doubt=set(), failures=failures)


def recorded_outcome(outcome: StepOutcome, replay: StepReplay, attempt: int) -> StepOutcome:
    """A replayed step that ran out of its recording where the original step failed
    ends as the original did (same code, reason, retryable); any other outcome stands."""
    if outcome.code != "replay_diverged" or not isinstance(replay, RecordedStep) \
            or not replay.failures \
            or outcome.replayed_model_calls != len(replay.model_responses):
        return outcome
    same = [f for f in replay.failures if f.attempt == attempt]
    failure = (same or replay.failures)[-1]
    return outcome.model_copy(update={"code": failure.code, "reason": failure.reason,
                                      "retryable": failure.retryable})


def fork_model(target: str) -> Model:
    """The model a fork names (`provider:model`, e.g. `anthropic:claude-...`,
    `sim:dry-run`, `sim:pkg.mod:factory`); ValueError if it is not allowed."""
    from jetmesh.agents.models.factory import create_model

    provider, _, name = target.partition(":")
    if not provider or not name:
        raise ValueError(f"model {target!r}: expected provider:model")
    if provider == "sim" and ":" in name:
        allowed = [m.strip() for m in os.environ.get(FORK_MODEL_MODULES_ENV, "").split(",")
                   if m.strip()]
        module = name.partition(":")[0]
        if not any(module == a or module.startswith(a + ".") for a in allowed):
            raise ValueError(f"model {target!r}: module {module!r} is not allowed "
                             f"({FORK_MODEL_MODULES_ENV})")
    return create_model(provider, name)


MAX_REPLAY_CHAIN = 16
"""Replays of replays followed back to the recording at most this deep."""


async def recording_of(ledger: Ledger, task_id: str, step_id: str
                       ) -> tuple[str, StepDispatchedData | None]:
    """Where step `step_id` of replay source `task_id` was really run: the task itself,
    or, if it is a replay (or a fork that did not re-run the step) itself, its source,
    and so on. Returns that task and the step's last dispatch there (None: never)."""
    source = task_id
    for _ in range(MAX_REPLAY_CHAIN):
        sub: TaskSubmittedData | None = None
        plan: list[PlanStep] | None = None
        dispatched: StepDispatchedData | None = None
        for entry in await ledger.read(source, subject=subjects.task_events(source)):
            e = entry.event
            if isinstance(e, TaskSubmitted) and sub is None:
                sub = e.data
            elif isinstance(e, TaskPlanned) and plan is None:
                plan = e.data.steps
            elif isinstance(e, StepDispatched) and e.data.step_id == step_id:
                dispatched = e.data
        how = step_source(sub, plan, step_id) if sub is not None else None
        if how is None or how.rerun:
            return source, dispatched
        source = how.of
    return source, None


class RecordingOnlyModel:
    """A model for replays: every call must be served from the recording, so being
    asked is a divergence (ModelError), never a provider call."""

    provider = "replay"
    name = "recording-only"

    def __init__(self) -> None:
        self.requests: list[ModelRequest] = []

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.requests.append(request)
        raise ModelError(self.provider, self.name,
                         "replay diverged: a model call that is not in the recording")

    async def aclose(self) -> None:
        return None
