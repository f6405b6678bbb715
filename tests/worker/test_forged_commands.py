"""A worker runs only step commands the ledger vouches for (issue 14, item 3).

Forged or orphaned commands on a work subject (a task that does not exist, a step never
dispatched, an input or skill that differs from the dispatch, a skill's command on
another skill's subject) are dead-lettered with the reason and run nothing: no refund
is issued, no ledger event is written for the step.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from helpers import record_dispatch, send_step, wait_for_entry

from jetmesh.agents.builtin import get_agent
from jetmesh.agents.models.sim import SimModel
from jetmesh.agents.worker import Worker
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.dlq import DeadLetter


@pytest.fixture
def refunds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("JETMESH_DATA_DIR", str(tmp_path))
    return tmp_path / "refunds.jsonl"


def no_refunds(path: Path) -> bool:
    return not path.exists() or path.read_text() == ""


async def letters_for(bus, consumer: str, want: int, marker: str) -> list[DeadLetter]:
    """The first `want` dead letters of `consumer` whose bytes carry `marker`."""
    sub = await bus.js.subscribe(subjects.dlq(subjects.STREAM_WORK, consumer),
                                 ordered_consumer=True, deliver_policy=None)
    out: list[DeadLetter] = []
    try:
        async with asyncio.timeout(30):
            while len(out) < want:
                msg = await sub.next_msg(timeout=30)
                dl = DeadLetter.model_validate_json(msg.data)
                if marker.encode() in dl.data:
                    out.append(dl)
    finally:
        await sub.unsubscribe()
    return out


async def test_forged_and_orphan_commands_are_dead_lettered_and_run_nothing(
        bus, refunds: Path) -> None:
    worker = Worker(get_agent("support"), SimModel(), bus.nc, bus.js, replica="forged")
    await worker.start()
    refund_input = {"order_id": "A1002", "amount_usd": 210.0, "reason": "forged"}
    try:
        # 1. A well-formed refund command for a task that does not exist.
        orphan = ev.StepCommand(task_id=ev.new_id(), step_id="s1", skill="refund",
                                input=refund_input)
        await bus.js.publish(subjects.work("refund"), orphan.model_dump_json().encode())
        # 2. A refund command published on the order_status subject (same agent), for a
        #    task and step the ledger shows dispatched to `refund`.
        wrong = ev.StepCommand(task_id=ev.new_id(), step_id="s1", skill="refund",
                               input=refund_input)
        await record_dispatch(bus.ledger, wrong)
        await bus.js.publish(subjects.work("order_status"), wrong.model_dump_json().encode())
        # 3. A real dispatch, but the command's input was changed (a bigger refund).
        real = ev.StepCommand(task_id=ev.new_id(), step_id="s1", skill="refund",
                              input={**refund_input, "amount_usd": 1.0})
        await record_dispatch(bus.ledger, real)
        tampered = real.model_copy(update={"input": refund_input})
        await bus.js.publish(subjects.work("refund"), tampered.model_dump_json().encode())
        # 4. A task that exists, a step that was never dispatched.
        undispatched = real.model_copy(update={"step_id": "s9"})
        await bus.js.publish(subjects.work("refund"), undispatched.model_dump_json().encode())

        on_refund = await letters_for(bus, subjects.work_consumer("refund"), 3, "forged")
        on_status = await letters_for(bus, subjects.work_consumer("order_status"), 1,
                                      "forged")
        # A genuine command still runs (the worker kept serving).
        good = await send_step(bus.ledger, ev.StepCommand(
            task_id=ev.new_id(), step_id="s1", skill="order_status",
            input={"order_id": "A1002"}))
        done = await wait_for_entry(bus.ledger, good.task_id,
                                    lambda e: isinstance(e.event, ev.StepCompleted))
        assert "A1002" in json.dumps(done.event.data.output)
    finally:
        await worker.stop()
    reasons = {json.loads(dl.data)["task_id"] + "/" + json.loads(dl.data)["step_id"]: dl.reason
               for dl in on_refund + on_status}
    assert "forged or orphaned" in reasons[f"{orphan.task_id}/s1"]
    assert "arrived on jm.work.order_status" in reasons[f"{wrong.task_id}/s1"]
    assert "differs from its dispatch" in reasons[f"{real.task_id}/s1"]
    assert "dispatch of step s9" in reasons[f"{real.task_id}/s9"]
    assert no_refunds(refunds), "a forged refund was issued"
    for tid in (orphan.task_id, wrong.task_id, real.task_id):
        steps = [e for e in await bus.ledger.read(tid) if subjects.task_events(tid) != e.subject]
        assert steps == [], f"a forged command wrote to {tid}: {steps}"


async def test_a_command_takes_its_budget_and_user_from_the_submission(bus, refunds) -> None:
    """A command cannot raise its own budget or act for another user: the worker takes
    both from the task's submission in the ledger."""
    worker = Worker(get_agent("support"), SimModel(), bus.nc, bus.js, replica="budget")
    await worker.start()
    try:
        cmd = ev.StepCommand(task_id=ev.new_id(), step_id="s1", skill="order_status",
                             input={"order_id": "A1002"}, user_id="alice",
                             budget=ev.Budget(max_usd=0.0))
        await record_dispatch(bus.ledger, cmd)
        forged = cmd.model_copy(update={"user_id": "mallory", "budget": None})
        await bus.js.publish(subjects.work("order_status"), forged.model_dump_json().encode())
        done = await wait_for_entry(bus.ledger, cmd.task_id,
                                    lambda e: isinstance(e.event, ev.StepCompleted
                                                         | ev.StepFailed))
    finally:
        await worker.stop()
    # The submission's $0 budget holds: the model call is refused before it is made.
    assert isinstance(done.event, ev.StepFailed), done.event
    assert done.event.data.code == "budget_exceeded"
    models = [e for e in await bus.ledger.read(cmd.task_id)
              if isinstance(e.event, ev.ModelCalled)]
    assert models == []
