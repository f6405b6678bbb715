"""The worker runtime on a real nats-server: events, shared load, crash, bad commands."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

from helpers import kill9, record_dispatch, send_step, spawn, stop, wait_for_entry

from jetmesh.agents.builtin import get_agent
from jetmesh.agents.models.sim import SimModel
from jetmesh.agents.worker import Worker
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.dlq import DeadLetter
from jetmesh.bus.ledger import Ledger
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.settings import BusSettings
from jetmesh.bus.streams import declare_streams


async def publish_step(js, skill: str, step_input: dict, task_id: str | None = None,
                       step_id: str = "s1") -> ev.StepCommand:
    cmd = ev.StepCommand(task_id=task_id or ev.new_id(), step_id=step_id, skill=skill,
                         input=step_input)
    return await send_step(Ledger(js._nc, js), cmd)


def is_terminal_step(entry) -> bool:
    return isinstance(entry.event, ev.StepCompleted | ev.StepFailed)


async def test_worker_runs_a_step_and_appends_its_events(bus) -> None:
    worker = Worker(get_agent("support"), SimModel(), bus.nc, bus.js, replica="r1")
    await worker.start()
    try:
        cmd = await publish_step(bus.js, "order_status", {"order_id": "A1002"})
        done = await wait_for_entry(bus.ledger, cmd.task_id, is_terminal_step)
    finally:
        await worker.stop()
    assert isinstance(done.event, ev.StepCompleted), done.event
    entries = await bus.ledger.read_step(cmd.task_id, "s1")
    events = [e.event for e in entries]
    types = [e.type for e in events]
    assert types == ["jetmesh.step.started.v1", "jetmesh.model.called.v1",
                     "jetmesh.tool.called.v1", "jetmesh.model.called.v1",
                     "jetmesh.step.completed.v1"]
    started, m1, tool, _m2, completed = events
    assert isinstance(started, ev.StepStarted) and started.data.worker == "r1"
    assert isinstance(m1, ev.ModelCalled) and m1.data.provider == "sim"
    assert m1.data.input_tokens > 0 and m1.data.cost_usd > 0
    assert m1.data.response["tool_calls"][0]["name"] == "lookup_order"
    assert isinstance(tool, ev.ToolCalled)
    assert tool.data.arguments == {"order_id": "A1002"}
    assert tool.data.output["found"] is True and tool.data.output["order"]["order_id"] == "A1002"
    assert isinstance(completed, ev.StepCompleted)
    assert "A1002" in json.dumps(completed.data.output)
    # A first delivery logs its start (no claim round trip) with its model calls and the
    # read-only tool call, which the orchestrator is not delivered; the result is the
    # first append on the step's fenced line, which claims it.
    assert started.data.claim is False and started.data.delivery == 1
    line, log = subjects.step_events(cmd.task_id, "s1"), subjects.step_log(cmd.task_id, "s1")
    assert [e.subject for e in entries] == [log, log, log, log, line]


async def test_two_replicas_share_200_steps_none_twice(bus) -> None:
    spec = get_agent("orders")
    conns = [await connect(bus.url) for _ in range(2)]
    workers = [Worker(spec, None, nc, jetstream(nc), replica=f"rep{i}", concurrency=8)
               for i, nc in enumerate(conns)]
    for w in workers:
        await w.start()
    task_id = ev.new_id()
    try:
        for i in range(200):
            await publish_step(bus.js, "lookup_order", {"order_id": f"A{1001 + i % 30}"},
                               task_id=task_id, step_id=f"s{i}")

        async def all_done() -> None:
            seen: set[str] = set()
            async for entry in bus.ledger.follow(task_id):
                if is_terminal_step(entry):
                    seen.add(entry.event.data.step_id)
                    if len(seen) == 200:
                        return
        await asyncio.wait_for(all_done(), 60)
    finally:
        for w in workers:
            await w.stop()
        for nc in conns:
            await nc.close()
    entries = await bus.ledger.read(task_id)
    starts = Counter(e.event.data.step_id for e in entries
                     if isinstance(e.event, ev.StepStarted))
    completions = Counter(e.event.data.step_id for e in entries
                          if isinstance(e.event, ev.StepCompleted))
    assert len(completions) == 200 and set(completions.values()) == {1}
    assert set(starts.values()) == {1}, "a step was processed twice"
    by_worker = Counter(e.event.data.worker for e in entries
                        if isinstance(e.event, ev.StepStarted))
    assert set(by_worker) == {"rep0", "rep1"}, by_worker


async def test_worker_killed_mid_step_is_finished_by_the_other_replica(
    fresh_server: EmbeddedNats, tmp_path: Path
) -> None:
    env = {"NATS_URL": fresh_server.url, "JETMESH_ACK_WAIT_S": "2",
           "JETMESH_SIM_LATENCY_MS": "1500", "JETMESH_MODEL_PROVIDER": "sim",
           "JETMESH_DATA_DIR": str(tmp_path)}
    nc = await connect(fresh_server.url)
    js = jetstream(nc)
    await declare_streams(js, BusSettings(ack_wait_s=2))
    ledger = Ledger(nc, js)
    first = spawn(["worker", "support"], env, tmp_path / "a.log")
    second = None
    try:
        cmd = await publish_step(js, "order_status", {"order_id": "A1003"})
        started = await wait_for_entry(ledger, cmd.task_id,
                                       lambda e: isinstance(e.event, ev.StepStarted), 30)
        kill9(first)  # mid-step: its model call takes 1.5 s
        second = spawn(["worker", "support"], env, tmp_path / "b.log")
        done = await wait_for_entry(ledger, cmd.task_id, is_terminal_step, 60)
    finally:
        kill9(first)
        if second is not None:
            stop(second)
        await nc.close()
    assert isinstance(done.event, ev.StepCompleted)
    assert "A1003" in json.dumps(done.event.data.output)
    nc2, js2 = await _reopen(fresh_server.url)
    try:
        entries = await Ledger(nc2, js2).read(cmd.task_id)
    finally:
        await nc2.close()
    starts = [e.event for e in entries if isinstance(e.event, ev.StepStarted)]
    assert len(starts) == 2
    assert starts[0].data.worker == started.event.data.worker
    assert starts[1].data.worker != starts[0].data.worker
    assert starts[1].data.delivery == 2
    assert sum(isinstance(e.event, ev.StepCompleted) for e in entries) == 1


async def test_a_step_longer_than_ack_wait_is_kept_and_not_redelivered(
        fresh_server: EmbeddedNats) -> None:
    """In-progress acks: a 2.4 s step under a 1 s ack_wait runs once, on its first
    delivery (without them JetStream would redeliver it and a second claim would land)."""
    settings = BusSettings(ack_wait_s=1)
    nc = await connect(fresh_server.url)
    js = jetstream(nc)
    worker = Worker(get_agent("support"), SimModel(latency_s=1.2), nc, js,
                    bus_settings=settings, replica="slow")
    await worker.start()
    try:
        cmd = await publish_step(js, "order_status", {"order_id": "A1002"})
        done = await wait_for_entry(worker.ledger, cmd.task_id, is_terminal_step, 30)
        entries = await worker.ledger.read(cmd.task_id)
    finally:
        await worker.stop()
        await nc.close()
    assert isinstance(done.event, ev.StepCompleted), done.event
    starts = [e.event for e in entries if isinstance(e.event, ev.StepStarted)]
    assert [(s.data.worker, s.data.delivery) for s in starts] == [("slow", 1)]
    assert sum(isinstance(e.event, ev.StepCompleted) for e in entries) == 1


async def _reopen(url: str):
    nc = await connect(url)
    return nc, jetstream(nc)


async def test_bad_step_commands_go_to_dead_letters_and_worker_keeps_serving(bus) -> None:
    spec = get_agent("orders")
    worker = Worker(spec, None, bus.nc, bus.js, replica="dlq")
    dlq = await bus.js.subscribe(
        subjects.dlq(subjects.STREAM_WORK, subjects.work_consumer("lookup_order")),
        ordered_consumer=True, deliver_policy=None)
    await worker.start()
    try:
        work = subjects.work("lookup_order")
        bad = {
            b"not json at all": "invalid step command",
            json.dumps({"task_id": "t1", "skill": "lookup_order"}).encode(): "invalid step command",
            ev.StepCommand(task_id="t1", step_id="x", skill="refund", input={}
                           ).model_dump_json().encode(): "has no skill 'refund'",
            ev.StepCommand(task_id="t1", step_id="big", skill="lookup_order",
                           input={"pad": "x" * 300_000}).model_dump_json().encode(): "exceeds",
        }
        marker = ev.new_id()
        for payload in bad:
            await bus.js.publish(work, payload.replace(b'"t1"', f'"{marker}"'.encode()))
        good = await publish_step(bus.js, "lookup_order", {"order_id": "A1004"})
        done = await wait_for_entry(bus.ledger, good.task_id, is_terminal_step)
        assert isinstance(done.event, ev.StepCompleted)
        letters: list[DeadLetter] = []
        while len(letters) < len(bad):
            msg = await dlq.next_msg(timeout=10)
            dl = DeadLetter.model_validate_json(msg.data)
            if dl.data.replace(marker.encode(), b"t1") in bad:
                letters.append(dl)
    finally:
        await dlq.unsubscribe()
        await worker.stop()
    reasons = {dl.data.replace(marker.encode(), b"t1"): dl.reason for dl in letters}
    for payload, expected in bad.items():
        assert expected in reasons[payload], (expected, reasons[payload])


async def test_sigterm_finishes_the_in_flight_step_then_exits(fresh_server: EmbeddedNats,
                                                              tmp_path: Path) -> None:
    env = {"NATS_URL": fresh_server.url, "JETMESH_SIM_LATENCY_MS": "800",
           "JETMESH_MODEL_PROVIDER": "sim", "JETMESH_DATA_DIR": str(tmp_path)}
    nc = await connect(fresh_server.url)
    js = jetstream(nc)
    await declare_streams(js)
    ledger = Ledger(nc, js)
    worker = spawn(["worker", "support"], env, tmp_path / "w.log")
    try:
        cmd = await publish_step(js, "order_status", {"order_id": "A1005"})
        await wait_for_entry(ledger, cmd.task_id, lambda e: isinstance(e.event, ev.StepStarted),
                             30)
        code = stop(worker, timeout=30)  # SIGTERM mid-step: drain, then exit
        entries = await ledger.read(cmd.task_id)
    finally:
        kill9(worker)
        await nc.close()
    assert code == 0, (tmp_path / "w.log").read_text()
    completed = [e.event for e in entries if isinstance(e.event, ev.StepCompleted)]
    assert len(completed) == 1, [e.event.type for e in entries]


def test_replay_ignores_records_a_stale_worker_wrote_after_losing_the_step() -> None:
    from jetmesh.agents.worker import replay_from
    from jetmesh.bus.ledger import LedgerEntry

    def started(worker: str) -> ev.StepStarted:
        return ev.StepStarted(subject="t", data=ev.StepStartedData(
            step_id="s", agent="a", worker=worker))

    def model(worker: str, text: str) -> ev.ModelCalled:
        return ev.ModelCalled(subject="t", data=ev.ModelCalledData(
            step_id="s", agent="a", worker=worker, provider="sim", model="m",
            response={"provider": "sim", "model": "m", "text": text}))

    def tool(worker: str, key: str) -> ev.ToolCalled:
        return ev.ToolCalled(subject="t", data=ev.ToolCalledData(
            step_id="s", agent="a", worker=worker, tool="x", call_id="c",
            idempotency_key=key))

    log = [started("A"), model("A", "a1"),            # A's claim, then A stalls
           started("B"), tool("B", "k1"), model("B", "b2"),   # B takes over, reuses a1
           tool("A", "k-zombie"), model("A", "zombie")]       # A wakes, writes, is fenced
    replay = replay_from([LedgerEntry(i + 1, "x", e) for i, e in enumerate(log)])
    assert [m.response["text"] for m in replay.model_responses] == ["a1", "b2"]
    assert set(replay.tool_results) == {"k1"}


def test_replay_marks_a_cleared_but_unrecorded_side_effect_in_doubt() -> None:
    from jetmesh.agents.policy import args_hash
    from jetmesh.agents.worker import replay_from
    from jetmesh.bus.ledger import LedgerEntry

    def decided(tool: str, args: dict, decision: str = "allow") -> ev.PolicyDecided:
        return ev.PolicyDecided(subject="t", data=ev.PolicyDecidedData(
            step_id="s", agent="a", tool=tool, args_hash=args_hash(tool, args),
            decision=decision, rule="r", reason="r"))

    def called(tool: str, args: dict) -> ev.ToolCalled:
        return ev.ToolCalled(subject="t", data=ev.ToolCalledData(
            step_id="s", agent="a", worker="A", tool=tool, call_id="c", arguments=args,
            side_effects=True, idempotency_key=f"k-{tool}"))

    started = ev.StepStarted(subject="t", data=ev.StepStartedData(
        step_id="s", agent="a", worker="A"))
    log = [started,
           decided("refund", {"id": 1}), called("refund", {"id": 1}),  # ran, recorded
           decided("email", {"to": "x"}),                              # cleared, no record
           decided("wire", {"usd": 9}, "deny")]                        # denied: never ran
    replay = replay_from([LedgerEntry(i + 1, "x", e) for i, e in enumerate(log)])
    assert replay.in_doubt == {("email", args_hash("email", {"to": "x"}))}
    assert set(replay.tool_results) == {"k-refund"}


async def test_a_duplicate_first_delivery_is_fenced_before_its_side_effect(
        bus, tmp_path: Path, monkeypatch) -> None:
    """The same step command published twice (re-sent past the dedup window) runs as two
    first deliveries at once, neither claiming first: the step's first fenced append
    (the side effect's policy decision, expected on an empty line) claims it, the other
    run is fenced out before its side effect, and its redelivery finds the result."""
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))
    from effects_agent import SPEC, EffectInput, record_effect

    from jetmesh.agents.spec import AgentSpec, SkillSpec

    effects = tmp_path / "effects.jsonl"
    monkeypatch.setenv("JETMESH_TEST_EFFECTS_FILE", str(effects))
    skill = "dup" + ev.new_id()[:8]
    spec = AgentSpec(name=skill, description=SPEC.description, instructions=SPEC.instructions,
                     tools=[record_effect],
                     skills=[SkillSpec.from_models(skill, "Effect", "One effect.",
                                                   input_model=EffectInput)])
    settings = BusSettings(ack_wait_s=1.0)
    conns = [await connect(bus.url) for _ in range(2)]
    workers = [Worker(spec, SimModel(), nc, jetstream(nc), replica=f"r{i}",
                      bus_settings=settings) for i, nc in enumerate(conns)]
    for w in workers:
        await w.start()
    try:
        cmd = ev.StepCommand(task_id=ev.new_id(), step_id="s1", skill=skill,
                             input={"label": "once"})
        data = cmd.model_dump_json().encode()
        await record_dispatch(bus.ledger, cmd)
        await asyncio.gather(bus.js.publish(subjects.work(skill), data),
                             bus.js.publish(subjects.work(skill), data))
        await wait_for_entry(bus.ledger, cmd.task_id, is_terminal_step)
        consumer = subjects.work_consumer(skill)
        async with asyncio.timeout(20):  # both commands settled (the loser's redelivery)
            while True:
                info = await bus.js.consumer_info(subjects.STREAM_WORK, consumer)
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    break
                await asyncio.sleep(0.1)  # polled: nothing signals "settled"
    finally:
        for w in workers:
            await w.stop()
        for nc in conns:
            await nc.close()
    entries = await bus.ledger.read(cmd.task_id)
    results = [e for e in entries if isinstance(e.event, ev.StepCompleted | ev.StepFailed)]
    assert len(results) == 1 and isinstance(results[0].event, ev.StepCompleted)
    assert len(effects.read_text().splitlines()) == 1, "the side effect ran twice"
    effect_calls = [e for e in entries if isinstance(e.event, ev.ToolCalled)
                    and e.event.data.side_effects]
    assert len(effect_calls) == 1
    starts = [e.event for e in entries if isinstance(e.event, ev.StepStarted)]
    assert [s.data.claim for s in starts].count(False) == 2  # both first deliveries


async def test_a_resent_command_of_a_finished_step_is_not_run_again(bus) -> None:
    """A command marked as resent (a redrive, a restarted orchestrator) is checked against
    the step's line even on its first delivery: a step with a result is skipped."""
    skill = "resent" + ev.new_id()[:8]
    spec = get_agent("support")
    from jetmesh.agents.spec import AgentSpec, SkillSpec
    mine = AgentSpec(name=skill, description=spec.description, instructions=spec.instructions,
                     tools=list(spec.tools),
                     skills=[SkillSpec(id=skill, name="Order", description="Order status.",
                                       input_schema=spec.skills[0].input_schema)])
    worker = Worker(mine, SimModel(), bus.nc, bus.js, replica="r1")
    await worker.start()
    try:
        cmd = ev.StepCommand(task_id=ev.new_id(), step_id="s1", skill=skill,
                             input={"order_id": "A1002"})
        await bus.ledger.append(ev.StepCompleted(subject=cmd.task_id, data=ev.StepCompletedData(
            step_id="s1", agent="someone", output={"answer": "done before"})),
            expected_last_subject_seq=0)
        await send_step(bus.ledger, cmd, headers={ev.RESENT_HEADER: "redrive"})
        async with asyncio.timeout(20):
            while True:
                info = await bus.js.consumer_info(subjects.STREAM_WORK,
                                                  subjects.work_consumer(skill))
                if info.delivered.stream_seq and info.num_ack_pending == 0 \
                        and info.num_pending == 0:
                    break
                await asyncio.sleep(0.05)  # polled: nothing signals "settled"
    finally:
        await worker.stop()
    types = [e.event.type for e in await bus.ledger.read(cmd.task_id)]
    assert types == ["jetmesh.step.completed.v1", "jetmesh.task.submitted.v1",
                     "jetmesh.step.dispatched.v1"], types
