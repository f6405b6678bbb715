"""CLI commands of the A2A side: ``gateway``, ``bridge``, ``agents-add``, ``keys generate``,
``asyncapi``.

`register(app)` adds them to the ``jetmesh`` Typer app; the shared helpers (URL
resolution, logging, signal handling) come from `jetmesh.orchestrator.cli`, imported when
a command runs so that neither module imports the other at load time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from jetmesh.bus.settings import GATEWAY_PORT, GATEWAY_PORT_ENV, LOCAL_NATS_URL
from jetmesh.orchestrator.cli.kit import (
    DEFAULT_DATA,
    DataDirOpt,
    UrlOpt,
    bus,
    console,
    err,
    resolve_url,
    run,
    serve_until_signal,
    setup_logging,
)

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the A2A commands to `app`."""
    keys = typer.Typer(help="Card signing keys.", no_args_is_help=True)
    app.add_typer(keys, name="keys")

    @keys.command("generate")
    def keys_generate(
        directory: Annotated[Path, typer.Argument(help="Where to write the key files.")] =
        DEFAULT_DATA / "keys",
        overwrite: Annotated[bool, typer.Option(help="Replace existing keys.")] = False,
    ) -> None:
        """Make an EC P-256 card-signing key pair and its JWKS."""
        from jetmesh.agents.errors import KeyConfigError
        from jetmesh.agents.signing import generate_keys

        try:
            paths = generate_keys(directory, overwrite=overwrite)
        except KeyConfigError as e:
            err.print(f"[red]{e}[/]")
            raise typer.Exit(1) from None
        console.print(f"signing key (keep it secret): {paths['private']}")
        console.print(f"verify key:                   {paths['public']}  (JWKS: {paths['jwks']})")
        console.print("Give agents and gateways that advertise cards:\n"
                      f"  export JETMESH_CARD_SIGNING_KEY={paths['private'].resolve()}\n"
                      "and every process that reads cards:\n"
                      f"  export JETMESH_CARD_VERIFY_KEY={paths['jwks'].resolve()}")

    @app.command("gateway")
    def gateway_cmd(
        url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
        host: Annotated[str, typer.Option(envvar="JETMESH_GATEWAY_HOST")] = "127.0.0.1",
        port: Annotated[int, typer.Option(envvar=GATEWAY_PORT_ENV)] = GATEWAY_PORT,
        public_url: Annotated[str | None, typer.Option(
            envvar="JETMESH_GATEWAY_PUBLIC_URL", help="Base URL put in cards.")] = None,
        verbose: Annotated[bool, typer.Option("-v", help="Debug logging.")] = False,
    ) -> None:
        """Serve the mesh as an A2A 1.0 agent over HTTP (JSON-RPC and HTTP+JSON)."""
        setup_logging(verbose)
        target = resolve_url(url, data_dir)

        async def main() -> None:
            from jetmesh.a2a.gateway import GatewayServer, GatewaySettings
            from jetmesh.agents.signing import signer_from_env, verifier_from_env

            settings = GatewaySettings(host=host, port=port, public_url=public_url)
            server = GatewayServer(target, settings=settings, signer=signer_from_env(),
                                   verifier=verifier_from_env())

            async def start() -> Any:
                console.print(f"A2A gateway at [bold]{await server.start()}[/]")
                return server

            async def stop(s: Any) -> None:
                await s.stop()

            await serve_until_signal(start, stop)

        run(main)

    @app.command("asyncapi")
    def asyncapi_cmd(
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Write it here "
                                                 "(default: stdout).")] = None,
        server: Annotated[str, typer.Option(help="The NATS server named in the document.")]
        = LOCAL_NATS_URL,
    ) -> None:
        """The mesh's public NATS contract as an AsyncAPI 3.0 document (JSON)."""
        from jetmesh.a2a.asyncapi import asyncapi_json

        text = asyncapi_json(server)
        if out is None:
            typer.echo(text, nl=False)
        else:
            out.write_text(text, encoding="utf-8")
            typer.echo(f"wrote {out}")

    @app.command("bridge")
    def bridge_cmd(
        url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
        verbose: Annotated[bool, typer.Option("-v", help="Debug logging.")] = False,
    ) -> None:
        """Serve the external A2A agents added with `agents-add` (one worker each)."""
        setup_logging(verbose)
        target = resolve_url(url, data_dir)

        async def main() -> None:
            from jetmesh.a2a.bridge import start_bridge
            from jetmesh.bus.connection import connect, jetstream

            async def start() -> Any:
                nc = await connect(target, name="jetmesh-bridge")
                bridge = await start_bridge(nc, jetstream(nc))
                names = ", ".join(w.spec.name for w in bridge.workers) or "none yet"
                console.print(f"bridging external agents: {names}")
                return (nc, bridge)

            async def stop(handle: Any) -> None:
                nc, bridge = handle
                await bridge.stop()
                await nc.close()

            await serve_until_signal(start, stop)

        run(main)

    @app.command("agents-add")
    def agents_add_cmd(
        agent_url: Annotated[str, typer.Argument(help="The external agent's base URL (its "
                                                      "card is at /.well-known/agent-card.json).")],
        url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    ) -> None:
        """Add an external A2A agent: its skills become routable through the bridge."""
        target = resolve_url(url, data_dir)

        async def main() -> None:
            from jetmesh.a2a.bridge import add_external
            from jetmesh.a2a.errors import MeshA2AError
            from jetmesh.agents.errors import CardError
            from jetmesh.agents.signing import verifier_from_env

            async with bus(target) as (_, js, _):
                try:
                    agent = await add_external(js, agent_url, verifier=verifier_from_env())
                except (MeshA2AError, CardError) as e:
                    err.print(f"[red]{e}[/]")
                    raise typer.Exit(1) from None
            console.print(
                f"added [bold]{agent.name}[/] ({agent.card.name} {agent.card.version}): "
                + ", ".join(s.id for s in agent.card.skills)
                + "\nRun `jetmesh bridge` (or restart it) to serve these skills.")

        run(main)
