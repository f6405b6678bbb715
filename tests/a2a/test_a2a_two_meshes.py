"""Two meshes: mesh 1 delegates a skill to mesh 2 over A2A HTTP; the task completes in
mesh 1's ledger with the exchange recorded."""

from __future__ import annotations

import uuid
from pathlib import Path

from a2a.client import ClientConfig, create_client
from a2a.types import Message, Part, Role, SendMessageRequest, TaskState
from a2a_mesh import Mesh
from a2a_support import Bus, until
from google.protobuf.json_format import MessageToDict

from jetmesh.a2a.bridge import add_external, list_external, start_bridge
from jetmesh.agents.builtin import get_agent
from jetmesh.bus import events as ev
from jetmesh.bus.server import EmbeddedNats


async def test_mesh_one_delegates_a_skill_to_mesh_two(a2a_bus: Bus, tmp_path: Path) -> None:
    server2 = EmbeddedNats(data_dir=tmp_path / "nats2")
    server2.start()
    mesh2 = Mesh(server2.url, [get_agent("orders")])
    mesh1 = Mesh(a2a_bus.url, [])  # no local agent offers lookup_order
    bridge = None
    try:
        base2 = await mesh2.start()
        await until(lambda: mesh2.gateway.registry is not None
                    and mesh2.gateway.registry.agent("orders") is not None, 10, "mesh 2 agent")
        base1 = await mesh1.start()
        added = await add_external(mesh1.nc.jetstream(), f"{base2}/agents/orders")
        assert added.name == "ext-orders"
        assert [a.name for a in await list_external(mesh1.nc.jetstream())] == ["ext-orders"]
        bridge = await start_bridge(mesh1.nc, mesh1.nc.jetstream(), heartbeat_s=0.5)
        reg1 = mesh1.gateway.registry
        assert reg1 is not None
        await until(lambda: "lookup_order" in reg1.skills(), 10, "the bridged skill in mesh 1")

        part = Part()
        part.data.struct_value.update({"order_id": "A1001"})
        msg = Message(message_id=uuid.uuid4().hex, role=Role.ROLE_USER, parts=[part])
        msg.metadata.update({"skill": "lookup_order"})
        client = await create_client(base1, client_config=ClientConfig(streaming=False))
        async with client:
            (resp,) = [r async for r in client.send_message(SendMessageRequest(message=msg))]
        task = resp.task
        assert task.status.state == TaskState.TASK_STATE_COMPLETED, MessageToDict(task)

        entries = await a2a_bus.ledger.read(task.id)
        calls = [e.event for e in entries if isinstance(e.event, ev.ToolCalled)]
        assert len(calls) == 1
        call = calls[0].data
        assert call.tool == f"a2a:{base2}/agents/orders#lookup_order"
        assert call.arguments == {"order_id": "A1001"}
        assert call.output["found"] is True and call.output["order"]["order_id"] == "A1001"
        done = [e.event for e in entries if isinstance(e.event, ev.StepCompleted)]
        assert done and done[0].data.agent == "ext-orders"
        # mesh 2 ran it as its own task, keyed by mesh 1's task and step
        remote = await mesh2.gateway.client.state(f"a2a-{task.id}-main")  # type: ignore[union-attr]
        assert remote.status.value == "completed"
    finally:
        if bridge is not None:
            await bridge.stop()
        await mesh1.stop()
        await mesh2.stop()
        server2.stop()
