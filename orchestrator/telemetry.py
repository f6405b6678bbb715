"""OpenTelemetry traces derived from the ledger: one trace per task, exported over OTLP.

The `jetmesh telemetry` role (`TelemetryService`) is delivered every record of every
task, with its bytes, by two durable pull consumers (`subjects.CONSUMER_TELEMETRY` on
JM_LEDGER's task subjects and on JM_LOG's steps' logs). It keeps each task's records in
memory until the task's first end, then derives its spans (`derive`, pure, the same
function over the same entries a ledger read gives) and exports the traces of the tasks
ended meanwhile in one OTLP request, encoded directly (`orchestrator.otlp`), with one
`jm-stats` record per task. No task is read back from the ledger unless it began before
the process did (or a delivery of it went missing): then it is read whole at its end.

Conventions followed: OpenTelemetry GenAI semantic conventions, **semantic-conventions-
genai v0.1.0** (`GENAI_SEMCONV_VERSION`; status Development):

- the task: `invoke_workflow {workflow}` (gen_ai.operation.name `invoke_workflow`, the
  workflow as gen_ai.agent.name, as v0.1.0 merged the workflow span into the internal
  invoke_agent span), the task's totals (tokens, `gen_ai.usage.cost.total`) on it;
- `plan` (the planning, with the planner's `chat` under it when the LLM planned);
- one `invoke_agent {agent}` per step attempt as run by one worker (each delivery that
  started it: a worker killed mid-step and the one that took over are two spans);
- one `chat {model}` per ModelCalled (gen_ai.provider.name, request / response model,
  usage incl. cache reads, finish reasons, gen_ai.conversation.id, cost in the proposed
  `gen_ai.usage.cost.*` shape, USD), the merge call under the root;
- one `execute_tool {tool}` per ToolCalled (a side effect is recorded once in the
  ledger, so it is shown executed once, whatever was redelivered); the memory tools as
  `search_memory recall` / `create_memory remember` (the memory operations proposal);
- policy decisions, approvals, budget refusals, claims before an effect, retries,
  cancellation as span events.

Span times are the events' times (a call's start is its end minus its latency). Trace
and span ids are derived from the task's `traceparent` (the submitter's, when it sent
one: the task's trace is then its child) and from event ids, so the same task always
gives the same spans: a redelivered terminal event re-derives the same ids.

Exactly once, as stored: a trace is exported when its task has ended, and the ledger
consumer is acknowledged (all up to a sequence) only up to the first end not exported
yet. A killed process's successor finds those ends (the ones its predecessor was
delivered and did not acknowledge, read at once) and reads their tasks back. One in
flight at the kill (sent, not acknowledged: at most `MAX_BATCH_TRACES` traces) cannot be
known to have reached the receiver, so it is sent again, with the same trace and span ids
and the same content: a backend that keys spans by id (Phoenix, Tempo's compaction, a
collector's dedup) holds each span once; a raw receiver sees those few twice. No span is
ever lost, and no other span is sent twice (tests/telemetry/test_telemetry_kill.py and
test_restart.py measure both).

Message content (tool arguments and results, model outputs) only when
`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT` is true.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from jetmesh.bus import events as ev
from jetmesh.bus import headers as hn
from jetmesh.bus import subjects
from jetmesh.bus.consumer import is_transient
from jetmesh.bus.dlq import dead_letter
from jetmesh.bus.errors import LedgerReadError, LedgerWriteError, StreamConfigConflict
from jetmesh.bus.events import EVENT_ADAPTER
from jetmesh.bus.ledger import LOG_SEQ_BASE, Ledger, LedgerEntry, decode_entry, is_log_seq
from jetmesh.bus.presence import ensure_bucket
from jetmesh.bus.settings import BusSettings
from jetmesh.bus.streams import ensure_consumer, pull_consumer_config
from jetmesh.bus.tracecontext import (
    ROOT_KEY,
    agent_span_key,
    parse_traceparent,
    span_id_for,
    task_trace_id,
    task_traceparent,
    tool_span_key,
)
from jetmesh.orchestrator import otlp
from jetmesh.orchestrator.state import ORCHESTRATOR, TaskState, fold
from jetmesh.orchestrator.stats import STATS_TTL_S, summary_record, task_summary

log = logging.getLogger("jetmesh.telemetry")

GENAI_SEMCONV_VERSION = "0.1.0"
"""The open-telemetry/semantic-conventions-genai release these spans follow."""
SCHEMA_URL = "https://opentelemetry.io/schemas/1.45.0"
"""The core semantic conventions release semantic-conventions-genai v0.1.0 depends on."""
SCOPE = InstrumentationScope("jetmesh.telemetry", "0.1.0", SCHEMA_URL)
CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
OTEL_ENV = ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_EXPORTER",
            "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_COMPRESSION", CAPTURE_ENV)
"""The standard variables the telemetry role honours (the SDK and exporter read most)."""

_PROVIDERS = {"anthropic": "anthropic", "openai": "openai", "azure": "azure.ai.openai",
              "bedrock": "aws.bedrock", "gemini": "gcp.gemini", "mistral": "mistral_ai"}
_TERMINAL = ev.TERMINAL_TASK_EVENTS
_MEMORY_OPS = {"recall": "search_memory", "remember": "create_memory"}
"""The memory service's tools (jetmesh.memory.tools) as the GenAI memory operations
(proposed after v0.1.0: their spans keep the execute_tool attributes too)."""
_TERMINAL_TYPES = frozenset(c.model_fields["type"].default for c in _TERMINAL)
EXPORT_THREADS = 4
"""Exports in flight at once (one task's trace each): what a kill can leave unacked."""


def default_resource() -> Resource:
    """The resource of the OTEL_* variables (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES),
    `service.name` jetmesh when they set none."""
    res = Resource.create()
    if str(res.attributes.get("service.name", "")).startswith("unknown_service"):
        res = res.merge(Resource({"service.name": "jetmesh"}))
    return res


def capture_content(env: dict[str, str] | None = None) -> bool:
    """Whether OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT asks for content."""
    value = (env if env is not None else os.environ).get(CAPTURE_ENV, "")
    return value.strip().lower() in ("true", "1", "yes", "span_only", "span_and_event")


# ----------------------------------------------------------------------------- ids


# ----------------------------------------------------------------------------- spans


def _ns(t: datetime) -> int:
    return int(t.timestamp() * 1e9)


@dataclass
class _Span:
    key: str
    name: str
    parent: _Span | None
    start: datetime
    end: datetime | None = None
    kind: SpanKind = SpanKind.INTERNAL
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, dict[str, Any], datetime]] = field(default_factory=list)
    error: str | None = None
    """The status description of a failed span (None: unset/ok)."""
    ok: bool = False
    children: list[_Span] = field(default_factory=list)

    def add(self, child: _Span) -> _Span:
        self.children.append(child)
        return child

    def latest_end(self) -> datetime:
        ends = [self.end or self.start] + [c.latest_end() for c in self.children]
        return max(ends)


@dataclass
class _Run:
    """One worker's run of one step attempt: an `invoke_agent` span."""

    span: _Span
    step_id: str
    worker: str | None
    open: bool = True
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


def _json(value: Any, limit: int = 16_000) -> str:
    try:
        text = json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cache_read_tokens(response: dict[str, Any]) -> int | None:
    raw = response.get("raw")
    usage = raw.get("usage") if isinstance(raw, dict) else None
    if not isinstance(usage, dict):
        return None
    n = usage.get("cache_read_input_tokens")
    if n is None and isinstance(usage.get("prompt_tokens_details"), dict):
        n = usage["prompt_tokens_details"].get("cached_tokens")
    return n if isinstance(n, int) else None


class _Builder:
    def __init__(self, task_id: str, entries: Sequence[LedgerEntry], capture: bool,
                 state: TaskState | None = None) -> None:
        self.task_id = task_id
        self.entries = entries
        self.capture = capture
        self.state = state
        """The task's fold, when the caller has it (else folded here)."""
        self.runs: dict[str, list[_Run]] = {}
        self.skills: dict[str, str] = {}
        self.conversation = task_id

    def _run_for(self, step_id: str, worker: str | None) -> _Run | None:
        runs = self.runs.get(step_id, [])
        for r in reversed(runs):
            if worker is None or r.worker == worker:
                return r
        return runs[-1] if runs else None

    def _close(self, run: _Run, at: datetime, error: str | None) -> None:
        if not run.open:
            return
        run.open = False
        run.span.end = at
        if error is None:
            run.span.ok = True
        else:
            run.span.error = error

    def build(self) -> _Span | None:
        first = next((e for e in self.entries if isinstance(e.event, ev.TaskSubmitted)), None)
        end = next((e for e in self.entries if isinstance(e.event, _TERMINAL)), None)
        if end is None:
            return None
        start_t = first.event.time if first is not None else self.entries[0].event.time
        sub = first.event.data if first is not None and isinstance(
            first.event, ev.TaskSubmitted) else None
        workflow = sub.workflow if sub is not None else None
        if sub is not None:
            ctx = sub.metadata.get("a2a_context_id") or sub.metadata.get("context_id")
            if ctx:
                self.conversation = ctx
        root = _Span(ROOT_KEY, f"invoke_workflow {workflow}" if workflow else "invoke_workflow",
                     None, start_t, end.event.time)
        root.attributes.update({
            "gen_ai.operation.name": "invoke_workflow",
            "gen_ai.conversation.id": self.conversation,
            "jetmesh.task.id": self.task_id,
        })
        if workflow:
            root.attributes["gen_ai.agent.name"] = workflow
        replay_of = getattr(sub, "replay_of", None) if sub is not None else None
        if replay_of:  # a replay or fork: its served calls are the original's records
            root.attributes["jetmesh.replay_of"] = replay_of
        if self.capture and sub is not None and sub.goal:
            root.attributes["jetmesh.task.goal"] = sub.goal
        plan: _Span | None = None
        for entry in self.entries:
            e = entry.event
            if not is_log_seq(entry.seq) and entry.seq > end.seq:  # log records: JM_LOG's
                break
            match e:
                case ev.TaskPlanned():
                    if plan is None:
                        plan = root.add(_Span(f"plan/{e.id}", "plan", root, start_t, e.time))
                        plan.ok = True
                        plan.attributes.update({
                            "gen_ai.operation.name": "plan",
                            "gen_ai.conversation.id": self.conversation,
                            "jetmesh.planner": e.data.planner,
                            "jetmesh.plan.steps": [s.id for s in e.data.steps],
                            "jetmesh.plan.merge": e.data.merge})
                        root.attributes["jetmesh.planner"] = e.data.planner
                        for s in e.data.steps:
                            self.skills[s.id] = s.skill
                case ev.StepDispatched():
                    self.skills.setdefault(e.data.step_id, e.data.skill)
                    if e.data.attempt > 1:
                        root.events.append(("jetmesh.step.retry", {
                            "jetmesh.step.id": e.data.step_id,
                            "jetmesh.step.attempt": e.data.attempt}, e.time))
                case ev.StepStarted():
                    self._start(root, e)
                case ev.ModelCalled():
                    self._chat(root, plan, e)
                case ev.ToolCalled():
                    self._tool(root, e)
                case ev.StepCompleted() | ev.StepFailed():
                    self._step_end(root, e)
                case ev.PolicyDecided():
                    self._event(root, e.data.step_id, e.data.agent, "jetmesh.policy.decided", {
                        "gen_ai.tool.name": e.data.tool, "jetmesh.policy.decision":
                        e.data.decision, "jetmesh.policy.rule": e.data.rule,
                        "jetmesh.policy.reason": e.data.reason}, e.time)
                case ev.ApprovalRequested():
                    self._event(root, e.data.step_id, e.data.agent, "jetmesh.approval.requested",
                                {"gen_ai.tool.name": e.data.tool, "jetmesh.approval.risk":
                                 e.data.risk, "jetmesh.approval.reason": e.data.reason}, e.time)
                case ev.ApprovalGranted() | ev.ApprovalDenied():
                    name = ("jetmesh.approval.granted" if isinstance(e, ev.ApprovalGranted)
                            else "jetmesh.approval.denied")
                    self._event(root, e.data.step_id, None, name, {
                        "gen_ai.tool.name": e.data.tool, "jetmesh.approval.by": e.data.by,
                        "jetmesh.approval.reason": e.data.reason}, e.time)
                case ev.BudgetExceeded():
                    attrs = {"jetmesh.budget.kind": e.data.kind,
                             "jetmesh.budget.limit": e.data.limit,
                             "jetmesh.budget.would_be": e.data.would_be}
                    if e.data.step_id:
                        self._event(root, e.data.step_id, None, "jetmesh.budget.exceeded",
                                    attrs, e.time)
                    else:
                        root.events.append(("jetmesh.budget.exceeded", attrs, e.time))
                case ev.ModelRouted():
                    route = e.data
                    self._event(root, route.step_id, route.worker, "jetmesh.model.routed", {
                        "jetmesh.route.tier": route.tier,
                        "jetmesh.route.trigger": route.trigger,
                        "jetmesh.route.outcome": route.outcome,
                        "jetmesh.route.reason": route.reason,
                        "jetmesh.route.from_tier": route.from_tier or "",
                        "gen_ai.request.model": route.model,
                        "gen_ai.provider.name": _PROVIDERS.get(route.provider, route.provider)},
                        e.time)
                case ev.ContextCompacted():
                    c = e.data
                    self._event(root, c.step_id, c.worker, "jetmesh.context.compacted", {
                        "jetmesh.compaction.number": c.compaction,
                        "jetmesh.compaction.messages": list(c.messages),
                        "jetmesh.compaction.tokens_before": c.tokens_before,
                        "jetmesh.compaction.tokens_after": c.tokens_after}, e.time)
                case ev.EffectStarted():
                    self._event(root, e.data.step_id, e.data.worker, "jetmesh.effect.started",
                                {"gen_ai.tool.name": e.data.tool,
                                 "jetmesh.tool.idempotency_key": e.data.idempotency_key},
                                e.time)
                case ev.CancelRequested():
                    root.events.append(("jetmesh.task.cancel_requested",
                                        {"jetmesh.reason": e.data.reason}, e.time))
                case _:
                    pass
        for runs in self.runs.values():
            for r in runs:
                self._close(r, end.event.time, "unfinished when the task ended")
        self._finish_root(root, end)
        return root

    def _start(self, root: _Span, e: ev.StepStarted) -> None:
        d = e.data
        for r in self.runs.get(d.step_id, []):  # a takeover: the other run is over
            if r.open and r.worker != d.worker:
                self._close(r, e.time, f"abandoned: the step was claimed by {d.worker}")
        span = root.add(_Span(agent_span_key(e.id), f"invoke_agent {d.agent}", root, e.time))
        span.attributes.update({
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": d.agent,
            "gen_ai.conversation.id": self.conversation,
            "jetmesh.step.id": d.step_id,
            "jetmesh.step.attempt": d.attempt,
            "jetmesh.step.delivery": d.delivery,
            "jetmesh.worker": d.worker,
        })
        if d.step_id in self.skills:
            span.attributes["jetmesh.skill"] = self.skills[d.step_id]
        self.runs.setdefault(d.step_id, []).append(_Run(span, d.step_id, d.worker))

    def _orphan_run(self, root: _Span, step_id: str, agent: str | None, at: datetime,
                    key: str) -> _Run:
        """A run for step records with no start before them (an orchestrator's failure of
        an attempt no worker started)."""
        name = agent or self.skills.get(step_id, step_id)
        span = root.add(_Span(f"agent/{key}", f"invoke_agent {name}", root, at))
        span.attributes.update({"gen_ai.operation.name": "invoke_agent",
                                "gen_ai.agent.name": name,
                                "gen_ai.conversation.id": self.conversation,
                                "jetmesh.step.id": step_id})
        run = _Run(span, step_id, None)
        self.runs.setdefault(step_id, []).append(run)
        return run

    def _event(self, root: _Span, step_id: str, worker: str | None, name: str,
               attrs: dict[str, Any], at: datetime) -> None:
        run = self._run_for(step_id, worker)
        (run.span if run is not None else root).events.append(
            (name, {"jetmesh.step.id": step_id, **attrs}, at))

    def _chat(self, root: _Span, plan: _Span | None, e: ev.ModelCalled) -> None:
        d = e.data
        run = self._run_for(d.step_id, d.worker) if d.step_id else None
        if d.step_id and run is None:
            run = self._orphan_run(root, d.step_id, d.agent, e.time, e.id)
        parent = run.span if run is not None else (
            plan if d.purpose == "plan" and plan is not None else root)
        start = e.time - timedelta(milliseconds=max(0.0, d.latency_ms))
        span = parent.add(_Span(f"chat/{e.id}", f"chat {d.model}", parent, start, e.time,
                                SpanKind.CLIENT))
        span.ok = True
        resp = d.response
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": _PROVIDERS.get(d.provider, d.provider),
            "gen_ai.request.model": d.model,
            "gen_ai.response.model": str(resp.get("model") or d.model),
            "gen_ai.usage.input_tokens": d.input_tokens,
            "gen_ai.usage.output_tokens": d.output_tokens,
            "gen_ai.conversation.id": self.conversation,
            "gen_ai.usage.cost.total": d.cost_usd,
            "gen_ai.usage.cost.currency": "USD",
            "jetmesh.purpose": d.purpose,
            "jetmesh.agent": d.agent,
        }
        cached = _cache_read_tokens(resp)
        if cached is not None:
            attrs["gen_ai.usage.cache_read.input_tokens"] = cached
        if resp.get("stop_reason"):
            attrs["gen_ai.response.finish_reasons"] = [str(resp["stop_reason"])]
        raw = resp.get("raw")
        if isinstance(raw, dict) and isinstance(raw.get("id"), str):
            attrs["gen_ai.response.id"] = raw["id"]
        if d.step_id:
            attrs["jetmesh.step.id"] = d.step_id
        if self.capture:
            parts: list[dict[str, Any]] = []
            if resp.get("text"):
                parts.append({"type": "text", "content": resp["text"]})
            for call in resp.get("tool_calls") or []:
                if isinstance(call, dict):
                    parts.append({"type": "tool_call", "id": call.get("id"),
                                  "name": call.get("name"),
                                  "arguments": call.get("arguments")})
            attrs["gen_ai.output.messages"] = _json([{
                "role": "assistant", "parts": parts,
                "finish_reason": str(resp.get("stop_reason") or "stop")}])
        span.attributes.update(attrs)
        for tried in resp.get("fallbacks") or []:  # the chain members that did not answer
            if not isinstance(tried, dict):
                continue
            span.events.append(("jetmesh.model.fallback", {
                "gen_ai.provider.name": _PROVIDERS.get(str(tried.get("provider")),
                                                       str(tried.get("provider"))),
                "gen_ai.request.model": str(tried.get("model")),
                "jetmesh.fallback.error": str(tried.get("error", ""))[:500],
                "jetmesh.fallback.skipped": bool(tried.get("skipped"))}, start))
            if tried.get("breaker") and tried.get("breaker_state") == "open":
                span.events.append((
                    "jetmesh.breaker.open" if tried.get("skipped") else "jetmesh.breaker.tripped",
                    {"jetmesh.breaker.name": str(tried["breaker"]),
                     "gen_ai.request.model": str(tried.get("model"))}, start))
        if run is not None:
            run.input_tokens += d.input_tokens
            run.output_tokens += d.output_tokens
            run.cost_usd += d.cost_usd

    def _tool(self, root: _Span, e: ev.ToolCalled) -> None:
        d = e.data
        run = self._run_for(d.step_id, d.worker) or self._orphan_run(
            root, d.step_id, d.agent, e.time, e.id)
        start = e.time - timedelta(milliseconds=max(0.0, d.latency_ms))
        op = _MEMORY_OPS.get(d.tool)
        span = run.span.add(_Span(tool_span_key(e.id), f"{op} {d.tool}" if op else
                                  f"execute_tool {d.tool}", run.span, start, e.time))
        span.attributes.update({
            "gen_ai.operation.name": op or "execute_tool",
            "gen_ai.tool.name": d.tool,
            "gen_ai.tool.call.id": d.call_id,
            "gen_ai.tool.type": "function",
            "gen_ai.conversation.id": self.conversation,
            "jetmesh.tool.side_effects": d.side_effects,
            "jetmesh.tool.idempotency_key": d.idempotency_key,
            "jetmesh.step.id": d.step_id,
        })
        if self.capture:
            span.attributes["gen_ai.tool.call.arguments"] = _json(d.arguments)
            span.attributes["gen_ai.tool.call.result"] = _json(d.output)
        if getattr(d, "dry_run", False):  # a fork's effect that was not run
            span.attributes["jetmesh.tool.dry_run"] = True
        if d.error:
            span.error = d.error[:500]
            span.attributes["error.type"] = "tool_error"
        else:
            span.ok = True

    def _step_end(self, root: _Span, e: ev.StepCompleted | ev.StepFailed) -> None:
        d = e.data
        by_orch = isinstance(e, ev.StepFailed) and (d.agent == ORCHESTRATOR or d.worker is None)
        error = None if isinstance(e, ev.StepCompleted) else f"{e.data.code}: {e.data.reason}"
        if by_orch:
            runs = [r for r in self.runs.get(d.step_id, []) if r.open]
            if not runs:
                runs = [self._orphan_run(root, d.step_id, None, e.time, e.id)]
            for r in runs:
                if isinstance(e, ev.StepFailed):
                    r.span.attributes["error.type"] = e.data.code
                self._close(r, e.time, error)
            return
        run = self._run_for(d.step_id, d.worker) or self._orphan_run(
            root, d.step_id, d.agent, e.time, e.id)
        if isinstance(e, ev.StepFailed):
            run.span.attributes["error.type"] = e.data.code
        self._close(run, e.time, error)

    def _finish_root(self, root: _Span, end: LedgerEntry) -> None:
        state = self.state if self.state is not None else fold(self.task_id, self.entries)
        for runs in self.runs.values():
            for r in runs:
                r.span.attributes.update({
                    "gen_ai.usage.input_tokens": r.input_tokens,
                    "gen_ai.usage.output_tokens": r.output_tokens,
                    "gen_ai.usage.cost.total": r.cost_usd,
                    "gen_ai.usage.cost.currency": "USD"})
        root.attributes.update({
            "jetmesh.task.status": state.status.value,
            "gen_ai.usage.input_tokens": state.input_tokens,
            "gen_ai.usage.output_tokens": state.output_tokens,
            "gen_ai.usage.cost.total": state.cost_usd,
            "gen_ai.usage.cost.currency": "USD",
            "jetmesh.model_calls": state.model_calls,
            "jetmesh.tool_calls": state.tool_calls,
        })
        e = end.event
        if isinstance(e, ev.TaskCompleted):
            root.ok = True
        elif isinstance(e, ev.TaskFailed):
            root.error = f"{e.data.code}: {e.data.reason}"
            root.attributes["error.type"] = e.data.code
        elif isinstance(e, ev.TaskRejected):
            root.error = f"rejected: {e.data.reason}"
            root.attributes["error.type"] = "rejected"
        elif isinstance(e, ev.TaskCanceled):
            root.events.append(("jetmesh.task.canceled", {"jetmesh.reason": e.data.reason},
                                e.time))


@dataclass
class Trace:
    """One finished task's span tree, with the ids it is exported under."""

    task_id: str
    root: _Span
    trace_id: int
    remote: SpanContext | None
    """The submitter's span (the root's parent), if it sent its own context."""
    flags: TraceFlags
    state: TaskState
    """The task's fold (its totals are on the root)."""


def derive(task_id: str, entries: Sequence[LedgerEntry], *, capture: bool | None = None,
           state: TaskState | None = None) -> Trace | None:
    """The span tree of a finished task, from its ledger entries only (None: not ended).
    `state`: the entries' fold, when the caller has it."""
    if not entries:
        return None
    if state is None:
        state = fold(task_id, entries)
    builder = _Builder(task_id, entries, capture_content() if capture is None else capture,
                       state)
    root = builder.build()
    if root is None:
        return None
    first = next((e.event for e in entries if isinstance(e.event, ev.TaskSubmitted)), None)
    tp = first.traceparent if first is not None else None
    parsed = parse_traceparent(tp)
    if parsed is not None and tp == task_traceparent(task_id, tp):
        parsed = None  # the task's own root context (no submitter's): the root has no parent
    trace_id = task_trace_id(task_id, tp)
    flags = TraceFlags(parsed[2] & 1 if parsed else TraceFlags.SAMPLED)
    remote = SpanContext(trace_id, parsed[1], is_remote=True, trace_flags=flags) \
        if parsed else None
    return Trace(task_id, root, trace_id, remote, flags, state)


def _span_end(s: _Span) -> datetime:
    return max(s.end or s.start, s.latest_end() if s.children else s.start)


def build_spans(task_id: str, entries: Sequence[LedgerEntry], *,
                resource: Resource | None = None, capture: bool | None = None
                ) -> list[ReadableSpan]:
    """The spans of a finished task (root first), derived from its ledger entries only,
    as the SDK's `ReadableSpan`s (for any SDK exporter). Empty when the task has not
    ended. The telemetry role sends the same spans encoded directly (`encode_traces`)."""
    trace = derive(task_id, entries, capture=capture)
    return [] if trace is None else _readable(trace, resource or default_resource())


def _readable(trace: Trace, res: Resource) -> list[ReadableSpan]:
    out: list[ReadableSpan] = []
    trace_id, flags = trace.trace_id, trace.flags

    def emit(s: _Span, parent: SpanContext | None) -> None:
        ctx = SpanContext(trace_id, span_id_for(trace_id, s.key), is_remote=False,
                          trace_flags=flags)
        if s.error is not None:
            status = Status(StatusCode.ERROR, s.error[:500])
        elif s.ok:
            status = Status(StatusCode.OK)
        else:
            status = Status(StatusCode.UNSET)
        out.append(ReadableSpan(
            s.name, ctx, parent, res, attributes=s.attributes,
            events=[SpanEvent(n, a, _ns(t)) for n, a, t in s.events], kind=s.kind,
            status=status, start_time=_ns(s.start), end_time=_ns(_span_end(s)),
            instrumentation_scope=SCOPE))
        for c in s.children:
            emit(c, ctx)

    emit(trace.root, trace.remote)
    return out


def encode_spans_of(trace: Trace) -> list[bytes]:
    """A trace's spans as OTLP `Span` fields (orchestrator.otlp), root first: the bytes
    the SDK's encoder makes of `build_spans`' spans."""
    out: list[bytes] = []
    trace_id = trace.trace_id
    tid = trace_id.to_bytes(16, "big")

    def emit(s: _Span, parent: bytes | None, remote: bool) -> None:
        sid = span_id_for(trace_id, s.key).to_bytes(8, "big")
        if s.error is not None:
            code, message = otlp.STATUS_ERROR, s.error[:500]
        else:
            code, message = (otlp.STATUS_OK if s.ok else otlp.STATUS_UNSET), None
        out.append(otlp.span(
            tid, sid, parent, remote, s.name, s.kind.value + 1, _ns(s.start),
            _ns(_span_end(s)), s.attributes, [(n, a, _ns(t)) for n, a, t in s.events],
            code, message))
        for c in s.children:
            emit(c, sid, False)

    parent = trace.remote
    emit(trace.root, parent.span_id.to_bytes(8, "big") if parent else None, parent is not None)
    return out


def encode_traces(traces: Sequence[Trace], resource: Resource) -> bytes:
    """One OTLP `ExportTraceServiceRequest` holding every span of `traces`."""
    spans = [b for t in traces for b in encode_spans_of(t)]
    return otlp.request(otlp.resource_bytes(resource.attributes), resource.schema_url or "",
                        otlp.scope_bytes(SCOPE.name, SCOPE.version), SCOPE.schema_url or "",
                        spans)


def first_terminal(entries: Sequence[LedgerEntry]) -> LedgerEntry | None:
    """The task's end: its first terminal event (later ones never count)."""
    return next((e for e in entries if isinstance(e.event, _TERMINAL)
                 and e.subject == subjects.task_events(e.event.subject)), None)


# ----------------------------------------------------------------------------- exporters


def make_exporter() -> SpanExporter | None:
    """The span exporter the standard OTEL_* variables ask for: OTEL_TRACES_EXPORTER
    (`otlp` by default, `console`, `none`), OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL
    (`http/protobuf` by default, `grpc` when its exporter package is installed), the
    endpoint, headers, timeout and compression variables (read by the exporter)."""
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip().lower()
    if kind == "none":
        return None
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").lower()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError as e:
            raise RuntimeError("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the package "
                               "opentelemetry-exporter-otlp-proto-grpc") from e
        grpc_exporter: SpanExporter = GrpcExporter()
        return grpc_exporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


class ExportFailed(ConnectionError):
    """The exporter did not take the spans (its backend down): transient, retried."""


def http_client(exporter: SpanExporter) -> Any:
    """The OTLP/HTTP exporter's client, which sends an encoded request as it is
    (`_client.export(bytes)`, opentelemetry-exporter-otlp-proto-http 1.45), or None (any
    other exporter, or a release without it: then the SDK encodes, slower)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if not isinstance(exporter, OTLPSpanExporter) or getattr(exporter, "_shutdown", False):
        return None
    client = getattr(exporter, "_client", None)
    return client if callable(getattr(client, "export", None)) else None


class _Sender:
    """Sends one request at a time from its own thread (an exporter's HTTP session is
    not shared across threads; the event loop stays free to take deliveries)."""

    def __init__(self, factory: Callable[[], SpanExporter | None]) -> None:
        self.factory = factory
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="otlp-export")
        self.exporter: SpanExporter | None = None
        self.made = False

    def _exporter(self) -> SpanExporter | None:
        if not self.made:
            self.exporter, self.made = self.factory(), True
        return self.exporter

    def _send(self, traces: Sequence[Trace], resource: Resource) -> bool:
        exporter = self._exporter()
        if exporter is None or not traces:
            return True
        client = http_client(exporter)
        if client is not None:
            # OTLP/HTTP: the request encoded here (orchestrator.otlp), sent by the
            # exporter's own client (its endpoint, headers, compression, TLS, retries).
            return bool(client.export(encode_traces(traces, resource)).success)
        spans = [s for t in traces for s in _readable(t, resource)]
        return exporter.export(spans) is SpanExportResult.SUCCESS

    async def send(self, traces: Sequence[Trace], resource: Resource) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._send, traces, resource)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
        if self.exporter is not None:
            with contextlib.suppress(Exception):
                self.exporter.shutdown()


# ----------------------------------------------------------------------------- metrics


def metrics_wanted(env: dict[str, str] | None = None) -> bool:
    """OTLP metrics are sent when asked for: OTEL_METRICS_EXPORTER set (not `none`), or
    an OTLP endpoint for metrics (OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT) set."""
    e = env if env is not None else os.environ
    kind = e.get("OTEL_METRICS_EXPORTER", "").strip().lower()
    if kind:
        return kind != "none"
    return bool(e.get("OTEL_EXPORTER_OTLP_ENDPOINT") or
                e.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))


class TaskMetrics:
    """OTel metrics of finished tasks: `gen_ai.client.token.usage` and
    `gen_ai.client.operation.duration` per model call, `jetmesh.tasks` (by outcome and
    workflow), `jetmesh.task.cost` and `jetmesh.task.duration`. Recorded when a task's
    trace was exported: a task in flight at a kill is counted again (the `jm-stats`
    projection, keyed by task, is the exact count)."""

    def __init__(self, resource: Resource) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            MetricExporter,
            PeriodicExportingMetricReader,
        )

        exporter: MetricExporter
        if os.environ.get("OTEL_METRICS_EXPORTER", "").strip().lower() == "console":
            exporter = ConsoleMetricExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )

            exporter = OTLPMetricExporter()
        self.provider = MeterProvider(resource=resource,
                                      metric_readers=[PeriodicExportingMetricReader(exporter)])
        meter = self.provider.get_meter("jetmesh.telemetry", "0.1.0", schema_url=SCHEMA_URL)
        self.tokens = meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                             description="Tokens used per model call")
        self.duration = meter.create_histogram("gen_ai.client.operation.duration", unit="s",
                                               description="Model call duration")
        self.tasks = meter.create_counter("jetmesh.tasks", unit="{task}",
                                          description="Finished tasks by outcome")
        self.cost = meter.create_histogram("jetmesh.task.cost", unit="USD",
                                           description="Model cost per finished task")
        self.task_duration = meter.create_histogram(
            "jetmesh.task.duration", unit="s", description="Submission to end per task")

    def record(self, entries: Sequence[LedgerEntry]) -> None:
        first = next((e.event for e in entries if isinstance(e.event, ev.TaskSubmitted)), None)
        end = first_terminal(entries)
        if end is None:
            return
        workflow = (first.data.workflow if isinstance(first, ev.TaskSubmitted) else None) \
            or "(planned)"
        cost = 0.0
        for entry in entries:
            e = entry.event
            if isinstance(e, ev.ModelCalled):
                d = e.data
                attrs = {"gen_ai.operation.name": "chat",
                         "gen_ai.provider.name": _PROVIDERS.get(d.provider, d.provider),
                         "gen_ai.request.model": d.model, "gen_ai.agent.name": d.agent}
                self.tokens.record(d.input_tokens, {**attrs, "gen_ai.token.type": "input"})
                self.tokens.record(d.output_tokens, {**attrs, "gen_ai.token.type": "output"})
                self.duration.record(d.latency_ms / 1000, attrs)
                cost += d.cost_usd
        status = end.event.type.split(".")[2]
        attrs = {"jetmesh.task.status": status, "jetmesh.workflow": workflow}
        self.tasks.add(1, attrs)
        self.cost.record(cost, attrs)
        if first is not None:
            self.task_duration.record((end.event.time - first.time).total_seconds(), attrs)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.provider.shutdown()


# ----------------------------------------------------------------------------- the role


def telemetry_consumer_config(durable: str = subjects.CONSUMER_TELEMETRY,
                              settings: BusSettings | None = None, *,
                              deliver_new: bool = False, logs: bool = False) -> ConsumerConfig:
    """The role's durable over every ledger subject of every task (`logs`: over the
    steps' logs, on JM_LOG), acknowledged all-up-to (AckPolicy all) at a watermark."""
    config = pull_consumer_config(
        durable, subjects.TELEMETRY_LOG_SUBJECT if logs else subjects.TELEMETRY_SUBJECT,
        settings, deliver_new=deliver_new or logs)
    config.ack_policy = AckPolicy.ALL
    config.headers_only = False
    return config


def _ack_meta(reply: str) -> tuple[str, int, int, int] | None:
    """(stream, deliveries, stream sequence, time stamp in ns) of a JetStream delivery's
    reply subject: `$JS.ACK.<stream>.<consumer>.<deliveries>.<sseq>.<cseq>.<ts>.<pending>`,
    or the newer form with domain and account hash before the stream."""
    t = reply.split(".")
    n = len(t)
    try:
        if n == 9:
            return t[2], int(t[4]), int(t[5]), int(t[7])
        if n >= 12:
            return t[4], int(t[6]), int(t[7]), int(t[9])
    except ValueError:
        return None
    return None


@dataclass
class _Acc:
    """What this process was delivered of one task: raw (seq, time stamp, subject, bytes)
    in each stream's order, decoded only when the task's trace is built."""

    fresh: bool = False
    """Its submission was delivered to this process, after it started: every later
    record of the task reaches this process too (else the task is read back whole)."""
    ledger: list[tuple[int, int, str, bytes]] = field(default_factory=list)
    logs: list[tuple[int, int, str, bytes]] = field(default_factory=list)


@dataclass
class _End:
    """A task's end waiting for its trace to be exported."""

    task_id: str
    seq: int
    msg: Msg | None
    """Its delivery (None: found by the scan at start, see `TelemetryService.start`)."""


class _Pull:
    """One durable pull consumer, its messages handed to a plain callback in stream
    order (no task per message), with one or two pull requests open for `batch`
    messages each, and acknowledged all-up-to a sequence."""

    def __init__(self, js: JetStreamContext, stream: str, config: ConsumerConfig,
                 on_msg: Callable[[Msg, int, int, int], None], tag: str, batch: int = 1000,
                 expires_s: float = 5.0) -> None:
        self.js, self.stream, self.config, self.on_msg = js, stream, config, on_msg
        self.tag, self.batch, self.expires_s = tag, batch, expires_s
        self.open: dict[str, list[float]] = {}
        """Open pull requests: token -> [messages still due, when it lapses]."""
        self.replies: deque[tuple[int, str]] = deque()
        """(stream seq, reply subject) of first deliveries not acknowledged yet."""
        self.again: list[tuple[int, str]] = []
        """(-stream seq, reply subject) of redeliveries not acknowledged yet (a heap)."""
        self.paused = False
        self.last = 0
        """Highest stream sequence delivered (first deliveries, in order)."""
        self.progress = asyncio.Event()
        self._n = 0
        self._next = ""
        self._inbox = ""

    @property
    def durable(self) -> str:
        assert self.config.durable_name
        return self.config.durable_name

    async def create(self) -> tuple[int, int]:
        """Create the durable, or update it keeping where it delivers from; (its ack
        floor, the last sequence it delivered) before this process, (0, 0) if new.

        A durable of an earlier release acknowledged each message (the ack policy of a
        consumer cannot change): it is replaced by one that goes on from where it was
        (with credentials that may delete it: the admin's; a role's may not)."""
        try:
            info = await self.js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            info = None
        self._next = subjects.consumer_next(self.js._prefix, self.stream, self.durable)
        if info is None:
            await ensure_consumer(self.js, self.stream, self.config)
            return 0, 0
        floor = int(info.ack_floor.stream_seq) if info.ack_floor else 0
        delivered = int(info.delivered.stream_seq) if info.delivered else 0
        if info.config.ack_policy != AckPolicy.ALL:
            log.info("telemetry: replacing durable %s on %s (per-message acks) from "
                     "sequence %d", self.durable, self.stream, delivered + 1)
            try:
                await self.js.delete_consumer(self.stream, self.durable)
            except Exception as e:  # no role may delete a durable, only the admin
                raise StreamConfigConflict(
                    f"{self.stream}/{self.durable}",
                    f"created by an earlier release (acknowledged per message), and it "
                    f"cannot be replaced with these credentials ({e}); as the admin: "
                    f"nats consumer rm {self.stream} {self.durable}") from e
            self.config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            self.config.opt_start_seq = delivered + 1
        else:  # where it delivers from is fixed at creation
            self.config.deliver_policy = info.config.deliver_policy
            self.config.opt_start_seq = info.config.opt_start_seq
            self.config.opt_start_time = info.config.opt_start_time
        await ensure_consumer(self.js, self.stream, self.config)
        return floor, delivered

    def attach(self, inbox: str) -> None:
        self._inbox = inbox

    def pull(self, force: bool = False) -> None:
        """Top up the open requests (cheap when nothing is to do); not while paused
        unless `force`d."""
        if self.paused and not force:
            return
        now = time.monotonic()
        for token, (_, lapses) in list(self.open.items()):
            if now > lapses:  # never ended by the server (it restarted): give it up
                del self.open[token]
        due = sum(r[0] for r in self.open.values())
        if due * 2 >= self.batch or len(self.open) >= 2:
            return
        self._n += 1
        token = f"{self.tag}{self._n}"
        req = {"batch": self.batch, "expires": int(self.expires_s * 1e9)}
        self.open[token] = [self.batch, now + self.expires_s + 1.0]
        nc = self.js._nc
        task = asyncio.ensure_future(nc.publish(self._next, json.dumps(req).encode(),
                                                reply=f"{self._inbox}.{token}"))
        task.add_done_callback(_quiet)

    def status(self, token: str, msg: Msg) -> None:
        """The server's status for one pull request (its end, or a heartbeat)."""
        if (msg.headers or {}).get(hn.STATUS) != "100":
            self.open.pop(token, None)
            self.pull()

    def delivered(self, msg: Msg, seq: int, ts: int, deliveries: int) -> None:
        # A delivered message carries its stream subject, not the request's: charge it
        # to the oldest open request, which is the one the server is filling (FIFO).
        oldest = next(iter(self.open), None)
        if oldest is not None:
            req = self.open[oldest]
            req[0] -= 1
            if req[0] <= 0:
                del self.open[oldest]
                self.pull()
        self.on_msg(msg, seq, ts, deliveries)

    def keep(self, seq: int, reply: str) -> None:
        self.replies.append((seq, reply))
        self.last = seq
        self.progress.set()

    def keep_again(self, seq: int, reply: str) -> None:
        """A redelivery (of what a killed predecessor was given): its reply can
        acknowledge it and all before it, when nothing newer comes to do so."""
        heapq.heappush(self.again, (-seq, reply))
        while len(self.again) > 10_000:
            self.again.pop()

    async def ack_through(self, seq: int) -> None:
        """Acknowledge every message up to stream sequence `seq` (AckPolicy all: one
        ack, the latest kept delivery's, stands for all before it)."""
        best: tuple[int, str] | None = None
        while self.replies and self.replies[0][0] <= seq:
            best = self.replies.popleft()
        if best is None and self.again:
            while self.again and -self.again[0][0] > seq:
                heapq.heappop(self.again)  # newer than what may be acknowledged: later
            if self.again:
                best = (-self.again[0][0], self.again[0][1])
        if best is not None:
            self.again = [x for x in self.again if -x[0] > best[0]]
            heapq.heapify(self.again)
            await self.js._nc.publish(best[1], b"+ACK")


def _quiet(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("telemetry: pull request not sent: %s", task.exception())


_NOT_FRESH = _Acc()
_SUBMITTED = ev.TaskSubmitted.model_fields["type"].default
MAX_BATCH_TRACES = 64
"""Traces in one OTLP request: what a kill between its send and its ack can leave to be
sent again (a successor exports them once more, with the same ids and content)."""


class TelemetryService:
    """Follows the ledger and exports one trace per finished task. `start()`, `stop()`.

    Two durable consumers, `durable` on JM_LEDGER over every task subject and the same
    name on JM_LOG over the steps' logs, deliver every record once, with its bytes; the
    records of each task are kept in memory until its first end arrives, then the
    task's trace is derived from them (`derive`, the same function over the same
    entries, merged in the order a ledger read gives) and exported in a batch with the
    other tasks ended meanwhile (every `flush_s`, one OTLP request for at most
    `batch` traces), with each task's `jm-stats` record. The ledger consumer is
    acknowledged all-up-to the first end not yet exported, so a killed process's
    successor gets every unexported end again; the logs consumer up to what arrived.

    A task is built from its deliveries only if its submission was delivered to this
    process after it started (and no delivery went missing since: a gap in either
    stream, another replica sharing the durables, or a task dropped for memory), so
    that every record of it came here; any other task (in flight when the process
    started) is read back whole from the ledger at its end, as before. Before a batch
    is built the process asks for JM_LOG's last sequence and waits until its logs
    consumer got that far: every log record a task wrote before its end is then here.
    """

    def __init__(self, nc: NATS, js: JetStreamContext, *,
                 exporter_factory: Callable[[], SpanExporter | None] = make_exporter,
                 resource: Resource | None = None,
                 bus_settings: BusSettings | None = None,
                 durable: str = subjects.CONSUMER_TELEMETRY, deliver_new: bool = False,
                 concurrency: int = 64, capture: bool | None = None,
                 stats: bool = True, metrics: bool | None = None,
                 flush_s: float = 0.5, batch: int = MAX_BATCH_TRACES,
                 max_tracked: int = 20_000) -> None:
        self.nc, self.js = nc, js
        self.bus_settings = bus_settings or BusSettings()
        self.ledger = Ledger(nc, js, timeout_s=self.bus_settings.request_timeout_s)
        self.resource = resource or default_resource()
        self.durable, self.deliver_new = durable, deliver_new
        self.concurrency = concurrency
        """Tasks read back from the ledger at once (those in flight at a start)."""
        self.capture = capture_content() if capture is None else capture
        self.sender = _Sender(exporter_factory)
        self.stats = stats
        """Also keep the `jm-stats` projection (one record per finished task)."""
        self.metrics = TaskMetrics(self.resource) if (
            metrics_wanted() if metrics is None else metrics) else None
        self.flush_s, self.batch, self.max_tracked = flush_s, batch, max_tracked
        self.traces_exported = 0
        self.spans_exported = 0
        self.built_from_deliveries = 0
        self.read_back = 0
        self.built_by: OrderedDict[str, str] = OrderedDict()
        """How the latest tasks' traces were built: from `deliveries`, or `ledger` (read
        back whole)."""
        self._accs: OrderedDict[str, _Acc] = OrderedDict()
        self._old: OrderedDict[str, None] = OrderedDict()
        """Tasks known to have begun before this process (their records are not kept)."""
        self._ends: OrderedDict[str, _End] = OrderedDict()
        """Tasks ended, trace not exported yet, in the order their ends came."""
        self._done: OrderedDict[str, None] = OrderedDict()
        """Tasks whose trace this process exported (a later end of theirs is ignored)."""
        self._work = asyncio.Event()
        self._stopping = False
        self._flusher: asyncio.Task[None] | None = None
        self._sub: Any = None
        self._led: _Pull | None = None
        self._log: _Pull | None = None
        self._led_start = self._log_start = 0
        self._led_next = self._log_next = 1
        self._inbox = ""
        self._puts = 0
        self._acks: dict[str, asyncio.Future[bytes]] = {}
        """The `jm-stats` puts waiting for their acks, by reply token."""
        self._stats_subject = subjects.kv_subject(subjects.BUCKET_STATS, "")

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.stats:
            await ensure_bucket(
                self.js, subjects.BUCKET_STATS, replicas=self.bus_settings.replicas,
                max_age_s=STATS_TTL_S)
        s = self.bus_settings
        self._led = _Pull(self.js, subjects.STREAM_LEDGER, telemetry_consumer_config(
            self.durable, s, deliver_new=self.deliver_new), self._on_ledger, "l")
        self._log = _Pull(self.js, subjects.STREAM_LOG, telemetry_consumer_config(
            self.durable, s, logs=True), self._on_log, "g")
        # Consumers first, then the streams' last sequences, JM_LOG's before the
        # ledger's: a task submitted after the ledger's has every log record after
        # JM_LOG's, and both consumers deliver everything stored after those.
        floor, delivered = await self._led.create()
        _, log_delivered = await self._log.create()
        self._log_start = (await self.js.stream_info(subjects.STREAM_LOG)).state.last_seq
        self._led_start = (await self.js.stream_info(subjects.STREAM_LEDGER)).state.last_seq
        self._led_next, self._log_next = self._led_start + 1, self._log_start + 1
        self._led.last, self._log.last = delivered, log_delivered
        if delivered > floor:
            await self._owed(floor, delivered)
        inbox = self._inbox = self.nc.new_inbox()
        for p in (self._led, self._log):
            p.attach(inbox)
        self._sub = await self.nc.subscribe(f"{inbox}.*", cb=self._on_inbox,
                                            pending_msgs_limit=-1, pending_bytes_limit=-1)
        self._flusher = asyncio.create_task(self._run(), name=f"telemetry:{self.durable}")
        log.info("telemetry: exporting one trace per finished task (GenAI semconv %s), "
                 "consumer %s", GENAI_SEMCONV_VERSION, self.durable)

    async def stop(self, grace_s: float = 10.0) -> None:
        self._stopping = True
        for p in (self._led, self._log):
            if p is not None:
                p.paused = True
        self._work.set()
        if self._flusher is not None:
            try:
                await asyncio.wait_for(self._flusher, grace_s)
            except (TimeoutError, asyncio.CancelledError):
                pass
            except Exception as e:
                log.warning("telemetry: last export at stop failed: %s", e)
            self._flusher = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        await asyncio.get_running_loop().run_in_executor(None, self.sender.shutdown)
        if self.metrics is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.metrics.shutdown)

    async def _owed(self, floor: int, delivered: int) -> None:
        """Ends a predecessor was delivered and did not acknowledge (it was killed): read
        here, not waited for (they come again only after ack_wait), and exported before
        the ledger consumer is acknowledged past them."""
        for seq, subject, data in await self.ledger.read_raw(subjects.TELEMETRY_SUBJECT,
                                                             from_seq=floor + 1):
            if seq > delivered:
                break
            task_id = subjects.task_id_of(subject)
            if task_id is None or subject != subjects.task_events(task_id):
                continue
            got = decode_entry(seq, subject, data)
            if isinstance(got, LedgerEntry) and isinstance(got.event, _TERMINAL) \
                    and task_id not in self._ends:
                self._ends[task_id] = _End(task_id, seq, None)
        if self._ends:
            self._work.set()

    # ------------------------------------------------------------------ deliveries

    async def _on_inbox(self, msg: Msg) -> None:
        if not msg.reply:  # a put's ack, or a status: to the pull request it names
            token = msg.subject.rsplit(".", 1)[-1]
            if token.startswith("p"):
                fut = self._acks.get(token)
                if fut is not None and not fut.done():
                    fut.set_result(msg.data)
                return
            pull = self._led if token.startswith("l") else self._log
            if pull is not None:
                pull.status(token, msg)
            return
        meta = _ack_meta(msg.reply)
        if meta is None:
            return
        stream, deliveries, seq, ts = meta
        pull = self._log if stream == subjects.STREAM_LOG else self._led
        if pull is not None:
            pull.delivered(msg, seq, ts, deliveries)

    def _forget(self, task_id: str) -> None:
        """Stop keeping a task's records: it is read back at its end."""
        self._accs.pop(task_id, None)
        self._old[task_id] = None
        while len(self._old) > 100_000:
            self._old.popitem(last=False)

    def _gap(self, what: str) -> None:
        """Records went missing (another replica took them, or they were deleted):
        no task kept so far may be complete."""
        fresh = [t for t, a in self._accs.items() if a.fresh]
        if fresh:
            log.info("telemetry: %s delivery gap; %d task(s) will be read back", what,
                     len(fresh))
        for t in fresh:
            self._forget(t)

    def _on_ledger(self, msg: Msg, seq: int, ts: int, deliveries: int) -> None:
        assert self._led is not None
        task_id = subjects.task_id_of(msg.subject)
        kind = (msg.headers or {}).get(hn.CE_TYPE)
        if seq > self._led.last:  # not delivered before (to this process or another)
            if seq > self._led_start:
                if seq > self._led_next:
                    self._gap("ledger")
                self._led_next = seq + 1
            self._led.keep(seq, msg.reply)
            if task_id is None:
                return
            acc = self._accs.get(task_id)
            if kind is None:  # an append without its type in the headers: look inside
                got = decode_entry(seq, msg.subject, msg.data)
                kind = got.event.type if isinstance(got, LedgerEntry) else ""
            if kind == _SUBMITTED and seq > self._led_start and task_id not in self._done \
                    and task_id not in self._old:
                if acc is None:
                    acc = self._accs[task_id] = _Acc()
                    self._trim()
                acc.fresh = True
            if acc is not None and acc.fresh:
                acc.ledger.append((seq, ts, msg.subject, msg.data))
        else:
            self._led.keep_again(seq, msg.reply)
            if task_id is None:
                return
        if kind in _TERMINAL_TYPES and msg.subject == subjects.task_events(task_id) \
                and task_id not in self._ends and task_id not in self._done:
            self._ends[task_id] = _End(task_id, seq, msg)
            self._work.set()

    def _on_log(self, msg: Msg, seq: int, ts: int, deliveries: int) -> None:
        assert self._log is not None
        if seq <= self._log.last:
            self._log.keep_again(seq, msg.reply)
            return  # delivered before: kept already (or not needed)
        self._log.keep(seq, msg.reply)
        if seq <= self._log_start:
            return  # stored before this process started: only tasks read back had it
        if seq > self._log_next:
            self._gap("logs")
        self._log_next = seq + 1
        task_id = subjects.task_id_of(msg.subject)
        if task_id is None or task_id in self._old or task_id in self._done:
            return
        acc = self._accs.get(task_id)
        if acc is None:  # its submission may still be on its way on the other stream
            acc = self._accs[task_id] = _Acc()
            self._trim()
            self._work.set()
        acc.logs.append((LOG_SEQ_BASE + seq, ts, msg.subject, msg.data))

    def _trim(self) -> None:
        while len(self._accs) > self.max_tracked:
            task_id, _ = self._accs.popitem(last=False)
            self._forget(task_id)

    # ------------------------------------------------------------------ batches

    async def _run(self) -> None:
        """Pull, and every `flush_s` export what ended; until stopped (then once more)."""
        assert self._led is not None and self._log is not None
        pause = 0.5
        while True:
            self._led.pull()
            self._log.pull()
            if self._stopping and not self._ends:
                break
            if not self._ends and not self._log_only():
                self._work.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), 1.0)
                await self._ack()
                continue
            await asyncio.sleep(0 if self._stopping else self.flush_s)
            try:
                await self._flush()
                pause = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self._stopping:
                    raise
                log.warning("telemetry: export of %d trace(s) failed, retry in %.1fs: %s",
                            min(len(self._ends), self.batch), pause, e,
                            exc_info=not is_transient(e) and not isinstance(e, ExportFailed))
                await asyncio.sleep(pause)
                pause = min(pause * 2, 10.0)
            # Backpressure: while ends wait for an exporter that fails, take no more.
            self._led.paused = self._log.paused = self._stopping or \
                len(self._ends) > 20 * self.batch

    def _log_only(self) -> list[str]:
        return [t for t, a in self._accs.items() if not a.fresh]

    async def _reach(self, pull: _Pull, stream: str) -> None:
        """Until `pull` was delivered everything `stream` held when this was called."""
        target = await self._last_seq(stream)
        waited = 0.0
        while pull.last < target:
            pull.progress.clear()
            pull.pull(force=True)
            try:
                await asyncio.wait_for(pull.progress.wait(), 1.0)
            except TimeoutError:
                waited += 1.0
                info = await self.js.consumer_info(stream, pull.durable)
                if info.num_pending == 0 and info.delivered.stream_seq >= target \
                        and waited >= 2.0:
                    return  # the last ones were deleted, or delivered to another replica

    async def _last_seq(self, stream: str) -> int:
        """The last sequence `stream` holds (its info, read without the whole config)."""
        reply = await self.nc.request(subjects.stream_info_api(self.js._prefix, stream), b"",
                                      timeout=self.bus_settings.request_timeout_s)
        try:
            info = json.loads(reply.data)
            return int(info["state"]["last_seq"])
        except (ValueError, KeyError, TypeError) as e:
            raise LedgerReadError(f"info of {stream}: {reply.data[:200]!r}") from e

    async def _flush(self) -> None:
        assert self._led is not None and self._log is not None
        ends = list(self._ends.values())[: self.batch]
        unknown = self._log_only()
        if unknown:  # log records whose task's submission has not come (yet?)
            await self._reach(self._led, subjects.STREAM_LEDGER)
            for t in unknown:
                acc = self._accs.get(t)
                if acc is not None and not acc.fresh:
                    self._forget(t)  # begun before this process: read back at its end
        if not ends:
            await self._ack()
            return
        if any(self._accs.get(e.task_id, _NOT_FRESH).fresh for e in ends):
            await self._reach(self._log, subjects.STREAM_LOG)
        traces: list[Trace] = []
        summaries: list[dict[str, Any]] = []
        built: list[tuple[_End, list[LedgerEntry]]] = []
        sem = asyncio.Semaphore(self.concurrency)

        async def entries_of(end: _End) -> list[LedgerEntry] | None:
            acc = self._accs.get(end.task_id)
            if acc is not None and acc.fresh:
                self.built_from_deliveries += 1
                self._built(end.task_id, "deliveries")
                return self._entries(acc)
            async with sem:
                self.ledger.observe(end.task_id, end.seq)
                got = await self.ledger.read(end.task_id)
            self.read_back += 1
            self._built(end.task_id, "ledger")
            return got

        all_entries = await asyncio.gather(*(entries_of(e) for e in ends))
        skip: list[_End] = []
        for end, entries in zip(ends, all_entries, strict=True):
            if entries is None:
                continue
            first = first_terminal(entries)
            if first is None:
                raise RuntimeError(f"task {end.task_id}: its end (seq {end.seq}) is not "
                                   "among its records")
            if first.seq != end.seq:
                skip.append(end)  # a later end: the trace went with the first
                continue
            try:
                state = fold(end.task_id, entries)
                trace = derive(end.task_id, entries, capture=self.capture, state=state)
                summary = task_summary(end.task_id, entries, state=state) \
                    if self.stats else None
            except Exception as e:  # a bug, not the bus: the task is put aside, logged
                log.error("telemetry: task %s: its trace could not be derived: %s",
                          end.task_id, e, exc_info=True)
                if end.msg is not None:
                    with contextlib.suppress(Exception):
                        await dead_letter(self.js, end.msg, subjects.STREAM_LEDGER,
                                          self.durable,
                                          f"trace not derived: {type(e).__name__}: {e}")
                skip.append(end)
                continue
            if trace is None:
                skip.append(end)
                continue
            traces.append(trace)
            built.append((end, entries))
            if summary is not None:
                summaries.append(summary)
        if summaries:  # the same record again on a redelivery: every task counts once
            await self._put_summaries(summaries)
        if traces and not await self.sender.send(traces, self.resource):
            raise ExportFailed(f"export of {len(traces)} trace(s) failed")
        for end in skip:
            self._finish(end.task_id)
        for (end, entries), trace in zip(built, traces, strict=True):
            self._finish(end.task_id)
            self.traces_exported += 1
            self.spans_exported += _count(trace.root)
            if self.metrics is not None:
                self.metrics.record(entries)
        await self._ack()

    def _built(self, task_id: str, how: str) -> None:
        self.built_by[task_id] = how
        while len(self.built_by) > 10_000:
            self.built_by.popitem(last=False)

    def _finish(self, task_id: str) -> None:
        self._ends.pop(task_id, None)
        self._accs.pop(task_id, None)
        self._done[task_id] = None
        while len(self._done) > 100_000:
            self._done.popitem(last=False)

    def _entries(self, acc: _Acc) -> list[LedgerEntry]:
        """A kept task's records as a ledger read gives them: each stream in its order,
        the two merged in the order nats-server stored them (its time stamps, the
        ledger's first at a tie), what does not decode passed over (logged once)."""
        out: list[LedgerEntry] = []
        merged = heapq.merge(((ts, 0, seq, subj, data) for seq, ts, subj, data in acc.ledger),
                             ((ts, 1, seq, subj, data) for seq, ts, subj, data in acc.logs))
        validate = EVENT_ADAPTER.validate_json
        for _, which, seq, subj, data in merged:
            # The ledger's appends were checked at the edge when written (bus.wire);
            # pydantic's own parser refuses what is not an event (and nests no deeper
            # than its limit). Only what it refuses goes through the reader's total
            # decoder, for the reason it reports.
            try:
                out.append(LedgerEntry(seq, subj, validate(data)))
                continue
            except Exception:
                pass
            got = decode_entry(seq, subj, data)
            if isinstance(got, LedgerEntry):
                out.append(got)
            else:
                self.ledger.report_bad(got, subjects.STREAM_LOG if which else
                                       subjects.STREAM_LEDGER)
        return out

    async def _put_summaries(self, summaries: Sequence[dict[str, Any]]) -> None:
        """One `jm-stats` put per task, all sent at once (their acks come to this
        process's inbox), every ack awaited."""
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[bytes]] = []
        try:
            for summary in summaries:
                key, value = summary_record(summary)
                self._puts += 1
                token = f"p{self._puts}"
                fut = self._acks[token] = loop.create_future()
                futs.append(fut)
                await self.nc.publish(subjects.kv_subject(subjects.BUCKET_STATS, key), value,
                                      reply=f"{self._inbox}.{token}")
            async with asyncio.timeout(self.bus_settings.request_timeout_s):
                answers = await asyncio.gather(*futs)
        finally:
            for f in futs:
                if not f.done():
                    f.cancel()
            for token in [t for t, f in self._acks.items() if f.done()]:
                del self._acks[token]
        for raw in answers:
            try:
                err = json.loads(raw).get("error")
            except ValueError:
                err = {"description": f"no ack ({raw[:100]!r})"}
            if err:
                raise LedgerWriteError(f"jm-stats put: {err.get('code')} "
                                       f"{err.get('description')}")

    async def _ack(self) -> None:
        """The ledger consumer up to the first end not exported; the logs consumer up
        to what arrived (a successor reads back any task this process was keeping)."""
        if self._led is None or self._log is None:
            return
        first = next(iter(self._ends.values()), None)
        floor = min((e.seq for e in self._ends.values()), default=None) \
            if first is not None else None
        await self._led.ack_through(self._led.last if floor is None else floor - 1)
        await self._log.ack_through(self._log.last)


def _count(s: _Span) -> int:
    return 1 + sum(_count(c) for c in s.children)


async def run_telemetry(url: str, *, stop: asyncio.Event, durable: str | None = None,
                        deliver_new: bool = False) -> None:
    """The `jetmesh telemetry` role until `stop` is set."""
    from jetmesh.bus.connection import connect, jetstream

    nc = await connect(url, name="jetmesh-telemetry")
    svc = TelemetryService(nc, jetstream(nc), durable=durable or subjects.CONSUMER_TELEMETRY,
                           deliver_new=deliver_new)
    await svc.start()
    try:
        await stop.wait()
    finally:
        await svc.stop()
        await nc.close()
