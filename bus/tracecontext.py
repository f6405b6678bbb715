"""W3C trace context for a task, derived from the ledger alone.

A task's trace is the submitter's (its `traceparent`, when it sent one) or one derived
from the task id; every span id is derived from the trace and a key naming what the span
is (event ids), so any process computes the same ids: the telemetry role exporting a
task, the orchestrator stamping the task's events and step commands with the task's
root context, a worker stamping what it records. Pure functions.
"""

from __future__ import annotations

import hashlib
import re

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

ROOT_KEY = "root"
"""The key of a task's root span (`invoke_workflow`)."""


def agent_span_key(started_event_id: str) -> str:
    """The key of a step attempt's `invoke_agent` span: its `StepStarted` event's id."""
    return f"agent/{started_event_id}"


def tool_span_key(tool_called_event_id: str) -> str:
    """The key of a tool call's `execute_tool` span: its `ToolCalled` event's id."""
    return f"tool/{tool_called_event_id}"


def parse_traceparent(value: str | None) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a valid W3C traceparent, else None."""
    if not value:
        return None
    m = _TRACEPARENT.fullmatch(value.strip().lower())
    if m is None or m.group(1) == "ff":
        return None
    trace_id, span_id = int(m.group(2), 16), int(m.group(3), 16)
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, int(m.group(4), 16)


def _digest(text: str, nbytes: int) -> int:
    n = int.from_bytes(hashlib.sha256(text.encode()).digest()[:nbytes], "big")
    return n or 1  # an all-zero id is invalid


def task_trace_id(task_id: str, traceparent: str | None) -> int:
    """The trace of a task: the submitter's, else one derived from the task id."""
    parsed = parse_traceparent(traceparent)
    return parsed[0] if parsed else _digest(f"jetmesh/trace/{task_id}", 16)


def span_id_for(trace_id: int, key: str) -> int:
    """A span's id: derived from its trace and a key naming what it is (event ids)."""
    return _digest(f"{trace_id:032x}/{key}", 8)


def traceparent_of(trace_id: int, span_id: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def task_traceparent(task_id: str, submitted: str | None) -> str:
    """The context of a task's root span, which every event of the task and every
    message sent for it carries (`submitted`: the submitter's traceparent, if any)."""
    parsed = parse_traceparent(submitted)
    trace_id = task_trace_id(task_id, submitted)
    sampled = bool(parsed[2] & 1) if parsed else True
    return traceparent_of(trace_id, span_id_for(trace_id, ROOT_KEY), sampled)


def agent_traceparent(task_tp: str | None, started_event_id: str) -> str | None:
    """The context of a step attempt's `invoke_agent` span (the worker that wrote the
    attempt's `StepStarted` event knows its id), under which the worker's own live spans
    and outgoing requests go; None without a valid task context."""
    parsed = parse_traceparent(task_tp)
    if parsed is None:
        return None
    return traceparent_of(parsed[0], span_id_for(parsed[0], agent_span_key(started_event_id)),
                          bool(parsed[2] & 1))


def tool_traceparent(current: str | None, tool_called_event_id: str) -> str | None:
    """The context of a tool call's `execute_tool` span, in the trace of `current` (the
    step's context where the call is made); None without a valid one."""
    parsed = parse_traceparent(current)
    if parsed is None:
        return None
    return traceparent_of(parsed[0], span_id_for(parsed[0], tool_span_key(tool_called_event_id)),
                          bool(parsed[2] & 1))
