"""Send a step of a tenant's task: the submission in the ledger names the tenant (the
worker takes a step's tenant from the submission, never from the command)."""

from __future__ import annotations

from helpers import record_dispatch

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.ledger import Ledger


async def send_tenant_step(ledger: Ledger, cmd: ev.StepCommand) -> ev.StepCommand:
    await record_dispatch(ledger, cmd, tenant=cmd.tenant)
    await ledger.js.publish(subjects.work(cmd.skill), cmd.model_dump_json().encode())
    return cmd
