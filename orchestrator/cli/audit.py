"""`jetmesh audit TASK [--format json|md]`: a task's audit export from its ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jetmesh.orchestrator.cli.kit import DEFAULT_DATA, DataDirOpt, UrlOpt, err, resolve_url, run


def register(app: typer.Typer) -> None:
    """Add `audit` to the jetmesh CLI."""

    @app.command("audit")
    def audit_cmd(
        task_id: Annotated[str, typer.Argument(help="The task.")],
        fmt: Annotated[str, typer.Option("--format", help="json or md.")] = "md",
        output: Annotated[Path | None, typer.Option(
            "--output", "-o", help="Write to this file instead of stdout.")] = None,
        url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    ) -> None:
        """What was asked and by whom, the plan, every model call, tool call, policy
        decision and approval (with the approver), the memories read and written with
        their provenance, and the outcome: all from the task's ledger. Exit 1 if the
        ledger has nothing for TASK."""
        from jetmesh.bus.subjects import InvalidIdError, check_id
        from jetmesh.orchestrator.audit import AuditReport, build_audit, render_markdown
        from jetmesh.orchestrator.client import Client

        if fmt not in ("json", "md"):
            err.print("--format is json or md")
            raise typer.Exit(2)
        try:
            check_id(task_id, "task id")
        except InvalidIdError as e:
            err.print(str(e))
            raise typer.Exit(2) from None
        target = resolve_url(url, data_dir)

        async def main() -> AuditReport:
            async with Client(target) as c:
                entries = await c.ledger.read(task_id)
                return build_audit(task_id, entries, [s.seq for s in entries.skipped])

        report = run(main)
        if not report.events:
            err.print(f"no events for task {task_id} in the ledger")
            raise typer.Exit(1)
        text = (report.model_dump_json(indent=2) + "\n" if fmt == "json"
                else render_markdown(report))
        if output is not None:
            output.write_text(text)
        else:
            typer.echo(text, nl=False)
