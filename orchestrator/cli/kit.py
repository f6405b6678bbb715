"""The kit every `jetmesh` command is built from: the consoles, the shared options, one
logging setup, one runner (event loop, signals, errors), the bus opener and the
`module:attr` loader. Commands import from here, never from each other."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from jetmesh.bus.errors import JetmeshError
from jetmesh.bus.settings import DATA_DIR_ENV, DEFAULT_DATA_DIR

console = Console()
err = Console(stderr=True)
T = TypeVar("T")

UrlOpt = Annotated[str | None, typer.Option("--url", envvar="NATS_URL",
                                            help="NATS server URL (default: NATS_URL, "
                                                 "else the embedded server in --data-dir).")]
DataDirOpt = Annotated[Path, typer.Option("--data-dir", envvar=DATA_DIR_ENV,
                                          help="Where jetmesh keeps its data.")]
DEFAULT_DATA = DEFAULT_DATA_DIR


def setup_logging(verbose: bool = False, *, console: Console = err,
                  tracebacks: bool = True, quiet_memory: bool = False) -> None:
    """Log records to `console` (stderr) through rich; nats-py's own logger at WARNING.
    `quiet_memory`: also quiet the memory store's chatty libraries (httpx, Qdrant, mem0)."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=tracebacks)],
        force=True,
    )
    logging.getLogger("nats").setLevel(logging.WARNING)
    if quiet_memory:
        for noisy in ("httpx", "qdrant_client"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # mem0 warns about optional extras (spaCy, BM25) jetmesh does not use.
        logging.getLogger("mem0").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message="Payload indexes have no effect")


def resolve_url(url: str | None, data_dir: Path, user: str | None = None) -> str:
    """--url / NATS_URL, else the embedded server running from `data_dir`. With no
    credentials in the environment, `user`'s from `data_dir` (a `jetmesh up` mesh;
    default: the running command's role, see nats_config.user_for_command)."""
    from jetmesh.bus.server import discover_url
    from jetmesh.orchestrator.cli.nats_config import use_data_dir_credentials

    use_data_dir_credentials(data_dir, user)
    if url:
        return url
    found = discover_url(data_dir)
    if found:
        return found
    err.print("[red]No NATS server found.[/] Start one with [bold]jetmesh up[/] (everything) "
              "or [bold]jetmesh nats[/] (the server alone), or set NATS_URL.")
    raise typer.Exit(2)


def loop_run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (it halves the event loop's own cost on the
    bus's many small messages), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async command. Every error jetmesh raises on purpose (`JetmeshError`, the
    one root of all its exception trees) becomes one clear line and exit code 1."""
    try:
        return loop_run(coro_fn())  # type: ignore[arg-type]
    except JetmeshError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@contextlib.asynccontextmanager
async def bus(url: str) -> AsyncIterator[tuple[Any, Any, Any]]:
    """`async with bus(url) as (nc, js, ledger)`: a connection with the streams declared,
    closed on the way out."""
    from jetmesh.bus.connection import connect, jetstream
    from jetmesh.bus.ledger import Ledger
    from jetmesh.bus.streams import declare_streams

    nc = await connect(url, name="jetmesh-cli")
    try:
        js = jetstream(nc)
        await declare_streams(js)
        yield nc, js, Ledger(nc, js)
    finally:
        await nc.close()


def stop_on_signals() -> asyncio.Event:
    """An event set on SIGINT / SIGTERM (call it from inside the running loop)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_until_signal(start: Callable[[], Awaitable[Any]],
                             stop: Callable[[Any], Awaitable[None]]) -> None:
    """`start()`, wait for SIGINT / SIGTERM, then `stop(what start returned)`. Once the
    role serves, its garbage collector is tuned for serving (`bus.connection.tune_gc`)."""
    from jetmesh.bus.connection import tune_gc

    done = stop_on_signals()
    handle = await start()
    tune_gc()
    try:
        await done.wait()
    finally:
        await stop(handle)


def wait_for_signal() -> None:
    """Block (no event loop) until SIGINT or SIGTERM."""
    got = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: got.append(s))
    while not got:
        signal.pause()


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    from jetmesh.bus.server import free_port as _free_port

    return _free_port()


def load_object(ref: str) -> Any:
    """`package.module:attr` -> that attribute."""
    import importlib

    mod, _, attr = ref.partition(":")
    return getattr(importlib.import_module(mod), attr)


def load_agent(name: str) -> Any:
    """A built-in spec by name, or `package.module:attr` for your own."""
    from jetmesh.agents.builtin import builtin_names, get_agent

    if ":" in name:
        return load_object(name)
    if name not in builtin_names():
        err.print(f"[red]unknown agent '{name}'.[/] Built-in: {', '.join(builtin_names())}")
        raise typer.Exit(2)
    return get_agent(name)


def parse_json_opt(value: str | None, what: str) -> dict[str, Any]:
    """A JSON object option (or @file.json); anything else exits 2 with why."""
    if not value:
        return {}
    try:
        data = json.loads(Path(value[1:]).read_text() if value.startswith("@") else value)
    except (ValueError, OSError) as e:
        err.print(f"[red]{what} is not valid JSON:[/] {e}")
        raise typer.Exit(2) from None
    if not isinstance(data, dict):
        err.print(f"[red]{what} must be a JSON object[/]")
        raise typer.Exit(2)
    return data


def cli_identity() -> str:
    """How the ledger names a CLI user: `cli:<login>` (who ran the command)."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        return "cli:unknown"


def refused(e: Exception) -> None:
    """A control the client refused (the task is unknown or over, nothing pending)."""
    from jetmesh.orchestrator.client import AmbiguousApproval

    err.print(f"[red]{escape(str(e))}[/]", soft_wrap=True)
    if isinstance(e, AmbiguousApproval):
        for p in e.pending:
            err.print(f"  step {p.step_id} tool {p.tool} args {json.dumps(p.arguments)}",
                      soft_wrap=True)
        raise typer.Exit(2)
    raise typer.Exit(1)
