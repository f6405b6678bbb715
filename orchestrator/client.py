"""`jetmesh.Client`: submit tasks, wait for results, follow events, from Python."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NATS

from jetmesh.bus import events as ev
from jetmesh.bus import headers as hn
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.ledger import Ledger, LedgerEntry
from jetmesh.bus.settings import BusSettings
from jetmesh.bus.streams import declare_streams
from jetmesh.orchestrator.errors import OrchestratorError
from jetmesh.orchestrator.state import TaskState, fold


class TaskExists(OrchestratorError, ValueError):
    """A submission for an existing task id, different from the one it was created by:
    refused, the task is not touched."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id} exists with another submission: nothing changed")


class ControlRefused(OrchestratorError):
    """A control (cancel, approve, deny) was not sent: nothing changed."""

    def __init__(self, task_id: str, message: str) -> None:
        self.task_id = task_id
        super().__init__(message)


class NoSuchTask(ControlRefused):
    def __init__(self, task_id: str) -> None:
        super().__init__(task_id, f"no task {task_id}")


class TaskFinished(ControlRefused):
    """The task has ended: a control cannot change it any more."""

    def __init__(self, task_id: str, status: str) -> None:
        self.status = status
        super().__init__(task_id, f"task {task_id} is {status}: nothing changed")


class NoPendingApproval(ControlRefused):
    def __init__(self, task_id: str, step: str | None = None) -> None:
        super().__init__(task_id, f"no pending approval on task {task_id}"
                                  + (f" for step {step}" if step else ""))


class AmbiguousApproval(ControlRefused):
    """Several gated calls wait: name one with step and/or tool."""

    def __init__(self, task_id: str, pending: list[ev.ApprovalRequestedData]) -> None:
        self.pending = pending
        super().__init__(task_id, f"{len(pending)} approvals are pending on task {task_id}; "
                                  "choose one by step and tool")


def open_state(state: TaskState) -> TaskState:
    """`state` if the task exists and has not ended, else the ControlRefused why not."""
    if state.last_seq == 0:
        raise NoSuchTask(state.task_id)
    if state.terminal:
        raise TaskFinished(state.task_id, state.status.value)
    return state


def pending_one(state: TaskState, step: str | None = None, tool: str | None = None,
                args_hash: str | None = None) -> ev.ApprovalRequestedData:
    """The one pending approval matching `step`/`tool`/`args_hash` (ControlRefused
    otherwise)."""
    pending = [p for p in state.pending_approvals.values()
               if (step is None or p.step_id == step) and (tool is None or p.tool == tool)
               and (args_hash is None or p.args_hash == args_hash)]
    if not pending:
        raise NoPendingApproval(state.task_id, step)
    if len(pending) > 1:
        raise AmbiguousApproval(state.task_id, pending)
    return pending[0]


class Client:
    """A connection to a mesh. Use as `async with Client(url) as c: ...`."""

    def __init__(self, url: str | None = None, *, settings: BusSettings | None = None) -> None:
        self.settings = settings or BusSettings()
        self.url = url or self.settings.nats_url
        self._nc: NATS | None = None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self._nc = await connect(self.url, settings=self.settings, name="jetmesh-client")
        self.js = jetstream(self._nc, self.settings)
        await declare_streams(self.js, self.settings)
        self.ledger = Ledger(self._nc, self.js, timeout_s=self.settings.request_timeout_s)

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()
            self._nc = None

    async def submit(
        self, goal: str = "", *, input: dict[str, Any] | None = None,
        workflow: str | None = None, user_id: str | None = None,
        budget: ev.Budget | None = None, task_id: str | None = None,
        metadata: dict[str, str] | None = None, traceparent: str | None = None,
        tenant: str | None = None, submitted_by: str | None = None,
    ) -> str:
        """Publish a task; returns its id. Resubmitting the same task_id with the same
        submission is a no-op; any other submission for an existing task_id is refused
        (the task is not touched): TaskExists when JetStream drops it as a duplicate of a
        different one with the same id (its duplicate window, 2 minutes by default), else
        the orchestrator dead-letters it ("task exists"). `traceparent` (W3C): the
        task's trace (`jetmesh telemetry`) continues it, as a child of that span."""
        sub = ev.TaskSubmission(
            goal=goal, input=input or {}, workflow=workflow, user_id=user_id, budget=budget,
            metadata=metadata or {}, tenant=tenant, submitted_by=submitted_by,
            **({"task_id": task_id} if task_id else {}))
        ack = await self.js.publish(subjects.SUBMIT,
                                    sub.model_dump_json(exclude_none=True).encode(),
                                    headers={hn.MSG_ID: sub.task_id,
                                             **({hn.TRACEPARENT: traceparent}
                                                if traceparent else {})})
        if ack.duplicate:
            await self._same_as_stored(sub, int(ack.seq))
        return sub.task_id

    async def _same_as_stored(self, sub: ev.TaskSubmission, seq: int) -> None:
        """JetStream kept the submission with this id stored at `seq` instead of ours:
        TaskExists if it differs (best effort: an unreadable original is let be)."""
        try:
            original = await self.js.get_msg(subjects.STREAM_TASKS, seq)
        except Exception:
            return
        try:
            theirs = ev.TaskSubmission.model_validate_json(original.data or b"")
        except ValueError:
            raise TaskExists(sub.task_id) from None
        if theirs.model_dump() != sub.model_dump():
            raise TaskExists(sub.task_id)

    async def state(self, task_id: str) -> TaskState:
        """The task's current state (a fold of its events)."""
        return fold(task_id, await self.ledger.read(task_id))

    async def events(self, task_id: str) -> list[LedgerEntry]:
        return await self.ledger.read(task_id)

    async def follow(self, task_id: str, *, from_seq: int = 1, until_done: bool = True
                     ) -> AsyncIterator[LedgerEntry]:
        """The task's events from `from_seq`, live; ends after a terminal task event."""
        async for entry in self.ledger.follow(task_id, from_seq=from_seq):
            yield entry
            if until_done and isinstance(entry.event, ev.TERMINAL_TASK_EVENTS):
                return

    async def result(self, task_id: str, *, timeout: float | None = None) -> TaskState:
        """Wait until the task is terminal; returns its final state."""
        async def wait() -> TaskState:
            async for _entry in self.follow(task_id):
                pass
            # The fold of everything, the steps' logs (JM_LOG: usage, cost) included,
            # which a follow of the task's decisions does not deliver.
            return await self.state(task_id)
        return await asyncio.wait_for(wait(), timeout)

    async def cancel(self, task_id: str, reason: str = "canceled by request",
                     by: str | None = None) -> None:
        """Ask for the task to be canceled. Refused (ControlRefused: NoSuchTask,
        TaskFinished) if it does not exist or has ended; a cancel that races past this
        check with the task's end changes nothing (the fold ignores controls after it)."""
        state = open_state(await self.state(task_id))
        await self.ledger.append(ev.CancelRequested(
            subject=task_id, source="jetmesh/client", traceparent=state.traceparent,
            data=ev.CancelRequestedData(reason=reason, by=by)))

    async def approve(self, task_id: str, *, step: str | None = None,
                      tool: str | None = None, by: str = "operator",
                      args_hash: str | None = None) -> ev.ApprovalRequestedData:
        """Approve the task's pending gated call (exactly its arguments); returns it.
        ControlRefused if the task does not exist or has ended, or none (or several)
        is pending (with `args_hash`: none for exactly those arguments)."""
        return (await self.decide(task_id, True, step=step, tool=tool, by=by,
                                  args_hash=args_hash))[0]

    async def deny(self, task_id: str, *, reason: str = "denied", step: str | None = None,
                   tool: str | None = None, by: str = "operator",
                   args_hash: str | None = None) -> ev.ApprovalRequestedData:
        """Deny the task's pending gated call; the agent is told and it never runs."""
        return (await self.decide(task_id, False, step=step, tool=tool, by=by, reason=reason,
                                  args_hash=args_hash))[0]

    async def decide(self, task_id: str, granted: bool, *, step: str | None = None,
                     tool: str | None = None, by: str = "operator", reason: str = "",
                     args_hash: str | None = None) -> tuple[ev.ApprovalRequestedData, int]:
        """Approve or deny the one pending call matching step/tool/args_hash; returns it
        and the ledger sequence of the decision (ControlRefused as for `approve`)."""
        state = open_state(await self.state(task_id))
        p = pending_one(state, step, tool, args_hash)
        data = ev.ApprovalDecisionData(step_id=p.step_id, tool=p.tool, args_hash=p.args_hash,
                                       by=by, reason=reason)
        event: ev.Event = (
            ev.ApprovalGranted(subject=task_id, source="jetmesh/client", data=data,
                               traceparent=state.traceparent) if granted
            else ev.ApprovalDenied(subject=task_id, source="jetmesh/client", data=data,
                                   traceparent=state.traceparent))
        seq = await self.ledger.append(event)
        return p, seq

    async def waiting_for_agents(self, state: TaskState
                                 ) -> list[tuple[str, str, datetime | None]]:
        """The task's steps queued for a skill no live agent offers: (step, skill, since)."""
        from jetmesh.orchestrator.decide import waiting_for_agents

        if not waiting_for_agents(state, set()):
            return []  # nothing queued: no need to look at the registry
        from jetmesh.agents.registry import snapshot
        from jetmesh.agents.signing import verifier_from_env

        agents, _ = await snapshot(self.js, verifier=verifier_from_env())
        return waiting_for_agents(state, {s for a in agents for s in a.skill_ids})
