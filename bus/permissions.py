"""Least privilege on the bus: one NATS user per role, each allowed only its own subjects.

Pure functions: from the agents and their skill ids they compute every role's publish /
subscribe allow (and deny) lists and render the nats-server `authorization { users =
[...] }` section (plus an env file with each role's NATS_USER / NATS_PASSWORD /
NATS_INBOX_PREFIX). Nothing here talks to a server.

Roles:

- **admin**: the operator's CLI (`jetmesh up` itself, `dlq redrive`, inspection): every
  subject and every `$JS.API` verb (the only role that may update, purge or delete a
  stream, delete a message or another role's consumer), except approvals.
- **approver**: a human's approvals: appends ApprovalGranted / ApprovalDenied on
  `jm.task.<id>.approval` and reads the ledger (the CLI's `approve` / `deny`). No other
  role may write that subject.
- **orchestrator**: its four durable consumers (submit, steps, control, approvals), the
  task events, step lines (its timeouts' failures), control (deadline cancels), every
  skill's work subject, the budgets bucket, a read of the agent registry. It may CREATE
  the streams and buckets when they do not exist, never update, purge or delete them (a
  create with a different configuration on an existing stream is refused by the server).
- **agent-<name>** (one per agent, shared by its replicas): creates (bound by name and
  filter), pulls and acks only its own skills' work consumers (`work-<skill>` on
  JM_WORK), appends to step lines and logs, reads the ledger (direct get), listens to
  control (cancellation) and approval subjects, writes only its own registry keys
  (`$KV.jm-agents.<agent>.>`), reads/writes the budgets bucket, dead-letters only its own
  consumers, sends memory requests.
- **bridge**: the A2A bridge worker, whose skills (external agents') are known only at
  run time: an agent's permissions over every skill (see LIMITS).
- **memory**: answers `jm.memory.*`, its `memory-episodes` consumer on the ledger.
- **gateway**: submits tasks, cancels them, reads and follows the ledger, reads the
  registry; for the dashboard it keeps the `jm-tasks` projection, reads `jm-stats` and
  lists dead letters. It cannot approve.
- **tenants**: the tenant service (bus.tenancy): answers tenant accounts' task reads
  (`jm.tenant.*.tasks.*`: get, and cancel on the task's control subject, checked to be
  the tenant's) from the ledger and copies their tasks' events to
  `jm.tenant.<T>.task.>` (the only role that may publish there).
- **telemetry**: reads the ledger and pulls its own `telemetry` durables on the ledger's
  task subjects and on the steps' logs (traces derived from the ledger); writes only its
  `jm-stats` projection.

JetStream is spoken over core NATS subjects, so every JetStream operation is a subject
here: a publish to a stream is a request (the ack comes back on the caller's inbox), a
KV put is a publish to `$KV.<bucket>.<key>`, a pull is a publish to
`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>` whose messages come back on the inbox, an
ack is a publish to the message's reply subject `$JS.ACK.<stream>.<consumer>.…`.
Consumers are created only with the extended subject
`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>` (the server checks that the body's
name and filter are the subject's), never `CONSUMER.DURABLE.CREATE.<stream>.<name>`
(filter in the body) and, on the work stream, never the unnamed
`CONSUMER.CREATE.<stream>` (an "ephemeral" may carry any name and filter).

What subjects cannot express is in `LIMITS`, each with the reader that enforces it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from jetmesh.bus import subjects

API = subjects.JS_API
ACK = subjects.JS_ACK
FLOW_CONTROL = subjects.JS_FLOW_CONTROL
SHARED_INBOX = subjects.INBOX

ROLE_ADMIN = "admin"
ROLE_APPROVER = "approver"
ROLE_ORCHESTRATOR = "orchestrator"
ROLE_AGENT = "agent"
ROLE_BRIDGE = "bridge"
ROLE_MEMORY = "memory"
ROLE_GATEWAY = "gateway"
ROLE_TELEMETRY = "telemetry"
ROLE_TENANTS = "tenants"
ROLES = (ROLE_ADMIN, ROLE_APPROVER, ROLE_ORCHESTRATOR, ROLE_AGENT, ROLE_BRIDGE, ROLE_MEMORY,
         ROLE_GATEWAY, ROLE_TELEMETRY, ROLE_TENANTS)

JM_STREAMS = (subjects.STREAM_TASKS, subjects.STREAM_LEDGER, subjects.STREAM_LOG,
              subjects.STREAM_WORK, subjects.STREAM_DLQ)
BUCKETS = (subjects.BUCKET_AGENTS, subjects.BUCKET_BUDGETS)

LIMITS = (
    "Ledger reads are a direct get on $JS.API.DIRECT.GET.JM_LEDGER with the subject filter "
    "in the request body: a role allowed to read the ledger (every role) can read every "
    "task's events. Enforced by nobody: the ledger holds no secrets beyond task data.",
    "Step lines (jm.task.<task>.step.<step>) do not name the agent (the skill's agent is "
    "chosen at dispatch): an agent may append to any task's step subject. Its appends are "
    "fenced (Nats-Expected-Last-Subject-Sequence) and validated; the orchestrator's fold "
    "ignores step events not written by the agent holding the step (its claim), so a "
    "forged result or garbage on another agent's step does not complete or break it.",
    "Budget counters are keyed by task id in jm-budgets ($KV.jm-budgets.<task>): every "
    "agent shares one compare-and-set counter per task (that is what keeps replicas of "
    "different agents from overspending together), so an agent may change any task's "
    "counter, or delete it. Keys per agent slice (<task>.<agent>) would scope the writes "
    "but need the orchestrator to split every budget into slices first; not done. The "
    "ledger's ModelCalled events remain the record of what was spent.",
    "Roles that follow a stream with ordered consumers (the gateway on JM_LEDGER; every "
    "registry reader on KV_jm-agents) need the unnamed $JS.API.CONSUMER.CREATE.<stream>, "
    "whose body may name the consumer and its filter: such a role can create an "
    "ephemeral consumer with any name on that stream. It cannot pull or delete another "
    "role's durable (MSG.NEXT and DELETE are not allowed), but could take a durable's "
    "name before its owner first creates it; JM_WORK never allows the unnamed form.",
    "The memory service's episode consumer has several filters, which the create "
    "subject cannot carry ($JS.API.CONSUMER.CREATE.JM_LEDGER.memory-episodes): memory may "
    "set that consumer's filters to any ledger subjects (it reads the ledger anyway).",
    "The bridge serves skills known only at run time (the external agents added with "
    "`jetmesh agents-add`): it may create, pull and ack any skill's work consumer "
    "(work-*) and write any registry key. Run it only where external agents are used.",
    "The orchestrator answers a refused submission on the submitter's inbox (its "
    "Jm-Reply-To header), so it may publish to the gateway's and the admin's inboxes; "
    "it could send them forged replies. Trusted: it writes the task's events anyway.",
    "Task, step and ledger subjects carry no tenant token and every service role serves "
    "every tenant: inside the mesh account NATS cannot keep one tenant's tasks from a "
    "service. Tenants that connect to NATS directly get an account each (`nats-config "
    "--tenants`, bus.tenancy): NATS stamps their tenant on the subject of what they send "
    "(jm.tenant.<T>.…, which no mesh role may publish) and they see only what the mesh "
    "exports to them; the services that answer (orchestrator intake, memory, the tenant "
    "service) scope by that subject's tenant. Tenants behind the gateway are scoped by "
    "a2a/auth (another tenant's task is not found, listings are the caller's). Kill "
    "switch rules (jm-killswitch) are written by the admin alone; "
    "spend counters (jm-spend, <tenant|user>.<who>.<period>) are written by every agent, "
    "like the budget counters: an agent could change another tenant's counter.",
    "Private agents (AgentSpec.tenants) take a tenant's steps from the private work subject "
    "jm.work.<skill>.<tenant>; the users are generated from skills, not specs, so every "
    "agent may consume its own skills' private work of each tenant given to "
    "`nats-config --tenants` (and no other tenant's). The worker consumes only its "
    "spec's tenants' private subjects (a shared agent none) and fails a step of any "
    "other tenant `forbidden` (the submission's tenant, from the ledger).",
    "Legacy consumer creation ($JS.API.CONSUMER.DURABLE.CREATE.<stream>.<durable>) carries "
    "the filter in the body, so it cannot be bound to the skill's subject: a role holding "
    "it could create its own durable on another skill's subject. It is withheld unless "
    "Options(legacy_consumer_create=True) (`jetmesh nats-config --legacy-consumers`).",
)


kv_stream = subjects.kv_stream
kv_subject = subjects.kv_subject


@dataclass(frozen=True)
class Options:
    """Choices that trade compatibility with older clients for tighter permissions."""

    private_inboxes: bool = True
    """Each user gets its own inbox prefix (`_INBOX_<user>`) and may subscribe only there.
    With the shared `_INBOX.>` any user could subscribe to another's inbox and read the
    replies to its pulls (its work). Needs clients connected with `inbox_prefix`."""
    agents_write_control: bool = False
    """Let agents publish on `jm.task.*.control` (cancel tasks). Never approvals: those
    are on `jm.task.*.approval`, which only the approver writes."""
    legacy_consumer_create: bool = False
    """Allow `$JS.API.CONSUMER.DURABLE.CREATE.<stream>.<durable>` for each role's own
    durables (clients that create consumers by durable name only). Off (the default):
    only the filter-bound `$JS.API.CONSUMER.CREATE.<stream>.<durable>.<filter>`."""
    workers_declare: bool = False
    """Let agents create the JM_* streams and buckets when they are missing (normally the
    orchestrator's or the admin's job; a worker then only reads their info). Never
    update, purge or delete."""


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False
    """Also publish to the reply subject of requests received (request/reply services)."""
    publish_deny: tuple[str, ...] = ()
    """Refused even when `publish` allows them (nats-server applies deny after allow)."""

    def as_dict(self) -> dict[str, object]:
        pub: dict[str, object] = {"allow": list(self.publish)}
        if self.publish_deny:
            pub["deny"] = list(self.publish_deny)
        out: dict[str, object] = {
            "publish": pub,
            "subscribe": {"allow": list(self.subscribe)},
        }
        if self.allow_responses:
            out["allow_responses"] = True
        return out

    def may_publish(self, subject: str) -> bool:
        """What the server decides for a publish to the concrete `subject`."""
        return allowed(self.publish, subject) and not allowed(self.publish_deny, subject)

    def may_subscribe(self, subject: str) -> bool:
        """What the server decides for a subscription to `subject` (wildcards allowed):
        it must lie within one allowed pattern."""
        return any(covers(p, subject) for p in self.subscribe)


@dataclass(frozen=True)
class RoleUser:
    """One NATS user: who connects with it, its inbox prefix and what it may do."""

    role: str
    user: str
    inbox_prefix: str
    permissions: Permissions
    agent: str | None = None
    skills: tuple[str, ...] = ()


def _dedupe(items: Iterable[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for i in items:
        seen.setdefault(i, None)
    return tuple(seen)


def user_name(role: str, agent: str | None = None) -> str:
    """The NATS user name of a role (`agent-<name>` for an agent)."""
    if role == ROLE_AGENT:
        if agent is None:
            raise ValueError("an agent user needs the agent's name")
        return f"agent-{subjects.check_id(agent, 'agent name')}"
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    return role


def inbox_prefix(user: str, options: Options | None = None) -> str:
    """The inbox prefix clients of `user` must connect with (`inbox_prefix=` in nats-py)."""
    opts = options or Options()
    return f"{SHARED_INBOX}_{subjects.check_id(user, 'user')}" if opts.private_inboxes \
        else SHARED_INBOX


def _inbox_sub(user: str, opts: Options) -> str:
    return f"{inbox_prefix(user, opts)}.>"


# ----------------------------------------------------------------------------- building blocks


def _api(*tokens: str) -> str:
    return ".".join((API, *tokens))


def stream_info(streams: Iterable[str]) -> list[str]:
    return [_api("STREAM", "INFO", s) for s in streams]


def stream_declare(streams: Iterable[str]) -> list[str]:
    """Read and create (when missing). Never STREAM.UPDATE / DELETE / PURGE: those are the
    admin's, and the server refuses a create that differs from an existing stream."""
    out = []
    for s in streams:
        out += [_api("STREAM", "INFO", s), _api("STREAM", "CREATE", s)]
    return out


def pull_consumer(stream: str, durable: str, filter_subject: str | None, opts: Options
                  ) -> list[str]:
    """Create (bound to its filter), look up, pull, ack and dead-letter one durable."""
    create = (_api("CONSUMER", "CREATE", stream, durable, filter_subject) if filter_subject
              else _api("CONSUMER", "CREATE", stream, durable))
    out = [
        create,
        _api("CONSUMER", "INFO", stream, durable),
        _api("CONSUMER", "MSG", "NEXT", stream, durable),
        # Ack, nak, in-progress and term all publish to the delivered message's reply
        # subject: $JS.ACK.<stream>.<consumer>.<deliveries>.<sseq>.<cseq>.<ts>.<pending>
        # (and, in the newer format, $JS.ACK.<domain>.<account>.<stream>.<consumer>.…).
        f"{ACK}.{stream}.{durable}.>",
        f"{ACK}.*.*.{stream}.{durable}.>",
        subjects.dlq(stream, durable),
    ]
    if opts.legacy_consumer_create:
        out.append(_api("CONSUMER", "DURABLE", "CREATE", stream, durable))
    return out


def ordered_reader(stream: str) -> list[str]:
    """Ephemeral ordered consumers (ledger follow, KV watch): create, info, flow control
    replies. nats-py creates them with the unnamed `CONSUMER.CREATE.<stream>` and never
    deletes them (they go when inactive), so no CONSUMER.DELETE: with it a reader could
    delete another role's durable."""
    return [
        _api("CONSUMER", "CREATE", stream),
        _api("CONSUMER", "INFO", stream, "*"),
        f"{FLOW_CONTROL}.{stream}.>",
    ]


def direct_get(stream: str) -> list[str]:
    """Batched / by-sequence direct gets (body) and last-by-subject gets (subject)."""
    return [_api("DIRECT", "GET", stream), _api("DIRECT", "GET", stream, ">")]


def ledger_reads() -> list[str]:
    """Direct gets on the ledger and on the steps' logs (JM_LOG): every ledger reader
    reads both (bus.ledger merges them)."""
    return direct_get(subjects.STREAM_LEDGER) + direct_get(subjects.STREAM_LOG)


def kv_read(bucket: str, key: str = ">") -> list[str]:
    stream = kv_stream(bucket)
    return [_api("STREAM", "INFO", stream), _api("STREAM", "MSG", "GET", stream),
            _api("DIRECT", "GET", stream, kv_subject(bucket, key))]


def kv_write(bucket: str, key: str = ">") -> list[str]:
    return [kv_subject(bucket, key)]


def _common(user: str, opts: Options) -> tuple[list[str], list[str]]:
    """What every restricted role needs: account info (health checks) and its inbox."""
    return [_api("INFO")], [_inbox_sub(user, opts)]


# ----------------------------------------------------------------------------- roles


def admin_permissions() -> Permissions:
    """Everything but approvals (a human approves as the approver, not as the operator's
    superuser: the audit trail then says an approval came from an approver's login)."""
    return Permissions((">",), (">",), publish_deny=(subjects.ALL_APPROVALS,))


def approver_permissions(options: Options | None = None) -> Permissions:
    """A human's approvals: read the task (its pending approval), write the decision."""
    opts = options or Options()
    pub, sub = _common(ROLE_APPROVER, opts)
    pub += stream_info(JM_STREAMS)  # Client.connect declares (reads) the streams
    pub += ledger_reads()
    pub.append(subjects.ALL_APPROVALS)
    return Permissions(_dedupe(pub), _dedupe(sub))


def _worker_permissions(user: str, agent: str | None, skills: Sequence[str], opts: Options,
                        tenants: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """An agent's (or, with agent None and skills ["*"], the bridge's) lists."""
    pub, sub = _common(user, opts)
    if opts.workers_declare:
        pub += stream_declare([*JM_STREAMS, *(kv_stream(b) for b in BUCKETS)])
    else:
        # Worker.start calls declare_streams: with the streams in place it only reads
        # their info. Buckets: KeyValue lookups read the bucket's stream info.
        pub += stream_info([*JM_STREAMS, *(kv_stream(b) for b in BUCKETS)])
    for skill in skills:
        durable = "*" if skill == "*" else subjects.work_consumer(skill)
        filt = subjects.ANY_WORK if skill == "*" else subjects.work(skill)
        pub += pull_consumer(subjects.STREAM_WORK, durable, filt, opts)
        if skill != "*":  # its skills' private work of the tenants with accounts
            for t in tenants:
                pub += pull_consumer(subjects.STREAM_WORK,
                                     subjects.private_work_consumer(skill, t),
                                     subjects.private_work(skill, t), opts)
    pub += [subjects.ALL_STEP_EVENTS, subjects.ALL_STEP_LOGS]
    if opts.agents_write_control:
        pub.append(subjects.ALL_CONTROL)
    pub += ledger_reads()
    # The registry: write only its own replicas' keys; read it (public cards; the
    # worker health check watches `<agent>.>`).
    pub += kv_write(subjects.BUCKET_AGENTS, f"{agent}.>" if agent else ">")
    pub += kv_read(subjects.BUCKET_AGENTS)
    pub += ordered_reader(kv_stream(subjects.BUCKET_AGENTS))
    pub += kv_read(subjects.BUCKET_BUDGETS) + kv_write(subjects.BUCKET_BUDGETS)
    # The tool-result cache (agents.toolcache), created by the first worker that caches.
    # Trust: like the budget counters, one bucket every agent writes (a shared entry one
    # agent poisons is read by the others); only read-only tools opt in.
    pub += stream_declare([kv_stream(subjects.BUCKET_TOOL_CACHE)])
    pub += kv_read(subjects.BUCKET_TOOL_CACHE) + kv_write(subjects.BUCKET_TOOL_CACHE)
    # The kill switch (bus.killswitch): read and watched, created empty when missing,
    # never written (rules are the admin's).
    killswitch = kv_stream(subjects.BUCKET_KILLSWITCH)
    pub += stream_declare([killswitch]) + kv_read(subjects.BUCKET_KILLSWITCH)
    pub += ordered_reader(killswitch)
    # Spend counters per tenant and user (bus.spendcaps): the budgets bucket's trust.
    pub += stream_declare([kv_stream(subjects.BUCKET_SPEND)])
    pub += kv_read(subjects.BUCKET_SPEND) + kv_write(subjects.BUCKET_SPEND)
    pub.append(subjects.MEMORY_ALL)
    sub.append(subjects.ALL_CONTROL)  # cancellation
    sub.append(subjects.ALL_APPROVALS)  # approval decisions (the guard waits for them)
    return pub, sub


def agent_permissions(agent: str, skills: Sequence[str], options: Options | None = None,
                      tenants: Sequence[str] = ()) -> Permissions:
    """An agent's replicas: only their own skills' work (and, for `tenants`, their
    skills' private work subjects, which a private agent of such a tenant serves), step
    appends, their registry keys."""
    opts = options or Options()
    for s in skills:
        subjects.check_id(s, "skill")
    pub, sub = _worker_permissions(user_name(ROLE_AGENT, agent), agent, skills, opts,
                                   tenants)
    return Permissions(_dedupe(pub), _dedupe(sub))


def bridge_permissions(options: Options | None = None) -> Permissions:
    """The A2A bridge: an agent over every skill (its skills are known at run time)."""
    opts = options or Options()
    pub, sub = _worker_permissions(ROLE_BRIDGE, None, ["*"], opts)
    ext = kv_stream(subjects.BUCKET_EXTERNAL)
    pub += kv_read(subjects.BUCKET_EXTERNAL) + stream_declare([ext]) + ordered_reader(ext)
    return Permissions(_dedupe(pub), _dedupe(sub))


def orchestrator_permissions(options: Options | None = None) -> Permissions:
    opts = options or Options()
    pub, sub = _common(ROLE_ORCHESTRATOR, opts)
    pub += stream_declare([*JM_STREAMS, *(kv_stream(b) for b in BUCKETS)])
    pub += pull_consumer(subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_SUBMIT,
                         subjects.SUBMIT, opts)
    pub += pull_consumer(subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_TENANT_SUBMIT,
                         subjects.ALL_TENANT_SUBMITS, opts)
    pub += pull_consumer(subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_STEPS,
                         subjects.ALL_STEP_EVENTS, opts)
    pub += pull_consumer(subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_CONTROL,
                         subjects.ALL_CONTROL, opts)
    pub += pull_consumer(subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_APPROVALS,
                         subjects.ALL_APPROVALS, opts)
    pub.append(subjects.ANY_WORK)  # step commands of every skill
    pub.append(subjects.ANY_PRIVATE_WORK)  # ... and for tenants' private agents
    # A refused submission is answered on the submitter's inbox (its Jm-Reply-To
    # header): the inboxes of the roles that submit (the gateway, the operator's CLI).
    pub += [_inbox_sub(r, opts) for r in (ROLE_GATEWAY, ROLE_ADMIN)]
    # Its own events, a step's failure on timeout (the step's line), deadline cancels.
    pub += [subjects.ALL_TASK_EVENTS, subjects.ALL_STEP_EVENTS, subjects.ALL_CONTROL]
    pub += ledger_reads()
    pub += kv_read(subjects.BUCKET_AGENTS) + ordered_reader(kv_stream(subjects.BUCKET_AGENTS))
    pub += kv_read(subjects.BUCKET_BUDGETS) + kv_write(subjects.BUCKET_BUDGETS)
    # The tasks of each conversation context (orchestrator.context).
    pub += stream_declare([kv_stream(subjects.BUCKET_CONTEXTS)]) \
        + kv_read(subjects.BUCKET_CONTEXTS) + kv_write(subjects.BUCKET_CONTEXTS)
    # Health of the workers' consumers (`jetmesh health`, dashboards).
    pub.append(_api("CONSUMER", "INFO", subjects.STREAM_WORK, "*"))
    # The sweep of work no consumer takes (bus.sweep): list the work stream's consumers,
    # read such a message, keep it as a dead letter, then delete it from the work stream
    # (the only stream it may delete from).
    # Each skill's work consumer, made before its first dispatch (so a step waits for
    # agents not up yet): by name, filtered on a work subject, never another form.
    pub.append(_api("CONSUMER", "CREATE", subjects.STREAM_WORK, "*", subjects.ANY_WORK))
    pub += [_api("CONSUMER", "LIST", subjects.STREAM_WORK),
            _api("STREAM", "MSG", "GET", subjects.STREAM_WORK),
            _api("STREAM", "MSG", "DELETE", subjects.STREAM_WORK),
            subjects.dlq(subjects.STREAM_WORK, subjects.DLQ_UNCONSUMED)]
    return Permissions(_dedupe(pub), _dedupe(sub))


def memory_permissions(options: Options | None = None) -> Permissions:
    opts = options or Options()
    pub, sub = _common(ROLE_MEMORY, opts)
    pub += stream_info(JM_STREAMS)
    # A multi-filter consumer: its create subject cannot carry the filters.
    pub += pull_consumer(subjects.STREAM_LEDGER, subjects.CONSUMER_MEMORY_EPISODES, None, opts)
    pub += ledger_reads()
    pub.append(subjects.MEMORY_ALL)  # its own health probe
    sub += [subjects.MEMORY_ALL, subjects.ALL_TENANT_MEMORY]  # tenant accounts' requests
    return Permissions(_dedupe(pub), _dedupe(sub), allow_responses=True)


def tenants_permissions(options: Options | None = None) -> Permissions:
    """The tenant service (bus.tenancy.TenantService): reads and follows the ledger,
    answers tenant accounts' task reads and writes the copies of their tasks' events."""
    opts = options or Options()
    pub, sub = _common(ROLE_TENANTS, opts)
    pub += stream_info(JM_STREAMS)
    pub += ledger_reads() + ordered_reader(subjects.STREAM_LEDGER)
    pub.append(subjects.ALL_TENANT_TASK_EVENTS)
    pub.append(subjects.ALL_CONTROL)  # a tenant's cancel of its own task (jm.tasks.cancel)
    sub.append(subjects.ALL_TENANT_TASK_OPS)
    return Permissions(_dedupe(pub), _dedupe(sub), allow_responses=True)


def telemetry_permissions(options: Options | None = None) -> Permissions:
    """The telemetry role: reads the ledger (direct get) and pulls its own durables over
    the task subjects and the steps' logs. It writes no ledger subject: only its dead letters and
    the per-task records of the `jm-stats` bucket."""
    opts = options or Options()
    pub, sub = _common(ROLE_TELEMETRY, opts)
    pub += stream_info(JM_STREAMS)
    pub += pull_consumer(subjects.STREAM_LEDGER, subjects.CONSUMER_TELEMETRY,
                         subjects.TELEMETRY_SUBJECT, opts)
    pub += pull_consumer(subjects.STREAM_LOG, subjects.CONSUMER_TELEMETRY,
                         subjects.TELEMETRY_LOG_SUBJECT, opts)
    pub += ledger_reads()
    # Its projection of finished tasks (`jetmesh stats`): created when missing, written.
    pub += stream_declare([kv_stream(subjects.BUCKET_STATS)])
    pub += kv_read(subjects.BUCKET_STATS) + kv_write(subjects.BUCKET_STATS, "task.*")
    return Permissions(_dedupe(pub), _dedupe(sub))


def gateway_permissions(options: Options | None = None) -> Permissions:
    opts = options or Options()
    pub, sub = _common(ROLE_GATEWAY, opts)
    pub += stream_info(JM_STREAMS)  # Client.connect declares (reads) the streams
    pub.append(subjects.SUBMIT)
    pub.append(subjects.ALL_CONTROL)  # cancel over A2A (never approvals)
    pub += ledger_reads() + ordered_reader(subjects.STREAM_LEDGER)
    pub += ordered_reader(subjects.STREAM_LOG)
    pub += kv_read(subjects.BUCKET_AGENTS) + ordered_reader(kv_stream(subjects.BUCKET_AGENTS))
    # The dashboard (a2a/ui): it projects task summaries into jm-tasks and watches them,
    # reads the stats projection and lists dead letters. (Approvals and redrives use
    # the approver's and the admin's own logins, never this user.)
    tasks_kv = kv_stream(subjects.BUCKET_TASKS)
    pub += stream_declare([tasks_kv]) + kv_read(subjects.BUCKET_TASKS)
    pub += kv_write(subjects.BUCKET_TASKS) + ordered_reader(tasks_kv)
    pub += kv_read(subjects.BUCKET_STATS) + ordered_reader(kv_stream(subjects.BUCKET_STATS))
    pub += direct_get(subjects.STREAM_DLQ)
    # A2A push notifications (a2a/push): the configs and delivery cursors it keeps.
    push_kv = kv_stream(subjects.BUCKET_A2A_PUSH)
    pub += stream_declare([push_kv]) + kv_read(subjects.BUCKET_A2A_PUSH)
    pub += kv_write(subjects.BUCKET_A2A_PUSH) + ordered_reader(push_kv)  # watch: lease, configs
    return Permissions(_dedupe(pub), _dedupe(sub))


def plan(agents: Mapping[str, Sequence[str]], options: Options | None = None,
         tenants: Sequence[str] = ()) -> list[RoleUser]:
    """Every user of a deployment: admin, approver, orchestrator, memory, gateway, bridge,
    one per agent."""
    opts = options or Options()

    def fixed(role: str, perms: Permissions) -> RoleUser:
        return RoleUser(role, role, inbox_prefix(role, opts), perms)

    users = [
        fixed(ROLE_ADMIN, admin_permissions()),
        fixed(ROLE_APPROVER, approver_permissions(opts)),
        fixed(ROLE_ORCHESTRATOR, orchestrator_permissions(opts)),
        fixed(ROLE_MEMORY, memory_permissions(opts)),
        fixed(ROLE_GATEWAY, gateway_permissions(opts)),
        fixed(ROLE_BRIDGE, bridge_permissions(opts)),
        fixed(ROLE_TELEMETRY, telemetry_permissions(opts)),
        fixed(ROLE_TENANTS, tenants_permissions(opts)),
    ]
    for agent in sorted(agents):
        skills = tuple(agents[agent])
        user = user_name(ROLE_AGENT, agent)
        users.append(RoleUser(ROLE_AGENT, user, inbox_prefix(user, opts),
                              agent_permissions(agent, skills, opts, tenants), agent,
                              skills))
    return users


# ----------------------------------------------------------------------------- rendering


def generate_passwords(users: Iterable[RoleUser], nbytes: int = 24) -> dict[str, str]:
    """A fresh random password per user."""
    return {u.user: secrets.token_urlsafe(nbytes) for u in users}


@dataclass(frozen=True)
class AuthConfig:
    """The users of a deployment and their passwords, ready to render."""

    users: tuple[RoleUser, ...]
    passwords: Mapping[str, str] = field(default_factory=dict)
    tenants: tuple[str, ...] = ()
    """Tenants with a NATS account of their own (bus.tenancy); their users' passwords are
    in `passwords` too. None: one account, the mesh's users only (`authorization`)."""

    @classmethod
    def create(cls, agents: Mapping[str, Sequence[str]], options: Options | None = None,
               passwords: Mapping[str, str] | None = None,
               tenants: Iterable[str] = ()) -> AuthConfig:
        from jetmesh.bus import tenancy

        names = tenancy.check_tenants(tenants)
        users = tuple(plan(agents, options, names))
        given = dict(passwords or {})
        fresh = generate_passwords(u for u in users if u.user not in given)
        return cls(users, {**fresh, **given, **tenancy.tenant_passwords(names, given)},
                   names)

    def user(self, user: str) -> RoleUser:
        for u in self.users:
            if u.user == user:
                return u
        raise KeyError(user)

    def agent(self, name: str) -> RoleUser:
        return self.user(user_name(ROLE_AGENT, name))

    def server_config(self) -> str:
        """The nats-server `authorization` section (append it to the server config); with
        tenants, an `accounts` section: the mesh's users in one account, one per tenant."""
        if self.tenants:
            from jetmesh.bus import tenancy

            return tenancy.render_accounts(render_users(self.users, self.passwords),
                                           self.tenants, self.passwords)
        return render_authorization(self.users, self.passwords)

    def env(self, user: str, url: str | None = None) -> str:
        return render_env(self.user(user), self.passwords[user], url)

    def env_file(self, url: str | None = None) -> str:
        blocks = ["# jetmesh bus credentials, one block per role. Keep this file secret.\n"
                  "# Give each process the block of its role (e.g. an env file per role)."]
        for u in self.users:
            head = f"# --- {u.role}" + (f" {u.agent} ({', '.join(u.skills)})" if u.agent else "")
            blocks.append(head + "\n" + self.env(u.user, url))
        if self.tenants:
            from jetmesh.bus import tenancy

            blocks += [tenancy.render_tenant_env(t, self.passwords[tenancy.tenant_user(t)],
                                                 url) for t in self.tenants]
        return "\n\n".join(blocks) + "\n"


def _q(s: str) -> str:
    # JSON strings are valid nats-server config strings ($ inside quotes is literal).
    return json.dumps(s)


def render_authorization(users: Sequence[RoleUser], passwords: Mapping[str, str]) -> str:
    lines = ["# jetmesh: one user per role, each allowed only its own subjects.",
             "# Generated by `jetmesh nats-config`; regenerate when agents or skills change.",
             "authorization {"]
    lines += ["  " + line for line in render_users(users, passwords).rstrip().splitlines()]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_users(users: Sequence[RoleUser], passwords: Mapping[str, str]) -> str:
    """The `users = [...]` list of the roles (inside `authorization` or an account)."""
    lines = ["  users = ["]
    for u in users:
        lines.append("    {")
        lines.append(f"      # {u.role}" + (f": agent {u.agent}, skills "
                                              f"{', '.join(u.skills)}" if u.agent else ""))
        lines.append(f"      user: {_q(u.user)}")
        lines.append(f"      password: {_q(passwords[u.user])}")
        p = u.permissions
        lines.append("      permissions: {")
        lines.append("        publish: {")
        lines.append("          allow: [")
        lines += [f"            {_q(x)}," for x in p.publish]
        lines.append("          ]")
        if p.publish_deny:
            lines.append("          deny: [")
            lines += [f"            {_q(x)}," for x in p.publish_deny]
            lines.append("          ]")
        lines.append("        }")
        lines.append("        subscribe: { allow: [")
        lines += [f"          {_q(x)}," for x in p.subscribe]
        lines.append("        ] }")
        if p.allow_responses:
            lines.append("        allow_responses: true")
        lines.append("      }")
        lines.append("    }")
    lines.append("  ]")
    return "\n".join(line[2:] for line in lines) + "\n"


def render_env(user: RoleUser, password: str, url: str | None = None) -> str:
    """Env lines for one role's processes (BusSettings reads NATS_USER / NATS_PASSWORD)."""
    out = []
    if url:
        out.append(f"NATS_URL={url}")
    out += [f"NATS_USER={user.user}", f"NATS_PASSWORD={password}",
            f"NATS_INBOX_PREFIX={user.inbox_prefix}"]
    return "\n".join(out)


def allowed(patterns: Iterable[str], subject: str) -> bool:
    """True when `subject` matches one of the NATS subject `patterns` (for checks/tests)."""
    toks = subject.split(".")
    for pat in patterns:
        p = pat.split(".")
        ok = True
        for i, t in enumerate(p):
            if t == ">":
                ok = len(toks) > i
                break
            if i >= len(toks) or (t != "*" and t != toks[i]):
                ok = False
                break
        else:
            ok = len(toks) == len(p)
        if ok:
            return True
    return False


def covers(pattern: str, subject: str) -> bool:
    """True when every subject `subject` (which may hold wildcards) can match also matches
    `pattern`: how nats-server judges a subscription against an allow pattern."""
    p, t = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(t) > i
        if i >= len(t) or t[i] == ">":
            return False
        if tok != "*" and (tok != t[i]):
            return False
    return len(t) == len(p)
