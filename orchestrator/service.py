"""The orchestrator: a thin bus shell around the pure planner and `decide`.

It keeps no state of its own. On every trigger (a submission, a step's terminal event,
a control message, a timer) it reads the task's new events from the ledger, folds
them, decides, and appends its decisions. Appends are idempotent (deterministic event
ids) or fenced (expected last subject sequence), so several replicas, restarts and
redeliveries never drive a task twice.

Its parts: `intake` (the consumers' handlers), `cache` (each task's fold and how it
advances), `effects` (carrying out decisions: plan, merge, dispatch, the batched
appends) and this service, which owns the drive loop, timers and recovery.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic_settings import SettingsConfigDict

from jetmesh.agents.directory import Directory
from jetmesh.agents.models.types import Model
from jetmesh.agents.registry import Registry
from jetmesh.agents.signing import verifier_from_env
from jetmesh.agents.spec import SkillSpec
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.budgets import BudgetBook, Budgets
from jetmesh.bus.consumer import PullRunner
from jetmesh.bus.errors import AppendConflict
from jetmesh.bus.ledger import Ledger, LedgerEntry, subject_for
from jetmesh.bus.ledger_port import TaskLedger
from jetmesh.bus.presence import PresenceView
from jetmesh.bus.settings import BusSettings, GroupSettings
from jetmesh.bus.streams import declare_streams, pull_consumer_config
from jetmesh.bus.sweep import sweep_unconsumed
from jetmesh.bus.tasks import cancel_and_wait
from jetmesh.bus.wire import WireError, decode_json
from jetmesh.orchestrator import decide as d
from jetmesh.orchestrator.cache import Origin, TaskCache
from jetmesh.orchestrator.effects import SOURCE, Command, Effects, Round, end_id
from jetmesh.orchestrator.intake import REPLY_HEADER, Intake, with_defaults
from jetmesh.orchestrator.skills import LiveSkills
from jetmesh.orchestrator.state import TaskState
from jetmesh.orchestrator.workflows import WorkflowRegistry, builtin_registry

__all__ = ["REPLY_HEADER", "SOURCE", "Command", "Orchestrator", "OrchestratorSettings",
           "end_id", "with_defaults"]

log = logging.getLogger("jetmesh.orchestrator")

UNREAD_RECHECK_S = 1.0
"""A task waiting on a fold advanced from deliveries alone is read again this soon."""

TERMINAL_TASK_TYPES = frozenset(c.model_fields["type"].default
                                for c in ev.TERMINAL_TASK_EVENTS)

MAX_ROUNDS = 50
"""Decide / act rounds in one drive (a plan and its dispatches take two)."""


class OrchestratorSettings(GroupSettings):
    """The orchestrator's settings: ``JETMESH_ORCHESTRATOR_<FIELD>``, or the older
    ``JETMESH_<FIELD>`` (see bus.settings)."""

    model_config = SettingsConfigDict(env_prefix="JETMESH_ORCHESTRATOR_", extra="ignore")

    no_agent_wait_s: float | None = None
    """How long a dispatched step waits in its work stream for a live agent offering its
    skill before the task fails `no_agent`. None (the default): until the task's
    deadline, or an hour (decide.NO_AGENT_WAIT_S) if it has none."""
    tick_s: float = 0.5
    """How often timers (step timeouts, deadlines, waiting for agents) are checked."""
    sweep_s: float = 30.0
    """How often work no consumer takes is looked for (JETMESH_SWEEP_S; 0: never)."""
    sweep_after_s: float = 60.0
    """Age at which a step command on a subject with no consumer is dead-lettered."""
    planner_provider: str | None = None
    """Model provider for planning and merging (default: the model layer's default)."""
    planner_model: str | None = None
    workflows_dir: Path | None = None
    """Extra YAML workflows to load."""
    agent_ttl_s: float = 5.0
    """A replica silent this long is no longer live."""
    concurrency: int = 256
    """Messages handled at once per consumer."""
    cache_size: int = 10_000
    default_max_usd: float | None = None
    """Budget of tasks submitted without one (dollars); None: unlimited."""
    default_max_tokens: int | None = None
    default_max_tool_calls: int | None = None
    default_deadline_s: float | None = None

    def default_budget(self) -> ev.Budget | None:
        values = (self.default_max_usd, self.default_max_tokens, self.default_max_tool_calls,
                  self.default_deadline_s)
        if all(v is None for v in values):
            return None
        return ev.Budget(max_usd=self.default_max_usd, max_tokens=self.default_max_tokens,
                         max_tool_calls=self.default_max_tool_calls,
                         deadline_s=self.default_deadline_s)


def _consume_exception(fut: asyncio.Future[Any]) -> None:
    """A coalesced drive's failure is raised to its own caller; riders, if any, get it
    from the future, and if there are none it must not be reported as never retrieved."""
    if not fut.cancelled():
        fut.exception()


def real_directory(js: JetStreamContext, settings: OrchestratorSettings,
                   bus_settings: BusSettings) -> Directory:
    """The mesh's agent directory: presence in NATS KV, cards verified with the key the
    environment names (JETMESH_CARD_*; unsigned cards accepted without one). Not started."""
    view = PresenceView(js, subjects.BUCKET_AGENTS, settings.agent_ttl_s, bus_settings.replicas)
    return Registry(view, verifier=verifier_from_env())


class Orchestrator:
    """Drives every task to a terminal state. Run one or several replicas."""

    def __init__(
        self, nc: NATS | None, js: JetStreamContext | None, *, model: Model,
        settings: OrchestratorSettings | None = None, bus_settings: BusSettings | None = None,
        workflows: WorkflowRegistry | None = None, directory: Directory | None = None,
        use_registry: bool = True, ledger: TaskLedger | None = None,
        book: Budgets | None = None, now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """The ports (`directory`, `ledger`, `book`) are passed in by the composition root
        (the CLI, `orchestrator.testing`); each one not given is the real one on `js`
        (the directory: only with `use_registry`; without one no agent checks are made).
        A directory passed in is the caller's to start and stop. With in-memory ports
        `nc` and `js` may be None: `drive` works, `start` needs a server."""
        self.nc, self.js = nc, js
        self.settings = settings or OrchestratorSettings()
        self.bus_settings = bus_settings or BusSettings()
        self.model = model
        self.workflows = workflows or builtin_registry(self.settings.workflows_dir)
        self.now = now
        self._own_directory = directory is None and use_registry and js is not None
        if self._own_directory:
            assert js is not None
            directory = real_directory(js, self.settings, self.bus_settings)
        self.directory = directory
        self.skills = LiveSkills(directory, now)
        if ledger is None:
            assert nc is not None and js is not None, "no ledger and no server"
            ledger = Ledger(nc, js, timeout_s=self.bus_settings.request_timeout_s)
        self.ledger = ledger
        if book is None:
            assert js is not None, "no budget book and no server"
            book = BudgetBook(js, replicas=self.bus_settings.replicas)
        self.book = book
        self.cache = TaskCache(self.ledger, self.settings.cache_size)
        self.effects = Effects(self.ledger, js, self.cache, model=model,
                               workflows=self.workflows, skills=self.skills, book=self.book,
                               bus_settings=self.bus_settings)
        self.intake = Intake(nc, self.ledger, self.cache,
                             lambda tid, first=None: self.drive(tid, first=first),
                             workflows=self.workflows,
                             default_budget=self.settings.default_budget)
        self._timer_drives: set[asyncio.Task[None]] = set()
        self._timer_sem = asyncio.Semaphore(32)
        self._runners: list[PullRunner] = []
        self._tasks: list[asyncio.Task[Any]] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        assert self.js is not None, "an orchestrator with no server cannot start"
        await declare_streams(self.js, self.bus_settings)
        if self.directory is not None and self._own_directory:
            await self.directory.start()
        s = self.bus_settings
        specs: list[tuple[str, str, str, Callable[[Msg], Awaitable[None]], bool]] = [
            (subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_SUBMIT, subjects.SUBMIT,
             self.intake.on_submit, False),
            # Tenant accounts' submissions (bus.tenancy): the subject names the tenant.
            (subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_TENANT_SUBMIT,
             subjects.ALL_TENANT_SUBMITS, self.intake.on_submit, False),
            (subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_STEPS, subjects.ALL_STEP_EVENTS,
             self.intake.on_step_event, True),
            (subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_CONTROL, subjects.ALL_CONTROL,
             self.intake.on_control, True),
            (subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_APPROVALS, subjects.ALL_APPROVALS,
             self.intake.on_control, True),
        ]
        for stream, durable, filt, handler, new_only in specs:
            runner = PullRunner(self.js, stream,
                                pull_consumer_config(durable, filt, s, deliver_new=new_only),
                                handler, concurrency=self.settings.concurrency,
                                max_deliver=s.max_deliver)
            await runner.start()
            self._runners.append(runner)
        self._tasks.append(asyncio.create_task(self._recover(), name="orchestrator-recover"))
        self._tasks.append(asyncio.create_task(self._ticker(), name="orchestrator-tick"))
        if self.settings.sweep_s > 0:
            self._tasks.append(asyncio.create_task(self._sweeper(), name="orchestrator-sweep"))
        log.info("orchestrator ready (model %s/%s, workflows: %s)", self.model.provider,
                 self.model.name, ", ".join(self.workflows.names()))

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks, *self._timer_drives)
        for r in self._runners:
            await r.stop()
        if self.directory is not None and self._own_directory:
            await self.directory.stop()

    def live_skills(self) -> dict[str, SkillSpec] | None:
        """Skills of live agents whose cards verify (None: no registry, no check)."""
        return self.skills.current()

    async def load(self, task_id: str) -> TaskState:
        """The task's state: the cached fold plus whatever the ledger has that is newer."""
        return await self.cache.load(task_id)

    # ------------------------------------------------------------------ driving

    async def drive(self, task_id: str, *, first: list[ev.Event] | None = None) -> TaskState:
        """Move one task forward as far as it can go now.

        One ledger read, then decide / act / decide on the folded state: each round's
        decisions are appended in one pipelined batch and folded in locally, so the
        orchestrator never reads back what it just wrote. `first`: events to append
        before deciding (a submission).

        Wake-ups coalesce: a drive that finds another drive of the same task queued
        (waiting for the task's lock, so it has not read yet) rides on it, since that
        read will include whatever woke it (its ledger sequence is observed before).
        Three step results arriving together cost two reads, not three.
        """
        queued_drives = self.cache.queued
        if first is None:
            queued = queued_drives.get(task_id)
            if queued is not None:
                return await asyncio.shield(queued)
        mine: asyncio.Future[TaskState] = asyncio.get_running_loop().create_future()
        mine.add_done_callback(_consume_exception)
        if first is None:
            queued_drives[task_id] = mine
        try:
            state = await self._drive(task_id, first, mine)
        except BaseException as e:
            if not mine.done():
                if isinstance(e, asyncio.CancelledError):
                    mine.cancel()
                else:
                    mine.set_exception(e)
            raise
        finally:
            if queued_drives.get(task_id) is mine:
                del queued_drives[task_id]
        mine.set_result(state)
        return state

    async def _drive(self, task_id: str, first: list[ev.Event] | None,
                     mine: asyncio.Future[TaskState]) -> TaskState:
        cache = self.cache
        async with cache.lock(task_id):
            if cache.queued.get(task_id) is mine:
                del cache.queued[task_id]  # reading now: later wake-ups need a new drive
            delivered = cache.inbox.pop(task_id, None)
            fresh = task_id not in cache
            try:
                state = await cache.load(task_id, delivered)
                carried: list[ev.Event] = []
                if first:
                    if state.submitted is None:
                        began = await self._begin(task_id, state, first)
                        if began is None:
                            return state  # the task exists (rejected, or another won)
                        state, carried = began
                    elif state.submitted != first[0].data:
                        return state  # a different submission: not touched (refused)
                if fresh:
                    await self.effects.republish_dispatched(state)
                return await self._rounds(task_id, state, carried)
            except BaseException:
                # Failed half-way (the ledger took the dispatch but the work publish
                # failed, in a leader election say): forget the cached fold, so the
                # retry sees the task as first seen and re-publishes dispatched but
                # unstarted steps.
                cache.forget(task_id)
                raise

    async def _rounds(self, task_id: str, state: TaskState, carried: list[ev.Event]
                      ) -> TaskState:
        """Decide and act until the task waits or ends: the only place `decide` is
        called. `carried`: events folded in and not stored yet (a submission's rest, a
        plan), stored with the next round's batch."""
        confirmed: set[str] = set()
        for _ in range(MAX_ROUNDS):
            actions = self._decide(state, confirmed)
            if await self._stale_no_agent(state, actions, confirmed):
                continue  # the view was stale: an agent offers the skill
            if not actions or isinstance(actions[0], d.Wait):
                if carried:
                    state = await self.effects.flush(state, Round([], []), carried)
                self._wait(task_id, actions)
                return state
            fold = self.cache.get(task_id)
            guard = None
            if fold is not None and fold.unread:
                # Folded from deliveries: a cancel or an approval stored before them may
                # be missing (it comes on another consumer). Completing is conditioned on
                # the control subject being as the fold has it; anything else reads first.
                if not all(isinstance(a, d.Merge | d.Complete) for a in actions):
                    state = await self.cache.load(task_id)
                    continue
                guard = (subjects.task_control(task_id), fold.control_seq)
            try:
                state, carried = await self.effects.execute(state, actions, carried, guard)
            except AppendConflict as e:
                log.debug("task %s: %s; re-reading", task_id, e)
                state, carried = await self.cache.load(task_id), []
        return state

    def _decide(self, state: TaskState, confirmed: set[str]) -> list[d.Action]:
        return d.decide(state, self.now(), live_skills=self._live_set(confirmed),
                        no_agent_wait_s=self.settings.no_agent_wait_s,
                        live_since=self.skills.live_since)

    def _wait(self, task_id: str, actions: list[d.Action]) -> None:
        """Record when a timer should drive the task again (not at all once it ended)."""
        if not actions:  # terminal
            self.cache.waiting.pop(task_id, None)
            return
        wait = actions[0]
        assert isinstance(wait, d.Wait)
        until = wait.until
        fold = self.cache.get(task_id)
        if fold is not None and fold.unread:
            # Folded from deliveries only: another orchestrator replica may hold the
            # task's other results (each result goes to one replica). Look again soon,
            # with a read, rather than wait for an event that went there.
            soon = self.now() + timedelta(seconds=UNREAD_RECHECK_S)
            until = soon if until is None else min(until, soon)
        self.cache.waiting[task_id] = until

    async def _begin(self, task_id: str, state: TaskState, first: list[ev.Event]
                     ) -> tuple[TaskState, list[ev.Event]] | None:
        """Store a new task's submission, only if the task's events subject is empty
        (fenced): of two submissions of one new id (or a submission and a rejection of
        an invalid one) exactly one lands. Returns the state with it folded in and the
        rest of `first` folded in and carried (appended with the first decisions), or
        None if the task exists."""
        fold = self.cache.get(task_id)
        if state.last_seq or fold is None or fold.state is not state:
            return None  # the task has events but no submission: it exists
        try:
            seq = await self.ledger.append(first[0], expected_last_subject_seq=0,
                                           validate=False)
        except AppendConflict:
            await self.cache.load(task_id)
            return None
        fold.take(LedgerEntry(seq, subject_for(first[0]), first[0]), Origin.LOCAL)
        return state, self.effects.prefold(state, first[1:])

    def _live_set(self, confirmed: set[str]) -> set[str] | None:
        live = self.skills.current()
        return None if live is None else set(live) | confirmed

    async def _stale_no_agent(self, state: TaskState, actions: list[d.Action],
                              confirmed: set[str]) -> bool:
        """A `no_agent` failure is decided on the registry view, which lags when the
        loop is saturated: before it is carried out, the registry itself is read. True:
        the skill is live after all (added to `confirmed`), decide again."""
        if len(actions) != 1 or not isinstance(actions[0], d.Fail) or \
                actions[0].code != "no_agent" or not self.skills.checked:
            return False
        waiting = {skill for _, skill, _ in d.waiting_for_agents(state, self._live_set(
            confirmed))}
        if not waiting:
            return False
        fresh = await self.skills.fresh()
        if fresh is None:
            return False  # no second opinion: the view decides
        found = set(fresh) & waiting
        if not found:
            return False
        log.info("task %s: the registry view was stale (skills %s are live)", state.task_id,
                 ", ".join(sorted(found)))
        confirmed |= found
        self.skills.drop()
        return True

    # ------------------------------------------------------------------ timers, recovery

    async def _sweeper(self) -> None:
        """Dead-letter work no consumer takes (bus.sweep), so it is seen, not kept."""
        assert self.js is not None
        while True:
            await asyncio.sleep(self.settings.sweep_s)
            try:
                await sweep_unconsumed(self.js, older_than_s=self.settings.sweep_after_s)
            except Exception as e:  # a blip; the next sweep tries again
                log.warning("sweep of unconsumed work failed: %s", e)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_s)
            await self._tick()

    async def _tick(self) -> None:
        """Drive the tasks whose timer is due, or all waiting ones if an agent came or
        went. Each drive runs on its own (at most 32 at once), so a slow one never holds
        up the next tick, and a task whose timer drive is still running is not driven
        again."""
        now = self.now()
        waiting = self.cache.waiting
        if self.skills.took_change():
            # An agent came or went: tasks waiting for one may move now.
            due = [t for t, until in waiting.items() if until is not None]
        else:
            due = [t for t, until in list(waiting.items())
                   if until is not None and until <= now]
        busy = {t.get_name() for t in self._timer_drives}
        for task_id in due:
            if task_id in busy:
                continue
            t = asyncio.create_task(self._timer_drive(task_id), name=task_id)
            self._timer_drives.add(t)
            t.add_done_callback(self._timer_drives.discard)

    async def _timer_drive(self, task_id: str) -> None:
        async with self._timer_sem:
            try:
                await self.drive(task_id)
            except Exception as e:
                log.warning("task %s: timer drive failed: %s", task_id, e)

    async def _recover(self) -> None:
        """Find unfinished tasks in the ledger and drive them (after a restart). A message
        on a task's events subject that is not an event is logged and skipped."""
        pause = 0.5
        while True:  # the server may be restarting too: read until it answers
            try:
                raw = await self.ledger.read_raw(subjects.ALL_TASK_EVENTS)
                break
            except Exception as e:
                log.warning("recovery: reading the ledger failed (%s); again in %.1fs",
                            e, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 10.0)
        pending: set[str] = set()
        ended: set[str] = set()
        for seq, subject, data in raw:
            tid = subjects.task_id_of(subject)
            if tid is None:
                continue
            try:
                event = decode_json(data)
                etype = event.get("type", "") if isinstance(event, dict) else None
            except WireError:
                etype = None
            if not isinstance(etype, str):
                log.warning("recovery: ledger message %d on %s is not an event; skipped",
                            seq, subject)
                continue
            if etype in TERMINAL_TASK_TYPES:
                ended.add(tid)
            else:
                pending.add(tid)
        pending -= ended  # nothing after a task's end counts
        if pending:
            log.info("recovering %d unfinished task(s)", len(pending))
        sem = asyncio.Semaphore(32)

        async def one(tid: str) -> None:
            """Drive `tid` until a drive goes through: a task that failed to load now
            (the bus restarting, a timeout) would otherwise wait for an event that may
            never come."""
            pause = 0.5
            while True:
                async with sem:
                    try:
                        await self.drive(tid)
                        return
                    except Exception as e:
                        log.warning("task %s: recovery failed (%s); again in %.1fs",
                                    tid, e, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)

        await asyncio.gather(*(one(t) for t in pending))
