"""`python -m jetmesh.orchestrator.cli ...`: the `jetmesh` command."""

from jetmesh.orchestrator.cli.app import main

main()
