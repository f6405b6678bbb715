"""jetmesh.agents: agent specs (data), typed tools and the step loop.

Cheap to import: no model SDK is loaded here, and the built-in agents are built on first
use of `get_agent`, `builtin_names` or `BUILTIN_AGENTS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    AgentError,
    SpecError,
    ToolDefinitionError,
    ToolError,
    UnknownAgent,
    UnknownSkill,
)
from .loop import ListRecorder, StepOutcome, StepRecorder, StepReplay, run_step
from .spec import AgentSpec, Limits, ModelPolicy, ModelRef, SkillSpec
from .tools import Tool, ToolContext, ToolResult, idempotency_key, tool

if TYPE_CHECKING:
    from .builtin import BUILTIN_AGENTS, builtin_names, get_agent

__all__ = [
    "BUILTIN_AGENTS",
    "AgentError",
    "AgentSpec",
    "Limits",
    "ListRecorder",
    "ModelPolicy",
    "ModelRef",
    "SkillSpec",
    "SpecError",
    "StepOutcome",
    "StepRecorder",
    "StepReplay",
    "Tool",
    "ToolContext",
    "ToolDefinitionError",
    "ToolError",
    "ToolResult",
    "UnknownAgent",
    "UnknownSkill",
    "builtin_names",
    "get_agent",
    "idempotency_key",
    "run_step",
    "tool",
]

_LAZY = {"BUILTIN_AGENTS", "builtin_names", "get_agent"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import builtin

        return getattr(builtin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
