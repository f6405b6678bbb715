"""Durability classes (README "Durability"): what a crash of nats-server, and a power loss,
may cost each record class under the default (balanced) durability.

A power loss is simulated: nats-server is killed with SIGKILL and what the steps' log
stream (JM_LOG, `persist_mode: async`) had not flushed and synced is dropped by
truncating its message blocks on disk (its tail, or all of it: the worst case). The
ledger's own records were fsync'd before their acks (`sync_interval: always`), so a
power loss cannot take them; the test leaves them as the fsync left them.

1. Ledger level: every acknowledged decision (claims, effect records, side effects,
   results, controls, the task's own events) is there after the crash and the loss,
   at its sequence; the log keeps a prefix of what was written; reads merge the two.
2. The real stack: a worker killed between a side effect and its result, nats-server
   killed with it and the whole log lost. The step resumes on another worker: its model
   call is made again (the only cost), the effect is not run again, the task completes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from helpers import kill9, spawn, stop
from nats.js.api import PersistMode

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.ledger import Ledger, is_log_seq
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.settings import BusSettings
from jetmesh.bus.streams import declare_streams
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.state import TaskStatus

FAULTS = Path(__file__).resolve().parent.parent / "faults"
sys.path.insert(0, str(FAULTS))

from test_campaign import (  # noqa: E402
    FX_AGENT,
    jetstream_answers,
    role_env,
    side_effects,
    wait_replicas,
    write_workflow,
)


def lose_unsynced_log(server: EmbeddedNats, keep: float) -> None:
    """After a SIGKILL: drop what JM_LOG had not synced, keeping the first `keep` of each
    message block (0: the whole log lost). Its index files go too, so the server rebuilds
    the stream from the blocks, as after a power loss."""
    assert not server.running
    msgs = next(p for p in server.data_dir.rglob(subjects.STREAM_LOG) if p.is_dir()) / "msgs"
    for f in msgs.iterdir():
        if f.suffix == ".blk":
            with f.open("r+b") as fh:
                fh.truncate(int(f.stat().st_size * keep))
        else:
            f.unlink()


async def stream_persist(js, name: str) -> str:
    mode = (await js.stream_info(name)).config.persist_mode
    return PersistMode(mode or "default").value


async def test_streams_follow_the_durability_setting(fresh_server: EmbeddedNats,
                                                     tmp_path: Path) -> None:
    """balanced: the log acks before its flush, everything else fsync'd; strict: all."""
    nc = await connect(fresh_server.url)
    js = jetstream(nc)
    try:
        await declare_streams(js, BusSettings(durability="balanced"))
        assert await stream_persist(js, subjects.STREAM_LOG) == "async"
        for name in (subjects.STREAM_LEDGER, subjects.STREAM_WORK, subjects.STREAM_TASKS):
            assert await stream_persist(js, name) == "default"
    finally:
        await nc.close()
    strict = EmbeddedNats(data_dir=tmp_path / "strict")
    with strict:
        nc = await connect(strict.url)
        js = jetstream(nc)
        try:
            await declare_streams(js, BusSettings(durability="strict"))
            assert await stream_persist(js, subjects.STREAM_LOG) == "default"
            assert "sync_interval: always" in strict.render_config()
        finally:
            await nc.close()


@pytest.mark.parametrize("keep", [0.5, 0.0])
async def test_a_crash_and_a_lost_log_tail_lose_no_decision(fresh_server: EmbeddedNats,
                                                           keep: float) -> None:
    task = ev.new_id()
    decisions: dict[int, str] = {}  # ledger seq -> event id, every acked decision
    logged: list[str] = []  # log record ids, in the order written
    nc = await connect(fresh_server.url)
    js = jetstream(nc)
    try:
        await declare_streams(js)
        ledger = Ledger(nc, js)
        submitted = ev.TaskSubmitted(subject=task, data=ev.TaskSubmittedData(goal="durability"))
        decisions[await ledger.append(submitted)] = submitted.id
        for i in range(30):
            step = f"s{i}"
            claim = ev.StepStarted(subject=task, data=ev.StepStartedData(
                step_id=step, agent="a", worker="w1", claim=True))
            line = await ledger.append(claim, expected_last_subject_seq=0)
            decisions[line] = claim.id
            calls = [ev.ModelCalled(subject=task, data=ev.ModelCalledData(
                         step_id=step, agent="a", provider="sim", model="m", response={},
                         worker="w1")),
                     ev.ToolCalled(subject=task, data=ev.ToolCalledData(
                         step_id=step, agent="a", tool="lookup", call_id=f"r{i}",
                         idempotency_key=f"r{i}", worker="w1"))]
            for a in await ledger.append_pipelined(calls):  # as the worker: not awaited alone
                assert is_log_seq(a.seq)
            logged += [c.id for c in calls]
            effect = ev.EffectStarted(subject=task, data=ev.EffectStartedData(
                step_id=step, agent="a", worker="w1", tool="pay", args_hash="h",
                idempotency_key=f"e{i}"))
            line = await ledger.append(effect, expected_last_subject_seq=line)
            decisions[line] = effect.id
            paid = ev.ToolCalled(subject=task, data=ev.ToolCalledData(
                step_id=step, agent="a", tool="pay", call_id=f"p{i}", idempotency_key=f"e{i}",
                side_effects=True, worker="w1"))
            line = await ledger.append(paid, expected_last_subject_seq=line)
            decisions[line] = paid.id
            done = ev.StepCompleted(subject=task, data=ev.StepCompletedData(
                step_id=step, agent="a", output={"i": i}, worker="w1"))
            decisions[await ledger.append(done, expected_last_subject_seq=line)] = done.id
        cancel = ev.CancelRequested(subject=task, data=ev.CancelRequestedData(reason="r"))
        decisions[await ledger.append(cancel)] = cancel.id
        before = await ledger.read(task)
        assert len(before) == len(decisions) + len(logged)
    finally:
        await nc.close()
    fresh_server.kill()
    lose_unsynced_log(fresh_server, keep)
    fresh_server.start()
    nc = await connect(fresh_server.url)
    js = jetstream(nc)
    try:
        await jetstream_answers(js, 30)
        ledger = Ledger(nc, js)
        after = await ledger.read(task)
        stored = {e.seq: e.event.id for e in after if not is_log_seq(e.seq)}
        survived = [e.event.id for e in after if is_log_seq(e.seq)]
    finally:
        await nc.close()
    print(f"\nkill -9 + log kept {keep:.0%}: decisions {len(decisions)} all kept, "
          f"log records {len(survived)} of {len(logged)} kept")
    assert stored == decisions, "an acknowledged decision was lost"
    assert survived == logged[:len(survived)], "the log kept something other than a prefix"
    if keep == 0.0:
        assert survived == []
    # The merged read keeps the ledger's order and puts each surviving log record after
    # the claim it was written under.
    order = [e.event.id for e in after]
    assert [x for x in order if x in decisions.values()] == list(decisions.values())
    for rid in survived:
        i = logged.index(rid) // 2
        claim_id = next(e.event.id for e in after if isinstance(e.event, ev.StepStarted)
                        and e.event.data.step_id == f"s{i}")
        assert order.index(claim_id) < order.index(rid)


WORKFLOW_ONE = """
name: fxone
description: one side-effecting step
steps:
  - id: first
    skill: fx_effect
    input: {label: {"$ref": "task.input.label"}}
    timeout_s: 30
    retries: 3
"""


async def test_power_loss_mid_step_repeats_a_model_call_never_an_effect(
        fresh_server: EmbeddedNats, tmp_path: Path) -> None:
    """Worker and nats-server killed right after a side effect; the log lost whole."""
    wf = write_workflow(tmp_path)
    (wf / "fxone.yaml").write_text(WORKFLOW_ONE)
    env = role_env(fresh_server, tmp_path, JETMESH_ACK_WAIT_S="2",
                   JETMESH_MAX_DELIVER="20", JETMESH_SIM_LATENCY_MS="1500",
                   JETMESH_WORKFLOWS_DIR=str(wf))
    effects = tmp_path / "effects.jsonl"
    effects.touch()
    orch = spawn(["orchestrator"], env, tmp_path / "orch.log")
    w1 = spawn(["worker", FX_AGENT], env, tmp_path / "w1.log")
    procs = [orch, w1]
    try:
        async with Client(fresh_server.url) as c:
            await wait_replicas(c.js, "fxeffects", 1)
            task = await c.submit("fx", workflow="fxone", input={"label": "once"})

            async def until_effect_recorded() -> list[str]:
                ids = []
                async for entry in c.ledger.follow(task, logs=True):
                    ids.append(entry.event.id)
                    e = entry.event
                    if isinstance(e, ev.ToolCalled) and e.data.side_effects:
                        return ids
                raise AssertionError("follow ended")

            # The effect's record is on the step's line: the worker is now in its
            # second model call (1.5 s). Power goes: worker and server die together.
            seen = await asyncio.wait_for(until_effect_recorded(), 60)
            kill9(w1)
            fresh_server.kill()
            lose_unsynced_log(fresh_server, 0.0)
            fresh_server.start()
            await jetstream_answers(c.js, 30)
            w2 = spawn(["worker", FX_AGENT], env, tmp_path / "w2.log")
            procs.append(w2)

            async def until_terminal() -> None:
                async for entry in c.ledger.follow(filter_subject=subjects.task_events(task)):
                    if isinstance(entry.event, ev.TERMINAL_TASK_EVENTS):
                        return

            await asyncio.wait_for(until_terminal(), 90)
            state = await c.state(task)
            entries = await c.ledger.read(task)
    finally:
        for p in procs:
            stop(p)
    invocations, per_step = side_effects(effects)
    by_w1 = [e for e in entries if getattr(e.event.data, "worker", None)
             and e.event.data.worker.endswith(f"-{w1.pid}")]
    step_models = [e for e in entries if isinstance(e.event, ev.ModelCalled)
                   and e.event.data.step_id == "first"]
    lost = [i for i in seen if i not in {e.event.id for e in entries}]
    print(f"\npower loss mid-step: effects run {invocations}, model calls of the step "
          f"now {len(step_models)} (the lost worker's lost: {len(lost)} records), "
          f"status {state.status}")
    assert state.status is TaskStatus.COMPLETED, (state.status, state.reason)
    assert invocations == 1 and per_step[(task, "first")] == 1, "the effect ran again"
    # What the killed worker wrote to its step's line survived (claim, effect, its record).
    kinds = {type(e.event) for e in by_w1}
    assert {ev.EffectStarted, ev.ToolCalled} <= kinds
    # Its model call record was in the log, which was lost: the new worker made it again.
    assert lost, "nothing was lost: the test did not exercise a power loss"
    assert not any(isinstance(e.event, ev.ModelCalled) for e in by_w1)
    assert step_models and all(not e.event.data.worker.endswith(f"-{w1.pid}")
                               for e in step_models)
    result = [e for e in entries if isinstance(e.event, ev.StepCompleted)]
    assert len(result) == 1 and json.dumps(result[0].event.data.output)
