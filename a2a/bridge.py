"""Outward A2A: external agents added by URL become routable skills of the mesh.

``jetmesh agents-add URL`` fetches the agent's card (the SDK's card resolver; signature
checked when a verify key is set) and stores it in the ``jm-external-agents`` bucket. The
bridge worker serves every stored agent: for each it runs an ordinary jetmesh `Worker`
whose skills are the card's skills, each served directly (no model) by a tool that sends
the step input to the external agent over A2A HTTP (the SDK client). The worker runtime
records the exchange like any tool call: StepStarted, ToolCalled (``tool`` is
``a2a:<url>#<skill>``, arguments = the step input, output = the answer), StepCompleted or
StepFailed; the output is checked against the skill's output schema from the card.

The message id sent is ``<task>-<step>``, so a redelivered step asks again with the same
id; a jetmesh gateway on the other side derives its task id from it and does not run the
step twice.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from a2a.client import A2ACardResolver, ClientConfig, ClientFactory
from a2a.client.errors import A2AClientError
from a2a.types import AgentCard, Message, Part, Role, SendMessageRequest, Task
from a2a.types import TaskState as A2AState
from google.protobuf.json_format import MessageToDict
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from pydantic import BaseModel, ConfigDict

from jetmesh.agents.cards import card_from_dict, card_to_dict, skills_from_card
from jetmesh.agents.signing import CardVerifier
from jetmesh.agents.spec import AgentSpec, Limits, schema_errors
from jetmesh.agents.tools import Tool, ToolContext
from jetmesh.agents.worker import Worker
from jetmesh.bus import subjects
from jetmesh.bus.kvscan import current_entries
from jetmesh.bus.presence import ensure_bucket
from jetmesh.bus.settings import BusSettings
from jetmesh.bus.tracing import traced

from .errors import ExternalAgentError
from .tasks import plain

log = logging.getLogger("jetmesh.bridge")

__all__ = [
    "ExternalAgent",
    "add_external",
    "bridge_spec",
    "list_external",
    "remove_external",
    "start_bridge",
]

_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ExternalAgent:
    """An external A2A agent as stored in the bucket."""

    name: str
    """The bridged agent's name in this mesh (``ext-<card name>``)."""
    url: str
    card: AgentCard
    added_at: str

    def to_json(self) -> bytes:
        return json.dumps({"name": self.name, "url": self.url, "card": card_to_dict(self.card),
                           "added_at": self.added_at}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ExternalAgent:
        d = json.loads(raw)
        return cls(d["name"], d["url"], card_from_dict(d["card"]), d["added_at"])


def bridged_name(card: AgentCard) -> str:
    return "ext-" + (_SAFE.sub("-", card.name).strip("-") or "agent")[:60]


async def _bucket(js: JetStreamContext) -> Any:
    from jetmesh.bus.settings import BusSettings

    return await ensure_bucket(js, subjects.BUCKET_EXTERNAL, max_age_s=0.0,
                               replicas=BusSettings().replicas)


async def add_external(js: JetStreamContext, url: str, *,
                       verifier: CardVerifier | None = None,
                       http: httpx.AsyncClient | None = None) -> ExternalAgent:
    """Fetch the card at `url` (its base; the card is at /.well-known/agent-card.json)."""
    own = http is None
    client = http or httpx.AsyncClient(timeout=10.0)
    try:
        card = await A2ACardResolver(client, url).get_agent_card()
    except Exception as e:
        raise ExternalAgentError(url, f"cannot fetch its card: {e}") from e
    finally:
        if own:
            await client.aclose()
    if verifier is not None:
        verifier.verify(card)
    if not card.skills:
        raise ExternalAgentError(url, "its card offers no skills")
    agent = ExternalAgent(bridged_name(card), url, card, datetime.now(UTC).isoformat())
    kv = await _bucket(js)
    await kv.put(agent.name, agent.to_json())
    return agent


async def list_external(js: JetStreamContext) -> list[ExternalAgent]:
    """The registered external agents, by name (a complete read: bus/kvscan). A value
    that is not a registration (another writer, a bad upgrade) is left out with a
    warning: one bad entry does not keep the bridge from serving the others."""
    await _bucket(js)
    out = []
    for entry in await current_entries(js, subjects.BUCKET_EXTERNAL):
        try:
            out.append(ExternalAgent.from_json(entry.value))
        except Exception as e:
            log.warning("external agent %s is not readable, left out: %s: %s", entry.key,
                        type(e).__name__, str(e)[:200])
    return sorted(out, key=lambda a: a.name)


async def remove_external(js: JetStreamContext, name: str) -> None:
    kv = await _bucket(js)
    await kv.delete(name)


class _Anything(BaseModel):
    model_config = ConfigDict(extra="allow")


def _data_of(parts: Any) -> dict[str, Any] | None:
    for p in parts:
        if p.WhichOneof("content") == "data":
            value = plain(MessageToDict(p.data))
            return value if isinstance(value, dict) else {"result": value}
    return None


def _text_of(parts: Any) -> str:
    return "\n".join(p.text for p in parts if p.WhichOneof("content") == "text")


def answer_of(task: Task | None, message: Message | None, skill: str,
              output_schema: dict[str, Any]) -> dict[str, Any]:
    """The step output in an A2A answer: the skill's artifact (jetmesh names step artifacts
    by skill), else the last artifact with data, else the message's data, else its text."""
    if message is not None:
        return _data_of(message.parts) or {"text": _text_of(message.parts)}
    assert task is not None
    if task.status.state != A2AState.TASK_STATE_COMPLETED:
        why = _text_of(task.status.message.parts) if task.status.HasField("message") else ""
        raise RuntimeError(f"remote task {task.id} ended {A2AState.Name(task.status.state)}"
                           + (f": {why}" if why else ""))
    named = [a for a in task.artifacts if a.name == skill]
    candidates = named + list(reversed(task.artifacts))
    for art in candidates:
        data = _data_of(art.parts)
        if data is not None and not schema_errors(output_schema, data):
            return data
    for art in candidates:
        data = _data_of(art.parts)
        if data is not None:
            return data
    text = _text_of(task.status.message.parts) if task.status.HasField("message") else ""
    return {"text": text}


def _caller(agent: ExternalAgent, skill: str, output_schema: dict[str, Any],
            http: httpx.AsyncClient) -> Callable[[_Anything, ToolContext],
                                                 Awaitable[dict[str, Any]]]:
    factory = ClientFactory(ClientConfig(streaming=False, httpx_client=http))

    async def call(args: _Anything, ctx: ToolContext) -> dict[str, Any]:
        client = factory.create(agent.card)
        part = Part(media_type="application/json")
        part.data.struct_value.update(args.model_dump(mode="json"))
        msg = Message(message_id=f"{ctx.task_id}-{ctx.step_id}", role=Role.ROLE_USER,
                      parts=[part])
        msg.metadata.update({"skill": skill})
        try:
            async with client:
                async for resp in client.send_message(SendMessageRequest(message=msg)):
                    task = resp.task if resp.HasField("task") else None
                    message = resp.message if resp.HasField("message") else None
                    return answer_of(task, message, skill, output_schema)
        except A2AClientError as e:
            raise ExternalAgentError(agent.url, str(e)) from e
        raise ExternalAgentError(agent.url, "no answer")

    return call


def bridge_spec(agent: ExternalAgent, http: httpx.AsyncClient, *,
                timeout_s: float = 120.0) -> AgentSpec:
    """A jetmesh spec serving the external agent's skills, each by one A2A-calling tool."""
    skills = skills_from_card(agent.card)
    tools = []
    direct = {}
    for s in skills:
        name = f"a2a:{agent.url}#{s.id}"
        tools.append(Tool(name=name, description=f"{s.name} at {agent.url} (A2A)",
                          input_model=_Anything, output_model=_Anything,
                          fn=_caller(agent, s.id, s.output_schema, http),
                          side_effects=True, timeout_s=timeout_s))
        direct[s.id] = name
    return AgentSpec(name=agent.name, description=agent.card.description or agent.name,
                     version=agent.card.version or "0.0.0",
                     instructions=f"Bridge to the A2A agent at {agent.url}.",
                     skills=skills, tools=tools, direct=direct,
                     limits=Limits(step_timeout_s=timeout_s + 5, max_tool_calls=1))


@dataclass
class Bridge:
    """Workers for every stored external agent. `stop()` drains them."""

    workers: list[Worker] = field(default_factory=list)
    http: httpx.AsyncClient = field(  # `traced`: A2A calls carry the step's trace context
        default_factory=lambda: traced(httpx.AsyncClient(timeout=130.0)))

    async def stop(self) -> None:
        for w in self.workers:
            await w.stop(grace_s=5)
        await self.http.aclose()


async def start_bridge(nc: NATS, js: JetStreamContext, *,
                       bus_settings: BusSettings | None = None,
                       heartbeat_s: float = 1.0) -> Bridge:
    """Serve every external agent in the bucket (one worker each)."""
    bridge = Bridge()
    for agent in await list_external(js):
        w = Worker(bridge_spec(agent, bridge.http), None, nc, js,
                   bus_settings or BusSettings(), heartbeat_s=heartbeat_s)
        await w.start()
        bridge.workers.append(w)
    return bridge
