"""The `jetmesh` command line, the one composition root of jetmesh: the only place that
wires the packages together into processes (`jetmesh up`, the roles, the operator's
commands). Nothing outside this package imports it.

- `kit`: consoles, shared options, logging, the runner, the bus opener, the loader;
- `app`: the Typer app, its core commands, `main` (the `jetmesh` console script);
- one module per command group (a2a, mcp, memory, health, nats_config, replay, evals,
  telemetry, killswitch, audit), each with `register(app)`;
- `up`: the supervisor behind `jetmesh up`.

`python -m jetmesh.orchestrator.cli ...` runs the same app.
"""

from jetmesh.orchestrator.cli.app import _quiet_flags, app, main

__all__ = ["_quiet_flags", "app", "main"]
