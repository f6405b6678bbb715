"""`jetmesh replay`, `jetmesh fork` and `jetmesh diff` (see jetmesh.orchestrator.replay)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from jetmesh.bus import events as ev
from jetmesh.orchestrator.cli.kit import (
    DEFAULT_DATA,
    DataDirOpt,
    UrlOpt,
    console,
    err,
    parse_json_opt,
    resolve_url,
    run,
)

if TYPE_CHECKING:
    from jetmesh.orchestrator.replay import Comparison


def print_comparison(cmp: Comparison, *, as_json: bool, title: str) -> None:

    if as_json:
        console.print_json(json.dumps(cmp.as_json(), default=str))
        return
    table = Table(title=title)
    for col in ("step", "same", "A status", "B status", "tools A/B", "model calls A/B",
                "tokens A/B", "cost A/B", "latency ms A/B", "changes"):
        table.add_column(col)
    for s in cmp.steps:
        a, b = s.a, s.b

        def pair(fa: str, fb: str) -> str:
            return f"{fa} / {fb}"

        table.add_row(
            s.step_id, "yes" if s.identical else "[red]no[/]",
            a.status if a else "-", b.status if b else "-",
            pair(str(len(a.tools)) if a else "-", str(len(b.tools)) if b else "-"),
            pair(str(a.model_calls) if a else "-", str(b.model_calls) if b else "-"),
            pair(str(a.input_tokens + a.output_tokens) if a else "-",
                 str(b.input_tokens + b.output_tokens) if b else "-"),
            pair(f"{a.cost_usd:.5f}" if a else "-", f"{b.cost_usd:.5f}" if b else "-"),
            pair(f"{a.latency_ms:.0f}" if a else "-", f"{b.latency_ms:.0f}" if b else "-"),
            escape("; ".join(s.changes())))
    console.print(table)
    console.print(f"A {cmp.a}: {cmp.a_status} · B {cmp.b}: {cmp.b_status} · result "
                  + ("identical" if cmp.result_identical else "[red]differs[/]"))
    if cmp.first_divergence:
        console.print(f"first divergence: {escape(cmp.first_divergence)}")
    else:
        console.print("[green]identical[/]")


def _models(values: list[str] | None) -> dict[str, str]:

    out: dict[str, str] = {}
    for v in values or []:
        agent, sep, target = v.partition("=")
        if not sep or not agent or ":" not in target:
            err.print(f"[red]--model {escape(v)}: expected AGENT=provider:model[/]")
            raise typer.Exit(2)
        out[agent] = target
    return out


def register(app: typer.Typer) -> None:
    """Add `replay`, `fork` and `diff` to the jetmesh CLI."""

    @app.command("replay")
    def replay_cmd(
        task_id: Annotated[str, typer.Argument(help="The finished task to replay.")],
        as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]
        = False,
        timeout: Annotated[float, typer.Option(help="Give up after seconds.")] = 120,
        url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    ) -> None:
        """Re-run a finished task from its recording as a new task (`replay_of` it): no
        model call, no side effect. Exit 0 if every step and the result are identical,
        1 if not (the first diverging event is named)."""
        cmp = _run(url, data_dir, task_id, None, None, timeout)
        print_comparison(cmp, as_json=as_json, title=f"replay of {task_id}")
        raise typer.Exit(0 if cmp.identical else 1)

    @app.command("fork")
    def fork_cmd(
        task_id: Annotated[str, typer.Argument(help="The finished task to fork.")],
        from_step: Annotated[str, typer.Option("--from", help="Re-run this step and "
                                                              "everything downstream.")],
        model: Annotated[list[str] | None, typer.Option(
            "--model", help="AGENT=provider:model for the re-run steps (repeatable).")]
        = None,
        patch_input: Annotated[str | None, typer.Option(
            "--patch-input", help="JSON object merged over the task's input.")] = None,
        effects: Annotated[str, typer.Option(
            help="Side effects of the re-run steps: dry-run (recorded 'would call') or "
                 "real.")] = "dry-run",
        as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]
        = False,
        timeout: Annotated[float, typer.Option(help="Give up after seconds.")] = 120,
        url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    ) -> None:
        """Fork a finished task: the steps upstream of --from are served from the
        recording (no calls), --from and its downstream run again with the changes. The
        original is not changed. Prints the diff; exit 0 if the fork completed."""

        if effects not in ("dry-run", "real"):
            err.print("[red]--effects is dry-run or real[/]")
            raise typer.Exit(2)
        fork = ev.ForkSpec(from_step=from_step, models=_models(model),
                           effects="real" if effects == "real" else "dry-run")
        patch = parse_json_opt(patch_input, "--patch-input") if patch_input else None
        cmp = _run(url, data_dir, task_id, fork, patch, timeout)
        print_comparison(cmp, as_json=as_json, title=f"fork of {task_id} from {from_step}")
        raise typer.Exit(0 if cmp.b_status == "completed" else 1)

    @app.command("diff")
    def diff_cmd(
        task_a: Annotated[str, typer.Argument(help="A task.")],
        task_b: Annotated[str, typer.Argument(help="Another task (e.g. its fork).")],
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    ) -> None:
        """Step by step what changed between two tasks: outputs, tool calls, tokens,
        cost, latency. Exit 0 either way."""
        from jetmesh.orchestrator.client import Client
        from jetmesh.orchestrator.replay import diff_tasks

        target = resolve_url(url, data_dir)

        async def main() -> Comparison:
            async with Client(target) as c:
                return await diff_tasks(c, task_a, task_b)

        print_comparison(run(main), as_json=as_json, title=f"{task_a} vs {task_b}")


def _run(url: str | None, data_dir: Path, task_id: str, fork: ev.ForkSpec | None,
         patch: dict[str, Any] | None, timeout: float) -> Comparison:
    from jetmesh.orchestrator.client import Client
    from jetmesh.orchestrator.replay import run_replay

    target = resolve_url(url, data_dir)

    async def main() -> Comparison | str:
        async with Client(target) as c:
            try:
                return await run_replay(c, task_id, fork=fork, patch_input=patch,
                                        timeout=timeout)
            except ValueError as e:
                return str(e)
            except TimeoutError:
                return f"the new task did not finish within {timeout:g}s"

    out = run(main)
    if isinstance(out, str):
        err.print(f"[red]{escape(out)}[/]")
        raise typer.Exit(1)
    return out
