"""Drive the running gateway with the official a2a-sdk client."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from a2a.client import A2ACardResolver, ClientCallContext, ClientConfig, create_client
from a2a.client.client import Client as A2AClient
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    TaskState,
)
from a2a.utils.errors import TaskNotCancelableError
from a2a.utils.proto_utils import validate_proto_required_fields
from a2a_mesh import Mesh
from a2a_support import Bus, ledger_seqs, until
from google.protobuf.json_format import MessageToDict

from jetmesh.a2a.tasks import seq_of
from jetmesh.agents.builtin import get_agent
from jetmesh.agents.cards import NATS_BINDING


@pytest.fixture(scope="module")
async def gateway(a2a_bus: Bus) -> AsyncIterator[Mesh]:
    mesh = Mesh(a2a_bus.url, [get_agent("orders")])
    await mesh.start()
    reg = mesh.gateway.registry
    assert reg is not None
    await until(lambda: "lookup_order" in reg.skills(), 10,
                "the orders agent in the gateway's registry")
    yield mesh
    await mesh.stop()


def _message(text: str = "", data: dict | None = None, **metadata: str) -> SendMessageRequest:
    parts = [Part(text=text)] if text else []
    if data is not None:
        p = Part()
        p.data.struct_value.update(data)
        parts.append(p)
    msg = Message(message_id=uuid.uuid4().hex, role=Role.ROLE_USER, parts=parts)
    msg.metadata.update(metadata)
    return SendMessageRequest(message=msg)


async def _client(base: str, *, streaming: bool = True) -> A2AClient:
    return await create_client(base, client_config=ClientConfig(streaming=streaming))


async def test_mesh_card_is_served_with_live_skills_etag_and_cache_control(
        gateway: Mesh) -> None:
    base = gateway.base
    async with httpx.AsyncClient() as http:
        card = await A2ACardResolver(http, base).get_agent_card()
        validate_proto_required_fields(card)
        assert [s.id for s in card.skills] == ["lookup_order"]
        assert card.supported_interfaces[0].protocol_binding == NATS_BINDING
        assert card.supported_interfaces[1].url == f"{base}/"
        r = await http.get(f"{base}/.well-known/agent-card.json")
        assert r.headers["etag"] and "max-age" in r.headers["cache-control"]
        r2 = await http.get(f"{base}/.well-known/agent-card.json",
                            headers={"If-None-Match": r.headers["etag"]})
        assert r2.status_code == 304
        agent = await A2ACardResolver(http, f"{base}/agents/orders").get_agent_card()
        assert agent.name == "orders"
        assert agent.supported_interfaces[0].protocol_binding == NATS_BINDING
        assert any(i.url == f"{base}/agents/orders/" for i in agent.supported_interfaces)
        assert (await http.get(f"{base}/agents/nobody/.well-known/agent-card.json")
                ).status_code == 404


async def test_send_message_runs_a_task_and_get_and_list_see_it(gateway: Mesh) -> None:
    base = gateway.base
    client = await _client(base, streaming=False)
    async with client:
        req = _message("Where is my order?", {"order_id": "A1001"}, skill="lookup_order")
        (resp,) = [r async for r in client.send_message(req)]
        task = resp.task
        assert task.status.state == TaskState.TASK_STATE_COMPLETED, MessageToDict(task)
        result = [a for a in task.artifacts if a.artifact_id == "result"]
        assert result, MessageToDict(task)
        data = MessageToDict(result[0].parts[-1].data)
        assert "A1001" in str(data)

        got = await client.get_task(GetTaskRequest(id=task.id))
        assert got.status.state == TaskState.TASK_STATE_COMPLETED
        assert got.history[0].message_id == req.message.message_id

        listed = await client.list_tasks(ListTasksRequest(context_id=task.context_id))
        assert [t.id for t in listed.tasks] == [task.id]
        done = await client.list_tasks(ListTasksRequest(status=TaskState.TASK_STATE_COMPLETED,
                                                        page_size=100))
        assert task.id in [t.id for t in done.tasks]

        # per-agent endpoint: the agent's only skill, no metadata needed
    agent_client = await _client(f"{base}/agents/orders", streaming=False)
    async with agent_client:
        (resp,) = [r async for r in agent_client.send_message(
            _message(data={"order_id": "A1002"}))]
        assert resp.task.status.state == TaskState.TASK_STATE_COMPLETED


async def test_streamed_task_events_map_one_to_one_to_the_ledger(
        gateway: Mesh, a2a_bus: Bus) -> None:
    client = await _client(gateway.base)
    async with client:
        events = [e async for e in client.send_message(
            _message("lookup", {"order_id": "A1001"}, skill="lookup_order"))]
    first, *rest = events
    assert first.HasField("task")
    assert first.task.status.state == TaskState.TASK_STATE_SUBMITTED
    last = rest[-1]
    assert last.status_update.status.state == TaskState.TASK_STATE_COMPLETED
    assert any(e.HasField("artifact_update") for e in rest)
    ledger = await a2a_bus.ledger.read(first.task.id)
    # The first event is the task as submitted (its first ledger entry folded), then one
    # event per later entry; the context id never changes.
    assert [_seq(e) for e in events] == ledger_seqs(ledger)
    contexts = {first.task.context_id} | {
        getattr(e, k).context_id for e in rest for k in ("status_update", "artifact_update")
        if e.HasField(k)}
    assert len(contexts) == 1 and first.task.context_id


def _seq(e: StreamResponse) -> int:
    for name in ("status_update", "artifact_update", "task"):
        if e.HasField(name):
            return seq_of(getattr(e, name))
    return 0


async def test_cancel_and_resubscribe_after_a_dropped_stream_lose_and_repeat_nothing(
        gateway: Mesh, a2a_bus: Bus) -> None:
    client = await _client(gateway.base)
    async with client:
        # a skill nobody serves: the task waits for an agent until canceled
        seen: list[StreamResponse] = []
        stream = client.send_message(_message("wait", {"x": 1}, skill="nobody_serves"))
        async for e in stream:
            seen.append(e)
            text = e.status_update.status.message.parts[0].text if e.HasField(
                "status_update") else ""
            if text.startswith("planned"):
                break
        await stream.aclose()  # the connection drops mid-task
        task_id = seen[0].task.id
        last = _seq(seen[-1])
        assert last > 0

        got = await client.get_task(GetTaskRequest(id=task_id))
        assert got.status.state == TaskState.TASK_STATE_WORKING

        canceled = await client.cancel_task(CancelTaskRequest(id=task_id))
        assert canceled.status.state == TaskState.TASK_STATE_CANCELED
        with pytest.raises(TaskNotCancelableError):
            await client.cancel_task(CancelTaskRequest(id=task_id))

        ctx = ClientCallContext(service_parameters={"Last-Event-ID": str(last)})
        resumed = [e async for e in client.subscribe(SubscribeToTaskRequest(id=task_id),
                                                     context=ctx)]
    assert resumed[0].HasField("task") and _seq(resumed[0]) == last
    after = [_seq(e) for e in resumed[1:]]
    before = [_seq(e) for e in seen]
    ledger = ledger_seqs(await a2a_bus.ledger.read(task_id))
    assert before + after == ledger  # no gap, no repeat
    assert resumed[-1].status_update.status.state == TaskState.TASK_STATE_CANCELED


async def test_list_tasks_filters_and_orders_from_the_task_projection(gateway: Mesh) -> None:
    """ListTasks reads the task listing projection (jm-tasks), not the whole ledger: a
    summary planted only in the projection is what it filters by; only the page's tasks
    are folded from the ledger."""
    import uuid

    from jetmesh.bus.connection import jetstream
    from jetmesh.bus.ledger import Ledger
    from jetmesh.orchestrator.tasks_kv import TaskProjector, open_bucket, task_key

    client = await _client(gateway.base, streaming=False)
    async with client:
        (resp,) = [r async for r in client.send_message(_message(
            data={"order_id": "A1003"}, skill="lookup_order"))]
        task = resp.task
        assert task.status.state == TaskState.TASK_STATE_COMPLETED
        js = jetstream(gateway.nc)
        ledger = Ledger(gateway.nc, js)
        projector = TaskProjector(js, ledger)
        await projector.start()
        try:
            last = max(e.seq for e in await ledger.read(task.id) if e.seq < 1 << 40)
            await projector.wait_for_seq(last, timeout=30)
        finally:
            await projector.stop()
        kv = await open_bucket(js, create=False)
        assert kv is not None
        from jetmesh.orchestrator.tasks_kv import TaskSummary

        entry = await kv.get(task_key(task.id))
        planted = TaskSummary.model_validate_json(entry.value).model_copy(
            update={"context_id": f"ctx-planted-{uuid.uuid4().hex[:8]}"})
        await kv.put(task_key(task.id), planted.model_dump_json().encode())
        listed = await client.list_tasks(ListTasksRequest(context_id=planted.context_id))
        assert [t.id for t in listed.tasks] == [task.id]  # the projection's context id
        assert listed.tasks[0].status.state == TaskState.TASK_STATE_COMPLETED  # folded
        gone = await client.list_tasks(ListTasksRequest(context_id=task.context_id))
        assert task.id not in [t.id for t in gone.tasks]
