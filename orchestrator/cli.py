"""The `jetmesh` command line: run the mesh, submit and follow tasks, inspect the ledger."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from jetmesh.bus import events as ev
from jetmesh.bus.errors import BusError
from jetmesh.bus.settings import BusSettings

app = typer.Typer(
    name="jetmesh",
    help=(
        "jetmesh runs teams of AI agents as a distributed system on NATS JetStream.\n\n"
        "Start everything on this machine with `jetmesh up`; in another terminal, "
        "`jetmesh submit \"goal\" --wait`. Commands find the server from NATS_URL, "
        "or the embedded one `jetmesh up` / `jetmesh nats` started in ./.jetmesh."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)
T = TypeVar("T")

UrlOpt = Annotated[str | None, typer.Option("--url", envvar="NATS_URL",
                                            help="NATS server URL (default: NATS_URL, "
                                                 "else the embedded server in --data-dir).")]
DataDirOpt = Annotated[Path, typer.Option("--data-dir", envvar="JETMESH_DATA_DIR",
                                          help="Where jetmesh keeps its data.")]
DEFAULT_DATA = Path(".jetmesh")


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=True)],
        force=True,
    )
    logging.getLogger("nats").setLevel(logging.WARNING)


def resolve_url(url: str | None, data_dir: Path) -> str:
    """--url / NATS_URL, else the embedded server running from `data_dir`."""
    from jetmesh.bus.server import discover_url

    if url:
        return url
    found = discover_url(data_dir)
    if found:
        return found
    err.print("[red]No NATS server found.[/] Start one with [bold]jetmesh up[/] (everything) "
              "or [bold]jetmesh nats[/] (the server alone), or set NATS_URL.")
    raise typer.Exit(2)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async command; bus errors become one clear line and exit code 1."""
    try:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    except BusError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


async def _open(url: str) -> Any:
    from jetmesh.bus.connection import connect, jetstream
    from jetmesh.bus.ledger import Ledger
    from jetmesh.bus.streams import declare_streams

    nc = await connect(url, name="jetmesh-cli")
    js = jetstream(nc)
    await declare_streams(js)
    return nc, js, Ledger(nc, js)


# ----------------------------------------------------------------------------- nats


@app.command("nats")
def nats_cmd(
    data_dir: DataDirOpt = DEFAULT_DATA,
    port: Annotated[int, typer.Option(help="Client port (0: a free one).")] = 4222,
    monitor_port: Annotated[int | None, typer.Option(help="HTTP monitoring port.")] = None,
) -> None:
    """Run the embedded nats-server (JetStream, fsync on every write) until Ctrl-C."""
    from jetmesh.bus.server import EmbeddedNats, free_port

    _setup_logging()
    if port and not _port_free(port):
        err.print(f"port {port} is busy; using a free one")
        port = free_port()
    server = EmbeddedNats(data_dir=data_dir / "nats", port=port, monitor_port=monitor_port)
    server.start()
    console.print(f"nats-server ready at [bold]{server.url}[/] (data in {server.data_dir})")
    console.print(f"  export NATS_URL={server.url}")
    try:
        _wait_for_signal()
    finally:
        server.stop()
        console.print("nats-server stopped")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for_signal() -> None:
    got = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: got.append(s))
    while not got:
        signal.pause()


# ----------------------------------------------------------------------------- tasks


@app.command("tasks")
def tasks_cmd(
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    limit: Annotated[int, typer.Option(help="Show at most this many (newest first).")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """List tasks: state, last update, steps and cost so far."""
    target = resolve_url(url, data_dir)

    async def main() -> None:
        from jetmesh.orchestrator.projection import all_tasks

        nc, _, ledger = await _open(target)
        try:
            states = await all_tasks(ledger, limit=limit)
        finally:
            await nc.close()
        if as_json:
            for s in states:
                console.print_json(json.dumps({
                    "task_id": s.task_id, "status": s.status.value,
                    "updated_at": s.updated_at.isoformat() if s.updated_at else None,
                    "cost_usd": s.cost_usd, "steps": len(s.steps)}))
            return
        table = Table("task", "status", "goal", "steps", "cost $", "updated")
        for s in states:
            done = sum(1 for st in s.steps.values() if st.status.terminal)
            goal = (s.submitted.goal if s.submitted else "")[:40]
            table.add_row(s.task_id, s.status.value, goal, f"{done}/{len(s.steps)}",
                          f"{s.cost_usd:.4f}",
                          s.updated_at.strftime("%H:%M:%S") if s.updated_at else "")
        console.print(table if states else "no tasks yet")

    run(main)


def describe(entry_event: ev.Event) -> str:
    """One human line for an event."""
    e = entry_event
    match e:
        case ev.TaskSubmitted():
            return f"submitted: {e.data.goal or e.data.workflow or ''}"
        case ev.TaskPlanned():
            return f"planned by {e.data.planner}: " + ", ".join(
                f"{s.id}({s.skill})" for s in e.data.steps)
        case ev.StepDispatched():
            return f"step {e.data.step_id} -> {e.data.skill} (attempt {e.data.attempt})"
        case ev.StepStarted():
            return f"step {e.data.step_id} started by {e.data.agent} on {e.data.worker}"
        case ev.ModelCalled():
            d = e.data
            return (f"model {d.provider}/{d.model} [{d.purpose}{' ' + d.step_id if d.step_id else ''}]"
                    f" {d.input_tokens}+{d.output_tokens} tok ${d.cost_usd:.5f} "
                    f"{d.latency_ms:.0f}ms")
        case ev.ToolCalled():
            d2 = e.data
            res = f"error: {d2.error}" if d2.error else json.dumps(d2.output)[:80]
            return f"tool {d2.tool}({json.dumps(d2.arguments)[:60]}) -> {res}"
        case ev.StepCompleted():
            return f"step {e.data.step_id} completed: {json.dumps(e.data.output)[:100]}"
        case ev.StepFailed():
            return f"step {e.data.step_id} failed [{e.data.code}]: {e.data.reason}"
        case ev.TaskCompleted():
            return f"completed: {json.dumps(e.data.result)[:160]}"
        case ev.TaskFailed():
            return f"failed [{e.data.code}]: {e.data.reason}"
        case ev.TaskRejected():
            return f"rejected: {e.data.reason}"
        case ev.TaskCanceled():
            return f"canceled: {e.data.reason}"
        case ev.CancelRequested():
            return f"cancel requested: {e.data.reason}"
    return e.type


@app.command("tail")
def tail_cmd(
    task_id: Annotated[str, typer.Argument(help="The task to follow.")],
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    from_seq: Annotated[int, typer.Option(help="Resume from this ledger sequence.")] = 1,
    forever: Annotated[bool, typer.Option(help="Keep following after the task ends.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print raw CloudEvents.")] = False,
) -> None:
    """Follow a task's events live, from a sequence number, with no gap and no repeat."""
    target = resolve_url(url, data_dir)

    async def main() -> None:
        nc, _, ledger = await _open(target)
        try:
            async for entry in ledger.follow(task_id, from_seq=from_seq):
                if as_json:
                    print(json.dumps({"seq": entry.seq, "event": json.loads(
                        ev.encode_event(entry.event))}), flush=True)
                else:
                    console.print(f"[dim]{entry.seq:>7}[/] {entry.event.time:%H:%M:%S.%f}"[:-3]
                                  + f"  {describe(entry.event)}", highlight=False)
                if not forever and isinstance(entry.event, ev.TERMINAL_TASK_EVENTS):
                    return
        finally:
            await nc.close()

    run(main)


def main() -> None:
    os.environ.setdefault("MEM0_TELEMETRY", "False")
    app()
