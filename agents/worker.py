"""The worker runtime: binds an agent spec to the bus.

For each skill it pulls step commands from the skill's durable consumer (shared by
every replica, so replicas split the load), runs the step loop, and appends what it did
to the ledger: model calls and read-only tool calls to the step's log, pipelined; claims,
side effects and the result to the step's line, each fenced on the line's last
sequence: if the step was redelivered to another replica (or timed out by the
orchestrator) the stale worker's next fenced append fails and it stops without acking.
On redelivery the step resumes from its recorded calls, so side effects already
recorded are not run again and recorded model calls are not paid for again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import Field, ValidationError
from pydantic_settings import SettingsConfigDict

from jetmesh.agents.errors import ClaimLost, StepStopped
from jetmesh.agents.guard import RuntimeGuard
from jetmesh.agents.loop import StepOutcome, StepReplay, run_step
from jetmesh.agents.models.types import Model
from jetmesh.agents.policy import DEFAULT_POLICY, Policy, args_hash
from jetmesh.agents.registry import Advertiser
from jetmesh.agents.routing import tier_models
from jetmesh.agents.signing import signer_from_env
from jetmesh.agents.spec import AgentSpec
from jetmesh.agents.toolcache import KVToolCache
from jetmesh.agents.tools import Tool, ToolContext
from jetmesh.bus import events as ev
from jetmesh.bus import headers as hn
from jetmesh.bus import subjects, tracing
from jetmesh.bus.budgets import BudgetBook, Budgets
from jetmesh.bus.consumer import Fenced, PullRunner, Reject
from jetmesh.bus.errors import AppendConflict, InvalidEventError
from jetmesh.bus.killswitch import KillSwitchWatch
from jetmesh.bus.ledger import Entries, Ledger, LedgerEntry, event_headers, subject_for
from jetmesh.bus.presence import Presence
from jetmesh.bus.settings import BusSettings, GroupSettings
from jetmesh.bus.spendcaps import SpendBook, SpendCaps
from jetmesh.bus.streams import declare_streams, work_consumer_config
from jetmesh.bus.tasks import cancel_and_wait
from jetmesh.bus.tracecontext import agent_traceparent, task_traceparent

log = logging.getLogger("jetmesh.worker")


DISPATCH_CHECKS = 3
"""Deliveries of a step command whose dispatch the ledger does not show before it is
refused as forged or orphaned (a lagging replica answers the first ones)."""


@dataclass
class _Vouched:
    """What a worker has read of one task's events subject, for its dispatch checks."""

    submitted: ev.TaskSubmitted | None = None
    plan: list[ev.PlanStep] | None = None
    dispatches: dict[tuple[str, int], ev.StepDispatchedData] = field(default_factory=dict)
    ended: bool = False
    next_seq: int = 1
    """The ledger sequence to read the subject from next."""
    reading: asyncio.Future[None] | None = None
    """The read of the subject under way, which concurrent checks join."""

    def add(self, event: ev.Event) -> None:
        if isinstance(event, ev.TaskSubmitted) and self.submitted is None:
            self.submitted = event
        elif isinstance(event, ev.TaskPlanned) and self.plan is None:
            self.plan = event.data.steps
        elif isinstance(event, ev.TERMINAL_TASK_EVENTS):
            self.ended = True
        elif isinstance(event, ev.StepDispatched):
            self.dispatches.setdefault((event.data.step_id, event.data.attempt), event.data)


class NotDispatchedYet(Exception):
    """The ledger does not show this command's dispatch (yet): retried, then refused."""


def replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _log_send_failure(task: asyncio.Task[None]) -> None:
    """A held log record sent from the timer could not be: the connection is down (the
    record is then lost like any unsent message; `finish` still asks for a proof)."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("a held log record could not be sent: %s", task.exception())


@dataclass
class FencedRecorder:
    """Appends a step's records to the ledger.

    Model calls and read-only tool calls go to the step's log (JM_LOG), sent without an
    ack request: the step neither waits on a disk round trip per record nor gets an
    ack message back for each. One record is held back, the latest, so that it can be
    the one that asks for the ack: at `finish` it is sent with a reply subject, right
    beside the result, and its ack proves the step's whole log. nats-server takes one
    connection's messages to one stream in the order they arrive, so the ack of the
    last record comes only after JM_LOG has taken every record of the step before it
    (a completed step still proves its records were stored). The held record is sent
    (without an ack) as soon as anything else happens: the next record, a claim check
    before a paid model call, a fenced append, `close`, or `hold_s` after it was made,
    whichever comes first; a worker killed meanwhile loses at most that one record (a
    model call or a read-only tool call, made again when the step resumes: the steps'
    logs' class). A first delivery's `StepStarted` is never held.

    Everything else, and the step's result, goes to the step's line, fenced on the
    line's last sequence (which the log never moves). A worker that lost the step to a
    redelivery, or whose step the orchestrator timed out, is fenced out there, and its
    result is refused.
    """

    ledger: Ledger
    task_id: str
    step_id: str
    source: str
    last_seq: int
    worker: str | None = None
    lease_s: float = 10.0
    """How long a proof that this replica holds the step (a fenced append that was
    stored, a claim check, the delivery itself) stays good. Another replica can claim
    the step only after a redelivery, which comes ack_wait after the last in-progress
    ack this replica sent (at most ack_wait/3 before the proof): the worker uses
    ack_wait/3, so a lease never outlives the claim it stands for."""
    deadline: float | None = None
    """Monotonic time by which the step must end (the task's deadline), if any: no lease
    runs past it."""
    held_at: float | None = None
    """Monotonic time the last proof of the claim was *sent* (see `lease_s`)."""
    traceparent: str | None = None
    """The task's trace context, stamped on every record (bus.tracecontext)."""
    hold_s: float = 0.05
    """Longest time the latest log record is held back unsent (see the class doc)."""
    _pending: list[asyncio.Future[Any]] = field(default_factory=list)
    _held: tuple[str, bytes, dict[str, str]] | None = None
    """The latest log record, not sent yet: (subject, bytes, headers)."""
    _unproved: tuple[str, bytes, dict[str, str]] | None = None
    """The last log record sent without an ack request, while no ack covers it yet."""
    _timer: asyncio.TimerHandle | None = None

    async def _append(self, event: ev.Event, data: bytes | None = None) -> None:
        """A fenced append on the step's line (`data`: the event's bytes, if already
        encoded), after the held log record. It does not wait for the pipelined log
        records (they never move the fence, and the same connection stores them first):
        after a side effect, its record is one disk round trip away, no more."""
        await self._send_held()
        sent = time.monotonic()
        if self.traceparent and not event.traceparent:
            event = event.model_copy(update={"traceparent": self.traceparent})
        try:
            self.last_seq = await self.ledger.append(
                event, expected_last_subject_seq=self.last_seq, validate=False, data=data)
        except AppendConflict as e:
            raise Fenced(str(e)) from e
        self.held_at = sent

    def lease_left(self) -> float:
        """Seconds the last proof of the claim still covers (<= 0: none)."""
        if self.held_at is None:
            return 0.0
        now = time.monotonic()
        left = self.held_at + self.lease_s - now
        if self.deadline is not None:
            left = min(left, self.deadline - now)
        return left

    async def begin_effect(self, tool: Tool, arguments: dict[str, Any], key: str,
                           recheck: bool = False) -> None:
        """The claim check right before a side effect: an `EffectStarted` record,
        fenced on the step's line, then the lease measured from before it was sent.

        Fenced out (another replica claimed the step, or the orchestrator timed it out)
        or a lease that ran out during the check (the process was paused or starved
        while the append was in flight) raises `ClaimLost`: the effect is not run. On a
        recheck (the tool calls `ToolContext.begin_effect` at its effect) a lease still
        good answers at once, with no round trip. The record also tells a replica that
        takes the step over that the effect may have run (in doubt: it asks the tool's
        `reconcile` before running it again)."""
        if recheck and self.lease_left() > 0:
            return
        event = ev.EffectStarted(subject=self.task_id, source=self.source,
                                 data=ev.EffectStartedData(
                                     step_id=self.step_id, agent=self.source.rsplit("/", 1)[-1],
                                     worker=self.worker or "", tool=tool.name,
                                     args_hash=args_hash(tool.name, arguments),
                                     idempotency_key=key))
        try:
            await self._append(event)
        except Fenced as e:
            raise ClaimLost(str(e)) from e
        if self.lease_left() <= 0:
            raise ClaimLost("the claim's lease ran out while it was checked (the process "
                            "was paused or starved); another replica may hold the step")

    async def check_claim(self) -> None:
        """Before a paid model call: within the lease nothing to do; past it, read the
        step's line and raise `ClaimLost` if anyone wrote to it since this replica's last
        append (a zombie does not pay for calls nobody will use)."""
        await self._send_held()  # the call may take long: its context's record goes now
        if self.lease_left() > 0:
            return
        sent = time.monotonic()
        line = await self.ledger.read(self.task_id,
                                      subject=subjects.step_events(self.task_id, self.step_id))
        last = line.last_seq()
        if last != self.last_seq:
            raise ClaimLost(f"the step's line moved to sequence {last} (this replica's "
                            f"last append was {self.last_seq})")
        self.held_at = sent

    async def finish(self, event: ev.Event) -> None:
        """The step's result: fenced on the line, sent right beside the log record that
        asks for the ack proving the step's log (the held one, or, if none is held,
        the last one sent again: a duplicate JM_LOG acks without storing it), both
        awaited together, in one round trip. Fenced out (another worker claimed the
        step, or the orchestrator timed it out) raises Fenced."""
        self._cancel_timer()
        proof = self._held or self._unproved
        self._held = self._unproved = None
        if proof is not None:
            subject, data, headers = proof
            self._pending.append(await self.ledger.js.publish_async(
                subject, data, headers=headers))
        pending, self._pending = self._pending, []
        # A task, not publish_async: nats-py leaves a publish_async future unresolved
        # when the server answers with an API error (the fence's "wrong last sequence").
        final = asyncio.ensure_future(self._append(event))
        results = await asyncio.gather(
            asyncio.wait_for(asyncio.gather(*pending), self.ledger.timeout_s), final,
            return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def close(self) -> None:
        """The step ended without `finish` (fenced out, stopped, failed): the held log
        record is sent (no ack asked), so the audit keeps it."""
        with contextlib.suppress(Exception):
            await self._send_held()
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _send_held(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        self._unproved = held  # (nats-py queues a publish before it can suspend)
        subject, data, headers = held
        await self.ledger.nc.publish(subject, data, headers=headers)

    def _on_timer(self) -> None:
        self._timer = None
        if self._held is not None:
            task = asyncio.ensure_future(self._send_held())
            task.add_done_callback(_log_send_failure)

    async def _pipeline(self, event: ev.Event, data: bytes | None = None, *,
                        hold: bool = True) -> None:
        """A log record: held until the next thing happens (see the class doc), or, not
        `hold`, sent at once (still without an ack request)."""
        if self.traceparent and not event.traceparent:
            event = event.model_copy(update={"traceparent": self.traceparent})
        record = (subject_for(event), data if data is not None else ev.encode_event(event),
                  event_headers(event, None))
        await self._send_held()
        self._held = record
        if not hold:
            await self._send_held()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.hold_s, self._on_timer)

    async def record_start(self, event: ev.StepStarted) -> None:
        """A first delivery's start (not a claim): on the step's log, sent at once (what
        the step does next may be what kills its process: the start stays on record)."""
        await self._pipeline(event, hold=False)

    async def record_model_call(self, data: ev.ModelCalledData) -> None:
        """A model call, on the step's log. A response the ledger cannot store (nested
        past the edge's depth limit) ends the step: it could never be replayed."""
        if data.worker != self.worker:  # the loop sets it when its ToolContext has it
            data = data.model_copy(update={"worker": self.worker})
        try:
            await self._pipeline(ev.ModelCalled(subject=self.task_id, source=self.source,
                                                data=data, traceparent=self.traceparent))
        except InvalidEventError as e:
            raise StepStopped("invalid_output",
                              f"the model's response cannot be recorded: {e.reason}") from e

    async def record_route(self, data: ev.ModelRoutedData) -> None:
        """A routing decision, on the step's log."""
        await self._pipeline(ev.ModelRouted(subject=self.task_id, source=self.source,
                                            data=data.model_copy(update={"worker": self.worker})))

    async def record_compaction(self, data: ev.ContextCompactedData) -> None:
        """A context compaction, on the step's log."""
        await self._pipeline(ev.ContextCompacted(
            subject=self.task_id, source=self.source,
            data=data.model_copy(update={"worker": self.worker})))

    async def record_tool_call(self, data: ev.ToolCalledData, *, event_id: str | None = None
                               ) -> None:
        """A tool call: a side effect on the fenced line (durable before the step goes
        on), a read-only call on the log. An output the ledger cannot store is recorded
        as the tool's error instead, so the step goes on and its replay stays whole."""
        if data.worker != self.worker:
            data = data.model_copy(update={"worker": self.worker})
        ident = {"id": event_id} if event_id else {}
        event = ev.ToolCalled(subject=self.task_id, source=self.source, data=data,
                              traceparent=self.traceparent, **ident)
        try:
            raw = ev.encode_event(event)
        except InvalidEventError as e:
            event = ev.ToolCalled(subject=self.task_id, source=self.source, data=data.model_copy(
                update={"output": None, "error": f"tool output cannot be recorded: {e.reason}"}),
                traceparent=self.traceparent, **ident)
            raw = ev.encode_event(event)
        if data.side_effects:
            await self._append(event, raw)
        else:
            await self._pipeline(event, raw)


def replay_from(entries: list[LedgerEntry]) -> StepReplay:
    """The step's recorded calls that a new claim may reuse, in order.

    A record counts only if it was written by the worker holding the step at that point
    of the ledger (the one of the latest StepStarted before it): records a stale worker
    wrote after losing the step are audit history, not part of the step's run.
    """
    models: list[ev.ModelCalledData] = []
    tools: list[ev.ToolCalledData] = []
    cleared: list[tuple[str, str]] = []
    holder: str | None = None
    for e in entries:
        event = e.event
        if isinstance(event, ev.StepStarted):
            holder = event.data.worker
        elif (isinstance(event, ev.PolicyDecided) and event.data.decision != "deny") \
                or isinstance(event, ev.EffectStarted):  # whoever wrote it: it may have run
            cleared.append((event.data.tool, event.data.args_hash))
        elif isinstance(event, ev.ModelCalled | ev.ToolCalled):
            if event.data.worker not in (None, holder):
                continue
            if isinstance(event, ev.ModelCalled):
                models.append(event.data)
            else:
                tools.append(event.data)
    return StepReplay.from_records(models, tools, cleared)


def line_last(entries: list[LedgerEntry]) -> int:
    """The last sequence on the step's fenced line among a step's entries (0: none),
    counting a message the read skipped (not an event): the fence counts it too."""
    def on_line(subject: str) -> bool:
        return not subjects.is_step_log(subject)

    if isinstance(entries, Entries):
        return entries.last_seq(on_line)
    return max((e.seq for e in entries if on_line(e.subject)), default=0)


def finished(entries: list[LedgerEntry], attempt: int) -> bool:
    """True when the step already has a result this delivery must not redo."""
    for e in entries:
        if isinstance(e.event, ev.StepCompleted):
            return True
        if isinstance(e.event, ev.StepFailed) and e.event.data.attempt >= attempt \
                and e.event.data.code != "dead_lettered":  # a redrive runs it again
            return True
    return False


class WorkerSettings(GroupSettings):
    """Runtime controls of a worker: ``JETMESH_WORKER_<FIELD>``, or the older
    ``JETMESH_<FIELD>`` (see bus.settings)."""

    model_config = SettingsConfigDict(env_prefix="JETMESH_WORKER_", extra="ignore")

    policy_file: Path | None = None
    """YAML/JSON tool policy (see jetmesh.agents.policy); the default policy otherwise."""
    step_concurrency: int = Field(default=256, ge=1)
    """Steps one replica runs at once, per skill (JETMESH_STEP_CONCURRENCY). A step mostly
    waits (on its model, its tools, the ledger), so one process holds many: at 64, 50
    tasks in flight with 20 ms model calls queued in the work stream (B: 71 tasks/s; at
    256, 87)."""
    spend_caps_file: Path | None = None
    """YAML/JSON daily and monthly caps per tenant and user (jetmesh.bus.spendcaps;
    JETMESH_SPEND_CAPS_FILE); none: no period caps."""
    approval_timeout_s: float = 60.0
    """A gated tool call not approved within this time is denied. The wait counts toward
    the step's time limit (limits.step_timeout_s), so keep it shorter."""

    def policy(self) -> Policy:
        return Policy.load(self.policy_file) if self.policy_file else DEFAULT_POLICY


@dataclass(frozen=True)
class WorkerPorts:
    """What a worker is given rather than builds (issue 22): each one not given is the
    real one on the worker's connection (the ledger, the budget book in NATS KV, the
    card advertiser signing with the key the environment names)."""

    ledger: Ledger | None = None
    book: Budgets | None = None
    advertiser: Advertiser | None = None


@dataclass
class Worker:
    """One replica of one agent. `start()` binds it; `stop()` drains it."""

    spec: AgentSpec
    model: Model | None
    nc: NATS
    js: JetStreamContext
    bus_settings: BusSettings = field(default_factory=BusSettings)
    concurrency: int | None = None
    """Steps run at once per skill; None: the settings' step_concurrency."""
    heartbeat_s: float = 1.0
    replica: str = field(default_factory=replica_id)
    settings: WorkerSettings = field(default_factory=WorkerSettings)
    spend_caps: SpendCaps | None = None
    """Period caps given directly (else the settings' file)."""
    ports: WorkerPorts | None = None
    _runners: list[PullRunner] = field(default_factory=list, init=False)
    _presence: Presence | None = field(default=None, init=False)
    _mcp: Any = field(default=None, init=False)
    """The spec's MCP servers, connected (`jetmesh.agents.mcp.toolset.McpToolset`)."""

    def __post_init__(self) -> None:
        from jetmesh.agents.breakers import guard_spec

        self.spec = guard_spec(self.spec)  # external tools behind circuit breakers
        ports = self.ports or WorkerPorts()
        self.ledger = ports.ledger or Ledger(self.nc, self.js,
                                             timeout_s=self.bus_settings.request_timeout_s)
        self.book: Budgets = ports.book or BudgetBook(self.js,
                                                     replicas=self.bus_settings.replicas)
        self.killswitch = KillSwitchWatch(self.js, replicas=self.bus_settings.replicas)
        caps = self.spend_caps or (SpendCaps.load(self.settings.spend_caps_file)
                                   if self.settings.spend_caps_file else None)
        self.spend = (SpendBook(self.js, caps, replicas=self.bus_settings.replicas)
                      if caps is not None else None)
        self.policy = self.settings.policy()
        from jetmesh.agents.registry import Advertiser

        url = self.nc.connected_url.geturl() if self.nc.connected_url else None
        self._advertiser = Advertiser(self.spec, nats_url=url, signer=signer_from_env())
        self._running: dict[str, set[asyncio.Task[StepOutcome]]] = {}
        self._canceled: dict[str, str] = {}
        self._vouched: OrderedDict[str, _Vouched] = OrderedDict()
        """Per task, what its events subject showed (`_dispatched`), newest last."""
        self._in_flight: dict[int, Msg] = {}
        """Step messages being worked on (by id), for the in-progress acks."""
        self._keepalive: asyncio.Task[None] | None = None
        self.source = f"jetmesh/agent/{self.spec.name}"
        # Cost levers (agents.cost): a model per routing tier, the tool-result cache.
        self._tiers = tier_models(list(self.spec.cost.routing.values()), self.model)
        self._tool_cache = (KVToolCache(self.js, replicas=self.bus_settings.replicas)
                            if self.spec.cost.tool_cache else None)
        self.started_at = datetime.now(UTC)
        self.steps_done = 0

    def presence_value(self) -> dict[str, Any]:
        """What this replica advertises: its A2A card (signed when a key is set) and load."""
        from jetmesh.agents.breakers import worker_breaker_states
        from jetmesh.agents.models.chain import FallbackChain

        model = (self.model.describe() if isinstance(self.model, FallbackChain)
                 else f"{self.model.provider}/{self.model.name}" if self.model else None)
        value = self._advertiser.value(self.replica, model=model, started_at=self.started_at,
                                       steps_done=self.steps_done)
        value["breakers"] = worker_breaker_states(self.spec, self.model)
        value["tenants"] = self.spec.tenants  # None: shared by every tenant
        if self._mcp is not None:
            value["breakers"].update(self._mcp.breaker_states())
            value["mcp"] = self._mcp.describe()
        return value

    async def start(self) -> None:
        if self.spec.mcp_servers and self._mcp is None:
            await self._attach_mcp()
        await declare_streams(self.js, self.bus_settings)
        await self.killswitch.start()  # loaded before the first step is taken
        # A private agent (spec.tenants) serves its tenants' private work subjects only;
        # a shared one the skill's own subject.
        tenants: list[str | None] = list(self.spec.tenants) if self.spec.tenants is not None \
            else [None]
        for skill, tenant in ((sk, t) for sk in self.spec.skills for t in tenants):
            runner = PullRunner(
                self.js, subjects.STREAM_WORK,
                work_consumer_config(skill.id, self.bus_settings, tenant),
                self.handle, on_dead_letter=self._dead_lettered,
                concurrency=self.concurrency or self.settings.step_concurrency,
                max_deliver=self.bus_settings.max_deliver,
                max_bytes=self.spec.limits.max_input_bytes + 4096,
            )
            await runner.start()
            self._runners.append(runner)
        # Cancellation cascades: every replica hears a task's control subject and
        # cancels the steps of that task it is running (in-flight model calls included).
        self._control = await self.nc.subscribe(subjects.ALL_CONTROL, cb=self._on_control)
        self._keepalive = asyncio.create_task(self._keep_alive(), name="worker-keepalive")
        self._presence = Presence(
            self.js, subjects.BUCKET_AGENTS, f"{self.spec.name}.{self.replica}",
            self.presence_value, interval_s=self.heartbeat_s,
            replicas=self.bus_settings.replicas)
        await self._presence.start()
        log.info("agent %s (%s) serving %s", self.spec.name, self.replica,
                 ", ".join(s.id for s in self.spec.skills))

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking work, finish in-flight steps for `grace_s`, hand back the rest."""
        if self._presence:
            await self._presence.stop()
        with contextlib.suppress(Exception):
            await self._control.unsubscribe()
        await asyncio.gather(*(r.stop(grace_s) for r in self._runners))
        # After the drain: draining steps still need it.
        await cancel_and_wait(self._keepalive)
        await self.killswitch.stop()
        if self._mcp is not None:
            await self._mcp.aclose()

    async def _attach_mcp(self) -> None:
        """Connect the spec's MCP servers and add their tools (pinned by hash, in the
        card), before any skill is served."""
        from jetmesh.agents.breakers import guard_spec
        from jetmesh.agents.mcp.toolset import McpToolset

        self._mcp = await McpToolset.open(self.spec)
        self._set_spec(guard_spec(self._mcp.attach(self.spec)))

    def _set_spec(self, spec: AgentSpec) -> None:
        self.spec = spec
        self._advertiser.spec = spec
        self._advertiser._card = None  # the card shows the tool lists' hashes

    async def _check_mcp(self, cmd: ev.StepCommand, recorder: FencedRecorder) -> None:
        """Before a step: a changed MCP tool list is recorded on the step's log, then
        refused (the server's calls are denied) or accepted (the new tools from this
        step on), as its server's configuration says."""
        from jetmesh.agents.breakers import guard_spec

        changes, accepted = await self._mcp.check_drift()
        for change in changes:
            await recorder._pipeline(ev.McpToolsChanged(
                subject=cmd.task_id, source=self.source,
                data=change.model_copy(update={"step_id": cmd.step_id})))
        if accepted:
            self._set_spec(guard_spec(self._mcp.attach(self.spec)))

    def _work_subject(self, cmd: ev.StepCommand) -> str:
        """Where this agent takes `cmd` from: a private agent its tenant's private work
        subject (if the command names one of its tenants), a shared one the skill's."""
        tenants = self.spec.tenants
        if tenants is not None and cmd.tenant in tenants and cmd.tenant is not None:
            return subjects.private_work(cmd.skill, cmd.tenant)
        return subjects.work(cmd.skill)

    async def _dead_lettered(self, msg: Msg, reason: str) -> None:
        """A step command that ran out of deliveries fails its step now, so the
        orchestrator retries or fails the task at once instead of at the step timeout."""
        try:
            cmd = ev.StepCommand.model_validate_json(msg.data)
        except ValidationError:
            return  # not a step: nothing to fail
        if msg.subject != self._work_subject(cmd):
            return
        try:  # only a command the ledger vouches for may fail its step
            if await self._dispatched(cmd, wait_s=0.0) is None:
                return
        except Reject:
            return
        entries = await self.ledger.read_step(cmd.task_id, cmd.step_id)
        if finished(entries, cmd.attempt):
            return
        with contextlib.suppress(AppendConflict):
            await self.ledger.append(ev.StepFailed(
                subject=cmd.task_id, source=self.source, data=ev.StepFailedData(
                    step_id=cmd.step_id, agent=self.spec.name, code="dead_lettered",
                    reason=f"step command dead-lettered: {reason}", retryable=True,
                    attempt=cmd.attempt)),
                expected_last_subject_seq=line_last(entries), validate=False)

    async def _dispatched(self, cmd: ev.StepCommand, wait_s: float = 1.0, *,
                          final: bool = True) -> ev.StepCommand | None:
        """The command as the ledger vouches for it, None if its task has ended.

        A worker runs only a step the orchestrator recorded as dispatched: same step,
        skill, attempt and input, on a task that exists. Whom the step is for and its
        budget come from the task's submission, not from the command (a forged command
        cannot raise its own budget). The dispatch is stored before its command is sent,
        but a lagging replica may answer the read, so a miss is read again for a moment
        before the command is refused as forged or orphaned (dead-lettered). Not
        `final` (the command's first deliveries), a miss is `NotDispatchedYet`, a failure
        the runner retries with backoff: during a failover a replica may lag for
        seconds."""
        subject = subjects.task_events(cmd.task_id)
        give_up = time.monotonic() + wait_s
        # The command and its dispatch go out together, to two streams: the command is
        # often delivered while the dispatch waits behind the batch's other fsync'd
        # events (a few ms). Look again soon, then back off.
        pause = 0.003
        known = self._vouched.pop(cmd.task_id, None) or _Vouched()
        self._vouched[cmd.task_id] = known  # most recent last
        while len(self._vouched) > 10_000:
            self._vouched.popitem(last=False)
        while True:
            dispatch = known.dispatches.get((cmd.step_id, cmd.attempt))
            if known.ended:
                log.info("task %s has ended; step %s not run", cmd.task_id, cmd.step_id)
                return None
            if known.submitted is not None and dispatch is not None:
                break
            # Only what this process has not read of the task's events yet, in one read
            # shared by the task's steps that arrive together (dispatched together).
            await self._read_vouched(cmd.task_id, subject, known)
            if known.ended or (known.submitted is not None
                               and (cmd.step_id, cmd.attempt) in known.dispatches):
                continue
            if time.monotonic() > give_up:
                what = ("task" if known.submitted is None
                        else f"dispatch of step {cmd.step_id}")
                reason = (f"no {what} (attempt {cmd.attempt}) in the ledger for task "
                          f"{cmd.task_id}: a forged or orphaned step command")
                raise Reject(reason) if final else NotDispatchedYet(reason)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)
        submitted, plan = known.submitted, known.plan
        if dispatch.skill != cmd.skill or dispatch.input != cmd.input:
            raise Reject(f"step command differs from its dispatch in the ledger (skill "
                         f"'{dispatch.skill}', recorded input): a forged step command")
        sub = submitted.data
        deadline = None
        if sub.budget is not None and sub.budget.deadline_s:
            deadline = submitted.time + timedelta(seconds=sub.budget.deadline_s)
        slice_usd = cmd.slice_usd
        if sub.budget is None or sub.budget.max_usd is None:
            slice_usd = None
        elif slice_usd is not None:
            slice_usd = min(slice_usd, sub.budget.max_usd)
        from jetmesh.agents.replay import step_source

        replay = step_source(sub, plan, cmd.step_id, self.spec.name)  # the ledger's word
        return cmd.model_copy(update={"traceparent": task_traceparent(
                                          cmd.task_id, submitted.traceparent),
                                      "user_id": sub.user_id, "tenant": sub.tenant,
                                      "budget": sub.budget,
                                      "deadline": deadline, "slice_usd": slice_usd,
                                      "replay": replay})

    async def _read_vouched(self, task_id: str, subject: str, known: _Vouched) -> None:
        """Read what is new on the task's events subject into `known`; a read already
        under way for the task is joined rather than repeated."""
        running = known.reading
        if running is not None and not running.done():
            await asyncio.shield(running)
            return

        async def read() -> None:
            entries = await self.ledger.read(task_id, subject=subject,
                                             from_seq=known.next_seq)
            known.next_seq = max(known.next_seq, entries.last_seq() + 1)
            for entry in entries:
                known.add(entry.event)

        known.reading = asyncio.ensure_future(read())
        try:
            await asyncio.shield(known.reading)
        finally:
            if known.reading.done():
                known.reading = None

    async def _on_control(self, msg: Msg) -> None:
        if (msg.headers or {}).get(hn.CE_TYPE) != "jetmesh.task.cancel_requested.v1":
            return
        try:
            event = ev.decode_event(msg.data)
        except ValidationError:
            return
        if isinstance(event, ev.CancelRequested):
            self._canceled[event.subject] = event.data.reason
            for t in self._running.get(event.subject, set()):
                t.cancel()

    # ------------------------------------------------------------------ one step

    async def handle(self, msg: Msg) -> None:
        self._in_flight[id(msg)] = msg  # kept alive from receipt until settled
        try:
            await self._handle(msg)
        finally:
            self._in_flight.pop(id(msg), None)

    async def _handle(self, msg: Msg) -> None:
        try:
            cmd = ev.StepCommand.model_validate_json(msg.data)
        except ValidationError as e:
            raise Reject("invalid step command", [
                {"loc": list(x["loc"]), "msg": x["msg"]} for x in e.errors()]) from e
        received = time.monotonic()
        skill_ids = {s.id for s in self.spec.skills}
        if cmd.skill not in skill_ids:
            raise Reject(f"agent {self.spec.name} has no skill '{cmd.skill}'")
        if msg.subject != self._work_subject(cmd):
            raise Reject(f"a command for skill '{cmd.skill}' arrived on {msg.subject}: a "
                         "step runs only from its own skill's work subject")
        delivery = int(msg.metadata.num_delivered)
        checked = await self._dispatched(cmd, final=delivery >= DISPATCH_CHECKS)
        if checked is None:
            return  # the task has ended: nothing to run, nothing to report
        cmd = checked
        resent = bool((msg.headers or {}).get(ev.RESENT_HEADER))
        # First delivery of a first attempt: nobody has touched the step, so no claim
        # round trip. The start is logged (pipelined) and the step's first fenced
        # append, expected on an empty line, claims it: a side effect's policy decision,
        # or its result. A duplicate command running it at the same time is fenced out
        # there, before any side effect.
        fresh = delivery == 1 and cmd.attempt == 1 and not resent
        started = ev.StepStarted(subject=cmd.task_id, source=self.source, data=ev.StepStartedData(
            step_id=cmd.step_id, agent=self.spec.name, worker=self.replica,
            attempt=cmd.attempt, delivery=delivery, claim=not fresh),
            traceparent=cmd.traceparent)
        entries: list[LedgerEntry] = []
        lease = self.bus_settings.ack_wait_s / 3
        deadline = (None if cmd.deadline is None else
                    time.monotonic() + (cmd.deadline - datetime.now(UTC)).total_seconds())
        if fresh:
            # The delivery itself is the first proof of the claim: nobody else gets the
            # message before ack_wait has passed since it was received.
            recorder = FencedRecorder(self.ledger, cmd.task_id, cmd.step_id, self.source,
                                      0, self.replica, lease_s=lease, deadline=deadline,
                                      held_at=received, traceparent=cmd.traceparent)
            await recorder.record_start(started)
        else:
            entries = await self.ledger.read_step(cmd.task_id, cmd.step_id)
            if finished(entries, cmd.attempt):
                return  # a duplicate delivery of a step that already has its result
            recorder = FencedRecorder(self.ledger, cmd.task_id, cmd.step_id, self.source,
                                      line_last(entries), self.replica, lease_s=lease,
                                      deadline=deadline, traceparent=cmd.traceparent)
            await recorder._append(started)  # the claim; Fenced if someone was quicker

        try:
            # (run_step checks the input against the skill's schema first.)
            replay = await self._replay(cmd, entries)
            try:
                outcome = await self._run(cmd, msg, recorder, replay, started.id)
            except ClaimLost as e:
                raise Fenced(str(e)) from e
            if cmd.replay is not None and not cmd.replay.rerun:
                from jetmesh.agents.replay import recorded_outcome

                outcome = recorded_outcome(outcome, replay, cmd.attempt)
            if outcome.ok:
                final: ev.Event = ev.StepCompleted(
                    subject=cmd.task_id, source=self.source, data=ev.StepCompletedData(
                        step_id=cmd.step_id, agent=self.spec.name, output=outcome.output or {},
                        attempt=cmd.attempt, worker=self.replica),
                    traceparent=cmd.traceparent)
            else:
                final = ev.StepFailed(
                    subject=cmd.task_id, source=self.source, data=ev.StepFailedData(
                        step_id=cmd.step_id, agent=self.spec.name, code=outcome.code or "error",
                        reason=outcome.reason or "failed", retryable=outcome.retryable,
                        attempt=cmd.attempt, worker=self.replica),
                    traceparent=cmd.traceparent)
            try:
                await recorder.finish(final)
            except InvalidEventError as e:  # an output the ledger cannot store
                if not isinstance(final, ev.StepCompleted):
                    raise
                await recorder.finish(ev.StepFailed(
                    subject=cmd.task_id, source=self.source, data=ev.StepFailedData(
                        step_id=cmd.step_id, agent=self.spec.name, code="invalid_output",
                        reason=f"the step's output cannot be stored: {e.reason}",
                        retryable=False, attempt=cmd.attempt, worker=self.replica)))
            self.steps_done += 1
        finally:
            await recorder.close()  # a step that did not finish: its held record

    async def _replay(self, cmd: ev.StepCommand, entries: list[LedgerEntry]) -> StepReplay:
        """What the step may reuse: its own records, or, a step of a replayed task that
        does not run again, the original task's records of the same step."""
        if cmd.replay is None or cmd.replay.rerun:
            return replay_from(entries)
        from jetmesh.agents.replay import recording_of, rekey

        source, dispatched = await recording_of(self.ledger, cmd.replay.of, cmd.step_id)
        if dispatched is None or dispatched.input != cmd.input:
            return StepReplay()  # not the original's step: its first call diverges
        original = await self.ledger.read_step(source, cmd.step_id)
        return rekey(replay_from(original), cmd.task_id, cmd.step_id, original)

    async def _run(self, cmd: ev.StepCommand, msg: Msg, recorder: FencedRecorder,
                   replay: StepReplay, started_id: str) -> StepOutcome:
        ctx = ToolContext(task_id=cmd.task_id, step_id=cmd.step_id, agent=self.spec.name,
                          user_id=cmd.user_id, worker=self.replica, tenant=cmd.tenant)
        if cmd.task_id in self._canceled:
            return StepOutcome(status="failed", code="canceled",
                               reason=self._canceled[cmd.task_id])
        if self.spec.tenants is not None and cmd.tenant not in self.spec.tenants:
            return StepOutcome(status="failed", code="forbidden",
                               reason=f"agent {self.spec.name} serves only tenants "
                                      f"{', '.join(self.spec.tenants)}")
        guard = RuntimeGuard(self.nc, self.ledger, self.book, cmd, self.spec.name,
                             self.source, recorder._append, self.policy,
                             self.settings.approval_timeout_s,
                             effect_gate=recorder.begin_effect,
                             claim_check=recorder.check_claim, killswitch=self.killswitch,
                             spend=self.spend)
        model = self.model
        src = cmd.replay
        if src is not None and src.rerun and src.model is not None:
            from jetmesh.agents.replay import fork_model

            try:
                model = fork_model(src.model)
            except Exception as e:
                return StepOutcome(status="failed", code="invalid_input",
                                   reason=f"fork model: {e}")
        elif src is not None and not src.rerun:
            from jetmesh.agents.replay import RecordingOnlyModel

            model = RecordingOnlyModel()  # never a provider call in a replayed step
        if model is None:
            from jetmesh.agents.models.sim import SimModel
            model = SimModel()  # never called: every skill here is direct
        timeout = self.spec.limits.step_timeout_s
        if cmd.deadline is not None:
            timeout = min(timeout, (cmd.deadline - datetime.now(UTC)).total_seconds())
        if timeout <= 0:
            return StepOutcome(status="failed", code="deadline",
                               reason="the task's deadline passed before the step started")
        if self._mcp is not None and (src is None or src.rerun):
            await self._check_mcp(cmd, recorder)
        async def bounded() -> StepOutcome:
            # The coroutine is created inside the task, so a step canceled before it
            # starts leaves no never-awaited coroutine behind.
            async with asyncio.timeout(timeout):
                return await run_step(
                    self.spec, cmd.skill, cmd.input, model, ctx=ctx, recorder=recorder,
                    replay=replay, guard=guard,
                    replay_only=src is not None and not src.rerun,
                    dry_run_effects=src is not None and src.effects == "dry-run",
                    attempt=cmd.attempt, tool_cache=self._tool_cache,
                    conversation=cmd.context,  # earlier turns of the task's context
                    # A fork's model replaces every tier; a replay calls no model at all.
                    tiers=self._tiers if model is self.model else None)

        # The step runs in the context of its attempt's `invoke_agent` span: memory
        # requests, model and A2A calls carry it, and live spans go under it.
        with tracing.attached(agent_traceparent(cmd.traceparent, started_id)):
            step = asyncio.create_task(bounded())
        running = self._running.setdefault(cmd.task_id, set())
        running.add(step)
        try:
            return await asyncio.shield(step)
        except TimeoutError:
            return StepOutcome(status="failed", code="timeout", retryable=True,
                               reason=f"step exceeded {timeout:g}s")
        except asyncio.CancelledError:
            if step.cancelled() and cmd.task_id in self._canceled:
                return StepOutcome(status="failed", code="canceled",
                                   reason=self._canceled[cmd.task_id])
            step.cancel()
            raise
        finally:
            running.discard(step)
            if not running:
                self._running.pop(cmd.task_id, None)
            if model is not self.model and step.done():
                with contextlib.suppress(Exception):
                    await model.aclose()  # a fork's model, made for this step

    async def _keep_alive(self) -> None:
        """In-progress acks, every third of ack_wait, for every step message being worked
        on, so none is redelivered while its step runs (one loop for all steps, not a
        task per step)."""
        interval = max(0.5, self.bus_settings.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            for msg in list(self._in_flight.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()
