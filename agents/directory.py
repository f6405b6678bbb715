"""The agent directory port: which agents are live, with which skills.

One `LiveAgent` type and one presence parser (`parse_presence`) for every reader. The
real directory is `jetmesh.agents.registry.Registry` (presence entries in NATS KV, each
agent's A2A card verified when signed); `InMemoryDirectory` is the stand-in for tests.
Both answer the `Directory` protocol, which is what the orchestrator is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from a2a.types import AgentCard

from jetmesh.agents.cards import card_for_spec
from jetmesh.agents.spec import AgentSpec, SkillSpec

__all__ = ["Directory", "InMemoryDirectory", "LiveAgent", "Presence", "Replica",
           "parse_presence"]


@dataclass(frozen=True)
class Presence:
    """A replica's presence value, parsed (what `Advertiser.value` writes). Only `card`
    is trusted (verified when signed); the other fields describe the replica's load."""

    key: str
    agent: str
    replica: str
    version: str = ""
    description: str = ""
    model: str | None = None
    steps_done: int = 0
    breakers: dict[str, dict[str, Any]] = field(default_factory=dict)
    card: dict[str, Any] | None = None
    skills: list[dict[str, Any]] = field(default_factory=list)
    """The unsigned skill list beside the card (presence values from before cards)."""
    tenants: list[str] | None = None
    """The tenants a private agent serves (AgentSpec.tenants); None: every tenant."""


def parse_presence(key: str, value: dict[str, Any]) -> Presence:
    """The one parser of presence values: never raises, odd fields read as absent."""
    def text(name: str, default: str = "") -> str:
        v = value.get(name)
        return v if isinstance(v, str) else default

    steps = value.get("steps_done")
    breakers = value.get("breakers")
    card = value.get("card")
    skills = value.get("skills")
    tenants = value.get("tenants")
    return Presence(
        key=key, agent=text("agent", "?"), replica=text("replica", key),
        version=text("version"), description=text("description"),
        model=value.get("model") if isinstance(value.get("model"), str) else None,
        steps_done=steps if isinstance(steps, int) and not isinstance(steps, bool) else 0,
        breakers={str(k): v for k, v in breakers.items() if isinstance(v, dict)}
        if isinstance(breakers, dict) else {},
        card=card if isinstance(card, dict) else None,
        skills=[s for s in skills if isinstance(s, dict)] if isinstance(skills, list) else [],
        tenants=[t for t in tenants if isinstance(t, str)] if isinstance(tenants, list)
        else None)


@dataclass(frozen=True)
class Replica:
    key: str
    replica: str
    updated: datetime
    model: str | None = None
    steps_done: int = 0
    breakers: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class LiveAgent:
    """One agent with at least one live replica, and its (verified) card."""

    name: str
    version: str
    card: AgentCard
    skills: list[SkillSpec]
    replicas: list[Replica] = field(default_factory=list)
    signed: bool = False
    tenants: list[str] | None = None
    """Private to these tenants (their steps go to `subjects.private_work`); None: shared."""

    def private_to(self, tenant: str | None) -> bool:
        """Whether this is a private agent of `tenant`."""
        return tenant is not None and self.tenants is not None and tenant in self.tenants

    @property
    def skill_ids(self) -> list[str]:
        return [s.id for s in self.skills]

    @property
    def tags(self) -> set[str]:
        return {t for s in self.skills for t in s.tags}

    @property
    def model(self) -> str | None:
        """The newest replica's model."""
        newest = max(self.replicas, key=lambda r: r.updated, default=None)
        return newest.model if newest is not None else None

    @property
    def breakers(self) -> dict[str, dict[str, Any]]:
        """Circuit breakers by name, the worst state across replicas (open first)."""
        out: dict[str, dict[str, Any]] = {}
        for rep in self.replicas:
            for name, state in rep.breakers.items():
                if out.get(name, {}).get("state", "closed") == "closed":
                    out[name] = state
        return out


def select(agents: Iterable[LiveAgent], *, skill: str | None = None,
           tag: str | None = None) -> list[LiveAgent]:
    """Agents sorted by name, optionally only those offering `skill` / `tag`."""
    out = sorted(agents, key=lambda a: a.name)
    if skill is not None:
        out = [a for a in out if skill in a.skill_ids]
    if tag is not None:
        out = [a for a in out if tag in a.tags]
    return out


def visible_to(agents: Iterable[LiveAgent], tenant: str | None) -> list[LiveAgent]:
    """The agents a task of `tenant` may use: the shared ones and its own private ones
    (another tenant's private agent is not offered to its planner)."""
    return [a for a in agents if a.tenants is None or a.private_to(tenant)]


def skills_of(agents: Iterable[LiveAgent]) -> dict[str, SkillSpec]:
    """Live skills by id (first agent by name wins): what the planner may use."""
    out: dict[str, SkillSpec] = {}
    for a in sorted(agents, key=lambda a: a.name):
        for s in a.skills:
            out.setdefault(s.id, s)
    return out


class Directory(Protocol):
    """The live agents of a mesh."""

    @property
    def changed(self) -> asyncio.Event:
        """Set when an agent came, went or changed (the reader clears it)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def agents(self, *, skill: str | None = None, tag: str | None = None
               ) -> list[LiveAgent]: ...

    def skills(self) -> dict[str, SkillSpec]: ...

    def refused(self) -> dict[str, str]:
        """Live presence keys whose card was refused, with why."""
        ...

    async def fresh_skills(self) -> dict[str, SkillSpec]:
        """The live skills read from the store now (a view may lag)."""
        ...

    async def fresh_agents(self) -> list[LiveAgent]:
        """The live agents read from the store now (a view may lag)."""
        ...


class InMemoryDirectory:
    """A directory held in memory: agents are live from `add` until `remove`."""

    def __init__(self, specs: Iterable[AgentSpec] = ()) -> None:
        self.changed = asyncio.Event()
        self._agents: dict[str, LiveAgent] = {}
        for spec in specs:
            self.add(spec)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def add(self, spec: AgentSpec, replicas: int = 1, *, card: AgentCard | None = None
            ) -> LiveAgent:
        now = datetime.now(UTC)
        agent = LiveAgent(spec.name, spec.version, card or card_for_spec(spec),
                          list(spec.skills),
                          [Replica(f"{spec.name}.{i}", f"{spec.name}-{i}", now)
                           for i in range(1, replicas + 1)], tenants=spec.tenants)
        self._agents[spec.name] = agent
        self.changed.set()
        return agent

    def remove(self, name: str) -> None:
        if self._agents.pop(name, None) is not None:
            self.changed.set()

    def agents(self, *, skill: str | None = None, tag: str | None = None
               ) -> list[LiveAgent]:
        return select(self._agents.values(), skill=skill, tag=tag)

    def skills(self) -> dict[str, SkillSpec]:
        return skills_of(self._agents.values())

    def refused(self) -> dict[str, str]:
        return {}

    async def fresh_skills(self) -> dict[str, SkillSpec]:
        return self.skills()

    async def fresh_agents(self) -> list[LiveAgent]:
        return self.agents()
