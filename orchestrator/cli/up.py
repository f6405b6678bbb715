"""`jetmesh up`: the whole mesh on one machine, as supervised processes.

Starts the embedded nats-server, then the orchestrator and one replica of each built-in
agent as child processes (each the same `jetmesh <role>` command a container runs),
restarts any of them that dies (the nats-server too: same data directory, port and
configuration, so the roles reconnect), shows a live view of processes, agents and
tasks, and on Ctrl-C stops the children (SIGTERM, graceful, SIGKILL after a grace),
then the server. Shutdown always stops every child, whatever died first.

By default every role runs as its own NATS user (bus/permissions): the users, with
passwords kept across runs, are in `<data-dir>/nats-auth.conf` (the server includes it)
and `<data-dir>/nats-auth.env` (each child gets its role's block; the CLI's commands run
against this mesh read theirs from it), both mode 0600. (`run_up(auth=False)`, for code
that embeds it, runs the server without users; the command has no such switch.)

`<data-dir>/up.json` holds the pids of `up`, the server and every child while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.errors import ServerStartError
from jetmesh.bus.permissions import user_name
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.tasks import cancel_and_wait
from jetmesh.orchestrator.cli.kit import stop_on_signals

log = logging.getLogger("jetmesh.up")

STATUS_FILE = "up.json"
STOP_GRACE_S = 15.0
"""How long children get to stop after SIGTERM before they are SIGKILLed."""
CREDENTIAL_ENV = ("NATS_USER", "NATS_PASSWORD", "NATS_INBOX_PREFIX", "NATS_CREDS",
                  "JETMESH_NATS_CREDS", "JETMESH_NATS_INBOX_PREFIX")


@dataclass(frozen=True)
class Backoff:
    """When to restart a process that died: exponential in its crashes in a row, and a
    run of `healthy_s` or more starts the count again (so a child that crashes once a
    day restarts at once, and one in a crash loop waits longer each time, up to
    `max_s`)."""

    base_s: float = 0.5
    max_s: float = 10.0
    """At most this long down: a role in a crash loop still comes back often enough that
    its queued work waits, not fails (measured by the kill campaign under `up`)."""
    healthy_s: float = 5.0

    def after_exit(self, crashes_in_a_row: int, ran_s: float) -> tuple[float, int]:
        """(seconds to wait before the restart, crashes in a row counting this one)."""
        streak = 0 if ran_s >= self.healthy_s else crashes_in_a_row
        return min(self.max_s, self.base_s * 2 ** min(streak, 16)), streak + 1


SERVER_BACKOFF = Backoff(base_s=0.2, max_s=2.0)
"""The nats-server's: every role waits on it, and a start that fails (its port taken)
costs nothing to try again every 2 s."""


def _signal_group(pid: int, sig: int) -> None:
    """Signal a child's process group (each child leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass
class Child:
    """One supervised `jetmesh <role>` process."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    crashes: int = 0
    """Crashes in a row (reset by a healthy run: see Backoff)."""
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
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> str:
        if self.proc is None:
            return "starting"
        code = self.proc.poll()
        return "running" if code is None else f"exited {code}"

    def terminate(self) -> None:
        """SIGTERM to the child's process group (nothing if it is gone)."""
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                _signal_group(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5.0)

    def wait(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def stop_children(children: Sequence[Child], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every child still running, wait for all of them together up to `grace_s`,
    SIGKILL whatever is left. Never raises for a child already gone."""
    for c in children:
        with contextlib.suppress(Exception):
            c.terminate()
    deadline = time.monotonic() + grace_s
    for c in children:
        if c.proc is None:
            continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.proc.wait(max(0.0, deadline - time.monotonic()))
    for c in children:
        with contextlib.suppress(Exception):
            c.kill()


def role_user(child_args: Sequence[str]) -> str:
    """The NATS user a child's command runs as."""
    cmd = child_args[0]
    if cmd == "worker":
        return user_name("agent", child_args[1])
    return user_name(cmd)


def default_children(url: str, data_dir: Path, agents: list[str], replicas: int,
                     gateway_port: int | None = None,
                     credentials: Mapping[str, Mapping[str, str]] | None = None
                     ) -> list[Child]:
    """The children of `jetmesh up`. `credentials`: user -> its NATS_* variables (each
    child gets its own role's); None: anonymous."""
    base = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV}
    base.update({"NATS_URL": url, "JETMESH_DATA_DIR": str(data_dir),
                 "PYTHONUNBUFFERED": "1", "JETMESH_MEMORY_TOOLS": "on",
                 "JETMESH_UI_EAGER": "1"})  # the gateway keeps the task projection
    logs = data_dir / "logs"

    def child(name: str, args: list[str]) -> Child:
        env = dict(base)
        if credentials is not None:
            env.update(credentials[role_user(args)])
        return Child(name, args, logs / f"{name}.log", env)

    children = [child("orchestrator", ["orchestrator"]), child("memory", ["memory"]),
                child("telemetry", ["telemetry"])]
    if gateway_port is not None:
        children.append(child("gateway", ["gateway", "--port", str(gateway_port)]))
        children.append(child("bridge", ["bridge"]))
    for name in agents:
        for r in range(replicas):
            label = name if replicas == 1 else f"{name}-{r + 1}"
            children.append(child(label, ["worker", name]))
    return children


@dataclass
class NatsChild:
    """The embedded nats-server, supervised like the children: restarted on the same
    data directory, port and configuration."""

    server: EmbeddedNats
    restarts: int = 0
    crashes: int = 0
    next_start: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    name: str = "nats-server"

    @property
    def pid(self) -> int | None:
        return self.server.process.pid if self.server.process is not None else None

    @property
    def alive(self) -> bool:
        return self.server.running

    def status(self) -> str:
        proc = self.server.process
        if proc is None:
            return "starting"
        code = proc.poll()
        return "running" if code is None else f"exited {code}"

    def start(self) -> None:
        """Blocking: until the server is ready (run it in a thread)."""
        self.server.start()
        self.started_at = time.monotonic()


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


def dashboard_banner(data_dir: Path, url: str) -> str:
    """The dashboard's address and fresh login tokens (written, hashed, to the data
    directory, mode 0600; shown this once), unless the deployment configured its own
    (JETMESH_UI_TOKENS / JETMESH_UI_TOKENS_FILE)."""
    from jetmesh.a2a.ui.auth import TOKENS_FILE, configured_elsewhere, generate_tokens

    if configured_elsewhere():
        return f"dashboard: {url} (log in with your configured token)"
    tokens = generate_tokens(data_dir / TOKENS_FILE)
    return (f"dashboard: {url}\n  approver token:  {tokens['approver']}\n"
            f"  read-only token: {tokens['read-only']}\n"
            "  (shown once; new ones at every `jetmesh up`)")


def write_status(path: Path, nats: NatsChild, children: Sequence[Child]) -> None:
    """The pids of `up`, its server and its children (for operators and tests)."""
    data = {"pid": os.getpid(), "url": nats.server.url,
            "nats": {"pid": nats.pid, "restarts": nats.restarts},
            "children": {c.name: {"pid": c.pid, "restarts": c.restarts} for c in children}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


async def run_up(data_dir: Path, port: int, agents: list[str], replicas: int,
                 console: Console, live_view: bool, gateway_port: int | None = None,
                 *, auth: bool = True, backoff: Backoff | None = None,
                 stop_grace_s: float = STOP_GRACE_S) -> None:
    from jetmesh.agents.registry import Registry
    from jetmesh.agents.signing import verifier_from_env
    from jetmesh.bus.connection import connect, jetstream
    from jetmesh.bus.credentials import AUTH_CONF, read_env_blocks
    from jetmesh.bus.ledger import Ledger
    from jetmesh.bus.presence import PresenceView
    from jetmesh.bus.streams import declare_buckets, declare_streams
    from jetmesh.orchestrator.cli.nats_config import resolve_agents, write_data_dir_auth

    policy = backoff or Backoff()
    credentials: dict[str, dict[str, str]] | None = None
    extra = ""
    if auth:
        # Every agent up may run, and the bridge: one user per role (bus/permissions).
        _, _, env_path = write_data_dir_auth(data_dir, resolve_agents(agents))
        credentials = read_env_blocks(env_path)
        # nats-server resolves an include against the including file's folder.
        extra = f'include "../{AUTH_CONF}"'
    server = EmbeddedNats(data_dir=data_dir / "nats", port=port, extra_config=extra)
    nats = NatsChild(server)
    status_path = data_dir / STATUS_FILE
    children: list[Child] = []
    tasks: list[asyncio.Task[None]] = []
    view: PresenceView | None = None
    directory: Registry | None = None
    view_started = False
    nc = None
    if not live_view:
        console.soft_wrap = True  # plain output: one line per message, never wrapped at
        # the console's width (80 off a terminal), so the commands shown copy-paste whole
    await asyncio.to_thread(nats.start)
    try:
        console.print(f"nats-server ready at {server.url} (data in {server.data_dir}"
                      + (", one user per role" if auth else ", no authentication") + ")")
        admin: dict[str, Any] = {}
        if credentials is not None:
            a = credentials["admin"]
            admin = {"user": a["NATS_USER"], "password": a["NATS_PASSWORD"],
                     "inbox_prefix": a["NATS_INBOX_PREFIX"]}
        nc = await connect(server.url, name="jetmesh-up", **admin)
        js = jetstream(nc)
        await declare_streams(js)
        await declare_buckets(js)  # as admin: the roles only read them
        children = default_children(server.url, data_dir, agents, replicas, gateway_port,
                                    credentials)
        for c in children:
            c.start()
        write_status(status_path, nats, children)
        console.print(f"started {len(children)} processes; logs in {data_dir / 'logs'}")
        if gateway_port is not None:
            console.print(f"A2A gateway: http://127.0.0.1:{gateway_port}"
                          "/.well-known/agent-card.json")
            console.print(dashboard_banner(data_dir, f"http://127.0.0.1:{gateway_port}/ui/"))
        console.print("submit a task from another terminal:\n"
                      "  jetmesh submit \"where is my order?\" --workflow support "
                      "--input '{\"order_id\": \"A1001\"}' --wait\n"
                      "  jetmesh submit \"refund my damaged order\" --workflow refund "
                      "--input '{\"order_id\": \"A1023\", \"amount_usd\": 218, "
                      "\"reason\": \"arrived damaged\"}' --wait\n"
                      "Ctrl-C stops everything.", markup=False, highlight=False)

        stop = stop_on_signals()

        board = TaskBoard()
        ledger = Ledger(nc, js)

        async def follow_tasks() -> None:
            while True:  # the follow ends or fails when the server restarts
                try:
                    async for entry in ledger.follow(filter_subject=subjects.ALL_TASK_EVENTS):
                        board.apply(entry.event)
                        if not live_view and isinstance(entry.event, ev.TERMINAL_TASK_EVENTS):
                            console.print(f"task {entry.event.subject}: "
                                          f"{board.tasks[entry.event.subject]['status']}")
                except Exception as e:
                    log.debug("task board: %s; following again", e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

        view = PresenceView(js, subjects.BUCKET_AGENTS)
        directory = Registry(view, verifier=verifier_from_env())

        async def show() -> None:
            """The live view's sources, in the background: supervision never waits on
            the server (it may be the one that died)."""
            nonlocal view_started
            assert view is not None
            while not view_started:
                try:
                    await asyncio.wait_for(view.start(), 10.0)
                    view_started = True
                except Exception as e:
                    log.debug("agents view: %s; trying again", e)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)
            await follow_tasks()

        def render() -> Group:
            procs = Table("process", "pid", "status", "restarts", title="processes")
            shown: list[Child | NatsChild] = [nats, *children]
            for c in shown:
                procs.add_row(c.name, str(c.pid or "-"), c.status(), str(c.restarts))
            agents_t = Table("agent", "replicas", "skills", "model", title="live agents")
            if directory is not None and view_started:  # verified cards only
                for a in directory.agents():
                    agents_t.add_row(a.name, str(len(a.replicas)), ", ".join(a.skill_ids),
                                     a.model or "-")
            tasks_t = Table("task", "status", "goal", "plan", title="recent tasks")
            for tid, t in list(board.tasks.items())[-8:][::-1]:
                tasks_t.add_row(tid[:12], t["status"], t["goal"][:40], t["plan"][:40])
            return Group(procs, agents_t, tasks_t)

        def due(p: Child | NatsChild, now: float) -> bool:
            """Whether a dead process should start now (schedules it when just dead)."""
            if p.next_start == 0.0:  # just died: schedule a restart with backoff
                rule = SERVER_BACKOFF if isinstance(p, NatsChild) else policy
                delay, p.crashes = rule.after_exit(p.crashes, now - p.started_at)
                p.next_start = now + delay
                if not live_view:
                    where = f" (log: {p.log_path})" if isinstance(p, Child) else ""
                    console.print(f"{p.name} {p.status()}; restarting in {delay:.1f}s"
                                  + where)
                return False
            return now >= p.next_start

        async def supervise() -> None:
            while not stop.is_set():
                now = time.monotonic()
                changed = False
                if not nats.alive and due(nats, now):
                    nats.restarts += 1
                    nats.next_start = 0.0
                    try:
                        await asyncio.to_thread(nats.start)
                        if not live_view:
                            console.print(f"nats-server restarted at {server.url}")
                    except ServerStartError as e:
                        console.print(f"nats-server did not start again: {e}")
                        nats.started_at = time.monotonic()
                    changed = True
                for c in children:
                    if c.alive or c.proc is None:
                        continue
                    if due(c, time.monotonic()):
                        c.restarts += 1
                        c.next_start = 0.0
                        c.start()
                        changed = True
                if changed:
                    write_status(status_path, nats, children)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

        sup = asyncio.create_task(supervise(), name="up-supervise")
        tasks.append(asyncio.create_task(show(), name="up-view"))
        if live_view:
            with Live(render(), console=console, refresh_per_second=2) as live:
                while not stop.is_set() and not sup.done():
                    live.update(render())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.5)
        await sup
    finally:
        # Whatever happened (Ctrl-C, a dead server, an exception): every child stops.
        console.print("stopping...")
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(cancel_and_wait(*tasks), 5.0)
        if view is not None and view_started:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(view.stop(), 5.0)
        if nc is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(nc.close(), 5.0)
        await asyncio.to_thread(stop_children, children, stop_grace_s)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(server.stop)
        with contextlib.suppress(Exception):
            server.kill()
        server.url_file.unlink(missing_ok=True)
        status_path.unlink(missing_ok=True)
        console.print("stopped")
