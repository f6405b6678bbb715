"""Agents for the fault campaign (loaded by `jetmesh worker fault_agents:<NAME>`).

- FX_EFFECTS: a model-driven skill whose tool appends one line per *real* invocation to
  a file (a side effect the test can count), with the worker's pid and the call's
  idempotency key. Its `reconcile` looks the key up in that file, so a step resumed after
  a kill between the effect and its record does not run it again.
- POISON: a direct (no model) skill whose tool kills its own process (`os._exit(3)`)
  until a "fixed" marker file exists; the marker's path comes from the environment.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from pydantic import BaseModel

from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.agents.tools import ToolContext, tool

EFFECTS_ENV = "JETMESH_FAULT_EFFECTS_FILE"
POISON_FIXED_ENV = "JETMESH_FAULT_POISON_FIXED"


class FxInput(BaseModel):
    label: str


class FxOutput(BaseModel):
    recorded: str


def fx_recorded(args: FxInput, ctx: ToolContext) -> FxOutput | None:
    """The reconcile check: did the call with this idempotency key already take effect?
    (As a payments API answers a retried request by its idempotency key.)"""
    path = Path(os.environ[EFFECTS_ENV])
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if json.loads(line).get("key") == ctx.idempotency_key:
            return FxOutput(recorded=args.label)
    return None


@tool(description="Record a side effect (counts every real invocation).", side_effects=True,
      risk="write", reconcile=fx_recorded)
def fx_record(args: FxInput, ctx: ToolContext) -> FxOutput:
    line = json.dumps({"task": ctx.task_id, "step": ctx.step_id, "label": args.label,
                       "pid": os.getpid(), "key": ctx.idempotency_key})
    with Path(os.environ[EFFECTS_ENV]).open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")
    return FxOutput(recorded=args.label)


FX_EFFECTS = AgentSpec(
    name="fxeffects",
    description="Records side effects for the kill -9 campaign.",
    instructions="Call fx_record once with the label you are given, then confirm.",
    skills=[SkillSpec.from_models("fx_effect", "Effect", "Record one side effect.",
                                  input_model=FxInput)],
    tools=[fx_record],
)


class PoisonInput(BaseModel):
    item: str


class PoisonOutput(BaseModel):
    handled: str


@tool(description="Handle an item; crashes the process until the fix is deployed.")
def poison_handle(args: PoisonInput) -> PoisonOutput:
    if not Path(os.environ[POISON_FIXED_ENV]).exists():
        os._exit(3)  # the bug: takes the whole worker down, no ack, no nak
    return PoisonOutput(handled=args.item)


POISON = AgentSpec(
    name="poison",
    description="A worker with a crashing bug, for the dead-letter test.",
    skills=[SkillSpec.from_models("poison_step", "Handle", "Handle one item.",
                                  input_model=PoisonInput, output_model=PoisonOutput)],
    tools=[poison_handle],
    direct={"poison_step": "poison_handle"},
)
