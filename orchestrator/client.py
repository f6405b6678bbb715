"""`jetmesh.Client`: submit tasks, wait for results, follow events, from Python."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from nats.aio.client import Client as NATS

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.ledger import Ledger, LedgerEntry
from jetmesh.bus.settings import BusSettings
from jetmesh.bus.streams import declare_streams
from jetmesh.orchestrator.state import TaskState, fold


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
        metadata: dict[str, str] | None = None,
    ) -> str:
        """Publish a task; returns its id. Resubmitting the same task_id is a no-op."""
        sub = ev.TaskSubmission(
            goal=goal, input=input or {}, workflow=workflow, user_id=user_id, budget=budget,
            metadata=metadata or {}, **({"task_id": task_id} if task_id else {}))
        await self.js.publish(subjects.SUBMIT, sub.model_dump_json(exclude_none=True).encode(),
                              headers={"Nats-Msg-Id": sub.task_id})
        return sub.task_id

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
            state = TaskState(task_id=task_id)
            async for entry in self.follow(task_id):
                fold(task_id, [entry], state)
            return state
        return await asyncio.wait_for(wait(), timeout)

    async def cancel(self, task_id: str, reason: str = "canceled by request") -> None:
        await self.ledger.append(ev.CancelRequested(
            subject=task_id, source="jetmesh/client",
            data=ev.CancelRequestedData(reason=reason)))
