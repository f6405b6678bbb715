"""Least privilege on the bus: one NATS user per role, each allowed only its own subjects.

Pure functions: from the agents and their skill ids they compute every role's publish /
subscribe allow lists and render the nats-server `authorization { users = [...] }`
section (plus an env file with each role's NATS_USER / NATS_PASSWORD). Nothing here
talks to a server.

Roles:

- **admin**: everything (the operator's CLI: declares streams and buckets, `jetmesh
  dlq redrive`, `approve`/`deny`, inspection).
- **orchestrator**: its three durable consumers, the ledger (task, step and control
  subjects), every skill's work subject, the budgets bucket, a read of the agent
  registry; it may declare the streams and buckets.
- **agent-<name>** (one per agent, shared by its replicas): pulls and acks only its own
  skills' work consumers (`work-<skill>` on JM_WORK), appends to step subjects, reads the
  ledger (direct get) and listens to control subjects (cancellation, approvals), writes
  only its own registry keys (`$KV.jm-agents.<agent>.>`), reads/writes the budgets
  bucket, dead-letters only its own consumers, sends memory requests.
- **memory**: answers `jm.memory.*`, its `memory-episodes` consumer on the ledger.
- **gateway**: submits tasks, cancels them, reads and follows the ledger, reads the
  registry.

JetStream is spoken over core NATS subjects, so every JetStream operation is a subject
here: a publish to a stream is a request (the ack comes back on the caller's inbox), a
KV put is a publish to `$KV.<bucket>.<key>`, a pull is a publish to
`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>` whose messages come back on the inbox, an
ack is a publish to the message's reply subject `$JS.ACK.<stream>.<consumer>.…`.

What subjects cannot express (see the notes in `LIMITS`): a ledger direct get names the
stream, not the subject (the filter is in the body), so a role that reads the ledger
reads all of it; step subjects carry task and step ids, not the agent, so an agent may
append to any step subject; budget keys are task ids, so an agent may change any task's
counter.
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
ROLE_ORCHESTRATOR = "orchestrator"
ROLE_AGENT = "agent"
ROLE_MEMORY = "memory"
ROLE_GATEWAY = "gateway"

JM_STREAMS = (subjects.STREAM_TASKS, subjects.STREAM_LEDGER, subjects.STREAM_WORK,
              subjects.STREAM_DLQ)
BUCKETS = (subjects.BUCKET_AGENTS, subjects.BUCKET_BUDGETS)

LIMITS = (
    "Ledger reads are a direct get on $JS.API.DIRECT.GET.JM_LEDGER with the subject filter "
    "in the request body: a role allowed to read the ledger can read every task's events.",
    "Step subjects (jm.task.<task>.step.<step>) do not name the agent: an agent may append "
    "to any step subject (appends are still fenced and validated).",
    "Budget counters are keyed by task id: an agent may update any task's counter.",
    "Legacy consumer creation ($JS.API.CONSUMER.DURABLE.CREATE.<stream>.<durable>) carries "
    "the filter in the body, so it cannot be bound to the skill's subject; allow it only "
    "until the runtime creates consumers by name (legacy_consumer_create=False).",
)


kv_stream = subjects.kv_stream
kv_subject = subjects.kv_subject


@dataclass(frozen=True)
class Options:
    """Choices that trade compatibility with the current runtime for tighter permissions."""

    private_inboxes: bool = True
    """Each user gets its own inbox prefix (`_INBOX_<user>`) and may subscribe only there.
    With the shared `_INBOX.>` any user could subscribe to another's inbox and read the
    replies to its pulls (its work). Needs clients connected with `inbox_prefix`."""
    agents_write_control: bool = False
    """Let agents publish on `jm.task.*.control` (the worker appends the timeout denial of
    an approval there). Off: an agent's credentials cannot grant its own approvals."""
    legacy_consumer_create: bool = True
    """Allow `$JS.API.CONSUMER.DURABLE.CREATE.<stream>.<durable>` for each role's own
    durables (nats-py uses it for a config with only `durable_name`). Off: only the
    filter-bound `$JS.API.CONSUMER.CREATE.<stream>.<durable>.<filter>` is allowed."""
    workers_declare: bool = False
    """Let agents create/update the JM_* streams and buckets (normally the orchestrator's
    or the admin's job; a worker then only reads their info)."""


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False
    """Also publish to the reply subject of requests received (request/reply services)."""

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "publish": {"allow": list(self.publish)},
            "subscribe": {"allow": list(self.subscribe)},
        }
        if self.allow_responses:
            out["allow_responses"] = True
        return out


@dataclass(frozen=True)
class RoleUser:
    """One NATS user: who connects with it, its inbox prefix and what it may do."""

    role: str
    user: str
    inbox_prefix: str
    permissions: Permissions | None
    """None: unrestricted (the admin)."""
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
    if role not in (ROLE_ADMIN, ROLE_ORCHESTRATOR, ROLE_MEMORY, ROLE_GATEWAY):
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
    out = []
    for s in streams:
        out += [_api("STREAM", "INFO", s), _api("STREAM", "CREATE", s),
                _api("STREAM", "UPDATE", s)]
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
    """Ephemeral ordered consumers (ledger follow, KV watch): create, info, delete, flow
    control replies. nats-py creates them with the unnamed `CONSUMER.CREATE.<stream>`."""
    return [
        _api("CONSUMER", "CREATE", stream),
        _api("CONSUMER", "CREATE", stream, ">"),
        _api("CONSUMER", "INFO", stream, "*"),
        _api("CONSUMER", "DELETE", stream, "*"),
        f"{FLOW_CONTROL}.{stream}.>",
    ]


def direct_get(stream: str) -> list[str]:
    """Batched / by-sequence direct gets (body) and last-by-subject gets (subject)."""
    return [_api("DIRECT", "GET", stream), _api("DIRECT", "GET", stream, ">")]


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


def agent_permissions(agent: str, skills: Sequence[str], options: Options | None = None
                      ) -> Permissions:
    """An agent's replicas: only their own skills' work, step appends, their registry keys."""
    opts = options or Options()
    user = user_name(ROLE_AGENT, agent)
    pub, sub = _common(user, opts)
    if opts.workers_declare:
        pub += stream_declare([*JM_STREAMS, *(kv_stream(b) for b in BUCKETS)])
    else:
        # Worker.start calls declare_streams: with the streams in place it only reads
        # their info. Buckets: KeyValue lookups read the bucket's stream info.
        pub += stream_info([*JM_STREAMS, *(kv_stream(b) for b in BUCKETS)])
    for skill in skills:
        pub += pull_consumer(subjects.STREAM_WORK, subjects.work_consumer(skill),
                             subjects.work(skill), opts)
    pub += [subjects.ALL_STEP_EVENTS, subjects.ALL_STEP_LOGS]
    if opts.agents_write_control:
        pub.append(subjects.ALL_CONTROL)
    pub += direct_get(subjects.STREAM_LEDGER)
    # The registry: write only its own replicas' keys; read it (public cards; the
    # worker health check watches `<agent>.>`).
    pub += kv_write(subjects.BUCKET_AGENTS, f"{agent}.>")
    pub += kv_read(subjects.BUCKET_AGENTS)
    pub += ordered_reader(kv_stream(subjects.BUCKET_AGENTS))
    pub += kv_read(subjects.BUCKET_BUDGETS) + kv_write(subjects.BUCKET_BUDGETS)
    pub.append(subjects.MEMORY_ALL)
    sub.append(subjects.ALL_CONTROL)  # cancellation, approval decisions
    return Permissions(_dedupe(pub), _dedupe(sub))


def orchestrator_permissions(options: Options | None = None) -> Permissions:
    opts = options or Options()
    pub, sub = _common(ROLE_ORCHESTRATOR, opts)
    pub += stream_declare([*JM_STREAMS, *(kv_stream(b) for b in BUCKETS)])
    pub += pull_consumer(subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_SUBMIT,
                         subjects.SUBMIT, opts)
    pub += pull_consumer(subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_STEPS,
                         subjects.ALL_STEP_EVENTS, opts)
    pub += pull_consumer(subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_CONTROL,
                         subjects.ALL_CONTROL, opts)
    pub.append(f"{subjects.PREFIX}.work.*")  # step commands of every skill
    pub += [subjects.ALL_TASK_EVENTS, subjects.ALL_STEP_EVENTS, subjects.ALL_STEP_LOGS,
            subjects.ALL_CONTROL]
    pub += direct_get(subjects.STREAM_LEDGER)
    pub += kv_read(subjects.BUCKET_AGENTS) + ordered_reader(kv_stream(subjects.BUCKET_AGENTS))
    pub += kv_read(subjects.BUCKET_BUDGETS) + kv_write(subjects.BUCKET_BUDGETS)
    # Health of the workers' consumers (`jetmesh health`, dashboards).
    pub.append(_api("CONSUMER", "INFO", subjects.STREAM_WORK, "*"))
    return Permissions(_dedupe(pub), _dedupe(sub))


def memory_permissions(options: Options | None = None) -> Permissions:
    opts = options or Options()
    pub, sub = _common(ROLE_MEMORY, opts)
    pub += stream_info(JM_STREAMS)
    # A multi-filter consumer: its create subject cannot carry the filters.
    pub += pull_consumer(subjects.STREAM_LEDGER, subjects.CONSUMER_MEMORY_EPISODES, None, opts)
    pub += direct_get(subjects.STREAM_LEDGER)
    pub.append(subjects.MEMORY_ALL)  # its own health probe
    sub.append(subjects.MEMORY_ALL)
    return Permissions(_dedupe(pub), _dedupe(sub), allow_responses=True)


def gateway_permissions(options: Options | None = None) -> Permissions:
    opts = options or Options()
    pub, sub = _common(ROLE_GATEWAY, opts)
    pub += stream_info(JM_STREAMS)  # Client.connect declares (reads) the streams
    pub.append(subjects.SUBMIT)
    pub.append(subjects.ALL_CONTROL)  # cancel over A2A
    pub += direct_get(subjects.STREAM_LEDGER) + ordered_reader(subjects.STREAM_LEDGER)
    pub += kv_read(subjects.BUCKET_AGENTS) + ordered_reader(kv_stream(subjects.BUCKET_AGENTS))
    return Permissions(_dedupe(pub), _dedupe(sub))


def plan(agents: Mapping[str, Sequence[str]], options: Options | None = None
         ) -> list[RoleUser]:
    """Every user of a deployment: admin, orchestrator, memory, gateway, one per agent."""
    opts = options or Options()
    users = [
        RoleUser(ROLE_ADMIN, ROLE_ADMIN, inbox_prefix(ROLE_ADMIN, opts), None),
        RoleUser(ROLE_ORCHESTRATOR, ROLE_ORCHESTRATOR, inbox_prefix(ROLE_ORCHESTRATOR, opts),
                 orchestrator_permissions(opts)),
        RoleUser(ROLE_MEMORY, ROLE_MEMORY, inbox_prefix(ROLE_MEMORY, opts),
                 memory_permissions(opts)),
        RoleUser(ROLE_GATEWAY, ROLE_GATEWAY, inbox_prefix(ROLE_GATEWAY, opts),
                 gateway_permissions(opts)),
    ]
    for agent in sorted(agents):
        skills = tuple(agents[agent])
        for s in skills:
            subjects.check_id(s, "skill")
        user = user_name(ROLE_AGENT, agent)
        users.append(RoleUser(ROLE_AGENT, user, inbox_prefix(user, opts),
                              agent_permissions(agent, skills, opts), agent, skills))
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

    @classmethod
    def create(cls, agents: Mapping[str, Sequence[str]], options: Options | None = None,
               passwords: Mapping[str, str] | None = None) -> AuthConfig:
        users = tuple(plan(agents, options))
        given = dict(passwords or {})
        fresh = generate_passwords(u for u in users if u.user not in given)
        return cls(users, {**fresh, **given})

    def user(self, user: str) -> RoleUser:
        for u in self.users:
            if u.user == user:
                return u
        raise KeyError(user)

    def agent(self, name: str) -> RoleUser:
        return self.user(user_name(ROLE_AGENT, name))

    def server_config(self) -> str:
        """The nats-server `authorization` section (append it to the server config)."""
        return render_authorization(self.users, self.passwords)

    def env(self, user: str, url: str | None = None) -> str:
        return render_env(self.user(user), self.passwords[user], url)

    def env_file(self, url: str | None = None) -> str:
        blocks = ["# jetmesh bus credentials, one block per role. Keep this file secret.\n"
                  "# Give each process the block of its role (e.g. an env file per role)."]
        for u in self.users:
            head = f"# --- {u.role}" + (f" {u.agent} ({', '.join(u.skills)})" if u.agent else "")
            blocks.append(head + "\n" + self.env(u.user, url))
        return "\n\n".join(blocks) + "\n"


def _q(s: str) -> str:
    # JSON strings are valid nats-server config strings ($ inside quotes is literal).
    return json.dumps(s)


def render_authorization(users: Sequence[RoleUser], passwords: Mapping[str, str]) -> str:
    lines = ["# jetmesh: one user per role, each allowed only its own subjects.",
             "# Generated by `jetmesh nats-config`; regenerate when agents or skills change.",
             "authorization {", "  users = ["]
    for u in users:
        lines.append("    {")
        lines.append(f"      # {u.role}" + (f": agent {u.agent}, skills "
                                              f"{', '.join(u.skills)}" if u.agent else ""))
        lines.append(f"      user: {_q(u.user)}")
        lines.append(f"      password: {_q(passwords[u.user])}")
        if u.permissions is not None:
            p = u.permissions
            lines.append("      permissions: {")
            lines.append("        publish: { allow: [")
            lines += [f"          {_q(s)}," for s in p.publish]
            lines.append("        ] }")
            lines.append("        subscribe: { allow: [")
            lines += [f"          {_q(s)}," for s in p.subscribe]
            lines.append("        ] }")
            if p.allow_responses:
                lines.append("        allow_responses: true")
            lines.append("      }")
        lines.append("    }")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


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
