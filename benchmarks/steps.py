"""Step-to-step latency of a sequential workflow on an idle mesh.

The fan-out benchmark (`fanout.py`) runs its three steps concurrently; this one runs the
built-in `support` workflow (triage -> order -> draft -> review, each step waiting for
the one before) one task at a time, with a pause between tasks so every consumer is idle
when the next task arrives: the situation of a user with `jetmesh up` in one terminal
and `jetmesh submit ... --wait` in another.

For each hop between two steps it reports, from the events' own timestamps:
- result -> dispatch: a step's result stored, the orchestrator told, the next step
  dispatched;
- dispatch -> start: the work command delivered to the next agent and claimed.

Everything runs on the real stack: nats-server with `sync_interval: always`, the
orchestrator and the four agents as separate processes, the simulated model (0 ms).

    .venv/bin/python benchmarks/steps.py [--tasks 20] [--pause 1.5]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fanout  # this folder's helpers: spawning roles, their environment

from jetmesh.bus import events as ev
from jetmesh.bus.server import EmbeddedNats
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.registry import live_agents

AGENTS = ["triage", "support", "writer", "reviewer"]
WORKFLOW = "support"


def progress(msg: str) -> None:
    print(f"[steps-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def wait_agents(client: Client, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while {a.name for a in await live_agents(client.js)} < set(AGENTS):
        if time.monotonic() > deadline:
            raise RuntimeError(f"agents {AGENTS} not all live after {timeout_s:g}s")
        await asyncio.sleep(0.2)


def hops(entries: list) -> tuple[list[float], list[float], float]:
    """Per hop: result -> next dispatch and dispatch -> start (ms); the task's span."""
    done: dict[str, datetime] = {}
    dispatched: dict[str, datetime] = {}
    started: dict[str, datetime] = {}
    first = last = None
    for e in entries:
        x = e.event
        first = first or x.time
        last = x.time
        if isinstance(x, ev.StepCompleted):
            done[x.data.step_id] = x.time
        elif isinstance(x, ev.StepDispatched):
            dispatched.setdefault(x.data.step_id, x.time)
        elif isinstance(x, ev.StepStarted):
            started.setdefault(x.data.step_id, x.time)
    order = ["triage", "order", "draft", "review"]
    to_dispatch = [(dispatched[b] - done[a]).total_seconds() * 1000
                   for a, b in itertools.pairwise(order)]
    to_start = [(started[s] - dispatched[s]).total_seconds() * 1000 for s in order]
    assert first is not None and last is not None
    return to_dispatch, to_start, (last - first).total_seconds() * 1000


def summary(name: str, xs: list[float]) -> str:
    s = sorted(xs)
    p90 = s[min(len(s) - 1, int(0.9 * len(s)))]
    return (f"{name:28s} n={len(s):4d}  median {statistics.median(s):7.1f} ms  "
            f"p90 {p90:7.1f} ms  max {s[-1]:7.1f} ms")


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="jetmesh-steps-"))
    server = EmbeddedNats(data_dir=tmp / "nats", server_name="steps-bench",
                          sync_interval="always")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server.start()
        cfg = fanout.Config(workload="S", tasks=args.tasks, inflight=1, latency_ms=0)
        env = fanout.child_env(server.url, cfg, tmp)
        for agent in AGENTS:
            procs.append(fanout.spawn(fanout.role_cmd(["worker", agent], None, None), env,
                                      tmp / f"{agent}.log"))
        procs.append(fanout.spawn(fanout.role_cmd(["orchestrator"], None, None), env,
                                  tmp / "orchestrator.log"))
        to_dispatch: list[float] = []
        to_start: list[float] = []
        spans: list[float] = []
        async with Client(server.url) as client:
            await wait_agents(client)
            for i in range(args.warmup + args.tasks):
                await asyncio.sleep(args.pause)  # every consumer idle again
                tid = f"steps-{uuid.uuid4().hex[:16]}"
                order = fanout.ORDER_IDS[i % len(fanout.ORDER_IDS)]
                await client.submit(f"where is my order {order}?", workflow=WORKFLOW,
                                    input={"order_id": order}, task_id=tid)
                state = await client.result(tid, timeout=60)
                if state.status.value != "completed":
                    raise RuntimeError(f"task {tid} ended {state.status.value}: {state.reason}")
                if i < args.warmup:
                    continue
                a, b, span = hops(await client.events(tid))
                to_dispatch += a
                to_start += b
                spans.append(span)
                if (i + 1) % 10 == 0:
                    progress(f"{i + 1 - args.warmup}/{args.tasks} tasks")
        print(f"\n{WORKFLOW} workflow (4 sequential steps), {args.tasks} tasks one at a "
              f"time, {args.pause:g} s idle before each; {os.cpu_count()} cores, "
              "sync_interval always")
        print(summary("result -> next dispatch", to_dispatch))
        print(summary("dispatch -> step started", to_start))
        print(summary("task (first to last event)", spans))
    finally:
        for p in procs:
            fanout.stop_child(p)
        server.stop()
        if args.logs:
            shutil.copytree(tmp, Path(args.logs) / tmp.name, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=20, help="measured tasks")
    p.add_argument("--warmup", type=int, default=2, help="uncounted tasks first")
    p.add_argument("--pause", type=float, default=1.5,
                   help="idle seconds before each task (consumers go quiet)")
    p.add_argument("--logs", default=None, help="keep the children's logs in this folder")
    p.add_argument("--child-pythonpath", default=None,
                   help="prepend to the children's PYTHONPATH (a patched scratch copy)")
    args = p.parse_args()
    if args.child_pythonpath:
        fanout.CHILD_PATH[:] = args.child_pythonpath.split(os.pathsep)
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        fanout.kill_all_children()
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
