"""The fault campaign: real nats-server, real `jetmesh` role processes, real signals.

1. kill -9 random workers again and again during a run: every task terminal and
   completed, none lost, no side effect run twice (a CI-sized run, and the full
   200-task campaign under `-m slow`).
2. kill -9 the nats-server mid-run and restart it on the same data dir and port: no
   acknowledged event lost, the run finishes.
3. SIGSTOP a worker past its ack wait: another replica finishes the step; the stopped
   worker's late result is refused (fenced) when it wakes.
4. A poison message (its tool crashes the worker) ends in the dead letters after the
   maximum deliveries; `jetmesh dlq redrive` works once the cause is fixed.

Every wait is on something observable (ledger follow, process exit, a log line) and
bounded by a deadline; the only timer is the campaign's kill cadence.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import kill9, send_step, spawn, stop, wait_for_entry

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.dlq import DeadLetter, list_dead_letters
from jetmesh.bus.ledger import Ledger
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.settings import BusSettings
from jetmesh.bus.streams import declare_streams
from jetmesh.bus.tasks import cancel_and_wait
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.registry import live_agents
from jetmesh.orchestrator.state import TaskStatus

HERE = Path(__file__).parent
FX_AGENT = "fault_agents:FX_EFFECTS"

WORKFLOW = """
name: fxeffects
description: two side-effecting steps, one after the other
steps:
  - id: first
    skill: fx_effect
    input: {label: {"$ref": "task.input.label"}}
    timeout_s: 20
    retries: 5
  - id: second
    skill: fx_effect
    input: {label: {"$ref": "steps.first.output.text"}}
    depends_on: [first]
    timeout_s: 20
    retries: 5
"""
# A step whose work message is dead-lettered (JETMESH_MAX_DELIVER deliveries, each to a
# worker killed before it finished) is only noticed by the orchestrator's step timeout,
# which then dispatches the next attempt; 20 s instead of the default 120 s keeps such
# a recovery short.


def role_env(server: EmbeddedNats, tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment of every role process of one test."""
    return {
        "NATS_URL": server.url, "JETMESH_MODEL_PROVIDER": "sim",
        "JETMESH_DATA_DIR": str(tmp_path), "PYTHONPATH": str(HERE),
        "JETMESH_TICK_S": "0.2", "JETMESH_NO_AGENT_WAIT_S": "60",
        "JETMESH_FAULT_EFFECTS_FILE": str(tmp_path / "effects.jsonl"),
        **extra,
    }


def replica_of(proc: subprocess.Popen[bytes]) -> str:
    """The replica id a `jetmesh worker` process advertises (agents.worker.replica_id)."""
    return f"{socket.gethostname()}-{proc.pid}"


async def wait_replicas(js, name: str, n: int, timeout: float = 30.0) -> None:
    """Until `n` replicas of agent `name` advertise themselves (KV presence)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(a.name == name and len(a.replicas) >= n for a in await live_agents(js)):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{n} replicas of {name} never became live")


def write_workflow(tmp_path: Path) -> Path:
    wf_dir = tmp_path / "workflows"
    wf_dir.mkdir(exist_ok=True)
    (wf_dir / "fxeffects.yaml").write_text(WORKFLOW)
    return wf_dir


def side_effects(path: Path) -> tuple[int, Counter[tuple[str, str]]]:
    """(invocations, per (task, step) invocation count) from the effects file."""
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return len(lines), Counter((x["task"], x["step"]) for x in lines)


class Progress:
    """Terminal tasks seen so far, with waiters on thresholds."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = set(ids)
        self.done: set[str] = set()
        self._cond = asyncio.Condition()

    async def add(self, task_id: str) -> None:
        async with self._cond:
            if task_id in self.ids:
                self.done.add(task_id)
                self._cond.notify_all()

    async def reached(self, n: int) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: len(self.done) >= n)

    @property
    def finished(self) -> bool:
        return self.done >= self.ids


async def follow_terminals(ledger: Ledger, progress: Progress, from_seq: int = 1) -> None:
    """Follow every task's own events until every task of the run is terminal."""
    async for entry in ledger.follow(filter_subject=subjects.ALL_TASK_EVENTS,
                                     from_seq=from_seq):
        if isinstance(entry.event, ev.TERMINAL_TASK_EVENTS):
            await progress.add(entry.event.subject)
            if progress.finished:
                return


# --------------------------------------------------------------------------- 1. kill -9


@dataclass
class CampaignFigures:
    runs: int = 1
    replicas: int = 0
    kills: int = 0
    tasks: int = 0
    steps: int = 0
    completed: int = 0
    lost: int = 0
    not_completed: dict[str, str] = field(default_factory=dict)
    side_effects: int = 0
    duplicate_side_effects: int = 0
    steps_without_effect: int = 0
    redelivered_steps: int = 0
    dead_lettered: int = 0
    retried_steps: int = 0
    fenced_lines: int = 0
    duration_s: float = 0.0

    def line(self) -> str:
        return (f"runs={self.runs} replicas={self.replicas} kills={self.kills} "
                f"tasks={self.tasks} completed={self.completed} lost={self.lost} "
                f"steps={self.steps} side_effects={self.side_effects} "
                f"duplicate_side_effects={self.duplicate_side_effects} "
                f"steps_redelivered={self.redelivered_steps} dead_lettered={self.dead_lettered} "
                f"steps_retried={self.retried_steps} fenced={self.fenced_lines} "
                f"duration={self.duration_s:.1f}s")


async def kill_campaign(server: EmbeddedNats, tmp_path: Path, *, tasks: int, replicas: int,
                        kill_at: list[int] | None = None, kill_every_s: float | None = None,
                        timeout_s: float, seed: int, latency_ms: int = 60) -> CampaignFigures:
    """Run `tasks` two-step tasks on `replicas` worker processes and kill -9 random
    workers, either when the run reaches the `kill_at` counts of terminal tasks or every
    `kill_every_s` until the run ends. Each killed worker is replaced at once (the
    supervisor's job)."""
    rng = random.Random(seed)
    env = role_env(server, tmp_path, JETMESH_ACK_WAIT_S="2",
                   JETMESH_SIM_LATENCY_MS=str(latency_ms),
                   JETMESH_WORKFLOWS_DIR=str(write_workflow(tmp_path)))
    effects = tmp_path / "effects.jsonl"
    effects.touch()
    figures = CampaignFigures(tasks=tasks, replicas=replicas, steps=2 * tasks)
    logs: list[Path] = []

    def start_worker() -> subprocess.Popen[bytes]:
        log = tmp_path / f"worker{len(logs)}.log"
        logs.append(log)
        return spawn(["worker", FX_AGENT], env, log)

    orch = spawn(["orchestrator"], env, tmp_path / "orch.log")
    workers = [start_worker() for _ in range(replicas)]

    def kill_one() -> None:
        i = rng.randrange(len(workers))
        kill9(workers[i])
        figures.kills += 1
        workers[i] = start_worker()

    t0 = time.monotonic()
    try:
        async with Client(server.url) as c:
            await wait_replicas(c.js, "fxeffects", replicas)
            t0 = time.monotonic()
            ids = [await c.submit("fx", workflow="fxeffects", input={"label": f"t{i}"})
                   for i in range(tasks)]
            progress = Progress(ids)
            watcher = asyncio.create_task(follow_terminals(c.ledger, progress))

            async def killer() -> None:
                if kill_at is not None:
                    for n in kill_at:
                        await progress.reached(n)
                        kill_one()
                    return
                assert kill_every_s is not None
                while not watcher.done():
                    done, _ = await asyncio.wait({watcher}, timeout=kill_every_s)
                    if not done:
                        kill_one()

            kill_task = asyncio.create_task(killer())
            try:
                await asyncio.wait_for(asyncio.shield(watcher), timeout_s)
            except TimeoutError:
                pass  # reported below as lost tasks
            finally:
                figures.duration_s = time.monotonic() - t0
                await cancel_and_wait(watcher, kill_task)
            states = {t: await c.state(t) for t in ids}
            entries = {t: await c.events(t) for t in ids}
            figures.dead_lettered = sum(dl.task_id in progress.ids
                                        for _, dl in await list_dead_letters(c.ledger))
    finally:
        stop(orch)
        for w in workers:
            stop(w)

    figures.completed = sum(s.status is TaskStatus.COMPLETED for s in states.values())
    figures.lost = sum(not s.terminal for s in states.values())
    figures.not_completed = {t: f"{s.status}: {s.reason}" for t, s in states.items()
                             if s.status is not TaskStatus.COMPLETED}
    figures.side_effects, per_step = side_effects(effects)
    figures.duplicate_side_effects = sum(n - 1 for n in per_step.values() if n > 1)
    figures.steps_without_effect = 2 * tasks - len(per_step)
    starts = Counter((t, e.event.data.step_id) for t, es in entries.items() for e in es
                     if isinstance(e.event, ev.StepStarted))
    figures.redelivered_steps = sum(1 for n in starts.values() if n > 1)
    figures.retried_steps = sum(1 for es in entries.values() for e in es
                                if isinstance(e.event, ev.StepDispatched)
                                and e.event.data.attempt > 1)
    figures.fenced_lines = sum(p.read_text(errors="replace").count("fenced out of")
                               for p in logs)
    completions = Counter((t, e.event.data.step_id) for t, es in entries.items() for e in es
                          if isinstance(e.event, ev.StepCompleted))
    assert set(completions.values()) <= {1}, "a step has two StepCompleted events"
    return figures


def assert_campaign(f: CampaignFigures, min_kills: int) -> None:
    print(f"\nkill -9 campaign: {f.line()}")
    assert f.kills >= min_kills
    assert f.lost == 0 and f.completed == f.tasks, f.not_completed
    assert f.steps_without_effect == 0
    assert f.duplicate_side_effects == 0, f"side effects ran twice: {f.line()}"


async def test_kill_9_random_workers_again_and_again(fresh_server: EmbeddedNats,
                                                     tmp_path: Path) -> None:
    """CI size: 40 tasks (80 side-effecting steps), 2 replicas, 3 kills mid-run."""
    f = await kill_campaign(fresh_server, tmp_path, tasks=40, replicas=2, kill_at=[4, 14, 24],
                            timeout_s=60, seed=7, latency_ms=150)
    assert_campaign(f, min_kills=3)
    assert f.duration_s < 40


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_kill_9_campaign_200_tasks(fresh_server: EmbeddedNats, tmp_path: Path) -> None:
    """The full campaign: runs of 200 tasks (400 side-effecting steps) on 3 replicas, a
    random worker killed every half second of every run. JETMESH_FAULT_SEED and
    JETMESH_FAULT_RUNS pick the seeds and the number of runs."""
    seed = int(os.environ.get("JETMESH_FAULT_SEED", "2024"))
    runs = int(os.environ.get("JETMESH_FAULT_RUNS", "3"))
    total = CampaignFigures(runs=0, replicas=3)
    for run in range(runs):
        run_dir = tmp_path / f"run{run}"
        run_dir.mkdir()
        # Every half second: a faster stack finishes a run in 6-18 s, and each run must
        # still see at least 10 kills.
        f = await kill_campaign(fresh_server, run_dir, tasks=200, replicas=3,
                                kill_every_s=0.5, timeout_s=240, seed=seed + run,
                                latency_ms=300)
        print(f"\nrun {run} (seed {seed + run}): {f.line()}")
        assert f.lost == 0 and f.completed == f.tasks, f.not_completed
        assert f.steps_without_effect == 0
        assert f.duplicate_side_effects == 0, f"side effects ran twice: {f.line()}"
        total.runs += 1
        for name in ("kills", "tasks", "steps", "completed", "lost", "side_effects",
                     "duplicate_side_effects", "redelivered_steps", "dead_lettered",
                     "retried_steps", "fenced_lines", "duration_s"):
            setattr(total, name, getattr(total, name) + getattr(f, name))
    assert_campaign(total, min_kills=10 * runs)


# --------------------------------------------------------------------------- 2. server


async def jetstream_answers(js, timeout: float) -> None:
    """Until this (reconnecting) connection gets an answer from JetStream again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await js.account_info()
            return
        except Exception:
            assert time.monotonic() < deadline, "JetStream never answered after the restart"
            await asyncio.sleep(0.1)


async def test_kill_9_the_nats_server_mid_run(fresh_server: EmbeddedNats,
                                               tmp_path: Path) -> None:
    """Everything acknowledged before the crash is there after it; the run finishes."""
    tasks = 30
    env = role_env(fresh_server, tmp_path, JETMESH_ACK_WAIT_S="2", JETMESH_MAX_DELIVER="20",
                   JETMESH_SIM_LATENCY_MS="100",
                   JETMESH_WORKFLOWS_DIR=str(write_workflow(tmp_path)))
    (tmp_path / "effects.jsonl").touch()
    procs = [spawn(["orchestrator"], env, tmp_path / "orch.log"),
             spawn(["worker", FX_AGENT], env, tmp_path / "w1.log"),
             spawn(["worker", FX_AGENT], env, tmp_path / "w2.log")]
    probe_task = ev.new_id()
    acked: dict[int, str] = {}  # ledger seq -> event id, for every append acked to the test
    observed: dict[int, str] = {}  # ledger seq -> event id, everything seen before the kill
    probe_stop = asyncio.Event()
    t0 = time.monotonic()
    try:
        async with Client(fresh_server.url) as c:
            await wait_replicas(c.js, "fxeffects", 2)

            async def probe() -> None:
                """Appends of the test's own, acked or not, straight through the crash."""
                i = 0
                while not probe_stop.is_set():
                    i += 1
                    # A side effect's record: a class fsync'd before its ack (a read-only
                    # call's record goes to the steps' log, which a crash may cut short:
                    # tests/durability).
                    e = ev.ToolCalled(
                        subject=probe_task, source="jetmesh/test", data=ev.ToolCalledData(
                            step_id="probe", agent="test", tool="probe", call_id=str(i),
                            idempotency_key=f"probe-{i}", side_effects=True))
                    try:
                        acked[await c.ledger.append(e)] = e.id
                    except Exception:  # server down: not acknowledged, may or may not be there
                        pass
                    await asyncio.sleep(0.02)  # pacing, ~50 appends/s

            prober = asyncio.create_task(probe())
            ids = [await c.submit("fx", workflow="fxeffects", input={"label": f"t{i}"})
                   for i in range(tasks)]
            progress = Progress(ids)
            # Phase 1: follow the whole ledger until a third of the tasks are done.
            async def until_a_third() -> None:
                async for entry in c.ledger.follow(filter_subject=subjects.ALL_LEDGER):
                    observed[entry.seq] = entry.event.id
                    if isinstance(entry.event, ev.TERMINAL_TASK_EVENTS):
                        await progress.add(entry.event.subject)
                        if len(progress.done) >= tasks // 3:
                            return
            await asyncio.wait_for(until_a_third(), 40)
            acked_before = len(acked)
            fresh_server.kill()
            killed_at = time.monotonic()
            fresh_server.start()  # same data dir, same port
            restarted_in = time.monotonic() - killed_at
            # Phase 2: the same connection reconnects by itself; follow to the end.
            await jetstream_answers(c.js, 30)
            await asyncio.wait_for(follow_terminals(c.ledger, progress), 90)
            probe_stop.set()
            await prober
            duration = time.monotonic() - t0
            states = [await c.state(t) for t in ids]
            stored = {seq: json.loads(data)["id"] for seq, _s, data in
                      await c.ledger.read_raw(subjects.ALL_LEDGER)}
            submitted = {json.loads(data)["task_id"] for _q, _s, data in
                         await c.ledger._direct_batch_all(subjects.SUBMIT,
                                                          stream=subjects.STREAM_TASKS)}
    finally:
        probe_stop.set()
        for p in procs:
            stop(p)
    lost_observed = {s: i for s, i in observed.items() if stored.get(s) != i}
    lost_acked = {s: i for s, i in acked.items() if stored.get(s) != i}
    completed = sum(s.status is TaskStatus.COMPLETED for s in states)
    print(f"\nnats-server kill -9: tasks={tasks} completed={completed} "
          f"events_observed_before_kill={len(observed)} probe_appends_acked={len(acked)} "
          f"(before kill {acked_before}) lost_observed={len(lost_observed)} "
          f"lost_acked={len(lost_acked)} restart={restarted_in:.1f}s "
          f"duration={duration:.1f}s")
    assert observed and acked_before > 0
    assert not lost_observed, f"events lost by the crash: {lost_observed}"
    assert not lost_acked, f"acknowledged appends lost by the crash: {lost_acked}"
    assert set(ids) <= submitted, "an acknowledged submission was lost"
    assert completed == tasks, [(s.task_id, s.status, s.reason) for s in states
                                if s.status is not TaskStatus.COMPLETED]


# --------------------------------------------------------------------------- 3. SIGSTOP


def is_step_result(entry) -> bool:
    return isinstance(entry.event, ev.StepCompleted | ev.StepFailed)


async def test_sigstopped_worker_is_fenced_when_it_wakes(fresh_server: EmbeddedNats,
                                                          tmp_path: Path) -> None:
    # A long request timeout: the stop may land while the worker's claim is still in
    # flight, and its ack must still count when it wakes (a shorter one would time out
    # at once on waking, and the worker would stand down without reaching the fence).
    env = role_env(fresh_server, tmp_path, JETMESH_ACK_WAIT_S="2",
                   JETMESH_SIM_LATENCY_MS="1500", JETMESH_REQUEST_TIMEOUT_S="60")
    nc = await connect(fresh_server.url)
    js = jetstream(nc)
    await declare_streams(js, BusSettings(ack_wait_s=2))
    ledger = Ledger(nc, js)
    procs = {name: spawn(["worker", "support"], env, tmp_path / f"{name}.log")
             for name in ("a", "b")}
    stopped: subprocess.Popen[bytes] | None = None
    try:
        await wait_replicas(js, "support", 2)
        cmd = ev.StepCommand(task_id=ev.new_id(), step_id="s1", skill="order_status",
                             input={"order_id": "A1003"})
        await send_step(ledger, cmd)
        first = await wait_for_entry(ledger, cmd.task_id,
                                     lambda e: isinstance(e.event, ev.StepStarted), 30)
        by_replica = {replica_of(p): n for n, p in procs.items()}
        name = by_replica[first.event.data.worker]
        other = "b" if name == "a" else "a"
        stopped = procs[name]
        os.killpg(stopped.pid, signal.SIGSTOP)  # mid-step: its model call takes 1.5 s
        done = await wait_for_entry(ledger, cmd.task_id, is_step_result, 30)
        woke_at_seq = done.seq
        os.killpg(stopped.pid, signal.SIGCONT)
        stopped_log = tmp_path / f"{name}.log"

        async def fenced_in_log() -> str:
            deadline = time.monotonic() + 20
            while "fenced" not in stopped_log.read_text(errors="replace"):
                assert time.monotonic() < deadline, stopped_log.read_text(errors="replace")
                assert stopped.poll() is None, "the woken worker died"
                await asyncio.sleep(0.1)
            return "fenced"

        async def late_result() -> str:
            await wait_for_entry(ledger, cmd.task_id, is_step_result, 20, woke_at_seq + 1)
            return "late result appended"

        # Whichever is observed first: the woken worker says it was fenced, or a second
        # result of the step lands in the ledger.
        waits = [asyncio.create_task(fenced_in_log()), asyncio.create_task(late_result())]
        finished, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        await cancel_and_wait(*pending)
        woke = finished.pop().result()
        stop(stopped)  # graceful: anything it still had in flight is settled by now
        entries = await ledger.read(cmd.task_id)
    finally:
        if stopped is not None and stopped.poll() is None:
            os.killpg(stopped.pid, signal.SIGCONT)
        for p in procs.values():
            stop(p)
        await nc.close()
    summary = [(e.seq, e.event.type.split(".")[-2], getattr(e.event.data, "worker", ""))
               for e in entries]
    assert isinstance(done.event, ev.StepCompleted), done.event
    completed = [e for e in entries if isinstance(e.event, ev.StepCompleted)]
    late = [e for e in entries if e.seq > woke_at_seq and is_step_result(e)]
    assert not late, (f"the stopped worker's late result was accepted after it woke "
                      f"(fencing defeated): {summary}")
    assert woke == "fenced"
    assert len(completed) == 1, summary
    starts = [e for e in entries if isinstance(e.event, ev.StepStarted)]
    assert [s.event.data.worker for s in starts] == [replica_of(procs[name]),
                                                     replica_of(procs[other])]
    assert starts[1].event.data.delivery == 2
    # Appends are fenced one after another on the step subject, so the owner of the
    # result is the worker of the last StepStarted before it: the other replica.
    owner = max((s for s in starts if s.seq < completed[0].seq), key=lambda s: s.seq)
    assert owner.event.data.worker == replica_of(procs[other])
    assert "A1003" in json.dumps(completed[0].event.data.output)
    stale = [e.event.type for e in entries if e.seq > woke_at_seq]
    print(f"\nSIGSTOP: step started on {name}, stopped past the 2 s ack wait, completed by "
          f"{other} (delivery 2); {name} woke and was fenced; 1 StepCompleted; "
          f"records it wrote after waking: {stale}")


# --------------------------------------------------------------------------- 4. poison


def cli(args: list[str], url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jetmesh.orchestrator.cli", *args],
        env={**os.environ, "NATS_URL": url, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
        cwd=cwd, capture_output=True, text=True, timeout=60)


async def test_poison_message_dead_letters_then_redrives_once_fixed(
    fresh_server: EmbeddedNats, tmp_path: Path
) -> None:
    fixed = tmp_path / "fixed"
    env = role_env(fresh_server, tmp_path, JETMESH_MAX_DELIVER="3", JETMESH_ACK_WAIT_S="1",
                   JETMESH_FAULT_POISON_FIXED=str(fixed))
    settings = BusSettings(ack_wait_s=1, max_deliver=3)
    nc = await connect(fresh_server.url)
    js = jetstream(nc)
    await declare_streams(js, settings)
    ledger = Ledger(nc, js)
    consumer = subjects.work_consumer("poison_step")
    dlq = await js.subscribe(subjects.dlq(subjects.STREAM_WORK, consumer),
                             ordered_consumer=True)
    cmd = ev.StepCommand(task_id=ev.new_id(), step_id="p1", skill="poison_step",
                         input={"item": "x1"})
    await send_step(ledger, cmd)
    exits: list[int] = []
    worker = spawn(["worker", "fault_agents:POISON"], env, tmp_path / "poison0.log")
    try:
        # The supervisor's job, done here: respawn the worker each time it dies, until
        # the message is dead-lettered instead of crashing it again.
        deadline = time.monotonic() + 60
        letter_wait = asyncio.create_task(dlq.next_msg(timeout=60))
        while True:
            exit_wait = asyncio.create_task(asyncio.to_thread(worker.wait))
            done, _ = await asyncio.wait({letter_wait, exit_wait},
                                         timeout=deadline - time.monotonic(),
                                         return_when=asyncio.FIRST_COMPLETED)
            assert done, f"no dead letter after {len(exits)} crashes"
            if letter_wait in done:
                break
            exits.append(worker.returncode)
            assert len(exits) <= 10, "the poison message is never dead-lettered"
            worker = spawn(["worker", "fault_agents:POISON"], env,
                           tmp_path / f"poison{len(exits)}.log")
        letter = DeadLetter.model_validate_json(letter_wait.result().data)
        seq = int(letter_wait.result().metadata.sequence.stream)
        assert worker.poll() is None, "the worker that dead-lettered it must still serve"
        listed = cli(["dlq", "list"], fresh_server.url, tmp_path)
        assert listed.returncode == 0, listed.stderr
        fixed.touch()  # the fix is deployed
        redriven = cli(["dlq", "redrive", str(seq)], fresh_server.url, tmp_path)
        assert redriven.returncode == 0, redriven.stderr
        done_entry = await wait_for_entry(
            ledger, cmd.task_id, lambda e: isinstance(e.event, ev.StepCompleted), 30)
        after = cli(["dlq", "list"], fresh_server.url, tmp_path)
        entries = await ledger.read(cmd.task_id)
    finally:
        # SIGTERM: the worker drains for up to 10 s, then cancels for 2 s, then closes;
        # 30 s leaves room for that on a starved machine (once it took over 15 s in CI).
        with_exit = stop(worker, timeout=30.0)
        await dlq.unsubscribe()
        await nc.close()
    assert exits == [3, 3, 3], exits
    assert letter.task_id == cmd.task_id and letter.subject == subjects.work("poison_step")
    assert letter.consumer == consumer and letter.stream == subjects.STREAM_WORK
    assert letter.reason.startswith("gave up after 3 deliveries"), letter.reason
    assert letter.deliveries == 4  # the delivery after the maximum is dead-lettered
    assert ev.StepCommand.model_validate_json(letter.data) == cmd
    assert str(seq) in listed.stdout and "gave up after 3" in listed.stdout, listed.stdout
    assert f"redriven {seq}" in redriven.stdout, redriven.stdout
    assert isinstance(done_entry.event, ev.StepCompleted), done_entry.event
    assert done_entry.event.data.output == {"handled": "x1"}
    assert "no dead letters" in after.stdout, after.stdout
    # The dead letter failed the step at once (so an orchestrator retries without waiting
    # for the step timeout), and the redriven command ran it again.
    failed = [e.event.data for e in entries if isinstance(e.event, ev.StepFailed)]
    assert [f.code for f in failed] == ["dead_lettered"] and failed[0].retryable
    starts = [e.event.data.delivery for e in entries if isinstance(e.event, ev.StepStarted)]
    assert starts == [1, 2, 3, 1], starts  # 3 crashed deliveries, then the redriven one
    assert with_exit == 0
    print(f"\npoison: {len(exits)} worker crashes (exit 3), dead letter seq={seq} "
          f"deliveries={letter.deliveries} reason={letter.reason!r}; redriven -> completed; "
          "DLQ empty")
