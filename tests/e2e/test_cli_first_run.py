"""What a newcomer meets at the CLI: help that reads well, `tail --from-seq` that says
when nothing more will come instead of hanging."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import typer.main

from jetmesh.bus.ledger import is_log_seq
from jetmesh.orchestrator.cli import _quiet_flags, app
from jetmesh.orchestrator.state import TaskStatus

ORDERS = ["A1001", "A1002", "A1003"]


def _commands(command: Any) -> list[Any]:
    out, stack = [], [command]
    while stack:
        c = stack.pop()
        out.append(c)
        stack.extend(getattr(c, "commands", {}).values())
    return out


def test_no_flag_is_shown_with_a_value_type() -> None:
    tree = _quiet_flags(typer.main.get_command(app))
    commands = _commands(tree)
    assert len(commands) > 20
    flags = 0
    for c in commands:
        ctx = c.make_context(c.name or "jetmesh", [], resilient_parsing=True)
        for p in [*c.params, c.get_help_option(ctx)]:
            if p is not None and getattr(p, "is_flag", False):
                flags += 1
                assert p.display_type_rich(ctx) in ("", None), (c.name, p.name)
    assert flags > len(commands)  # every command has at least --help


async def _jetmesh(*args: str, url: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetmesh.orchestrator.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NATS_URL": url, "COLUMNS": "200"})
    out, errs = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode(), errs.decode()


async def test_help_renders_flags_without_a_type(bus) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = await _jetmesh("tail", "--help", url=bus.url)
    assert code == 0 and "--forever" in out and "--help" in out
    assert "<bool>" not in out


async def test_tail_from_a_seq_after_the_tasks_end_says_so(make_mesh, bus,
                                                           tmp_path: Path) -> None:
    mesh = await make_mesh(["support"])
    tid = await mesh.client.submit("orders", workflow="fanout", input={"order_ids": ORDERS})
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.COMPLETED
    last = max(e.seq for e in await mesh.client.events(tid) if not is_log_seq(e.seq))
    code, out, errs = await _jetmesh("tail", tid, "--from-seq", str(last + 1), url=bus.url)
    assert code == 0 and out == ""
    assert "ended at ledger seq" in errs and "nothing more will come" in errs
    # From a sequence inside the task: its events from there on, up to its end.
    code, out, _ = await _jetmesh("tail", tid, "--from-seq", str(last), url=bus.url)
    assert code == 0 and len(out.strip().splitlines()) == 1 and str(last) in out


def test_python_dash_m_pytest_from_the_checkout_finds_the_sdks() -> None:
    """`python -m pytest` puts the checkout on sys.path, where its a2a/ folder would
    shadow the A2A SDK; the suite's conftest takes the checkout off the path."""
    import subprocess

    checkout = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--collect-only", "tests/a2a/test_a2a_cards.py"], cwd=checkout,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "tests collected" in res.stdout  # the module, which imports the SDK, loaded


def test_an_unknown_agent_is_named_before_any_server_is_looked_for(tmp_path: Path) -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    res = subprocess.run([sys.executable, "-m", "jetmesh.orchestrator.cli", "worker",
                          "no-such-agent"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, check=False, env={**env, "COLUMNS": "200"})
    assert res.returncode != 0
    assert "unknown agent 'no-such-agent'" in res.stderr + res.stdout
    assert "NATS" not in res.stderr + res.stdout
