"""Tenants on NATS itself: one NATS account per tenant, the mesh in an account of its own.

A tenant that connects to NATS directly gets an account (`tenant-<T>`, one user,
`tenant-<T>`). Accounts share nothing but what one exports and another imports, so a
tenant account sees no mesh subject, stream or bucket at all: only its imports of the
mesh account's per-tenant exports, each granted to that tenant's account alone:

- `jm.task.submit` (a request: the JetStream ack comes back) lands as
  `jm.tenant.<T>.submit` in stream JM_TASKS; the orchestrator takes the tenant from
  the subject.
- `jm.memory.<op>` (request) lands as `jm.tenant.<T>.memory.<op>`; the memory service
  scopes the request by the subject's tenant.
- `jm.tasks.get` (request) lands as `jm.tenant.<T>.tasks.get`; `TenantService` answers
  with the task's ledger events if the task is T's (another's is not found);
  `jm.tasks.cancel` likewise asks for a cancel of one of T's tasks (recorded `by`
  `nats:tenant-<T>`).
- a subscription to `jm.task.<task>.>` receives the mesh's stream export
  `jm.tenant.<T>.task.<task>.>`: `TenantService`'s live copy of T's tasks' events.

The tenant token is put there by the nats-server's import mapping, not by the sender: a
tenant account can only import what the mesh exports to it, so a message on
`jm.tenant.<T>.…` in the mesh account came from T's account (no mesh role may publish
there, bus.permissions). The readers take the tenant from the subject and refuse a
payload that names another (`stamp_submission`).

Reading events: the ledger's subjects carry no tenant, so no export of the ledger (or of
JetStream's API on it) can be limited to one tenant's tasks; a per-tenant copy of the
ledger in JetStream would double its storage. `TenantService` instead follows the ledger
once and republishes each event of a tenant's task on core NATS to that tenant's export
(live, at most once: an event published while the tenant is not subscribed is not kept)
and answers `jm.tasks.get` with the task's events from a sequence on (history and any
gap): subscribe first, then get, and drop what the subscription already gave by `seq`.
Its measurement is in the README's tenants section.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jetmesh.bus import events as ev
from jetmesh.bus import headers as hn
from jetmesh.bus import subjects
from jetmesh.bus.events import MAX_MESSAGE_BYTES
from jetmesh.bus.ledger import Ledger, LedgerEntry
from jetmesh.bus.tasks import cancel_and_wait

log = logging.getLogger(__name__)

MESH_ACCOUNT = "jetmesh"
"""The account every mesh role's user is in (with JetStream)."""
SEQ_HEADER = hn.SEQ
"""On each live event: its ledger sequence (to drop what a later `get` also returns)."""


def tenant_account(tenant: str) -> str:
    """The NATS account of a tenant (`tenant-<T>`)."""
    return f"tenant-{subjects.check_id(tenant, 'tenant')}"


def tenant_user(tenant: str) -> str:
    """The NATS user of a tenant's account (`tenant-<T>`, like its account)."""
    return tenant_account(tenant)


def check_tenants(tenants: Iterable[str]) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for t in tenants:
        out.setdefault(subjects.check_id(t.strip(), "tenant"), None)
    return tuple(out)


@dataclass(frozen=True)
class TenantImport:
    """One export of the mesh account and the tenant account's import of it."""

    kind: Literal["service", "stream"]
    mesh: str
    """The subject in the mesh account."""
    local: str
    """What the tenant account calls it."""


def mappings(tenant: str) -> list[TenantImport]:
    """What a tenant's account imports from the mesh account (see the module's table)."""
    return [
        TenantImport("service", subjects.tenant_submit(tenant), subjects.SUBMIT),
        TenantImport("service", subjects.tenant_memory(tenant), subjects.MEMORY_ALL),
        TenantImport("service", subjects.tenant_task_ops(tenant), f"{subjects.TASK_OPS}.*"),
        TenantImport("stream", subjects.tenant_task_events(tenant), f"{subjects.PREFIX}.task.>"),
    ]


def _q(s: str) -> str:
    return json.dumps(s)


def render_accounts(mesh_users: str, tenants: Sequence[str], passwords: Mapping[str, str]
                    ) -> str:
    """The nats-server `accounts` section: the mesh account (its `users = [...]` block
    given as rendered text, JetStream on, the per-tenant exports) and one account per
    tenant importing them."""
    lines = ["# jetmesh: the mesh's roles in one account, one account per tenant (bus.tenancy).",
             "# Generated by `jetmesh nats-config --tenants`; regenerate when tenants change.",
             "accounts {", f"  {_q(MESH_ACCOUNT)}: {{", "    jetstream: enabled"]
    lines += ["    " + line if line else line for line in mesh_users.rstrip().splitlines()]
    lines.append("    exports = [")
    for t in tenants:
        for m in mappings(t):
            lines.append(f"      {{ {m.kind}: {_q(m.mesh)}, accounts: [{_q(tenant_account(t))}] }}")
    lines += ["    ]", "  }"]
    for t in tenants:
        acct, user = tenant_account(t), tenant_user(t)
        lines += [f"  {_q(acct)}: {{",
                  f"    users = [ {{ user: {_q(user)}, password: {_q(passwords[user])} }} ]",
                  "    imports = ["]
        for m in mappings(t):
            lines.append(f"      {{ {m.kind}: {{ account: {_q(MESH_ACCOUNT)}, subject: "
                         f"{_q(m.mesh)} }}, to: {_q(m.local)} }}")
        lines += ["    ]", "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def tenant_passwords(tenants: Iterable[str], given: Mapping[str, str]) -> dict[str, str]:
    """Each tenant user's password: the one given (kept across regenerations) or new."""
    return {tenant_user(t): given.get(tenant_user(t)) or secrets.token_urlsafe(24)
            for t in tenants}


def render_tenant_env(tenant: str, password: str, url: str | None = None) -> str:
    out = [f"# --- tenant {tenant} (account {tenant_account(tenant)})"]
    if url:
        out.append(f"NATS_URL={url}")
    out += [f"NATS_USER={tenant_user(tenant)}", f"NATS_PASSWORD={password}"]
    return "\n".join(out)


# ----------------------------------------------------------------------------- intake


class TenantMismatch(ValueError):
    """A tenant's submission (or request) that names another tenant."""


def stamp_submission(raw: dict[str, Any], subject: str) -> dict[str, Any]:
    """The submission as the orchestrator takes it from `subject`: on a tenant's subject
    (`jm.tenant.<T>.submit`) its tenant is T whatever the body says; a body naming
    another tenant (field or `metadata.tenant`) or a replay is refused (TenantMismatch),
    and
    `submitted_by` becomes `nats:<T>` (the account is the identity NATS proved). On
    the mesh's own subject the body is taken as it is (the gateway and the CLI are
    trusted to set it)."""
    tenant = subjects.tenant_of(subject)
    if tenant is None:
        if subject.startswith(f"{subjects.TENANT_PREFIX}."):
            # A tenant subject whose token is no tenant id (NATS allows unicode, '%', '$'
            # in a token): not the mesh's own subject, so its body is not trusted.
            token = subject.removeprefix(f"{subjects.TENANT_PREFIX}.").partition(".")[0]
            raise TenantMismatch(f"tenant token {ascii(token)[:40]} of {ascii(subject)[:80]} "
                                 "is not a tenant id")
        return raw
    claimed = raw.get("tenant")
    meta = raw.get("metadata")
    meta_tenant = meta.get("tenant") if isinstance(meta, dict) else None
    for name, value in (("tenant", claimed), ("metadata.tenant", meta_tenant)):
        if value is not None and value != tenant:
            raise TenantMismatch(f"{name} {ascii(value)[:40]} is not this account's tenant "
                                 f"{tenant!r}")
    if raw.get("replay_of") is not None:
        # A replay serves the original's recorded calls: that would read any task's.
        raise TenantMismatch("a tenant account cannot submit replays (replay_of)")
    return {**raw, "tenant": tenant, "submitted_by": f"nats:{tenant_account(tenant)}"}


# ----------------------------------------------------------------------------- ownership


class TaskTenants:
    """Task id -> its tenant, from the task's submission in the ledger (cached: a task's
    tenant never changes). None: no such task (yet), or it has no tenant."""

    def __init__(self, ledger: Ledger, size: int = 50_000) -> None:
        self.ledger = ledger
        self.size = size
        self._known: OrderedDict[str, str | None] = OrderedDict()

    def learn(self, task_id: str, tenant: str | None) -> None:
        self._known[task_id] = tenant
        self._known.move_to_end(task_id)
        while len(self._known) > self.size:
            self._known.popitem(last=False)

    async def submission(self, task_id: str) -> ev.TaskSubmittedData | None:
        entries = await self.ledger.read(task_id, subject=subjects.task_events(task_id),
                                         limit=1)
        for e in entries:
            if isinstance(e.event, ev.TaskSubmitted):
                return e.event.data
        return None

    async def tenant(self, task_id: str) -> str | None:
        if task_id in self._known:
            self._known.move_to_end(task_id)
            return self._known[task_id]
        try:
            subjects.check_id(task_id, "task id")
        except subjects.InvalidIdError:
            return None
        data = await self.submission(task_id)
        if data is None:
            return None  # not cached: its submission may still come
        self.learn(task_id, data.tenant)
        return data.tenant

    async def owns(self, tenant: str, task_id: str) -> bool:
        return await self.tenant(task_id) == tenant


# ----------------------------------------------------------------------------- the service


class GetRequest(BaseModel):
    """`jm.tasks.get`: a task's ledger events from `from_seq` on."""

    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(min_length=1, max_length=128)
    from_seq: int = Field(default=1, ge=1, le=2**63 - 1)
    """A ledger sequence (JetStream's are 64-bit: a larger one is an invalid request)."""
    limit: int = Field(default=500, ge=1, le=5_000)


class CancelRequest(BaseModel):
    """`jm.tasks.cancel`: cancel one of the tenant's tasks."""

    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(min_length=1, max_length=128)
    reason: str = Field(default="canceled by request", max_length=2_000)


class EventOut(BaseModel):
    seq: int
    subject: str
    event: dict[str, Any]


class TaskReply(BaseModel):
    ok: bool
    error: str | None = None
    """`not_found` (no such task of this tenant: another tenant's is not found either),
    `finished` (a cancel of a task that has ended), `invalid_request`,
    `unknown_operation`, `unavailable` (the service failed to answer: ask again)."""
    message: str | None = None
    events: list[EventOut] = Field(default_factory=list)
    more: bool = False
    """True when the reply was cut (size or limit): ask again from the last seq + 1."""


class TenantService:
    """Serves tenant accounts' task reads and the live copy of their tasks' events.

    `start()` subscribes to every tenant's `jm.tenant.*.tasks.*` (queue group: replicas
    share the requests) and, with `relay=True`, follows the ledger from its end and
    republishes each event of a task that has a tenant to `jm.tenant.<T>.task.…`
    (header `Jm-Seq`). Run one relay (two would send each event twice; `get` is safe
    to replicate)."""

    def __init__(self, nc: NATS, js: JetStreamContext, *, relay: bool = True,
                 timeout_s: float = 5.0) -> None:
        self.nc, self.js = nc, js
        self.ledger = Ledger(nc, js, timeout_s=timeout_s)
        self.tenants = TaskTenants(self.ledger)
        self.relay = relay
        self.relayed = 0
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._subs.append(await self.nc.subscribe(
            subjects.ALL_TENANT_TASK_OPS, queue=subjects.TENANT_QUEUE, cb=self._on_request))
        if self.relay:
            # From the ledger's end as it is now: every event appended after start()
            # returns is copied, however late the follow's consumer is created.
            info = await self.js.stream_info(subjects.STREAM_LEDGER)
            start = int(info.state.last_seq) + 1
            self._tasks.append(asyncio.create_task(self._relay(start), name="tenant-relay"))
        await self.nc.flush()

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()

    # -------------------------------------------------------------- relay

    async def _relay(self, from_seq: int) -> None:
        async for entry in self.ledger.follow(from_seq=from_seq):
            try:
                await self._forward(entry)
            except Exception as e:  # one bad event never stops the copy
                log.warning("tenant relay: seq %d (%s) not copied: %s", entry.seq,
                            entry.subject, e)

    async def _forward(self, entry: LedgerEntry) -> None:
        task_id = subjects.task_id_of(entry.subject)
        if task_id is None:
            return
        if isinstance(entry.event, ev.TaskSubmitted):
            self.tenants.learn(task_id, entry.event.data.tenant)
        tenant = await self.tenants.tenant(task_id)
        if tenant is None:
            return
        await self.nc.publish(subjects.tenant_task_events(tenant, entry.subject),
                              entry.event.model_dump_json().encode(),
                              headers={SEQ_HEADER: str(entry.seq)})
        self.relayed += 1

    # -------------------------------------------------------------- requests

    async def _on_request(self, msg: Msg) -> None:
        try:
            reply = await self.handle(msg.subject, msg.data)
        except Exception as e:  # the requester gets a reason, never a timeout
            log.warning("tenant request on %s failed: %s", msg.subject, e)
            reply = TaskReply(ok=False, error="unavailable",
                              message=f"the request failed: {type(e).__name__}")
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(reply.model_dump_json(exclude_none=True).encode())

    async def handle(self, subject: str, data: bytes) -> TaskReply:
        tenant = subjects.tenant_of(subject)
        op = subject.rsplit(".", 1)[-1]
        if tenant is None:
            return TaskReply(ok=False, error="invalid_request", message="no tenant")
        if op not in ("get", "cancel"):
            return TaskReply(ok=False, error="unknown_operation",
                             message=f"unknown task operation {op!r}; known: get, cancel")
        req: GetRequest | CancelRequest
        try:
            req = (GetRequest if op == "get" else CancelRequest).model_validate_json(
                data or b"{}")
        except ValidationError as e:
            return TaskReply(ok=False, error="invalid_request",
                             message=f"invalid {op} request: {e.error_count()} error(s)")
        if not await self.tenants.owns(tenant, req.task_id):
            return TaskReply(ok=False, error="not_found",
                             message=f"no task {req.task_id!r} of tenant {tenant!r}")
        if isinstance(req, CancelRequest):
            return await self._cancel(tenant, req)
        entries = await self.ledger.read(req.task_id, from_seq=req.from_seq,
                                         limit=req.limit + 1, without_logs=True)
        out = TaskReply(ok=True)
        size = 200
        for entry in entries[:req.limit]:
            item = EventOut(seq=entry.seq, subject=entry.subject,
                            event=entry.event.model_dump(mode="json"))
            size += len(item.model_dump_json()) + 1
            if size > MAX_MESSAGE_BYTES - 1024:
                out.more = True
                break
            out.events.append(item)
        out.more = out.more or len(entries) > req.limit
        return out

    async def _cancel(self, tenant: str, req: CancelRequest) -> TaskReply:
        """Ask for the cancel on the task's control subject (the orchestrator acts on
        it), unless the task has ended."""
        own = await self.ledger.read(req.task_id, subject=subjects.task_events(req.task_id))
        if any(isinstance(e.event, ev.TERMINAL_TASK_EVENTS) for e in own):
            return TaskReply(ok=False, error="finished",
                             message=f"task {req.task_id!r} has ended")
        first = own[0].event if own else None
        seq = await self.ledger.append(ev.CancelRequested(
            subject=req.task_id, source="jetmesh/tenants",
            traceparent=first.traceparent if first is not None else None,
            data=ev.CancelRequestedData(reason=req.reason,
                                        by=f"nats:{tenant_account(tenant)}")))
        return TaskReply(ok=True, message=f"cancel requested (seq {seq})")
