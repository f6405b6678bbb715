"""Errors of the A2A side of jetmesh.

    MeshA2AError
    └── ExternalAgentError      an external A2A agent could not be reached or used (url)

The card errors (InvalidCardError, CardSignatureError, KeyConfigError) belong to the
cards, which live a layer down in `jetmesh.agents` (the worker and the orchestrator use
them): they derive from `jetmesh.agents.errors.CardError` and are named here too.
"""

from __future__ import annotations

from jetmesh.agents.errors import CardSignatureError, InvalidCardError, KeyConfigError
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


class ExternalAgentError(MeshA2AError):
    """An external A2A agent that could not be fetched or called."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason
