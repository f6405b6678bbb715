"""A test agent whose tool counts every real invocation (a side effect) in a file."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from pydantic import BaseModel

from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.agents.tools import ToolContext, tool


class EffectInput(BaseModel):
    label: str


class EffectOutput(BaseModel):
    recorded: str


def effects_file() -> Path:
    return Path(os.environ["JETMESH_TEST_EFFECTS_FILE"])


@tool(description="Record a side effect (counts every real invocation).", side_effects=True,
      risk="write")
def record_effect(args: EffectInput, ctx: ToolContext) -> EffectOutput:
    line = json.dumps({"task": ctx.task_id, "step": ctx.step_id, "label": args.label})
    with effects_file().open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")
    return EffectOutput(recorded=args.label)


SPEC = AgentSpec(
    name="effects",
    description="Records side effects for crash tests.",
    instructions="Call record_effect once with the label you are given, then confirm.",
    skills=[SkillSpec.from_models("effect", "Effect", "Record one side effect.",
                                  input_model=EffectInput)],
    tools=[record_effect],
)
