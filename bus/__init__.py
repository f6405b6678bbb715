"""jetmesh.bus."""
