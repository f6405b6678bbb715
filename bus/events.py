"""The ledger's event vocabulary: CloudEvents 1.0 (structured JSON), one discriminated union.

Every event type is a versioned literal (`jetmesh.<noun>.<verb>.v1`); the Python class
name never travels. Commands that are not events (a task submission, a step command)
are plain pydantic models here too, so each message class is defined exactly once.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticSerializationError

from jetmesh.bus import headers as hn
from jetmesh.bus.errors import InvalidEventError
from jetmesh.bus.subjects import check_id
from jetmesh.bus.wire import MAX_JSON_DEPTH as MAX_JSON_DEPTH
from jetmesh.bus.wire import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from jetmesh.bus.wire import MAX_PAYLOAD_DEPTH as MAX_PAYLOAD_DEPTH
from jetmesh.bus.wire import WireError, check_json, depth_of


def new_id() -> str:
    """A new unique id usable as a subject token."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


def wire_validation_error(title: str, e: WireError) -> ValidationError:
    """A WireError as the pydantic ValidationError (type `json_invalid`) that callers of
    `decode_event` and `model_validate_json` already handle."""
    return ValidationError.from_exception_data(
        title, [{"type": "json_invalid", "loc": (), "input": "", "ctx": {"error": e.reason}}])


class _Strict(BaseModel):
    """Base of every jetmesh message model: unknown fields refused, NaN and infinities
    refused (JSON has neither; pydantic would store them as null, which a float field
    then cannot read back), and bytes checked at the edge before pydantic parses them."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> Self:
        """pydantic's, after `bus.wire.check_json` (size, UTF-8, surrogates, NaN, depth);
        a refusal is a ValidationError of type `json_invalid` with the reason."""
        try:
            data = check_json(json_data)
        except WireError as e:
            raise wire_validation_error(cls.__name__, e) from None
        return super().model_validate_json(data, **kwargs)


# --------------------------------------------------------------------------- data


class Budget(_Strict):
    """Hard limits for one task (issue: production controls)."""

    max_usd: float | None = Field(default=None, ge=0)
    """Dollars the task may spend on model calls."""
    max_tokens: int | None = Field(default=None, ge=0)
    """Input plus output tokens across all model calls."""
    max_tool_calls: int | None = Field(default=None, ge=0)
    """Tool calls across all steps."""
    deadline_s: float | None = Field(default=None, gt=0)
    """Seconds from submission after which the task fails."""


class ForkSpec(_Strict):
    """How a replayed task departs from its original (`jetmesh fork`): the steps before
    `from_step` are served from the original's recording, `from_step` and everything
    downstream of it run again, with these changes."""

    from_step: str
    steps: list[str] = Field(default_factory=list)
    """Further steps that run again, with their downstream (e.g. every step of an agent
    whose model the fork replaces)."""
    models: dict[str, str] = Field(default_factory=dict)
    """Agent name -> `provider:model` for the steps that run again."""
    effects: Literal["dry-run", "real"] = "dry-run"
    """Side effects of the steps that run again: recorded as "would call" (dry-run,
    never executed) or run for real."""


CONTEXT_METADATA_KEY = "a2a.context_id"
"""The submission metadata entry naming the task's conversation context (the A2A
contextId, or a NATS client's own; orchestrator.context)."""
MAX_CONTEXT_ID_CHARS = 1024
"""A context id longer than this is refused: it is copied into the task's plan and every
step command, and the bounds on earlier turns (8000 chars of JSON) include it."""


class TaskSubmission(_Strict):
    """The command published on the submit subject by any client (plain JSON)."""

    task_id: str = Field(default_factory=new_id)
    """Client-chosen id (idempotency key); a new one is made when absent."""
    goal: str = Field(default="", max_length=20_000)
    """What the task should achieve, in words (used by the LLM planner)."""
    input: dict[str, Any] = Field(default_factory=dict)
    """Structured input, available to workflow steps as `task.input`."""
    workflow: str | None = None
    """Name of a declared workflow; when absent the LLM planner plans the goal."""
    user_id: str | None = None
    """Whom the task is for (scopes memory)."""
    tenant: str | None = None
    """The tenant the task belongs to (None: the default tenant). Set by the gateway
    from the caller's credentials; a `tenant` metadata entry is read the same way."""
    submitted_by: str | None = None
    """Who submitted it (`<scheme>:<subject>`): the gateway sets it from the caller's
    credentials and refuses a caller's own value."""
    budget: Budget | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    replay_of: str | None = None
    """A replay (`jetmesh replay`) or fork of this finished task: its recorded model and
    tool calls are served instead of calling again (see `fork`)."""
    fork: ForkSpec | None = None
    """With `replay_of`: where and how the fork departs; None: an exact replay."""

    @field_validator("task_id")
    @classmethod
    def _task_id_token(cls, v: str) -> str:
        return check_id(v, "task id")

    @field_validator("replay_of")
    @classmethod
    def _replay_of_token(cls, v: str | None) -> str | None:
        return None if v is None else check_id(v, "task id")

    @field_validator("tenant")
    @classmethod
    def _tenant_token(cls, v: str | None) -> str | None:
        return None if v is None else check_id(v, "tenant")

    @model_validator(mode="after")
    def _tenant_from_metadata(self) -> Self:
        """No `tenant` field: the `tenant` metadata entry (a plain NATS client's way)."""
        if self.tenant is None and "tenant" in self.metadata:
            self.tenant = check_id(self.metadata["tenant"], "tenant")
        return self

    @field_validator("input")
    @classmethod
    def _input_leaves_room(cls, v: dict[str, Any]) -> dict[str, Any]:
        if depth_of(v, MAX_PAYLOAD_DEPTH) > MAX_PAYLOAD_DEPTH:
            raise ValueError(f"nested deeper than {MAX_PAYLOAD_DEPTH} levels")
        return v

    @field_validator("metadata")
    @classmethod
    def _context_id_bounded(cls, v: dict[str, str]) -> dict[str, str]:
        context_id = v.get(CONTEXT_METADATA_KEY)
        if context_id is not None and len(context_id) > MAX_CONTEXT_ID_CHARS:
            raise ValueError(f"{CONTEXT_METADATA_KEY} (the context id) is {len(context_id)} "
                             f"characters, over the {MAX_CONTEXT_ID_CHARS} allowed")
        return v


class PlanStep(_Strict):
    """One step of a plan: a skill, its input (possibly templated), its dependencies."""

    id: str
    skill: str
    input: dict[str, Any] = Field(default_factory=dict)
    """Literal values, or `{"$ref": "task.input.x"}` / `{"$ref": "steps.a.output.y"}`."""
    depends_on: list[str] = Field(default_factory=list)
    timeout_s: float = Field(default=120.0, gt=0)
    retries: int = Field(default=2, ge=0)

    @field_validator("id", "skill")
    @classmethod
    def _token(cls, v: str) -> str:
        return check_id(v)


class TaskSubmittedData(_Strict):
    goal: str = ""
    input: dict[str, Any] = Field(default_factory=dict)
    workflow: str | None = None
    user_id: str | None = None
    tenant: str | None = None
    budget: Budget | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    replay_of: str | None = None
    fork: ForkSpec | None = None
    submitted_by: str | None = None
    """The authenticated identity that submitted it (`<scheme>:<subject>`, gateway)."""


class TaskRejectedData(_Strict):
    reason: str
    errors: list[dict[str, Any]] = Field(default_factory=list)


class ContextTurn(_Strict):
    """One earlier task of the same conversation context, as its ledger recorded it."""

    task_id: str
    status: str
    """Its status when the later task was planned (`completed`, `failed`, `working`...)."""
    goal: str = ""
    input: dict[str, Any] | None = None
    """Its structured input (left out when large)."""
    answer: str | None = None
    """Its final answer (the result's `answer`, else the result as JSON), or why it
    failed; None while it runs."""
    seq: int = 0
    """The last ledger sequence of that task read: what this turn reflects."""


class PlanContext(_Strict):
    """The earlier turns a task was planned with (orchestrator.context)."""

    context_id: str
    turns: list[ContextTurn] = Field(default_factory=list)
    """Oldest first, bounded in number and size."""
    omitted: int = 0
    """Earlier turns left out by the bounds (the oldest)."""

    def as_prompt(self) -> str:
        """The turns as a note to add to a model's instructions ("" when none)."""
        if not self.turns:
            return ""
        turns = [t.model_dump(exclude_none=True, exclude={"seq"}) for t in self.turns]
        return ("\n\nEarlier turns of this conversation (oldest first: what the user asked "
                "and the answer given), for reference:\n"
                + json.dumps(turns, ensure_ascii=False, sort_keys=True))


class TaskPlannedData(_Strict):
    planner: str
    """`workflow:<name>` or `llm:<provider>/<model>`."""
    steps: list[PlanStep]
    merge: bool = False
    """Whether a final model call merges the step outputs into the result."""
    context: PlanContext | None = None
    """The earlier turns of the task's context (its submission's `a2a.context_id`
    metadata) given to the planner: what the task knew of the conversation."""


class StepDispatchedData(_Strict):
    step_id: str
    skill: str
    input: dict[str, Any]
    attempt: int = 1
    deadline: datetime | None = None


class StepStartedData(_Strict):
    step_id: str
    agent: str
    worker: str
    """The replica (process) running it."""
    attempt: int = 1
    delivery: int = 1
    """JetStream delivery count of the step command."""
    claim: bool = True
    """True: stored on the step's fenced line, a claim that fences out whoever held the
    step before (a redelivery taking over). False: the first delivery of a first
    attempt, stored on the step's log with no round trip; the line is still empty then,
    and the step's first fenced append (a side effect's policy decision, or its result,
    expected on an empty line) is what claims it."""


class ModelCalledData(_Strict):
    step_id: str | None = None
    """None for the orchestrator's own calls (planning, merging)."""
    agent: str
    worker: str | None = None
    """The replica that made the call (which claim of the step it belongs to)."""
    purpose: str = "step"
    """`step`, `plan` or `merge`."""
    provider: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    response: dict[str, Any]
    """The full neutral ModelResponse, so the run can be replayed with no model call."""
    cache_read_tokens: int = 0
    """Of input_tokens, read from the provider's prompt cache."""
    cache_write_tokens: int = 0
    """Of input_tokens, written to the provider's prompt cache."""


class ToolCalledData(_Strict):
    step_id: str
    agent: str
    worker: str | None = None
    """The replica that made the call (which claim of the step it belongs to)."""
    tool: str
    call_id: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    output: Any = None
    error: str | None = None
    latency_ms: float = 0.0
    side_effects: bool = False
    idempotency_key: str
    dry_run: bool = False
    """A fork's side effect that was not run: the call it would have made."""
    cache_hit: bool = False
    """A read-only call served from the tool-result cache (the tool did not run)."""


class EffectStartedData(_Strict):
    """A worker's claim check immediately before a side effect (see agents.worker)."""

    step_id: str
    agent: str
    worker: str
    """The replica about to run the effect; it holds the step's line at this point."""
    tool: str
    args_hash: str
    idempotency_key: str


class StepCompletedData(_Strict):
    step_id: str
    agent: str
    output: dict[str, Any]
    attempt: int = 1
    worker: str | None = None
    """The replica that wrote it: the result counts only from the step's holder."""


class StepFailedData(_Strict):
    step_id: str
    agent: str | None = None
    code: str
    """Machine-readable: tool_limit, model_error, invalid_input, invalid_output, timeout,
    budget_exceeded, no_agent, canceled, error."""
    reason: str
    retryable: bool = False
    attempt: int = 1
    worker: str | None = None
    """The replica that wrote it (None: the orchestrator, or a dead-letter hook)."""


class TaskCompletedData(_Strict):
    result: dict[str, Any]


class TaskFailedData(_Strict):
    code: str
    reason: str


class TaskCanceledData(_Strict):
    reason: str = "canceled"


class CancelRequestedData(_Strict):
    reason: str = "canceled by request"
    by: str | None = None


class PolicyDecidedData(_Strict):
    """The runtime's policy decision on one tool call (for tools that are not read-only)."""

    step_id: str
    agent: str
    tool: str
    args_hash: str
    decision: Literal["allow", "approve", "deny"]
    rule: str
    """Which rule decided (or `default:<risk>`)."""
    reason: str = ""


class ApprovalRequestedData(_Strict):
    """A gated tool call waits for a human: the task is input-required."""

    step_id: str
    agent: str
    tool: str
    arguments: dict[str, Any]
    """The exact arguments an approval is for."""
    args_hash: str
    reason: str
    risk: str
    expires_at: datetime


class ApprovalDecisionData(_Strict):
    """An approval or a denial, bound to task, step, tool and the arguments' hash."""

    step_id: str
    tool: str
    args_hash: str
    by: str = "operator"
    reason: str = ""


class BudgetExceededData(_Strict):
    step_id: str | None = None
    agent: str
    kind: str
    """usd, tokens or tool_calls."""
    limit: float
    would_be: float


class BudgetAlertedData(_Strict):
    """A tenant's or user's spend over a period reached the alert share of its cap
    (bus.spendcaps); recorded once, by the call whose cost took it there."""

    step_id: str | None = None
    agent: str
    scope: Literal["tenant", "user"]
    who: str
    period: Literal["day", "month"]
    key: str
    """The counter's key in jm-spend."""
    cap_usd: float
    share: float
    spent_usd: float


class ModelRoutedData(_Strict):
    """A routing decision of a step (agents.routing): which model tier serves its next
    model calls, and why."""

    step_id: str
    agent: str
    worker: str | None = None
    skill: str
    tier: str
    """The tier chosen (or, outcome `refused`, the one that could not be afforded)."""
    provider: str
    model: str
    trigger: Literal["default", "rule", "classifier", "retry", "invalid_output",
                     "validator", "low_confidence", "budget"]
    """What decided: the default tier, an input rule, the classifier step, a retried
    step, or an escalation (output against the schema, a validator, low confidence);
    `budget`: the tier wanted could not be afforded."""
    reason: str
    from_tier: str | None = None
    """The tier the step ran on before (escalations)."""
    outcome: Literal["chosen", "stayed", "refused"] = "chosen"
    """`stayed`: the budget kept the step on a cheaper tier; `refused`: the step fails."""
    estimate_usd: float | None = None
    """Upper bound of one call on the tier wanted."""
    headroom_usd: float | None = None
    """What the task's budget (and the step's slice) had left (None: no dollar limit)."""
    model_call: int = 0
    """How many model calls of the step came before the decision."""


class ContextCompactedData(_Strict):
    """The step loop summarised the older part of a step's context (agents.compaction):
    the model saw `summary` instead of the messages it replaces from here on."""

    step_id: str
    agent: str
    worker: str | None = None
    summary: dict[str, Any]
    """The anchored summary (intent, decisions, identifiers, facts, tool results digest,
    open questions, next steps), merged with the earlier compactions' summary."""
    messages: tuple[int, int]
    """The half-open range of the step's conversation (0: the step input) it replaces."""
    model_calls: list[int] = Field(default_factory=list)
    """Ordinals (0-based, in the step) of the model calls whose turns it replaces."""
    tool_calls: list[str] = Field(default_factory=list)
    """Idempotency keys of the tool calls whose results it replaces."""
    tokens_before: int
    """Estimated tokens of the context before, then after, compaction."""
    tokens_after: int
    compaction: int = 1
    """1 for the step's first compaction, then 2, ..."""
    summary_call: int | None = None
    """Ordinal of the model call that wrote part of the summary (a model summariser)."""


class McpToolsChangedData(_Strict):
    """An MCP server's tool list differs from the one its agent pinned at start."""

    step_id: str | None = None
    """The step before which the change was seen (its log holds this event)."""
    agent: str
    server: str
    pinned_hash: str
    current_hash: str
    added: list[str] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)
    changed: list[str] = Field(default_factory=list)
    """Tools whose description, schema or annotations changed."""
    action: Literal["refused", "accepted"]
    """refused: the server's tools are denied until the agent restarts; accepted: the
    new list is used from this step on."""


# --------------------------------------------------------------------------- events


class _Event(_Strict):
    """CloudEvents 1.0 structured-mode envelope shared by every event."""

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(default_factory=new_id)
    """Unique event id; also sent as `Nats-Msg-Id` so a retried append is stored once."""
    source: str = "jetmesh"
    """Who wrote it: `jetmesh/orchestrator`, `jetmesh/agent/<name>`, ..."""
    subject: str
    """The task id."""
    time: datetime = Field(default_factory=utcnow)
    datacontenttype: Literal["application/json"] = "application/json"
    traceparent: str | None = None
    """W3C trace context (CloudEvents distributed-tracing extension)."""

    @field_validator("subject")
    @classmethod
    def _subject_is_task_id(cls, v: str) -> str:
        return check_id(v, "task id")


class TaskSubmitted(_Event):
    type: Literal["jetmesh.task.submitted.v1"] = "jetmesh.task.submitted.v1"
    data: TaskSubmittedData


class TaskRejected(_Event):
    type: Literal["jetmesh.task.rejected.v1"] = "jetmesh.task.rejected.v1"
    data: TaskRejectedData


class TaskPlanned(_Event):
    type: Literal["jetmesh.task.planned.v1"] = "jetmesh.task.planned.v1"
    data: TaskPlannedData


class StepDispatched(_Event):
    type: Literal["jetmesh.step.dispatched.v1"] = "jetmesh.step.dispatched.v1"
    data: StepDispatchedData


class StepStarted(_Event):
    type: Literal["jetmesh.step.started.v1"] = "jetmesh.step.started.v1"
    data: StepStartedData


class ModelCalled(_Event):
    type: Literal["jetmesh.model.called.v1"] = "jetmesh.model.called.v1"
    data: ModelCalledData


class ToolCalled(_Event):
    type: Literal["jetmesh.tool.called.v1"] = "jetmesh.tool.called.v1"
    data: ToolCalledData


class EffectStarted(_Event):
    type: Literal["jetmesh.tool.effect_started.v1"] = "jetmesh.tool.effect_started.v1"
    data: EffectStartedData


class ModelRouted(_Event):
    type: Literal["jetmesh.model.routed.v1"] = "jetmesh.model.routed.v1"
    data: ModelRoutedData


class ContextCompacted(_Event):
    type: Literal["jetmesh.context.compacted.v1"] = "jetmesh.context.compacted.v1"
    data: ContextCompactedData


class StepCompleted(_Event):
    type: Literal["jetmesh.step.completed.v1"] = "jetmesh.step.completed.v1"
    data: StepCompletedData


class StepFailed(_Event):
    type: Literal["jetmesh.step.failed.v1"] = "jetmesh.step.failed.v1"
    data: StepFailedData


class TaskCompleted(_Event):
    type: Literal["jetmesh.task.completed.v1"] = "jetmesh.task.completed.v1"
    data: TaskCompletedData


class TaskFailed(_Event):
    type: Literal["jetmesh.task.failed.v1"] = "jetmesh.task.failed.v1"
    data: TaskFailedData


class TaskCanceled(_Event):
    type: Literal["jetmesh.task.canceled.v1"] = "jetmesh.task.canceled.v1"
    data: TaskCanceledData


class CancelRequested(_Event):
    type: Literal["jetmesh.task.cancel_requested.v1"] = "jetmesh.task.cancel_requested.v1"
    data: CancelRequestedData


class PolicyDecided(_Event):
    type: Literal["jetmesh.policy.decided.v1"] = "jetmesh.policy.decided.v1"
    data: PolicyDecidedData


class ApprovalRequested(_Event):
    type: Literal["jetmesh.approval.requested.v1"] = "jetmesh.approval.requested.v1"
    data: ApprovalRequestedData


class ApprovalGranted(_Event):
    type: Literal["jetmesh.approval.granted.v1"] = "jetmesh.approval.granted.v1"
    data: ApprovalDecisionData


class ApprovalDenied(_Event):
    type: Literal["jetmesh.approval.denied.v1"] = "jetmesh.approval.denied.v1"
    data: ApprovalDecisionData


class BudgetExceeded(_Event):
    type: Literal["jetmesh.budget.exceeded.v1"] = "jetmesh.budget.exceeded.v1"
    data: BudgetExceededData


class BudgetAlerted(_Event):
    type: Literal["jetmesh.budget.alerted.v1"] = "jetmesh.budget.alerted.v1"
    data: BudgetAlertedData


class McpToolsChanged(_Event):
    type: Literal["jetmesh.mcp.tools_changed.v1"] = "jetmesh.mcp.tools_changed.v1"
    data: McpToolsChangedData


Event = Annotated[
    TaskSubmitted
    | TaskRejected
    | TaskPlanned
    | StepDispatched
    | StepStarted
    | ModelCalled
    | ToolCalled
    | EffectStarted
    | StepCompleted
    | StepFailed
    | TaskCompleted
    | TaskFailed
    | TaskCanceled
    | CancelRequested
    | PolicyDecided
    | ApprovalRequested
    | ApprovalGranted
    | ApprovalDenied
    | BudgetExceeded
    | ModelRouted
    | ContextCompacted
    | McpToolsChanged
    | BudgetAlerted,
    Field(discriminator="type"),
]
"""Any ledger event, discriminated on its versioned `type`."""

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)

EVENT_TYPES: frozenset[str] = frozenset(
    cls.model_fields["type"].default
    for cls in (
        TaskSubmitted, TaskRejected, TaskPlanned, StepDispatched, StepStarted, ModelCalled,
        ToolCalled, EffectStarted, StepCompleted, StepFailed, TaskCompleted, TaskFailed,
        TaskCanceled,
        CancelRequested, PolicyDecided, ApprovalRequested, ApprovalGranted, ApprovalDenied,
        BudgetExceeded, ModelRouted, ContextCompacted, McpToolsChanged, BudgetAlerted,
    )
)

TERMINAL_TASK_EVENTS = (TaskCompleted, TaskFailed, TaskCanceled, TaskRejected)


RESENT_HEADER = hn.RESENT
"""Header of a step command sent again (a dead letter redriven, a dispatch re-published
by an orchestrator that restarted): the step may have run before, so the worker reads
its line and claims it before running it, even on the message's first delivery."""


class StepReplaySource(_Strict):
    """How one step of a replayed (or forked) task runs."""

    of: str
    """The original task, whose records of the same step are served."""
    rerun: bool = False
    """False: every model and tool call is served from the original's recording and an
    unrecorded call fails the step (`replay_diverged`); True: the step runs again."""
    effects: Literal["dry-run", "real"] = "dry-run"
    """When it runs again: its side effects dry-run or real."""
    model: str | None = None
    """When it runs again: `provider:model` instead of the agent's own."""


class StepCommand(_Strict):
    """What the orchestrator publishes on a skill's work subject."""

    task_id: str
    step_id: str
    skill: str
    input: dict[str, Any]
    attempt: int = 1
    deadline: datetime | None = None
    user_id: str | None = None
    tenant: str | None = None
    """The task's tenant (kill switch rules, tenant budgets)."""
    budget: Budget | None = None
    """The task's budget (enforced across all its steps through the shared counter)."""
    slice_usd: float | None = None
    """This step's share of the dollars left when it was dispatched."""
    traceparent: str | None = None
    replay: StepReplaySource | None = None
    """A step of a replayed or forked task: where its recording is and whether it runs
    again (the worker derives it from the task's submission and plan in the ledger)."""
    context: PlanContext | None = None
    """The earlier turns of the task's conversation (its TaskPlanned's), for the agent's
    model (added to its instructions)."""

    @field_validator("task_id", "step_id", "skill")
    @classmethod
    def _token(cls, v: str) -> str:
        return check_id(v)


def decode_event(raw: bytes | bytearray | str) -> Event:
    """Parse and validate one event; raises pydantic.ValidationError with the reasons
    (bytes refused by `bus.wire.check_json` too, as type `json_invalid`), nothing else."""
    try:
        data = check_json(raw)
    except WireError as e:
        raise wire_validation_error("Event", e) from None
    return EVENT_ADAPTER.validate_json(data)


def encode_event(event: Event) -> bytes:
    """The event's JSON; InvalidEventError if it cannot be, or if `decode_event` would
    refuse it (too deep, too big, ...): nothing the ledger stores is unreadable."""
    try:
        raw = event.model_dump_json(exclude_none=True).encode()
    except (PydanticSerializationError, ValueError, RecursionError) as e:
        raise InvalidEventError(f"event {event.type} cannot be encoded: {e}") from None
    try:
        return check_json(raw)
    except WireError as e:
        raise InvalidEventError(f"event {event.type} would be unreadable: {e.reason}") from None
