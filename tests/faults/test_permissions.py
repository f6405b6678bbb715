"""Least privilege on the bus, against a real nats-server run with `jetmesh nats-config`'s
users: an agent's credentials serve its own skills and nothing else; the orchestrator's
cannot update, purge or delete a stream; an agent cannot create a consumer on another
skill's subject; only the approver's credentials approve a gated call (not the
gateway's). Every role against every subject: test_permission_matrix.py.

The server refuses a publish or subscription outside a user's allow list with a
"Permissions Violation" protocol error: nats-py hands it to the error callback, the
refused message is dropped (a JetStream publish then gets no ack and times out) and a
refused subscription receives nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from nats.js.errors import APIError, NotFoundError
from pydantic import BaseModel

from jetmesh.a2a.bridge import ExternalAgent, _bucket, list_external
from jetmesh.agents.builtin import get_agent
from jetmesh.agents.builtin.support import issue_refund, refunds_file
from jetmesh.agents.cards import card_for_spec
from jetmesh.agents.models.sim import FunctionModel, SimModel, tool_call
from jetmesh.agents.models.types import ModelRequest, ToolCall
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.agents.worker import Worker
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.events import PlanStep
from jetmesh.bus.killswitch import KillRule, KillSwitchBoard, KillSwitchWatch
from jetmesh.bus.kvscan import current_entries
from jetmesh.bus.ledger import Ledger
from jetmesh.bus.permissions import AuthConfig, Options, allowed
from jetmesh.bus.presence import ensure_bucket
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.streams import (
    declare_streams,
    ensure_consumer,
    stream_configs,
    work_consumer_config,
)
from jetmesh.memory import MemorySettings, MemoryStore
from jetmesh.memory.client import MemoryClient
from jetmesh.memory.service import MemoryService
from jetmesh.orchestrator import stats, tasks_kv
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings
from jetmesh.orchestrator.state import TaskStatus
from jetmesh.orchestrator.workflows import Workflow, WorkflowRegistry


class Ask(BaseModel):
    question: str


REFUNDER = AgentSpec(
    name="refunder", description="Refunds what it is asked to.", instructions="Refund.",
    tools=[issue_refund],
    skills=[SkillSpec.from_models("refund", "Refund", "Refunds.", input_model=Ask)])
AGENTS = {"orders": [s.id for s in get_agent("orders").skills],
          "triage": [s.id for s in get_agent("triage").skills],
          "refunder": ["refund"]}


@dataclass
class Conn:
    nc: NATS
    js: JetStreamContext
    errors: list[str] = field(default_factory=list)

    def violations(self, subject: str) -> list[str]:
        # nats-py lower-cases the server's error text.
        return [e for e in self.errors
                if "permissions violation" in e.lower() and subject.lower() in e.lower()]


@dataclass
class Secure:
    server: EmbeddedNats
    auth: AuthConfig
    admin: Conn
    ledger: Ledger
    conns: list[Conn] = field(default_factory=list)

    async def connect(self, user: str) -> Conn:
        errors: list[str] = []

        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        u = self.auth.user(user)
        nc = await connect(self.server.url, name=f"test-{user}", user=user,
                           password=self.auth.passwords[user], inbox_prefix=u.inbox_prefix,
                           error_cb=on_error)
        conn = Conn(nc, jetstream(nc), errors)
        self.conns.append(conn)
        return conn


@pytest.fixture
async def secure(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Secure]:
    """A server run with the generated users (options: `request.param`, if parametrized)."""
    options = getattr(request, "param", None) or Options()
    auth = AuthConfig.create(AGENTS, options)
    server = EmbeddedNats(data_dir=tmp_path / "nats", extra_config=auth.server_config())
    server.start()
    env = Secure(server, auth, None, None)  # type: ignore[arg-type]
    try:
        env.admin = await env.connect("admin")
        # Declaring is the admin's (or orchestrator's) job; workers only read the info.
        await declare_streams(env.admin.js)
        await ensure_bucket(env.admin.js, subjects.BUCKET_AGENTS)
        await ensure_bucket(env.admin.js, subjects.BUCKET_BUDGETS, max_age_s=7 * 86400)
        env.ledger = Ledger(env.admin.nc, env.admin.js)
        yield env
    finally:
        for c in env.conns:
            with contextlib.suppress(Exception):
                await c.nc.close()
        server.stop()


def server_violations(server: EmbeddedNats) -> list[str]:
    """What the server logged as refused ("Publish Violation", "Subscription Violation")."""
    return [line for line in server.log_path.read_text(errors="replace").splitlines()
            if "Violation" in line]


def command(task: str, skill: str, payload: dict[str, object]) -> bytes:
    return ev.StepCommand(task_id=task, step_id="s1", skill=skill, input=payload
                          ).model_dump_json().encode()


async def pending(js: JetStreamContext, skill: str, want: int) -> int:
    """Messages of `skill`'s consumer not yet taken or acked (waits briefly for `want`:
    the consumer's counters trail the stream by a moment)."""
    n = -1
    for _ in range(40):
        info = await js.consumer_info(subjects.STREAM_WORK, subjects.work_consumer(skill))
        n = int(info.num_pending) + int(info.num_ack_pending)
        if n == want:
            break
        await asyncio.sleep(0.05)
    return n


async def refused(conn: Conn, subject: str, timeout: float = 3.0) -> None:
    """Wait for the server's permissions violation naming `subject`."""
    for _ in range(int(timeout / 0.05)):
        if conn.violations(subject):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no permissions violation for {subject}: {conn.errors}")


def test_the_generated_lists_keep_agents_to_their_own_skills() -> None:
    auth = AuthConfig.create({"orders": ["lookup_order"], "triage": ["triage"]})
    orders = auth.agent("orders").permissions
    assert orders is not None
    own = "$JS.API.CONSUMER.MSG.NEXT.JM_WORK.work-lookup_order"
    assert allowed(orders.publish, own)
    assert allowed(orders.publish, "$JS.ACK.JM_WORK.work-lookup_order.1.5.5.1700000000.0")
    assert allowed(orders.publish, "$KV.jm-agents.orders.host-1")
    for subject in ("jm.work.triage", "jm.work.lookup_order",
                    "$JS.API.CONSUMER.MSG.NEXT.JM_WORK.work-triage",
                    "$JS.ACK.JM_WORK.work-triage.1.5.5.1700000000.0",
                    "$JS.API.CONSUMER.CREATE.JM_WORK.work-triage.jm.work.triage",
                    "$JS.API.CONSUMER.CREATE.JM_WORK",
                    "$JS.API.STREAM.MSG.GET.JM_WORK", "$JS.API.DIRECT.GET.JM_WORK",
                    "$JS.API.STREAM.CREATE.JM_WORK", "$JS.API.STREAM.PURGE.JM_WORK",
                    "$KV.jm-agents.triage.host-1", "jm.dlq.JM_WORK.work-triage",
                    "jm.task.t1.control", "jm.task.t1.approval", "jm.task.submit",
                    # Its own durable by the legacy subject (filter in the body) or by
                    # name with another skill's filter; deleting a registry watcher.
                    "$JS.API.CONSUMER.DURABLE.CREATE.JM_WORK.work-lookup_order",
                    "$JS.API.CONSUMER.CREATE.JM_WORK.work-lookup_order.jm.work.triage",
                    "$JS.API.CONSUMER.CREATE.JM_WORK.work-lookup_order",
                    "$JS.API.CONSUMER.DELETE.KV_jm-agents.x"):
        assert not allowed(orders.publish, subject), subject
    # Approvals are the approver's alone; streams are updated only by the admin.
    for role in ("gateway", "orchestrator", "memory", "bridge", "admin"):
        assert not auth.user(role).permissions.may_publish("jm.task.t1.approval"), role
    assert auth.user("approver").permissions.may_publish("jm.task.t1.approval")
    orch = auth.user("orchestrator").permissions
    assert orch.may_publish("$JS.API.STREAM.CREATE.JM_LEDGER")
    for verb in ("UPDATE", "PURGE", "DELETE", "MSG.DELETE"):
        assert not orch.may_publish(f"$JS.API.STREAM.{verb}.JM_LEDGER"), verb
    assert not auth.user("gateway").permissions.may_publish(
        "$JS.API.CONSUMER.DELETE.JM_LEDGER.orchestrator-steps")
    assert not allowed(orders.subscribe, "_INBOX.x")
    assert not allowed(orders.subscribe, "_INBOX_agent-triage.x.y")
    assert not allowed(orders.subscribe, "jm.work.triage")
    assert "_INBOX_agent-orders" in auth.env_file()
    assert 'user: "agent-orders"' in auth.server_config()


async def test_an_agent_serves_its_own_skill_with_its_own_credentials(secure: Secure) -> None:
    conn = await secure.connect("agent-orders")
    worker = Worker(get_agent("orders"), None, conn.nc, conn.js, replica="orders-test",
                    heartbeat_s=0.5)
    await worker.start()
    try:
        # A worker runs only a step the ledger shows dispatched (the orchestrator's job).
        await secure.ledger.append(ev.TaskSubmitted(
            subject="perm-ok", data=ev.TaskSubmittedData(goal="x")))
        await secure.ledger.append(ev.StepDispatched(
            subject="perm-ok", data=ev.StepDispatchedData(
                step_id="s1", skill="lookup_order", input={"order_id": "A1001"})))
        await secure.admin.js.publish(subjects.work("lookup_order"),
                                      command("perm-ok", "lookup_order", {"order_id": "A1001"}))
        subject = subjects.step_events("perm-ok", "s1")
        done: list[ev.StepCompleted] = []
        for _ in range(200):
            done = [e.event for e in await secure.ledger.read("perm-ok", subject=subject)
                    if isinstance(e.event, ev.StepCompleted)]
            if done:
                break
            await asyncio.sleep(0.05)
        assert done and done[0].data.agent == "orders"
        assert done[0].data.output["found"] is True
        # The registry heartbeat went through (its own key).
        kv = await secure.admin.js.key_value(subjects.BUCKET_AGENTS)
        assert (await kv.get("orders.orders-test")).value
        assert conn.errors == []  # nothing the worker did was refused
        assert server_violations(secure.server) == []
    finally:
        await worker.stop(grace_s=1.0)


async def test_an_agent_cannot_publish_to_or_pull_another_agents_work(secure: Secure) -> None:
    admin = secure.admin
    # The triage skill's consumer exists and holds one command.
    await ensure_consumer(admin.js, subjects.STREAM_WORK, work_consumer_config("triage"))
    await admin.js.publish(subjects.work("triage"),
                           command("perm-triage", "triage", {"message": "hello"}))
    assert await pending(admin.js, "triage", 1) == 1

    orders = await secure.connect("agent-orders")

    # Publishing a step command for another agent's skill is refused: no ack, nothing stored.
    with pytest.raises(Exception):  # noqa: B017 (nats-py: TimeoutError, no JetStream ack)
        await orders.js.publish(subjects.work("triage"),
                                command("perm-forged", "triage", {"message": "x"}), timeout=0.5)
    await refused(orders, "jm.work.triage")
    with pytest.raises(Exception):  # noqa: B017
        await orders.js.publish(subjects.work("lookup_order"),
                                command("perm-self", "lookup_order", {"order_id": "A1"}),
                                timeout=0.5)
    await refused(orders, "jm.work.lookup_order")
    info = await admin.js.stream_info(subjects.STREAM_WORK, subjects_filter="jm.work.>")
    assert (info.state.subjects or {}) == {"jm.work.triage": 1}  # only the admin's command

    # Pulling from the triage consumer is refused: the fetch gets nothing.
    sub = await orders.js.pull_subscribe_bind(durable=subjects.work_consumer("triage"),
                                              stream=subjects.STREAM_WORK)
    with pytest.raises(Exception):  # noqa: B017 (nats-py: TimeoutError, nothing delivered)
        await sub.fetch(1, timeout=0.5)
    await refused(orders, "$JS.API.CONSUMER.MSG.NEXT.JM_WORK.work-triage")

    # ...and so is every other way to that work: creating a consumer for it (named, or
    # ephemeral), reading the WORK stream's messages, or listening on triage's inbox.
    attempts: list[tuple[Callable[[], Awaitable[object]], str]] = [
        (lambda: orders.js.add_consumer(subjects.STREAM_WORK, work_consumer_config("triage")),
         "$JS.API.CONSUMER.CREATE.JM_WORK.work-triage.jm.work.triage"),
        (lambda: orders.js.add_consumer(subjects.STREAM_WORK, filter_subject="jm.work.triage"),
         "$JS.API.CONSUMER.CREATE.JM_WORK"),
        (lambda: orders.js.get_msg(subjects.STREAM_WORK, 1), "$JS.API.STREAM.MSG.GET.JM_WORK"),
        (lambda: orders.js.purge_stream(subjects.STREAM_WORK), "$JS.API.STREAM.PURGE.JM_WORK"),
    ]
    for attempt, subject in attempts:
        with pytest.raises(Exception):  # noqa: B017
            await asyncio.wait_for(attempt(), 0.5)
        await refused(orders, subject)
    spy = await orders.nc.subscribe("_INBOX_agent-triage.>")
    await refused(orders, "_INBOX_agent-triage.>")
    await orders.nc.subscribe("jm.work.>")
    await refused(orders, "jm.work.>")

    # Its own durable cannot be re-pointed at triage's subject either: created by name, the
    # filter is in the API subject and the permission is refused (NATS times the request
    # out); by the legacy subject, a work-queue stream refuses overlapping consumers.
    with pytest.raises((APIError, NatsTimeoutError)):
        await orders.js.add_consumer(subjects.STREAM_WORK, dataclasses.replace(
            work_consumer_config("lookup_order"), filter_subject=subjects.work("triage")))

    # The triage agent's credentials cannot pull the orders agent's work either.
    triage = await secure.connect("agent-triage")
    await ensure_consumer(admin.js, subjects.STREAM_WORK, work_consumer_config("lookup_order"))
    await admin.js.publish(subjects.work("lookup_order"),
                           command("perm-orders", "lookup_order", {"order_id": "A1001"}))
    tsub = await triage.js.pull_subscribe_bind(durable=subjects.work_consumer("lookup_order"),
                                               stream=subjects.STREAM_WORK)
    with pytest.raises(Exception):  # noqa: B017
        await tsub.fetch(1, timeout=0.5)
    await refused(triage, "$JS.API.CONSUMER.MSG.NEXT.JM_WORK.work-lookup_order")
    # Nor overwrite the orders agent's registry entry.
    with pytest.raises(Exception):  # noqa: B017
        await triage.js.publish("$KV.jm-agents.orders.fake", b"{}", timeout=0.5)
    await refused(triage, "$KV.jm-agents.orders.fake")

    # Nothing was taken: both commands still wait for their own agents, and the spy on
    # triage's inbox got nothing.
    assert await pending(admin.js, "triage", 1) == 1
    assert await pending(admin.js, "lookup_order", 1) == 1
    assert spy.pending_msgs == 0
    # The triage agent's own consumer is still its to pull.
    own = await triage.js.pull_subscribe_bind(durable=subjects.work_consumer("triage"),
                                              stream=subjects.STREAM_WORK)
    msgs = await own.fetch(1, timeout=2.0)
    assert [m.subject for m in msgs] == ["jm.work.triage"]
    await msgs[0].ack()
    assert not triage.violations("work-triage")


def gateway_client(secure: Secure, conn: Conn) -> Client:
    """A Client on `conn` (Client.connect reads its credentials from the environment)."""
    client = Client(secure.server.url)
    client._nc, client.js = conn.nc, conn.js
    client.ledger = Ledger(conn.nc, conn.js)
    return client


LOOKUP = Workflow(name="lookup", steps=[PlanStep(id="only", skill="lookup_order",
                                                 input={"order_id": {"$ref": "task.goal"}})])


@pytest.mark.parametrize("secure", [
    Options(),
    # Older clients that create consumers by durable name only.
    Options(legacy_consumer_create=True),
], indirect=True, ids=["default", "legacy-consumers"])
async def test_a_task_runs_end_to_end_with_every_role_on_its_own_user(
        secure: Secure, tmp_path: Path) -> None:
    """Orchestrator, memory service, gateway client and the agent, each on its own user:
    nothing any of them does in a task's life is refused."""
    orch_conn = await secure.connect("orchestrator")
    orch = Orchestrator(orch_conn.nc, orch_conn.js, model=SimModel(),
                        settings=OrchestratorSettings(tick_s=0.1),
                        workflows=WorkflowRegistry([LOOKUP]))
    mem_conn = await secure.connect("memory")
    store = await MemoryStore.open(MemorySettings(data_dir=tmp_path / "mem", embedder="hash",
                                                  hash_dims=64))
    memory = MemoryService(mem_conn.nc, mem_conn.js, store)
    agent_conn = await secure.connect("agent-orders")
    worker = Worker(get_agent("orders"), None, agent_conn.nc, agent_conn.js,
                    replica="orders-e2e", heartbeat_s=0.5)
    gw_conn = await secure.connect("gateway")
    client = gateway_client(secure, gw_conn)
    await orch.start()
    await memory.start()
    await worker.start()
    try:
        task_id = await client.submit("A1001", workflow="lookup")
        state = await client.result(task_id, timeout=20)
        assert state.status == TaskStatus.COMPLETED, state
        # The agent's memory requests are answered (request/reply across users).
        assert await MemoryClient(agent_conn.nc).available(timeout_s=3.0)
        for conn, role in ((orch_conn, "orchestrator"), (mem_conn, "memory"),
                           (agent_conn, "agent-orders"), (gw_conn, "gateway")):
            assert not [e for e in conn.errors if "permissions" in e.lower()], (role, conn.errors)
        assert server_violations(secure.server) == []
    finally:
        await worker.stop(grace_s=1.0)
        await memory.stop(grace_s=1.0)
        await orch.stop()
        await store.close()


# ----------------------------------------------------------------------------- the holes


async def test_the_orchestrator_cannot_shrink_purge_or_delete_the_ledger(
        secure: Secure) -> None:
    """Only the admin changes a stream: the orchestrator's credentials may create the
    streams when they are missing, and a create that differs from the existing stream
    is refused by the server, so the ledger keeps every message."""
    for i in range(5):
        await secure.ledger.append(ev.TaskSubmitted(
            subject=f"keep-{i}", data=ev.TaskSubmittedData(goal="x")))
    before = (await secure.admin.js.stream_info(subjects.STREAM_LEDGER)).state.messages
    orch = await secure.connect("orchestrator")
    ledger_cfg = next(c for c in stream_configs() if c.name == subjects.STREAM_LEDGER)
    shrunk = dataclasses.replace(ledger_cfg, max_msgs=1)
    attempts: list[tuple[Callable[[], Awaitable[object]], str]] = [
        (lambda: orch.js.update_stream(shrunk), "$JS.API.STREAM.UPDATE.JM_LEDGER"),
        (lambda: orch.js.purge_stream(subjects.STREAM_LEDGER),
         "$JS.API.STREAM.PURGE.JM_LEDGER"),
        (lambda: orch.js.delete_msg(subjects.STREAM_LEDGER, 1),
         "$JS.API.STREAM.MSG.DELETE.JM_LEDGER"),
        (lambda: orch.js.delete_stream(subjects.STREAM_LEDGER),
         "$JS.API.STREAM.DELETE.JM_LEDGER"),
        (lambda: orch.js.delete_consumer(subjects.STREAM_WORK, "work-triage"),
         "$JS.API.CONSUMER.DELETE.JM_WORK.work-triage"),
    ]
    for attempt, subject in attempts:
        with pytest.raises(Exception):  # noqa: B017 (no reply: nats-py times out)
            await asyncio.wait_for(attempt(), 1.0)
        await refused(orch, subject)
    # Create is allowed, but not as an update in disguise.
    with pytest.raises(APIError, match="different configuration"):
        await orch.js.add_stream(shrunk)
    info = await secure.admin.js.stream_info(subjects.STREAM_LEDGER)
    assert info.state.messages == before and info.config.max_msgs in (None, -1)
    # declare_streams as the orchestrator names a drift it may not fix.
    from jetmesh.bus.errors import StreamConfigConflict
    from jetmesh.bus.settings import BusSettings

    # (A ledger from before approvals had their own subject.)
    old_subjects = [x for x in subjects.LEDGER_SUBJECTS if x != subjects.ALL_APPROVALS]
    await secure.admin.js.update_stream(dataclasses.replace(ledger_cfg, subjects=old_subjects))
    with pytest.raises(StreamConfigConflict, match="only the admin"):
        await declare_streams(orch.js, BusSettings(request_timeout_s=1.0))
    await declare_streams(secure.admin.js)  # the admin puts it back


async def test_an_agent_cannot_create_a_consumer_on_another_skills_subject(
        secure: Secure) -> None:
    """Before its own durable exists, an agent could create it (or an "ephemeral" of the
    same name) on another skill's subject and pull that work through its own pull
    permission. Only the create subject naming the consumer and its own filter is
    allowed, and the server checks the body against it."""
    admin = secure.admin
    orders = await secure.connect("agent-orders")
    durable = subjects.work_consumer("lookup_order")
    stolen = subjects.work("triage")
    legacy = ConsumerConfig(durable_name=durable, filter_subject=stolen)
    ephemeral = ConsumerConfig(name=durable, filter_subject=stolen)
    req = {"stream_name": subjects.STREAM_WORK, "config": ephemeral.as_dict()}

    attempts: list[tuple[Callable[[], Awaitable[object]], str]] = [
        (lambda: orders.js.add_consumer(subjects.STREAM_WORK, legacy),
         f"$JS.API.CONSUMER.DURABLE.CREATE.JM_WORK.{durable}"),
        (lambda: orders.nc.request(f"$JS.API.CONSUMER.CREATE.{subjects.STREAM_WORK}",
                                   json.dumps(req).encode(), timeout=0.5),
         "$JS.API.CONSUMER.CREATE.JM_WORK"),
        (lambda: orders.nc.request(
            f"$JS.API.CONSUMER.CREATE.{subjects.STREAM_WORK}.{durable}.{stolen}",
            json.dumps(req).encode(), timeout=0.5),
         f"$JS.API.CONSUMER.CREATE.JM_WORK.{durable}.{stolen}"),
    ]
    for attempt, subject in attempts:
        with pytest.raises(Exception):  # noqa: B017
            await asyncio.wait_for(attempt(), 1.0)
        await refused(orders, subject)
    with pytest.raises(NotFoundError):
        await admin.js.consumer_info(subjects.STREAM_WORK, durable)
    # The allowed subject with a body that names another filter: the server refuses it.
    own = f"$JS.API.CONSUMER.CREATE.{subjects.STREAM_WORK}.{durable}.jm.work.lookup_order"
    resp = await orders.nc.request(own, json.dumps(
        {"stream_name": subjects.STREAM_WORK,
         "config": ConsumerConfig(name=durable, durable_name=durable,
                                  filter_subject=stolen).as_dict()}).encode(), timeout=2)
    assert "error" in json.loads(resp.data)
    with pytest.raises(NotFoundError):
        await admin.js.consumer_info(subjects.STREAM_WORK, durable)
    # Its own consumer, as the runtime creates it, is fine.
    await ensure_consumer(orders.js, subjects.STREAM_WORK, work_consumer_config("lookup_order"))
    info = await admin.js.consumer_info(subjects.STREAM_WORK, durable)
    assert info.config.filter_subject == subjects.work("lookup_order")


def refund_model(request: ModelRequest) -> list[ToolCall] | str:
    if not any(m.role == "tool" for m in request.messages):
        return [tool_call("issue_refund", order_id="A1029", amount_usd=210,
                          reason="customer asked")]
    return "done"


REFUND = Workflow(name="refund", steps=[PlanStep(id="only", skill="refund",
                                                 input={"question": {"$ref": "task.goal"}})])


async def test_only_the_approver_can_approve_a_gated_refund(
        secure: Secure, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A $210 refund waits for a human. The gateway (which may submit and cancel) cannot
    approve it: its ApprovalGranted is refused and never stored, and the refund does not
    run. The approver's credentials approve it, and it runs once."""
    monkeypatch.setenv("JETMESH_DATA_DIR", str(tmp_path))
    orch_conn = await secure.connect("orchestrator")
    orch = Orchestrator(orch_conn.nc, orch_conn.js, model=SimModel(),
                        settings=OrchestratorSettings(tick_s=0.1),
                        workflows=WorkflowRegistry([REFUND]))
    agent_conn = await secure.connect("agent-refunder")
    worker = Worker(REFUNDER, FunctionModel(refund_model), agent_conn.nc, agent_conn.js,
                    replica="refunder-test", heartbeat_s=0.5)
    gw_conn = await secure.connect("gateway")
    gateway = gateway_client(secure, gw_conn)
    ap_conn = await secure.connect("approver")
    approver = gateway_client(secure, ap_conn)
    await orch.start()
    await worker.start()
    try:
        tid = await gateway.submit("refund A1029", workflow="refund")
        asked: ev.ApprovalRequested | None = None
        async for entry in gateway.follow(tid):
            if isinstance(entry.event, ev.ApprovalRequested):
                asked = entry.event
                break
        assert asked is not None and asked.data.arguments["amount_usd"] == 210
        decision = ev.ApprovalDecisionData(step_id=asked.data.step_id, tool=asked.data.tool,
                                           args_hash=asked.data.args_hash, by="gateway")
        with pytest.raises(Exception):  # noqa: B017 (refused: no ack)
            await asyncio.wait_for(gateway.ledger.append(
                ev.ApprovalGranted(subject=tid, data=decision)), 1.0)
        await refused(gw_conn, subjects.task_approval(tid))
        assert not [e for e in await secure.ledger.read(tid)
                    if isinstance(e.event, ev.ApprovalGranted)]
        assert (await gateway.state(tid)).status is TaskStatus.INPUT_REQUIRED
        assert not refunds_file().exists()

        await approver.ledger.append(ev.ApprovalGranted(
            subject=tid, data=decision.model_copy(update={"by": "a human"})))
        state = await gateway.result(tid, timeout=20)
        assert state.status is TaskStatus.COMPLETED, state
        made = [json.loads(x) for x in refunds_file().read_text().splitlines()]
        assert [(m["order_id"], m["amount_usd"]) for m in made] == [("A1029", 210)]
        granted = [e for e in await secure.ledger.read(tid)
                   if isinstance(e.event, ev.ApprovalGranted)]
        assert [e.subject for e in granted] == [subjects.task_approval(tid)]
        assert granted[0].event.data.by == "a human"
        for conn, role in ((orch_conn, "orchestrator"), (agent_conn, "agent-refunder"),
                           (ap_conn, "approver")):
            assert not [e for e in conn.errors if "permissions" in e.lower()], (role, conn.errors)
    finally:
        await worker.stop(grace_s=1.0)
        await orch.stop()


async def test_the_orchestrator_sweeps_unconsumed_work_with_its_own_user(
        secure: Secure) -> None:
    """The sweep (bus.sweep) needs exactly the work stream's consumer list, message get
    and delete, and its own dead-letter subject: all in the orchestrator's table."""
    from jetmesh.bus.sweep import sweep_unconsumed

    ack = await secure.admin.js.publish(subjects.work("nobody_serves_this"), b"{}")
    orch = await secure.connect("orchestrator")
    moved = await sweep_unconsumed(orch.js, older_than_s=0)
    assert [m.seq for m in moved] == [ack.seq]
    assert orch.errors == [] and server_violations(secure.server) == []


async def test_each_roles_one_pass_kv_reads_work_with_its_own_user(secure: Secure) -> None:
    """bus/kvscan reads (a message get for the end, then an ordered consumer) under
    each role's generated permissions: the bridge's external agents, a worker's kill
    switch, the gateway's task and stats projections, a worker's heartbeat check."""
    admin = secure.admin.js
    ext = ExternalAgent("ext-perm", "http://127.0.0.1:1/agents/orders",
                        card_for_spec(get_agent("orders")), datetime.now(UTC).isoformat())
    await (await _bucket(admin)).put(ext.name, ext.to_json())
    await KillSwitchBoard(admin).disable(KillRule(kind="tool", name="issue_refund"))
    skv = await ensure_bucket(admin, subjects.BUCKET_STATS)
    await skv.put("task.t-perm", b"{}")
    await tasks_kv.open_bucket(admin)

    bridge = await secure.connect("bridge")
    assert [a.name for a in await list_external(bridge.js)] == ["ext-perm"]
    agent = await secure.connect("agent-orders")
    watch = KillSwitchWatch(agent.js)
    await watch.start()
    try:
        assert [r.name for r in watch.rules.values()] == ["issue_refund"]
    finally:
        await watch.stop()
    assert [e.key for e in await current_entries(agent.js, subjects.BUCKET_AGENTS)] == []
    gateway = await secure.connect("gateway")
    assert await stats.read_summaries(gateway.js) == []  # "{}" is no record: left out
    assert await tasks_kv.read_summaries(gateway.js) == []
    for c in (bridge, agent, gateway):
        assert c.errors == [], c.errors
    assert server_violations(secure.server) == []
