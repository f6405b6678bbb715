"""The live registry: agent cards in NATS KV, kept alive by heartbeats, verified when signed.

Every replica writes its presence value (`advertise`) under ``<agent>.<replica>`` in the
``jm-agents`` bucket every heartbeat; the value carries the agent's A2A card (JSON, under
``card``). A reader (`Registry`) keeps the entries younger than the TTL, so a replica
killed with SIGKILL drops out within the TTL. With a verifier, a card that is unsigned or
does not verify is refused and its agent is not live; the skills the registry reports
come from the verified card, never from unsigned fields beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from a2a.types import AgentCard
from nats.js import JetStreamContext
from pydantic import ValidationError

from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.bus import subjects
from jetmesh.bus.presence import PresenceEntry, PresenceView

from .cards import card_for_spec, card_from_dict, card_to_dict, skills_from_card
from .directory import LiveAgent, Presence, Replica, parse_presence, select, skills_of
from .errors import CardSignatureError, InvalidCardError
from .signing import CardSigner, CardVerifier

__all__ = [
    "Advertiser",
    "LiveAgent",
    "Registry",
    "Replica",
    "advertise",
    "snapshot",
]

log = logging.getLogger("jetmesh.agents.registry")


@dataclass
class Advertiser:
    """Builds (and signs, once) an agent's card; `value()` is a replica's presence value."""

    spec: AgentSpec
    nats_url: str | None = None
    http_base_url: str | None = None
    signer: CardSigner | None = None
    _card: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def card(self) -> dict[str, Any]:
        if self._card is None:
            card = card_for_spec(self.spec, nats_url=self.nats_url,
                                 http_base_url=self.http_base_url)
            if self.signer is not None:
                card = self.signer.sign(card)
            self._card = card_to_dict(card)
        return self._card

    def value(self, replica: str, *, model: str | None = None,
              started_at: datetime | None = None, steps_done: int = 0) -> dict[str, Any]:
        """The presence value: who, how busy, and the card (the only trusted part)."""
        return {
            "agent": self.spec.name, "replica": replica, "version": self.spec.version,
            "description": self.spec.description, "model": model,
            "skills": [s.model_dump(mode="json") for s in self.spec.skills],
            "started_at": (started_at or datetime.now(UTC)).isoformat(),
            "steps_done": steps_done,
            "card": self.card(),
        }


def advertise(spec: AgentSpec, replica: str, *, model: str | None = None,
              started_at: datetime | None = None, steps_done: int = 0,
              nats_url: str | None = None, http_base_url: str | None = None,
              signer: CardSigner | None = None) -> dict[str, Any]:
    """One presence value including the card (use `Advertiser` to sign only once)."""
    return Advertiser(spec, nats_url, http_base_url, signer).value(
        replica, model=model, started_at=started_at, steps_done=steps_done)


class Registry:
    """Live agents from a `PresenceView` of the agents bucket, cards verified when asked:
    the real agent directory (`jetmesh.agents.directory.Directory`)."""

    def __init__(self, view: PresenceView, *, verifier: CardVerifier | None = None,
                 cache_size: int = 4096) -> None:
        self.view = view
        self.verifier = verifier
        self._logged: dict[str, str] = {}
        self._checked: OrderedDict[str, tuple[AgentCard, list[SkillSpec]] | str] = \
            OrderedDict()
        self._cache_size = cache_size

    @classmethod
    async def open(cls, js: JetStreamContext, *, ttl_s: float = 5.0,
                   verifier: CardVerifier | None = None, replicas: int = 1,
                   wait_s: float = 5.0) -> Registry:
        """Start a view of the agents bucket and wait for its initial values."""
        view = PresenceView(js, subjects.BUCKET_AGENTS, ttl_s, replicas)
        await view.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(view.changed.wait(), wait_s)
        return cls(view, verifier=verifier)

    async def close(self) -> None:
        await self.view.stop()

    # ------------------------------------------------------------------ the Directory port

    @property
    def changed(self) -> asyncio.Event:
        return self.view.changed

    async def start(self) -> None:
        await self.view.start()

    async def stop(self) -> None:
        await self.view.stop()

    async def fresh_skills(self) -> dict[str, SkillSpec]:
        """The live skills read from the bucket now, not from the view (which lags when
        the loop is saturated)."""
        return skills_of(await self.fresh_agents())

    async def fresh_agents(self) -> list[LiveAgent]:
        """The live agents read from the bucket now (a second registry, closed after)."""
        reg = await Registry.open(self.view.js, ttl_s=self.view.ttl_s, verifier=self.verifier,
                                  replicas=self.view.replicas, wait_s=2.0)
        # The same verifier: the cards this registry checked need no second check (one
        # card's parse and validation took ~40 ms on the fan-out benchmark, once a second
        # for the planner's fresh read).
        reg._checked = self._checked
        try:
            return reg.agents()
        finally:
            await reg.close()

    # ------------------------------------------------------------------ admission

    def _admit(self, entry: PresenceEntry) -> tuple[AgentCard, list[SkillSpec]] | str:
        """The entry's card and skills, or the reason it is refused."""
        presence = parse_presence(entry.key, entry.value)
        raw = presence.card
        if raw is None:
            if self.verifier is not None:
                return "unsigned: the presence value carries no card"
            return self._legacy(presence)
        digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
        cached = self._checked.get(digest)
        if cached is not None:
            self._checked.move_to_end(digest)
            return cached
        result: tuple[AgentCard, list[SkillSpec]] | str
        try:
            card = card_from_dict(raw)
            if self.verifier is not None:
                self.verifier.verify(card)
            result = (card, skills_from_card(card))
        except (InvalidCardError, CardSignatureError, ValidationError) as e:
            result = str(e)
        self._checked[digest] = result
        while len(self._checked) > self._cache_size:
            self._checked.popitem(last=False)
        return result

    @staticmethod
    def _legacy(value: Presence) -> tuple[AgentCard, list[SkillSpec]] | str:
        """A presence value from before cards: build the card from its fields."""
        try:
            skills = [SkillSpec.model_validate(s) for s in value.skills]
            spec = AgentSpec(name=value.agent, description=value.description or "agent",
                             version=value.version or "0.0.0", skills=skills)
        except (ValidationError, ValueError) as e:
            return f"unreadable presence value: {e}"
        return card_for_spec(spec), skills

    # ------------------------------------------------------------------ queries

    def _scan(self) -> tuple[list[LiveAgent], dict[str, str]]:
        by_name: dict[str, LiveAgent] = {}
        newest: dict[str, datetime] = {}
        refused: dict[str, str] = {}
        for entry in self.view.live():
            admitted = self._admit(entry)
            if isinstance(admitted, str):
                refused[entry.key] = admitted
                continue
            card, skills = admitted
            p = parse_presence(entry.key, entry.value)
            rep = Replica(entry.key, p.replica, entry.updated, p.model, p.steps_done,
                          p.breakers)
            agent = by_name.get(card.name)
            if agent is None or entry.updated > newest[card.name]:
                # the newest replica's card describes the agent (rolling upgrades)
                reps = agent.replicas if agent else []
                agent = by_name[card.name] = LiveAgent(card.name, card.version, card, skills,
                                                       reps, signed=bool(card.signatures),
                                                       tenants=p.tenants)
                newest[card.name] = entry.updated
            agent.replicas.append(rep)
        for key, reason in refused.items():
            if self._logged.get(key) != reason:
                log.warning("registry: refused %s: %s", key, reason)
        self._logged = refused
        return sorted(by_name.values(), key=lambda a: a.name), refused

    def agents(self, *, skill: str | None = None, tag: str | None = None) -> list[LiveAgent]:
        """Live agents (sorted by name), optionally only those offering `skill` / `tag`."""
        return select(self._scan()[0], skill=skill, tag=tag)

    def refused(self) -> dict[str, str]:
        """Live presence keys whose card was refused, with the reason."""
        return self._scan()[1]

    def agent(self, name: str) -> LiveAgent | None:
        return next((a for a in self.agents() if a.name == name), None)

    def skills(self) -> dict[str, SkillSpec]:
        """Live skills by id (first agent by name wins): what the planner may use."""
        return skills_of(self.agents())

    def replicas_per_skill(self) -> dict[str, int]:
        """How many live replicas serve each skill."""
        counts: dict[str, int] = {}
        for a in self.agents():
            for sid in a.skill_ids:
                counts[sid] = counts.get(sid, 0) + len(a.replicas)
        return counts


async def snapshot(js: JetStreamContext, *, ttl_s: float = 5.0,
                   verifier: CardVerifier | None = None, skill: str | None = None,
                   tag: str | None = None) -> tuple[list[LiveAgent], dict[str, str]]:
    """One look at the registry (for ``jetmesh agents``): live agents and refused keys."""
    reg = await Registry.open(js, ttl_s=ttl_s, verifier=verifier)
    try:
        return reg.agents(skill=skill, tag=tag), reg.refused()
    finally:
        await reg.close()
