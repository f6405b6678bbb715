"""Built-in agent specs for a fictional tea shop: real instructions, schemas and tools.

``BUILTIN_AGENTS`` maps each name to its spec; `get_agent` looks one up by name.
"""

from __future__ import annotations

from ..errors import UnknownAgent
from ..spec import AgentSpec
from .extractor import make_extractor
from .orders import make_orders
from .researcher import make_researcher
from .reviewer import make_reviewer
from .support import make_support
from .triage import make_triage
from .writer import make_writer

__all__ = ["BUILTIN_AGENTS", "builtin_names", "get_agent"]

BUILTIN_AGENTS: dict[str, AgentSpec] = {
    spec.name: spec
    for spec in (
        make_triage(),
        make_researcher(),
        make_extractor(),
        make_writer(),
        make_reviewer(),
        make_support(),
        make_orders(),
    )
}
"""Every built-in agent by name."""


def builtin_names() -> list[str]:
    """The built-in agents' names, sorted."""
    return sorted(BUILTIN_AGENTS)


def get_agent(name: str) -> AgentSpec:
    """The built-in agent ``name``; `UnknownAgent` (a KeyError) lists the known names."""
    try:
        return BUILTIN_AGENTS[name]
    except KeyError:
        raise UnknownAgent(name, BUILTIN_AGENTS) from None
