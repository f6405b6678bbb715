"""Tenants on NATS itself (bus.tenancy), against a real nats-server run with the accounts
`jetmesh nats-config --tenants` writes: the mesh's roles in one account, each tenant in
its own. Tenant A (acme) submits, reads its task's events (live and by `jm.tasks.get`)
and uses memory through its account's imports; tenant B (globex), with its own
credentials, tries every raw NATS door to A's tasks and memories, generated from a
permission table: 0 allowed (and each row's probe works for A on A's own, where A may).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import DeliverPolicy
from typer.testing import CliRunner

from jetmesh.agents.builtin import get_agent
from jetmesh.agents.models.sim import SimModel
from jetmesh.agents.worker import Worker
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.dlq import DeadLetter
from jetmesh.bus.events import PlanStep
from jetmesh.bus.ledger import Ledger
from jetmesh.bus.permissions import AuthConfig
from jetmesh.bus.presence import ensure_bucket
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.streams import declare_streams
from jetmesh.bus.tenancy import SEQ_HEADER, TenantService, tenant_user
from jetmesh.memory import MemorySettings, MemoryStore
from jetmesh.memory.service import MemoryService
from jetmesh.orchestrator.cli import app
from jetmesh.orchestrator.cli.nats_config import read_passwords
from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings
from jetmesh.orchestrator.workflows import Workflow, WorkflowRegistry

A, B = "acme", "globex"
AGENTS = {"orders": [s.id for s in get_agent("orders").skills]}
LOOKUP = Workflow(name="lookup", steps=[PlanStep(id="only", skill="lookup_order",
                                                 input={"order_id": {"$ref": "task.goal"}})])
WAITS = Workflow(name="waits", steps=[PlanStep(id="only", skill="nobody_serves_this",
                                               input={"q": {"$ref": "task.goal"}})])
"""A task that waits (no agent offers its skill) until it is canceled."""
END_TYPES = ("jetmesh.task.completed.v1", "jetmesh.task.failed.v1",
             "jetmesh.task.canceled.v1")
TENANT_DLQ = subjects.dlq(subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_TENANT_SUBMIT)


class Follow:
    """A tenant's subscription to its account's `jm.task.>` (the live copy)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, int, dict[str, Any]]] = []
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        self.got.append((msg.subject, int((msg.headers or {}).get(SEQ_HEADER, "0")),
                         json.loads(msg.data)))
        self._changed.set()

    async def ended(self, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """The task's end event, as soon as the subscription has it."""
        return await self.seen(task_id, END_TYPES, timeout)

    async def seen(self, task_id: str, types: tuple[str, ...], timeout: float = 30.0
                   ) -> dict[str, Any]:
        """The task's first event of one of `types`, as soon as the subscription has it."""
        async def wait() -> dict[str, Any]:
            while True:
                for subject, _, event in self.got:
                    if subjects.task_id_of(subject) == task_id and event["type"] in types:
                        return event
                self._changed.clear()
                await self._changed.wait()
        return await asyncio.wait_for(wait(), timeout)


@dataclass
class Mesh:
    server: EmbeddedNats
    auth: AuthConfig
    ledger: Ledger
    admin: NATS
    conns: list[NATS] = field(default_factory=list)
    errors: dict[str, list[str]] = field(default_factory=dict)

    async def role(self, user: str) -> NATS:
        errors = self.errors.setdefault(user, [])

        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        u = self.auth.user(user)
        nc = await connect(self.server.url, name=f"test-{user}", user=user,
                           password=self.auth.passwords[user], inbox_prefix=u.inbox_prefix,
                           error_cb=on_error)
        self.conns.append(nc)
        return nc

    async def tenant(self, tenant: str) -> NATS:
        user = tenant_user(tenant)
        nc = await nats.connect(self.server.url, user=user,
                                password=self.auth.passwords[user], name=f"test-{user}")
        self.conns.append(nc)
        return nc


def nats_config(tmp_path: Path) -> tuple[str, AuthConfig]:
    """`jetmesh nats-config --tenants` (the command itself): the server section it
    wrote, and the users with the passwords of the env file it wrote."""
    conf = tmp_path / "nats-auth.conf"
    result = CliRunner().invoke(app, ["nats-config", "--agents", ",".join(AGENTS),
                                      "--tenants", f"{A},{B}", "-o", str(conf)])
    assert result.exit_code == 0, result.output
    passwords = read_passwords(conf.with_name(conf.name + ".env"))
    assert {tenant_user(A), tenant_user(B), "orchestrator"} <= set(passwords)
    return conf.read_text(), AuthConfig.create(AGENTS, passwords=passwords, tenants=[A, B])


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    config, auth = nats_config(tmp_path)
    server = EmbeddedNats(data_dir=tmp_path / "nats", extra_config=config)
    server.start()
    m = Mesh(server, auth, None, None)  # type: ignore[arg-type]
    stack = contextlib.AsyncExitStack()
    try:
        m.admin = await m.role("admin")
        admin_js = jetstream(m.admin)
        await declare_streams(admin_js)
        await ensure_bucket(admin_js, subjects.BUCKET_AGENTS)
        await ensure_bucket(admin_js, subjects.BUCKET_BUDGETS, max_age_s=7 * 86400)
        m.ledger = Ledger(m.admin, admin_js)
        orch_nc = await m.role("orchestrator")
        orch = Orchestrator(orch_nc, jetstream(orch_nc), model=SimModel(),
                            settings=OrchestratorSettings(tick_s=0.1),
                            workflows=WorkflowRegistry([LOOKUP, WAITS]))
        await orch.start()
        stack.push_async_callback(orch.stop)
        mem_nc = await m.role("memory")
        store = await MemoryStore.open(MemorySettings(data_dir=tmp_path / "mem",
                                                      embedder="hash", hash_dims=64))
        stack.push_async_callback(store.close)
        memory = MemoryService(mem_nc, jetstream(mem_nc), store, episodes=False)
        await memory.start()
        stack.push_async_callback(memory.stop, 1.0)
        ten_nc = await m.role("tenants")
        service = TenantService(ten_nc, jetstream(ten_nc))
        await service.start()
        stack.push_async_callback(service.stop)
        agent_nc = await m.role("agent-orders")
        worker = Worker(get_agent("orders"), None, agent_nc, jetstream(agent_nc),
                        replica="orders-tenants", heartbeat_s=0.5)
        await worker.start()
        stack.push_async_callback(worker.stop, 1.0)
        yield m
    finally:
        await stack.aclose()
        for nc in m.conns:
            with contextlib.suppress(Exception):
                await nc.close()
        server.stop()


async def submit(nc: NATS, task_id: str, goal: str, **extra: Any) -> dict[str, Any]:
    body = {"task_id": task_id, "goal": goal, "workflow": "lookup", **extra}
    reply = await nc.request(subjects.SUBMIT, json.dumps(body).encode(), timeout=5)
    ack: dict[str, Any] = json.loads(reply.data)
    return ack


async def ask(nc: NATS, subject: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """A request's JSON reply; None when nothing in the caller's account answers."""
    try:
        reply = await nc.request(subject, json.dumps(body).encode(), timeout=3)
    except (NoRespondersError, NatsTimeoutError):
        return None
    if not reply.data:
        return None
    out: dict[str, Any] = json.loads(reply.data)
    return out


async def follow(nc: NATS) -> Follow:
    """Subscribe to the copies of the tenant's tasks' own events and step lines (what a
    task's ledger holds besides controls; the probes publish on those, in the same
    account, and would otherwise be heard here)."""
    f = Follow()
    for wildcard in (subjects.ALL_TASK_EVENTS, subjects.ALL_STEP_EVENTS):
        await nc.subscribe(wildcard, cb=f.on_msg)
    await nc.flush()
    return f


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def test_a_tenant_submits_follows_reads_and_remembers_through_its_account(
        mesh: Mesh) -> None:
    a = await mesh.tenant(A)
    live = await follow(a)
    task = new_id("t-a")
    ack = await submit(a, task, "A1001")
    assert ack.get("stream") == subjects.STREAM_TASKS, ack
    end = await live.ended(task)
    assert end["type"] == "jetmesh.task.completed.v1", end
    # The submission names the tenant NATS stamped, and the account as who sent it.
    entries = await mesh.ledger.read(task)
    submitted = entries[0].event
    assert isinstance(submitted, ev.TaskSubmitted)
    assert submitted.data.tenant == A
    assert submitted.data.submitted_by == f"nats:{tenant_user(A)}"
    # The live copy: every ledger event of the task, in order, with its seq.
    live_seqs = [seq for subject, seq, _ in live.got if subjects.task_id_of(subject) == task]
    assert live_seqs == [e.seq for e in entries if not subjects.is_step_log(e.subject)]
    # The read: the same events, from any seq on.
    got = await ask(a, f"{subjects.TASK_OPS}.get", {"task_id": task})
    assert got is not None and got["ok"], got
    assert [e["seq"] for e in got["events"]] == live_seqs
    tail = await ask(a, f"{subjects.TASK_OPS}.get", {"task_id": task,
                                                    "from_seq": live_seqs[-1]})
    assert tail is not None and [e["seq"] for e in tail["events"]] == live_seqs[-1:]
    # Memory through the account: a note for user ann is stored as acme/ann.
    added = await ask(a, subjects.memory("add"), {"kind": "note", "text": "Ann likes tea",
                                                  "user_id": "ann"})
    assert added is not None and added["ok"], added
    assert added["result"]["item"]["user_id"] == f"{A}/ann"
    found = await ask(a, subjects.memory("search"), {"query": "tea", "user_id": "ann"})
    assert found is not None and found["ok"], found
    assert [i["text"] for i in found["result"]["items"]] == ["Ann likes tea"]
    unscoped = await ask(a, subjects.memory("search"), {"query": "tea"})
    assert unscoped is not None and not unscoped["ok"], unscoped
    # A cancel of its own waiting task, through the account; recorded as the account.
    waiting = new_id("t-wait")
    await submit(a, waiting, "anyone?", workflow="waits")
    await live.seen(waiting, ("jetmesh.step.dispatched.v1",))
    canceled = await ask(a, f"{subjects.TASK_OPS}.cancel", {"task_id": waiting})
    assert canceled is not None and canceled["ok"], canceled
    assert (await live.ended(waiting))["type"] == "jetmesh.task.canceled.v1"
    asked = [e.event for e in await mesh.ledger.read(waiting)
             if isinstance(e.event, ev.CancelRequested)]
    assert [c.data.by for c in asked] == [f"nats:{tenant_user(A)}"]
    again = await ask(a, f"{subjects.TASK_OPS}.cancel", {"task_id": waiting})
    assert again is not None and again["error"] == "finished", again
    assert not any(mesh.errors.values()), mesh.errors


# ----------------------------------------------------------------------------- the table


@dataclass
class Victim:
    """Tenant A's things tenant B goes for."""

    task: str
    memory_id: str
    ledger_size: int


Probe = Callable[[NATS, Mesh, Victim], Awaitable[bool]]
"""True: the caller got access (read something, or changed something)."""


async def _get_task(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    got = await ask(nc, f"{subjects.TASK_OPS}.get", {"task_id": v.task})
    return bool(got and got.get("ok") and got.get("events"))


async def _mesh_subject(nc: NATS, subject: str, body: bytes) -> bool:
    """A request to a mesh account subject: access if anything answers without an error."""
    try:
        reply = await nc.request(subject, body, timeout=3)
    except (NoRespondersError, NatsTimeoutError):
        return False
    try:
        data = json.loads(reply.data) if reply.data else {}
    except ValueError:
        return True  # a raw message: some answer came
    return not (isinstance(data, dict) and "error" in data)


async def _direct_get(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    body = json.dumps({"multi_last": [subjects.task_events(v.task)], "batch": 10}).encode()
    return await _mesh_subject(nc, subjects.direct_get(subjects.STREAM_LEDGER), body)


async def _stream_info(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    return await _mesh_subject(nc, f"{subjects.JS_API}.STREAM.INFO.{subjects.STREAM_LEDGER}",
                               b"")


async def _ledger_subject(nc: NATS, subject: str, event: ev.Event, mesh: Mesh,
                          v: Victim) -> bool:
    """Publish an event on one of A's task's ledger subjects (a JetStream publish is a
    request): access if it was stored or the task's ledger changed."""
    stored = await _mesh_subject(nc, subject, event.model_dump_json().encode())
    return stored or len(await mesh.ledger.read(v.task)) != v.ledger_size


async def _cancel_op(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    got = await ask(nc, f"{subjects.TASK_OPS}.cancel", {"task_id": v.task})
    return bool(got and got.get("ok")) or len(await mesh.ledger.read(v.task)) != v.ledger_size


async def _cancel(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    return await _ledger_subject(nc, subjects.task_control(v.task), ev.CancelRequested(
        subject=v.task, source="tenant-b", data=ev.CancelRequestedData(by="b")), mesh, v)


async def _approve(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    return await _ledger_subject(nc, subjects.task_approval(v.task), ev.ApprovalGranted(
        subject=v.task, source="tenant-b", data=ev.ApprovalDecisionData(
            step_id="only", tool="issue_refund", args_hash="0" * 64, by="b")), mesh, v)


async def _submit_to_a(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    """Straight to A's intake subject (the mesh account's name for it)."""
    body = json.dumps({"task_id": new_id("x"), "goal": "A1001", "workflow": "lookup"})
    return await _mesh_subject(nc, subjects.tenant_submit(A), body.encode())


async def _outcome(mesh: Mesh, task: str, send: Awaitable[Any]) -> DeadLetter | None:
    """Send a tenant's submission and wait for what the orchestrator made of it: its dead
    letter on the tenants' intake, or (None) the task's first event, whichever comes."""
    admin_js = jetstream(mesh.admin)
    letters = await admin_js.subscribe(TENANT_DLQ, ordered_consumer=True,
                                       deliver_policy=DeliverPolicy.NEW)
    events = await admin_js.subscribe(subjects.task_events(task), ordered_consumer=True,
                                      deliver_policy=DeliverPolicy.NEW)
    try:
        await send
        waits = {asyncio.ensure_future(letters.next_msg(timeout=30)): True,
                 asyncio.ensure_future(events.next_msg(timeout=30)): False}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for p in pending:
            p.cancel()
        first = done.pop()
        msg = first.result()
        return DeadLetter.model_validate_json(msg.data) if waits[first] else None
    finally:
        await letters.unsubscribe()
        await events.unsubscribe()


async def _refused_submission(nc: NATS, mesh: Mesh, task: str, **extra: Any) -> bool:
    """Submit through the caller's own import naming A: access if A's tenant is on a
    task of that id afterwards."""
    letter = await _outcome(mesh, task, submit(nc, task, "A1001", **extra))
    if letter is not None:
        assert letter.subject.startswith(f"{subjects.TENANT_PREFIX}."), letter
    entries = await mesh.ledger.read(task)
    return any(isinstance(e.event, ev.TaskSubmitted) and e.event.data.tenant == A
               for e in entries)


async def _submit_as_a(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    return await _refused_submission(nc, mesh, new_id("spend"), tenant=A)


async def _replay_a_task(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    """A replay would serve A's task's recorded model and tool calls to B's new task."""
    task = new_id("replay")
    letter = await _outcome(mesh, task, submit(nc, task, "A1001", replay_of=v.task))
    return letter is None or bool(await mesh.ledger.read(task))


async def _submit_as_a_metadata(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    return await _refused_submission(nc, mesh, new_id("spend"), metadata={"tenant": A})


async def _resubmit_a_task(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    """B submits a task with A's task's id: refused ("task exists"), A's untouched."""
    letters = await jetstream(mesh.admin).subscribe(
        TENANT_DLQ, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)
    try:
        await submit(nc, v.task, "A1002")
        letter = DeadLetter.model_validate_json((await letters.next_msg(timeout=30)).data)
        assert letter.reason == "task exists", letter
    finally:
        await letters.unsubscribe()
    return len(await mesh.ledger.read(v.task)) != v.ledger_size


async def _memory(nc: NATS, op: str, body: dict[str, Any]) -> dict[str, Any] | None:
    got = await ask(nc, subjects.memory(op), body)
    return got if got and got.get("ok") else None


async def _memory_search_user(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    got = await _memory(nc, "search", {"query": "secret plan", "user_id": "ann"})
    return bool(got and any(i["id"] == v.memory_id for i in got["result"]["items"]))


async def _memory_search_task(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    got = await _memory(nc, "search", {"query": "secret plan", "task_id": v.task})
    return bool(got and any(i["id"] == v.memory_id for i in got["result"]["items"]))


async def _memory_list_task(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    got = await _memory(nc, "list", {"task_id": v.task})
    return bool(got and got["result"]["items"])


async def _memory_get(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    return await _memory(nc, "get", {"memory_id": v.memory_id}) is not None


async def _memory_note_on_task(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    return await _memory(nc, "add", {"kind": "note", "text": "planted",
                                     "task_id": v.task}) is not None


async def _memory_forget(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    return await _memory(nc, "forget", {"task_id": v.task}) is not None


async def _spend_counter(nc: NATS, mesh: Mesh, v: Victim) -> bool:
    key = subjects.kv_subject(subjects.BUCKET_SPEND, f"tenant.{A}.d20261204")
    return await _mesh_subject(nc, key, b'{"spent_usd": 0}')


@dataclass(frozen=True)
class Row:
    action: str
    door: str
    probe: Probe
    owner: bool | None
    """What A's own credentials get on A's own (None: not probed, e.g. it would destroy
    what the other rows need)."""


TABLE = [
    Row("read", "jm.tasks.get of A's task", _get_task, True),
    Row("read", "JetStream direct get on JM_LEDGER", _direct_get, False),
    Row("read", "JetStream stream info of JM_LEDGER", _stream_info, False),
    Row("read", "memory search by A's user id", _memory_search_user, True),
    Row("read", "memory search by A's task", _memory_search_task, True),
    Row("read", "memory list of A's task", _memory_list_task, True),
    Row("read", "memory get of A's memory id", _memory_get, True),
    Row("submit", "A's intake subject jm.tenant.A.submit", _submit_to_a, False),
    Row("submit", "a submission with A's task id", _resubmit_a_task, False),
    Row("submit", "memory note on A's task", _memory_note_on_task, True),
    Row("spend", "a submission naming tenant A", _submit_as_a, None),
    Row("spend", "a submission with metadata tenant A", _submit_as_a_metadata, None),
    Row("spend", "a put on A's spend counter ($KV.jm-spend)", _spend_counter, False),
    Row("read", "a replay of A's task (its recorded calls)", _replay_a_task, False),
    Row("cancel", "CancelRequested on A's control subject", _cancel, False),
    Row("cancel", "jm.tasks.cancel of A's task", _cancel_op, None),
    Row("approve", "ApprovalGranted on A's approval subject", _approve, False),
    Row("cancel", "memory forget of A's task", _memory_forget, None),
]


def test_no_mesh_role_but_its_own_writes_a_tenants_subjects(tmp_path: Path) -> None:
    """What the readers trust: only an import from T's account lands on T's submit and
    memory subjects (no mesh role may publish there but the admin), and only the tenant
    service writes T's copies."""
    _, auth = nats_config(tmp_path)
    probes = {subjects.tenant_submit(A): set(), subjects.tenant_memory(A, "search"): set(),
              subjects.tenant_task_ops(A, "get"): set(),
              subjects.tenant_task_events(A, subjects.task_events("t1")): {"tenants"}}
    for subject, writers in probes.items():
        may = {u.role for u in auth.users if u.permissions.may_publish(subject)}
        assert may == writers | {"admin"}, (subject, may)


async def test_tenant_b_reaches_nothing_of_tenant_a_through_raw_nats(mesh: Mesh) -> None:
    a, b = await mesh.tenant(A), await mesh.tenant(B)
    live_a, live_b = await follow(a), await follow(b)
    task = new_id("t-a")
    await submit(a, task, "A1001")
    await live_a.ended(task)
    note = await _memory(a, "add", {"kind": "note", "text": "Ann's secret plan",
                                    "user_id": "ann", "task_id": task})
    assert note is not None
    victim = Victim(task, note["result"]["item"]["id"], len(await mesh.ledger.read(task)))

    allowed = []
    for row in TABLE:
        if await row.probe(b, mesh, victim):
            allowed.append(f"{row.action}: {row.door}")
        victim.ledger_size = len(await mesh.ledger.read(task))
    owner = {}
    for row in TABLE:
        if row.owner is not None:
            owner[row.door] = await row.probe(a, mesh, victim)
        victim.ledger_size = len(await mesh.ledger.read(task))
    assert allowed == [], allowed
    assert owner == {r.door: r.owner for r in TABLE if r.owner is not None}

    # The live copy: B's own task, submitted after A's ended, ends on B's subscription;
    # the relay copies in ledger order, so by then it has passed all of A's task.
    mine = new_id("t-b")
    await submit(b, mine, "A1002")
    end = await live_b.ended(mine)
    assert end["type"] == "jetmesh.task.completed.v1"
    assert {subjects.task_id_of(s) for s, _, _ in live_b.got} == {mine}
    assert {subjects.task_id_of(s) for s, _, _ in live_a.got} == {task}
    b_sub = (await mesh.ledger.read(mine))[0].event
    assert isinstance(b_sub, ev.TaskSubmitted) and b_sub.data.tenant == B
    # No mesh role was refused anything on the way (the tenants' probes are refused in
    # their own accounts, where nothing answers).
    assert not any(mesh.errors.values()), mesh.errors
