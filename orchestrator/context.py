"""Multi-turn contexts: a task is planned with the earlier turns of its conversation.

A task belongs to a context when its submission's metadata names one
(``a2a.context_id``: the A2A gateway sets it from the message's ``contextId``; a NATS
client sets it itself). When the orchestrator plans such a task, `Contexts.turns`
adds the task to its context's list (KV ``jm-contexts``, key ``<tenant>.<context>``, task
ids in planning order, compare-and-set) and reads the tasks before it *from the ledger*:
each one's goal and input (its ``TaskSubmitted``) and its final answer (``TaskCompleted``'s
result, or why it failed). The turns go to the planner and are recorded on the task's
``TaskPlanned`` (``data.context``, each turn naming the task and the last ledger sequence
read), so the ledger shows exactly what the task knew of the conversation.

Bounded: the last `max_turns` turns, each field clipped, the whole at most `max_chars`
of JSON (the oldest go first; ``omitted`` counts what was left out). Tenants never see
each other's contexts (the tenant is part of the key). A context with no new task for
`idle_s` (30 days) is forgotten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.ledger_port import TaskLedger
from jetmesh.bus.presence import ensure_bucket
from jetmesh.bus.settings import BusSettings
from jetmesh.orchestrator.state import TaskState, TaskStatus, fold
from jetmesh.orchestrator.tasks_kv import A2A_CONTEXT_KEY

__all__ = ["CONTEXT_KEY", "ContextLimits", "Contexts", "context_id_of", "for_planner"]

log = logging.getLogger("jetmesh.orchestrator.context")

CONTEXT_KEY = A2A_CONTEXT_KEY
"""The submission metadata entry naming a task's context."""

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ContextLimits:
    max_turns: int = 5
    """Earlier turns given to a task (the latest)."""
    max_chars: int = 8000
    """The turns' JSON, at most."""
    max_field_chars: int = 2000
    """A goal or an answer, clipped to this."""
    max_input_chars: int = 1000
    """An input larger than this (as JSON) is left out of its turn."""
    keep_tasks: int = 50
    """Task ids kept per context in the bucket (the latest)."""
    idle_s: float = 30 * 86400.0
    """A context with no new task for this long is forgotten (the bucket's max age; every
    A2A task has a context, a new one when its client names none)."""


def context_id_of(state: TaskState) -> str | None:
    sub = state.submitted
    return (sub.metadata.get(CONTEXT_KEY) or None) if sub else None


_NO_TENANT = "="
"""The key's tenant part for tasks of no tenant ('=' is no tenant id: a tenant named '_'
has contexts of its own)."""


def _key_part(value: str) -> str:
    """A KV key token for a client-chosen string (hashed when it is not one: '=' and the
    hash, which no token spells, so an id written like another's hash is not that one)."""
    if _TOKEN.match(value):
        return value
    return "=" + hashlib.sha256(value.encode()).hexdigest()[:40]


def _is_task_id(value: object) -> bool:
    try:
        subjects.check_id(value, "task id")  # type: ignore[arg-type]
    except subjects.InvalidIdError:
        return False
    return True


def _task_ids(key: str, value: bytes | None) -> list[str]:
    """A context's task list as stored; a value that is not a list of task ids (corrupt,
    or written by something else) is logged and read as the ids it does hold, so the
    context's next task is still planned (with what can be read)."""
    try:
        ids = json.loads(value or b"[]")
    except ValueError:
        ids = None
    if not isinstance(ids, list):
        log.warning("context %s: its task list is not a JSON list (%s); starting it again",
                    key, ascii(value)[:120])
        return []
    good = [i for i in ids if _is_task_id(i)]
    if len(good) != len(ids):
        log.warning("context %s: %d entries of its task list are not task ids; left out",
                    key, len(ids) - len(good))
    return good


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _answer(state: TaskState, limit: int) -> str | None:
    if state.status is TaskStatus.COMPLETED and state.result is not None:
        text = state.result.get("answer")
        if not isinstance(text, str):
            text = json.dumps(state.result, ensure_ascii=False, sort_keys=True)
        return _clip(text, limit)
    if state.terminal:
        return _clip(f"{state.status.value}: {state.reason or ''}".strip(), limit)
    return None


def _turn(state: TaskState, limits: ContextLimits) -> ev.ContextTurn:
    sub = state.submitted
    task_input = sub.input if sub and sub.input else None
    if task_input is not None and len(json.dumps(task_input)) > limits.max_input_chars:
        task_input = None
    return ev.ContextTurn(
        task_id=state.task_id, status=state.status.value,
        goal=_clip(sub.goal if sub else "", limits.max_field_chars), input=task_input,
        answer=_answer(state, limits.max_field_chars), seq=state.last_seq)


def bounded(context_id: str, turns: list[ev.ContextTurn], earlier: int,
            limits: ContextLimits) -> ev.PlanContext:
    """The latest turns that fit the bounds; `earlier`: how many turns there were."""
    kept = turns[-limits.max_turns:] if limits.max_turns > 0 else []
    while kept and len(ev.PlanContext(context_id=context_id, turns=kept)
                       .model_dump_json()) > limits.max_chars:
        kept = kept[1:]
    return ev.PlanContext(context_id=context_id, turns=kept, omitted=earlier - len(kept))


def for_planner(context: ev.PlanContext | None) -> list[dict[str, Any]] | None:
    """The turns as the planner's prompt shows them (None: no earlier turn)."""
    if context is None or not context.turns:
        return None
    return [t.model_dump(exclude_none=True, exclude={"seq"}) for t in context.turns]


class Contexts:
    """The contexts' task lists (jm-contexts) and the turns read from the ledger."""

    def __init__(self, js: JetStreamContext | None, ledger: TaskLedger,
                 limits: ContextLimits | None = None) -> None:
        self.js = js
        """None (an orchestrator on in-memory ports): the lists are kept in this process."""
        self.ledger = ledger
        self.limits = limits or ContextLimits()
        self._kv: KeyValue | None = None
        self._memory: dict[str, list[str]] = {}

    async def _bucket(self) -> KeyValue:
        assert self.js is not None
        if self._kv is None:
            self._kv = await ensure_bucket(self.js, subjects.BUCKET_CONTEXTS,
                                           max_age_s=self.limits.idle_s,
                                           replicas=BusSettings().replicas)
        return self._kv

    @staticmethod
    def key(context_id: str, tenant: str | None) -> str:
        return f"{_key_part(tenant) if tenant else _NO_TENANT}.{_key_part(context_id)}"

    async def join(self, context_id: str, tenant: str | None, task_id: str) -> list[str]:
        """Add `task_id` to its context (once); returns the task ids before it."""
        key = self.key(context_id, tenant)
        if self.js is None:
            kept = self._memory.setdefault(key, [])
            if task_id not in kept:
                kept.append(task_id)
                del kept[:-self.limits.keep_tasks]
            return kept[:kept.index(task_id)]
        kv = await self._bucket()
        while True:
            try:
                entry = await kv.get(key)
                ids = _task_ids(key, entry.value)
                rev: int | None = entry.revision
            except KeyNotFoundError:
                ids, rev = [], None
            if task_id in ids:
                return ids[:ids.index(task_id)]
            value = json.dumps([*ids, task_id][-self.limits.keep_tasks:]).encode()
            with contextlib.suppress(KeyWrongLastSequenceError):
                if rev is None:
                    await kv.create(key, value)
                else:
                    await kv.update(key, value, last=rev)
                return ids

    async def turns(self, state: TaskState) -> ev.PlanContext | None:
        """The earlier turns of the task's context (None: it names no context, or it is
        a replay, which is planned as its original was)."""
        sub = state.submitted
        context_id = context_id_of(state)
        if sub is None or context_id is None or sub.replay_of is not None:
            return None
        before = await self.join(context_id, sub.tenant, state.task_id)
        turns: list[ev.ContextTurn] = []
        for task_id in before[-self.limits.max_turns:]:
            earlier = fold(task_id, await self.ledger.read(task_id))
            if earlier.submitted is None or earlier.submitted.tenant != sub.tenant:
                continue  # not in the ledger (any more), or not the same tenant's
            turns.append(_turn(earlier, self.limits))
        return bounded(context_id, turns, len(before), self.limits)
