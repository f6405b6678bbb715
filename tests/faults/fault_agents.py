"""Agents for the fault campaign (loaded by `jetmesh worker fault_agents:<NAME>`).

- FX_EFFECTS: a model-driven skill whose tool appends one line per *real* invocation to
  a file (a side effect the test can count), with the worker's pid and the call's
  idempotency key. Its `reconcile` looks the key up in that file, so a step resumed after
  a kill between the effect and its record does not run it again.
- FX_PAUSE: a direct skill whose side-effecting tool stops its own process (SIGSTOP)
  at a chosen point, once per call, for the zombie campaign.
- POISON: a direct (no model) skill whose tool kills its own process (`os._exit(3)`)
  until a "fixed" marker file exists; the marker's path comes from the environment.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path
from typing import Literal

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


# --------------------------------------------------------------------------- zombies

PAUSE_DIR_ENV = "JETMESH_FAULT_PAUSE_DIR"
"""Where FX_PAUSE leaves one marker per (call, point) it paused at, holding its pid."""

PausePoint = Literal["none", "before_check", "in_window", "after_effect"]


class PauseInput(BaseModel):
    label: str
    point: PausePoint = "none"
    """Where the first replica to reach it stops itself (SIGSTOP): in the tool's own work
    before its claim check, between the check and the effect (the window no check can
    close), or after the effect before its record."""
    dedupe: bool = False
    """The effect's backend honours the idempotency key (as a payments API does)."""


def _pause_once(args: PauseInput, ctx: ToolContext, point: str) -> None:
    """SIGSTOP this whole process the first time any replica reaches `point` for this
    call; the test sends SIGCONT once the step was taken over and finished."""
    if args.point != point:
        return
    marker = Path(os.environ[PAUSE_DIR_ENV]) / f"{ctx.idempotency_key}.{point}"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # paused once already: the replica that took over goes on
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGSTOP)
    # The stop is delivered to the whole process asynchronously: without a pause here
    # this thread can run on past `point` before it lands.
    time.sleep(0.2)


@tool(description="Record a side effect, pausing where told.", side_effects=True,
      risk="write", reconcile=fx_recorded)
def fx_pause_record(args: PauseInput, ctx: ToolContext) -> FxOutput:
    _pause_once(args, ctx, "before_check")
    ctx.begin_effect_blocking()  # ClaimLost if another replica holds the step now
    checked = time.perf_counter()
    _pause_once(args, ctx, "in_window")
    if args.point == "in_window":
        checked = time.perf_counter()  # the window measured is the code's, not the pause
    with Path(os.environ[EFFECTS_ENV]).open("a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        if args.dedupe and any(json.loads(x).get("key") == ctx.idempotency_key
                               for x in f.read().splitlines()):
            return FxOutput(recorded=args.label)
        window_us = (time.perf_counter() - checked) * 1e6
        f.write(json.dumps({"task": ctx.task_id, "step": ctx.step_id, "label": args.label,
                            "pid": os.getpid(), "key": ctx.idempotency_key,
                            "window_us": window_us}) + "\n")
    _pause_once(args, ctx, "after_effect")
    return FxOutput(recorded=args.label)


FX_PAUSE = AgentSpec(
    name="fxpause",
    description="Records side effects and pauses itself where told, for the zombie campaign.",
    skills=[SkillSpec.from_models("fx_pause", "Effect", "Record one side effect.",
                                  input_model=PauseInput, output_model=FxOutput)],
    tools=[fx_pause_record],
    direct={"fx_pause": "fx_pause_record"},
)
