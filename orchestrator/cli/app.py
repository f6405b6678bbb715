"""The `jetmesh` command line: run the mesh, submit and follow tasks, inspect the ledger."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from jetmesh.bus import events as ev
from jetmesh.bus.settings import GATEWAY_PORT, NATS_PORT
from jetmesh.orchestrator.cli import (
    a2a,
    audit,
    evals,
    health,
    killswitch,
    mcp,
    memory,
    nats_config,
    replay,
    telemetry,
    tenants,
)
from jetmesh.orchestrator.cli.kit import (
    DEFAULT_DATA,
    DataDirOpt,
    UrlOpt,
    bus,
    cli_identity,
    console,
    err,
    free_port,
    load_agent,
    parse_json_opt,
    port_free,
    refused,
    resolve_url,
    run,
    serve_until_signal,
    setup_logging,
    wait_for_signal,
)
from jetmesh.orchestrator.timeline import describe

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
# ----------------------------------------------------------------------------- nats


@app.command("nats")
def nats_cmd(
    data_dir: DataDirOpt = DEFAULT_DATA,
    port: Annotated[int, typer.Option(help="Client port (0: a free one).")] = NATS_PORT,
    monitor_port: Annotated[int | None, typer.Option(help="HTTP monitoring port.")] = None,
    auth_config: Annotated[Path | None, typer.Option(
        help="An authorization block from `jetmesh nats-config` (one user per role).")] = None,
) -> None:
    """Run the embedded nats-server (JetStream, fsync on every write) until Ctrl-C."""
    from jetmesh.bus.server import EmbeddedNats

    setup_logging()
    if port and not port_free(port):
        err.print(f"port {port} is busy; using a free one")
        port = free_port()
    extra = auth_config.read_text() if auth_config else ""
    server = EmbeddedNats(data_dir=data_dir / "nats", port=port, monitor_port=monitor_port,
                          extra_config=extra)
    server.start()
    console.print(f"nats-server ready at [bold]{server.url}[/] (data in {server.data_dir})")
    console.print(f"  export NATS_URL={server.url}")
    if auth_config:
        console.print(f"  with the users of {auth_config}: give each process its role's "
                      "NATS_USER, NATS_PASSWORD and NATS_INBOX_PREFIX")
    try:
        wait_for_signal()
    finally:
        server.stop()
        console.print("nats-server stopped")


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
        from jetmesh.orchestrator.tasks_kv import current_summaries, summarize

        # The KV projection (the gateway keeps it); no projection: fold the ledger.
        async with bus(target) as (_, js, ledger):
            got = await current_summaries(js, ledger)
            rows, lag = got if got is not None else (
                [summarize(s) for s in await all_tasks(ledger, limit=limit)], 0)
            rows = rows[:limit]
        if as_json:
            for s in rows:
                console.print_json(json.dumps({
                    "task_id": s.task_id, "status": s.status.value,
                    "updated_at": s.updated_at.isoformat() if s.updated_at else None,
                    "cost_usd": s.cost_usd, "steps": s.steps_total}))
            return
        table = Table("task", "status", "goal", "steps", "cost $", "updated")
        for s in rows:
            table.add_row(s.task_id, s.status.value, s.goal[:40],
                          f"{s.steps_done}/{s.steps_total}", f"{s.cost_usd:.4f}",
                          s.updated_at.strftime("%H:%M:%S") if s.updated_at else "")
        console.print(table if rows else "no tasks yet")
        if lag:
            err.print(f"[yellow]the task projection is {lag} ledger events behind "
                      "(is the gateway running?): those are not shown[/]")

    run(main)


@app.command("tail")
def tail_cmd(
    task_id: Annotated[str, typer.Argument(help="The task to follow.")],
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    from_seq: Annotated[int, typer.Option(
        min=1, help="Resume from this ledger sequence: the stream's, shared by all tasks "
                    "(the first column `tail` and `show` print), not a count of this "
                    "task's events.")] = 1,
    forever: Annotated[bool, typer.Option(help="Keep following after the task ends.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print raw CloudEvents.")] = False,
) -> None:
    """Follow a task's events live, from a sequence number, with no gap and no repeat."""
    target = resolve_url(url, data_dir)

    async def main() -> None:
        async with bus(target) as (_, _, ledger):
            if not forever and from_seq > 1:
                # A task that ended before `from_seq` has nothing more to show: say so
                # instead of waiting for events that will never come.
                end = next((x for x in await ledger.read(task_id)
                            if isinstance(x.event, ev.TERMINAL_TASK_EVENTS)), None)
                if end is not None and end.seq < from_seq:
                    err.print(f"task {task_id} ended at ledger seq {end.seq} "
                              f"({escape(describe(end.event))}), before --from-seq {from_seq}: "
                              "nothing more will come (sequences are the stream's, shared "
                              "by all tasks)")
                    return
            async for entry in ledger.follow(task_id, from_seq=from_seq):
                if as_json:
                    print(json.dumps({"seq": entry.seq, "event": json.loads(
                        ev.encode_event(entry.event))}), flush=True)
                else:
                    console.print(f"[dim]{entry.seq:>7}[/] {entry.event.time:%H:%M:%S.%f}"[:-3]
                                  + f"  {escape(describe(entry.event))}", highlight=False)
                if not forever and isinstance(entry.event, ev.TERMINAL_TASK_EVENTS):
                    return

    run(main)


# ----------------------------------------------------------------------------- roles


@app.command("orchestrator")
def orchestrator_cmd(
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    verbose: Annotated[bool, typer.Option("-v", help="Debug logging.")] = False,
) -> None:
    """Run the orchestrator role against NATS_URL (as a container would)."""
    setup_logging(verbose)
    target = resolve_url(url, data_dir)

    async def main() -> None:
        from jetmesh.agents.models.factory import create_model
        from jetmesh.bus.connection import connect, jetstream
        from jetmesh.bus.settings import BusSettings
        from jetmesh.orchestrator.service import (
            Orchestrator,
            OrchestratorSettings,
            real_directory,
        )

        settings = OrchestratorSettings()
        model = create_model(settings.planner_provider, settings.planner_model)

        async def start() -> Any:
            nc = await connect(target, name="jetmesh-orchestrator")
            js = jetstream(nc)
            bus_settings = BusSettings()
            directory = real_directory(js, settings, bus_settings)  # the ports, passed in
            await directory.start()
            orch = Orchestrator(nc, js, model=model, settings=settings,
                                bus_settings=bus_settings, directory=directory)
            await orch.start()
            return orch

        async def stop(orch: Any) -> None:
            await orch.stop()
            await orch.directory.stop()
            await orch.nc.close()
            await model.aclose()

        await serve_until_signal(start, stop)

    run(main)


@app.command("worker")
def worker_cmd(
    agent: Annotated[str, typer.Argument(help="A built-in agent name (see `jetmesh agents "
                                              "--builtin`) or module:attr of an AgentSpec.")],
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    verbose: Annotated[bool, typer.Option("-v", help="Debug logging.")] = False,
) -> None:
    """Run one agent replica: pull its skills' steps from NATS and run them."""
    setup_logging(verbose)
    spec = load_agent(agent)  # an unknown agent is named before any server is looked for
    target = resolve_url(url, data_dir)

    async def main() -> None:
        from jetmesh.agents.models.factory import create_model_chain
        from jetmesh.agents.worker import Worker
        from jetmesh.bus.connection import connect, jetstream

        model = create_model_chain(spec.model) if spec.needs_model else None

        async def start() -> Any:
            nc = await connect(target, name=f"jetmesh-agent-{spec.name}")
            from jetmesh.memory.tools import attach_memory

            w = Worker(await attach_memory(spec, nc), model, nc, jetstream(nc))
            await w.start()
            return w

        async def stop(w: Any) -> None:
            await w.stop()
            await w.nc.close()
            if model is not None:
                await model.aclose()

        await serve_until_signal(start, stop)

    run(main)


# ----------------------------------------------------------------------------- tasks


@app.command("submit")
def submit_cmd(
    goal: Annotated[str, typer.Argument(help="What the task should achieve.")] = "",
    workflow: Annotated[str | None, typer.Option(help="A declared workflow (fanout, "
                                                      "support, research, ...).")] = None,
    input_json: Annotated[str | None, typer.Option("--input", help="Task input as JSON "
                                                   "(or @file.json).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow progress and print the "
                                                      "result.")] = False,
    user: Annotated[str | None, typer.Option(help="Whom the task is for.")] = None,
    tenant: Annotated[str | None, typer.Option(help="The tenant the task belongs to.")]
    = None,
    max_usd: Annotated[float | None, typer.Option(help="Dollar budget.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Token budget.")] = None,
    max_tool_calls: Annotated[int | None, typer.Option(help="Tool-call budget.")] = None,
    deadline: Annotated[float | None, typer.Option(help="Deadline in seconds.")] = None,
    task_id: Annotated[str | None, typer.Option(help="Your own task id (idempotent).")] = None,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after seconds.")] = 600,
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
) -> None:
    """Submit a task; with --wait, show each step as it happens and print the result."""
    target = resolve_url(url, data_dir)
    task_input = parse_json_opt(input_json, "--input")
    if not goal and not workflow:
        err.print("[red]give a goal, a --workflow, or both[/]")
        raise typer.Exit(2)
    budget = None
    if any(v is not None for v in (max_usd, max_tokens, max_tool_calls, deadline)):
        budget = ev.Budget(max_usd=max_usd, max_tokens=max_tokens,
                           max_tool_calls=max_tool_calls, deadline_s=deadline)

    async def main() -> int:
        from jetmesh.orchestrator.client import Client, TaskExists
        from jetmesh.orchestrator.state import TaskState, TaskStatus, fold

        async with Client(target) as c:
            try:
                tid = await c.submit(goal, input=task_input, workflow=workflow, user_id=user,
                                     budget=budget, task_id=task_id, tenant=tenant,
                                     submitted_by=cli_identity())
            except TaskExists as e:
                err.print(f"[red]{escape(str(e))}[/]")
                return 1
            console.print(f"task [bold]{tid}[/] submitted")
            if not wait:
                console.print(f"  follow it: jetmesh tail {tid}")
                return 0
            state = TaskState(task_id=tid)

            async def follow() -> None:
                async for entry in c.follow(tid):
                    fold(tid, [entry], state)
                    console.print(f"  [dim]{entry.event.time:%H:%M:%S}[/] "
                                  f"{escape(describe(entry.event))}", highlight=False)
                    if isinstance(entry.event, ev.ApprovalRequested):
                        console.print(f"  [yellow]waiting for approval[/]: jetmesh approve "
                                      f"{tid}  (or: jetmesh deny {tid} --reason ...)",
                                      highlight=False, soft_wrap=True)

            try:
                await asyncio.wait_for(follow(), timeout)
            except TimeoutError:
                err.print(f"[yellow]still {state.status.value} after {timeout:g}s[/]; "
                          f"jetmesh tail {tid}")
                return 3
            # The follow shows the task's decisions; its usage, cost and tool calls are in
            # the steps' logs (JM_LOG), which the full fold reads.
            state = await c.state(tid)
            console.print(f"[bold]{state.status.value}[/] in "
                          f"{_elapsed(state)} · {state.model_calls} model calls · "
                          f"{state.tool_calls} tool calls · ${state.cost_usd:.5f}")
            if state.result is not None:
                console.print_json(json.dumps(state.result))
            elif state.reason:
                console.print(f"[red]{state.reason}[/]")
            return 0 if state.status is TaskStatus.COMPLETED else 1

    code = run(main)
    raise typer.Exit(code)


def _elapsed(state: Any) -> str:
    if state.created_at and state.updated_at:
        return f"{(state.updated_at - state.created_at).total_seconds():.2f}s"
    return "?"


@app.command("show")
def show_cmd(
    task_id: Annotated[str, typer.Argument(help="The task.")],
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
) -> None:
    """Print a task's timeline: steps, agents, models, tokens, cost, latency."""
    target = resolve_url(url, data_dir)

    async def main() -> None:
        from jetmesh.orchestrator.client import Client

        async with Client(target) as c:
            entries = await c.events(task_id)
            state = await c.state(task_id)
            waiting = await c.waiting_for_agents(state)
        if not entries:
            err.print(f"[red]no task {task_id}[/]")
            raise typer.Exit(1)
        goal = state.submitted.goal if state.submitted else ""
        console.print(f"[bold]{task_id}[/] {state.status.value} · {goal}")
        console.print(f"planner: {state.planner or '-'} · elapsed {_elapsed(state)} · "
                      f"{state.input_tokens}+{state.output_tokens} tokens · "
                      f"${state.cost_usd:.5f}")
        table = Table("step", "skill", "status", "agent", "tries", "model calls", "tools",
                      "tokens", "cost $", "latency")
        for sid, st in state.steps.items():
            lat = (f"{(st.finished_at - st.started_at).total_seconds() * 1000:.0f}ms"
                   if st.finished_at and st.started_at else "")
            table.add_row(sid, st.skill, st.status.value + (f" [{st.code}]" if st.code else ""),
                          st.agent or "", str(st.attempt), str(st.model_calls),
                          str(st.tool_calls), f"{st.input_tokens}+{st.output_tokens}",
                          f"{st.cost_usd:.5f}", lat)
        console.print(table)
        console.print("[bold]timeline[/]")
        t0 = entries[0].event.time
        for entry in entries:
            dt = (entry.event.time - t0).total_seconds() * 1000
            console.print(f"[dim]{entry.seq:>7} +{dt:>8.1f}ms[/] {escape(describe(entry.event))}",
                          highlight=False)
        for step_id, skill, since in waiting:
            console.print(f"[yellow]waiting for an agent offering skill {skill}[/] since "
                          f"{since.isoformat(timespec='seconds') if since else '?'} "
                          f"(step {step_id}, queued in its work stream)")
        for ign in state.ignored:
            console.print(f"[dim]ignored {ign.seq} {ign.type}"
                          f"{' step ' + ign.step_id if ign.step_id else ''}: "
                          f"{escape(ign.reason)}[/]", highlight=False)
        if state.ignored_count > len(state.ignored):
            console.print(f"[dim]... {state.ignored_count - len(state.ignored)} more "
                          "ignored[/]")
        for p in state.pending_approvals.values():
            console.print(f"[yellow]waiting for approval[/]: step {p.step_id} "
                          f"{p.tool}({escape(json.dumps(p.arguments))}) - {escape(p.reason)}; "
                          f"`jetmesh approve {task_id}` or `jetmesh deny {task_id}`")
        if state.result is not None:
            console.print("[bold]result[/]")
            console.print_json(json.dumps(state.result))
        elif state.reason:
            console.print(f"[red]{state.reason}[/]")

    run(main)


@app.command("cancel")
def cancel_cmd(
    task_id: Annotated[str, typer.Argument(help="The task.")],
    reason: Annotated[str, typer.Option(help="Why.")] = "canceled by request",
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
) -> None:
    """Ask the orchestrator to cancel a task."""
    target = resolve_url(url, data_dir)

    async def main() -> None:
        from jetmesh.orchestrator.client import Client, ControlRefused

        async with Client(target) as c:
            try:
                await c.cancel(task_id, reason, by=cli_identity())
            except ControlRefused as e:
                refused(e)
        console.print(f"cancel requested for {task_id}")

    run(main)


@app.command("agents")
def agents_cmd(
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
    skill: Annotated[str | None, typer.Option(help="Only agents offering this skill.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only agents with a skill tagged so.")] = None,
    builtin: Annotated[bool, typer.Option("--builtin", help="List the built-in agent "
                                                            "specs instead.")] = False,
) -> None:
    """List live agents and their replicas (from the registry on NATS)."""
    if builtin:
        from jetmesh.agents.builtin import BUILTIN_AGENTS

        table = Table("agent", "skills", "tools", "model")
        for name, spec in BUILTIN_AGENTS.items():
            table.add_row(name, ", ".join(s.id for s in spec.skills),
                          ", ".join(t.name for t in spec.tools),
                          "needs a model" if spec.needs_model else "none (deterministic)")
        console.print(table)
        return
    target = resolve_url(url, data_dir)

    async def main() -> None:
        from jetmesh.agents.registry import snapshot
        from jetmesh.agents.signing import verifier_from_env

        async with bus(target) as (_, js, _):  # verified cards only (JETMESH_CARD_*)
            agents, refused = await snapshot(js, verifier=verifier_from_env(), skill=skill,
                                             tag=tag)
        from jetmesh.agents.models import describe_breakers

        table = Table("agent", "replicas", "skills", "model", "version", "breakers")
        for a in agents:
            table.add_row(a.name, str(len(a.replicas)), ", ".join(a.skill_ids), a.model or "-",
                          a.version, describe_breakers(a.breakers))
        console.print(table if agents else "no live agents")
        for key, reason in sorted(refused.items()):
            console.print(f"refused {key}: {reason}", markup=False)

    run(main)


def _quiet_flags(command: Any) -> Any:
    """`command` (the click tree typer builds) with no `<bool>` shown beside a flag, which
    takes no value (`--help` included): the type column is for options that take one."""
    stack = [command]
    while stack:
        c = stack.pop()
        for p in c.params:
            if getattr(p, "is_flag", False):
                p.metavar = ""
        make_help = c.get_help_option

        def help_option(ctx: Any, make_help: Any = make_help) -> Any:
            option = make_help(ctx)
            if option is not None:
                option.metavar = ""
            return option

        c.get_help_option = help_option
        stack.extend(getattr(c, "commands", {}).values())
    return command


def main() -> None:
    os.environ.setdefault("MEM0_TELEMETRY", "False")
    _quiet_flags(typer.main.get_command(app))(prog_name="jetmesh")


def _decide_approval(task_id: str, granted: bool, step: str | None, tool: str | None,
                     reason: str, by: str, url: str | None, data_dir: Path) -> None:
    target = resolve_url(url, data_dir, user="approver")  # only the approver approves

    async def main() -> None:
        from jetmesh.orchestrator.client import Client, ControlRefused

        async with Client(target) as c:
            try:
                p, _ = await c.decide(task_id, granted, step=step, tool=tool, by=by,
                                      reason=reason)
            except ControlRefused as e:
                refused(e)
        verb = "approved" if granted else "denied"
        console.print(f"{verb}: step {p.step_id} {p.tool}({json.dumps(p.arguments)})")

    run(main)


@app.command("approve")
def approve_cmd(
    task_id: Annotated[str, typer.Argument(help="The task waiting for input.")],
    step: Annotated[str | None, typer.Option(help="The step, when several wait.")] = None,
    tool: Annotated[str | None, typer.Option(help="The tool, when several wait.")] = None,
    by: Annotated[str, typer.Option(help="Who approves (recorded).")] = os.environ.get(
        "USER", "operator"),
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
) -> None:
    """Approve a gated tool call: exactly the arguments shown by `jetmesh show`."""
    _decide_approval(task_id, True, step, tool, "", by, url, data_dir)


@app.command("answer")
def answer_cmd(
    task_id: Annotated[str, typer.Argument(help="The task whose agent asked a question.")],
    text: Annotated[str, typer.Argument(help="Your answer (the agent reads it as data).")],
    step: Annotated[str | None, typer.Option(help="The step, when several ask.")] = None,
    by: Annotated[str, typer.Option(help="Who answers (recorded).")] = os.environ.get(
        "USER", "user"),
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
) -> None:
    """Answer an agent's question (an `ask_user` call; `jetmesh show` shows it)."""
    from jetmesh.agents.tools import ASK_USER

    _decide_approval(task_id, True, step, ASK_USER, text, by, url, data_dir)


@app.command("deny")
def deny_cmd(
    task_id: Annotated[str, typer.Argument(help="The task waiting for input.")],
    reason: Annotated[str, typer.Option(help="Why (the model is told).")] = "denied",
    step: Annotated[str | None, typer.Option(help="The step, when several wait.")] = None,
    tool: Annotated[str | None, typer.Option(help="The tool, when several wait.")] = None,
    by: Annotated[str, typer.Option(help="Who denies (recorded).")] = os.environ.get(
        "USER", "operator"),
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
) -> None:
    """Deny a gated tool call; the agent is told and the call never runs."""
    _decide_approval(task_id, False, step, tool, reason, by, url, data_dir)


dlq_app = typer.Typer(help="Dead letters: see why, fix, redrive.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list_cmd(
    stream: Annotated[str | None, typer.Option(help="Only this stream's (JM_WORK, ...).")] = None,
    task: Annotated[str | None, typer.Option(help="Only this task's.")] = None,
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
) -> None:
    """List dead letters: where from, the task, the reason."""
    target = resolve_url(url, data_dir)

    async def main() -> None:
        from jetmesh.bus.dlq import list_dead_letters

        async with bus(target) as (_, _, ledger):
            letters = await list_dead_letters(ledger, stream=stream, task_id=task)
        table = Table("seq", "from", "subject", "task", "deliveries", "reason")
        for seq, dl in letters:
            table.add_row(str(seq), f"{dl.stream}/{dl.consumer}", dl.subject,
                          (dl.task_id or "")[:16], str(dl.deliveries), escape(dl.reason[:80]))
        console.print(table if letters else "no dead letters")

    run(main)


@dlq_app.command("show")
def dlq_show_cmd(
    seq: Annotated[int, typer.Argument(help="The dead letter's sequence (from `dlq list`).")],
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
) -> None:
    """Show one dead letter: reason, validation errors, headers and the original bytes."""
    target = resolve_url(url, data_dir)

    async def main() -> None:
        from jetmesh.bus import subjects
        from jetmesh.bus.dlq import DeadLetter

        async with bus(target) as (_, js, _):
            msg = await js.get_msg(subjects.STREAM_DLQ, seq, direct=True)
        try:
            dl = DeadLetter.model_validate_json(msg.data or b"{}")
        except ValueError as e:  # not a letter jetmesh wrote: show its bytes as they are
            err.print(f"[yellow]DLQ message {seq} is not a dead letter ({escape(str(e)[:200])});"
                      " its bytes:[/]")
            console.print(escape((msg.data or b"").decode("utf-8", errors="replace")),
                          highlight=False)
            return
        console.print_json(dl.model_dump_json(exclude={"data_b64"}))
        console.print("[bold]original bytes:[/]")
        console.print(escape(dl.data.decode("utf-8", errors="replace")), highlight=False)

    run(main)


@dlq_app.command("redrive")
def dlq_redrive_cmd(
    seqs: Annotated[list[int] | None, typer.Argument(help="Sequences to redrive.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Redrive every (matching) one.")] = False,
    task: Annotated[str | None, typer.Option(help="With --all: only this task's.")] = None,
    url: UrlOpt = None, data_dir: DataDirOpt = DEFAULT_DATA,
) -> None:
    """Publish dead letters to their original subjects again (after fixing the cause)."""
    target = resolve_url(url, data_dir)

    async def main() -> None:
        from jetmesh.bus.dlq import list_dead_letters, redrive

        async with bus(target) as (_, js, ledger):
            todo = list(seqs or [])
            if all_:
                todo += [s for s, _ in await list_dead_letters(ledger, task_id=task)]
            if not todo:
                err.print("nothing to redrive: give sequence numbers or --all")
                raise typer.Exit(2)
            for s in todo:
                dl = await redrive(js, ledger, s)
                console.print(f"redriven {s} -> {dl.subject}")

    run(main)


@app.command("up")
def up_cmd(
    data_dir: DataDirOpt = DEFAULT_DATA,
    port: Annotated[int, typer.Option(help="NATS client port (0: a free one).")] = NATS_PORT,
    agents: Annotated[str | None, typer.Option(help="Comma-separated built-in agents "
                                                    "(default: all).")] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Replicas per agent.")] = 1,
    live: Annotated[bool | None, typer.Option("--live/--plain", help="Live view (default "
                                                  "when on a terminal).")] = None,
    gateway_port: Annotated[int, typer.Option(
        help="A2A HTTP gateway port (0: none).")] = GATEWAY_PORT,
) -> None:
    """Run the whole mesh here: NATS, the orchestrator and the built-in agents, each role
    as its own NATS user (least privilege; the users and passwords are in
    <data-dir>/nats-auth.conf and nats-auth.env, mode 0600, and the other commands find
    their credentials there)."""
    from jetmesh.agents.builtin import builtin_names
    from jetmesh.agents.models.factory import describe_default_model
    from jetmesh.orchestrator.cli.up import run_up

    setup_logging()
    names = [a.strip() for a in agents.split(",")] if agents else builtin_names()
    unknown = sorted(set(names) - set(builtin_names()))
    if unknown:
        err.print(f"[red]unknown agents {unknown}[/]; built-in: {', '.join(builtin_names())}")
        raise typer.Exit(2)
    if port and not port_free(port):
        port = free_port()
    live_view = console.is_terminal if live is None else live
    if not live_view:
        console.soft_wrap = True  # plain lines are never wrapped: commands copy-paste whole
    console.print(f"model: {describe_default_model()}")
    gw: int | None = None
    if gateway_port:
        gw = gateway_port if port_free(gateway_port) else free_port()
    run(lambda: run_up(data_dir.resolve(), port, names, replicas, console, live_view, gw))


for _module in (a2a, mcp, memory, health, nats_config, replay, evals, telemetry,
                killswitch, audit, tenants):
    _module.register(app)


if __name__ == "__main__":
    main()
