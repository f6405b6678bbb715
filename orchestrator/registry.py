"""Live agents of a mesh, for tools, tests and benchmarks: the agent directory's
verified view (jetmesh.agents.registry), one snapshot."""

from __future__ import annotations

from nats.js import JetStreamContext

from jetmesh.agents.directory import LiveAgent
from jetmesh.agents.registry import snapshot
from jetmesh.agents.signing import verifier_from_env

__all__ = ["LiveAgent", "live_agents"]


async def live_agents(js: JetStreamContext, ttl_s: float = 5.0) -> list[LiveAgent]:
    """The live agents whose cards verify (with the key JETMESH_CARD_* names), by name."""
    agents, _ = await snapshot(js, ttl_s=ttl_s, verifier=verifier_from_env())
    return agents
