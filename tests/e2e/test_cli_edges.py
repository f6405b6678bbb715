"""The CLI on hostile or conflicting input: a clear message and a non-zero exit, never a
traceback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from jetmesh.bus import events as ev
from jetmesh.bus import subjects


def jetmesh(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    return subprocess.run([sys.executable, "-m", "jetmesh.orchestrator.cli", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**env, "COLUMNS": "200"})


async def test_submit_of_an_existing_task_id_with_another_body_says_so(bus, tmp_path) -> None:
    tid = "cli-" + ev.new_id()[:12]
    first = await asyncio.to_thread(jetmesh, "submit", "first goal", "--task-id", tid,
                                    "--url", bus.url, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    again = await asyncio.to_thread(jetmesh, "submit", "another goal", "--task-id", tid,
                                    "--url", bus.url, cwd=tmp_path)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "exists" in again.stderr and "Traceback" not in again.stderr, again.stderr


async def test_dlq_show_of_a_message_that_is_not_a_letter_shows_its_bytes(bus, tmp_path) -> None:
    ack = await bus.js.publish(subjects.dlq(subjects.STREAM_WORK, "by-hand"), b"\xffnot a letter")
    res = await asyncio.to_thread(jetmesh, "dlq", "show", str(ack.seq), "--url", bus.url,
                                  cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "not a dead letter" in res.stderr and "not a letter" in res.stdout
    assert "Traceback" not in res.stderr
