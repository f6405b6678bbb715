"""Agent specs are data: instructions, skills with schemas, tools, model policy, limits.

The worker runtime binds a spec to the bus and the agent card is derived from it; nothing
here runs a model or knows NATS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jsonschema
from pydantic import BaseModel, ConfigDict, Field

from .cost import CostPolicy
from .errors import SpecError, UnknownSkill
from .mcp.config import McpServerConfig
from .tools import Tool

__all__ = [
    "DEFAULT_OUTPUT_SCHEMA",
    "AgentSpec",
    "Limits",
    "ModelPolicy",
    "ModelRef",
    "SkillSpec",
    "is_default_output_schema",
    "schema_errors",
]


def _text_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
    }


DEFAULT_OUTPUT_SCHEMA: dict[str, Any] = _text_schema()
"""A free-text skill's output: ``{"text": "..."}``."""


def is_default_output_schema(schema: dict[str, Any]) -> bool:
    """True when ``schema`` is the free-text schema (the model answers in plain text)."""
    return schema == DEFAULT_OUTPUT_SCHEMA


_VALIDATORS: dict[int, tuple[dict[str, Any], Any, Any]] = {}


def _validator(schema: dict[str, Any]) -> tuple[Any, Any]:
    """Compiled validators per schema object (schemas live in specs and cards and are
    not mutated), so hot paths do not rebuild one per call: jsonschema-rs to answer
    "valid?" fast (about 40x the pure-Python validator), python-jsonschema to explain
    what is wrong."""
    hit = _VALIDATORS.get(id(schema))
    if hit is not None and hit[0] is schema:
        return hit[1], hit[2]
    fast: Any = None
    try:
        import jsonschema_rs

        fast = jsonschema_rs.validator_for(schema)
    except Exception:  # not installed, or a schema it does not take: the slow path
        fast = None
    validator = jsonschema.Draft202012Validator(schema)
    if len(_VALIDATORS) > 4096:
        _VALIDATORS.clear()
    _VALIDATORS[id(schema)] = (schema, fast, validator)
    return fast, validator


def schema_errors(schema: dict[str, Any], data: Any) -> list[str]:
    """Draft 2020-12 validation errors of ``data``, one readable line each (empty: valid)."""
    fast, validator = _validator(schema)
    if fast is not None:
        try:
            if fast.is_valid(data):
                return []
        except Exception:  # data it cannot take (a non-JSON value): ask the slow one
            pass
    elif validator.is_valid(data):
        return []
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    lines = []
    for err in errors:
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        lines.append(f"{where}: {err.message}")
    return lines


class SkillSpec(BaseModel):
    """One thing an agent can do, with the schemas its input and output must satisfy."""

    model_config = ConfigDict(frozen=True)

    id: str
    """Unique within the agent; also the work subject token (``jm.work.<id>``)."""
    name: str
    description: str
    tags: list[str] = Field(default_factory=list)
    examples: list[str] = Field(default_factory=list)
    """Example requests, shown in the agent card."""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    """JSON Schema (Draft 2020-12) of the step input."""
    output_schema: dict[str, Any] = Field(default_factory=_text_schema)
    """JSON Schema of the step output; the default is free text ``{"text": ...}``."""
    tools: list[str] | None = None
    """Names of the agent's tools this skill may use; None means all of them."""

    @classmethod
    def from_models(
        cls,
        id: str,
        name: str,
        description: str,
        *,
        input_model: type[BaseModel],
        output_model: type[BaseModel] | None = None,
        tags: list[str] | None = None,
        examples: list[str] | None = None,
        tools: list[str] | None = None,
    ) -> SkillSpec:
        """A skill whose schemas come from pydantic models (no output model: free text)."""
        return cls(
            id=id,
            name=name,
            description=description,
            tags=tags or [],
            examples=examples or [],
            input_schema=input_model.model_json_schema(),
            output_schema=(
                output_model.model_json_schema() if output_model is not None else _text_schema()
            ),
            tools=tools,
        )

    @property
    def structured(self) -> bool:
        """True when the final answer must be JSON (not the free-text schema)."""
        return not is_default_output_schema(self.output_schema)


class ModelRef(BaseModel):
    """A provider and model name, e.g. ``anthropic`` / ``claude-sonnet-4-5``."""

    model_config = ConfigDict(frozen=True)

    provider: str
    model: str


class ModelPolicy(BaseModel):
    """Which model an agent wants; ``None`` means the deployment's default."""

    model_config = ConfigDict(frozen=True)

    provider: str | None = None
    model: str | None = None
    fallbacks: list[ModelRef] = Field(default_factory=list)
    """Tried in order when the primary fails with a transient error."""
    max_tokens: int = 1024
    """Per model call."""
    temperature: float | None = None


class Limits(BaseModel):
    """Per-step hard limits, enforced by the loop."""

    model_config = ConfigDict(frozen=True)

    max_tool_calls: int = 8
    max_turns: int = 10
    """Model calls per step, corrective turns included."""
    step_timeout_s: float = 120.0
    """Wall-clock limit of one step (enforced by the runtime around `run_step`)."""
    max_input_bytes: int = 256_000
    """Largest step input accepted (its JSON encoding)."""


@dataclass
class AgentSpec:
    """An agent as data. Holds `Tool` objects, hence a dataclass."""

    name: str
    description: str
    version: str = "0.1.0"
    instructions: str = ""
    """The system prompt's first part; the skill's name and description follow it."""
    skills: list[SkillSpec] = field(default_factory=list)
    tools: list[Tool] = field(default_factory=list)
    """Tools offered to the model; a list, so deployments can append (e.g. memory recall)."""
    model: ModelPolicy = field(default_factory=ModelPolicy)
    limits: Limits = field(default_factory=Limits)
    direct: dict[str, str] = field(default_factory=dict)
    """skill id -> tool name: the skill is served by that tool alone, with no model."""
    cost: CostPolicy = field(default_factory=CostPolicy)
    """Routing, validators, prompt and tool caching, compaction (agents.cost)."""
    mcp_servers: list[McpServerConfig] = field(default_factory=list)
    """MCP servers whose tools the agent uses, as ``<server>__<tool>`` (listed when the
    worker starts; skills and ``direct`` may name them before that)."""
    mcp_tool_hashes: dict[str, str] = field(default_factory=dict)
    """server -> hash of the tool list the agent runs with (set when its tools are
    attached; shown in the card)."""
    tenants: list[str] | None = None
    """The tenants whose tasks this agent serves (a private agent); None: every tenant
    (shared). Enforced by the worker; in its registry entry."""

    def __post_init__(self) -> None:
        ids = [s.id for s in self.skills]
        if len(set(ids)) != len(ids):
            raise SpecError(self.name, f"duplicate skill ids in {ids}")
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise SpecError(self.name, f"duplicate tool names in {names}")
        servers = [m.name for m in self.mcp_servers]
        if len(set(servers)) != len(servers):
            raise SpecError(self.name, f"duplicate MCP server names in {servers}")
        # MCP tools are known once their server lists them, when the worker starts.
        names = names + [n for n in [*(t for s in self.skills for t in s.tools or ()),
                                     *self.direct.values()]
                         if n.split("__", 1)[0] in servers and "__" in n]
        for s in self.skills:
            missing = sorted(set(s.tools or ()) - set(names))
            if missing:
                raise SpecError(self.name, f"skill {s.id!r} names unknown tools {missing}")
        for skill_id, tool_name in self.direct.items():
            if skill_id not in ids:
                raise SpecError(self.name, f"direct skill {skill_id!r} is not among its skills")
            if tool_name not in names:
                raise SpecError(
                    self.name, f"direct skill {skill_id!r} names unknown tool {tool_name!r}"
                )

    @property
    def needs_model(self) -> bool:
        """False when every skill is served directly by a tool."""
        return any(s.id not in self.direct for s in self.skills)

    def skill(self, skill_id: str) -> SkillSpec:
        """The skill with this id; `UnknownSkill` (a KeyError) names the ones that exist."""
        for s in self.skills:
            if s.id == skill_id:
                return s
        raise UnknownSkill(self.name, skill_id, [s.id for s in self.skills])

    def tool(self, name: str) -> Tool | None:
        """The tool with this name, if the agent has it."""
        return next((t for t in self.tools if t.name == name), None)

    def tools_for(self, skill_id: str) -> list[Tool]:
        """The tools offered to the model for this skill."""
        allowed = self.skill(skill_id).tools
        return [t for t in self.tools if allowed is None or t.name in allowed]

    def validate_input(self, skill_id: str, data: Any) -> list[str]:
        """Errors of ``data`` against the skill's input schema (empty when valid)."""
        return schema_errors(self.skill(skill_id).input_schema, data)

    def validate_output(self, skill_id: str, data: Any) -> list[str]:
        """Errors of ``data`` against the skill's output schema (empty when valid)."""
        return schema_errors(self.skill(skill_id).output_schema, data)
