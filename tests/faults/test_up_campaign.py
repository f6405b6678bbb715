"""The kill campaign under `jetmesh up` (issue 14): kill -9 a random process of the mesh
(nats-server included) every 0.5-2 s while tasks are submitted, then check that every
task whose submission was acknowledged ended, completed, with exactly one terminal event.

`up` runs as shipped (per-role NATS users), with two replicas of the support agent, a
short ack wait so a killed worker's step is redelivered quickly, and `--plain` output.
The CI run kills for 20 s; `-m slow` kills for `JETMESH_UP_CAMPAIGN_S` (default 120 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.credentials import credentials_in
from jetmesh.bus.ledger import Ledger
from jetmesh.orchestrator.state import TaskStatus, fold

ORDERS = ["A1001", "A1002", "A1003", "A1004"]


def running(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


class Up:
    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.data = cwd / ".jetmesh"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("NATS_", "JETMESH_"))}
        env.update({"PYTHONUNBUFFERED": "1", "JETMESH_ACK_WAIT_S": "4",
                    "JETMESH_TICK_S": "0.2", "JETMESH_MODEL_PROVIDER": "sim"})
        self.log = (cwd / "up.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jetmesh.orchestrator.cli", "up", "--port", "0",
             "--plain", "--agents", "support", "--replicas", "2", "--gateway-port", "0"],
            cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)

    def status(self) -> dict:
        try:
            return json.loads((self.data / "up.json").read_text())
        except (OSError, ValueError):
            return {}

    def pids(self) -> dict[str, int]:
        s = self.status()
        if not s.get("children"):
            return {}
        out = {"nats-server": int(s["nats"]["pid"])}
        out.update({n: int(c["pid"]) for n, c in s["children"].items() if c.get("pid")})
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for pid in self.pids().values():
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


async def wait_for(what: str, cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)  # polled: a file and /proc signal nothing


async def campaign(tmp_path: Path, kill_for_s: float) -> None:
    up = Up(tmp_path)
    try:
        await wait_for("up.json", lambda: bool(up.pids()), 90)
        creds = credentials_in(up.data, "admin")
        assert creds, "jetmesh up wrote no admin credentials"
        url = up.status()["url"]
        nc = await connect(url, user=creds["NATS_USER"], password=creds["NATS_PASSWORD"],
                           inbox_prefix=creds.get("NATS_INBOX_PREFIX") or "_INBOX")
        js = jetstream(nc)
        ledger = Ledger(nc, js, timeout_s=10)
        # The support agent is live: one task through before the kills start.
        acked: list[str] = []

        async def submit() -> None:
            sub = ev.TaskSubmission(goal="where are my orders?", workflow="fanout",
                                    input={"order_ids": random.sample(ORDERS, 3)})
            while True:  # the same id until JetStream acknowledges it
                try:
                    await js.publish(subjects.SUBMIT, sub.model_dump_json().encode(),
                                     headers={"Nats-Msg-Id": sub.task_id}, timeout=5)
                    acked.append(sub.task_id)
                    return
                except Exception:
                    await asyncio.sleep(0.5)

        await submit()
        await wait_terminal(ledger, acked, 120)

        kills: Counter[str] = Counter()
        rng = random.Random(14)
        stop_at = time.monotonic() + kill_for_s

        async def killer() -> None:
            while time.monotonic() < stop_at:
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                pids = up.pids()
                if not pids:
                    continue
                # The server first (every campaign kills it at least once), then anyone.
                name = "nats-server" if not kills else rng.choice(sorted(pids))
                if running(pids[name]):
                    os.kill(pids[name], signal.SIGKILL)
                    kills[name.split("-")[0] if name != "nats-server" else name] += 1

        async def submitter() -> None:
            while time.monotonic() < stop_at:
                await submit()
                await asyncio.sleep(0.3)

        await asyncio.gather(killer(), submitter())
        assert up.proc.poll() is None, "jetmesh up itself died"
        states = await wait_terminal(ledger, acked, 240)
        await nc.close()
    finally:
        up.stop()
    ends = Counter(len(s[1]) for s in states.values())
    status = Counter(s[0].status.value for s in states.values())
    print(f"\nup campaign: {kill_for_s:.0f} s of kill -9 ({sum(kills.values())} kills: "
          f"{dict(kills)}), {len(acked)} tasks acknowledged: {dict(status)}; "
          f"terminal events per task: {dict(ends)}")
    assert kills["nats-server"] >= 1
    failed = {t: (s.status, s.code, s.reason) for t, (s, _) in states.items()
              if s.status is not TaskStatus.COMPLETED}
    assert failed == {}, failed
    assert ends == Counter({1: len(acked)}), ends


async def wait_terminal(ledger: Ledger, ids: list[str], timeout: float):
    """Every task terminal (re-reading as the mesh recovers); returns id -> (fold,
    terminal events)."""
    deadline = time.monotonic() + timeout
    out: dict[str, tuple] = {}
    while True:
        for tid in ids:
            if tid in out:
                continue
            try:
                entries = await ledger.read(tid)
            except Exception:
                continue  # the server is restarting
            state = fold(tid, entries)
            if state.terminal:
                out[tid] = (state, [e for e in entries
                                    if isinstance(e.event, ev.TERMINAL_TASK_EVENTS)])
        if len(out) == len(ids):
            # A second terminal event may land after the first: read once more.
            for tid in ids:
                entries = await ledger.read(tid)
                out[tid] = (fold(tid, entries), [e for e in entries if isinstance(
                    e.event, ev.TERMINAL_TASK_EVENTS)])
            return out
        if time.monotonic() > deadline:
            missing = [t for t in ids if t not in out]
            raise AssertionError(f"{len(missing)} of {len(ids)} tasks never ended: "
                                 f"{missing[:5]}")
        await asyncio.sleep(0.5)


@pytest.mark.timeout(600)
async def test_kill_9_under_up_loses_and_fails_nothing(tmp_path: Path) -> None:
    await campaign(tmp_path, kill_for_s=20)


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_kill_9_campaign_under_up(tmp_path: Path) -> None:
    await campaign(tmp_path, kill_for_s=float(os.environ.get("JETMESH_UP_CAMPAIGN_S", "120")))
