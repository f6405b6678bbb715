"""Moved: the live registry is `jetmesh.agents.registry` (a layer down, beside the cards,
so that the worker and the orchestrator need nothing from `jetmesh.a2a`). This name is
kept only until the last importers move; import `jetmesh.agents.registry`."""

from jetmesh.agents.registry import Advertiser, Registry, advertise, snapshot

__all__ = ["Advertiser", "Registry", "advertise", "snapshot"]
