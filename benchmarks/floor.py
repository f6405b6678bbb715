"""The messaging floor of workload A: an A task's bus traffic with no jetmesh logic.

    .venv/bin/python benchmarks/floor.py                 # 300 tasks, median of 3 runs
    .venv/bin/python benchmarks/floor.py --tasks 50 --runs 1

It answers one question: of the time an A task of `benchmarks/fanout.py` takes, how much
is the bus (nats-server, nats-py, the event loop, the process hand-offs) and how much is
jetmesh's own work (planning, folding, the step loop, pydantic, the simulated model)?

Same stack and layout as fanout.py: one embedded nats-server with `sync_interval:
always` and jetmesh's own streams and consumers, an "orchestrator" process and a
"worker" process, the load generator here. Each sends exactly the messages the real
roles send for one fan-out task, with payloads of the real sizes, through the same
transport code (`bus.consumer.PullRunner`, the ledger's batched direct get), and does
nothing else:

- load generator: publish the submission (wait for its ack); see the task end through
  one ordered consumer over `jm.task.*.events` (8 deliveries per task, as in fanout.py);
- orchestrator, on the submission: read the task (direct get, nothing found), then one
  pipelined batch: 6 ledger events (submitted, the plan's model call, planned, 3
  dispatched) and 3 work commands; on the third step result, the merge's model call
  and the completion (pipelined; the real orchestrator folds results from their
  deliveries, with no read, and conditions the completion on the control subject);
- worker, on each work command: 4 log records (start, model, tool, model), the first
  three with no ack asked, the last with one (as `agents.worker.FencedRecorder` sends
  them: the last one's ack proves the step's log), and the result fenced on the step's
  line, awaited together with that ack; then the consumer ack.

Nothing is decoded, validated or folded. So the figure is what an A task costs in this
design before any of jetmesh's own CPU: the floor under `fanout.py --workloads A`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fanout import (  # noqa: E402
    cpu_s,
    machine_busy_s,
    progress,
    self_cpu_s,
    server_msgs,
    spawn,
    stop_child,
)
from nats.aio.msg import Msg  # noqa: E402
from nats.js.api import ConsumerConfig, DeliverPolicy  # noqa: E402

from jetmesh.bus import headers as hn  # noqa: E402
from jetmesh.bus import subjects  # noqa: E402
from jetmesh.bus.connection import connect  # noqa: E402
from jetmesh.bus.consumer import PullRunner  # noqa: E402
from jetmesh.bus.ledger import (  # noqa: E402
    EXPECTED_LAST_SEQ,
    EXPECTED_LAST_SEQ_SUBJECT,
    Ledger,
)
from jetmesh.bus.server import EmbeddedNats, free_port  # noqa: E402
from jetmesh.bus.settings import BusSettings  # noqa: E402
from jetmesh.bus.streams import declare_streams, pull_consumer_config, work_consumer_config  # noqa: E402

SKILL = "order_status"
SKIPPABLE = {"log-acks", "fresh"}
ADDABLE = {"results-read", "log-acks"}
STEPS = ("s1", "s2", "s3")
# Payload sizes (bytes) of the real events of one fan-out task, as stored by fanout.py.
SIZE = {"submitted": 420, "model": 900, "planned": 950, "dispatched": 480, "command": 430,
        "start": 330, "tool": 760, "result": 1100, "completed": 2600, "submit": 260}


def pad(kind: str) -> bytes:
    return b"x" * SIZE[kind]


def hdr(event_id: str, etype: str) -> dict[str, str]:
    return {hn.MSG_ID: event_id, hn.CE_TYPE: etype}


# --------------------------------------------------------------------------- roles


async def orchestrator(url: str, skip: set[str], add: set[str], ready: str) -> None:
    nc = await connect(url)
    js = nc.jetstream()
    ledger = Ledger(nc, js)
    s = BusSettings()
    first_seq: dict[str, int] = {}
    results: dict[str, int] = {}

    async def on_submit(msg: Msg) -> None:
        tid = json.loads(msg.data)["task_id"]
        if "fresh" not in skip:
            await ledger.read_raw(subjects.task_all(tid))  # the fresh read
        ev_subj = subjects.task_events(tid)
        evs = [(pad(k), hdr(f"{tid}-{n}", k))
               for n, k in enumerate(("submitted", "model", "planned"))]
        evs += [(pad("dispatched"), hdr(f"{tid}-{st}-d", "dispatched")) for st in STEPS]
        futs = [await js.publish_async(ev_subj, data, headers=h) for data, h in evs]
        futs += [await js.publish_async(subjects.work(SKILL),
                                        json.dumps({"task_id": tid, "step_id": st}).encode()
                                        + pad("command"),
                                        headers={hn.MSG_ID: f"{tid}-{st}-1"})
                 for st in STEPS]
        acks = await asyncio.gather(*futs)
        first_seq[tid] = int(acks[0].seq)

    async def on_step(msg: Msg) -> None:
        tid = subjects.task_id_of(msg.subject) or ""
        results[tid] = results.get(tid, 0) + 1
        if results[tid] != len(STEPS):
            return
        if "results-read" in add:  # before 3798d79: a read of the decision subjects
            await asyncio.gather(*(ledger.read_raw(f, from_seq=first_seq.get(tid, 1))
                                   for f in subjects.task_decisions(tid)))
        ev_subj = subjects.task_events(tid)
        futs = [await js.publish_async(ev_subj, pad("model"),
                                       headers=hdr(f"{tid}-merge", "model")),
                await js.publish_async(ev_subj, pad("completed"), headers={
                    **hdr(f"{tid}-completed", "jetmesh.task.completed.v1"),
                    EXPECTED_LAST_SEQ: "0",
                    EXPECTED_LAST_SEQ_SUBJECT: subjects.task_control(tid)})]
        await asyncio.gather(*futs)

    runners = [
        PullRunner(js, subjects.STREAM_TASKS,
                   pull_consumer_config(subjects.CONSUMER_ORCH_SUBMIT, subjects.SUBMIT, s),
                   on_submit, concurrency=256),
        PullRunner(js, subjects.STREAM_LEDGER,
                   pull_consumer_config(subjects.CONSUMER_ORCH_STEPS, subjects.ALL_STEP_EVENTS,
                                        s, deliver_new=True),
                   on_step, concurrency=256),
    ]
    for r in runners:
        await r.start()
    await nc.publish(ready, b"ready")  # to the load generator, waiting on it
    await nc.flush()
    await asyncio.Event().wait()


async def worker(url: str, skip: set[str], add: set[str], ready: str) -> None:
    nc = await connect(url)
    js = nc.jetstream()

    async def on_command(msg: Msg) -> None:
        cmd = json.loads(msg.data[:msg.data.index(b"}") + 1])
        tid, st = cmd["task_id"], cmd["step_id"]
        log = subjects.step_log(tid, st)
        kinds = ("start", "model", "tool", "model")
        if "log-acks" in add:  # before issue 21's second pass: every record acked
            futs = [await js.publish_async(log, pad(k), headers=hdr(f"{tid}-{st}-{n}", k))
                    for n, k in enumerate(kinds)]
        else:
            acked = len(kinds) if "log-acks" in skip else len(kinds) - 1
            for n, k in enumerate(kinds[:acked]):
                await nc.publish(log, pad(k), headers=hdr(f"{tid}-{st}-{n}", k))
            futs = [await js.publish_async(log, pad(k), headers=hdr(f"{tid}-{st}-{n}", k))
                    for n, k in enumerate(kinds) if n >= acked]
        final = asyncio.ensure_future(js.publish(
            subjects.step_events(tid, st), pad("result"),
            headers={**hdr(f"{tid}-{st}-done", "jetmesh.step.completed.v1"),
                     EXPECTED_LAST_SEQ: "0"}))
        await asyncio.gather(*futs, final)

    runner = PullRunner(js, subjects.STREAM_WORK, work_consumer_config(SKILL, BusSettings()),
                        on_command, concurrency=256)
    await runner.start()
    await nc.publish(ready, b"ready")  # to the load generator, waiting on it
    await nc.flush()
    await asyncio.Event().wait()


# --------------------------------------------------------------------------- load generator


async def run_once(tasks: int, warmup: int, skip: set[str], add: set[str],
                   sync_interval: str) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="jetmesh-floor-"))
    server = EmbeddedNats(data_dir=tmp / "nats", server_name="floor-bench",
                          monitor_port=free_port(), sync_interval=sync_interval)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        server.start()
        assert server.process is not None
        nc = await connect(server.url)
        js = nc.jetstream()
        await declare_streams(js, BusSettings())
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(HERE.parent.parent)] + ([os.environ["PYTHONPATH"]]
                                         if os.environ.get("PYTHONPATH") else []))}
        ready = nc.new_inbox()
        started = await nc.subscribe(ready)
        for role in ("worker", "orchestrator"):
            procs[role] = spawn([sys.executable, str(Path(__file__)), role, server.url,
                                 "--skip", ",".join(sorted(skip)),
                                 "--add", ",".join(sorted(add)), "--ready", ready],
                                env, tmp / f"{role}.log")
        try:
            for _ in procs:
                await started.next_msg(timeout=30)
        except TimeoutError as e:
            logs = {r: (tmp / f"{r}.log").read_text()[-2000:] for r in procs}
            raise RuntimeError(f"a role did not start within 30 s: {logs}") from e
        await started.unsubscribe()
        done: dict[str, asyncio.Future[float]] = {}

        async def on_event(msg: Any) -> None:
            if (msg.headers or {}).get(hn.CE_TYPE) == "jetmesh.task.completed.v1":
                fut = done.get(subjects.task_id_of(msg.subject) or "")
                if fut is not None and not fut.done():
                    fut.set_result(time.perf_counter())

        sub = await js.subscribe(subjects.ALL_TASK_EVENTS, stream=subjects.STREAM_LEDGER,
                                 ordered_consumer=True, cb=on_event,
                                 config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW))

        async def one(i: int) -> float:
            tid = f"floor-{i:06d}"
            done[tid] = asyncio.get_running_loop().create_future()
            t0 = time.perf_counter()
            await js.publish(subjects.SUBMIT, json.dumps({"task_id": tid,
                                                          "goal": "x" * SIZE["submit"]}
                                                         ).encode(),
                             headers={hn.MSG_ID: tid})
            t1 = await asyncio.wait_for(done[tid], 30)
            return (t1 - t0) * 1000

        for i in range(warmup):
            await one(100_000 + i)
        pids = {"nats-server": server.process.pid, **{n: p.pid for n, p in procs.items()}}
        cpu0 = {n: cpu_s(p) for n, p in pids.items()}
        cpu0["load generator"] = self_cpu_s()
        busy0 = machine_busy_s()
        msgs0 = server_msgs(server.monitor_port)
        t0 = time.perf_counter()
        lat = [await one(i) for i in range(tasks)]
        wall = time.perf_counter() - t0
        cpu1 = {n: cpu_s(p) for n, p in pids.items()}
        cpu1["load generator"] = self_cpu_s()
        busy1 = machine_busy_s()
        msgs1 = server_msgs(server.monitor_port)
        ours = sum(cpu1[n] - cpu0[n] for n in cpu0)
        other = max(0.0, (busy1 - busy0) - ours) / (wall * (os.cpu_count() or 1)) * 100
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        await nc.close()
        return {"tasks_s": tasks / wall, "mean": statistics.fmean(lat),
                "p99": sorted(lat)[min(len(lat) - 1, int(0.99 * len(lat)))],
                "cpu": {n: (cpu1[n] - cpu0[n]) * 1000 / tasks for n in cpu0}, "other": other,
                "msgs": (msgs1 - msgs0) / tasks}
    finally:
        for p in procs.values():
            stop_child(p)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", nargs="?", default="run", choices=["run", "orchestrator", "worker"],
                   help=argparse.SUPPRESS)
    p.add_argument("url", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--tasks", type=int, default=300, help="tasks per run, one at a time")
    p.add_argument("--runs", type=int, default=3, help="runs (the median is reported)")
    p.add_argument("--warmup", type=int, default=5, help="uncounted tasks per run")
    p.add_argument("--skip", default="", help=(
        "what-if: leave out some of today's messages, comma-separated: 'log-acks' (the "
        "one ack of the worker's log records per step), 'fresh' (the read of a new task "
        "before its first batch)"))
    p.add_argument("--add", default="", help=(
        "what was: add messages today's design no longer sends: 'results-read' (the "
        "orchestrator's read of the task on its step results, before it folded them "
        "from their deliveries), 'log-acks' (an ack for each of the worker's log "
        "records)"))
    p.add_argument("--durability", choices=["strict", "balanced"], default="balanced",
                   help="JETMESH_DURABILITY of the streams: balanced (the steps' logs "
                        "acked before their fsync) or strict (everything fsync'd)")
    p.add_argument("--ready", help=argparse.SUPPRESS)  # roles: where to say they started
    p.add_argument("--sync-interval", default="always",
                   help="nats-server JetStream sync_interval (always: fsync every append)")
    args = p.parse_args()
    os.environ["JETMESH_DURABILITY"] = args.durability  # BusSettings, here and in the roles
    skip = {x for x in args.skip.split(",") if x}
    add = {x for x in args.add.split(",") if x}
    if skip - SKIPPABLE or add - ADDABLE:
        p.error(f"unknown: {', '.join(sorted((skip - SKIPPABLE) | (add - ADDABLE)))}; "
                f"--skip knows {', '.join(sorted(SKIPPABLE))}, "
                f"--add {', '.join(sorted(ADDABLE))}")
    if args.role != "run":
        import uvloop

        role = orchestrator if args.role == "orchestrator" else worker
        uvloop.run(role(args.url, skip, add, args.ready))
        return
    runs = []
    for r in range(args.runs):
        progress(f"floor of A: run {r + 1}/{args.runs}, {args.tasks} tasks")
        res = asyncio.run(run_once(args.tasks, args.warmup, skip, add, args.sync_interval))
        cpu = res["cpu"]
        progress(f"  -> {res['tasks_s']:.1f} tasks/s, mean {res['mean']:.1f} ms, p99 "
                 f"{res['p99']:.1f} ms; CPU ms/task {sum(cpu.values()):.1f}: "
                 + ", ".join(f"{n} {v:.1f}" for n, v in cpu.items())
                 + f"; other load {res['other']:.0f}%; {res['msgs']:.1f} msgs/task")
        runs.append(res)
    med = sorted(runs, key=lambda x: x["tasks_s"])[len(runs) // 2]
    print(f"messaging floor of workload A (no jetmesh logic"
          f"{'; without: ' + ', '.join(sorted(skip)) if skip else ''}"
          f"{'; with: ' + ', '.join(sorted(add)) if add else ''}; durability "
          f"{args.durability}; sync_interval "
          f"{args.sync_interval}), median of {len(runs)}: "
          f"{med['tasks_s']:.1f} tasks/s, mean {med['mean']:.1f} ms, p99 {med['p99']:.1f} ms, "
          f"CPU {sum(med['cpu'].values()):.1f} ms/task "
          f"({', '.join(f'{n} {v:.1f}' for n, v in med['cpu'].items())}), "
          f"{med['msgs']:.1f} msgs/task through nats-server; runs: "
          + ", ".join(f"{x['tasks_s']:.1f}" for x in runs))


if __name__ == "__main__":
    main()
