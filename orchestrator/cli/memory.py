"""`jetmesh memory`: run the memory service, search and forget from the command line.

`register(app)` adds the ``memory`` command group to the main `jetmesh` app.
``python -m jetmesh.orchestrator.cli.memory`` runs the same group on its own.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from jetmesh.orchestrator.cli.kit import (
    DEFAULT_DATA,
    DataDirOpt,
    UrlOpt,
    console,
    resolve_url,
    run,
    setup_logging,
    stop_on_signals,
)

err = Console(stderr=True, soft_wrap=True)

memory_app = typer.Typer(
    name="memory",
    help=(
        "Shared memory of the agents. `jetmesh memory` alone runs the memory service "
        "(the one process that opens the store) until Ctrl-C / SIGTERM; `search`, "
        "`forget` and `status` talk to it over NATS."
    ),
    invoke_without_command=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def register(app: typer.Typer) -> None:
    """Add the ``memory`` command group to `app`."""
    app.add_typer(memory_app, name="memory")


def _resolve(url: str | None, data_dir: Path) -> str:
    return resolve_url(url, data_dir)


def _setup_logging(verbose: bool) -> None:
    setup_logging(verbose, console=err, tracebacks=False, quiet_memory=True)


async def _with_client(url: str, fn: Any, timeout_s: float) -> Any:
    from jetmesh.bus.connection import connect
    from jetmesh.memory.client import MemoryClient

    nc = await connect(url, name="jetmesh-memory-cli")
    try:
        return await fn(MemoryClient(nc, timeout_s=timeout_s))
    finally:
        await nc.close()


@memory_app.callback()
def serve(
    ctx: typer.Context,
    url: UrlOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA,
    verbose: Annotated[bool, typer.Option("-v", help="Debug logging.")] = False,
) -> None:
    """Run the memory service until Ctrl-C / SIGTERM (when no subcommand is given)."""
    if ctx.invoked_subcommand is not None:
        return
    os.environ.setdefault("MEM0_TELEMETRY", "False")
    _setup_logging(verbose)
    target = _resolve(url, data_dir)
    from jetmesh.memory.errors import EmbeddingDimensionMismatch
    from jetmesh.memory.service import run_memory_service
    from jetmesh.memory.settings import MemorySettings

    settings = MemorySettings(data_dir=data_dir)

    async def main() -> None:
        try:
            await run_memory_service(target, settings, stop=stop_on_signals())
        except (EmbeddingDimensionMismatch, RuntimeError) as e:
            # RuntimeError: embedded Qdrant's folder is locked by another memory service.
            err.print(f"[red]memory store refused to open:[/] {escape(str(e))}")
            raise typer.Exit(2) from None

    run(main)


@memory_app.command("search")
def search_cmd(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    user: Annotated[str | None, typer.Option("--user", help="Only this user's memories.")] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent's.")] = None,
    task: Annotated[str | None, typer.Option("--task", help="Only this task's.")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="episode or fact.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100, help="How many at most.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    url: UrlOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the service.")] = 10.0,
) -> None:
    """Search memories, best first, optionally within a user, agent or task."""
    if kind not in (None, "episode", "fact"):
        err.print("[red]--kind must be episode or fact[/]")
        raise typer.Exit(2)
    target = _resolve(url, data_dir)

    async def call(client: Any) -> Any:
        return await client.search(query, user_id=user, agent_id=agent, task_id=task,
                                   kind=kind, limit=limit)

    items = run(lambda: _with_client(target, call, timeout))
    if as_json:
        for item in items:
            print(item.model_dump_json(), flush=True)
        return
    if not items:
        console.print("no memories found")
        return
    table = Table("score", "kind", "user", "agent", "task", "step", "memory", "id")
    for i in items:
        table.add_row(f"{i.score:.3f}" if i.score is not None else "", i.kind, i.user_id or "",
                      i.agent_id or "", i.task_id or "", i.step_id or "",
                      escape(i.text[:160]), i.id)
    console.print(table)


@memory_app.command("forget")
def forget_cmd(
    task: Annotated[str, typer.Option("--task", help="The task to forget.")],
    url: UrlOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the service.")] = 30.0,
) -> None:
    """Remove a task's episodes and the facts derived only from them."""
    target = _resolve(url, data_dir)

    async def call(client: Any) -> Any:
        return await client.forget(task)

    report = run(lambda: _with_client(target, call, timeout))
    console.print(f"forgot task {task}: {len(report.episodes_deleted)} episodes and "
                  f"{len(report.facts_deleted)} facts deleted, "
                  f"{len(report.facts_updated)} facts kept with trimmed provenance")


@memory_app.command("status")
def status_cmd(
    url: UrlOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the service.")] = 5.0,
) -> None:
    """Show the memory service's store, embedder and whether facts are extracted."""
    target = _resolve(url, data_dir)

    async def call(client: Any) -> Any:
        return await client.status()

    status = run(lambda: _with_client(target, call, timeout))
    console.print_json(json.dumps(status.model_dump(mode="json")))


if __name__ == "__main__":
    memory_app(sys.argv[1:], prog_name="jetmesh memory")
