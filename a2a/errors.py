"""Errors of the A2A side of jetmesh.

    MeshA2AError
    ├── InvalidCardError        a card that is not a valid A2A 1.0 card (fields: missing)
    ├── CardSignatureError      unsigned, tampered or wrongly signed card (fields: agent)
    ├── KeyConfigError          a signing or verification key that cannot be loaded
    └── ExternalAgentError      an external A2A agent could not be reached or used (url)
"""

from __future__ import annotations

from jetmesh.bus.errors import JetmeshError

__all__ = [
    "CardSignatureError",
    "ExternalAgentError",
    "InvalidCardError",
    "KeyConfigError",
    "MeshA2AError",
]


class MeshA2AError(JetmeshError):
    """Base of every error raised by `jetmesh.a2a`."""


class InvalidCardError(MeshA2AError):
    """A card that does not parse or misses fields A2A 1.0 requires."""

    def __init__(self, reason: str, missing: list[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing or []


class CardSignatureError(MeshA2AError):
    """A card refused because signing is on and its signature does not verify."""

    def __init__(self, agent: str, reason: str) -> None:
        super().__init__(f"card of {agent!r} refused: {reason}")
        self.agent = agent
        self.reason = reason


class KeyConfigError(MeshA2AError):
    """A key file that is missing, unreadable or of an unsupported kind."""


class ExternalAgentError(MeshA2AError):
    """An external A2A agent that could not be fetched or called."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason
