"""Every role × every subject and `$JS.API` verb it must not touch, against a real
nats-server run with the generated users: each forbidden publish and subscription is
refused (a permissions violation), none is allowed; each allowed one is accepted.

The probes are GENERATED from the permission table (bus/permissions): the union of every
role's allow lists (wildcards made concrete), every `$JS.API` verb on every jetmesh
stream and durable (including each durable re-pointed at every other filter), and the
app subjects. A role's forbidden set is what its own lists do not allow, so a change to
the table changes the probes with it and the suite cannot drift.

The server answers a refused PUB or SUB with `-ERR 'Permissions Violation ...'` in
order on the connection, and nats-py hands those to the error callback as it reads
them: once a flush (PING/PONG) returns, every verdict for what was sent before is in.
One server for the module; one connection per role and kind.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jetmesh.agents.builtin import BUILTIN_AGENTS
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.permissions import JM_STREAMS, AuthConfig, Options, RoleUser
from jetmesh.bus.presence import ensure_bucket
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.streams import declare_streams

AGENTS = {name: [s.id for s in spec.skills] for name, spec in BUILTIN_AGENTS.items()}
VARIANTS = {
    "default": Options(),
    # Every compatibility switch on: each widens the table, none may open a hole the
    # table does not show.
    "compat": Options(private_inboxes=False, legacy_consumer_create=True,
                      agents_write_control=True, workers_declare=True),
}
AUTHS = {name: AuthConfig.create(AGENTS, opts) for name, opts in VARIANTS.items()}
AUTH = AUTHS["default"]
USERS = [u.user for u in AUTH.users]
API = subjects.JS_API
BUCKETS = (subjects.BUCKET_AGENTS, subjects.BUCKET_BUDGETS, subjects.BUCKET_EXTERNAL,
           subjects.BUCKET_KILLSWITCH, subjects.BUCKET_SPEND)
TENANTS = ("t-a", "t-b")
"""Two tenants: their kill switch rules and spend counters are probed for every role."""

STREAM_VERBS = ("INFO", "CREATE", "UPDATE", "DELETE", "PURGE", "MSG.GET", "MSG.DELETE",
                "SNAPSHOT", "RESTORE", "LEADER.STEPDOWN", "PEER.REMOVE")
CONSUMER_VERBS = ("DELETE", "INFO", "MSG.NEXT", "PAUSE", "LEADER.STEPDOWN", "RESET",
                  "UNPIN")
ACCOUNT_WIDE = ("INFO", "STREAM.LIST", "STREAM.NAMES", "ACCOUNT.PURGE.$G",
                "SERVER.REMOVE", "META.LEADER.STEPDOWN", "STREAM.TEMPLATE.CREATE.x",
                "ACCOUNT.STREAM.MOVE.JM_LEDGER.jetmesh")


def concrete(pattern: str) -> str:
    """One subject a pattern matches (`*` and `>` become probe tokens)."""
    return ".".join({"*": "probe", ">": "probe.x"}.get(t, t) for t in pattern.split("."))


def durables() -> list[tuple[str, str, str]]:
    """(stream, durable, filter) of every durable consumer in the deployment."""
    out = [(subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_SUBMIT, subjects.SUBMIT),
           (subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_STEPS, subjects.ALL_STEP_EVENTS),
           (subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_CONTROL, subjects.ALL_CONTROL),
           (subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_APPROVALS, subjects.ALL_APPROVALS),
           (subjects.STREAM_LEDGER, subjects.CONSUMER_MEMORY_EPISODES, subjects.ALL_LEDGER),
           (subjects.STREAM_LEDGER, subjects.CONSUMER_TELEMETRY, subjects.TELEMETRY_SUBJECT),
           (subjects.STREAM_LOG, subjects.CONSUMER_TELEMETRY, subjects.TELEMETRY_LOG_SUBJECT)]
    out += [(subjects.STREAM_WORK, subjects.work_consumer(s), subjects.work(s))
            for skills in AGENTS.values() for s in skills]
    return out


def publish_universe(auth: AuthConfig) -> list[str]:
    found: dict[str, None] = {}

    def add(s: str) -> None:
        found.setdefault(s, None)

    for u in auth.users:
        for p in (*u.permissions.publish, *u.permissions.publish_deny,
                  *u.permissions.subscribe):
            add(concrete(p))
    streams = [*JM_STREAMS, *(subjects.kv_stream(b) for b in BUCKETS)]
    for st in streams:
        for verb in STREAM_VERBS:
            add(f"{API}.STREAM.{verb}.{st}")
        add(f"{API}.DIRECT.GET.{st}")
        add(f"{API}.DIRECT.GET.{st}.probe")
        add(f"{API}.CONSUMER.CREATE.{st}")
        add(f"{API}.CONSUMER.CREATE.{st}.probe")
        add(f"{API}.CONSUMER.CREATE.{st}.probe.probe")
        add(f"{API}.CONSUMER.DURABLE.CREATE.{st}.probe")
        add(f"{API}.CONSUMER.LIST.{st}")
        add(f"{API}.CONSUMER.NAMES.{st}")
        add(f"{subjects.JS_FLOW_CONTROL}.{st}.probe.x")
    filters = sorted({f for _, _, f in durables()})
    for st, d, _ in durables():
        add(f"{API}.CONSUMER.CREATE.{st}.{d}")
        for other in filters:  # each durable, re-pointed at every filter (its own too)
            add(f"{API}.CONSUMER.CREATE.{st}.{d}.{concrete(other)}")
        add(f"{API}.CONSUMER.DURABLE.CREATE.{st}.{d}")
        for verb in CONSUMER_VERBS:
            add(f"{API}.CONSUMER.{verb}.{st}.{d}")
        add(f"{subjects.JS_ACK}.{st}.{d}.1.1.1.1700000000.0")
        add(f"{subjects.JS_ACK}.dom.acc.{st}.{d}.1.1.1.1700000000.0.x")
        add(subjects.dlq(st, d))
    for verb in ACCOUNT_WIDE:
        add(f"{API}.{verb}")
    t = "t-probe"
    for s in (subjects.SUBMIT, subjects.task_events(t), subjects.task_control(t),
              subjects.task_approval(t), subjects.step_events(t, "s1"),
              subjects.step_log(t, "s1"), subjects.memory("search"),
              subjects.kv_subject(subjects.BUCKET_BUDGETS, t),
              subjects.kv_subject(subjects.BUCKET_EXTERNAL, "ext"),
              "jm.dlq.JM_LEDGER.probe", "$SYS.REQ.SERVER.PING", "anything.else"):
        add(s)
    for tenant in TENANTS:
        add(subjects.kv_subject(subjects.BUCKET_KILLSWITCH,
                                subjects.killswitch_key("tool", "probe", None, tenant)))
        add(subjects.kv_subject(subjects.BUCKET_SPEND,
                                subjects.spend_key("tenant", tenant, "d20261204")))
    for name, skills in AGENTS.items():
        add(subjects.kv_subject(subjects.BUCKET_AGENTS, f"{name}.r1"))
        for s in skills:
            add(subjects.work(s))
    return list(found)


def subscribe_universe(auth: AuthConfig) -> list[str]:
    found: dict[str, None] = dict.fromkeys(publish_universe(auth))
    for u in auth.users:
        for p in u.permissions.subscribe:
            found.setdefault(p, None)
        found.setdefault(f"{u.inbox_prefix}.>", None)
    for w in (">", "jm.>", "jm.task.>", "jm.work.>", "jm.task.*.step.*", "jm.task.*.*",
              subjects.ALL_CONTROL, subjects.ALL_APPROVALS, "$JS.API.>", "$JS.ACK.>",
              "$KV.>", "_INBOX.>", "*.>", "$SYS.>", "jm.memory.*"):
        found.setdefault(w, None)
    return list(found)


@dataclass(frozen=True)
class Probes:
    """One variant's table and the probes generated from it."""

    auth: AuthConfig
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    @classmethod
    def of(cls, auth: AuthConfig) -> Probes:
        return cls(auth, tuple(publish_universe(auth)), tuple(subscribe_universe(auth)))

    def forbidden_publish(self, u: RoleUser) -> list[str]:
        return [s for s in self.publish if not u.permissions.may_publish(s)]

    def forbidden_subscribe(self, u: RoleUser) -> list[str]:
        return [s for s in self.subscribe if not u.permissions.may_subscribe(s)]

    def allowed_publish(self, u: RoleUser) -> list[str]:
        return [s for s in self.publish if u.permissions.may_publish(s)]

    def allowed_subscribe(self, u: RoleUser) -> list[str]:
        return [s for s in self.subscribe if u.permissions.may_subscribe(s)]


PROBES = {name: Probes.of(auth) for name, auth in AUTHS.items()}


_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]+)"',
                        re.IGNORECASE)


@dataclass
class Matrix:
    server: EmbeddedNats
    probes: Probes

    @property
    def auth(self) -> AuthConfig:
        return self.probes.auth

    async def verdicts(self, user: str, kind: str, probes: list[str]) -> set[str]:
        """Send every probe as `user` (publish or subscribe); the lower-cased subjects the
        server refused."""
        errors: list[str] = []

        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        u = self.auth.user(user)
        nc = await connect(self.server.url, name=f"matrix-{user}", user=user,
                           password=self.auth.passwords[user], inbox_prefix=u.inbox_prefix,
                           error_cb=on_error, allow_reconnect=False)
        try:
            for s in probes:
                if kind == "publish":
                    await nc.publish(s, b"{}")
                else:
                    await nc.subscribe(s)
            # The verdicts come in order; the error callback may run a moment after the
            # flush returns, so wait for the verdict on a sentinel sent last.
            sentinel = (subjects.task_approval("matrix-sentinel") if user == "admin"
                        else "matrix.sentinel")
            await nc.publish(sentinel, b"")
            await nc.flush(timeout=10)
            deadline = time.monotonic() + 10
            while not any(sentinel.lower() in e.lower() for e in errors):
                assert time.monotonic() < deadline, f"{user}: no verdict on {sentinel}"
                assert nc.is_connected, f"{user}: the server closed the connection: {errors}"
                await asyncio.sleep(0.01)
        finally:
            await nc.close()
        refused = set()
        for e in errors:
            m = _VIOLATION.search(e)
            if m and (m.group(1).lower() == "publish") == (kind == "publish"):
                refused.add(m.group(2).lower())
        refused.discard(sentinel.lower())
        return refused


@pytest.fixture(scope="module", params=list(VARIANTS))
async def matrix(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[Matrix]:
    """One server per variant, run with that variant's generated users."""
    probes = PROBES[request.param]
    auth = probes.auth
    server = EmbeddedNats(data_dir=Path(tmp_path_factory.mktemp("matrix")) / "nats",
                          extra_config=auth.server_config())
    server.start()
    try:
        u = auth.user("admin")
        nc = await connect(server.url, user="admin", password=auth.passwords["admin"],
                           inbox_prefix=u.inbox_prefix)
        js = jetstream(nc)
        await declare_streams(js)
        for b in BUCKETS:
            await ensure_bucket(js, b)
        await nc.close()
        yield Matrix(server, probes)
    finally:
        server.stop()


def test_the_probes_are_generated_from_the_table() -> None:
    """Every role has something it must not touch, and the admin role, which may do
    anything else, may not approve; the numbers are printed (`pytest -s`)."""
    pr = PROBES["default"]
    forbidden_publish, forbidden_subscribe = pr.forbidden_publish, pr.forbidden_subscribe
    allowed_publish, allowed_subscribe = pr.allowed_publish, pr.allowed_subscribe
    n_pub, n_sub = len(pr.publish), len(pr.subscribe)
    total = 0
    for u in AUTH.users:
        fp, fs = forbidden_publish(u), forbidden_subscribe(u)
        total += len(fp) + len(fs)
        print(f"{u.user}: {len(fp)} forbidden publishes, {len(fs)} forbidden subscriptions, "
              f"{len(allowed_publish(u))} + {len(allowed_subscribe(u))} allowed")
        assert fp, u.user
    print(f"{len(AUTH.users)} roles, {n_pub} publish and {n_sub} "
          f"subscribe probes, {total} role x subject checks that must be refused")
    admin = AUTH.user("admin")
    assert forbidden_publish(admin) == [concrete(subjects.ALL_APPROVALS),
                                        subjects.task_approval("t-probe")]
    assert not forbidden_subscribe(admin)
    # What the brief's holes were, by role: none of them is allowed any more.
    gw, orch = AUTH.user("gateway").permissions, AUTH.user("orchestrator").permissions
    assert not gw.may_publish(subjects.task_approval("t1"))
    assert AUTH.user("approver").permissions.may_publish(subjects.task_approval("t1"))
    for verb in ("UPDATE", "DELETE", "PURGE", "MSG.DELETE"):
        assert not orch.may_publish(f"{API}.STREAM.{verb}.JM_LEDGER"), verb
    for u in AUTH.users:
        if u.user == "admin":
            continue
        for st, d, _ in durables():
            assert not u.permissions.may_publish(f"{API}.CONSUMER.DELETE.{st}.{d}")
            assert not u.permissions.may_publish(f"{API}.CONSUMER.DURABLE.CREATE.{st}.{d}")
        assert not u.permissions.may_publish(f"{API}.CONSUMER.CREATE.JM_WORK")
        # The kill switch: only the admin writes rules, for any tenant.
        for tenant in TENANTS:
            rule = subjects.killswitch_key("tool", "probe", None, tenant)
            assert not u.permissions.may_publish(
                subjects.kv_subject(subjects.BUCKET_KILLSWITCH, rule)), u.user


@pytest.mark.parametrize("user", USERS)
async def test_every_forbidden_publish_is_refused(matrix: Matrix, user: str) -> None:
    probes = matrix.probes.forbidden_publish(matrix.auth.user(user))
    refused = await matrix.verdicts(user, "publish", probes)
    allowed = [s for s in probes if s.lower() not in refused]
    assert allowed == [], f"{user} may publish to {len(allowed)} forbidden subjects"


@pytest.mark.parametrize("user", USERS)
async def test_every_forbidden_subscription_is_refused(matrix: Matrix, user: str) -> None:
    probes = matrix.probes.forbidden_subscribe(matrix.auth.user(user))
    refused = await matrix.verdicts(user, "subscribe", probes)
    allowed = [s for s in probes if s.lower() not in refused]
    assert allowed == [], f"{user} may subscribe to {len(allowed)} forbidden subjects"


@pytest.mark.parametrize("user", USERS)
async def test_every_allowed_subject_is_accepted(matrix: Matrix, user: str) -> None:
    """The other half: the table and the server agree on what each role may do (the end
    to end tests show that it is enough for each role's job)."""
    u = matrix.auth.user(user)
    pub = await matrix.verdicts(user, "publish", matrix.probes.allowed_publish(u))
    sub = await matrix.verdicts(user, "subscribe", matrix.probes.allowed_subscribe(u))
    assert (sorted(pub), sorted(sub)) == ([], [])
