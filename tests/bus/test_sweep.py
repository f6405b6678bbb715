"""Step commands on a work subject no consumer takes are dead-lettered, not kept forever."""

from __future__ import annotations

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.dlq import DeadLetter
from jetmesh.bus.streams import ensure_consumer, pull_consumer_config
from jetmesh.bus.sweep import UNCONSUMED, sweep_unconsumed


async def test_unconsumed_work_goes_to_dead_letters_and_served_work_stays(bus) -> None:
    served = "swept" + ev.new_id()[:8]
    nobody = "nobody" + ev.new_id()[:8]
    await ensure_consumer(bus.js, subjects.STREAM_WORK, pull_consumer_config(
        subjects.work_consumer(served), subjects.work(served)))
    kept = await bus.js.publish(subjects.work(served), b'{"kept": true}')
    orphan = await bus.js.publish(subjects.work(nobody), b'{"task_id": "t-orphan"}')

    # Too young: a consumer for a new skill may be on its way.
    assert await sweep_unconsumed(bus.js, older_than_s=3600) == []
    moved = await sweep_unconsumed(bus.js, older_than_s=0)
    assert [(m.subject, m.seq) for m in moved] == [(subjects.work(nobody), orphan.seq)]
    # Idempotent: a second sweep (another orchestrator replica) finds nothing.
    assert await sweep_unconsumed(bus.js, older_than_s=0) == []

    letters = []
    seq = 0
    while True:
        try:
            raw = await bus.js.get_msg(subjects.STREAM_DLQ, seq=seq + 1, next=True,
                                       subject=subjects.dlq(subjects.STREAM_WORK, UNCONSUMED))
        except Exception:
            break
        seq = raw.seq
        letters.append(DeadLetter.model_validate_json(raw.data))
    mine = [dl for dl in letters if dl.stream_seq == orphan.seq]
    assert len(mine) == 1
    assert mine[0].data == b'{"task_id": "t-orphan"}'
    assert "no consumer takes" in mine[0].reason and mine[0].subject == subjects.work(nobody)
    # The served skill's message is still in the work stream.
    still = await bus.js.get_msg(subjects.STREAM_WORK, kept.seq)
    assert still.data == b'{"kept": true}'


async def test_the_orchestrator_sweeps_unconsumed_work(bus) -> None:
    import asyncio

    from jetmesh.agents.models.sim import SimModel
    from jetmesh.bus.connection import connect, jetstream
    from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings

    nc = await connect(bus.url)
    orch = Orchestrator(nc, jetstream(nc), model=SimModel(), use_registry=False,
                        settings=OrchestratorSettings(tick_s=3600, sweep_s=0.1,
                                                      sweep_after_s=0))
    dlq = await bus.js.subscribe(subjects.dlq(subjects.STREAM_WORK, UNCONSUMED),
                                 ordered_consumer=True)
    await orch.start()
    try:
        nobody = "nobody" + ev.new_id()[:8]
        ack = await bus.js.publish(subjects.work(nobody), b"left behind")
        async with asyncio.timeout(20):
            while True:
                dl = DeadLetter.model_validate_json((await dlq.next_msg(timeout=20)).data)
                if dl.stream_seq == ack.seq:
                    break
        assert dl.data == b"left behind"
    finally:
        await dlq.unsubscribe()
        await orch.stop()
        await nc.close()


async def test_a_step_for_a_skill_whose_agents_are_not_up_yet_waits_and_is_not_swept(
        bus) -> None:
    import asyncio

    from jetmesh.agents.builtin import get_agent
    from jetmesh.agents.models.sim import SimModel
    from jetmesh.agents.spec import AgentSpec
    from jetmesh.agents.worker import Worker
    from jetmesh.bus.connection import connect, jetstream
    from jetmesh.orchestrator.client import Client
    from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings
    from jetmesh.orchestrator.state import TaskStatus

    skill = "late" + ev.new_id()[:8]
    orders = get_agent("orders")
    spec = AgentSpec(name=skill, description="Comes up late.", tools=orders.tools,
                     skills=[orders.skills[0].model_copy(update={"id": skill})],
                     direct={skill: orders.direct[orders.skills[0].id]})
    nc = await connect(bus.url)
    orch = Orchestrator(nc, jetstream(nc), model=SimModel(),
                        settings=OrchestratorSettings(tick_s=0.1, sweep_s=0))
    await orch.start()
    client = Client(bus.url)
    await client.connect()
    worker = None
    try:
        tid = await client.submit("look it up", workflow=f"skill:{skill}",
                                  input={"order_id": "A1001"})
        async with asyncio.timeout(20):
            async for entry in client.follow(tid, until_done=False):
                if isinstance(entry.event, ev.StepDispatched):
                    break
        # Nobody serves the skill yet, but its consumer exists: the sweep leaves it.
        assert [m for m in await sweep_unconsumed(bus.js, older_than_s=0)
                if m.subject == subjects.work(skill)] == []
        wnc = await connect(bus.url)
        worker = Worker(spec, None, wnc, jetstream(wnc), replica="late")
        await worker.start()
        state = await client.result(tid, timeout=30)
        assert state.status is TaskStatus.COMPLETED, (state.status, state.reason)
    finally:
        if worker is not None:
            await worker.stop()
            await worker.nc.close()
        await orch.stop()
        await nc.close()
        await client.close()
