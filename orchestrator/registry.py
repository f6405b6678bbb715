"""Reading the live-agent registry (presence entries in the `jm-agents` bucket)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from nats.js import JetStreamContext

from jetmesh.bus import subjects
from jetmesh.bus.presence import PresenceView


@dataclass
class LiveAgent:
    name: str
    version: str
    model: str | None
    skills: list[str]
    replicas: list[str] = field(default_factory=list)
    tags: set[str] = field(default_factory=set)
    """Every tag of every skill."""
    breakers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Circuit breakers by name, the worst state across replicas."""


async def live_agents(js: JetStreamContext, ttl_s: float = 5.0) -> list[LiveAgent]:
    """A snapshot of live agents grouped by name, with their replicas."""
    view = PresenceView(js, subjects.BUCKET_AGENTS, ttl_s)
    await view.start()
    try:
        await asyncio.wait_for(view.changed.wait(), 5.0)
    except TimeoutError:
        pass
    finally:
        await view.stop()
    by_name: dict[str, LiveAgent] = {}
    for entry in view.live():
        v = entry.value
        a = by_name.setdefault(v.get("agent", "?"), LiveAgent(
            name=v.get("agent", "?"), version=v.get("version", ""), model=v.get("model"),
            skills=[s.get("id", "?") for s in v.get("skills", [])]))
        a.replicas.append(v.get("replica", entry.key))
        a.tags.update(t for sk in v.get("skills", []) for t in sk.get("tags", []))
        for bname, state in (v.get("breakers") or {}).items():
            if a.breakers.get(bname, {}).get("state", "closed") == "closed":
                a.breakers[bname] = state
    return sorted(by_name.values(), key=lambda a: a.name)
