"""The gateway on a server run with `jetmesh nats-config`'s users: as the `gateway` user it
submits, follows, keeps its push configs; a follow-up approval goes out as the `approver`
user (the gateway's own may not write approvals); nothing is refused by the server."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.types import (
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    TaskPushNotificationConfig,
    TaskState,
)
from a2a_mesh import skill_workflows
from a2a_support import ledger_seqs, until
from test_a2a_followup import REFUNDER, TOKEN, Webhook, refund_then_answer

from jetmesh.a2a.gateway import GatewayServer, GatewaySettings
from jetmesh.agents.builtin.support import refunds_file
from jetmesh.agents.models.sim import FunctionModel, SimModel
from jetmesh.agents.worker import Worker
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.permissions import AuthConfig
from jetmesh.bus.presence import ensure_bucket
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.streams import declare_streams
from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings

AGENTS = {"refunder": ["refund"]}


def violations(server: EmbeddedNats) -> list[str]:
    return [ln for ln in server.log_path.read_text(errors="replace").splitlines()
            if "Violation" in ln]


@pytest.fixture
async def secure_mesh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                      ) -> AsyncIterator[tuple[EmbeddedNats, GatewayServer]]:
    auth = AuthConfig.create(AGENTS)
    server = EmbeddedNats(data_dir=tmp_path / "nats", extra_config=auth.server_config())
    server.start()
    monkeypatch.setenv("JETMESH_DATA_DIR", str(tmp_path))

    async def login(user: str) -> Any:
        return await connect(server.url, user=user, password=auth.passwords[user],
                             inbox_prefix=auth.user(user).inbox_prefix)

    conns = []
    stack = contextlib.AsyncExitStack()
    try:
        admin = await login("admin")
        conns.append(admin)
        await declare_streams(jetstream(admin))
        await ensure_bucket(jetstream(admin), subjects.BUCKET_AGENTS)
        await ensure_bucket(jetstream(admin), subjects.BUCKET_BUDGETS, max_age_s=7 * 86400)
        orch_nc = await login("orchestrator")
        agent_nc = await login("agent-refunder")
        conns += [orch_nc, agent_nc]
        orch = Orchestrator(orch_nc, jetstream(orch_nc), model=SimModel(),
                            workflows=skill_workflows(),
                            settings=OrchestratorSettings(tick_s=0.1, agent_ttl_s=3))
        await orch.start()
        stack.push_async_callback(orch.stop)
        worker = Worker(REFUNDER, FunctionModel(refund_then_answer), agent_nc,
                        jetstream(agent_nc), replica="refunder-secure", heartbeat_s=0.5)
        await worker.start()
        stack.push_async_callback(worker.stop, grace_s=1)
        gw = auth.user("gateway")
        monkeypatch.setenv("NATS_USER", "gateway")
        monkeypatch.setenv("NATS_PASSWORD", auth.passwords["gateway"])
        monkeypatch.setenv("NATS_INBOX_PREFIX", gw.inbox_prefix)
        gateway = GatewayServer(server.url, settings=GatewaySettings(
            port=0, agent_ttl_s=3, send_wait_s=30, approver_token=TOKEN,
            approver_user="approver", approver_password=auth.passwords["approver"],
            push_private_urls=True))
        await gateway.start()
        stack.push_async_callback(gateway.stop)
        reg = gateway.registry
        assert reg is not None
        await until(lambda: "refund" in reg.skills(), 10, "the refunder in the registry")
        yield server, gateway
    finally:
        await stack.aclose()
        for nc in conns:
            with contextlib.suppress(Exception):
                await nc.close()
        server.stop()


async def test_approve_over_a2a_and_push_with_least_privilege_users(
        secure_mesh: tuple[EmbeddedNats, GatewayServer]) -> None:
    server, gateway = secure_mesh
    async with Webhook() as hook, httpx.AsyncClient(
            timeout=60, headers={"Jetmesh-Approver-Token": TOKEN}) as http:
        client = await create_client(gateway.url, client_config=ClientConfig(
            streaming=False, httpx_client=http))
        async with client:
            part = Part()
            part.data.struct_value.update({"question": "refund my teapot"})
            msg = Message(message_id="secure-1", role=Role.ROLE_USER, parts=[part])
            msg.metadata.update({"skill": "refund"})
            push = TaskPushNotificationConfig(url=hook.url, token="t")
            conf = SendMessageConfiguration(task_push_notification_config=push)
            (first,) = [r async for r in client.send_message(
                SendMessageRequest(message=msg, configuration=conf))]
            assert first.task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
            answer = Message(message_id="secure-2", role=Role.ROLE_USER,
                             task_id=first.task.id, parts=[Part(text="approve")])
            (done,) = [r async for r in client.send_message(SendMessageRequest(
                message=answer))]
            assert done.task.status.state == TaskState.TASK_STATE_COMPLETED
        gw_client = gateway.client
        assert gw_client is not None
        ledger = ledger_seqs(await gw_client.events(first.task.id))
        try:
            await until(lambda: hook.seqs(first.task.id) == ledger, 20, "every event pushed")
        except AssertionError as e:
            raise AssertionError((hook.seqs(first.task.id), ledger, violations(server))) from e
    made = [json.loads(x) for x in refunds_file().read_text().splitlines()]
    assert [(m["order_id"], m["amount_usd"]) for m in made] == [("A1029", 230)]
    entries = await gw_client.events(first.task.id)
    granted = [e for e in entries if e.event.type.endswith("approval.granted.v1")]
    assert [e.subject for e in granted] == [subjects.task_approval(first.task.id)]
    assert violations(server) == []
