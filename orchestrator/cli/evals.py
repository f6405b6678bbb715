"""`jetmesh eval run` and `jetmesh eval compare` (see jetmesh.orchestrator.evals)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from jetmesh.orchestrator.cli.kit import (
    DEFAULT_DATA,
    DataDirOpt,
    UrlOpt,
    console,
    err,
    resolve_url,
    run,
)


def parse_models(values: list[str] | None) -> dict[str, str]:
    """`AGENT=provider:model` items, each possibly a comma-separated list."""
    out: dict[str, str] = {}
    for v in values or []:
        for item in (x.strip() for x in v.split(",")):
            if not item:
                continue
            agent, sep, target = item.partition("=")
            if not sep or not agent or ":" not in target:
                raise ValueError(f"{item!r}: expected AGENT=provider:model")
            out[agent] = target
    return out


def cost_change(base: dict[str, Any], new: dict[str, Any]) -> str:
    """One line: NEW's cost against BASE's, at their pass rates (e.g. routing against
    all-strong)."""
    b, n = base["summary"], new["summary"]
    change = (f" ({(n['cost_usd'] - b['cost_usd']) / b['cost_usd']:+.1%})"
              if b["cost_usd"] else "")
    return (f"cost ${b['cost_usd']:.6f} -> ${n['cost_usd']:.6f}{change} · tokens "
            f"{b['tokens']} -> {n['tokens']} · pass rate {b['pass_rate']:.0%} -> "
            f"{n['pass_rate']:.0%}")


def print_report(rep: dict[str, Any]) -> None:

    table = Table(title=f"eval {rep['suite']} · models {json.dumps(rep['models'])}")
    for col in ("case", "tier", "score", "runs", "cost/run", "tokens/run", "latency p50",
                "failed checks"):
        table.add_column(col)
    colour = {"pass": "green", "soft": "yellow", "fail": "red"}
    for c in rep["cases"]:
        runs = c["runs"]
        failed = sorted({k["name"] for r in runs for k in r["checks"] if not k["ok"]})
        lat = sorted(r["latency_s"] for r in runs)
        table.add_row(
            c["id"], f"[{colour[c['tier']]}]{c['tier']}[/]", f"{c['score']:.2f}",
            str(len(runs)), f"${sum(r['cost_usd'] for r in runs) / len(runs):.5f}",
            str(sum(r["tokens"] for r in runs) // len(runs)),
            f"{lat[len(lat) // 2]:.2f}s", escape("; ".join(failed)))
    console.print(table)
    s = rep["summary"]
    per_pass = f"${s['cost_per_pass']:.5f}" if s["cost_per_pass"] is not None else "-"
    console.print(f"pass {s['pass']} · soft {s['soft']} · fail {s['fail']} of {s['cases']} "
                  f"· tool accuracy {s['tool_accuracy']:.0%} · cost ${s['cost_usd']:.5f} "
                  f"(per case ${s['cost_per_case']:.5f}, per pass {per_pass}) · "
                  f"tokens {s['tokens']} · latency p50 {s['latency_p50_s']:.2f}s "
                  f"p95 {s['latency_p95_s']:.2f}s")


def register(app: typer.Typer) -> None:
    """Add `eval run` and `eval compare` to the jetmesh CLI."""
    evals = typer.Typer(help="Evaluation suites (evals/*.yaml) run through the mesh.",
                        no_args_is_help=True)
    app.add_typer(evals, name="eval")

    @evals.command("run")
    def run_cmd(
        suite_file: Annotated[Path, typer.Argument(help="A suite (evals/*.yaml).")],
        models: Annotated[list[str] | None, typer.Option(
            "--models", "--model",
            help="AGENT=provider:model[,...]: fork each run from the first step of that "
                 "agent with this model.")] = None,
        runs: Annotated[int | None, typer.Option(help="Runs per case (default: the "
                                                      "suite's, 3).")] = None,
        run_id: Annotated[str | None, typer.Option(
            help="Reuse a run id to resume an interrupted run (nothing is paid twice).")]
        = None,
        json_out: Annotated[Path | None, typer.Option("--json", help="Write the JSON "
                                                                     "report here.")] = None,
        md_out: Annotated[Path | None, typer.Option("--md", help="Write a Markdown "
                                                                 "report here.")] = None,
        timeout: Annotated[float, typer.Option(help="Seconds per task.")] = 120,
        judge_model: Annotated[str | None, typer.Option(
            help="provider:model of the judge for rubrics that name none (default: the "
                 "suite's judge_model).")] = None,
        url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    ) -> None:
        """Run a suite against the running mesh: a table per case, JSON (stdout unless
        --json) and Markdown reports. Exit 1 if any case fails."""
        from jetmesh.bus.events import new_id
        from jetmesh.orchestrator.client import Client
        from jetmesh.orchestrator.evals import load_suite, markdown, report, run_suite

        try:
            suite = load_suite(suite_file)
            chosen = parse_models(models)
        except ValueError as e:
            err.print(f"[red]{escape(str(e))}[/]")
            raise typer.Exit(2) from None
        rid = run_id or new_id()[:10]
        if judge_model:
            suite = suite.model_copy(update={"judge_model": judge_model})
        target = resolve_url(url, data_dir)

        async def main() -> dict[str, Any]:
            async with Client(target) as c:
                results = await run_suite(c, suite, run_id=rid, models=chosen, runs=runs,
                                          timeout=timeout)
                return report(suite, rid, chosen, results)

        rep = run(main)
        print_report(rep)
        text = json.dumps(rep, indent=2, default=str)
        if json_out:
            json_out.write_text(text)
            console.print(f"JSON report: {json_out}")
        else:
            print(text)
        if md_out:
            md_out.write_text(markdown(rep))
        raise typer.Exit(1 if rep["summary"]["fail"] else 0)

    @evals.command("from-ledger")
    def from_ledger_cmd(
        since: Annotated[str, typer.Option(help="Tasks submitted since: 24h, 30m, 7d or "
                                                "an ISO time.")] = "24h",
        sample: Annotated[str, typer.Option(help="A stable sample: 10% or 0.1.")] = "100%",
        workflow: Annotated[str | None, typer.Option(help="Only this workflow.")] = None,
        name: Annotated[str, typer.Option(help="The suite's name.")] = "recorded",
        out: Annotated[Path | None, typer.Option(help="Write the suite here (default: "
                                                      "stdout).")] = None,
        url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    ) -> None:
        """Turn recorded tasks into a suite whose references are their outcomes (status,
        the tools that ran, the result)."""
        from jetmesh.orchestrator.client import Client
        from jetmesh.orchestrator.evals import Suite, parse_since, suite_from_ledger, suite_yaml

        try:
            start = parse_since(since)
            fraction = (float(sample.rstrip("%")) / 100 if sample.endswith("%")
                        else float(sample))
        except ValueError as e:
            err.print(f"[red]{escape(str(e))}[/]")
            raise typer.Exit(2) from None
        target = resolve_url(url, data_dir)

        async def main() -> Suite:
            async with Client(target) as c:
                return await suite_from_ledger(c, since=start, sample=fraction,
                                               workflow=workflow, name=name)

        suite = run(main)
        text = suite_yaml(suite)
        if out:
            out.write_text(text)
            console.print(f"{len(suite.cases)} cases: {out}")
        else:
            print(text, end="")

    @evals.command("compare")
    def compare_cmd(
        base: Annotated[Path, typer.Argument(help="The baseline report (JSON).")],
        new: Annotated[Path, typer.Argument(help="The new report (JSON).")],
        threshold: Annotated[float, typer.Option(
            help="Pass-rate drop tolerated (0.05: five points).")] = 0.0,
    ) -> None:
        """A CI gate: exit 1 if NEW regresses against BASE (a lower pass rate beyond the
        threshold, or a case in a worse tier), else 0."""
        from jetmesh.orchestrator.evals import compare_reports

        b, n = json.loads(base.read_text()), json.loads(new.read_text())
        regressions = compare_reports(b, n, threshold)
        console.print(escape(cost_change(b, n)))
        for r in regressions:
            console.print(f"[red]regression:[/] {escape(r)}")
        if not regressions:
            console.print("[green]no regression[/]")
        raise typer.Exit(1 if regressions else 0)
