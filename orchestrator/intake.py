"""The orchestrator's intake: what its consumers deliver (submissions, step events,
control messages), checked and turned into drives of the tasks they concern."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import ValidationError

from jetmesh.bus import events as ev
from jetmesh.bus import headers as hdr
from jetmesh.bus import subjects
from jetmesh.bus.consumer import Reject
from jetmesh.bus.errors import AppendConflict
from jetmesh.bus.ledger import EXPECTED_LAST_SEQ, LedgerEntry
from jetmesh.bus.ledger_port import TaskLedger
from jetmesh.bus.tenancy import TenantMismatch, stamp_submission
from jetmesh.bus.tracecontext import parse_traceparent, task_traceparent
from jetmesh.orchestrator.cache import Delivered, TaskCache
from jetmesh.orchestrator.effects import SOURCE, end_id
from jetmesh.orchestrator.state import TaskState
from jetmesh.orchestrator.workflows import WorkflowRegistry

log = logging.getLogger("jetmesh.orchestrator")

REPLY_HEADER = hdr.REPLY_TO
"""A submission's own reply inbox: a refusal is answered there (the message the submit
consumer delivers has JetStream's ack subject as its reply, not the submitter's)."""


def _type_of(cls: type[ev.Event]) -> str:  # type: ignore[valid-type]
    value = cls.model_fields["type"].default  # type: ignore[attr-defined]
    assert isinstance(value, str)
    return value


TERMINAL_STEP_TYPES = frozenset(_type_of(c) for c in (ev.StepCompleted, ev.StepFailed))
"""The step events that wake a drive (the others only move the read cursor)."""


class Drive(Protocol):
    def __call__(self, task_id: str, *, first: list[ev.Event] | None = None
                 ) -> Awaitable[TaskState]: ...


def with_defaults(budget: ev.Budget | None, defaults: ev.Budget | None) -> ev.Budget | None:
    """The submitted budget, each unset limit filled from the configured defaults."""
    if defaults is None:
        return budget
    if budget is None:
        return defaults
    merged = {k: v if v is not None else getattr(defaults, k)
              for k, v in budget.model_dump().items()}
    return ev.Budget(**merged)


def reply_subject(msg: Msg) -> str | None:
    """Where to answer a submission: an inbox, never a jetmesh or system subject."""
    reply = (msg.headers or {}).get(REPLY_HEADER, "")
    if not reply or reply.startswith((f"{subjects.PREFIX}.", "$")) or \
            any(c in reply for c in "*> \t\r\n"):
        return None
    return reply


class Intake:
    """The handlers of the orchestrator's consumers."""

    def __init__(self, nc: NATS | None, ledger: TaskLedger, cache: TaskCache, drive: Drive, *,
                 workflows: WorkflowRegistry,
                 default_budget: Callable[[], ev.Budget | None]) -> None:
        self.nc, self.ledger, self.cache, self.drive = nc, ledger, cache, drive
        self.workflows = workflows
        self.default_budget = default_budget

    async def on_submit(self, msg: Msg) -> None:
        """A submission starts a new task and never touches an existing one.

        Cheap on bad input: a body that is not a JSON object or has no usable task id is
        dead-lettered with no ledger access; one with a usable id but bad fields gets a
        `rejected` event on its (new) task, appended only if the task's events subject
        is empty (fenced, no read). A submission for an existing task is a no-op if it
        is identical to the one stored, else it is refused: dead-lettered "task exists"
        (and answered on its REPLY_HEADER inbox), nothing appended to the task."""
        try:
            raw = json.loads(msg.data)
        except ValueError as e:
            raise Reject(f"submission is not JSON: {e}") from e
        if not isinstance(raw, dict):
            raise Reject("submission must be a JSON object")
        try:  # a tenant account's (jm.tenant.<T>.submit): the tenant is the subject's
            raw = stamp_submission(raw, msg.subject)
        except TenantMismatch as e:
            raise Reject(str(e)) from e
        try:
            sub = ev.TaskSubmission.model_validate(raw)
        except ValidationError as e:
            errors = [{"loc": list(x["loc"]), "msg": x["msg"]} for x in e.errors()]
            task_id = raw.get("task_id")
            try:
                ev.TaskSubmission.model_validate({"task_id": task_id})
            except ValidationError:
                raise Reject("invalid submission (and no usable task_id)", errors) from e
            assert isinstance(task_id, str)
            try:
                await self.ledger.append(ev.TaskRejected(
                    id=end_id(task_id), subject=task_id, source=SOURCE,
                    data=ev.TaskRejectedData(reason="invalid submission", errors=errors)),
                    expected_last_subject_seq=0, validate=False)
            except AppendConflict:
                await self._refuse(msg, task_id, errors)
            return
        # The submitter's trace context (a valid one) is the task's parent; without one the
        # submission carries the task's own root context, like every later event.
        caller = (msg.headers or {}).get(hdr.TRACEPARENT)
        submitted = ev.TaskSubmitted(
            id=f"{sub.task_id}-submitted", subject=sub.task_id, source=SOURCE,
            traceparent=caller if parse_traceparent(caller) else task_traceparent(
                sub.task_id, None),
            data=ev.TaskSubmittedData(**{
                **sub.model_dump(exclude={"task_id", "budget"}),
                "budget": with_defaults(sub.budget, self.default_budget())}))
        first: list[ev.Event] = [submitted]
        if sub.workflow and self.workflows.get(sub.workflow) is None:
            first.append(ev.TaskRejected(
                id=end_id(sub.task_id), subject=sub.task_id, source=SOURCE,
                data=ev.TaskRejectedData(
                    reason=f"unknown workflow '{sub.workflow}'; known: "
                           + ", ".join(self.workflows.names()))))
        state = await self.drive(sub.task_id, first=first)
        if state.submitted != submitted.data:
            await self._refuse(msg, sub.task_id)

    async def _refuse(self, msg: Msg, task_id: str,
                      errors: list[dict[str, Any]] | None = None) -> None:
        """Refuse a submission for an existing task: not on the task, but a dead letter
        (and an answer on the submission's reply inbox, if it named one)."""
        reply = reply_subject(msg)
        if reply is not None and self.nc is not None:
            try:
                await self.nc.publish(reply, json.dumps(
                    {"task_id": task_id, "error": "task exists"}).encode())
            except Exception as e:  # the dead letter still says it
                log.debug("task %s: reply to %s failed: %s", task_id, reply, e)
        raise Reject("task exists", errors)

    async def on_step_event(self, msg: Msg) -> None:
        self._observe(msg)
        if (msg.headers or {}).get(hdr.CE_TYPE) not in TERMINAL_STEP_TYPES:
            return
        task_id = subjects.task_id_of(msg.subject)
        if task_id:
            self._deliver(task_id, msg)
            await self.drive(task_id)

    def _deliver(self, task_id: str, msg: Msg) -> None:
        """Keep a delivered step result for the next drive of its task, which may fold it
        with no read (see `cache.follows_on`). An unfenced append, or one that does not
        decode, is left to the read."""
        after = (msg.headers or {}).get(EXPECTED_LAST_SEQ, "")
        if not after.isdigit():
            return
        try:
            event = ev.decode_event(msg.data)
        except ValidationError:
            return
        entry = LedgerEntry(int(msg.metadata.sequence.stream), msg.subject, event)
        self.cache.deliver(task_id, Delivered(entry, int(after)))

    async def on_control(self, msg: Msg) -> None:
        self._observe(msg)
        task_id = subjects.task_id_of(msg.subject)
        if task_id:
            await self.drive(task_id)

    def _observe(self, msg: Msg) -> None:
        """Reads of this task must include the ledger message that woke us."""
        task_id = subjects.task_id_of(msg.subject)
        if task_id:
            self.ledger.observe(task_id, int(msg.metadata.sequence.stream))
