"""An agent private to a tenant: its registry entry says so and its worker runs no other
tenant's step (the tenant is the submission's, not the command's)."""

from __future__ import annotations

import dataclasses
import json

from helpers import wait_for_entry
from tenant_helpers import send_tenant_step

from jetmesh.agents.builtin import get_agent
from jetmesh.agents.worker import Worker
from jetmesh.bus import events as ev
from jetmesh.bus import subjects


async def test_a_private_agent_serves_only_its_tenant(bus) -> None:
    spec = dataclasses.replace(get_agent("orders"), name="orders-t-a", tenants=["t-a"])
    worker = Worker(spec, None, bus.nc, bus.js, replica="priv-1")
    await worker.start()
    try:
        kv = await bus.js.key_value(subjects.BUCKET_AGENTS)
        entry = json.loads((await kv.get("orders-t-a.priv-1")).value or b"{}")
        assert entry["tenants"] == ["t-a"]
        ends = {}
        for tenant in ("t-a", "t-b", None):
            cmd = ev.StepCommand(task_id=ev.new_id(), step_id="s1", skill="lookup_order",
                                 input={"order_id": "A1002"}, tenant=tenant)
            await send_tenant_step(bus.ledger, cmd)
            done = await wait_for_entry(bus.ledger, cmd.task_id, lambda e: isinstance(
                e.event, ev.StepCompleted | ev.StepFailed))
            ends[tenant] = done.event
        assert isinstance(ends["t-a"], ev.StepCompleted), ends["t-a"]
        for other in ("t-b", None):
            e = ends[other]
            assert isinstance(e, ev.StepFailed) and e.data.code == "forbidden", e
    finally:
        await worker.stop()
