"""Push notifications from real gateway processes killed with SIGKILL (kill -9).

A gateway restarted after kill -9, and two gateways sharing the delivery lease with the
holder killed mid-stream (while the webhook holds one of its POSTs open): the webhook gets
every ledger event, in order, with no gap; the one event repeated is the one in flight
when the gateway died (the documented contract: receivers drop it by
``metadata.jetmesh.seq``), and nothing else is ever sent twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from a2a.client import ClientConfig, create_client
from a2a.types import TaskPushNotificationConfig, TaskState
from a2a.utils.constants import TransportProtocol
from a2a_mesh import Mesh
from a2a_support import Bus, ledger_seqs, until
from nats.js.errors import KeyNotFoundError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from test_a2a_followup import REFUNDER, message, refund_then_answer, send

from jetmesh.a2a.gateway import GatewaySettings, _quiet_server
from jetmesh.a2a.push import Lease
from jetmesh.agents.builtin import get_agent
from jetmesh.agents.models.sim import FunctionModel
from jetmesh.bus import subjects
from jetmesh.orchestrator.client import Client

LEASE_S = 3.0
JETMESH = Path(sys.executable).parent / "jetmesh"


@pytest.fixture(scope="module")
async def mesh(a2a_bus: Bus, tmp_path_factory: pytest.TempPathFactory
               ) -> AsyncIterator[Mesh]:
    """Orchestrator and agents in process; its own gateway delivers no pushes (the
    gateway processes of the tests do)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JETMESH_DATA_DIR", str(tmp_path_factory.mktemp("refunds")))
        m = Mesh(a2a_bus.url, [get_agent("orders"), REFUNDER],
                 models={"refunder": FunctionModel(refund_then_answer)},
                 gateway_settings=GatewaySettings(port=0, agent_ttl_s=3,
                                                  push_delivery=False))
        await m.start()
        yield m
        await m.stop()


class Webhook:
    """Records every POST it receives; with `hold` set, keeps the first POST of a later
    sequence open (recorded, unanswered) until `release` is set."""

    def __init__(self) -> None:
        self.got: list[int] = []
        self.hold: int | None = None
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

        async def hook(request: Request) -> Response:
            (item,) = json.loads(await request.body()).values()
            seq = int(item["metadata"]["jetmesh"]["seq"])
            self.got.append(seq)
            if self.hold is not None and seq > self.hold and not self.holding.is_set():
                self.holding.set()
                await self.release.wait()
            return Response(status_code=204)

        self.app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    async def __aenter__(self) -> Webhook:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
        self.server = _quiet_server(uvicorn.Config(self.app, log_level="warning",
                                                   lifespan="off"))
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]))
        await until(lambda: self.server.started, 10, "the webhook")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        self.server.should_exit = True
        await self.task


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class GatewayProcess:
    """``jetmesh gateway`` as a subprocess of its own (its own process group)."""

    def __init__(self, nats_url: str, gateway_id: str, workdir: Path,
                 port: int | None = None) -> None:
        self.nats_url, self.id, self.workdir = nats_url, gateway_id, workdir
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> Path:
        env = {**os.environ, "NATS_URL": self.nats_url, "PYTHONUNBUFFERED": "1",
               "JETMESH_DATA_DIR": str(self.workdir), "JETMESH_GATEWAY_ID": self.id,
               "JETMESH_GATEWAY_PUSH_LEASE_S": str(LEASE_S),
               "JETMESH_GATEWAY_PUSH_PRIVATE_URLS": "true", "JETMESH_GATEWAY_AGENT_TTL_S": "3"}
        log = self.workdir / f"gateway-{self.id}.log"
        with log.open("ab") as f:
            self.proc = subprocess.Popen(
                [str(JETMESH), "gateway", "--port", str(self.port)], env=env, stdout=f,
                stderr=subprocess.STDOUT, start_new_session=True,
                cwd=self.workdir)  # not the repo root: its a2a/ folder would shadow the SDK
        return log

    async def start(self) -> GatewayProcess:
        """Start it; returns once it serves its card."""
        log = self._spawn()
        assert self.proc is not None
        async with httpx.AsyncClient(timeout=2) as http:
            deadline = time.monotonic() + 60
            while True:
                assert self.proc.poll() is None, log.read_text()
                try:
                    if (await http.get(f"{self.url}/.well-known/agent-card.json")
                            ).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the gateway process did not answer"
                await asyncio.sleep(0.1)

    def kill9(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()


class PushBucket:
    """The lease and the cursors, read as the tests' observable state."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def _value(self, key: str) -> bytes | None:
        kv = await self.bus.js.key_value(subjects.BUCKET_A2A_PUSH)
        try:
            value: bytes | None = (await kv.get(key)).value
            return value
        except KeyNotFoundError:
            return None

    async def holder(self) -> str | None:
        raw = await self._value("lease")
        return Lease.model_validate_json(raw).holder if raw else None

    async def cursor(self, task_id: str) -> int:
        raw = await self._value(f"cur.{task_id}.{task_id}")
        return int(raw.split()[0]) if raw else 0


async def until_async(check: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def _send_with_push(gateway_url: str, hook: Webhook) -> str:
    push = TaskPushNotificationConfig(url=hook.url, token="tok")
    async with httpx.AsyncClient(timeout=60) as http:
        client = await create_client(gateway_url, client_config=ClientConfig(
            streaming=False, supported_protocol_bindings=[TransportProtocol.JSONRPC],
            httpx_client=http))
        async with client:
            task = await send(client, message(data={"question": "refund"}, skill="refund"),
                              task_push_notification_config=push)
    assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
    return str(task.id)


def _once_but(got: list[int], ledger: list[int], repeated: int) -> None:
    """`got` is the ledger in order, with `repeated` (and only it) sent twice in a row."""
    i = ledger.index(repeated)
    assert got == [*ledger[:i + 1], repeated, *ledger[i + 1:]], (got, ledger)


async def test_a_gateway_killed_with_sigkill_and_restarted_delivers_every_event(
        mesh: Mesh, a2a_bus: Bus, tmp_path: Path) -> None:
    bucket = PushBucket(a2a_bus)
    gw = await GatewayProcess(mesh.url, "gw-restart", tmp_path).start()
    try:
        await until_async(lambda: _is(bucket.holder(), "gw-restart"), 20, "the lease")
        async with Webhook() as hook:
            task_id = await _send_with_push(gw.url, hook)
            ledger = ledger_seqs(await mesh.gateway.client.events(task_id))  # type: ignore[union-attr]
            await until(lambda: hook.got == ledger, 20, "every event so far pushed")
            await until_async(lambda: _is(bucket.cursor(task_id), ledger[-1]), 10,
                              "the cursor at the last event")
            # 1. kill -9 while idle: the restarted gateway (same id: it takes its lease
            # back at once) sends only what the webhook has not accepted.
            gw.kill9()
            hook.hold = ledger[-1]
            async with Client(mesh.url) as other:
                await other.deny(task_id, reason="kill -9 test")
            gw = await GatewayProcess(mesh.url, "gw-restart", tmp_path, gw.port).start()
            # 2. kill -9 while a POST is in flight: the webhook got it, no 2xx went back.
            await asyncio.wait_for(hook.holding.wait(), 20)
            held = hook.got[-1]
            gw.kill9()
            hook.release.set()
            gw = await GatewayProcess(mesh.url, "gw-restart", tmp_path, gw.port).start()
            async with Client(mesh.url) as other:
                assert (await other.result(task_id, timeout=20)).terminal
                ledger = ledger_seqs(await other.events(task_id))
            await until(lambda: sorted(set(hook.got)) == ledger, 20, "every event pushed")
            await until_async(lambda: _is(bucket.cursor(task_id), ledger[-1]), 10,
                              "the cursor at the terminal event")
        _once_but(hook.got, ledger, held)
    finally:
        gw.stop()


async def test_two_gateways_share_delivery_and_the_survivor_takes_over_a_kill9(
        mesh: Mesh, a2a_bus: Bus, tmp_path: Path) -> None:
    bucket = PushBucket(a2a_bus)
    first = await GatewayProcess(mesh.url, "gw-a", tmp_path).start()
    second: GatewayProcess | None = None
    try:
        await until_async(lambda: _is(bucket.holder(), "gw-a"), 20, "gw-a holds the lease")
        second = await GatewayProcess(mesh.url, "gw-b", tmp_path).start()
        async with Webhook() as hook:
            # The config goes in through gw-b; gw-a (the holder) delivers it.
            task_id = await _send_with_push(second.url, hook)
            ledger = ledger_seqs(await mesh.gateway.client.events(task_id))  # type: ignore[union-attr]
            await until(lambda: hook.got == ledger, 20, "every event so far pushed")
            assert await bucket.holder() == "gw-a"
            hook.hold = ledger[-1]
            async with Client(mesh.url) as other:
                await other.deny(task_id, reason="failover test")
            await asyncio.wait_for(hook.holding.wait(), 20)
            held = hook.got[-1]
            first.kill9()
            hook.release.set()
            took = await until_async(lambda: _is(bucket.holder(), "gw-b"), LEASE_S * 4,
                                     "gw-b to take the lease over")
            async with Client(mesh.url) as other:
                assert (await other.result(task_id, timeout=20)).terminal
                ledger = ledger_seqs(await other.events(task_id))
            await until(lambda: sorted(set(hook.got)) == ledger, 20, "every event pushed")
        _once_but(hook.got, ledger, held)
        print(f"gw-b took the lease {took:.2f}s after gw-a was killed (lease {LEASE_S}s)")
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
