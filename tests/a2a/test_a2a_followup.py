"""A2A 1.0 through the official SDK client, both bindings: interrupted states, follow-up
messages that answer an approval, GetTask at once, the context id, plain-SSE resume,
push notifications through a gateway restart, traceparent on every event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from a2a.client import ClientConfig, create_client
from a2a.client.client import Client as A2AClient
from a2a.types import (
    GetTaskRequest,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    StreamResponse,
    Task,
    TaskPushNotificationConfig,
    TaskState,
)
from a2a.utils.constants import TransportProtocol
from a2a_mesh import Mesh
from a2a_support import Bus, ledger_seqs, until
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jetmesh.a2a.gateway import GatewayServer, GatewaySettings, _quiet_server
from jetmesh.agents.builtin import get_agent
from jetmesh.agents.builtin.support import issue_refund, refunds_file
from jetmesh.agents.models.sim import FunctionModel, tool_call
from jetmesh.agents.models.types import ModelRequest, ToolCall
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.bus import events as ev
from jetmesh.bus.tracecontext import parse_traceparent
from jetmesh.orchestrator.client import Client

TOKEN = "approver-secret"
BINDINGS = [TransportProtocol.JSONRPC, TransportProtocol.HTTP_JSON]


class Ask(BaseModel):
    question: str


REFUNDER = AgentSpec(
    name="refunder", description="Refunds order A1029 when asked.", instructions="Refund.",
    tools=[issue_refund],
    skills=[SkillSpec.from_models("refund", "Refund", "Refunds.", input_model=Ask)],
)


def refund_then_answer(request: ModelRequest) -> list[ToolCall] | str:
    """Asks for a $230 refund (over the approval threshold), then reports the outcome."""
    told = [m for m in request.messages if m.role == "tool"]
    if not told:
        return [tool_call("issue_refund", order_id="A1029", amount_usd=230,
                          reason="damaged on arrival")]
    return "outcome: " + told[-1].content[:200]


def settings(**kw: Any) -> GatewaySettings:
    return GatewaySettings(port=0, agent_ttl_s=3, send_wait_s=30, approver_token=TOKEN,
                           push_private_urls=True, **kw)


@pytest.fixture(scope="module")
async def mesh(a2a_bus: Bus, tmp_path_factory: pytest.TempPathFactory
               ) -> AsyncIterator[Mesh]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JETMESH_DATA_DIR", str(tmp_path_factory.mktemp("refunds")))
        m = Mesh(a2a_bus.url, [get_agent("orders"), REFUNDER],
                 models={"refunder": FunctionModel(refund_then_answer)},
                 gateway_settings=settings())
        await m.start()
        reg = m.gateway.registry
        assert reg is not None
        await until(lambda: {"refund", "lookup_order"} <= set(reg.skills()), 10,
                    "both agents in the gateway's registry")
        yield m
        await m.stop()


def refunds() -> list[dict[str, Any]]:
    path = refunds_file()
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def message(text: str = "", data: dict[str, Any] | None = None, *, task_id: str = "",
            context_id: str = "", **metadata: str) -> Message:
    parts = [Part(text=text)] if text else []
    if data is not None:
        p = Part()
        p.data.struct_value.update(data)
        parts.append(p)
    msg = Message(message_id=uuid.uuid4().hex, role=Role.ROLE_USER, parts=parts,
                  task_id=task_id, context_id=context_id)
    msg.metadata.update(metadata)
    return msg


@contextlib.asynccontextmanager
async def client_for(mesh: Mesh, binding: str, *, streaming: bool = False,
                     headers: dict[str, str] | None = None) -> AsyncIterator[A2AClient]:
    """The official SDK client on one binding (its HTTP client closed afterwards)."""
    async with httpx.AsyncClient(timeout=60, headers=headers or {}) as http:
        client = await create_client(mesh.base, client_config=ClientConfig(
            streaming=streaming, supported_protocol_bindings=[binding], httpx_client=http))
        async with client:
            yield client


async def send(client: A2AClient, msg: Message, **conf: Any) -> Task:
    req = SendMessageRequest(message=msg, configuration=SendMessageConfiguration(**conf))
    out = [r async for r in client.send_message(req)]
    assert len(out) == 1 and out[0].HasField("task"), out
    return out[0].task


@pytest.mark.parametrize("binding", BINDINGS)
async def test_blocking_send_returns_at_input_required_and_a_follow_up_approves(
        mesh: Mesh, binding: str) -> None:
    before = len(refunds())
    async with client_for(mesh, binding, headers={"Jetmesh-Approver-Token": TOKEN}) as client:
        task = await asyncio.wait_for(send(client, message(
            data={"question": "refund my broken teapot"}, skill="refund")), 20)
        assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        waiting = MessageToDict(task.status.message)["parts"][1]["data"]["pendingApprovals"]
        assert waiting[0]["tool"] == "issue_refund"
        assert waiting[0]["arguments"] == {"order_id": "A1029", "amount_usd": 230,
                                           "reason": "damaged on arrival"}  # ints stay ints
        # A follow-up bound to another argument hash approves nothing.
        with pytest.raises(Exception, match="no pending approval"):
            await send(client, message(data={"decision": "approve", "argsHash": "0" * 64},
                                       task_id=task.id))
        done = await asyncio.wait_for(send(client, message(
            data={"decision": "approve", "argsHash": waiting[0]["argsHash"]},
            task_id=task.id, context_id=task.context_id, by="tester")), 20)
        assert done.status.state == TaskState.TASK_STATE_COMPLETED
        assert done.context_id == task.context_id and done.id == task.id
        got = await client.get_task(GetTaskRequest(id=task.id))
        assert got.context_id == task.context_id
    made = refunds()[before:]
    assert [(r["order_id"], r["amount_usd"]) for r in made] == [("A1029", 230)]
    entries = await mesh.gateway.client.events(task.id)  # type: ignore[union-attr]
    granted = [e.event for e in entries if isinstance(e.event, ev.ApprovalGranted)]
    assert len(granted) == 1 and granted[0].data.by == "a2a:tester"
    assert granted[0].data.args_hash == waiting[0]["argsHash"]


@pytest.mark.parametrize("binding", BINDINGS)
async def test_a_denial_by_follow_up_ends_the_task_and_nothing_is_refunded(
        mesh: Mesh, binding: str) -> None:
    before = len(refunds())
    async with client_for(mesh, binding, headers={"Jetmesh-Approver-Token": TOKEN}) as client:
        task = await send(client, message(data={"question": "refund"}, skill="refund"))
        assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        done = await send(client, message("deny: not without a photo", task_id=task.id))
        assert done.status.state == TaskState.TASK_STATE_COMPLETED
        result = MessageToDict(done.status.message)
        assert "not approved" in json.dumps(result) and "photo" in json.dumps(result)
        # The task has ended: a further message is refused with where to go instead.
        with pytest.raises(Exception, match="contextId"):
            await send(client, message("approve", task_id=task.id))
    assert len(refunds()) == before


async def test_approvals_need_the_approver_token(mesh: Mesh) -> None:
    async with client_for(mesh, TransportProtocol.JSONRPC) as client:
        task = await send(client, message(data={"question": "refund"}, skill="refund"))
        assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        with pytest.raises(Exception, match="approver's token"):
            await send(client, message("approve", task_id=task.id))
        with pytest.raises(Exception, match="waits for an approval"):
            await send(client, message("what is the weather?", task_id=task.id))
    gw = mesh.gateway.client
    assert gw is not None
    await gw.deny(task.id, reason="test over")


@pytest.mark.parametrize("binding", BINDINGS)
async def test_get_task_right_after_return_immediately_always_finds_it(
        mesh: Mesh, binding: str) -> None:
    async with client_for(mesh, binding) as client:
        for _ in range(40):
            ctx = uuid.uuid4().hex
            task = await send(client, message("lookup", {"order_id": "A1001"},
                                              context_id=ctx, skill="lookup_order"),
                              return_immediately=True)
            got = await client.get_task(GetTaskRequest(id=task.id))
            assert got.id == task.id and got.context_id == task.context_id == ctx


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_get_task_right_after_return_immediately_1000_times(mesh: Mesh) -> None:
    async with client_for(mesh, TransportProtocol.JSONRPC) as client:
        for _ in range(1000):
            task = await send(client, message("lookup", {"order_id": "A1001"},
                                              skill="lookup_order"), return_immediately=True)
            assert (await client.get_task(GetTaskRequest(id=task.id))).id == task.id


def sse_events(text: str) -> list[tuple[int | None, dict[str, Any]]]:
    out = []
    for block in re.split(r"\r\n\r\n|\n\n", text):
        lines = block.splitlines()
        ids = [int(x[3:].strip()) for x in lines if x.startswith("id:")]
        data = "".join(x[5:].strip() for x in lines if x.startswith("data:"))
        if data:
            out.append((ids[0] if ids else None, json.loads(data)))
    return out


async def test_a_plain_sse_client_resumes_with_last_event_id_without_gap_or_repeat(
        mesh: Mesh) -> None:
    headers = {"A2A-Version": "1.0", "Accept": "text/event-stream"}
    async with client_for(mesh, TransportProtocol.JSONRPC) as client:
        task = await send(client, message(data={"question": "refund"}, skill="refund"))
    assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
    url = f"{mesh.base}/tasks/{task.id}:subscribe"
    async with httpx.AsyncClient(timeout=30) as http:
        first: list[int] = []
        async with http.stream("GET", url, headers=headers) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            buf = ""
            async for chunk in r.aiter_text():
                buf += chunk
                if "\n\n" in buf or "\r\n\r\n" in buf:
                    break  # drop the connection after the first event
            first = [i for i, _ in sse_events(buf) if i is not None]
        assert first, buf
        gw = mesh.gateway.client
        assert gw is not None
        await gw.deny(task.id, reason="resume test")
        async with http.stream("GET", url, headers={**headers,
                                                    "Last-Event-ID": str(first[-1])}) as r:
            resumed = sse_events((await r.aread()).decode())
    ids = [i for i, _ in resumed]
    assert None not in ids
    ledger = ledger_seqs(await gw.events(task.id))
    assert ids[0] == first[-1]  # the task as of the resume point, then every later event
    assert ids[1:] == [s for s in ledger if s > first[-1]]
    assert resumed[-1][1]["statusUpdate"]["status"]["state"] == "TASK_STATE_COMPLETED"


async def test_jsonrpc_stream_events_carry_ids_and_traceparent(mesh: Mesh) -> None:
    trace = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    body = {"jsonrpc": "2.0", "id": 7, "method": "SendStreamingMessage", "params": {
        "message": {"messageId": uuid.uuid4().hex, "role": "ROLE_USER",
                    "parts": [{"data": {"order_id": "A1001"}}],
                    "metadata": {"skill": "lookup_order"}}}}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{mesh.base}/", json=body, headers={
            "A2A-Version": "1.0", "traceparent": trace, "Accept": "text/event-stream"})
    events = sse_events(r.text)
    assert len(events) >= 3
    for seq, data in events:
        (item,) = data["result"].values()
        jm = item["metadata"]["jetmesh"]
        assert seq == jm["seq"]
        parsed = parse_traceparent(jm["traceparent"])
        assert parsed is not None and f"{parsed[0]:032x}" == "ab" * 16


# ----------------------------------------------------------------------------- push


class Webhook:
    """A local HTTP receiver: records every push, refuses the first `fail` of them."""

    def __init__(self, fail: int = 0) -> None:
        self.got: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.fail = fail
        self.refused = 0

        async def hook(request: Request) -> Response:
            if self.refused < self.fail:
                self.refused += 1
                return Response(status_code=503)
            self.got.append((dict(request.headers), json.loads(await request.body())))
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
        self.server.should_exit = True
        await self.task

    def seqs(self, task_id: str) -> list[int]:
        out = []
        for _, body in self.got:
            (item,) = body.values()
            if item.get("taskId", item.get("id")) == task_id:
                out.append(int(item["metadata"]["jetmesh"]["seq"]))
        return out


async def test_push_notifications_reach_the_webhook_once_per_event_across_a_restart(
        mesh: Mesh) -> None:
    async with Webhook(fail=2) as hook:
        push = TaskPushNotificationConfig(url=hook.url, token="tok-1")
        push.authentication.scheme = "Bearer"
        push.authentication.credentials = "hook-secret"
        async with client_for(mesh, TransportProtocol.HTTP_JSON) as client:
            task = await send(client, message(data={"question": "refund"}, skill="refund"),
                              task_push_notification_config=push)
        assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        gw = mesh.gateway.client
        assert gw is not None
        ledger = ledger_seqs(await gw.events(task.id))
        await until(lambda: hook.seqs(task.id) == ledger, 20, "every event so far pushed")
        # The gateway goes away; the task moves on without it; a new gateway delivers
        # what the webhook has not accepted yet, from the cursor in the bucket.
        await mesh.gateway.stop()
        async with Client(mesh.url) as other:
            await other.deny(task.id, reason="restart test")
        mesh.gateway = GatewayServer(mesh.url, settings=settings())
        mesh.base = await mesh.gateway.start()
        new = mesh.gateway.client
        assert new is not None
        final = await new.result(task.id, timeout=20)
        ledger = ledger_seqs(await new.events(task.id))
        assert final.terminal
        await until(lambda: hook.seqs(task.id) == ledger, 20, "every event pushed")
    assert hook.refused == 2  # refused deliveries were retried, not dropped
    assert sorted(set(hook.seqs(task.id))) == hook.seqs(task.id)  # once each, in order
    headers, body = hook.got[0]
    assert headers["x-a2a-notification-token"] == "tok-1"
    assert headers["authorization"] == "Bearer hook-secret"
    assert "task" in body or "statusUpdate" in body


async def test_push_config_crud_over_jsonrpc(mesh: Mesh) -> None:
    async with client_for(mesh, TransportProtocol.JSONRPC) as client:
        task = await send(client, message(data={"question": "refund"}, skill="refund"))
        base = {"jsonrpc": "2.0", "id": 1}
        h = {"A2A-Version": "1.0"}
        async with httpx.AsyncClient(timeout=30) as http:
            async def rpc(method: str, params: dict[str, Any]) -> dict[str, Any]:
                r = await http.post(f"{mesh.base}/", json={**base, "method": method,
                                                          "params": params}, headers=h)
                out: dict[str, Any] = r.json()
                return out
            made = await rpc("CreateTaskPushNotificationConfig", {
                "taskId": task.id, "id": "c1", "url": "http://127.0.0.1:9/hook"})
            assert made["result"]["id"] == "c1"
            listed = await rpc("ListTaskPushNotificationConfigs", {"taskId": task.id})
            assert [c["id"] for c in listed["result"]["configs"]] == ["c1"]
            got = await rpc("GetTaskPushNotificationConfig", {"taskId": task.id, "id": "c1"})
            assert got["result"]["url"] == "http://127.0.0.1:9/hook"
            await rpc("DeleteTaskPushNotificationConfig", {"taskId": task.id, "id": "c1"})
            listed = await rpc("ListTaskPushNotificationConfigs", {"taskId": task.id})
            assert listed["result"].get("configs", []) == []
            bad = await rpc("CreateTaskPushNotificationConfig", {
                "taskId": task.id, "url": "ftp://x"})
            assert bad["error"]["code"] == -32602
    gw = mesh.gateway.client
    assert gw is not None
    await gw.deny(task.id, reason="test over")


# ----------------------------------------------------------------------------- validation


INVALID = [
    ("ListTasks", {"status": "TASK_STATE_NOPE"}, "status"),
    ("ListTasks", {"pageSize": 0}, "pageSize"),
    ("ListTasks", {"historyLength": -1}, "historyLength"),
    ("GetTask", {"id": "x", "historyLength": -2}, "historyLength"),
    ("SendMessage", {"message": {"role": "ROLE_USER", "parts": [{"text": "hi"}]}},
     "messageId"),
    ("SendMessage", {"message": {"messageId": "m", "parts": [{"text": "hi"}]}}, "role"),
    ("SendMessage", {"message": {"messageId": "m", "role": "ROLE_USER", "parts": []}},
     "parts"),
    ("SendMessage", {"message": {"messageId": "m", "role": "ROLE_BOSS",
                                 "parts": [{"text": "x"}]}}, "role"),
    ("SendMessage", {"message": {"messageId": "m", "role": "ROLE_USER", "contextId": "a b",
                                 "parts": [{"text": "x"}]}}, "contextId"),
    ("SendMessage", {"message": {"messageId": "m", "role": "ROLE_USER",
                                 "parts": [{"text": "x"}], "metadata": {"workflow": 3}}},
     "workflow"),
]


@pytest.mark.parametrize(("method", "params", "field"), INVALID,
                         ids=[f"{m}-{f}" for m, _, f in INVALID])
async def test_invalid_requests_are_refused_with_the_field_in_one_log_line(
        mesh: Mesh, method: str, params: dict[str, Any], field: str,
        caplog: pytest.LogCaptureFixture) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{mesh.base}/", json={"jsonrpc": "2.0", "id": 3, "method": method,
                                                   "params": params},
                            headers={"A2A-Version": "1.0"})
    error = r.json()["error"]
    assert error["code"] == -32602 and field in error["message"], error
    assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged"


async def test_subscribe_to_an_unknown_task_answers_an_event_stream_error(
        mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{mesh.base}/", json={
            "jsonrpc": "2.0", "id": 4, "method": "SubscribeToTask", "params": {"id": "nope"}},
            headers={"A2A-Version": "1.0", "Accept": "text/event-stream"})
        assert r.headers["content-type"].startswith("text/event-stream")
        assert "event: error" in r.text and "-32001" in r.text
        rest = await http.get(f"{mesh.base}/tasks/nope:subscribe",
                              headers={"A2A-Version": "1.0"})
        assert rest.status_code == 404
        bad = await http.post(f"{mesh.base}/", content=b'{"jsonrpc": "2.0", "id": 1, '
                              b'"method": "GetTask", "params": {"id": 5, "x": [}}',
                              headers={"A2A-Version": "1.0"})
        assert bad.json()["error"]["code"] in (-32700, -32602)
    assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged"


async def test_numbers_stay_integers_in_cards_and_metadata(mesh: Mesh) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        card = (await http.get(f"{mesh.base}/.well-known/agent-card.json")).text
        agent = (await http.get(f"{mesh.base}/agents/orders/.well-known/agent-card.json")).text
        assert not re.search(r'"(maxLength|minLength|minimum|maximum|seq)": ?\d+\.0\b',
                             card + agent)
        assert '"pushNotifications": true' in card.replace('":true', '": true')
    async with client_for(mesh, TransportProtocol.HTTP_JSON) as client:
        task = await send(client, message("lookup", {"order_id": "A1001", "qty": 3},
                                          skill="lookup_order"))
        state = await mesh.gateway.client.state(task.id)  # type: ignore[union-attr]
    assert state.submitted is not None and state.submitted.input["qty"] == 3
    assert isinstance(state.submitted.input["qty"], int)


def _resp_seq(e: StreamResponse) -> int:
    for name in ("status_update", "artifact_update", "task"):
        if e.HasField(name):
            return int(MessageToDict(getattr(e, name).metadata)["jetmesh"]["seq"])
    return 0


@pytest.mark.parametrize("binding", BINDINGS)
async def test_a_streamed_send_ends_at_input_required_and_a_follow_up_stream_finishes(
        mesh: Mesh, binding: str) -> None:
    async with client_for(mesh, binding, streaming=True,
                              headers={"Jetmesh-Approver-Token": TOKEN}) as client:
        first = [e async for e in client.send_message(SendMessageRequest(
            message=message(data={"question": "refund"}, skill="refund")))]
        task_id = first[0].task.id
        assert [e.WhichOneof("payload") for e in first][-1] == "status_update", (
            [e.WhichOneof("payload") for e in first], MessageToDict(first[-1]))
        assert first[-1].status_update.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        second = [e async for e in client.send_message(SendMessageRequest(
            message=message("approve", task_id=task_id)))]
        assert second[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    contexts = {first[0].task.context_id} | {
        e.status_update.context_id for e in first[1:] + second[1:] if
        e.HasField("status_update")}
    assert len(contexts) == 1
    # the follow-up's stream starts with the task as of the decision, then what follows
    seqs = [_resp_seq(e) for e in first + second]
    ledger = ledger_seqs(await mesh.gateway.client.events(task_id))  # type: ignore[union-attr]
    assert seqs == ledger


async def test_sdk_client_sees_the_context_continue_in_a_new_task(mesh: Mesh) -> None:
    async with client_for(mesh, TransportProtocol.JSONRPC) as client:
        one = await send(client, message("lookup", {"order_id": "A1001"},
                                         skill="lookup_order"))
        two = await send(client, message("lookup", {"order_id": "A1002"},
                                         context_id=one.context_id, skill="lookup_order"))
    assert two.id != one.id and two.context_id == one.context_id
    assert two.status.state == TaskState.TASK_STATE_COMPLETED

