"""`jetmesh up` supervises every process, its nats-server too, and always stops them all.

- The restart backoff (pure policy): exponential in crashes in a row, back to the base
  delay after a healthy run.
- `stop_children`: SIGTERM, then SIGKILL after the grace, whatever is already dead.
- Under a real `jetmesh up` (per-role users, the default): nats-server killed with
  SIGKILL comes back on the same port and data, the roles reconnect with their own
  users, and a task submitted afterwards completes; Ctrl-C after nats-server died
  leaves no child running (checked by pid in /proc; psutil is not assumed).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jetmesh.orchestrator.cli.up import Backoff, Child, stop_children


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


def processes_of(data_dir: Path) -> list[int]:
    """Live processes started for `data_dir`: nats-server (its config is in there) and
    the children (JETMESH_DATA_DIR in their environment)."""
    mark = str(data_dir.resolve()).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if mark in blob and running(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_until(what: str, cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if callable(cond) and cond():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- pure policy


def test_backoff_grows_in_a_crash_loop_and_resets_after_a_healthy_run() -> None:
    b = Backoff(base_s=0.5, max_s=30.0, healthy_s=10.0)
    delays, crashes = [], 0
    for _ in range(9):  # each run dies after 1 s
        delay, crashes = b.after_exit(crashes, ran_s=1.0)
        delays.append(delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    # A child that stayed up longer than `healthy_s` restarts at the base delay...
    delay, crashes = b.after_exit(crashes, ran_s=10.5)
    assert (delay, crashes) == (0.5, 1)
    # ... and a new crash loop climbs from there, not from where the last one stopped.
    delay, crashes = b.after_exit(crashes, ran_s=0.2)
    assert (delay, crashes) == (1.0, 2)
    assert b.after_exit(10**6, ran_s=0.0)[0] == 30.0  # no overflow


# ----------------------------------------------------------------------------- stopping


def _proc(tmp_path: Path, name: str, code: str) -> Child:
    log = tmp_path / f"{name}.log"
    child = Child(name, [], log, dict(os.environ))
    child.proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return child


def test_stop_children_stops_every_child_whatever_state_it_is_in(tmp_path: Path) -> None:
    ready = tmp_path / "stubborn.ready"
    polite = _proc(tmp_path, "polite", "import time; time.sleep(600)")
    stubborn = _proc(tmp_path, "stubborn", (
        "import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(600)"))
    dead = _proc(tmp_path, "dead", "pass")
    never = Child("never-started", [], tmp_path / "x.log", {})
    assert dead.proc is not None
    dead.proc.wait(10)
    wait_until("the stubborn child to ignore SIGTERM", ready.exists, 10)
    t0 = time.monotonic()
    stop_children([polite, stubborn, dead, never], grace_s=1.0)
    assert time.monotonic() - t0 < 8
    for c in (polite, stubborn, dead):
        assert c.proc is not None and not running(c.proc.pid), c.name
    assert polite.proc is not None and polite.proc.returncode == -signal.SIGTERM
    assert stubborn.proc is not None and stubborn.proc.returncode == -signal.SIGKILL


# ----------------------------------------------------------------------------- a real `up`


def jetmesh(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NATS_URL", "NATS_USER", "NATS_PASSWORD", "NATS_INBOX_PREFIX")}
    return subprocess.run([sys.executable, "-m", "jetmesh.orchestrator.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**env, "COLUMNS": "200"})


@dataclass
class Up:
    proc: subprocess.Popen[str]
    cwd: Path

    @property
    def data_dir(self) -> Path:
        return self.cwd / ".jetmesh"

    def status(self) -> dict[str, object]:
        try:
            data: dict[str, object] = json.loads((self.data_dir / "up.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data

    def pids(self) -> dict[str, int]:
        s = self.status()
        out = {"nats-server": int(s["nats"]["pid"])}  # type: ignore[index]
        out.update({n: int(c["pid"]) for n, c in s["children"].items()})  # type: ignore[attr-defined]
        return out

    def stop(self, timeout: float = 60) -> str:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
        out, _ = self.proc.communicate(timeout=timeout)
        return out


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NATS_URL", "NATS_USER", "NATS_PASSWORD", "NATS_INBOX_PREFIX")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jetmesh.orchestrator.cli", "up", "--port", "0", "--plain",
         "--agents", "orders", "--gateway-port", "0"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**env, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    u = Up(proc, tmp_path)
    try:
        wait_until("up.json", lambda: u.status().get("children"), 60)
        yield u
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        for pid in u.pids().values() if u.status() else []:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def agents_live(u: Up) -> bool:
    res = jetmesh("agents", cwd=u.cwd, timeout=30)
    return res.returncode == 0 and "orders" in res.stdout


def test_up_runs_every_role_as_its_own_user_and_comes_back_after_nats_is_killed(
        up: Up) -> None:
    # Least privilege by default: the users are in the data directory, owner-only.
    for name in ("nats-auth.conf", "nats-auth.env"):
        mode = stat.S_IMODE((up.data_dir / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    conf = (up.data_dir / "nats" / "nats-server.conf").read_text()
    assert 'include "../nats-auth.conf"' in conf and "password" not in conf
    # The CLI finds the admin's credentials in the data directory.
    wait_until("the orders agent to be live", lambda: agents_live(up), 60)

    first = up.pids()["nats-server"]
    os.kill(first, signal.SIGKILL)
    wait_until("nats-server to be restarted",
               lambda: up.pids().get("nats-server") not in (None, first)
               and running(up.pids()["nats-server"]), 40)
    wait_until("the orders agent to be live again", lambda: agents_live(up), 60)
    res = jetmesh("submit", "lookup", "--workflow", "skill:lookup_order",
                  "--input", json.dumps({"order_id": "A1001"}), "--wait", cwd=up.cwd)
    assert res.returncode == 0 and "completed" in res.stdout, res.stdout + res.stderr
    # Nothing any role did was refused by its permissions.
    log = (up.data_dir / "nats" / "nats-server.log").read_text(errors="replace")
    assert "Violation" not in log, [x for x in log.splitlines() if "Violation" in x][:5]
    pids = up.pids()
    out = up.stop()
    assert up.proc.returncode == 0, out
    assert "stopped" in out and "restarting in" in out
    assert [n for n, pid in pids.items() if running(pid)] == []
    assert processes_of(up.data_dir) == []


def test_shutdown_after_nats_died_leaves_no_child_running(up: Up) -> None:
    """nats-server killed and kept from coming back (its port taken): Ctrl-C still stops
    every child. (Before, `up` crashed in its own connection's close and left them.)"""
    pids = up.pids()
    children = {n: p for n, p in pids.items() if n != "nats-server"}
    assert children and all(running(p) for p in children.values())
    port = int(str(up.status()["url"]).rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 30
        while True:  # `up` restarts the server within a fraction of a second: kill it
            nats = up.pids()["nats-server"]  # and take its port until the bind wins
            if running(nats):
                os.kill(nats, signal.SIGKILL)
                wait_until("nats-server to die", lambda p=nats: not running(p), 10)
            try:
                squatter.bind(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline, "never got nats-server's port"
        squatter.listen()
        # Two restarts tried and failed: the server has been gone a while, the roles'
        # and up's own connections are reconnecting.
        wait_until("two failed restarts of nats-server",
                   lambda: int(up.status().get("nats", {}).get("restarts", 0)) >= 2,  # type: ignore[attr-defined]
                   30)
        latest = up.pids()
        out = up.stop()
    assert up.proc.returncode == 0, out[-3000:]
    assert "stopped" in out and "did not start again" in out, out[-3000:]
    left = {n: p for n, p in [*pids.items(), *latest.items()] if running(p)}
    assert left == {}, (left, out[-2000:])
    assert processes_of(up.data_dir) == [], out[-2000:]
    assert not (up.data_dir / "up.json").exists()
    assert not (up.data_dir / "nats" / "url").exists()


# ----------------------------------------------------------------------------- credentials


def test_cli_commands_find_their_own_roles_credentials_in_the_data_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command run against a `jetmesh up` mesh logs in as its own role: the operator's
    commands as admin, approve/deny as the approver, a role's process as that role."""
    import click

    from jetmesh.orchestrator.cli.nats_config import use_data_dir_credentials, write_data_dir_auth

    auth, conf, env = write_data_dir_auth(tmp_path, {"orders": ["lookup_order"]})
    assert stat.S_IMODE(conf.stat().st_mode) == stat.S_IMODE(env.stat().st_mode) == 0o600
    again, _, _ = write_data_dir_auth(tmp_path, {"orders": ["lookup_order"]})
    assert again.passwords == auth.passwords  # kept across runs: restarted children log in
    cases = [("submit", {}, "admin"), ("approve", {}, "approver"), ("deny", {}, "approver"),
             ("orchestrator", {}, "orchestrator"), ("gateway", {}, "gateway"),
             ("worker", {"agent": "orders"}, "agent-orders")]
    for command, params, user in cases:
        for var in ("NATS_USER", "NATS_PASSWORD", "NATS_INBOX_PREFIX", "NATS_CREDS"):
            monkeypatch.delenv(var, raising=False)
        with click.Context(click.Command(command), info_name=command) as ctx:
            ctx.params = dict(params)
            assert use_data_dir_credentials(tmp_path)
        assert os.environ["NATS_USER"] == user, command
        assert os.environ["NATS_PASSWORD"] == auth.passwords[user]
        assert os.environ["NATS_INBOX_PREFIX"] == auth.user(user).inbox_prefix
    # Credentials already in the environment win.
    monkeypatch.setenv("NATS_USER", "someone")
    assert not use_data_dir_credentials(tmp_path, "admin")
    assert os.environ["NATS_USER"] == "someone"


def test_up_that_fails_to_start_leaves_nothing_running(tmp_path: Path) -> None:
    """An exception after nats-server started (here: a JM_WORK stream from elsewhere whose
    retention cannot be changed) still stops the server: `up` exits non-zero, with the
    reason, and nothing of it runs on."""
    import asyncio

    from nats.js.api import RetentionPolicy, StreamConfig

    from jetmesh.bus.connection import connect, jetstream
    from jetmesh.bus.server import EmbeddedNats

    data = tmp_path / ".jetmesh"
    server = EmbeddedNats(data_dir=data / "nats").start()

    async def conflicting() -> None:
        nc = await connect(server.url)
        await jetstream(nc).add_stream(StreamConfig(
            name="JM_WORK", subjects=["jm.work.>"], retention=RetentionPolicy.LIMITS))
        await nc.close()

    asyncio.run(conflicting())
    server.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    res = subprocess.run(
        [sys.executable, "-m", "jetmesh.orchestrator.cli", "up", "--port", "0", "--plain",
         "--agents", "orders", "--gateway-port", "0"], cwd=tmp_path, capture_output=True,
        text=True, timeout=60, env=env)
    assert res.returncode != 0 and "JM_WORK" in res.stdout + res.stderr, res
    assert "stopped" in res.stdout
    assert processes_of(data) == []
    assert not (data / "nats" / "url").exists()
