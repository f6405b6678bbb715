"""A harness for your own tests: build a mesh, on a real nats-server or in memory.

    from jetmesh.orchestrator.testing import mesh

    async def test_my_agent() -> None:
        async with mesh([MY_AGENT]) as m:          # an embedded nats-server of its own
            task_id = await m.submit("where is order A1001?", workflow="order-status",
                                     input={"order_id": "A1001"})
            state = await m.result(task_id)
            assert state.status is TaskStatus.COMPLETED

`mesh(agents, url=...)` uses a server you already run (pytest: one per session); with no
url it starts an embedded nats-server (the `nats-server` binary on PATH, see
`jetmesh.bus.server`) in a temporary directory and stops it after. Agents are
`AgentSpec`s or the names of built-in agents; the planner and the workers' model default
to the offline simulated model.

`memory_mesh()` is the orchestrator alone on in-memory ports (`InMemoryLedger`,
`InMemoryDirectory`, `InMemoryBudgetBook`): no server, no workers. Submit a task, see
the work commands it sends (`commands()`), answer them (`complete`, `fail`) and drive
it on: for tests of workflows, plans and the orchestrator's decisions.

`CountingLedger` wraps any ledger (the real one or the in-memory one) and counts the
orchestrator's reads, for tests that guard how many it makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jetmesh.agents.directory import Directory, InMemoryDirectory
from jetmesh.agents.models.sim import SimModel
from jetmesh.agents.models.types import Model
from jetmesh.agents.spec import AgentSpec
from jetmesh.bus import events as ev
from jetmesh.bus.budgets import Budgets, InMemoryBudgetBook
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.events import Event
from jetmesh.bus.ledger import Appended, Entries, Ledger, LedgerEntry, Skipped
from jetmesh.bus.ledger_port import InMemoryLedger, Published, TaskLedger
from jetmesh.bus.settings import BusSettings
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings, real_directory
from jetmesh.orchestrator.state import TaskState, fold
from jetmesh.orchestrator.workflows import Workflow, WorkflowRegistry, builtin_registry

__all__ = [
    "CountingLedger",
    "InMemoryBudgetBook",
    "InMemoryDirectory",
    "InMemoryLedger",
    "MemoryMesh",
    "Mesh",
    "memory_mesh",
    "mesh",
    "start_mesh",
    "wait_live",
]


# ---------------------------------------------------------------------- a counting ledger


class CountingLedger:
    """A ledger that counts its reads (task ids in `reads`) and can fail one of them.

    With `yield_first` each read first yields to the event loop once, so wake-ups
    arriving together meet at the orchestrator's coalescing as they would under load."""

    def __init__(self, inner: TaskLedger, *, fail: Callable[[str, int], bool] | None = None,
                 error: Callable[[], BaseException] | None = None,
                 yield_first: bool = True) -> None:
        self.inner = inner
        self.yield_first = yield_first
        self.reads: list[str] = []
        self._fail = fail
        self._error = error

    def fail_on(self, nth: int, error: Callable[[], BaseException]) -> None:
        """Make the `nth` read counted in `reads` fail with `error()`."""
        self._fail = lambda _task, count: count == nth
        self._error = error

    def observe(self, task_id: str, seq: int) -> None:
        self.inner.observe(task_id, seq)

    async def append(self, event: Event, *, expected_last_subject_seq: int | None = None,
                     validate: bool = True, data: bytes | None = None) -> int:
        return await self.inner.append(event, expected_last_subject_seq=expected_last_subject_seq,
                                       validate=validate, data=data)

    async def append_many(self, events: Sequence[Event], *, validate: bool = True
                          ) -> list[int]:
        return await self.inner.append_many(events, validate=validate)

    async def append_pipelined(
        self, events: Sequence[Event], *, validate: bool = True,
        also: Sequence[tuple[str, bytes, dict[str, str]]] = (),
        expect: Sequence[tuple[str, int] | None] = (),
    ) -> list[Appended]:
        return await self.inner.append_pipelined(events, validate=validate, also=also,
                                                 expect=expect)

    async def read(
        self, task_id: str, *, from_seq: int = 1, subject: str | None = None,
        limit: int = 100_000, keep: Callable[[str], bool] | None = None,
        without_logs: bool = False, after_log: int = 0,
    ) -> Entries:
        self.reads.append(task_id)
        if self.yield_first:
            await asyncio.sleep(0)  # let other wake-ups arrive meanwhile
        if self._fail is not None and self._fail(task_id, len(self.reads)):
            raise (self._error or (lambda: RuntimeError("read failed (CountingLedger)")))()
        return await self.inner.read(task_id, from_seq=from_seq, subject=subject,
                                     limit=limit, keep=keep, without_logs=without_logs,
                                     after_log=after_log)

    async def read_raw(self, filter_subject: str, *, from_seq: int = 1, batch: int = 1000
                       ) -> list[tuple[int, str, bytes]]:
        return await self.inner.read_raw(filter_subject, from_seq=from_seq, batch=batch)

    def follow(
        self, task_id: str | None = None, *, from_seq: int = 1,
        filter_subject: str | None = None, idle_heartbeat_s: float = 2.0,
        on_bad: Callable[[Skipped], None] | None = None, logs: bool = False,
        after_log: int = 0,
    ) -> AsyncIterator[LedgerEntry]:
        return self.inner.follow(task_id, from_seq=from_seq, filter_subject=filter_subject,
                                 idle_heartbeat_s=idle_heartbeat_s, on_bad=on_bad, logs=logs,
                                 after_log=after_log)


# ---------------------------------------------------------------------- a real mesh


async def wait_live(directory: Directory, names: Iterable[str], timeout_s: float = 10.0
                    ) -> None:
    """Until every named agent is live in `directory` (its card verified)."""
    want = set(names)
    async with asyncio.timeout(timeout_s):
        while not want <= {a.name for a in directory.agents()}:
            directory.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(directory.changed.wait(), 0.5)


@dataclass
class Mesh:
    """An orchestrator, workers and a client on one nats-server."""

    url: str
    orchestrator: Orchestrator
    client: Client
    directory: Directory
    workers: list[Any] = field(default_factory=list)
    """`jetmesh.agents.worker.Worker`s, one per agent."""
    _server: Any = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def reads(self) -> list[str]:
        """The task ids of the orchestrator's ledger reads, in order (`CountingLedger`)."""
        counted = self.orchestrator.ledger
        assert isinstance(counted, CountingLedger)
        return counted.reads

    async def submit(self, goal: str, **kwargs: Any) -> str:
        """Submit a task (`Client.submit`'s arguments); its id."""
        return await self.client.submit(goal, **kwargs)

    async def result(self, task_id: str, timeout: float = 30.0) -> TaskState:
        """The task's state once it ends."""
        return await self.client.result(task_id, timeout=timeout)

    async def add_worker(self, agent: str | AgentSpec, *, model: Model | None = None,
                         replica: str | None = None) -> Any:
        from jetmesh.agents.builtin import get_agent
        from jetmesh.agents.worker import Worker

        spec = get_agent(agent) if isinstance(agent, str) else agent
        nc = await connect(self.url)
        w = Worker(spec, (model or SimModel()) if spec.needs_model else None, nc,
                   jetstream(nc), replica=replica or f"{spec.name}-test")
        await w.start()
        self.workers.append(w)
        return w

    async def stop(self) -> None:
        for w in self.workers:
            await w.stop()
            await w.nc.close()
        await self.orchestrator.stop()
        await self.directory.stop()
        if self.orchestrator.nc is not None:
            await self.orchestrator.nc.close()
        await self.client.close()
        if self._server is not None:
            self._server.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


async def start_mesh(
    agents: Sequence[str | AgentSpec] = (), *, url: str | None = None,
    planner: Model | None = None, worker_model: Model | None = None,
    settings: OrchestratorSettings | None = None, workflows: Iterable[Workflow] = (),
    wait_s: float = 10.0,
) -> Mesh:
    """Start a mesh (see `mesh`); the caller stops it (`Mesh.stop`)."""
    server = tmp = None
    if url is None:
        from jetmesh.bus.server import EmbeddedNats

        tmp = tempfile.TemporaryDirectory(prefix="jetmesh-test-")
        server = EmbeddedNats(data_dir=Path(tmp.name) / "nats")
        server.start()
        url = server.url
    settings = settings or OrchestratorSettings(no_agent_wait_s=30.0, tick_s=0.1)
    nc = await connect(url)
    js = jetstream(nc)
    directory = real_directory(js, settings, BusSettings())
    await directory.start()
    registry: WorkflowRegistry = builtin_registry(settings.workflows_dir)
    for wf in workflows:
        registry.add(wf)
    orch = Orchestrator(nc, js, model=planner or SimModel(), settings=settings,
                        workflows=registry, directory=directory,
                        ledger=CountingLedger(Ledger(nc, js), yield_first=False))
    await orch.start()
    client = Client(url)
    await client.connect()
    m = Mesh(url, orch, client, directory, _server=server, _tmp=tmp)
    try:
        for agent in agents:
            await m.add_worker(agent, model=worker_model)
        await wait_live(directory, [a if isinstance(a, str) else a.name for a in agents],
                        wait_s)
    except BaseException:
        await m.stop()
        raise
    return m


@contextlib.asynccontextmanager
async def mesh(agents: Sequence[str | AgentSpec] = (), **kwargs: Any) -> AsyncIterator[Mesh]:
    """A running mesh: an orchestrator, one worker per agent (live before this yields)
    and a client, on `url` or on an embedded nats-server of its own; stopped after."""
    m = await start_mesh(agents, **kwargs)
    try:
        yield m
    finally:
        await m.stop()


# ---------------------------------------------------------------------- in memory


@dataclass
class MemoryMesh:
    """The orchestrator on in-memory ports, driven by the test (no server, no workers)."""

    orchestrator: Orchestrator
    ledger: InMemoryLedger
    directory: InMemoryDirectory
    book: Budgets

    async def submit(self, goal: str, *, workflow: str | None = None,
                     input: dict[str, Any] | None = None, budget: ev.Budget | None = None,
                     task_id: str | None = None) -> TaskState:
        """Store a submission and drive the task (its first dispatches go out)."""
        tid = task_id or ev.new_id()
        await self.ledger.append(ev.TaskSubmitted(
            id=f"{tid}-submitted", subject=tid, data=ev.TaskSubmittedData(
                goal=goal, workflow=workflow, input=input or {}, budget=budget)),
            expected_last_subject_seq=0)
        return await self.orchestrator.drive(tid)

    def commands(self, task_id: str | None = None) -> list[ev.StepCommand]:
        """The work commands sent so far (of one task), oldest first."""
        out = [ev.StepCommand.model_validate_json(p.data) for p in self.published()]
        return [c for c in out if task_id is None or c.task_id == task_id]

    def published(self) -> list[Published]:
        return list(self.ledger.published)

    async def complete(self, task_id: str, step_id: str, output: dict[str, Any],
                       agent: str = "test") -> TaskState:
        """A worker's result for the step (fenced on its line, as a worker's is), then
        the drive its delivery causes."""
        await self._result(task_id, step_id, ev.StepCompleted(
            subject=task_id, data=ev.StepCompletedData(step_id=step_id, agent=agent,
                                                       output=output)))
        return await self.orchestrator.drive(task_id)

    async def fail(self, task_id: str, step_id: str, code: str = "error",
                   reason: str = "failed", *, retryable: bool = False,
                   agent: str = "test") -> TaskState:
        state = await self.state(task_id)
        await self._result(task_id, step_id, ev.StepFailed(
            subject=task_id, data=ev.StepFailedData(
                step_id=step_id, agent=agent, code=code, reason=reason, retryable=retryable,
                attempt=state.steps[step_id].attempt)))
        return await self.orchestrator.drive(task_id)

    async def _result(self, task_id: str, step_id: str, event: Event) -> None:
        state = await self.state(task_id)
        await self.ledger.append(event, expected_last_subject_seq=state.steps[step_id].last_seq)

    async def state(self, task_id: str) -> TaskState:
        """The task's fold from the whole ledger (not the orchestrator's cache)."""
        return fold(task_id, await self.ledger.read(task_id))


def memory_mesh(agents: Iterable[AgentSpec] = (), *, planner: Model | None = None,
                workflows: Iterable[Workflow] = (),
                settings: OrchestratorSettings | None = None) -> MemoryMesh:
    """The orchestrator on in-memory ports. `agents` are the live ones of its directory
    (what the planner plans with; add or remove some with `directory.add` / `remove`): a
    step whose skill none offers waits for one, as on a real mesh."""
    ledger, book = InMemoryLedger(), InMemoryBudgetBook()
    directory = InMemoryDirectory(agents)
    registry = builtin_registry()
    for wf in workflows:
        registry.add(wf)
    orch = Orchestrator(None, None, model=planner or SimModel(),
                        settings=settings or OrchestratorSettings(tick_s=3600, sweep_s=0),
                        workflows=registry, directory=directory, ledger=ledger, book=book)
    return MemoryMesh(orch, ledger, directory, book)
