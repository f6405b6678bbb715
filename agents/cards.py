"""A2A 1.0 agent cards derived from agent specs, and skill specs read back from cards.

A card lists its interfaces in order of preference. jetmesh puts its NATS binding first:

* ``protocolBinding`` is `NATS_BINDING` (a URI of ours, as A2A 1.0 allows for custom
  transports);
* ``url`` is ``nats://<host:port>/<subject>``. For an agent's card the subject is the RFC
  6570 template ``jm.work.{skill}``: a step command for skill ``s`` of this card goes to
  ``jm.work.s``. For the mesh's own card it is ``jm.task.submit``, where any NATS client
  publishes a task (see the README).

When an HTTP gateway runs, JSON-RPC and HTTP+JSON interfaces follow. Each skill's input
and output JSON Schemas travel in the `SKILL_SCHEMAS_EXTENSION` entry of
``capabilities.extensions`` (``params.skills.<id>.input`` / ``.output``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from a2a.types import AgentCapabilities, AgentCard, AgentExtension, AgentInterface, AgentSkill
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, TransportProtocol
from a2a.utils.proto_utils import validate_proto_required_fields
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError

from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.bus import subjects

from .errors import InvalidCardError

__all__ = [
    "JSON_MEDIA",
    "MCP_TOOLS_EXTENSION",
    "NATS_BINDING",
    "SKILL_SCHEMAS_EXTENSION",
    "agent_http_base",
    "card_for_spec",
    "card_from_dict",
    "card_from_json",
    "card_to_dict",
    "card_to_json",
    "http_interfaces",
    "mesh_card",
    "nats_interface_url",
    "plain",
    "skill_schemas",
    "skills_from_card",
    "validate_card",
]

NATS_BINDING = "https://jetmesh.dev/a2a/nats/v1"
"""``protocolBinding`` of jetmesh's A2A binding over NATS/JetStream."""
SKILL_SCHEMAS_EXTENSION = "https://jetmesh.dev/a2a/ext/skill-schemas/v1"
"""Extension whose params carry every skill's input and output JSON Schema."""
JSON_MEDIA = "application/json"
TEXT_MEDIA = "text/plain"
MESH_NAME = "jetmesh"
WORK_TEMPLATE = f"{subjects.PREFIX}.work.{{skill}}"
"""The subject template in an agent card's NATS interface url."""


_MAX_EXACT = 2 ** 53


def plain(value: Any) -> Any:
    """`value` with every integral float made an int, recursively.

    protobuf's ``Struct`` (A2A metadata, data parts, the card's extension params) holds
    every number as a double, so ``MessageToDict`` gives ``32.0`` for ``32``; JSON does
    not tell them apart, but a JSON Schema ``integer`` and a reader's eye do."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT:
        return int(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _server_part(nats_url: str | None) -> str:
    """``host:port`` of the first server in `nats_url`, credentials dropped."""
    if not nats_url:
        return ""
    first = nats_url.split(",")[0].strip()
    parts = urlsplit(first if "://" in first else f"nats://{first}")
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{host}:{parts.port}" if parts.port else host


def nats_interface_url(nats_url: str | None, subject: str) -> str:
    """``nats://host:port/<subject>`` (``nats:///<subject>`` when the server is not known)."""
    return f"nats://{_server_part(nats_url)}/{subject}"


def agent_http_base(http_base_url: str, agent: str) -> str:
    """Where the gateway serves one agent (its card at ``/.well-known/agent-card.json``)."""
    return f"{http_base_url.rstrip('/')}/agents/{agent}"


def http_interfaces(base: str) -> list[AgentInterface]:
    base = base.rstrip("/")
    return [
        AgentInterface(url=f"{base}/", protocol_binding=TransportProtocol.JSONRPC.value,
                       protocol_version=PROTOCOL_VERSION_CURRENT),
        AgentInterface(url=base, protocol_binding=TransportProtocol.HTTP_JSON.value,
                       protocol_version=PROTOCOL_VERSION_CURRENT),
    ]


def _skill(s: SkillSpec) -> AgentSkill:
    # A2A 1.0 requires at least one tag per skill; a skill without tags gets its id.
    return AgentSkill(id=s.id, name=s.name, description=s.description, tags=list(s.tags) or [s.id],
                      examples=list(s.examples), input_modes=[JSON_MEDIA, TEXT_MEDIA],
                      output_modes=[JSON_MEDIA] if s.structured else [TEXT_MEDIA, JSON_MEDIA])


def _schemas_extension(skills: Iterable[SkillSpec]) -> AgentExtension:
    ext = AgentExtension(
        uri=SKILL_SCHEMAS_EXTENSION, required=False,
        description="Each skill's input and output JSON Schema (Draft 2020-12); "
                    "inputs are checked before a step reaches a worker.")
    ext.params.update({"skills": {s.id: {"input": s.input_schema, "output": s.output_schema}
                                  for s in skills}})
    return ext


MCP_TOOLS_EXTENSION = "https://jetmesh.dev/a2a/ext/mcp-tools/v1"
"""Card extension: per MCP server the agent uses, the hash of the tool list it runs
with (``params.servers.<name>``), pinned when the worker started."""


def _mcp_extension(hashes: dict[str, str]) -> AgentExtension:
    ext = AgentExtension(
        uri=MCP_TOOLS_EXTENSION, required=False,
        description="The hash of each MCP server's tool list this agent was started with; "
                    "a changed list is refused or accepted per configuration, and recorded.")
    ext.params.update({"servers": dict(sorted(hashes.items()))})
    return ext


def card_for_spec(spec: AgentSpec, *, nats_url: str | None = None,
                  http_base_url: str | None = None,
                  documentation_url: str | None = None) -> AgentCard:
    """The A2A 1.0 card of an agent: NATS binding first, then the gateway's HTTP ones.

    `nats_url` is the server the agent is reached through (credentials are dropped);
    `http_base_url` is the gateway's base URL, when one serves this agent.
    """
    interfaces = [AgentInterface(url=nats_interface_url(nats_url, WORK_TEMPLATE),
                                 protocol_binding=NATS_BINDING,
                                 protocol_version=PROTOCOL_VERSION_CURRENT)]
    if http_base_url:
        interfaces += http_interfaces(agent_http_base(http_base_url, spec.name))
    card = AgentCard(
        name=spec.name, description=spec.description, version=spec.version,
        supported_interfaces=interfaces,
        capabilities=AgentCapabilities(streaming=True, push_notifications=False,
                                       extensions=[_schemas_extension(spec.skills)]),
        default_input_modes=[JSON_MEDIA, TEXT_MEDIA],
        default_output_modes=[JSON_MEDIA, TEXT_MEDIA],
        skills=[_skill(s) for s in spec.skills],
    )
    if spec.mcp_tool_hashes:
        card.capabilities.extensions.append(_mcp_extension(spec.mcp_tool_hashes))
    if documentation_url:
        card.documentation_url = documentation_url
    return card


def mesh_card(skills: Iterable[SkillSpec], *, base_url: str | None = None,
              nats_url: str | None = None, name: str = MESH_NAME, version: str = "0.1.0",
              description: str | None = None) -> AgentCard:
    """The gateway's own card: the mesh as one agent whose skills are the live skills."""
    live = sorted(skills, key=lambda s: s.id)
    interfaces = [AgentInterface(url=nats_interface_url(nats_url, subjects.SUBMIT),
                                 protocol_binding=NATS_BINDING,
                                 protocol_version=PROTOCOL_VERSION_CURRENT)]
    if base_url:
        interfaces += http_interfaces(base_url)
    return AgentCard(
        name=name, version=version,
        description=description or (
            "A jetmesh mesh: a team of agents on NATS JetStream. Send a goal as text "
            "(and structured input as a data part); message metadata 'workflow' runs a "
            "declared workflow, 'skill' a single skill."),
        supported_interfaces=interfaces,
        capabilities=AgentCapabilities(streaming=True, push_notifications=False,
                                       extensions=[_schemas_extension(live)]),
        default_input_modes=[TEXT_MEDIA, JSON_MEDIA],
        default_output_modes=[JSON_MEDIA, TEXT_MEDIA],
        skills=[_skill(s) for s in live],
    )


# ----------------------------------------------------------------------------- JSON


def card_to_dict(card: AgentCard) -> dict[str, Any]:
    """The card's A2A 1.0 JSON form (camelCase, as on the wire)."""
    out: dict[str, Any] = plain(MessageToDict(card))  # Struct numbers are doubles
    return out


def card_to_json(card: AgentCard) -> str:
    return json.dumps(card_to_dict(card), separators=(",", ":"), ensure_ascii=False)


def card_from_dict(data: Mapping[str, Any]) -> AgentCard:
    """Parse and check a card; InvalidCardError names what is wrong."""
    if not isinstance(data, Mapping):
        raise InvalidCardError("card must be a JSON object")
    try:
        card: AgentCard = ParseDict(dict(data), AgentCard(), ignore_unknown_fields=True)
    except ParseError as e:
        raise InvalidCardError(f"not an A2A card: {e}") from e
    validate_card(card)
    return card


def card_from_json(raw: str | bytes) -> AgentCard:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InvalidCardError(f"card is not JSON: {e}") from e
    return card_from_dict(data)


def validate_card(card: AgentCard) -> None:
    """Raise InvalidCardError unless every field A2A 1.0 requires is present."""
    try:
        validate_proto_required_fields(card)
    except Exception as e:  # the SDK's InvalidParamsError carries the field list
        data = getattr(e, "data", None) or {}
        fields = [str(x.get("field")) for x in data.get("errors", []) if isinstance(x, dict)]
        raise InvalidCardError("card misses required fields: " + ", ".join(fields),
                               fields) from e


# ----------------------------------------------------------------------------- reading


def skill_schemas(card: AgentCard) -> dict[str, dict[str, Any]]:
    """skill id -> {"input": schema, "output": schema}, from the schemas extension."""
    for ext in card.capabilities.extensions:
        if ext.uri == SKILL_SCHEMAS_EXTENSION:
            params = plain(MessageToDict(ext.params))
            skills = params.get("skills", {}) if isinstance(params, dict) else {}
            return {k: v for k, v in skills.items() if isinstance(v, dict)}
    return {}


def skills_from_card(card: AgentCard) -> list[SkillSpec]:
    """The card's skills as skill specs (schemas from the extension, else permissive)."""
    schemas = skill_schemas(card)
    out = []
    for s in card.skills:
        sch = schemas.get(s.id, {})
        extra: dict[str, Any] = {}
        if isinstance(sch.get("input"), dict):
            extra["input_schema"] = sch["input"]
        if isinstance(sch.get("output"), dict):
            extra["output_schema"] = sch["output"]
        out.append(SkillSpec(id=s.id, name=s.name or s.id, description=s.description,
                             tags=list(s.tags), examples=list(s.examples), **extra))
    return out
