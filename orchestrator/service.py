"""The orchestrator: a thin bus shell around the pure planner and `decide`.

It keeps no state of its own. On every trigger (a submission, a step's terminal event,
a control message, a timer) it reads the task's new events from the ledger, folds
them, decides, and appends its decisions. Appends are idempotent (deterministic event
ids) or fenced (expected last subject sequence), so several replicas, restarts and
redeliveries never drive a task twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from jetmesh.agents.guard import estimate
from jetmesh.agents.models.types import Model, ModelRequest, ModelResponse
from jetmesh.agents.spec import SkillSpec, schema_errors
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.budgets import BudgetBook, BudgetRefused, Reservation
from jetmesh.bus.consumer import PullRunner, Reject
from jetmesh.bus.errors import AppendConflict
from jetmesh.bus.ledger import (
    EXPECTED_LAST_SEQ,
    Ledger,
    LedgerEntry,
    is_log_seq,
    subject_for,
)
from jetmesh.bus.presence import PresenceView
from jetmesh.bus.settings import BusSettings
from jetmesh.bus.streams import (
    declare_streams,
    ensure_consumer,
    pull_consumer_config,
    work_consumer_config,
)
from jetmesh.bus.sweep import sweep_unconsumed
from jetmesh.bus.tasks import cancel_and_wait
from jetmesh.bus.tracecontext import parse_traceparent, task_traceparent
from jetmesh.bus.wire import WireError, decode_json
from jetmesh.orchestrator import decide as d
from jetmesh.orchestrator.errors import PlanError
from jetmesh.orchestrator.planner import Recorder, merge_with_model, plan_with_model
from jetmesh.orchestrator.state import StepStatus, TaskState, apply
from jetmesh.orchestrator.workflows import WorkflowRegistry, builtin_registry

log = logging.getLogger("jetmesh.orchestrator")

SOURCE = "jetmesh/orchestrator"
REPLY_HEADER = "Jm-Reply-To"
"""A submission's own reply inbox: a refusal is answered there (the message the submit
consumer delivers has JetStream's ack subject as its reply, not the submitter's)."""
TERMINAL_STEP_TYPES = frozenset({"jetmesh.step.completed.v1", "jetmesh.step.failed.v1"})


UNREAD_RECHECK_S = 1.0
"""A task waiting on a fold advanced from deliveries alone is read again this soon."""


class OrchestratorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JETMESH_", extra="ignore")

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


def with_defaults(budget: ev.Budget | None, defaults: ev.Budget | None) -> ev.Budget | None:
    """The submitted budget, each unset limit filled from the configured defaults."""
    if defaults is None:
        return budget
    if budget is None:
        return defaults
    merged = {k: v if v is not None else getattr(defaults, k)
              for k, v in budget.model_dump().items()}
    return ev.Budget(**merged)


@dataclass
class BudgetGuard:
    """Reserves the orchestrator's own calls (plan, merge) on the task's budget."""

    book: BudgetBook
    task_id: str
    budget: ev.Budget

    async def before(self, request: ModelRequest, model: Model) -> object:
        usd, tokens = estimate(request, model)
        return await self.book.reserve(self.task_id, self.budget, usd=usd, tokens=tokens)

    async def after(self, token: object, response: ModelResponse, cost: float) -> None:
        assert isinstance(token, Reservation)
        u = response.usage
        await self.book.settle(token, usd=cost, tokens=u.input_tokens + u.output_tokens)

    async def release(self, token: object) -> None:
        assert isinstance(token, Reservation)
        await self.book.release(token)


@dataclass
class _Cached:
    """A task's fold, what has been read of the ledger, and what was folded from our own
    appends beyond that (so a later read does not fold them twice)."""

    state: TaskState
    cursor: int = 0
    log_cursor: int = 0
    """The highest log record (stream JM_LOG, `LOG_SEQ_BASE` up) folded, if the logs are read."""
    local: set[int] = field(default_factory=set)
    control_seq: int = 0
    """The last sequence of the task's control subject (cancel, approvals) in the fold."""
    unread: bool = False
    """Step results were folded from their deliveries since the last read: the fold may
    lack a control message stored before them (see `_drive`)."""


@dataclass(frozen=True)
class _Delivered:
    """A step's result as its consumer delivered it, and the line sequence its append
    was fenced on (`Nats-Expected-Last-Subject-Sequence`): the event before it on the
    step's line, which tells whether the cached fold has every event of that line."""

    entry: LedgerEntry
    after: int


def _logs_unused(state: TaskState) -> bool:
    """Whether the orchestrator may leave the steps' logs out of its fold of this task.

    It acts on results, claims, control and its own events, never on a step's model
    and read-only tool calls, except to split what is left of a dollar budget among the
    open steps (their cost). So once the task is known to have no dollar budget its
    reads skip the logs (9 of the fan-out task's 21 step events), and the usage counters
    of its fold (cost, tokens, calls) stay partial; `jetmesh show` and the client read
    everything."""
    sub = state.submitted
    return sub is not None and (sub.budget is None or sub.budget.max_usd is None)


def _fold_delivered(cached: _Cached, delivered: list[_Delivered]) -> bool:
    """Fold delivered step results into the cached fold if their lines follow on from
    it; False (nothing folded) sends the drive to the ledger instead.

    Each result's line must go on from the cached fold: the sequence its append was
    fenced on is the last event of that line the fold has (a claim, a side effect or
    a result the fold has not seen means a read). Other steps' lines may be behind;
    that only delays what their own deliveries will bring. A control message (a
    cancel, an approval) stored before the result may be missing too, as it comes on
    another consumer: `_drive` then reads before any decision but completing the
    task, and completes only on the condition that the control subject is as the fold
    has it. Results already folded (a redelivery, or a read took them) are skipped."""
    state = cached.state
    lines: dict[str, int] = {}
    fold: list[LedgerEntry] = []
    for got in sorted(delivered, key=lambda x: x.entry.seq):
        seq, event = got.entry.seq, got.entry.event
        if seq <= cached.cursor or seq in cached.local:
            continue
        if not isinstance(event, ev.StepCompleted | ev.StepFailed):
            return False
        st = state.steps.get(event.data.step_id)
        if st is None or got.after != lines.get(st.id, st.last_seq):
            return False
        lines[st.id] = seq
        fold.append(got.entry)
    for entry in fold:
        apply(state, entry, check_seq=False)
        cached.local.add(entry.seq)
    return True


def end_id(task_id: str) -> str:
    """The id of a task's terminal event, whichever it is: of two ends decided at once
    (two replicas, a stale fold) JetStream stores only the first."""
    return f"{task_id}-end"


def _reply_subject(msg: Msg) -> str | None:
    """Where to answer a submission: an inbox, never a jetmesh or system subject."""
    reply = (msg.headers or {}).get(REPLY_HEADER, "")
    if not reply or reply.startswith((f"{subjects.PREFIX}.", "$")) or \
            any(c in reply for c in "*> \t\r\n"):
        return None
    return reply


def _report_ignored(state: TaskState, before: int) -> None:
    """Log the events the fold just ignored (not the step holder's, steps never
    dispatched): they are kept in the ledger, and listed by `jetmesh show`."""
    if state.ignored_count <= before:
        return
    for ign in state.ignored[before:before + 3]:
        log.warning("task %s: ignored ledger event %d (%s%s): %s", state.task_id, ign.seq,
                    ign.type, f", step {ign.step_id}" if ign.step_id else "", ign.reason)
    if state.ignored_count - before > 3:
        log.warning("task %s: %d more ignored events", state.task_id,
                    state.ignored_count - before - 3)


def _consume_exception(fut: asyncio.Future[Any]) -> None:
    """A coalesced drive's failure is raised to its own caller; riders, if any, get it
    from the future, and if there are none it must not be reported as never retrieved."""
    if not fut.cancelled():
        fut.exception()


def _prefold(state: TaskState, events: list[ev.Event]) -> list[ev.Event]:
    """Fold events into `state` before they are appended (they go out with the next
    batch, whose acks then only record their sequence numbers); returns them."""
    for e in events:
        apply(state, LedgerEntry(0, subject_for(e), e), check_seq=False)
    return list(events)


class Orchestrator:
    """Drives every task to a terminal state. Run one or several replicas."""

    def __init__(
        self, nc: NATS, js: JetStreamContext, *, model: Model,
        settings: OrchestratorSettings | None = None, bus_settings: BusSettings | None = None,
        workflows: WorkflowRegistry | None = None, use_registry: bool = True,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.nc, self.js = nc, js
        self.settings = settings or OrchestratorSettings()
        self.bus_settings = bus_settings or BusSettings()
        self.ledger = Ledger(nc, js, timeout_s=self.bus_settings.request_timeout_s)
        self.model = model
        self.workflows = workflows or builtin_registry(self.settings.workflows_dir)
        self.presence = (PresenceView(js, subjects.BUCKET_AGENTS, self.settings.agent_ttl_s,
                                      self.bus_settings.replicas) if use_registry else None)
        self.registry = None
        self._planner_fresh: tuple[float, dict[str, SkillSpec]] | None = None
        """When the planner last read the registry itself, and the skills it found."""
        if self.presence is not None:
            from jetmesh.a2a.registry import Registry
            from jetmesh.a2a.signing import verifier_from_env

            self.registry = Registry(self.presence, verifier=verifier_from_env())
        self._skills: dict[str, SkillSpec] | None = None
        self._skills_at = 0.0
        self._live_since: dict[str, datetime] = {}
        self._timer_drives: set[asyncio.Task[None]] = set()
        self._timer_sem = asyncio.Semaphore(32)
        self._clock: Callable[[], float] = time.monotonic
        self.now = now
        self.book = BudgetBook(js, replicas=self.bus_settings.replicas)
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._queued: dict[str, asyncio.Future[TaskState]] = {}
        self._inbox: dict[str, list[_Delivered]] = {}
        """Step results delivered for a task and not yet taken by a drive of it."""
        self._waiting: dict[str, datetime | None] = {}
        self._runners: list[PullRunner] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._work_consumers: set[str] = set()
        """Skills whose work consumer this process made sure of (`_ensure_work_consumers`)."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await declare_streams(self.js, self.bus_settings)
        if self.presence:
            await self.presence.start()
        s = self.bus_settings
        specs: list[tuple[str, str, str, Callable[[Msg], Awaitable[None]], bool]] = [
            (subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_SUBMIT, subjects.SUBMIT,
             self._on_submit, False),
            (subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_STEPS, subjects.ALL_STEP_EVENTS,
             self._on_step_event, True),
            (subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_CONTROL, subjects.ALL_CONTROL,
             self._on_control, True),
            (subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_APPROVALS, subjects.ALL_APPROVALS,
             self._on_control, True),
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
        if self.presence:
            await self.presence.stop()

    # ------------------------------------------------------------------ handlers

    async def _on_submit(self, msg: Msg) -> None:
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
        caller = (msg.headers or {}).get("traceparent")
        submitted = ev.TaskSubmitted(
            id=f"{sub.task_id}-submitted", subject=sub.task_id, source=SOURCE,
            traceparent=caller if parse_traceparent(caller) else task_traceparent(
                sub.task_id, None),
            data=ev.TaskSubmittedData(**{
                **sub.model_dump(exclude={"task_id", "budget"}),
                "budget": with_defaults(sub.budget, self.settings.default_budget())}))
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
        reply = _reply_subject(msg)
        if reply is not None:
            try:
                await self.nc.publish(reply, json.dumps(
                    {"task_id": task_id, "error": "task exists"}).encode())
            except Exception as e:  # the dead letter still says it
                log.debug("task %s: reply to %s failed: %s", task_id, reply, e)
        raise Reject("task exists", errors)

    async def _on_step_event(self, msg: Msg) -> None:
        self._observe(msg)
        if (msg.headers or {}).get("Ce-Type") not in TERMINAL_STEP_TYPES:
            return
        task_id = subjects.task_id_of(msg.subject)
        if task_id:
            self._deliver(task_id, msg)
            await self.drive(task_id)

    def _deliver(self, task_id: str, msg: Msg) -> None:
        """Keep a delivered step result for the next drive of its task, which may fold it
        with no read (see `_fold_delivered`). An unfenced append, or one that does not
        decode, is left to the read."""
        after = (msg.headers or {}).get(EXPECTED_LAST_SEQ, "")
        if not after.isdigit():
            return
        try:
            event = ev.decode_event(msg.data)
        except ValidationError:
            return
        entry = LedgerEntry(int(msg.metadata.sequence.stream), msg.subject, event)
        self._inbox.setdefault(task_id, []).append(_Delivered(entry, int(after)))

    async def _on_control(self, msg: Msg) -> None:
        self._observe(msg)
        task_id = subjects.task_id_of(msg.subject)
        if task_id:
            await self.drive(task_id)

    def _observe(self, msg: Msg) -> None:
        """Reads of this task must include the ledger message that woke us."""
        task_id = subjects.task_id_of(msg.subject)
        if task_id:
            self.ledger.observe(task_id, int(msg.metadata.sequence.stream))

    # ------------------------------------------------------------------ driving

    @staticmethod
    def _fold_read(cached: _Cached, task_id: str, new: list[LedgerEntry]) -> None:
        """Fold what a read returned into the cache, moving its cursors."""
        control = subjects.task_control(task_id)
        for entry in new:
            if is_log_seq(entry.seq):
                apply(cached.state, entry, check_seq=False)
                cached.log_cursor = max(cached.log_cursor, entry.seq)
                continue
            if entry.seq not in cached.local:
                apply(cached.state, entry, check_seq=False)
            if entry.subject == control:
                cached.control_seq = max(cached.control_seq, entry.seq)
            cached.cursor = entry.seq

    async def load(self, task_id: str, delivered: list[_Delivered] | None = None
                   ) -> TaskState:
        """The task's state: the cached fold plus whatever the ledger has that is newer.

        A terminal task is answered from the cache with no read: nothing can change it.
        `delivered`: step results its consumer delivered since the last drive; when they
        follow on from the cached fold (`_fold_delivered`) they are folded in, no read.
        """
        cached = self._cache.get(task_id)
        if cached is None:
            cached = _Cached(TaskState(task_id=task_id))
            self._remember(task_id, cached)
        else:
            self._cache.move_to_end(task_id)
            if cached.state.terminal:
                return cached.state
            before = cached.state.ignored_count
            if delivered and _logs_unused(cached.state) and \
                    _fold_delivered(cached, delivered):
                cached.unread = True
                _report_ignored(cached.state, before)
                return cached.state
        # Before its submission is folded a task's logs are not read (a new task has
        # none: one request, not two). If the fold then shows they count (a dollar
        # budget: an orchestrator restarted mid-task), it is folded again from the
        # start with them, in the merged order.
        skip_logs = _logs_unused(cached.state) or cached.state.submitted is None
        ignored = cached.state.ignored_count
        self._fold_read(cached, task_id, await self.ledger.read(
            task_id, from_seq=cached.cursor + 1, without_logs=skip_logs,
            after_log=cached.log_cursor))
        if skip_logs and cached.state.submitted is not None \
                and not _logs_unused(cached.state):
            cached.state, cached.cursor, cached.log_cursor = TaskState(task_id=task_id), 0, 0
            cached.control_seq, cached.local, ignored = 0, set(), 0
            self._fold_read(cached, task_id, await self.ledger.read(task_id))
        cached.unread = False
        cached.local = {s for s in cached.local if s > cached.cursor}
        _report_ignored(cached.state, ignored)
        return cached.state

    def _remember(self, task_id: str, cached: _Cached) -> None:
        self._cache[task_id] = cached
        while len(self._cache) > self.settings.cache_size:
            old, _ = self._cache.popitem(last=False)
            self._inbox.pop(old, None)
            lock = self._locks.get(old)
            if lock is not None and not lock.locked():
                del self._locks[old]
            self._waiting.pop(old, None)

    def live_skills(self) -> dict[str, SkillSpec] | None:
        """Skills of live agents whose cards verify (None: no registry, no check).

        Recomputed at most every 0.2 s (or when an agent comes or goes): it is asked on
        every decision, and liveness is judged in seconds anyway."""
        if self.registry is None:
            return None
        now = self._clock()
        assert self.presence is not None
        if self._skills is None or now - self._skills_at > 0.2 or \
                self.presence.changed.is_set():
            self._skills, self._skills_at = self.registry.skills(), now
            wall = self.now()
            for sid in self._skills:
                # When each skill was first seen live by this process (or came back):
                # a step's timeout does not count the time it waited for an agent.
                self._live_since.setdefault(sid, wall)
            for sid in [k for k in self._live_since if k not in self._skills]:
                del self._live_since[sid]
        return self._skills

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
        if first is None:
            queued = self._queued.get(task_id)
            if queued is not None:
                return await asyncio.shield(queued)
        mine: asyncio.Future[TaskState] = asyncio.get_running_loop().create_future()
        mine.add_done_callback(_consume_exception)
        if first is None:
            self._queued[task_id] = mine
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
            if self._queued.get(task_id) is mine:
                del self._queued[task_id]
        mine.set_result(state)
        return state

    async def _drive(self, task_id: str, first: list[ev.Event] | None,
                     mine: asyncio.Future[TaskState]) -> TaskState:
        lock = self._locks.setdefault(task_id, asyncio.Lock())
        async with lock:
            if self._queued.get(task_id) is mine:
                del self._queued[task_id]  # reading now: later wake-ups need a new drive
            delivered = self._inbox.pop(task_id, None)
            fresh = task_id not in self._cache
            try:
                state = await self.load(task_id, delivered)
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
                    await self._republish_dispatched(state)
                confirmed: set[str] = set()
                for _ in range(50):
                    live = self._live_set(confirmed)
                    actions = d.decide(state, self.now(), live_skills=live,
                                       no_agent_wait_s=self.settings.no_agent_wait_s,
                                       live_since=self._live_since)
                    stale = await self._stale_no_agent(state, actions, confirmed)
                    if stale:
                        continue  # the view was stale: an agent offers the skill
                    if not actions or isinstance(actions[0], d.Wait):
                        if carried:
                            state = await self._flush(state, [], [], carried)
                        if not actions:  # terminal
                            self._waiting.pop(task_id, None)
                        else:
                            until = actions[0].until  # type: ignore[union-attr]
                            cached = self._cache.get(task_id)
                            if cached is not None and cached.unread:
                                # Folded from deliveries only: another orchestrator
                                # replica may hold the task's other results (each
                                # result goes to one replica). Look again soon, with
                                # a read, rather than wait for an event that went there.
                                soon = self.now() + timedelta(seconds=UNREAD_RECHECK_S)
                                until = soon if until is None else min(until, soon)
                            self._waiting[task_id] = until
                        return state
                    cached = self._cache.get(task_id)
                    guard = None
                    if cached is not None and cached.unread:
                        # Folded from deliveries: a cancel or an approval stored before
                        # them may be missing (it comes on another consumer). Completing
                        # is conditioned on the control subject being as the fold has
                        # it; anything else reads first.
                        if not all(isinstance(a, d.Merge | d.Complete) for a in actions):
                            state = await self.load(task_id)
                            continue
                        guard = (subjects.task_control(task_id), cached.control_seq)
                    try:
                        state = await self._execute(state, actions, carried, guard)
                    except AppendConflict as e:
                        log.debug("task %s: %s; re-reading", task_id, e)
                        state = await self.load(task_id)
                    carried = []
                return state
            except BaseException:
                # Failed half-way (the ledger took the dispatch but the work publish
                # failed, in a leader election say): forget the cached fold, so the
                # retry sees the task as first seen and re-publishes dispatched but
                # unstarted steps.
                self._cache.pop(task_id, None)
                raise

    async def _begin(self, task_id: str, state: TaskState, first: list[ev.Event]
                     ) -> tuple[TaskState, list[ev.Event]] | None:
        """Store a new task's submission, only if the task's events subject is empty
        (fenced): of two submissions of one new id (or a submission and a rejection of
        an invalid one) exactly one lands. Returns the state with it folded in and the
        rest of `first` folded in and carried (appended with the first decisions), or
        None if the task exists."""
        cached = self._cache.get(task_id)
        if state.last_seq or cached is None or cached.state is not state:
            return None  # the task has events but no submission: it exists
        try:
            seq = await self.ledger.append(first[0], expected_last_subject_seq=0,
                                           validate=False)
        except AppendConflict:
            await self.load(task_id)
            return None
        apply(state, LedgerEntry(seq, subject_for(first[0]), first[0]), check_seq=False)
        if seq > cached.cursor:
            cached.local.add(seq)
        return state, _prefold(state, first[1:])

    def _live_set(self, confirmed: set[str]) -> set[str] | None:
        live = self.live_skills()
        return None if live is None else set(live) | confirmed

    async def _stale_no_agent(self, state: TaskState, actions: list[d.Action],
                              confirmed: set[str]) -> bool:
        """A `no_agent` failure is decided on the registry view, which lags when the
        loop is saturated: before it is carried out, the registry itself is read. True:
        the skill is live after all (added to `confirmed`), decide again."""
        if len(actions) != 1 or not isinstance(actions[0], d.Fail) or \
                actions[0].code != "no_agent" or self.registry is None:
            return False
        waiting = {skill for _, skill, _ in d.waiting_for_agents(state, self._live_set(
            confirmed))}
        if not waiting:
            return False
        fresh = await self._fresh_skills()
        if fresh is None:
            return False  # no second opinion: the view decides
        found = set(fresh) & waiting
        if not found:
            return False
        log.info("task %s: the registry view was stale (skills %s are live)", state.task_id,
                 ", ".join(sorted(found)))
        confirmed |= found
        self._skills = None  # recompute the view at the next look
        return True

    async def _fresh_skills(self) -> dict[str, SkillSpec] | None:
        """The live skills read from the registry bucket now, not from the view (which
        lags when the loop is saturated); None if the read failed."""
        if self.registry is None:
            return None
        from jetmesh.a2a.registry import Registry

        try:
            reg = await Registry.open(self.js, ttl_s=self.settings.agent_ttl_s,
                                      verifier=self.registry.verifier,
                                      replicas=self.bus_settings.replicas, wait_s=2.0)
            try:
                return reg.skills()
            finally:
                await reg.close()
        except Exception as e:
            log.warning("registry read failed: %s", e)
            return None

    async def _flush(self, state: TaskState, events: list[ev.Event],
                     commands: list[tuple[str, bytes, dict[str, str]]],
                     carried: list[ev.Event] | None = None,
                     guard: tuple[str, int] | None = None) -> TaskState:
        """Append `carried` (already folded in) and `events`, and publish `commands`, in
        one pipelined batch, then fold `events` in locally. If JetStream dropped any as a
        duplicate (another replica, or an earlier delivery, made the same decision
        first), the state is read again instead. `guard` (subject, last sequence): the
        task's completion is stored only on that condition (AppendConflict otherwise;
        the events before it in the batch, such as the merge's model call, are stored)."""
        carried = carried or []
        if not events and not commands and not carried:
            return state
        await self._ensure_work_consumers(commands)
        if state.traceparent:  # every event of the task carries its trace context
            def stamped(es: list[ev.Event]) -> list[ev.Event]:
                return [e if e.traceparent else e.model_copy(
                    update={"traceparent": state.traceparent}) for e in es]
            events, carried = stamped(events), stamped(carried)
        batch = [*carried, *events]
        expect = [guard if isinstance(e, ev.TaskCompleted) else None for e in batch] \
            if guard else []
        acks = await self.ledger.append_pipelined(batch, validate=False, also=commands,
                                                  expect=expect)
        cached = self._cache.get(state.task_id)
        if cached is None or cached.state is not state or any(a.duplicate for a in acks):
            self._cache.pop(state.task_id, None)
            return await self.load(state.task_id)
        control = subjects.task_control(state.task_id)
        for ack in acks:
            if ack.subject == control:
                cached.control_seq = max(cached.control_seq, ack.seq)
        for ack in acks[:len(carried)]:
            state.last_seq = max(state.last_seq, ack.seq)
            if ack.seq > cached.cursor:
                cached.local.add(ack.seq)
        for event, ack in zip(events, acks[len(carried):], strict=False):
            if ack.seq > cached.cursor and ack.seq not in cached.local:
                apply(state, LedgerEntry(ack.seq, subject_for(event), event), check_seq=False)
                cached.local.add(ack.seq)
        return state

    async def _execute(self, state: TaskState, actions: list[d.Action],
                       carried: list[ev.Event] | None = None,
                       guard: tuple[str, int] | None = None) -> TaskState:
        """Carry out one round of decisions; `carried`: events already folded in that go
        out first, in the same batch; `guard`: see `_flush`."""
        tid = state.task_id
        events: list[ev.Event] = []
        commands: list[tuple[str, bytes, dict[str, str]]] = []
        for a in actions:
            if isinstance(a, d.Plan):
                # The plan is folded in now and goes out first, in the batch of the
                # dispatches it makes ready.
                planned = _prefold(state, await self._plan(state))
                carried = [*(carried or []), *planned]
                evs, cmds = self._first_dispatches(state, planned)
                events += evs
                commands += cmds
            elif isinstance(a, d.FailStep):
                if carried:
                    state = await self._flush(state, [], [], carried)
                    carried = []
                # Fenced on the step subject: a result that arrived meanwhile wins.
                await self.ledger.append(ev.StepFailed(
                    subject=tid, source=SOURCE, data=ev.StepFailedData(
                        step_id=a.step_id, agent="orchestrator", code=a.code, reason=a.reason,
                        retryable=a.retryable, attempt=a.attempt)),
                    expected_last_subject_seq=a.expected_seq, validate=False)
                return await self.load(tid)
            elif isinstance(a, d.Merge):
                events += await self._merge(state)
            elif isinstance(a, d.Complete):
                events.append(ev.TaskCompleted(
                    id=end_id(tid), subject=tid, source=SOURCE,
                    data=ev.TaskCompletedData(result=a.result)))
            elif isinstance(a, d.Fail):
                events += self._cascade_cancel(state, a.reason)
                events.append(ev.TaskFailed(
                    id=end_id(tid), subject=tid, source=SOURCE,
                    data=ev.TaskFailedData(code=a.code, reason=a.reason)))
            elif isinstance(a, d.Cancel):
                events.append(ev.TaskCanceled(
                    id=end_id(tid), subject=tid, source=SOURCE,
                    data=ev.TaskCanceledData(reason=a.reason)))
            elif isinstance(a, d.Dispatch):
                evs, cmds = self._dispatch(state, a)
                events += evs
                commands += cmds
        return await self._flush(state, events, commands, carried, guard)

    def _first_dispatches(self, state: TaskState, planned: list[ev.Event]
                          ) -> tuple[list[ev.Event], list[tuple[str, bytes, dict[str, str]]]]:
        """The dispatches a new plan (already folded into `state`) makes ready, so the
        plan and its first steps go out in one batch."""
        if not any(isinstance(e, ev.TaskPlanned) for e in planned):
            return [], []
        live = self.live_skills()
        events: list[ev.Event] = []
        commands: list[tuple[str, bytes, dict[str, str]]] = []
        for a in d.decide(state, self.now(), live_skills=set(live) if live is not None else None,
                          no_agent_wait_s=self.settings.no_agent_wait_s,
                          live_since=self._live_since):
            if isinstance(a, d.Dispatch):
                evs, cmds = self._dispatch(state, a)
                events += evs
                commands += cmds
        return events, commands

    def _cascade_cancel(self, state: TaskState, reason: str) -> list[ev.Event]:
        """Tell every worker running a step of this task to stop (deadline, failure)."""
        running = [st for st in state.steps.values()
                   if st.status in (StepStatus.DISPATCHED, StepStatus.RUNNING)]
        if running and state.cancel_requested is None:
            return [ev.CancelRequested(
                id=f"{state.task_id}-cancel-cascade", subject=state.task_id, source=SOURCE,
                data=ev.CancelRequestedData(reason=reason, by="orchestrator"))]
        return []

    def _guard(self, state: TaskState) -> BudgetGuard | None:
        budget = state.submitted.budget if state.submitted else None
        if budget is None or (budget.max_usd is None and budget.max_tokens is None):
            return None
        return BudgetGuard(self.book, state.task_id, budget)

    def _dispatch(self, state: TaskState, a: d.Dispatch
                  ) -> tuple[list[ev.Event], list[tuple[str, bytes, dict[str, str]]]]:
        """The events and the work command of one dispatch (sent by `_flush`).

        Schema gate: an input that does not match the skill's input schema fails the
        step here and never reaches a worker. Deterministic ids: a replica or a
        redelivery dispatching the same attempt again is dropped by JetStream's
        duplicate window, on the ledger and on the work queue.
        """
        tid = state.task_id
        live = self.live_skills() or {}
        skill = live.get(a.skill)
        errors = schema_errors(skill.input_schema, a.input) if skill else []
        if errors:
            return [ev.StepFailed(
                id=f"{tid}-{a.step_id}-invalid-{a.attempt}", subject=tid, source=SOURCE,
                data=ev.StepFailedData(
                    step_id=a.step_id, agent="orchestrator", code="invalid_input",
                    reason=f"input does not match skill '{a.skill}': " + "; ".join(errors[:10]),
                    retryable=False, attempt=a.attempt))], []
        dispatched = ev.StepDispatched(
            id=f"{tid}-{a.step_id}-dispatch-{a.attempt}", subject=tid, source=SOURCE,
            data=ev.StepDispatchedData(step_id=a.step_id, skill=a.skill, input=a.input,
                                       attempt=a.attempt))
        return [dispatched], [self._command(state, a)]

    def _command(self, state: TaskState, a: d.Dispatch) -> tuple[str, bytes, dict[str, str]]:
        sub = state.submitted
        assert sub is not None
        budget = sub.budget
        slice_usd = None
        if budget and budget.max_usd is not None:
            # Each step gets a fair share of what is left, split across unfinished steps.
            open_steps = sum(1 for st in state.steps.values() if not st.status.terminal)
            slice_usd = max(0.0, budget.max_usd - state.cost_usd) / max(1, open_steps)
        deadline = None
        if budget and budget.deadline_s and state.created_at:
            deadline = state.created_at + timedelta(seconds=budget.deadline_s)
        cmd = ev.StepCommand(task_id=state.task_id, step_id=a.step_id, skill=a.skill,
                             input=a.input, attempt=a.attempt, user_id=sub.user_id,
                             tenant=sub.tenant, budget=budget, slice_usd=slice_usd,
                             deadline=deadline, traceparent=state.traceparent)
        return (subjects.work(a.skill), cmd.model_dump_json(exclude_none=True).encode(),
                {"Nats-Msg-Id": f"{state.task_id}-{a.step_id}-{a.attempt}",
                 **({"traceparent": state.traceparent} if state.traceparent else {})})

    async def _republish_dispatched(self, state: TaskState) -> None:
        """First sight of a task in this process (a restart, a replica taking over): a
        step recorded as dispatched but never started may have lost its work command in
        a crash between the ledger append and the publish. Publishing it again is safe:
        the same Nats-Msg-Id is dropped as a duplicate, and a worker skips a step that
        already has its result."""
        if state.terminal or state.submitted is None:
            return
        redo = [self._command(state, d.Dispatch(st.id, st.skill, st.input or {}, st.attempt))
                for st in state.steps.values()
                if st.status is StepStatus.DISPATCHED and st.input is not None]
        if redo:
            futures = [await self.js.publish_async(subj, data,
                                                   headers={**h, ev.RESENT_HEADER: "restart"})
                       for subj, data, h in redo]
            await asyncio.gather(*futures)

    @staticmethod
    def _calls(state: TaskState, recorder: Recorder) -> list[ev.Event]:
        return [ev.ModelCalled(subject=state.task_id, source=SOURCE, data=c)
                for c in recorder.new]

    async def _plan(self, state: TaskState) -> list[ev.Event]:
        tid = state.task_id
        sub = state.submitted
        assert sub is not None
        if sub.replay_of is not None:
            from jetmesh.orchestrator.replay import replayed_plan

            return await replayed_plan(self.ledger, state)
        if sub.workflow:
            wf = self.workflows.get(sub.workflow)
            if wf is None:  # registry changed since submission
                return [ev.TaskFailed(
                    id=end_id(tid), subject=tid, source=SOURCE, data=ev.TaskFailedData(
                        code="unknown_workflow", reason=f"unknown workflow '{sub.workflow}'"))]
            return [ev.TaskPlanned(
                id=f"{tid}-planned", subject=tid, source=SOURCE, data=ev.TaskPlannedData(
                    planner=f"workflow:{wf.name}", steps=wf.steps, merge=wf.merge))]
        live = self.live_skills()
        if live is not None:
            # A model call follows: a read of the registry itself is cheap beside it,
            # and a stale view (a saturated loop) must not leave skills out of the plan.
            # One read serves the plans of the next second (it costs an ordered consumer
            # on the bucket: 11 messages; once per task it was a tenth of a fan-out
            # task's messages).
            now = time.monotonic()
            if self._planner_fresh is None or now - self._planner_fresh[0] > 1.0:
                self._planner_fresh = (now, await self._fresh_skills() or {})
            live = {**self._planner_fresh[1], **live}
        skills = sorted((live or {}).values(), key=lambda s: (s.id != "triage", s.id))
        recorder = Recorder("plan", [c for c in state.orchestrator_calls if c.purpose == "plan"],
                            self._guard(state))
        try:
            steps, merge = await plan_with_model(self.model, sub.goal, sub.input, skills,
                                                 recorder)
        except BudgetRefused as e:
            return self._calls(state, recorder) + [ev.TaskFailed(
                id=end_id(tid), subject=tid, source=SOURCE, data=ev.TaskFailedData(
                    code="budget_exceeded", reason=f"planning: {e}"))]
        except PlanError as e:
            detail = ("; ".join(str(x) for x in e.errors[:5])) if e.errors else ""
            return self._calls(state, recorder) + [ev.TaskFailed(
                id=end_id(tid), subject=tid, source=SOURCE, data=ev.TaskFailedData(
                    code="plan_failed", reason=f"{e.reason}{': ' + detail if detail else ''}"))]
        return self._calls(state, recorder) + [ev.TaskPlanned(
            id=f"{tid}-planned", subject=tid, source=SOURCE, data=ev.TaskPlannedData(
                planner=f"llm:{self.model.provider}/{self.model.name}", steps=steps,
                merge=merge))]

    async def _merge(self, state: TaskState) -> list[ev.Event]:
        tid = state.task_id
        sub = state.submitted
        assert sub is not None
        outputs = {p.id: state.steps[p.id].output or {} for p in state.plan}
        recorder = Recorder("merge",
                            [c for c in state.orchestrator_calls if c.purpose == "merge"],
                            self._guard(state))
        if sub.replay_of is not None and sub.fork is None:
            from jetmesh.orchestrator.replay import replayed_merge

            return await replayed_merge(self.ledger, state, outputs)
        try:
            result = await merge_with_model(self.model, sub.goal, outputs, recorder)
        except BudgetRefused as e:
            return [ev.TaskFailed(
                id=end_id(tid), subject=tid, source=SOURCE, data=ev.TaskFailedData(
                    code="budget_exceeded", reason=f"merging: {e}"))]
        return self._calls(state, recorder) + [ev.TaskCompleted(
            id=end_id(tid), subject=tid, source=SOURCE,
            data=ev.TaskCompletedData(result=result))]

    # ------------------------------------------------------------------ timers, recovery

    async def _ensure_work_consumers(self, commands: list[tuple[str, bytes, dict[str, str]]]
                                     ) -> None:
        """Before a skill's first command from this process: its durable work consumer
        exists (created as its workers create it), so a step for a skill whose agents
        are not up yet waits in the work queue for them rather than being swept as work
        nobody takes (bus.sweep)."""
        for subject, _, _ in commands:
            skill = subject.rsplit(".", 1)[-1]
            if skill in self._work_consumers:
                continue
            await ensure_consumer(self.js, subjects.STREAM_WORK,
                                  work_consumer_config(skill, self.bus_settings))
            self._work_consumers.add(skill)

    async def _sweeper(self) -> None:
        """Dead-letter work no consumer takes (bus.sweep), so it is seen, not kept."""
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
        if self.presence and self.presence.changed.is_set():
            # An agent came or went: tasks waiting for one may move now. The skills
            # cache is dropped with the flag, or a drive in the next 0.2 s would still
            # see the skills from before the change (and wait for nothing).
            self.presence.changed.clear()
            self._skills = None
            due = [t for t, until in self._waiting.items() if until is not None]
        else:
            due = [t for t, until in list(self._waiting.items())
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
            if etype in {"jetmesh.task.completed.v1", "jetmesh.task.failed.v1",
                         "jetmesh.task.canceled.v1", "jetmesh.task.rejected.v1"}:
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
