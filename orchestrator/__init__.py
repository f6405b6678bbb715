"""jetmesh.orchestrator."""
