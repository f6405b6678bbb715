"""Every NATS subject, stream, consumer and bucket name jetmesh uses: constants and builders.

No other module spells a subject. Task and step ids are validated here so that a
caller-supplied id can never inject wildcards or extra tokens into a subject.
"""

from __future__ import annotations

import re

PREFIX = "jm"

# Streams
STREAM_TASKS = "JM_TASKS"
"""Inbound task submissions (limits retention, kept for audit)."""
STREAM_LEDGER = "JM_LEDGER"
"""Every task's events: the single source of truth."""
STREAM_WORK = "JM_WORK"
"""Step commands per skill (work-queue retention: each message is consumed once)."""
STREAM_DLQ = "JM_DLQ"
"""Dead letters: messages a consumer could not process, with the reason."""
STREAM_LOG = "JM_LOG"
"""The steps' logs (model calls, read-only tool calls, first-delivery starts): records
whose loss costs at most a repeated model call, so under the balanced durability their
acks do not wait for an fsync (`persist_mode: async`). Readers see them merged with the
ledger (bus.ledger)."""

# Subjects
SUBMIT = f"{PREFIX}.task.submit"
TENANT_PREFIX = f"{PREFIX}.tenant"
"""Subjects a tenant's NATS account reaches through the mesh account's exports, each with
the tenant's id as its third token (bus.tenancy): NATS stamps the tenant, not the sender."""
ALL_TENANT_SUBMITS = f"{TENANT_PREFIX}.*.submit"
"""Submissions of tenants connected to NATS directly (`tenant_submit`)."""
TASKS_SUBJECTS = [SUBMIT, ALL_TENANT_SUBMITS]
LEDGER_SUBJECTS = [f"{PREFIX}.task.*.events", f"{PREFIX}.task.*.step.*",
                   f"{PREFIX}.task.*.control", f"{PREFIX}.task.*.approval"]
WORK_SUBJECTS = [f"{PREFIX}.work.>"]
ANY_WORK = f"{PREFIX}.work.*"
"""Every skill's work subject (one token per skill)."""
DLQ_UNCONSUMED = "unconsumed"
"""The DLQ consumer name of work no consumer takes (bus.sweep): jm.dlq.JM_WORK.unconsumed."""
DLQ_SUBJECTS = [f"{PREFIX}.dlq.>"]
ALL_LEDGER = f"{PREFIX}.task.*.>"
ALL_TASK_EVENTS = f"{PREFIX}.task.*.events"
ALL_STEP_EVENTS = f"{PREFIX}.task.*.step.*"
"""Every step's fenced line: claims, side effects, approvals, results (not the logs)."""
ALL_STEP_LOGS = f"{PREFIX}.task.*.step.*.log"
"""Every step's log: its model calls and read-only tool calls (stream JM_LOG)."""
LOG_SUBJECTS = [ALL_STEP_LOGS]
ALL_CONTROL = f"{PREFIX}.task.*.control"
"""Every task's control subject: cancellation (anyone who may submit may cancel)."""
ALL_APPROVALS = f"{PREFIX}.task.*.approval"
"""Every task's approval subject: human decisions on gated tool calls. A subject of its
own so that NATS permissions give it to the approver role alone (the gateway, which may
cancel, cannot approve)."""
ALL_DLQ = f"{PREFIX}.dlq.>"

# Durable consumer names
CONSUMER_ORCH_SUBMIT = "orchestrator-submit"
CONSUMER_ORCH_STEPS = "orchestrator-steps"
CONSUMER_ORCH_CONTROL = "orchestrator-control"
CONSUMER_ORCH_APPROVALS = "orchestrator-approvals"
CONSUMER_ORCH_TENANT_SUBMIT = "orchestrator-tenant-submit"
"""The orchestrator's durable over tenants' own submissions (`ALL_TENANT_SUBMITS`)."""

# Memory service (core request/reply)
MEMORY_PREFIX = f"{PREFIX}.memory"
CONSUMER_MEMORY_EPISODES = "memory-episodes"
"""The memory service's durable consumer over the ledger (episodes)."""
MEMORY_ALL = f"{MEMORY_PREFIX}.*"
"""Every memory operation's request subject (the service subscribes to all of them)."""
MEMORY_QUEUE = "memory-service"
"""Queue group of the memory service's request subscriptions (one instance answers)."""
MEMORY_EPISODE_SUBJECTS = [ALL_TASK_EVENTS, ALL_STEP_EVENTS]
"""Ledger subjects the memory service follows to record episodes."""

# Telemetry (traces derived from the ledger)
CONSUMER_TELEMETRY = "telemetry"
"""The telemetry role's durable consumers (one name on JM_LEDGER and on JM_LOG)."""
TELEMETRY_SUBJECT = ALL_LEDGER
"""What the telemetry role follows on JM_LEDGER: every task's records (it builds each
task's spans from what it was delivered)."""
TELEMETRY_LOG_SUBJECT = ALL_STEP_LOGS
"""What the telemetry role follows on JM_LOG: every step's log."""

# KV buckets
BUCKET_AGENTS = "jm-agents"
BUCKET_BUDGETS = "jm-budgets"
BUCKET_STATS = "jm-stats"
"""One record per finished task (`task.<task_id>`), written by the telemetry role."""
BUCKET_TOOL_CACHE = "jm-toolcache"
"""Cached results of read-only tools (agents.toolcache), keyed by scope and call hash."""
BUCKET_TASKS = "jm-tasks"
"""Task summaries and pending approvals (`task.<task_id>`), projected from the ledger
(orchestrator.tasks_kv); listings read these, not the ledger."""
BUCKET_A2A_PUSH = "jm-a2a-push"
"""The A2A gateway's push-notification configs (`cfg.<task>.<id>`) and their delivery
cursors (`cur.<task>.<id>`: the last ledger sequence the webhook accepted), and the
delivery lease (`lease`: which gateway delivers)."""
BUCKET_CONTEXTS = "jm-contexts"
"""The tasks of each conversation context (`<tenant>.<context>`: task ids in planning
order), so a task can be given the earlier turns of its context (orchestrator.context)."""
BUCKET_EXTERNAL = "jm-external-agents"
"""External A2A agents added by URL (their fetched cards), served by the bridge worker."""
BUCKET_SPEND = "jm-spend"
"""Daily and monthly spend counters per tenant and per user (bus.spendcaps), compare-and-
set like jm-budgets. Keys from `spend_key`."""
BUCKET_KILLSWITCH = "jm-killswitch"
"""Disabled tools, agents and MCP servers (bus.killswitch): the admin writes, every worker
replica watches. Keys from `killswitch_key`."""

# NATS and JetStream protocol subjects jetmesh uses directly
JS_API = "$JS.API"
JS_ACK = "$JS.ACK"
JS_FLOW_CONTROL = "$JS.FC"
KV_PREFIX = "$KV"
INBOX = "_INBOX"


def kv_stream(bucket: str) -> str:
    """The stream behind a KV bucket."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str = ">") -> str:
    """Where a KV put / delete of `key` is published (`>`: every key)."""
    return f"{KV_PREFIX}.{bucket}.{key}"


def direct_get(stream: str, last_by_subject: str | None = None) -> str:
    """JetStream direct get on `stream` (batched with a JSON body, or the last message on
    `last_by_subject`)."""
    base = f"{JS_API}.DIRECT.GET.{stream}"
    return f"{base}.{last_by_subject}" if last_by_subject else base


def stream_info_api(api_prefix: str, stream: str) -> str:
    """Where a stream's info (its config and state: last sequence) is asked."""
    return f"{api_prefix}.STREAM.INFO.{stream}"


def consumer_next(api_prefix: str, stream: str, durable: str) -> str:
    """Where a pull request for a durable consumer's next messages goes."""
    return f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"


_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class InvalidIdError(ValueError):
    """An id that cannot be used as one subject token."""


def check_id(value: str, what: str = "id") -> str:
    """Return `value` if it is a safe single subject token, else raise InvalidIdError.

    The whole value must match (`fullmatch`: `$` alone would let a trailing newline
    through); anything but a str is refused the same way. The message shows at most
    40 characters of the value, escaped, so it is always safe to log and to store."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        shown = ascii(value)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        raise InvalidIdError(
            f"{what} {shown} must be 1-128 characters of letters, digits, '_' or '-'"
        )
    return value


def task_events(task_id: str) -> str:
    """The subject of a task's own events (the orchestrator writes)."""
    return f"{PREFIX}.task.{check_id(task_id, 'task id')}.events"


def step_events(task_id: str, step_id: str) -> str:
    """The subject of one step's events (the worker running it writes)."""
    return f"{PREFIX}.task.{check_id(task_id, 'task id')}.step.{check_id(step_id, 'step id')}"


def step_log(task_id: str, step_id: str) -> str:
    """The subject of one step's log: its model calls and read-only tool calls.

    These records are appended unfenced and pipelined, so they live beside the step's
    fenced line (`step_events`) and never move its expected sequence; the orchestrator,
    which only acts on a step's results, is not delivered them."""
    return f"{step_events(task_id, step_id)}.log"


def task_control(task_id: str) -> str:
    """Cancellation of one task."""
    return f"{PREFIX}.task.{check_id(task_id, 'task id')}.control"


def task_approval(task_id: str) -> str:
    """Approve / deny decisions for one task's gated tool calls (the approver writes)."""
    return f"{PREFIX}.task.{check_id(task_id, 'task id')}.approval"


def task_all(task_id: str) -> str:
    """Wildcard over everything a task wrote to the ledger."""
    return f"{PREFIX}.task.{check_id(task_id, 'task id')}.>"


def task_logs(task_id: str) -> str:
    """Wildcard over a task's steps' logs (stream JM_LOG)."""
    return f"{PREFIX}.task.{check_id(task_id, 'task id')}.step.*.log"


def task_decisions(task_id: str) -> list[str]:
    """Wildcards over a task's ledger subjects except its steps' logs: its own events,
    its control and approval subjects and its steps' fenced lines (claims, side effects,
    results)."""
    t = check_id(task_id, "task id")
    return [f"{PREFIX}.task.{t}.*", f"{PREFIX}.task.{t}.step.*"]


def work(skill: str) -> str:
    """The work subject of one skill."""
    return f"{PREFIX}.work.{check_id(skill, 'skill')}"


def work_consumer(skill: str) -> str:
    """The durable pull consumer every replica serving `skill` shares."""
    return f"work-{check_id(skill, 'skill')}"


ANY_PRIVATE_WORK = f"{PREFIX}.work.*.*"
"""Every private work subject (`private_work`)."""


def private_work(skill: str, tenant: str) -> str:
    """The work subject of `skill` for the agents private to `tenant` (AgentSpec.tenants):
    the orchestrator dispatches a tenant's step here when such an agent is live, and
    shared agents never consume it (nor private agents the shared `work(skill)`)."""
    return f"{PREFIX}.work.{check_id(skill, 'skill')}.{check_id(tenant, 'tenant')}"


def is_private_work(subject: str) -> bool:
    """Whether `subject` is a private work subject (`jm.work.<skill>.<tenant>`)."""
    parts = subject.split(".")
    return len(parts) == 4 and parts[0] == PREFIX and parts[1] == "work"


def private_work_consumer(skill: str, tenant: str) -> str:
    """The durable the replicas of `tenant`'s private agents serving `skill` share."""
    return f"work-{check_id(skill, 'skill')}--{check_id(tenant, 'tenant')}"


def memory(op: str) -> str:
    """Request subject of one memory operation (add, search, get, forget)."""
    return f"{MEMORY_PREFIX}.{check_id(op, 'memory op')}"


def dlq(stream: str, consumer: str) -> str:
    """Dead-letter subject for messages of `consumer` on `stream`."""
    return f"{PREFIX}.dlq.{stream}.{consumer}"


def spend_key(scope: str, who: str, period: str) -> str:
    """The `jm-spend` key of one period counter: `<tenant|user>.<who>.<d20261204|m202612>`."""
    if scope not in ("tenant", "user"):
        raise InvalidIdError(f"spend scope {scope!r} must be tenant or user")
    return f"{scope}.{check_id(who, scope)}.{check_id(period, 'period')}"


KILLSWITCH_ANY = "="
"""The `killswitch_key` token for "every agent" / "every tenant" (never a valid id)."""


def killswitch_key(kind: str, name: str, agent: str | None = None,
                   tenant: str | None = None) -> str:
    """The `jm-killswitch` key of one rule: `<kind>.<name>.<agent|=>.<tenant|=>`."""
    if kind not in ("tool", "agent", "server"):
        raise InvalidIdError(f"kill switch kind {kind!r} must be tool, agent or server")
    return ".".join([kind, check_id(name, "name"),
                     KILLSWITCH_ANY if agent is None else check_id(agent, "agent"),
                     KILLSWITCH_ANY if tenant is None else check_id(tenant, "tenant")])


def task_id_of(subject: str) -> str | None:
    """The task id in a ledger subject, or None (also when the token there is not a
    valid id: anyone may publish on a wildcard's subjects, and an id taken from one must
    be as safe as one that passed `check_id`)."""
    parts = subject.split(".")
    if len(parts) >= 4 and parts[0] == PREFIX and parts[1] == "task" \
            and _ID.fullmatch(parts[2]):
        return parts[2]
    return None


def step_id_of(subject: str) -> str | None:
    """The step id in a step's line or log subject, or None (or if it is not a valid id)."""
    parts = subject.split(".")
    if (len(parts) == 5 or (len(parts) == 6 and parts[5] == "log")) and parts[3] == "step" \
            and _ID.fullmatch(parts[4]):
        return parts[4]
    return None


def is_step_log(subject: str) -> bool:
    """Whether `subject` is a step's log (not its fenced line)."""
    return subject.endswith(".log") and step_id_of(subject) is not None


# ----------------------------------------------------------------------------- tenants
# A tenant connected to NATS directly has an account of its own (bus.tenancy). It sees the
# mesh's usual names (`jm.task.submit`, `jm.memory.<op>`, `jm.task.<task>.>`, `jm.tasks.<op>`)
# and its imports map them to the mesh account's per-tenant subjects below.

ALL_TENANT_MEMORY = f"{TENANT_PREFIX}.*.memory.*"
"""Memory requests of every tenant account (the memory service scopes them by tenant)."""
ALL_TENANT_TASK_OPS = f"{TENANT_PREFIX}.*.tasks.*"
"""Task reads of every tenant account (bus.tenancy.TenantService answers)."""
ALL_TENANT_TASK_EVENTS = f"{TENANT_PREFIX}.*.task.>"
"""The live copy of tenant tasks' ledger events (bus.tenancy.TenantService writes)."""
TENANT_QUEUE = "tenant-service"
"""Queue group of the tenant service's request subscription."""
TASK_OPS = f"{PREFIX}.tasks"
"""A tenant account's name for its task reads (`jm.tasks.<op>`, imported)."""


def tenant_submit(tenant: str) -> str:
    """Where tenant `tenant`'s account's `jm.task.submit` lands in the mesh account."""
    return f"{TENANT_PREFIX}.{check_id(tenant, 'tenant')}.submit"


def tenant_memory(tenant: str, op: str = "*") -> str:
    """Where a tenant account's `jm.memory.<op>` lands in the mesh account."""
    op_token = op if op == "*" else check_id(op, "memory op")
    return f"{TENANT_PREFIX}.{check_id(tenant, 'tenant')}.memory.{op_token}"


def tenant_task_ops(tenant: str, op: str = "*") -> str:
    """Where a tenant account's `jm.tasks.<op>` (get) lands in the mesh account."""
    op_token = op if op == "*" else check_id(op, "task op")
    return f"{TENANT_PREFIX}.{check_id(tenant, 'tenant')}.tasks.{op_token}"


def tenant_task_events(tenant: str, ledger_subject: str | None = None) -> str:
    """The mesh account's copy, for tenant `tenant`, of a ledger subject of one of its
    tasks (`jm.task.<task>....` -> `jm.tenant.<tenant>.task.<task>....`); without a
    subject the wildcard over all of them (the tenant account's import)."""
    t = check_id(tenant, "tenant")
    if ledger_subject is None:
        return f"{TENANT_PREFIX}.{t}.task.>"
    if task_id_of(ledger_subject) is None:
        raise InvalidIdError(f"{ascii(ledger_subject)[:40]} is not a task's ledger subject")
    return f"{TENANT_PREFIX}.{t}.{ledger_subject[len(PREFIX) + 1:]}"


def tenant_of(subject: str) -> str | None:
    """The tenant token of a `jm.tenant.<tenant>.…` subject, or None (also when it is not
    a valid id)."""
    parts = subject.split(".")
    if len(parts) >= 4 and f"{parts[0]}.{parts[1]}" == TENANT_PREFIX \
            and _ID.fullmatch(parts[2]):
        return parts[2]
    return None
