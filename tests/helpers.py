"""Test helpers: wait for ledger events (no sleeps), run jetmesh roles as subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.ledger import Ledger, LedgerEntry


async def wait_for_entry(
    ledger: Ledger, task_id: str, pred: Callable[[LedgerEntry], bool], timeout: float = 20.0,
    from_seq: int = 1,
) -> LedgerEntry:
    """Follow the task's events (its steps' logs too) until one matches `pred`."""
    async def scan() -> LedgerEntry:
        async for entry in ledger.follow(task_id, from_seq=from_seq, logs=True):
            if pred(entry):
                return entry
        raise AssertionError("follow ended")
    return await asyncio.wait_for(scan(), timeout)


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start `jetmesh <args>` as a child process in its own process group."""
    with log.open("ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "jetmesh.orchestrator.cli", *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, stdout=f,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=log.parent)


def kill9(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


async def record_dispatch(ledger: Ledger, cmd: ev.StepCommand, **submitted: object) -> None:
    """Put in the ledger what the orchestrator writes before it sends `cmd`: the task's
    submission and the step's dispatch (workers run only commands the ledger vouches for).
    Idempotent: the event ids are the orchestrator's deterministic ones."""
    await ledger.append_many([
        ev.TaskSubmitted(id=f"{cmd.task_id}-submitted", subject=cmd.task_id,
                         data=ev.TaskSubmittedData(user_id=cmd.user_id, budget=cmd.budget,
                                                   **submitted)),  # type: ignore[arg-type]
        ev.StepDispatched(id=f"{cmd.task_id}-{cmd.step_id}-dispatch-{cmd.attempt}",
                          subject=cmd.task_id, data=ev.StepDispatchedData(
                              step_id=cmd.step_id, skill=cmd.skill, input=cmd.input,
                              attempt=cmd.attempt)),
    ])


async def send_step(ledger: Ledger, cmd: ev.StepCommand,
                    headers: dict[str, str] | None = None) -> ev.StepCommand:
    """Record the dispatch of `cmd`, then publish it on its skill's work subject."""
    await record_dispatch(ledger, cmd)
    await ledger.js.publish(subjects.work(cmd.skill), cmd.model_dump_json().encode(),
                            headers=headers)
    return cmd
