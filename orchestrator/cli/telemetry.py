"""`jetmesh telemetry` (the role) and `jetmesh trace TASK` (a task's span tree)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from jetmesh.orchestrator.cli.kit import (
    DEFAULT_DATA,
    DataDirOpt,
    UrlOpt,
    bus,
    resolve_url,
    run,
    setup_logging,
    stop_on_signals,
)

console = Console()
err = Console(stderr=True, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("telemetry")(telemetry_cmd)
    app.command("trace")(trace_cmd)
    app.command("stats")(stats_cmd)


def telemetry_cmd(
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    durable: Annotated[str | None, typer.Option(
        "--durable", envvar="JETMESH_TELEMETRY_DURABLE",
        help="Name of the ledger consumer (default: telemetry).")] = None,
    new_only: Annotated[bool, typer.Option(
        "--new-only", help="A consumer created now starts at new events (no backfill of "
                           "tasks already in the ledger).")] = False,
    verbose: Annotated[bool, typer.Option("-v", help="Debug logging.")] = False,
) -> None:
    """Run the telemetry role: one OTLP trace per finished task (OTEL_* variables)."""
    from jetmesh.orchestrator.telemetry import run_telemetry

    setup_logging(verbose)
    target = resolve_url(url, data_dir)

    async def main() -> None:
        await run_telemetry(target, stop=stop_on_signals(), durable=durable, deliver_new=new_only)

    run(main)


def _ms(span: Any) -> float:
    return float((span.end_time or 0) - (span.start_time or 0)) / 1e6


def _label(span: Any) -> str:
    a = span.attributes or {}
    bits = [f"[bold]{escape(span.name)}[/]", f"{_ms(span):.0f} ms"]
    tin, tout = a.get("gen_ai.usage.input_tokens"), a.get("gen_ai.usage.output_tokens")
    if tin is not None or tout is not None:
        bits.append(f"tokens {tin or 0}/{tout or 0}")
    cost = a.get("gen_ai.usage.cost.total")
    if cost:
        bits.append(f"${float(cost):.6f}")
    if a.get("jetmesh.worker"):
        bits.append(f"[dim]{escape(str(a['jetmesh.worker']))}[/]")
    code = span.status.status_code.name
    if code == "ERROR":
        bits.append(f"[red]error: {escape(span.status.description or '')}[/]")
    elif code == "OK":
        bits.append("[green]ok[/]")
    for e in span.events:
        bits.append(f"[yellow]•{escape(e.name)}[/]")
    return "  ".join(bits)


def render_tree(spans: list[Any]) -> Tree:
    """The span tree of one trace (root first in `spans`)."""
    by_parent: dict[int | None, list[Any]] = {}
    ids = {s.context.span_id for s in spans}
    for s in spans:
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
        by_parent.setdefault(parent, []).append(s)
    roots = by_parent.get(None, [])
    tree = Tree(f"trace {spans[0].context.trace_id:032x}" if spans else "no spans")

    def add(node: Tree, span: Any) -> None:
        child = node.add(_label(span))
        for c in sorted(by_parent.get(span.context.span_id, []), key=lambda x: x.start_time):
            add(child, c)

    for r in roots:
        add(tree, r)
    return tree


def trace_cmd(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    export: Annotated[bool, typer.Option(
        "--export", help="Also send the trace to OTLP (OTEL_* variables); the span ids "
                         "are the telemetry role's, so a backend shows the same spans.")
    ] = False,
) -> None:
    """Draw a finished task's trace (the spans the telemetry role exports)."""
    from jetmesh.orchestrator.telemetry import build_spans, make_exporter

    target = resolve_url(url, data_dir)

    async def main() -> int:
        async with bus(target) as (_, _, ledger):
            entries = await ledger.read(task_id)
        if not entries:
            err.print(f"[red]no events for task {escape(task_id)}[/]")
            return 1
        spans = build_spans(task_id, entries)
        if not spans:
            err.print(f"task {escape(task_id)} has not ended: its trace is exported when "
                      "it does")
            return 1
        console.print(render_tree(spans))
        if export:
            exporter = make_exporter()
            if exporter is None:
                err.print("OTEL_TRACES_EXPORTER=none: nothing exported")
                return 1
            ok = exporter.export(spans).name == "SUCCESS"
            exporter.shutdown()
            if not ok:
                err.print("[red]export failed[/]")
                return 1
            console.print(f"exported {len(spans)} spans")
        return 0

    code = run(main)
    if code:
        raise typer.Exit(code)


def parse_since(value: str | None) -> timedelta | None:
    """`90s`, `30m`, `24h`, `7d` (None: all time)."""
    if not value:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return timedelta(seconds=float(value[:-1]) * units[value[-1]])
    except (KeyError, ValueError):
        raise typer.BadParameter(f"--since {value!r}: a number and s, m, h or d") from None


def _num(v: Any, fmt: str = "{:.3g}") -> str:
    return "-" if v is None else fmt.format(v)


def stats_cmd(
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    since: Annotated[str | None, typer.Option(help="Window: tasks ended within it "
                                                   "(e.g. 24h, 7d; default all).")] = None,
    by: Annotated[str | None, typer.Option(
        help="Also per workflow, tenant, agent, skill or model.")
                  ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Outcomes, cost per completed task, tokens, tool calls, approvals, latency: from
    the telemetry role's projection of finished tasks (KV jm-stats)."""
    from jetmesh.orchestrator.stats import BY, aggregate, read_summaries

    if by is not None and by not in BY:
        raise typer.BadParameter(f"--by must be one of {', '.join(BY)}")
    window = parse_since(since)
    target = resolve_url(url, data_dir)

    async def main() -> dict[str, Any]:
        async with bus(target) as (_, js, _):
            records = await read_summaries(js)
        start = datetime.now(UTC) - window if window else None
        return aggregate(records, since=start, by=by)

    out = run(main)
    if as_json:
        console.print_json(json.dumps(out))
        return
    a = out["all"]
    t = Table(title=f"tasks ended {'in the last ' + since if since else 'so far'}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("tasks", str(a["tasks"]))
    for k, v in sorted(a["by_outcome"].items()):
        t.add_row(f"  {k}", str(v))
    t.add_row("completion rate", _num(a["completion_rate"], "{:.1%}"))
    t.add_row("cost (USD)", _num(a["cost_usd"], "{:.6f}"))
    t.add_row("cost per completed task", _num(a["cost_per_completed_task"], "{:.6f}"))
    t.add_row("tokens per task", _num(a["tokens_per_task"], "{:.1f}"))
    t.add_row("tool calls per task", _num(a["tool_calls_per_task"], "{:.2f}"))
    t.add_row("escalation (approval) rate", _num(a["escalation_rate"], "{:.1%}"))
    ap = a["approvals"]
    t.add_row("approvals requested/granted/denied",
              f"{ap['requested']}/{ap['granted']}/{ap['denied']}")
    t.add_row("budget refusals", str(a["budget_refusals"]))
    t.add_row("spend alerts", str(a.get("spend_alerts", 0)))
    t.add_row("retries", str(a["retries"]))
    t.add_row("silent failures caught", str(a.get("silent_failures_caught", 0)))
    for k, v in sorted(a["failure_reasons"].items()):
        t.add_row(f"  failed: {k}", str(v))
    lat = a["latency_s"]
    t.add_row("latency p50/p95/p99 (s)",
              "/".join(_num(lat[q], "{:.2f}") for q in ("p50", "p95", "p99")))
    console.print(t)
    for key, groups in out.items():
        if key == "all":
            continue
        g = Table(title=key.replace("_", " "))
        g.add_column(key.removeprefix("by_"))
        if key in ("by_workflow", "by_tenant"):
            for col in ("tasks", "completed", "cost/completed", "p95 s"):
                g.add_column(col, justify="right")
            for name, f in groups.items():
                g.add_row(escape(name), str(f["tasks"]),
                          str(f["by_outcome"].get("completed", 0)),
                          _num(f["cost_per_completed_task"], "{:.6f}"),
                          _num(f["latency_s"]["p95"], "{:.2f}"))
        else:
            for col in ("tasks", "completed", "cost", "model calls", "tool calls", "tokens",
                        "prompt cache hits", "tool cache hits", "escalations"):
                g.add_column(col, justify="right")
            for name, f in groups.items():
                g.add_row(escape(name), str(f["tasks"]), str(f["completed"]),
                          f"{f['cost_usd']:.6f}", str(f["model_calls"]),
                          str(f["tool_calls"]), str(f["tokens"]),
                          _num(f.get("prompt_cache_hit_rate"), "{:.1%}"),
                          str(f.get("tool_cache_hits", 0)), str(f.get("escalations", 0)))
        console.print(g)
