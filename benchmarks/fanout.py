"""The standard fan-out benchmark (shared BENCHMARK.md), workloads A, B and C, real stack.

    .venv/bin/python benchmarks/fanout.py --quick                 # smoke: 30 tasks, 1 run
    .venv/bin/python benchmarks/fanout.py                         # A, B, C; median of 3
    .venv/bin/python benchmarks/fanout.py --workloads B --runs 1 --profile cprofile

Every run starts a fresh stack on this machine, in a fresh temporary data directory:

- one embedded nats-server (`jetmesh.bus.server.EmbeddedNats`, `sync_interval: always`),
  with the streams of `--durability` (default balanced: the steps' logs in JM_LOG,
  acknowledged before their fsync; strict: every stream fsync'd before its acks);
- the orchestrator, a separate process (`python -m jetmesh.orchestrator.cli orchestrator`)
  whose planning/merge model is the scripted `fanout_models:planner` (JETMESH_PLANNER_*);
- 1, 2 or 4 replicas of the built-in `support` worker, separate processes
  (`python -m jetmesh.orchestrator.cli worker support`) on the dry-run SimModel
  (JETMESH_MODEL_PROVIDER=sim, JETMESH_SIM_LATENCY_MS);
- the load generator, here, through `jetmesh.Client`: `submit(goal, input={"order_ids":
  [3 ids]})` with no workflow, so the orchestrator's LLM planner plans it (1 model call:
  3 `order_status` steps, merge), each worker runs model -> lookup_order -> model, and
  the orchestrator merges with 1 model call: 8 model calls and 3 tool calls per task.

Completion is observed through one ordered consumer over every task's events subject
(`jm.task.*.events`) that resolves each task's future on its terminal event (one
consumer for the run rather than one per task, so the load generator adds no per-task
consumer churn to the server). Latency per task = submit call -> TaskCompleted seen.
After each run every task is verified from the ledger (outside the timing): completed,
exactly 8 ModelCalled and 3 ToolCalled events, each tool call looked up its step's id,
and the result (merged answer and step outputs) holds the order record of each of the
task's 3 ids. A run with any failed check aborts the benchmark.

Peak RSS: VmHWM of every child (nats-server, orchestrator, workers), read just before
they stop; getrusage for this process. CPU per process (utime+stime from /proc over the
measured window) shows where the time goes. `--profile cprofile|pyspy` profiles the
orchestrator and the first worker during the runs (see benchmarks/profiled.py).
Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.js.api import ConsumerConfig, DeliverPolicy

from jetmesh.bus import events as ev
from jetmesh.bus import headers as hn
from jetmesh.bus import subjects
from jetmesh.bus.server import EmbeddedNats, find_nats_server, free_port
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.registry import live_agents

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ORDERS = json.loads((REPO / "agents" / "builtin" / "orders.json").read_text())["orders"]
ORDER_IDS = [o["order_id"] for o in ORDERS]
ORDERS_BY_ID = {o["order_id"]: o for o in ORDERS}
TERMINAL_TYPES = {"jetmesh.task.completed.v1", "jetmesh.task.failed.v1",
                  "jetmesh.task.canceled.v1", "jetmesh.task.rejected.v1"}
IDEAL_B = 625.0

_children: list[subprocess.Popen[bytes]] = []


def progress(msg: str) -> None:
    print(f"[fanout-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A child in its own process group (so a signal reaches its whole tree)."""
    with log.open("ab") as f:
        p = subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=str(log.parent))
    _children.append(p)
    return p


def stop_child(p: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    with contextlib.suppress(ValueError):
        _children.remove(p)


def kill_all_children() -> None:
    for p in list(_children):
        with contextlib.suppress(Exception):
            stop_child(p, timeout_s=5.0)


def _on_term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy_s() -> float:
    """Non-idle CPU seconds of the whole machine (all cores), from /proc/stat."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def wait_idle(max_wait_s: float, threshold_pct: float = 20.0) -> float:
    """Before a run (no stack running): wait until the machine's CPU use over one second
    is under `threshold_pct` of all cores, at most `max_wait_s`; returns the last reading."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0, c0 = machine_busy_s(), self_cpu_s()
        time.sleep(1.0)
        pct = max(0.0, (machine_busy_s() - b0) - (self_cpu_s() - c0)) / (os.cpu_count() or 1) * 100
        if pct < threshold_pct or time.monotonic() >= deadline:
            return pct
        progress(f"  machine busy {pct:.0f}% (other processes); waiting for it to calm down")


def server_msgs(monitor_port: int | None) -> int:
    """Messages nats-server received plus sent so far (its /varz in_msgs + out_msgs): every
    publish, ack, delivery, pull request and direct-get reply counts once each way."""
    if monitor_port is None:
        return 0
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/varz", timeout=5) as r:
        v = json.loads(r.read())
    return int(v["in_msgs"]) + int(v["out_msgs"])


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------- one run


@dataclass
class Config:
    workload: str
    tasks: int
    inflight: int
    latency_ms: float
    replicas: int = 1

    @property
    def label(self) -> str:
        return (f"{self.workload}: {self.tasks} tasks, {self.inflight} in flight, "
                f"{self.latency_ms:g} ms, {self.replicas} worker replica(s)")

    @property
    def ideal(self) -> float | None:
        """Tasks/s if every task took exactly its 4 sequential model latencies."""
        if self.latency_ms <= 0:
            return None
        waves = math.ceil(self.tasks / self.inflight)
        return self.tasks / (waves * 4 * self.latency_ms / 1000)


@dataclass
class RunResult:
    tasks_per_s: float
    latencies_ms: list[float]
    rss_kb: dict[str, int]
    cpu_per_task_ms: dict[str, float]
    wall_s: float
    warnings: int = 0
    foreign_pct: float = 0.0
    """CPU used by processes outside this benchmark during the window, % of all cores."""
    msgs_per_task: float = 0.0
    """Messages through nats-server per task (in + out, see server_msgs)."""
    idle_ms_per_s: dict[str, float] = field(default_factory=dict)
    """CPU ms per second each process used idle, measured right before the run (its
    timers: presence heartbeats, keep-alives, the planner's registry refresh): the part
    of `cpu_per_task_ms` that grows with the run's wall time, not with its tasks."""
    stored_per_task: dict[str, float] = field(default_factory=dict)
    """Messages stored per task in each stream (its last sequence's growth): what is
    appended, and where (JM_LEDGER and the KV buckets fsync'd, JM_LOG per durability)."""

    @property
    def cpu_total_ms(self) -> float:
        return sum(self.cpu_per_task_ms.values())

    @property
    def cpu_net_ms(self) -> float:
        """CPU ms per task less what the stack would have used idle over the run's wall
        time (`idle_ms_per_s`): the tasks' own cost, steadier on a loaded machine."""
        idle = sum(self.idle_ms_per_s.values()) * self.wall_s
        return max(0.0, self.cpu_total_ms - idle / (len(self.latencies_ms) or 1))

    @property
    def cpu_ceiling(self) -> float:
        """Tasks/s the machine's cores could sustain at this CPU cost per task."""
        return (os.cpu_count() or 1) * 1000 / self.cpu_total_ms if self.cpu_total_ms else 0.0

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.latencies_ms)

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        k = max(0, min(len(xs) - 1, math.ceil(q / 100 * len(xs)) - 1))
        return xs[k]


CHILD_PATH: list[str] = []
"""--child-pythonpath: put first on the children's PYTHONPATH (e.g. a patched scratch copy
holding a `jetmesh` package), to measure a proposed change without touching the repo."""


def child_env(url: str, cfg: Config, data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    for k in list(env):  # nothing inherited may pick another model or server
        if k.startswith(("JETMESH_", "NATS_", "ANTHROPIC_", "OPENAI_")):
            del env[k]
    env.update({
        "NATS_URL": url,
        "JETMESH_DATA_DIR": str(data_dir),
        "JETMESH_PLANNER_PROVIDER": "sim",
        "JETMESH_PLANNER_MODEL": "fanout_models:planner",
        "JETMESH_MODEL_PROVIDER": "sim",
        "JETMESH_MODEL": "dry-run",
        "JETMESH_SIM_LATENCY_MS": f"{cfg.latency_ms:g}",
        "JETMESH_DURABILITY": DURABILITY,
        "MEM0_TELEMETRY": "False",
        "PYTHONPATH": os.pathsep.join(
            CHILD_PATH + [str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
    })
    return env


DURABILITY = "balanced"
"""--durability: JETMESH_DURABILITY of every role (bus.settings.BusSettings.durability)."""

PYSPY_RATE = 100
"""--pyspy-rate: samples per second of `--profile pyspy`."""

WRAPPER: str | None = None
"""--wrapper: a script run as `python SCRIPT OUT ROLE...` instead of the CLI (experiments)."""


def role_cmd(role: list[str], profile: str | None, out: Path | None) -> list[str]:
    py = sys.executable
    if profile == "cprofile" and out is not None:
        return [py, str(HERE / "profiled.py"), str(out), *role]
    if WRAPPER:
        return [py, WRAPPER, str(out or "/dev/null"), *role]
    return [py, "-m", "jetmesh.orchestrator.cli", *role]


def pyspy_attach(pid: int, out: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        exe = Path(shutil.which("py-spy") or exe)
    return spawn([str(exe), "record", "--pid", str(pid), "--format", "raw",
                  "--rate", str(PYSPY_RATE),
                  "--nonblocking", "--output", str(out)], env, log)


def order_ids_for(i: int) -> list[str]:
    """Three distinct real order ids, rotating through the order book."""
    n = len(ORDER_IDS)
    return [ORDER_IDS[(3 * i + k) % n] for k in range(3)]


async def wait_ready(client: Client, replicas: int, timeout_s: float = 60.0,
                     telemetry: bool = False) -> None:
    """Until `replicas` support workers are live and the orchestrator's consumers exist
    (and, with `telemetry`, the telemetry role's: its start-up is not measured)."""
    deadline = time.monotonic() + timeout_s
    while True:
        agents = await live_agents(client.js)
        live = sum(len(a.replicas) for a in agents
                   if a.name == "support" and "order_status" in a.skill_ids)
        consumers_ok = True
        for stream, durable in ((subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_SUBMIT),
                                (subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_STEPS),
                                *([(subjects.STREAM_LEDGER, subjects.CONSUMER_TELEMETRY)]
                                  if telemetry else [])):
            try:
                await client.js.consumer_info(stream, durable)
            except Exception:
                consumers_ok = False
        if live >= replicas and consumers_ok:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"stack not ready after {timeout_s:g}s: {live}/{replicas} "
                               f"support replicas live, orchestrator consumers: {consumers_ok}")
        await asyncio.sleep(0.2)


class Completions:
    """One ordered consumer over jm.task.*.events resolving each task's future."""

    def __init__(self) -> None:
        self.futures: dict[str, asyncio.Future[tuple[str, float]]] = {}
        self.wall: dict[str, tuple[float, float]] = {}
        """Task id -> wall-clock times the load generator submitted it and saw it end."""

    def expect(self, task_id: str) -> asyncio.Future[tuple[str, float]]:
        fut = asyncio.get_running_loop().create_future()
        self.futures[task_id] = fut
        return fut

    async def start(self, client: Client) -> None:
        async def on_msg(msg: Any) -> None:
            etype = (msg.headers or {}).get(hn.CE_TYPE)
            if etype not in TERMINAL_TYPES:
                return
            now = time.perf_counter()
            tid = subjects.task_id_of(msg.subject)
            fut = self.futures.get(tid or "")
            if fut is not None and not fut.done():
                fut.set_result((etype, now))

        self.sub = await client.js.subscribe(
            subjects.ALL_TASK_EVENTS, stream=subjects.STREAM_LEDGER, ordered_consumer=True,
            cb=on_msg, config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW))

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.sub.unsubscribe()


async def drive(client: Client, comp: Completions, n: int, inflight: int, offset: int,
                label: str, timeout_s: float) -> tuple[list[str], list[float], float, float]:
    """Submit `n` tasks with at most `inflight` at once; returns ids, latencies, t0, t1."""
    sem = asyncio.Semaphore(inflight)
    ids: list[str] = [""] * n
    lat: list[float] = [0.0] * n
    done = 0
    last_report = time.monotonic()

    async def one(i: int) -> None:
        nonlocal done, last_report
        async with sem:
            tid = f"bench-{uuid.uuid4().hex[:16]}"
            ids[i] = tid
            fut = comp.expect(tid)
            t0, w0 = time.perf_counter(), time.time()
            await client.submit(f"Where are my orders? ({i + offset})",
                                input={"order_ids": order_ids_for(i + offset)}, task_id=tid)
            etype, t1 = await asyncio.wait_for(fut, timeout_s)
            comp.wall[tid] = (w0, w0 + (t1 - t0))
            if etype != "jetmesh.task.completed.v1":
                raise RuntimeError(f"task {tid} ended {etype}")
            lat[i] = (t1 - t0) * 1000
            done += 1
            if time.monotonic() - last_report > 2.0:
                last_report = time.monotonic()
                progress(f"  {label}: {done}/{n} tasks done")

    t_start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    t_end = time.perf_counter()
    return ids, lat, t_start, t_end


def print_timeline(task_id: str, entries: list[Any],
                   wall: tuple[float, float] | None = None) -> None:
    """One task's events in the order they were made, with the time since the load
    generator submitted it (each event's `time`, stamped by the process that made it, on
    one machine's clock), and when the load generator saw it end."""
    evs = sorted((e.event for e in entries), key=lambda x: x.time)
    t0 = wall[0] if wall else evs[0].time.timestamp()
    print(f"\ntimeline of task {task_id} (ms since it was submitted; type; who)")
    if wall:
        print(f"  {0.0:8.2f}  {'(submitted)':28s} load generator")
    for e in evs:
        ms = (e.time.timestamp() - t0) * 1000
        print(f"  {ms:8.2f}  {e.type.removeprefix('jetmesh.'):28s} {e.source}")
    if wall:
        print(f"  {(wall[1] - t0) * 1000:8.2f}  {'(seen to end)':28s} load generator")


async def verify(client: Client, task_ids: list[str], offset: int,
                 timeline: dict[str, tuple[float, float]] | None = None) -> None:
    """From the ledger: 8 ModelCalled, 3 ToolCalled, and each id's order data in the result."""
    sem = asyncio.Semaphore(16)
    problems: list[str] = []

    async def check(i: int, tid: str) -> None:
        async with sem:
            entries = await client.events(tid)
        evs = [e.event for e in entries]
        if timeline is not None and i == len(task_ids) // 2:
            print_timeline(tid, entries, timeline.get(tid))
        ids = order_ids_for(i + offset)
        n_model = sum(isinstance(e, ev.ModelCalled) for e in evs)
        n_tool = sum(isinstance(e, ev.ToolCalled) for e in evs)
        if n_model != 8 or n_tool != 3:
            problems.append(f"{tid}: {n_model} ModelCalled, {n_tool} ToolCalled (want 8, 3)")
        purposes = sorted(e.data.purpose for e in evs if isinstance(e, ev.ModelCalled))
        if purposes != ["merge", "plan"] + ["step"] * 6:
            problems.append(f"{tid}: model call purposes {purposes}")
        looked_up = sorted(e.data.arguments.get("order_id", "") for e in evs
                           if isinstance(e, ev.ToolCalled) and e.data.tool == "lookup_order"
                           and (e.data.output or {}).get("found"))
        if looked_up != sorted(ids):
            problems.append(f"{tid}: lookup_order found {looked_up}, want {sorted(ids)}")
        done = [e for e in evs if isinstance(e, ev.TaskCompleted)]
        planned = [e for e in evs if isinstance(e, ev.TaskPlanned)]
        if len(done) != 1 or len(planned) != 1:
            problems.append(f"{tid}: {len(done)} TaskCompleted, {len(planned)} TaskPlanned")
            return
        result = done[0].data.result
        steps_out = result.get("steps", {})
        answer = result.get("answer", "")
        step_for = {s.input.get("order_id"): s.id for s in planned[0].data.steps}
        for oid in ids:
            order = ORDERS_BY_ID[oid]
            sid = step_for.get(oid)
            out = json.dumps(steps_out.get(sid or "", {}))
            # The worker's output carries the looked-up record (as JSON, or in the
            # simulated model's words: "Order A1001: status shipped, ..."); the merged
            # answer too.
            status = order["status"]
            for needles in ((oid,), (f'\\"status\\": \\"{status}\\"', f"status {status}")):
                if not any(n in out for n in needles):
                    problems.append(f"{tid}: step {sid} output lacks {needles[0]!r} for {oid}")
                if not any(n.replace('\\"', '"') in answer or n in answer for n in needles):
                    problems.append(f"{tid}: merged answer lacks {needles[0]!r} for {oid}")

    await asyncio.gather(*(check(i, t) for i, t in enumerate(task_ids)))
    if problems:
        raise AssertionError(f"{len(problems)} problem(s), e.g.:\n  " + "\n  ".join(problems[:10]))


def census_class(msg: Any) -> str:
    """What one message seen on `>` is (for --census)."""
    subj: str = msg.subject
    h = msg.headers or {}
    if msg.reply and msg.reply.startswith("$JS.ACK."):
        kind = ("work command" if subj.startswith(f"{subjects.PREFIX}.work.") else
                "submission" if subj == subjects.SUBMIT else
                "step line" if subjects.step_id_of(subj) else subj.rsplit(".", 1)[-1])
        return f"delivery: {kind}"
    if subj.startswith("$JS.API.DIRECT.GET."):
        return "direct-get request"
    if subj.startswith("$JS.API.CONSUMER.MSG.NEXT."):
        return "pull request"
    if subj.startswith("$JS.ACK."):
        return "consumer ack (+ACK/+WPI/-NAK)"
    if subj.startswith("$JS.FC."):
        return "flow control reply"
    if subj.startswith("$JS.API."):
        if os.environ.get("JETMESH_CENSUS_DEBUG"):
            progress(f"API {subj} reply={msg.reply}")
        return "other JetStream API: " + ".".join(subj.split(".")[2:4])
    if subj.startswith("$KV."):
        return "KV put: " + subj.split(".")[1]
    if subj.startswith(f"{subjects.PREFIX}.work."):
        return "append: work command"
    if subj == subjects.SUBMIT:
        return "append: submission"
    if subj.startswith(f"{subjects.PREFIX}.task."):
        kind = ("step log" if subjects.is_step_log(subj) else
                "step line" if subjects.step_id_of(subj) else subj.rsplit(".", 1)[-1])
        return f"append: {kind}"
    if hn.SEQUENCE in h or h.get(hn.STATUS) in ("204", "404"):
        return "direct-get reply (incl. end of batch)"
    if h.get(hn.STATUS) == "100":
        return "heartbeat / flow control"
    if msg.data[:8] == b'{"stream':
        return "publish ack"
    if h.get(hn.STATUS):
        return f"status {h.get(hn.STATUS)}"
    if not msg.data:
        return "empty reply (to a synchronous consumer ack)"
    if os.environ.get("JETMESH_CENSUS_DEBUG"):
        progress(f"other reply: {subj} {h} {msg.data[:120]!r}")
    return "other reply"


async def stream_seqs(client: Client) -> dict[str, int]:
    """Each stream's last sequence (how many messages it was ever given)."""
    return {i.config.name or "": int(i.state.last_seq)
            for i in await client.js.streams_info()}


async def run_once(cfg: Config, args: argparse.Namespace, run_no: int,
                   profile_dir: Path | None) -> RunResult:
    tmp = Path(tempfile.mkdtemp(prefix="jetmesh-fanout-"))
    server = EmbeddedNats(data_dir=tmp / "nats", server_name="fanout-bench",
                          monitor_port=free_port(),
                          sync_interval=args.sync_interval)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    spies: list[subprocess.Popen[bytes]] = []
    keep_logs = Path(args.logs) if args.logs else None
    try:
        server.start()
        assert server.process is not None
        env = child_env(server.url, cfg, tmp)
        tag = f"{cfg.workload}-r{cfg.replicas}-l{cfg.latency_ms:g}-run{run_no}"
        prof = profile_dir if (profile_dir and run_no == 1) else None
        for k in range(cfg.replicas):
            out = prof / f"worker{k + 1}-{tag}.pstats" if prof and k == 0 else None
            procs[f"worker{k + 1}"] = spawn(
                role_cmd(["worker", "support"], args.profile if out else None, out),
                env, tmp / f"worker{k + 1}.log")
        out = prof / f"orchestrator-{tag}.pstats" if prof else None
        procs["orchestrator"] = spawn(role_cmd(["orchestrator"], args.profile, out), env,
                                      tmp / "orchestrator.log")
        if args.telemetry:  # the telemetry role exporting to a real OTLP receiver process
            rport = free_port()
            procs["otlp-receiver"] = spawn(
                [sys.executable, str(Path(__file__).parent.parent / "tests" / "telemetry"
                                     / "otlp_receiver.py"), "--port", str(rport),
                 "--out", str(tmp / "spans.jsonl")], env, tmp / "otlp-receiver.log")
            procs["telemetry"] = spawn(role_cmd(["telemetry"], None, None), {
                **env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT":
                f"http://127.0.0.1:{rport}/v1/traces"}, tmp / "telemetry.log")
        async with Client(server.url) as client:
            await wait_ready(client, cfg.replicas, telemetry=args.telemetry)
            for name, p in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited {p.returncode}: "
                                       f"{(tmp / (name + '.log')).read_text()[-2000:]}")
            comp = Completions()
            await comp.start(client)
            if args.warmup:
                progress(f"  warm-up: {args.warmup} task(s)")
                wids, _, _, _ = await drive(client, comp, args.warmup,
                                            min(args.warmup, cfg.inflight), 10_000, "warm-up",
                                            args.task_timeout)
                await verify(client, wids, 10_000)
            if prof and args.profile == "pyspy":
                for name in ("orchestrator", "worker1"):
                    spies.append(pyspy_attach(procs[name].pid, prof / f"{name}-{tag}.txt",
                                              env, tmp / f"pyspy-{name}.log"))
                spies.append(pyspy_attach(os.getpid(), prof / f"loadgen-{tag}.txt", env,
                                          tmp / "pyspy-loadgen.log"))
                await asyncio.sleep(1.0)
            pids = {"nats-server": server.process.pid,
                    **{n: p.pid for n, p in procs.items()}}
            idle: dict[str, float] = {}
            if args.idle_s > 0:  # the stack idle: its timers' cost per second
                idle0 = {n: cpu_s(pid) for n, pid in pids.items()}
                await asyncio.sleep(args.idle_s)
                idle = {n: (cpu_s(pid) - idle0[n]) * 1000 / args.idle_s
                        for n, pid in pids.items()}
            cpu0 = {n: cpu_s(pid) for n, pid in pids.items()}
            cpu0["load generator"] = self_cpu_s()
            busy0 = machine_busy_s()
            msgs0 = server_msgs(server.monitor_port)
            stored0 = await stream_seqs(client)
            census: dict[str, int] = {}
            sniffer = None
            if args.census:
                async def count(msg: Any) -> None:
                    k = census_class(msg)
                    census[k] = census.get(k, 0) + 1
                sniffer = await client.ledger.nc.subscribe(">", cb=count)
                if os.environ.get("JETMESH_CENSUS_DEBUG"):
                    progress(f"load generator's inboxes: {client.ledger.nc._resp_sub_prefix!r}")
            ids, lat, t0, t1 = await drive(client, comp, cfg.tasks, cfg.inflight, 0,
                                           cfg.label, args.task_timeout)
            cpu1 = {n: cpu_s(pid) for n, pid in pids.items()}
            cpu1["load generator"] = self_cpu_s()
            busy1 = machine_busy_s()
            msgs1 = server_msgs(server.monitor_port)
            stored1 = await stream_seqs(client)
            if sniffer is not None:
                await sniffer.unsubscribe()
                if os.environ.get("JETMESH_CENSUS_DEBUG") and server.monitor_port:
                    import urllib.request
                    url = f"http://127.0.0.1:{server.monitor_port}/connz?subs=1"
                    with urllib.request.urlopen(url) as r:  # noqa: ASYNC210 (debug only)
                        for c in json.loads(r.read())["connections"]:
                            progress(f"conn {c.get('name')} pid? subs "
                                     f"{[x for x in c.get('subscriptions_list', [])][:6]}")
                total = sum(census.values())
                progress(f"  census: {total / cfg.tasks:.1f} messages per task seen on '>'")
                for k, v in sorted(census.items(), key=lambda kv: -kv[1]):
                    progress(f"    {v / cfg.tasks:6.2f}  {k}")
            await comp.stop()
            progress(f"  verifying {len(ids)} tasks in the ledger")
            await verify(client, ids, 0,
                         timeline=comp.wall if args.timeline and run_no == 1 else None)
        for s in spies:
            with contextlib.suppress(ProcessLookupError):
                s.send_signal(signal.SIGINT)
        for s in spies:
            try:
                s.wait(30)
            except subprocess.TimeoutExpired:
                stop_child(s)
        rss = {n: vm_hwm_kb(pid) for n, pid in pids.items()}
        rss["load generator"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cpu = {n: (cpu1[n] - cpu0[n]) * 1000 / cfg.tasks for n in cpu0}
        wall = t1 - t0
        ours = sum(cpu1[n] - cpu0[n] for n in cpu0)
        foreign = max(0.0, (busy1 - busy0) - ours) / (wall * (os.cpu_count() or 1)) * 100
        for p in procs.values():
            stop_child(p)
        warnings = 0
        for name in procs:
            text = (tmp / f"{name}.log").read_text(errors="replace")
            warnings += sum(1 for ln in text.splitlines()
                            if "WARNING" in ln or "ERROR" in ln or "Traceback" in ln)
        stored = {n: (stored1[n] - stored0.get(n, 0)) / cfg.tasks for n in stored1
                  if stored1[n] - stored0.get(n, 0)}
        return RunResult(cfg.tasks / wall, lat, rss, cpu, wall, warnings, foreign,
                         (msgs1 - msgs0) / cfg.tasks, idle, stored)
    finally:
        for s in spies:
            stop_child(s)
        for p in procs.values():
            stop_child(p)
        server.stop()
        if keep_logs:
            dest = keep_logs / tmp.name
            dest.mkdir(parents=True, exist_ok=True)
            for f in tmp.glob("*.log"):  # noqa: ASYNC240 (teardown, stack stopped)
                shutil.copy(f, dest / f.name)
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- driver


@dataclass
class Figure:
    cfg: Config
    runs: list[RunResult]

    def med(self, f: Any) -> float:
        return statistics.median(f(r) for r in self.runs)


def configs(args: argparse.Namespace) -> list[Config]:
    n = args.tasks
    out: list[Config] = []
    wl = {w.strip().upper() for w in args.workloads.split(",")}
    if "A" in wl:
        out.append(Config("A", n, 1, 0.0))
    if "B" in wl or "C" in wl:
        out.append(Config("B", n, 50, 20.0))
    if "C" in wl:
        reps = [int(r) for r in args.replicas.split(",")]
        out += [Config("C", n, 50, 20.0, r) for r in reps if r != 1]
        out += [Config("C", n, 500, 200.0, r) for r in reps]
    return out


def versions() -> dict[str, str]:
    try:
        nats_v = subprocess.run([find_nats_server(), "--version"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except Exception as e:
        nats_v = f"? ({e})"

    def v(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    return {"cores (os.cpu_count)": str(os.cpu_count()), "python": sys.version.split()[0],
            "nats-server": nats_v, "nats-py": v("nats-py"), "pydantic": v("pydantic"),
            "jetmesh": v("jetmesh")}


def mb(kb: float) -> str:
    return f"{kb / 1024:.0f}"


def report(figs: list[Figure], args: argparse.Namespace) -> None:
    print()
    print("jetmesh fan-out benchmark (BENCHMARK.md): 8 model calls + 3 tool calls per task")
    for k, val in versions().items():
        print(f"  {k:<22} {val}")
    print(f"  runs per figure        {args.runs} (median); warm-up tasks per run "
          f"{args.warmup} (not counted)")
    print()
    hdr = (f"{'workload':<9} {'repl':>4} {'lat ms':>6} {'in flt':>6} {'tasks':>5} "
           f"{'tasks/s':>8} {'ideal':>6} {'ratio':>6} {'mean ms':>8} {'p50 ms':>7} "
           f"{'p99 ms':>7} {'CPU ms/task':>11} {'net CPU':>7} {'CPU ceil':>8} {'other %':>7} "
           f"{'msgs/task':>9} {'runs (tasks/s)':>22}")
    print(hdr)
    print("-" * len(hdr))
    for f in figs:
        c = f.cfg
        ideal = c.ideal
        tps = f.med(lambda r: r.tasks_per_s)
        ratio = f"{tps / ideal:.2f}" if ideal else "-"
        runs = ", ".join(f"{r.tasks_per_s:.1f}" for r in f.runs)
        print(f"{c.workload:<9} {c.replicas:>4} {c.latency_ms:>6g} {c.inflight:>6} "
              f"{c.tasks:>5} {tps:>8.1f} {(f'{ideal:.0f}' if ideal else '-'):>6} "
              f"{ratio:>6} {f.med(lambda r: r.mean_ms):>8.1f} "
              f"{f.med(lambda r: r.pct(50)):>7.1f} {f.med(lambda r: r.pct(99)):>7.1f} "
              f"{f.med(lambda r: r.cpu_total_ms):>11.1f} {f.med(lambda r: r.cpu_net_ms):>7.1f} "
              f"{f.med(lambda r: r.cpu_ceiling):>8.0f} "
              f"{f.med(lambda r: r.foreign_pct):>7.0f} "
              f"{f.med(lambda r: r.msgs_per_task):>9.1f} {runs:>22}")
    b = next((f for f in figs if f.cfg.workload == "B"), None)
    if b:
        tps = b.med(lambda r: r.tasks_per_s)
        print(f"\nB: {tps:.1f} tasks/s = {tps / IDEAL_B:.3f} of the ideal 625 tasks/s")
    print("\nPeak RSS (VmHWM, MB, median of runs) and CPU per task (ms, median) per process")
    names: list[str] = []
    for f in figs:
        for n in f.runs[0].rss_kb:
            if n not in names:
                names.append(n)
    hdr2 = f"{'workload':<9} {'repl':>4} {'lat ms':>6} " + " ".join(
        f"{n[:14]:>15}" for n in names)
    print(hdr2 + "\n" + "-" * len(hdr2))
    for f in figs:
        c = f.cfg
        cells = []
        for n in names:
            if n in f.runs[0].rss_kb:
                rss = f.med(lambda r, n=n: r.rss_kb.get(n, 0))
                cpu = f.med(lambda r, n=n: r.cpu_per_task_ms.get(n, 0.0))
                cells.append(f"{mb(rss):>6}MB {cpu:>5.1f}ms")
            else:
                cells.append(f"{'':>15}")
        print(f"{c.workload:<9} {c.replicas:>4} {c.latency_ms:>6g} " + " ".join(cells))
    print("\nCPU ms/task: all processes of the stack (nats-server, orchestrator, workers, load "
          "generator) over the measured window, per task.\nnet CPU: the same less the "
          "stack's idle CPU per second (measured before the run) times the run's wall "
          "time.\nCPU ceil: cores x 1000 / CPU "
          "ms/task, the tasks/s this machine could sustain at that cost.\nother %: CPU used "
          "by processes outside the benchmark during the window (a shared machine's noise)."
          "\nmsgs/task: messages through nats-server per task, in and out (its /varz): "
          "publishes, acks, deliveries, pull requests, direct-get replies.")
    total_warn = sum(r.warnings for f in figs for r in f.runs)
    print(f"\nwarning/error lines in the children's logs over all runs: {total_warn}")


def main() -> None:
    p = argparse.ArgumentParser(description="jetmesh fan-out benchmark (BENCHMARK.md)")
    p.add_argument("--workloads", default="A,B,C", help="comma-separated subset of A,B,C")
    p.add_argument("--tasks", type=int, default=300, help="tasks per run")
    p.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    p.add_argument("--replicas", default="1,2,4", help="worker replicas for C")
    p.add_argument("--quick", action="store_true", help="smoke test: 30 tasks, 1 run")
    p.add_argument("--durability", choices=["strict", "balanced"], default="balanced",
                   help="JETMESH_DURABILITY of the stack: balanced (the steps' logs "
                        "acked before their fsync) or strict (everything fsync'd)")
    p.add_argument("--census", action="store_true",
                   help="count every message through nats-server by kind (a '>' "
                        "subscriber in the load generator; adds its own deliveries)")
    p.add_argument("--sync-interval", default="always",
                   help="nats-server JetStream sync_interval (always: fsync every append)")
    p.add_argument("--warmup", type=int, default=3, help="uncounted warm-up tasks per run")
    p.add_argument("--idle-s", type=float, default=0.0,
                   help="seconds the stack is measured idle before each run (its timers' "
                        "CPU per second, subtracted in 'net CPU ms/task'; 0: not measured)")
    p.add_argument("--task-timeout", type=float, default=120.0, help="seconds per task")
    p.add_argument("--profile", choices=["cprofile", "pyspy"], default=None,
                   help="profile the orchestrator and first worker (first run of each figure)")
    p.add_argument("--pyspy-rate", type=int, default=100,
                   help="samples per second of --profile pyspy (py-spy from the venv or PATH)")
    p.add_argument("--profile-dir", default="benchmarks/profiles",
                   help="where profiles are written")
    p.add_argument("--logs", default=None, help="keep the children's logs in this folder")
    p.add_argument("--telemetry", action="store_true",
                   help="also run `jetmesh telemetry`, exporting to an OTLP receiver process")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="before each run wait up to this many seconds for other processes' "
                        "CPU use to fall under 20%% (shared machines)")
    p.add_argument("--timeline", action="store_true",
                   help="print one task's events with their times (first run of each figure)")
    p.add_argument("--wrapper", default=None,
                   help="run the roles as `python WRAPPER OUT ROLE...` (experiments)")
    p.add_argument("--child-pythonpath", default=None,
                   help="prepend to the children's PYTHONPATH (a patched scratch copy)")
    args = p.parse_args()
    global WRAPPER, DURABILITY, PYSPY_RATE
    WRAPPER = args.wrapper
    PYSPY_RATE = args.pyspy_rate
    DURABILITY = args.durability
    os.environ["JETMESH_DURABILITY"] = args.durability  # the load generator's Client
    if args.child_pythonpath:
        CHILD_PATH[:] = args.child_pythonpath.split(os.pathsep)
    if args.quick:
        args.tasks, args.runs = 30, 1
    profile_dir = None
    if args.profile:
        profile_dir = Path(args.profile_dir).resolve()
        profile_dir.mkdir(parents=True, exist_ok=True)

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    figs: list[Figure] = []
    try:
        progress(f"{os.cpu_count()} cores; {', '.join(f'{k} {v}' for k, v in versions().items())}")
        for cfg in configs(args):
            runs = []
            for r in range(args.runs):
                if args.wait_idle > 0:
                    busy = wait_idle(args.wait_idle)
                    progress(f"  machine busy before the run: {busy:.0f}%")
                progress(f"{cfg.label}: run {r + 1}/{args.runs}")
                res = asyncio.run(run_once(cfg, args, r + 1, profile_dir))
                progress(f"  -> {res.tasks_per_s:.1f} tasks/s, mean {res.mean_ms:.1f} ms, "
                         f"p50 {res.pct(50):.1f} ms, p99 {res.pct(99):.1f} ms; other load "
                         f"{res.foreign_pct:.0f}%; idle CPU ms/s "
                         f"{sum(res.idle_ms_per_s.values()):.1f}, net CPU ms/task "
                         f"{res.cpu_net_ms:.1f}; CPU ms/task {res.cpu_total_ms:.1f}: "
                         + ", ".join(f"{k} {v:.1f}" for k, v in res.cpu_per_task_ms.items())
                         + f"; {res.msgs_per_task:.1f} msgs/task; stored/task "
                         + ", ".join(f"{k} {v:.1f}" for k, v in
                                     sorted(res.stored_per_task.items())))
                runs.append(res)
            figs.append(Figure(cfg, runs))
    except KeyboardInterrupt:
        progress("interrupted")
        kill_all_children()
        if figs:
            report(figs, args)
        sys.exit(130)
    finally:
        kill_all_children()
    report(figs, args)


if __name__ == "__main__":
    main()
