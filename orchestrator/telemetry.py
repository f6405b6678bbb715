"""OpenTelemetry traces derived from the ledger: one trace per task, exported over OTLP.

The `jetmesh telemetry` role follows the task subjects of JM_LEDGER with a durable pull
consumer (`subjects.CONSUMER_TELEMETRY`). On a task's first terminal event it reads the
whole task from the ledger, derives its spans (`build_spans`, pure) and exports them in
one OTLP request; only once the exporter reports success is the ledger message acked.
Nothing is buffered in the process: a killed telemetry role that restarts gets the
unacked terminal events again and rebuilds each trace from the ledger.

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

Exactly once, as stored: a span is exported when its task has ended, and the ledger
message is acked after the export succeeded (in-progress acks keep it while the export
runs). A process killed while an export is in flight (sent, not yet acked: at most
`EXPORT_THREADS` tasks) cannot know whether the receiver took it, so the restarted role
sends those traces again, with the same trace and span ids and the same content: a
backend that keys spans by id (Phoenix, Tempo's compaction, a collector's dedup) holds
each span once; a raw receiver sees those few twice. No span is ever lost, and no other
span is sent twice (tests/telemetry/test_telemetry_kill.py measures both).

Message content (tool arguments and results, model outputs) only when
`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT` is true.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from nats.js.kv import KeyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from jetmesh.bus import events as ev
from jetmesh.bus import headers as hn
from jetmesh.bus import subjects
from jetmesh.bus.consumer import PullRunner, Reject
from jetmesh.bus.ledger import Ledger, LedgerEntry, is_log_seq
from jetmesh.bus.presence import ensure_bucket
from jetmesh.bus.settings import BusSettings
from jetmesh.bus.streams import pull_consumer_config
from jetmesh.bus.tracecontext import (
    ROOT_KEY,
    agent_span_key,
    parse_traceparent,
    span_id_for,
    task_trace_id,
    task_traceparent,
)
from jetmesh.orchestrator.state import ORCHESTRATOR, fold
from jetmesh.orchestrator.stats import STATS_TTL_S, put_summary, task_summary

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
    def __init__(self, task_id: str, entries: Sequence[LedgerEntry], capture: bool) -> None:
        self.task_id = task_id
        self.entries = entries
        self.capture = capture
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
        span = run.span.add(_Span(f"tool/{e.id}", f"{op} {d.tool}" if op else
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
        state = fold(self.task_id, self.entries)
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


def build_spans(task_id: str, entries: Sequence[LedgerEntry], *,
                resource: Resource | None = None, capture: bool | None = None
                ) -> list[ReadableSpan]:
    """The spans of a finished task (root first), derived from its ledger entries only.
    Empty when the task has not ended."""
    if not entries:
        return []
    builder = _Builder(task_id, entries, capture_content() if capture is None else capture)
    root = builder.build()
    if root is None:
        return []
    first = next((e.event for e in entries if isinstance(e.event, ev.TaskSubmitted)), None)
    tp = first.traceparent if first is not None else None
    parsed = parse_traceparent(tp)
    if parsed is not None and tp == task_traceparent(task_id, tp):
        parsed = None  # the task's own root context (no submitter's): the root has no parent
    trace_id = task_trace_id(task_id, tp)
    flags = TraceFlags(parsed[2] & 1 if parsed else TraceFlags.SAMPLED)
    remote = SpanContext(trace_id, parsed[1], is_remote=True, trace_flags=flags) \
        if parsed else None
    res = resource or default_resource()
    out: list[ReadableSpan] = []

    def emit(s: _Span, parent: SpanContext | None) -> None:
        ctx = SpanContext(trace_id, span_id_for(trace_id, s.key), is_remote=False,
                          trace_flags=flags)
        end = max(s.end or s.start, s.latest_end() if s.children else s.start)
        if s.error is not None:
            status = Status(StatusCode.ERROR, s.error[:500])
        elif s.ok:
            status = Status(StatusCode.OK)
        else:
            status = Status(StatusCode.UNSET)
        out.append(ReadableSpan(
            s.name, ctx, parent, res, attributes=s.attributes,
            events=[SpanEvent(n, a, _ns(t)) for n, a, t in s.events], kind=s.kind,
            status=status, start_time=_ns(s.start), end_time=_ns(end),
            instrumentation_scope=SCOPE))
        for c in s.children:
            emit(c, ctx)

    emit(root, remote)
    return out


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


class _Exporters:
    """One exporter per worker thread (an HTTP session is not shared across threads)."""

    def __init__(self, factory: Callable[[], SpanExporter | None], threads: int) -> None:
        self.factory = factory
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="otlp-export")
        self.local = threading.local()
        self.made: list[SpanExporter] = []
        self.lock = threading.Lock()

    def _export(self, build: Callable[[], list[ReadableSpan]]) -> int | None:
        """Build the spans and export them (in a worker thread, so the event loop stays
        free to ack the moment an export returns): how many, or None if it failed."""
        spans = build()
        if not hasattr(self.local, "exporter"):
            self.local.exporter = self.factory()
            if self.local.exporter is not None:
                with self.lock:
                    self.made.append(self.local.exporter)
        exporter: SpanExporter | None = self.local.exporter
        if exporter is None or not spans:
            return len(spans)
        return len(spans) if exporter.export(spans) is SpanExportResult.SUCCESS else None

    async def export(self, build: Callable[[], list[ReadableSpan]]) -> int | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._export, build)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
        for x in self.made:
            with contextlib.suppress(Exception):
                x.shutdown()


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
                              deliver_new: bool = False) -> ConsumerConfig:
    """The durable consumer over every task's own events (their ends are there)."""
    config = pull_consumer_config(durable, subjects.TELEMETRY_SUBJECT, settings,
                                  deliver_new=deliver_new)
    config.headers_only = True  # the type is in the headers; an end is read with its task
    return config


class TelemetryService:
    """Follows the ledger and exports one trace per finished task. `start()`, `stop()`."""

    def __init__(self, nc: NATS, js: JetStreamContext, *,
                 exporter_factory: Callable[[], SpanExporter | None] = make_exporter,
                 resource: Resource | None = None,
                 bus_settings: BusSettings | None = None,
                 durable: str = subjects.CONSUMER_TELEMETRY, deliver_new: bool = False,
                 concurrency: int = 64, capture: bool | None = None,
                 stats: bool = True, metrics: bool | None = None) -> None:
        self.nc, self.js = nc, js
        self.bus_settings = bus_settings or BusSettings()
        self.ledger = Ledger(nc, js, timeout_s=self.bus_settings.request_timeout_s)
        self.resource = resource or default_resource()
        self.durable, self.deliver_new = durable, deliver_new
        self.concurrency = concurrency
        self.capture = capture_content() if capture is None else capture
        self.exporters = _Exporters(exporter_factory, min(concurrency, EXPORT_THREADS))
        self.stats = stats
        self.metrics = TaskMetrics(self.resource) if (
            metrics_wanted() if metrics is None else metrics) else None
        """Also keep the `jm-stats` projection (one record per finished task)."""
        self.traces_exported = 0
        self.spans_exported = 0
        self._runner: PullRunner | None = None
        self._stats_kv: KeyValue | None = None

    async def start(self) -> None:
        if self.stats:
            self._stats_kv = await ensure_bucket(
                self.js, subjects.BUCKET_STATS, replicas=self.bus_settings.replicas,
                max_age_s=STATS_TTL_S)
        self._runner = PullRunner(
            self.js, subjects.STREAM_LEDGER,
            telemetry_consumer_config(self.durable, self.bus_settings,
                                      deliver_new=self.deliver_new),
            self._on_event, concurrency=self.concurrency,
            max_deliver=self.bus_settings.max_deliver,
            # An OTLP backend that is down is a transient failure: keep retrying.
            transient_limit=1_000_000)
        await self._runner.start()
        log.info("telemetry: exporting one trace per finished task (GenAI semconv %s), "
                 "consumer %s", GENAI_SEMCONV_VERSION, self.durable)

    async def stop(self, grace_s: float = 10.0) -> None:
        if self._runner is not None:
            await self._runner.stop(grace_s)
            self._runner = None
        await asyncio.get_running_loop().run_in_executor(None, self.exporters.shutdown)
        if self.metrics is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.metrics.shutdown)

    async def _keep_alive(self, msg: Msg) -> None:
        every = max(0.2, self.bus_settings.ack_wait_s / 3)
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _on_event(self, msg: Msg) -> None:
        # Deliveries carry headers only: the ledger's appends name their type there, and
        # a task's end is read back with the rest of the task.
        kind = (msg.headers or {}).get(hn.CE_TYPE)
        if kind is not None and kind not in _TERMINAL_TYPES:
            return  # not a task's end: acked, unread
        task_id = subjects.task_id_of(msg.subject)
        if task_id is None:
            raise Reject(f"a ledger event on {msg.subject}, which names no task")
        seq = int(msg.metadata.sequence.stream)
        self.ledger.observe(task_id, seq)
        keepalive = asyncio.create_task(self._keep_alive(msg))
        try:
            entries = await self.ledger.read(task_id)
            end = first_terminal(entries)
            if end is None:
                if kind is None and entries.last_seq() >= seq:
                    return  # an untyped event that is not the task's end
                raise RuntimeError(f"ledger read of task {task_id} did not reach seq {seq}")
            if end.seq != seq:
                return  # a later terminal event: the task's trace went with the first
            if self._stats_kv is not None:  # the same record again on a redelivery: once
                summary = task_summary(task_id, entries)
                if summary is not None:
                    await put_summary(self.js, summary, kv=self._stats_kv)
            sent = await self.exporters.export(lambda: build_spans(
                task_id, entries, resource=self.resource, capture=self.capture))
            if sent is None:
                raise ExportFailed(f"export of task {task_id}'s spans failed")
            # Acked the moment the export returns (a kill before the ack reaches the
            # server is the one way a trace is sent twice, with the same ids).
            await msg.ack_sync(timeout=self.bus_settings.request_timeout_s)
            self.traces_exported += 1
            self.spans_exported += sent
            if self.metrics is not None:
                self.metrics.record(entries)
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await keepalive


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
