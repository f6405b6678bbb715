"""`jetmesh up`: the whole mesh on one machine, as supervised processes.

Starts the embedded nats-server, then the orchestrator and one replica of each built-in
agent as child processes (each the same `jetmesh <role>` command a container runs),
restarts a child that dies, shows a live view of processes, agents and tasks, and on
Ctrl-C stops the children (SIGTERM, graceful), then the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.tasks import cancel_and_wait


@dataclass
class Child:
    """One supervised `jetmesh <role>` process."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default_factory=time.monotonic)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # cwd is the log folder, never the current directory: run from a checkout of
            # jetmesh, `python -m` would put the checkout's `a2a/` and `agents/` folders on
            # sys.path ahead of the A2A SDK and the OpenAI Agents SDK.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jetmesh.orchestrator.cli", *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                cwd=self.log_path.parent)
        self.started_at = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> str:
        if self.proc is None:
            return "starting"
        code = self.proc.poll()
        return "running" if code is None else f"exited {code}"

    def terminate(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def default_children(url: str, data_dir: Path, agents: list[str], replicas: int,
                     gateway_port: int | None = None) -> list[Child]:
    env = {**os.environ, "NATS_URL": url, "JETMESH_DATA_DIR": str(data_dir),
           "PYTHONUNBUFFERED": "1", "JETMESH_MEMORY_TOOLS": "on"}
    logs = data_dir / "logs"
    children = [Child("orchestrator", ["orchestrator"], logs / "orchestrator.log", env),
                Child("memory", ["memory"], logs / "memory.log", env)]
    if gateway_port is not None:
        children.append(Child("gateway", ["gateway", "--port", str(gateway_port)],
                              logs / "gateway.log", env))
        children.append(Child("bridge", ["bridge"], logs / "bridge.log", env))
    for name in agents:
        for r in range(replicas):
            label = name if replicas == 1 else f"{name}-{r + 1}"
            children.append(Child(label, ["worker", name], logs / f"{label}.log", env))
    return children


class TaskBoard:
    """Recent tasks for the live view, folded from the task subjects as they arrive."""

    def __init__(self) -> None:
        self.tasks: dict[str, dict[str, str]] = {}

    def apply(self, event: ev.Event) -> None:
        t = self.tasks.setdefault(event.subject, {"status": "submitted", "goal": "",
                                                  "plan": ""})
        match event:
            case ev.TaskSubmitted():
                t["goal"] = event.data.goal or (event.data.workflow or "")
            case ev.TaskPlanned():
                t["status"] = "working"
                t["plan"] = ", ".join(s.skill for s in event.data.steps)
            case ev.TaskCompleted():
                t["status"] = "completed"
            case ev.TaskFailed():
                t["status"] = f"failed: {event.data.reason[:40]}"
            case ev.TaskRejected():
                t["status"] = f"rejected: {event.data.reason[:40]}"
            case ev.TaskCanceled():
                t["status"] = "canceled"
        self.tasks[event.subject] = self.tasks.pop(event.subject)  # most recent last


async def run_up(data_dir: Path, port: int, agents: list[str], replicas: int,
                 console: Console, live_view: bool, gateway_port: int | None = None) -> None:
    from jetmesh.bus.connection import connect, jetstream
    from jetmesh.bus.ledger import Ledger
    from jetmesh.bus.streams import declare_streams
    from jetmesh.orchestrator.registry import LiveAgent

    server = EmbeddedNats(data_dir=data_dir / "nats", port=port)
    await asyncio.to_thread(server.start)
    console.print(f"nats-server ready at {server.url} (data in {server.data_dir})")
    nc = await connect(server.url, name="jetmesh-up")
    js = jetstream(nc)
    await declare_streams(js)
    children = default_children(server.url, data_dir, agents, replicas, gateway_port)
    for c in children:
        c.start()
    console.print(f"started {len(children)} processes; logs in {data_dir / 'logs'}")
    if gateway_port is not None:
        console.print(f"A2A gateway: http://127.0.0.1:{gateway_port}/.well-known/agent-card.json")
    console.print("submit a task from another terminal:\n"
                  "  jetmesh submit \"where is my order?\" --workflow support "
                  "--input '{\"order_id\": \"A1001\"}' --wait\n"
                  "Ctrl-C stops everything.")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    board = TaskBoard()
    ledger = Ledger(nc, js)

    async def follow_tasks() -> None:
        async for entry in ledger.follow(filter_subject=subjects.ALL_TASK_EVENTS):
            board.apply(entry.event)
            if not live_view and isinstance(entry.event, ev.TERMINAL_TASK_EVENTS):
                console.print(f"task {entry.event.subject}: "
                              f"{board.tasks[entry.event.subject]['status']}")

    from jetmesh.bus.presence import PresenceView
    view = PresenceView(js, subjects.BUCKET_AGENTS)
    await view.start()
    follower = asyncio.create_task(follow_tasks())

    def render() -> Group:
        procs = Table("process", "pid", "status", "restarts", title="processes")
        for c in children:
            procs.add_row(c.name, str(c.proc.pid if c.proc else "-"), c.status(),
                          str(c.restarts))
        agents_t = Table("agent", "replicas", "skills", "model", title="live agents")
        grouped: dict[str, LiveAgent] = {}
        for e in view.live():
            v = e.value
            a = grouped.setdefault(v.get("agent", "?"), LiveAgent(
                v.get("agent", "?"), v.get("version", ""), v.get("model"),
                [s.get("id", "?") for s in v.get("skills", [])]))
            a.replicas.append(v.get("replica", ""))
        for a in sorted(grouped.values(), key=lambda a: a.name):
            agents_t.add_row(a.name, str(len(a.replicas)), ", ".join(a.skills), a.model or "-")
        tasks_t = Table("task", "status", "goal", "plan", title="recent tasks")
        for tid, t in list(board.tasks.items())[-8:][::-1]:
            tasks_t.add_row(tid[:12], t["status"], t["goal"][:40], t["plan"][:40])
        return Group(procs, agents_t, tasks_t)

    async def supervise() -> None:
        while not stop.is_set():
            now = time.monotonic()
            for c in children:
                if c.alive or c.proc is None:
                    continue
                if c.next_start == 0.0:  # just died: schedule a restart with backoff
                    backoff = min(30.0, 0.5 * 2 ** min(c.restarts, 6))
                    c.next_start = now + backoff
                    if not live_view:
                        console.print(f"{c.name} {c.status()}; restarting in {backoff:.1f}s "
                                      f"(log: {c.log_path})")
                elif now >= c.next_start:
                    c.restarts += 1
                    c.next_start = 0.0
                    c.start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    try:
        if live_view:
            with Live(render(), console=console, refresh_per_second=2) as live:
                sup = asyncio.create_task(supervise())
                while not stop.is_set():
                    live.update(render())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.5)
                await sup
        else:
            await supervise()
    finally:
        console.print("stopping...")
        await cancel_and_wait(follower)
        await view.stop()
        await nc.close()
        for c in children:
            c.terminate()
        for c in children:
            await asyncio.to_thread(c.wait, 15.0)
        await asyncio.to_thread(server.stop)
        console.print("stopped")
