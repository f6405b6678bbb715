"""The kill switch: tools, agents and MCP servers disabled at run time, in NATS KV.

A rule in the `jm-killswitch` bucket disables one tool, every tool of one agent, or every
tool of one MCP server (tools named `<server>__<tool>`), optionally only for one agent
and/or one tenant. The operator writes rules (`jetmesh tools disable` / `enable`, the
admin role); every worker replica keeps a live copy through a KV watch (an ordered push
consumer: a put reaches every replica in milliseconds) and its guard checks the copy
before each tool call, so a disabled tool is refused at its next call in every replica,
without a redeploy. The refusal is recorded as a policy decision (rule
`killswitch:<key>`) and told to the model like a policy denial.

Matching is a pure function (`blocking_rule`); only `KillSwitchBoard` and
`KillSwitchWatch` speak NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Literal, Protocol

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jetmesh.bus import subjects
from jetmesh.bus.kvscan import current_entries
from jetmesh.bus.presence import ensure_bucket

log = logging.getLogger(__name__)

Kind = Literal["tool", "agent", "server"]
MCP_SEPARATOR = "__"
"""MCP tools are named `<server>__<tool>` (jetmesh.agents.mcp)."""


class KillRule(BaseModel):
    """One disabled tool, agent or MCP server (the value of one `jm-killswitch` key)."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind
    name: str
    """The tool's, the agent's or the MCP server's name."""
    agent: str | None = None
    """Only for this agent (None: every agent)."""
    tenant: str | None = None
    """Only for this tenant's tasks (None: every tenant)."""
    reason: str = ""
    by: str = "operator"
    """Who disabled it."""
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("name", "agent", "tenant")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        return None if v is None else subjects.check_id(v, "name")

    @property
    def key(self) -> str:
        return subjects.killswitch_key(self.kind, self.name, self.agent, self.tenant)

    def describe(self) -> str:
        where = "".join([f" for agent {self.agent}" if self.agent else "",
                         f" for tenant {self.tenant}" if self.tenant else ""])
        why = f": {self.reason}" if self.reason else ""
        return f"{self.kind} {self.name} disabled{where} by {self.by}{why}"


def matches(rule: KillRule, tool: str | None, agent: str, tenant: str | None) -> bool:
    """Pure: whether `rule` refuses a call of `tool` (None: any call) by `agent` for
    `tenant`."""
    if rule.agent is not None and rule.agent != agent:
        return False
    if rule.tenant is not None and rule.tenant != tenant:
        return False
    if rule.kind == "agent":
        return rule.name == agent
    if tool is None:
        return False
    if rule.kind == "tool":
        return rule.name == tool
    return tool.startswith(rule.name + MCP_SEPARATOR)


def blocking_rule(rules: Iterable[KillRule], tool: str | None, agent: str,
                  tenant: str | None) -> KillRule | None:
    """Pure: the first rule (by key, so the answer is stable) refusing this call."""
    for rule in sorted(rules, key=lambda r: r.key):
        if matches(rule, tool, agent, tenant):
            return rule
    return None


class KillSwitchView(Protocol):
    """What a guard asks before a call (a live watch, or a fixed set in tests)."""

    def check(self, tool: str | None, agent: str, tenant: str | None) -> KillRule | None:
        ...


class StaticKillSwitch:
    """A fixed set of rules (tests, dry runs)."""

    def __init__(self, rules: Iterable[KillRule] = ()) -> None:
        self.rules = list(rules)

    def check(self, tool: str | None, agent: str, tenant: str | None) -> KillRule | None:
        return blocking_rule(self.rules, tool, agent, tenant)


async def _bucket(js: JetStreamContext, replicas: int) -> KeyValue:
    # No TTL: a rule stays until it is enabled again.
    return await ensure_bucket(js, subjects.BUCKET_KILLSWITCH, replicas=replicas,
                               max_age_s=0.0)


class KillSwitchBoard:
    """The operator's side: write, remove and list rules (the admin role)."""

    def __init__(self, js: JetStreamContext, *, replicas: int = 1) -> None:
        self.js, self.replicas = js, replicas

    async def disable(self, rule: KillRule) -> KillRule:
        kv = await _bucket(self.js, self.replicas)
        await kv.put(rule.key, rule.model_dump_json().encode())
        return rule

    async def enable(self, kind: Kind, name: str, *, agent: str | None = None,
                     tenant: str | None = None) -> bool:
        """Remove the rule; False if there was none."""
        kv = await _bucket(self.js, self.replicas)
        key = subjects.killswitch_key(kind, name, agent, tenant)
        try:
            await kv.get(key)
        except KeyNotFoundError:
            return False
        await kv.delete(key)
        return True

    async def list(self) -> list[KillRule]:
        try:
            kv = await self.js.key_value(subjects.BUCKET_KILLSWITCH)
        except (BucketNotFoundError, NotFoundError):
            return []
        del kv
        out: list[KillRule] = []
        for entry in await current_entries(self.js, subjects.BUCKET_KILLSWITCH):
            try:
                out.append(KillRule.model_validate_json(entry.value))
            except ValidationError as e:  # listed by no one, refused loudly
                log.error("kill switch: unreadable rule %s left out: %s", entry.key, e)
        return sorted(out, key=lambda r: r.key)


class KillSwitchWatch:
    """A worker replica's live copy of the rules (a KV watch over the bucket)."""

    def __init__(self, js: JetStreamContext, *, replicas: int = 1) -> None:
        self.js, self.replicas = js, replicas
        self.rules: dict[str, KillRule] = {}
        self.changed = asyncio.Event()
        """Set (and cleared by whoever waits) on every change applied: tests wait on it."""
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None

    def check(self, tool: str | None, agent: str, tenant: str | None) -> KillRule | None:
        return blocking_rule(self.rules.values(), tool, agent, tenant)

    def _apply(self, entry: KeyValue.Entry) -> None:
        if entry.operation in (KV_DEL, KV_PURGE):
            self.rules.pop(entry.key, None)
        else:
            self._put(entry.key, entry.value or b"")
        self.changed.set()

    def _put(self, key: str, value: bytes) -> None:
        try:
            rule = KillRule.model_validate_json(value)
        except ValidationError as e:
            # A bad rule is refused loudly and does not unblock anything else.
            log.error("kill switch: unreadable rule %s ignored: %s", key, e)
            return
        self.rules[key] = rule

    async def start(self) -> None:
        """Load the current rules, then follow changes (returns once every current rule
        is loaded: read completely first, since the watch's own end-of-initial-values
        marker can come before the values; see bus/kvscan)."""
        kv = await _bucket(self.js, self.replicas)
        try:
            for entry in await current_entries(self.js, subjects.BUCKET_KILLSWITCH):
                self._put(entry.key, entry.value)
        except (NatsError, TimeoutError) as e:  # the watch below still loads them
            log.warning("kill switch: one-pass read of the rules failed (%s); loading "
                        "them from the watch", e)
        self._watcher = await kv.watchall()
        while (entry := await self._watcher.updates(  # type: ignore[no-untyped-call]
                timeout=10.0)) is not None:
            self._apply(entry)
        self._task = asyncio.create_task(self._follow(), name="killswitch-watch")

    async def _follow(self) -> None:
        assert self._watcher is not None
        async for entry in self._watcher:
            if entry is not None:
                self._apply(entry)

    async def stop(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()  # type: ignore[no-untyped-call]
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
