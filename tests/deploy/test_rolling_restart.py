"""A rolling restart as Kubernetes does one, under load, on a 3-node NATS cluster.

The shape of deploy/kubernetes in miniature: three nats-server processes routed into one
cluster on loopback, with one NATS user per role (bus/permissions, as the rendered
Secrets configure it) and R3 streams and buckets (`JETMESH_REPLICAS=3`); two
orchestrators, the memory service, telemetry, the A2A gateway and the bridge, two
replicas of each agent (one in the default run), every one a real `jetmesh <role>`
process with its own role's credentials and every node's URL, supervised like `jetmesh
up` supervises its children (`orchestrator.cli.up.Child`; one that dies unexpectedly is
restarted and counted).

While tasks are submitted at a steady pace, every role process is replaced one at a
time the way a Deployment's rolling update (maxSurge 1, maxUnavailable 0) does it: the
new process starts, and once it is connected as its role (a worker: once its replica
heartbeats in the registry; the gateway: once it serves its card) the old one gets
SIGTERM and must drain and exit 0 within the pods' terminationGracePeriodSeconds. The
slow campaign then also rolls the NATS nodes as the StatefulSet would (lame duck mode,
exit, the same data directory back, `/healthz` current again before the next).

Must hold: every submitted task completes with exactly one terminal event; nothing is
dead-lettered; no process crashed or needed SIGKILL. The default run rolls one process of
each role while tasks go in every 0.5 s (at least 40); `-m slow` rolls every process
and every node while they go in every 0.3 s (at least `JETMESH_ROLLING_TASKS`, 200).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.credentials import read_env_blocks
from jetmesh.bus.ledger import Ledger
from jetmesh.bus.server import EmbeddedNats, free_port
from jetmesh.bus.settings import BusSettings
from jetmesh.bus.streams import declare_buckets, declare_streams
from jetmesh.orchestrator.cli.nats_config import resolve_agents, write_data_dir_auth
from jetmesh.orchestrator.cli.up import Child, role_user
from jetmesh.orchestrator.state import TaskStatus, fold

KUBE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
AGENTS = ["support", "orders"]
ORDERS = ["A1001", "A1002", "A1003", "A1004", "A1005", "A1006"]
LOOKUP = {"name": "lookup", "description": "One order lookup by the orders agent.",
          "steps": [{"id": "lookup", "skill": "lookup_order",
                     "input": {"order_id": {"$ref": "task.input.order_id"}}}]}
SETTINGS = BusSettings(replicas=3, ack_wait_s=10.0, max_deliver=20, request_timeout_s=5.0,
                       connect_timeout_s=3.0)


def gateway_can_start() -> bool:
    """The gateway opens the A2A push-config bucket at start; until its NATS user may read
    that bucket (bus/permissions) it cannot start as itself, and is left out here."""
    from jetmesh.bus.permissions import allowed, gateway_permissions, kv_stream

    info = f"{subjects.JS_API}.STREAM.INFO.{kv_stream(subjects.BUCKET_A2A_PUSH)}"
    return allowed(gateway_permissions().publish, info)


def grace_s() -> float:
    """terminationGracePeriodSeconds of the jetmesh roles in deploy/kubernetes."""
    doc = next(d for d in yaml.safe_load_all((KUBE / "base" / "orchestrator.yaml").read_text())
               if d["kind"] == "Deployment")
    return float(doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


async def until(what: str, fn: Any, timeout: float = 60.0, every: float = 0.2) -> Any:
    """Call async `fn` until it returns a true value without raising."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            got = await fn()
            if got:
                return got
        except Exception as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s: {what} (last: {last!r})")
        await asyncio.sleep(every)


@dataclass
class Rolled:
    name: str
    code: int | None
    drain_s: float


@dataclass
class Mesh:
    root: Path
    nodes: list[EmbeddedNats] = field(default_factory=list)
    monitors: list[int] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    creds: dict[str, dict[str, str]] = field(default_factory=dict)
    rolling: set[int] = field(default_factory=set)
    crashes: Counter[str] = field(default_factory=Counter)
    rolled: list[Rolled] = field(default_factory=list)
    generation: int = 0

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    # ------------------------------------------------------------------ NATS

    def start_cluster(self) -> None:
        _, conf, env = write_data_dir_auth(self.root, resolve_agents(AGENTS))
        self.creds = read_env_blocks(env)
        ports = [free_port() for _ in range(3)]
        cports = [free_port() for _ in range(3)]
        self.monitors = [free_port() for _ in range(3)]
        # Lame duck as in deploy/kubernetes (30 s is nats-server's minimum), the users.
        extra = "lame_duck_duration: 30s\nlame_duck_grace_period: 1s\n" + conf.read_text()
        self.nodes = [EmbeddedNats(
            data_dir=self.root / f"nats-{i}", port=ports[i], server_name=f"nats-{i}",
            monitor_port=self.monitors[i], cluster_name="jetmesh", cluster_port=cports[i],
            routes=[f"nats-route://127.0.0.1:{cports[j]}" for j in range(3) if j != i],
            extra_config=extra) for i in range(3)]
        for n in self.nodes:
            n.start()

    async def admin(self) -> Any:
        a = self.creds["admin"]
        return await connect(self.url, settings=SETTINGS, name="rolling-admin",
                             user=a["NATS_USER"], password=a["NATS_PASSWORD"],
                             inbox_prefix=a["NATS_INBOX_PREFIX"])

    async def declare(self, js: Any) -> None:
        async def both() -> bool:
            await declare_streams(js, SETTINGS)
            await declare_buckets(js, SETTINGS)
            return True

        await until("R3 streams and buckets", both, timeout=60, every=0.5)

    async def users_connected(self, user: str) -> int:
        """Connections logged in as `user`, over every node."""
        total = 0
        for port in self.monitors:
            data = await asyncio.to_thread(
                http_json, f"http://127.0.0.1:{port}/connz?auth=true&limit=4096")
            total += sum(1 for c in data.get("connections", [])
                         if c.get("authorized_user") == user)
        return total

    async def roll_node(self, i: int) -> Rolled:
        """As the StatefulSet: preStop puts the node in lame duck mode, it exits, the pod
        comes back on the same volume and is ready when /healthz says JetStream is
        current."""
        node = self.nodes[i]
        assert node.process is not None
        t0 = time.monotonic()
        os.kill(node.process.pid, signal.SIGUSR2)  # `nats-server --signal ldm`
        code = await asyncio.to_thread(node.process.wait, 60)
        drained = time.monotonic() - t0
        await asyncio.to_thread(node.start)

        async def current() -> bool:
            data = await asyncio.to_thread(http_json,
                                           f"http://127.0.0.1:{self.monitors[i]}/healthz")
            return bool(data.get("status") == "ok")

        await until(f"nats-{i} current again", current, timeout=120, every=0.5)
        r = Rolled(f"nats-{i}", code, drained)
        self.rolled.append(r)
        return r

    # ------------------------------------------------------------------ roles

    def env(self, args: list[str], workflows: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "JETMESH_"))}
        env.update({
            "NATS_URL": self.url, "JETMESH_REPLICAS": "3", "JETMESH_ACK_WAIT_S": "10",
            "JETMESH_MAX_DELIVER": "20", "JETMESH_MODEL_PROVIDER": "sim",
            "JETMESH_TICK_S": "0.25", "JETMESH_NO_AGENT_WAIT_S": "120",
            "JETMESH_WORKFLOWS_DIR": str(workflows), "JETMESH_MEMORY_EMBEDDER": "hash",
            "JETMESH_ALLOW_MODEL_REQUESTS": "0", "OTEL_TRACES_EXPORTER": "none",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.creds[role_user(args)])
        self.generation += 1
        # Each pod has its own emptyDir /data (the embedded Qdrant folder of one memory
        # process is locked by it).
        env["JETMESH_DATA_DIR"] = str(self.root / "pods" / f"{self.generation}")
        return env

    def child(self, name: str, args: list[str], workflows: Path) -> Child:
        if args[0] == "gateway":
            args = ["gateway", "--port", str(free_port())]
        env = self.env(args, workflows)
        return Child(name, args, Path(env["JETMESH_DATA_DIR"]) / f"{name}.log", env)

    def start_roles(self, workflows: Path, agent_replicas: int) -> None:
        specs = [("orchestrator-1", ["orchestrator"]), ("orchestrator-2", ["orchestrator"]),
                 ("memory", ["memory"]), ("telemetry", ["telemetry"]),
                 ("bridge", ["bridge"])]
        if gateway_can_start():
            specs.insert(4, ("gateway", ["gateway"]))
        specs += [(f"{a}-{r}", ["worker", a]) for a in AGENTS
                  for r in range(1, agent_replicas + 1)]
        self.children = [self.child(n, a, workflows) for n, a in specs]
        for c in self.children:
            c.start()

    async def ready(self, new: Child, before: int) -> None:
        """The replacement serves: connected as its role (a worker: heartbeating in the
        registry under its own replica id; the gateway: serving its card)."""
        try:
            await self._ready(new, before)
        except AssertionError as e:
            tail = new.log_path.read_text(errors="replace")[-3000:] \
                if new.log_path.exists() else ""
            raise AssertionError(f"{e}\n--- {new.name} (pid {new.pid}, "
                                 f"{new.status()}) log ---\n{tail}") from None

    async def _ready(self, new: Child, before: int) -> None:
        user = role_user(new.args)
        await until(f"{new.name} (pid {new.pid}) connected as {user}",
                    lambda: self._more(user, before), timeout=90)
        if new.args[0] == "worker":
            nc = await self.admin()
            try:
                kv = await jetstream(nc, SETTINGS).key_value(subjects.BUCKET_AGENTS)
                key = f"{new.args[1]}.{socket.gethostname()}-{new.pid}"
                await until(f"{key} heartbeating", lambda: kv.get(key), timeout=60)
            finally:
                await nc.close()
        if new.args[0] == "gateway":
            url = f"http://127.0.0.1:{new.args[2]}/.well-known/agent-card.json"
            await until("the new gateway's card", lambda: asyncio.to_thread(http_json, url),
                        timeout=90)

    async def _more(self, user: str, before: int) -> bool:
        return await self.users_connected(user) > before

    async def roll(self, i: int, workflows: Path) -> Rolled:
        """maxSurge 1, maxUnavailable 0: the new process is ready before the old one
        gets SIGTERM; the old one must drain and exit 0 within the grace period."""
        old = self.children[i]
        self.rolling.add(i)
        try:
            before = await self.users_connected(role_user(old.args))
            new = self.child(old.name, old.args, workflows)
            new.start()
            await self.ready(new, before)
            assert old.proc is not None
            t0 = time.monotonic()
            old.terminate()
            try:
                code: int | None = await asyncio.to_thread(old.proc.wait, grace_s())
            except subprocess.TimeoutExpired:
                old.kill()  # what the kubelet does after the grace period
                code = None
            r = Rolled(old.name, code, time.monotonic() - t0)
            self.children[i] = new
        finally:
            self.rolling.discard(i)
        self.rolled.append(r)
        return r

    async def supervise(self, stop: asyncio.Event) -> None:
        """`jetmesh up`'s job (and the kubelet's): a process that died is started again."""
        while not stop.is_set():
            for i, c in enumerate(self.children):
                if i not in self.rolling and c.proc is not None and not c.alive:
                    self.crashes[c.name] += 1
                    c.start()
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass

    def stop(self) -> None:
        for c in self.children:
            c.terminate()
        for c in self.children:
            c.wait(20)
        for n in self.nodes:
            n.stop()


async def wait_terminal(ledger: Ledger, ids: list[str], timeout: float
                        ) -> dict[str, tuple[Any, int]]:
    """id -> (fold, number of terminal events), once every task is terminal."""
    deadline = time.monotonic() + timeout
    out: dict[str, tuple[Any, int]] = {}
    while len(out) < len(ids):
        for tid in ids:
            if tid in out:
                continue
            try:
                entries = await ledger.read(tid)
            except Exception:
                continue
            state = fold(tid, entries)
            if state.terminal:
                out[tid] = (state, 0)
        if len(out) < len(ids):
            if time.monotonic() > deadline:
                missing = [t for t in ids if t not in out]
                raise AssertionError(f"{len(missing)} of {len(ids)} tasks never ended: "
                                     f"{missing[:5]}")
            await asyncio.sleep(0.5)
    for tid in ids:  # a second terminal event may land after the first: read once more
        entries = await ledger.read(tid)
        ends = sum(1 for e in entries if isinstance(e.event, ev.TERMINAL_TASK_EVENTS))
        out[tid] = (fold(tid, entries), ends)
    return out


async def campaign(root: Path, n_tasks: int, every_process: bool, nodes: bool,
                   agent_replicas: int, pace_s: float) -> None:
    """Tasks go in every `pace_s` until every restart is done, and at least `n_tasks`."""
    workflows = root / "workflows"
    workflows.mkdir(parents=True)
    (workflows / "lookup.yaml").write_text(yaml.safe_dump(LOOKUP))
    mesh = Mesh(root)
    stop = asyncio.Event()
    supervisor: asyncio.Task[None] | None = None
    nc = None
    t0 = time.monotonic()
    try:
        await asyncio.to_thread(mesh.start_cluster)
        nc = await mesh.admin()
        js = jetstream(nc, SETTINGS)
        await mesh.declare(js)
        await asyncio.to_thread(mesh.start_roles, workflows, agent_replicas)
        supervisor = asyncio.create_task(mesh.supervise(stop))
        ledger = Ledger(nc, js, timeout_s=SETTINGS.request_timeout_s)

        # What gets rolled: one process of each role, or all of them (and the nodes).
        if every_process:
            targets: list[Any] = list(range(len(mesh.children)))
        else:
            seen: set[str] = set()
            targets = []
            for i, c in enumerate(mesh.children):
                kind = " ".join(c.args[:2]) if c.args[0] == "worker" else c.args[0]
                if kind not in seen:
                    seen.add(kind)
                    targets.append(i)
        if nodes:
            targets += [("node", i) for i in (2, 1, 0)]  # the StatefulSet's order

        submitted: list[str] = []

        async def submit(i: int) -> None:
            if i % 2 == 0:
                sub = ev.TaskSubmission(goal=f"where are my orders? ({i})", workflow="fanout",
                                        input={"order_ids": [ORDERS[(i + k) % 6]
                                                             for k in range(3)]})
            else:
                sub = ev.TaskSubmission(goal=f"order {i}", workflow="lookup",
                                        input={"order_id": ORDERS[i % 6]})
            while True:  # the same id until JetStream acknowledges it
                try:
                    await js.publish(subjects.SUBMIT, sub.model_dump_json().encode(),
                                     headers={"Nats-Msg-Id": sub.task_id}, timeout=5)
                    submitted.append(sub.task_id)
                    return
                except Exception:
                    await asyncio.sleep(0.2)

        # One task through before the restarts start: the mesh serves.
        await submit(0)
        await wait_terminal(ledger, submitted, 120)
        warm_s = time.monotonic() - t0
        # A role that started before R3 streams and buckets answered may have exited
        # and been started again (a pod's CrashLoopBackOff); from here on, none may.
        at_start = dict(mesh.crashes)
        mesh.crashes.clear()

        rolled = asyncio.Event()

        async def submitter() -> None:
            # Through every restart, then up to n_tasks: each restart happens under load.
            i = 1
            while not rolled.is_set() or i < n_tasks:
                await submit(i)
                i += 1
                await asyncio.sleep(pace_s)  # a steady pace of load, not a wait for anything

        async def roller() -> None:
            await until("the load to start", lambda: _reached(submitted, 5), timeout=60)
            for target in targets:
                if isinstance(target, tuple):
                    await mesh.roll_node(target[1])
                else:
                    await mesh.roll(target, workflows)
            rolled.set()

        await asyncio.gather(submitter(), roller())
        n_tasks = len(submitted)
        states = await wait_terminal(ledger, submitted, 300)
        dlq = await js.stream_info(subjects.STREAM_DLQ)
        stop.set()
        await supervisor
        supervisor = None
    finally:
        stop.set()
        if supervisor is not None:
            supervisor.cancel()
        if nc is not None:
            await nc.close()
        await asyncio.to_thread(mesh.stop)

    status = Counter(s.status.value for s, _ in states.values())
    ends = Counter(n for _, n in states.values())
    drains = {r.name: (r.code, round(r.drain_s, 1)) for r in mesh.rolled}
    print(f"\nrolling restart: {len(mesh.rolled)} restarts (name: exit code, drain s) "
          f"{drains}; {n_tasks} tasks: {dict(status)}; terminal events per task "
          f"{dict(ends)}; dead letters {dlq.state.messages}; crashes {dict(mesh.crashes)} "
          f"(restarts while the mesh came up: {at_start}); "
          f"warm-up {warm_s:.1f}s, total {time.monotonic() - t0:.1f}s")
    assert len(mesh.rolled) == len(targets)
    bad = {r.name: r.code for r in mesh.rolled if r.code != 0}
    assert bad == {}, f"not a clean drain and exit 0 on SIGTERM / lame duck: {bad}"
    assert not mesh.crashes, mesh.crashes
    failed = {t: (s.status, s.code, s.reason) for t, (s, _) in states.items()
              if s.status is not TaskStatus.COMPLETED}
    assert failed == {}, failed
    assert ends == Counter({1: n_tasks}), ends
    assert dlq.state.messages == 0


async def _reached(submitted: list[str], n: int) -> bool:
    return len(submitted) >= n


@pytest.mark.timeout(300)
async def test_rolling_restart_of_each_role_under_load_loses_nothing(tmp_path: Path) -> None:
    await campaign(tmp_path, n_tasks=40, every_process=False, nodes=False, agent_replicas=1,
                   pace_s=0.5)


@pytest.mark.slow
@pytest.mark.timeout(1800)
# nats-py leaves the socket of a connection to a node that went away for the garbage
# collector when it reconnects elsewhere (the NATS nodes are rolled here).
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning")
async def test_rolling_restart_of_every_process_and_node_under_200_tasks(tmp_path: Path
                                                                       ) -> None:
    await campaign(tmp_path, n_tasks=int(os.environ.get("JETMESH_ROLLING_TASKS", "200")),
                   every_process=True, nodes=True, agent_replicas=2, pace_s=0.3)
