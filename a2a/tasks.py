"""Pure mapping between jetmesh tasks (ledger folds) and A2A 1.0 tasks, messages and events.

No I/O here. An A2A task *is* a jetmesh task: same id, state from the ledger fold. Each
ledger entry becomes exactly one A2A stream event whose ``metadata.jetmesh.seq`` is the
entry's ledger sequence: that number is the resume token (send it back as the
``Last-Event-ID`` header of SubscribeToTask and the stream continues right after it).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any

from a2a.types import (
    Artifact,
    Message,
    Part,
    Role,
    Task,
    TaskArtifactUpdateEvent,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from a2a.types import TaskState as A2AState
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, ConfigDict

from jetmesh.agents.cards import plain as plain  # also a2a.tasks.plain, as before
from jetmesh.agents.tools import ASK_USER
from jetmesh.bus import events as ev
from jetmesh.bus import headers as hn
from jetmesh.bus.ledger import LedgerEntry, is_log_seq
from jetmesh.orchestrator.state import StepStatus, TaskState
from jetmesh.orchestrator.state import TaskStatus as JmStatus
from jetmesh.orchestrator.tasks_kv import A2A_CONTEXT_KEY
from jetmesh.orchestrator.timeline import describe

__all__ = [
    "META_CONTEXT",
    "META_MESSAGE",
    "SKILL_WORKFLOW_PREFIX",
    "Decision",
    "StreamEvent",
    "Submission",
    "a2a_state",
    "context_of",
    "decision_of",
    "entry_event",
    "interrupted",
    "message_to_submission",
    "plain",
    "seq_of",
    "skill_workflow",
    "task_from_state",
    "task_id_for_message",
    "upto",
]

META_CONTEXT = A2A_CONTEXT_KEY  # one name, kept in the task listing projection too
"""Submission metadata key holding the A2A context id."""
META_MESSAGE = "a2a.message_id"
SKILL_WORKFLOW_PREFIX = "skill:"
"""A submission whose workflow is ``skill:<id>`` runs that one skill on the task input."""

StreamEvent = Task | Message | TaskStatusUpdateEvent | TaskArtifactUpdateEvent

_STATES: dict[JmStatus, A2AState] = {
    JmStatus.SUBMITTED: A2AState.TASK_STATE_SUBMITTED,
    JmStatus.WORKING: A2AState.TASK_STATE_WORKING,
    JmStatus.INPUT_REQUIRED: A2AState.TASK_STATE_INPUT_REQUIRED,
    JmStatus.COMPLETED: A2AState.TASK_STATE_COMPLETED,
    JmStatus.FAILED: A2AState.TASK_STATE_FAILED,
    JmStatus.CANCELED: A2AState.TASK_STATE_CANCELED,
    JmStatus.REJECTED: A2AState.TASK_STATE_REJECTED,
}
_FROM_A2A = {v: k for k, v in _STATES.items()}
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


def a2a_state(status: JmStatus) -> A2AState:
    return _STATES[status]


def jetmesh_status(state: A2AState) -> JmStatus | None:
    return _FROM_A2A.get(state)


def skill_workflow(skill: str) -> str:
    return f"{SKILL_WORKFLOW_PREFIX}{skill}"


# ----------------------------------------------------------------------------- inbound


class Submission(BaseModel):
    """What an A2A message asks of the mesh (validated at the edge)."""

    model_config = ConfigDict(frozen=True)

    task_id: str
    context_id: str
    goal: str
    input: dict[str, Any]
    workflow: str | None = None
    skill: str | None = None
    metadata: dict[str, str]


def task_id_for_message(message_id: str) -> str:
    """A task id derived from the message id: resending the same message is idempotent."""
    if message_id and _TOKEN.match(message_id):
        return f"a2a-{message_id}"
    if message_id:
        return "a2a-" + hashlib.sha256(message_id.encode()).hexdigest()[:40]
    return f"a2a-{uuid.uuid4().hex}"


def _struct(value: Any) -> dict[str, Any]:
    out: dict[str, Any] = plain(MessageToDict(value)) if value is not None else {}
    return out


def message_to_submission(message: Message, request_metadata: dict[str, Any] | None = None
                          ) -> Submission:
    """Goal = the text parts; input = the data parts (objects, merged); workflow and skill
    from the message's (or the request's) metadata."""
    texts = [p.text for p in message.parts if p.WhichOneof("content") == "text"]
    data: dict[str, Any] = {}
    for p in message.parts:
        if p.WhichOneof("content") == "data":
            value = plain(MessageToDict(p.data))
            if isinstance(value, dict):
                data.update(value)
            else:
                data.setdefault("data", value)
    meta = {**(request_metadata or {}), **_struct(message.metadata)}
    workflow = meta.get("workflow")
    skill = meta.get("skill")
    if skill is not None and not isinstance(skill, str):
        skill = None
    if workflow is not None and not isinstance(workflow, str):
        workflow = None
    if workflow is None and skill:
        workflow = skill_workflow(skill)
    context_id = message.context_id or uuid.uuid4().hex
    return Submission(
        task_id=task_id_for_message(message.message_id), context_id=context_id,
        goal="\n".join(texts), input=data, workflow=workflow, skill=skill,
        metadata={META_CONTEXT: context_id, META_MESSAGE: message.message_id})


_YES = frozenset({"approve", "approved", "yes", "y", "ok", "grant", "granted", "allow"})
_NO = frozenset({"deny", "denied", "no", "n", "reject", "refuse"})


class Decision(BaseModel):
    """A follow-up message's answer to a task waiting for an approval.

    From a data part ``{"decision": "approve" | "deny", "reason": ..., "step": ...,
    "tool": ..., "argsHash": ...}`` or from text: ``approve`` (or ``yes``), ``deny`` (or
    ``no``) followed by the reason. ``argsHash``, when given, must be the pending call's:
    the answer is then bound to exactly the arguments the approver saw."""

    model_config = ConfigDict(frozen=True)

    granted: bool
    reason: str = ""
    step: str | None = None
    tool: str | None = None
    args_hash: str | None = None


def decision_of(message: Message) -> Decision | None:
    """The decision a follow-up message carries, or None when it carries none."""
    for p in message.parts:
        if p.WhichOneof("content") != "data":
            continue
        data = plain(MessageToDict(p.data))
        if not isinstance(data, dict) or "decision" not in data:
            continue
        word = str(data.get("decision", "")).strip().lower()
        if word not in _YES | _NO:
            return None
        opt = {k: data.get(k) for k in ("step", "tool", "argsHash", "reason")}
        if any(v is not None and not isinstance(v, str) for v in opt.values()):
            return None
        return Decision(granted=word in _YES, reason=opt["reason"] or "",
                        step=opt["step"], tool=opt["tool"], args_hash=opt["argsHash"])
    text = " ".join(p.text for p in message.parts
                    if p.WhichOneof("content") == "text").strip()
    m = re.match(r"^([A-Za-z]+)\b[\s:,.!-]*(.*)$", text, re.S)
    if m is None:
        return None
    word, rest = m.group(1).lower(), m.group(2).strip()
    if word in _YES:
        return Decision(granted=True)
    if word in _NO:
        return Decision(granted=False, reason=rest or "denied over A2A")
    return None


MAX_ANSWER_CHARS = 4000


def questions(state: TaskState) -> list[ev.ApprovalRequestedData]:
    """The task's pending questions to its user (`ask_user` calls), oldest first."""
    return [p for p in state.pending_approvals.values() if p.tool == ASK_USER]


def answer_of(message: Message) -> str:
    """A follow-up message's answer to a question: a data part's ``answer``, else its
    text (clipped to MAX_ANSWER_CHARS)."""
    for p in message.parts:
        if p.WhichOneof("content") == "data":
            data = plain(MessageToDict(p.data))
            if isinstance(data, dict) and isinstance(data.get("answer"), str):
                return str(data["answer"]).strip()[:MAX_ANSWER_CHARS]
    return " ".join(p.text for p in message.parts
                    if p.WhichOneof("content") == "text").strip()[:MAX_ANSWER_CHARS]


def step_of(message: Message) -> str | None:
    """A data part's ``step`` (which question an answer is for)."""
    for p in message.parts:
        if p.WhichOneof("content") == "data":
            data = plain(MessageToDict(p.data))
            if isinstance(data, dict) and isinstance(data.get("step"), str):
                return str(data["step"])
    return None


def interrupted(state: TaskState) -> bool:
    """Whether the task waits for its client (A2A's interrupted states)."""
    return state.status is JmStatus.INPUT_REQUIRED and bool(state.pending_approvals)


# ----------------------------------------------------------------------------- outbound


def context_of(state: TaskState) -> str:
    sub = state.submitted
    return (sub.metadata.get(META_CONTEXT) if sub else None) or state.task_id


def _agent_message(state: TaskState, text: str, data: dict[str, Any] | None = None,
                   message_id: str | None = None) -> Message:
    parts = [Part(text=text)]
    if data is not None:
        part = Part(media_type="application/json")
        part.data.struct_value.update(data)
        parts.append(part)
    return Message(message_id=message_id or f"{state.task_id}-{state.last_seq}",
                   context_id=context_of(state), task_id=state.task_id,
                   role=Role.ROLE_AGENT, parts=parts)


def _user_message(state: TaskState) -> Message | None:
    sub = state.submitted
    if sub is None:
        return None
    parts = []
    if sub.goal:
        parts.append(Part(text=sub.goal))
    if sub.input:
        part = Part(media_type="application/json")
        part.data.struct_value.update(sub.input)
        parts.append(part)
    return Message(message_id=sub.metadata.get(META_MESSAGE) or f"{state.task_id}-request",
                   context_id=context_of(state), task_id=state.task_id,
                   role=Role.ROLE_USER, parts=parts or [Part(text="")])


def _data_artifact(artifact_id: str, name: str, data: dict[str, Any]) -> Artifact:
    part = Part(media_type="application/json")
    part.data.struct_value.update(data)
    parts = [part]
    text = data.get("answer") if isinstance(data.get("answer"), str) else data.get("text")
    if isinstance(text, str) and text:
        parts.insert(0, Part(text=text))
    return Artifact(artifact_id=artifact_id, name=name, parts=parts)


def _pending(state: TaskState) -> dict[str, Any] | None:
    """What an input-required task waits for: its pending approvals (the status data)."""
    if not interrupted(state):
        return None
    return {"pendingApprovals": [
        {"step": p.step_id, "tool": p.tool, "arguments": p.arguments, "argsHash": p.args_hash,
         "reason": p.reason, "risk": p.risk,
         **({"expiresAt": p.expires_at.isoformat()} if p.expires_at else {})}
        for p in state.pending_approvals.values()]}


def _status_text(state: TaskState) -> str:
    if state.status == JmStatus.COMPLETED:
        return "completed"
    if interrupted(state) and len(questions(state)) == len(state.pending_approvals):
        asked = " / ".join(str(p.arguments.get("question", "")) for p in questions(state))
        return (f"input-required: {asked} (reply in this task with your answer as text, or "
                "a data part {\"answer\": ...})")
    if interrupted(state):
        calls = "; ".join(f"{p.tool}({json.dumps(p.arguments, sort_keys=True)}) in step "
                          f"{p.step_id}: {p.reason}" for p in state.pending_approvals.values())
        return (f"input-required: approval needed for {calls}. Reply in this task with "
                "'approve', or 'deny <reason>' (or a data part {\"decision\": \"approve\"|"
                "\"deny\", \"reason\": ..., \"argsHash\": ...}).")
    if state.reason:
        return f"{state.status.value}: {state.reason}"
    done = sum(1 for s in state.steps.values() if s.status == StepStatus.COMPLETED)
    return f"{state.status.value} ({done}/{len(state.steps)} steps done)"


def _meta(seq: int, traceparent: str | None = None, **extra: Any) -> dict[str, Any]:
    trace = {hn.TRACEPARENT: traceparent} if traceparent else {}
    return {"jetmesh": {"seq": seq, **trace, **extra}}


def task_from_state(state: TaskState, *, history: bool = True, artifacts: bool = True
                    ) -> Task:
    """The A2A view of a task's fold (``metadata.jetmesh.seq``: the last sequence folded)."""
    task = Task(id=state.task_id, context_id=context_of(state), status=TaskStatus(
        state=a2a_state(state.status),
        message=_agent_message(state, _status_text(state),
                               state.result if state.result is not None else _pending(state))))
    if state.updated_at:
        task.status.timestamp.FromDatetime(state.updated_at)
    if artifacts:
        for step in state.steps.values():
            if step.status == StepStatus.COMPLETED and step.output is not None:
                task.artifacts.append(_data_artifact(f"step-{step.id}", step.skill, step.output))
        if state.result is not None:
            task.artifacts.append(_data_artifact("result", "result", state.result))
    if history:
        user = _user_message(state)
        if user is not None:
            task.history.append(user)
    task.metadata.update(_meta(state.last_seq, state.traceparent, cost_usd=state.cost_usd,
                               model_calls=state.model_calls, tool_calls=state.tool_calls))
    return task


def entry_event(state: TaskState, entry: LedgerEntry) -> StreamEvent:
    """The one A2A event for a ledger entry; `state` is the fold *including* the entry."""
    e = entry.event
    meta = _meta(entry.seq, e.traceparent or state.traceparent, type=e.type)
    if isinstance(e, ev.StepCompleted):
        step = state.steps.get(e.data.step_id)
        out = TaskArtifactUpdateEvent(
            task_id=state.task_id, context_id=context_of(state),
            artifact=_data_artifact(f"step-{e.data.step_id}", step.skill if step else "step",
                                    e.data.output), last_chunk=True)
        out.metadata.update(meta)
        return out
    result = e.data.result if isinstance(e, ev.TaskCompleted) else _pending(state)
    text = _status_text(state) if interrupted(state) else describe(e, detail=False)
    status = TaskStatus(state=a2a_state(state.status), message=_agent_message(
        state, text, result, message_id=f"{state.task_id}-{entry.seq}"))
    if e.time:
        status.timestamp.FromDatetime(e.time)
    update = TaskStatusUpdateEvent(task_id=state.task_id, context_id=context_of(state),
                                   status=status)
    update.metadata.update(meta)
    return update


def upto(entries: list[LedgerEntry], seq: int) -> list[LedgerEntry]:
    """The entries read (ledger order, the steps' logs merged in) up to and including the
    ledger entry `seq`: what a task had recorded when that event was sent. (An A2A stream
    carries ledger entries only; a step's log records, numbered from LOG_SEQ_BASE up, are
    folded where they were read.)"""
    last = -1
    for i, e in enumerate(entries):
        if not is_log_seq(e.seq) and e.seq <= seq:
            last = i
    return entries[:last + 1]


def seq_of(event: StreamEvent) -> int:
    """The ledger sequence an event carries (0 when none)."""
    meta = MessageToDict(event.metadata) if event.HasField("metadata") else {}
    try:
        return int(meta.get("jetmesh", {}).get("seq", 0))
    except (TypeError, ValueError):
        return 0


def dumps(event: StreamEvent) -> str:
    return json.dumps(plain(MessageToDict(event)), sort_keys=True)
