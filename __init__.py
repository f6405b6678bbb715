"""jetmesh: teams of AI agents as a distributed system on NATS JetStream."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Client", "JetmeshError", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from jetmesh.bus.errors import JetmeshError
    from jetmesh.orchestrator.client import Client


def __getattr__(name: str) -> Any:
    # Imported lazily so `import jetmesh.bus.subjects` stays cheap and cycle-free.
    if name == "Client":
        from jetmesh.orchestrator.client import Client

        return Client
    if name == "JetmeshError":  # the root of every jetmesh exception (bus.errors)
        from jetmesh.bus.errors import JetmeshError

        return JetmeshError
    raise AttributeError(name)
