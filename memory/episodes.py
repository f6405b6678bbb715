"""Episodes from the ledger: pure functions from a task's events to an `EpisodeRecord`.

Every finished step attempt (`StepCompleted` / `StepFailed`) and every finished task
(`TaskCompleted` / `TaskFailed` / `TaskCanceled`) becomes one episode. The episode
says what was asked (the step's resolved input, or the task's goal), for whom (the
user of the task's `TaskSubmitted`), by which agent, what came out, what it cost, and
the ledger sequence numbers it was built from. No I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.ledger import LedgerEntry, through
from jetmesh.memory.models import EpisodeRecord, tenant_scoped

EPISODE_EVENTS = (ev.StepCompleted, ev.StepFailed, ev.TaskCompleted, ev.TaskFailed,
                  ev.TaskCanceled)
"""Events that finish a step attempt or a task: each becomes one episode."""

MAX_TEXT = 8000
"""Longest request or outcome text kept in an episode (characters)."""


def is_episode_event(event: ev.Event) -> bool:
    """True when `event` finishes a step attempt or a task."""
    return isinstance(event, EPISODE_EVENTS)


def render(value: Any, limit: int = MAX_TEXT) -> str:
    """Readable text of a JSON value: ``key: value`` pairs, lists joined, strings as-is."""
    text = _render(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _render(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_render(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_render(v) for v in value)
    return json.dumps(value, ensure_ascii=False, default=str)


def build_episode(entries: Sequence[LedgerEntry], seq: int) -> EpisodeRecord | None:
    """The episode of the finishing event at `seq`, from its task's ledger entries.

    `entries` are the task's events in order (later ones are ignored). Returns None
    when the event at `seq` is not in `entries` or does not finish anything.
    """
    upto = through(entries, seq)
    last = next((e for e in reversed(upto) if e.seq == seq), None)
    if last is None:
        return None
    event = last.event
    if isinstance(event, ev.StepCompleted | ev.StepFailed):
        return _step_episode(upto, last, event)
    if isinstance(event, ev.TaskCompleted | ev.TaskFailed | ev.TaskCanceled):
        return _task_episode(upto, last, event)
    return None


def _submitted(entries: Sequence[LedgerEntry]) -> LedgerEntry | None:
    return next((e for e in entries if isinstance(e.event, ev.TaskSubmitted)), None)


def _user(submitted: LedgerEntry | None) -> str | None:
    if submitted is None or not isinstance(submitted.event, ev.TaskSubmitted):
        return None
    data = submitted.event.data
    user: str | None = tenant_scoped(data.user_id, data.tenant)
    return user


def _tenant(submitted: LedgerEntry | None) -> str | None:
    if submitted is None or not isinstance(submitted.event, ev.TaskSubmitted):
        return None
    return submitted.event.data.tenant


def _cost(entries: Sequence[LedgerEntry]) -> float:
    return float(sum(e.event.data.cost_usd for e in entries
                     if isinstance(e.event, ev.ModelCalled)))


def _skill_of(entries: Sequence[LedgerEntry], step_id: str) -> str | None:
    for e in entries:
        if isinstance(e.event, ev.TaskPlanned):
            for p in e.event.data.steps:
                if p.id == step_id:
                    return str(p.skill)
    return None


def _step_episode(entries: Sequence[LedgerEntry], last: LedgerEntry,
                  event: ev.StepCompleted | ev.StepFailed) -> EpisodeRecord:
    task_id, step_id, attempt = event.subject, event.data.step_id, event.data.attempt
    step_subjects = {subjects.step_events(task_id, step_id), subjects.step_log(task_id, step_id)}
    # The attempt's own events: those of the step (line and log) after the previous finish.
    segment: list[LedgerEntry] = []
    for e in entries:
        if e.subject not in step_subjects:
            continue
        segment.append(e)
        if e is not last and isinstance(e.event, ev.StepCompleted | ev.StepFailed):
            segment = []
    dispatched = next(
        (e for e in reversed(entries)
         if isinstance(e.event, ev.StepDispatched) and e.event.data.step_id == step_id
         and e.event.data.attempt == attempt),
        None,
    )
    skill = _skill_of(entries, step_id)
    if dispatched is not None and isinstance(dispatched.event, ev.StepDispatched):
        skill = dispatched.event.data.skill
        asked = render(dispatched.event.data.input) or "(no input)"
    else:
        asked = "(never dispatched)"
    request = f"[{skill or step_id}] {asked}"
    agent = event.data.agent or next(
        (e.event.data.agent for e in segment if isinstance(e.event, ev.StepStarted)), None)
    if isinstance(event, ev.StepCompleted):
        outcome = render(event.data.output)
    else:
        outcome = f"failed ({event.data.code}): {event.data.reason}"
    submitted = _submitted(entries)
    seqs = {e.seq for e in segment}
    seqs.update(x.seq for x in (submitted, dispatched) if x is not None)
    return EpisodeRecord(
        task_id=task_id,
        step_id=step_id,
        attempt=attempt,
        request=render(request),
        outcome=render(outcome),
        user_id=_user(submitted),
        agent_id=tenant_scoped(agent, _tenant(submitted)),
        cost_usd=_cost(segment),
        ledger_seqs=sorted(seqs),
    )


def _task_episode(entries: Sequence[LedgerEntry], last: LedgerEntry,
                  event: ev.TaskCompleted | ev.TaskFailed | ev.TaskCanceled) -> EpisodeRecord:
    submitted = _submitted(entries)
    request = ""
    if submitted is not None and isinstance(submitted.event, ev.TaskSubmitted):
        data = submitted.event.data
        request = data.goal
        if data.workflow:
            request = f"{request} [workflow {data.workflow}]".strip()
        if data.input:
            request = f"{request}\nInput: {render(data.input)}".strip()
    if isinstance(event, ev.TaskCompleted):
        result = event.data.result
        outcome = render(result.get("output", result))
    elif isinstance(event, ev.TaskFailed):
        outcome = f"failed ({event.data.code}): {event.data.reason}"
    else:
        outcome = f"canceled: {event.data.reason}"
    seqs = {last.seq}
    for e in entries:
        if isinstance(e.event, ev.TaskSubmitted | ev.TaskPlanned | ev.StepCompleted
                      | ev.StepFailed):
            seqs.add(e.seq)
    return EpisodeRecord(
        task_id=event.subject,
        request=render(request) or f"task {event.subject}",
        outcome=outcome,
        user_id=_user(submitted),
        cost_usd=_cost(entries),
        ledger_seqs=sorted(seqs),
    )
