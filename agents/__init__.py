"""jetmesh.agents."""
