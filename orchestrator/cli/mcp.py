"""`jetmesh mcp serve` (the mesh as an MCP server) and `jetmesh mcp tools` (what an
agent's MCP servers offer, with their risk levels and the tool-list hash)."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from jetmesh.orchestrator.cli.kit import (
    DEFAULT_DATA,
    DataDirOpt,
    UrlOpt,
    err,
    load_agent,
    resolve_url,
    run,
)


def register(app: typer.Typer) -> None:
    """Add `jetmesh mcp ...` to the CLI."""
    mcp_app = typer.Typer(help="MCP: the mesh as an MCP server; agents' MCP tools.",
                          no_args_is_help=True)
    app.add_typer(mcp_app, name="mcp")

    @mcp_app.command("serve")
    def serve_cmd(
        url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
        http: Annotated[str | None, typer.Option(
            "--http", help="Serve streamable HTTP on HOST:PORT instead of stdio.")] = None,
        path: Annotated[str, typer.Option(help="The HTTP endpoint's path.")] = "/mcp",
        wait_s: Annotated[float, typer.Option(
            help="How long a call follows its task before returning it as it is.")] = 600.0,
    ) -> None:
        """Serve the mesh over MCP: live skills and declared workflows as tools (a call
        runs a task to its end, with progress notifications), tasks as resources,
        approvals as input requests. stdio by default (for Claude Desktop, IDEs)."""
        # stdout is the protocol channel over stdio: logs go to stderr only.
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")

        target = resolve_url(url, data_dir)

        async def main() -> None:
            from jetmesh.a2a import auth
            from jetmesh.a2a.gateway import GatewaySettings
            from jetmesh.a2a.mcp_server import MeshMcpServer
            from jetmesh.agents.registry import Registry
            from jetmesh.agents.signing import verifier_from_env
            from jetmesh.orchestrator.client import Client
            from jetmesh.orchestrator.service import OrchestratorSettings
            from jetmesh.orchestrator.workflows import builtin_registry

            gw = GatewaySettings()
            client = Client(target)
            await client.connect()
            registry = await Registry.open(client.js, ttl_s=gw.agent_ttl_s,
                                           verifier=verifier_from_env())
            token = gw.approver_token.get_secret_value() if gw.approver_token else None
            # The gateway's credentials (JETMESH_GATEWAY_AUTH_FILE): over HTTP every
            # request is authenticated; over stdio the server is JETMESH_API_KEY's.
            auth_settings = auth.AuthSettings.from_env()
            try:
                identity = auth.local_identity(auth_settings) if http is None else None
            except auth.AuthError as e:
                await registry.close()
                await client.close()
                err.print(f"[red]{auth.API_KEY_ENV}:[/] {e.message}")
                raise typer.Exit(2) from None
            mesh = MeshMcpServer(client, registry,
                                 builtin_registry(OrchestratorSettings().workflows_dir),
                                 approver_token=token, trust_local=http is None,
                                 wait_s=wait_s, identity=identity)
            try:
                if http is None:
                    await mesh.run_stdio()
                else:
                    import uvicorn

                    host, _, port = http.rpartition(":")
                    host = host or "127.0.0.1"
                    asgi = mesh.http_app(path=path, host=host)
                    if auth_settings is not None:
                        asgi = auth.GatewayAuth(asgi, auth_settings)
                    server = uvicorn.Server(uvicorn.Config(
                        asgi, host=host, port=int(port), log_level="warning"))
                    await server.serve()
            finally:
                await registry.close()
                await client.close()

        run(main)

    @mcp_app.command("tools")
    def tools_cmd(
        agent: Annotated[str, typer.Argument(help="A built-in agent or module:attr.")],
    ) -> None:
        """Connect an agent's MCP servers and list their tools as the agent sees them."""
        from rich.console import Console
        from rich.table import Table


        spec = load_agent(agent)

        async def main() -> None:
            from jetmesh.agents.mcp.toolset import McpTool, McpToolset

            toolset = await McpToolset.open(spec)
            try:
                bound = toolset.attach(spec)
                table = Table("tool", "risk", "description")
                for t in bound.tools:
                    if isinstance(t, McpTool):
                        table.add_row(t.name, t.risk, t.description[:60])
                console = Console()
                console.print(table)
                for name, h in bound.mcp_tool_hashes.items():
                    console.print(f"{name}: tool list {h}")
            finally:
                await toolset.aclose()

        run(main)


__all__ = ["register"]
