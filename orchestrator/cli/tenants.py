"""`jetmesh tenant-service`: the tenant service (bus.tenancy.TenantService) for tenants
that connect to NATS with accounts of their own (`jetmesh nats-config --tenants`)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from jetmesh.orchestrator.cli.kit import (
    DEFAULT_DATA,
    DataDirOpt,
    UrlOpt,
    resolve_url,
    run,
    serve_until_signal,
    setup_logging,
)


def register(app: typer.Typer) -> None:
    """Add `tenant-service` to the jetmesh CLI."""

    @app.command("tenant-service")
    def tenant_service_cmd(
        url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
        relay: Annotated[bool, typer.Option(
            "--relay/--no-relay", help="Copy tenants' tasks' ledger events to their "
                                       "accounts (run one relay; replicas without it "
                                       "share the task reads).")] = True,
        verbose: Annotated[bool, typer.Option("-v", help="Debug logging.")] = False,
    ) -> None:
        """Answer tenant accounts' task reads (`jm.tasks.get`: the task's ledger events,
        if it is the tenant's) and copy each tenant task's events to the tenant's account
        as they are appended. Runs as the `tenants` NATS user."""
        from jetmesh.bus.connection import connect, jetstream
        from jetmesh.bus.permissions import ROLE_TENANTS
        from jetmesh.bus.tenancy import TenantService

        setup_logging(verbose)
        target = resolve_url(url, data_dir, user=ROLE_TENANTS)

        async def start() -> Any:
            nc = await connect(target, name="jetmesh-tenant-service")
            service = TenantService(nc, jetstream(nc), relay=relay)
            await service.start()
            return nc, service

        async def stop(handle: Any) -> None:
            nc, service = handle
            await service.stop()
            await nc.close()

        run(lambda: serve_until_signal(start, stop))
