"""`jetmesh tools disable / enable / list`: the kill switch (see jetmesh.bus.killswitch)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from jetmesh.bus.killswitch import MCP_SEPARATOR, KillRule, Kind
from jetmesh.orchestrator.cli.kit import (
    DEFAULT_DATA,
    DataDirOpt,
    UrlOpt,
    console,
    err,
    resolve_url,
    run,
)

ToolArg = Annotated[str | None, typer.Argument(
    help="The tool (an MCP tool: <server>__<tool>, or the tool's name with --server). "
         "Without it: the whole --agent or --server.")]
AgentOpt = Annotated[str | None, typer.Option(
    "--agent", help="Only this agent's calls (without TOOL: every tool of this agent).")]
ServerOpt = Annotated[str | None, typer.Option(
    "--server", help="An MCP server (without TOOL: every tool of this server).")]
TenantOpt = Annotated[str | None, typer.Option("--tenant", help="Only this tenant's tasks.")]


def target_of(tool: str | None, agent: str | None, server: str | None
              ) -> tuple[Kind, str, str | None]:
    """(kind, name, agent qualifier) of a command line's TOOL / --agent / --server."""
    if tool is not None:
        name = f"{server}{MCP_SEPARATOR}{tool}" if server else tool
        return "tool", name, agent
    if server is not None:
        return "server", server, agent
    if agent is not None:
        return "agent", agent, None
    raise typer.BadParameter("name a TOOL, or a whole --agent or --server")


def register(app: typer.Typer) -> None:
    """Add `tools disable / enable / list` to the jetmesh CLI."""
    tools = typer.Typer(help="The kill switch: disable a tool, agent or MCP server in "
                             "every replica within a second.", no_args_is_help=True)
    app.add_typer(tools, name="tools")

    @tools.command("disable")
    def disable_cmd(tool: ToolArg = None, agent: AgentOpt = None, server: ServerOpt = None,
                    tenant: TenantOpt = None,
                    reason: Annotated[str, typer.Option(help="Why (told to the model and "
                                                             "recorded).")] = "",
                    by: Annotated[str, typer.Option(help="Who disables it.")] = "operator",
                    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA) -> None:
        """Refuse every call of TOOL (or of a whole agent / MCP server) from the next
        call on, in every replica; each refusal is a policy decision on the ledger."""
        from jetmesh.bus.killswitch import KillSwitchBoard
        from jetmesh.orchestrator.client import Client

        kind, name, qualifier = target_of(tool, agent, server)
        try:
            rule = KillRule(kind=kind, name=name, agent=qualifier, tenant=tenant,
                            reason=reason, by=by)
        except ValueError as e:
            err.print(f"[red]{escape(str(e))}[/]")
            raise typer.Exit(2) from None
        target = resolve_url(url, data_dir)

        async def main() -> None:
            async with Client(target) as c:
                await KillSwitchBoard(c.js).disable(rule)

        run(main)
        console.print(f"{escape(rule.describe())} [dim]({rule.key})[/]")

    @tools.command("enable")
    def enable_cmd(tool: ToolArg = None, agent: AgentOpt = None, server: ServerOpt = None,
                   tenant: TenantOpt = None, url: UrlOpt = None,
                   data_dir: DataDirOpt = DEFAULT_DATA) -> None:
        """Remove the rule `disable` wrote with the same arguments. Exit 1 if none."""
        from jetmesh.bus.killswitch import KillSwitchBoard
        from jetmesh.orchestrator.client import Client

        kind, name, qualifier = target_of(tool, agent, server)
        target = resolve_url(url, data_dir)

        async def main() -> bool:
            async with Client(target) as c:
                return await KillSwitchBoard(c.js).enable(kind, name, agent=qualifier,
                                                          tenant=tenant)

        if not run(main):
            err.print(f"[red]{kind} {escape(name)} is not disabled (with these options)[/]")
            raise typer.Exit(1)
        console.print(f"{kind} {escape(name)} enabled")

    @tools.command("list")
    def list_cmd(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
                 url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA) -> None:
        """The rules in force."""
        from jetmesh.bus.killswitch import KillSwitchBoard
        from jetmesh.orchestrator.client import Client

        target = resolve_url(url, data_dir)

        async def main() -> list[KillRule]:
            async with Client(target) as c:
                return await KillSwitchBoard(c.js).list()

        rules = run(main)
        if as_json:
            console.print_json(json.dumps([r.model_dump(mode="json") for r in rules]))
            return
        table = Table(title="disabled")
        for col in ("kind", "name", "agent", "tenant", "by", "at", "reason"):
            table.add_column(col)
        for r in rules:
            table.add_row(r.kind, escape(r.name), r.agent or "*", r.tenant or "*",
                          escape(r.by), r.at.isoformat(timespec="seconds"), escape(r.reason))
        console.print(table)
