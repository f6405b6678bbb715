"""jetmesh.a2a."""
