"""An agent's cost levers, as data: model routing and output validators per skill, prompt
caching, the tool-result cache and context compaction (see the modules of each)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .compaction import CompactionPolicy
from .routing import Routing, Validator
from .toolcache import ToolCacheRule

__all__ = ["CostPolicy"]


class CostPolicy(BaseModel):
    """What an agent does to pay less per outcome; the default changes nothing but
    turns prompt caching on."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    routing: dict[str, Routing] = Field(default_factory=dict)
    """Skill id -> its model tiers (agents.routing); a skill without: the agent's model."""
    validators: dict[str, list[Validator]] = Field(default_factory=dict)
    """Skill id -> checks on its output beyond the JSON Schema."""
    prompt_cache: bool = True
    """Mark the stable prompt prefix cacheable (Anthropic ``cache_control``)."""
    tool_cache: dict[str, ToolCacheRule] = Field(default_factory=dict)
    """Tool name -> how its results are cached (read-only tools only)."""
    compaction: CompactionPolicy | None = None
    """When a step's context is compacted (None: never)."""
