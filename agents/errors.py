"""The agents package's exception tree.

Model-call failures have their own tree in `jetmesh.agents.models.errors`; a step never
raises either of them out of `run_step` (they become a failed `StepOutcome`). These are
for programming and configuration mistakes around specs and tools::

    AgentError                      message
    ├── UnknownAgent                name, known      (also a KeyError)
    ├── UnknownSkill                agent, skill, known   (also a KeyError)
    ├── SpecError                   agent: an inconsistent AgentSpec (e.g. a direct skill
    │                               naming a tool the agent does not have)
    ├── ToolError                   tool
    │   └── ToolDefinitionError     the @tool decorator cannot infer input/output models
    ├── StepStopped                 code, reason, retryable: a runtime control ended the step
    ├── CardError                   an agent card that cannot be used (jetmesh.agents.cards,
    │   │                           .signing, .registry; a2a.errors names them too)
    │   ├── InvalidCardError        reason, missing: not a valid A2A 1.0 card
    │   ├── CardSignatureError      agent, reason: unsigned, tampered or wrongly signed card
    │   └── KeyConfigError          a signing or verification key that cannot be loaded
    └── ClaimLost                   reason: the replica no longer holds the step, so a side
                                    effect it was about to run was not run (never caught by
                                    `Tool.invoke`; the worker stands down without acking)
"""

from __future__ import annotations

from collections.abc import Iterable

from jetmesh.bus.errors import JetmeshError

__all__ = [
    "AgentError",
    "CardError",
    "CardSignatureError",
    "ClaimLost",
    "InvalidCardError",
    "KeyConfigError",
    "SpecError",
    "ToolDefinitionError",
    "ToolError",
    "UnknownAgent",
    "UnknownSkill",
]


class AgentError(JetmeshError):
    """Base of every error raised by `jetmesh.agents` (outside the model layer)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        """Human-readable explanation."""

    def __str__(self) -> str:
        # KeyError subclasses would otherwise print the repr of the message.
        return self.message


class UnknownAgent(AgentError, KeyError):
    """No agent spec with this name."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        """The name asked for."""
        self.known = sorted(known)
        """Every name that exists."""
        super().__init__(f"unknown agent {name!r}; known agents: {', '.join(self.known)}")


class UnknownSkill(AgentError, KeyError):
    """The agent has no skill with this id."""

    def __init__(self, agent: str, skill: str, known: Iterable[str] = ()) -> None:
        self.agent = agent
        """The agent asked."""
        self.skill = skill
        """The skill id asked for."""
        self.known = sorted(known)
        """The agent's skill ids."""
        super().__init__(
            f"agent {agent!r} has no skill {skill!r}; its skills: {', '.join(self.known)}"
        )


class SpecError(AgentError):
    """An AgentSpec that is inconsistent with itself."""

    def __init__(self, agent: str, message: str) -> None:
        self.agent = agent
        """The agent whose spec is wrong."""
        super().__init__(f"agent {agent!r}: {message}")


class ToolError(AgentError):
    """A problem with a tool's definition (never raised by `Tool.invoke`)."""

    def __init__(self, tool: str, message: str) -> None:
        self.tool = tool
        """The tool's name."""
        super().__init__(f"tool {tool!r}: {message}")


class ToolDefinitionError(ToolError):
    """`@tool` could not build the tool's input or output model from its signature."""


class StepStopped(AgentError):
    """A runtime control stopped the step (budget exceeded, canceled); the loop ends it
    failed with this code and reason."""

    def __init__(self, code: str, reason: str, *, retryable: bool = False) -> None:
        self.code = code
        self.reason = reason
        self.retryable = retryable
        super().__init__(f"{code}: {reason}")


class ClaimLost(AgentError):
    """This replica no longer holds the step (another delivery claimed it, the
    orchestrator timed it out, or the claim's lease ran out while the process was paused):
    the side effect it was about to run was not run."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        """What the check found."""
        super().__init__(f"claim lost before a side effect: {reason}")


class CardError(AgentError):
    """An agent card (or the key that signs or verifies cards) that cannot be used."""


class InvalidCardError(CardError):
    """A card that does not parse or misses fields A2A 1.0 requires."""

    def __init__(self, reason: str, missing: list[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing or []


class CardSignatureError(CardError):
    """A card refused because signing is on and its signature does not verify."""

    def __init__(self, agent: str, reason: str) -> None:
        super().__init__(f"card of {agent!r} refused: {reason}")
        self.agent = agent
        self.reason = reason


class KeyConfigError(CardError):
    """A key file that is missing, unreadable or of an unsupported kind."""
