"""The A2A gateway: the mesh as an A2A 1.0 agent over HTTP (JSON-RPC and HTTP+JSON).

The SDK's Starlette routes do the wire work; `MeshRequestHandler` implements the SDK's
`RequestHandler` port on top of jetmesh. It keeps no task state: SendMessage publishes a
jetmesh task, GetTask / ListTasks fold the ledger, streams follow the ledger, and
CancelTask appends a cancel request. (The SDK's AgentExecutor + TaskStore ports assume
the agent runs inside the server process; here the work runs on the mesh and the ledger
already is the task store and the event log, so the handler port is the right seam.)

Routes:

* ``/.well-known/agent-card.json``: the mesh's card (skills = the live skills), with a weak
  ETag and ``Cache-Control``; JSON-RPC at ``/``, HTTP+JSON at ``/message:send``, ``/tasks``..
* ``/agents/<name>/.well-known/agent-card.json``: one live agent's card, and the same
  operations under ``/agents/<name>/``, where a message runs one of that agent's skills.

Resuming a stream: every event carries ``metadata.jetmesh.seq`` (its ledger sequence).
SubscribeToTask with header ``Last-Event-ID: <seq>`` first sends the task as folded up to
that sequence, then every later event exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from a2a.server.context import ServerCallContext
from a2a.server.request_handlers import RequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes, create_rest_routes
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTaskPushNotificationConfigsResponse,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskPushNotificationConfig,
)
from a2a.types import TaskState as A2AState
from a2a.utils.constants import DEFAULT_LIST_TASKS_PAGE_SIZE, MAX_LIST_TASKS_PAGE_SIZE
from a2a.utils.errors import (
    ExtendedAgentCardNotConfiguredError,
    InvalidParamsError,
    PushNotificationNotSupportedError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from google.protobuf.json_format import MessageToDict
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from jetmesh.a2a.edge import BodyCheck
from jetmesh.bus import events as ev
from jetmesh.bus.subjects import InvalidIdError
from jetmesh.orchestrator.client import Client, ControlRefused
from jetmesh.orchestrator.projection import all_tasks
from jetmesh.orchestrator.state import TaskState, fold

from .cards import agent_http_base, card_to_dict, http_interfaces, mesh_card
from .registry import Registry
from .signing import CardSigner, CardVerifier
from .tasks import (
    META_CONTEXT,
    StreamEvent,
    entry_event,
    jetmesh_status,
    message_to_submission,
    skill_workflow,
    task_from_state,
)
from .ui import mount as ui_mount

__all__ = ["GatewayServer", "GatewaySettings", "MeshRequestHandler", "build_app"]

log = logging.getLogger("jetmesh.gateway")
RESUME_HEADER = "last-event-id"


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JETMESH_GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None
    """Base URL put in cards (default: http://host:port)."""
    send_wait_s: float = 60.0
    """A blocking SendMessage waits this long for a terminal state, then returns the task."""
    cancel_wait_s: float = 10.0
    card_max_age_s: int = 5
    """``Cache-Control: max-age`` of cards (cards change as agents come and go)."""
    agent_ttl_s: float = 5.0


def _resume_from(context: ServerCallContext) -> int | None:
    headers = context.state.get("headers") or {}
    raw = headers.get(RESUME_HEADER) or headers.get(RESUME_HEADER.title())
    if raw is None:
        return None
    try:
        seq = int(str(raw).strip())
    except ValueError as e:
        raise InvalidParamsError(message=f"Last-Event-ID must be a ledger sequence: {raw!r}"
                                 ) from e
    if seq < 0:
        raise InvalidParamsError(message="Last-Event-ID must be >= 0")
    return seq


class MeshRequestHandler(RequestHandler):
    """The SDK's request-handler port implemented on the jetmesh ledger.

    With `agent` set, messages run one of that agent's skills (metadata ``skill`` picks
    which; an agent with one skill needs none).
    """

    def __init__(self, client: Client, registry: Registry, settings: GatewaySettings,
                 agent: str | None = None) -> None:
        self.client = client
        self.registry = registry
        self.settings = settings
        self.agent = agent

    # ------------------------------------------------------------------ helpers

    async def _state(self, task_id: str) -> TaskState | None:
        try:
            state = await self.client.state(task_id)
        except InvalidIdError:
            return None
        return state if state.submitted is not None or state.last_seq else None

    def _pick_skill(self, asked: str | None) -> str:
        assert self.agent is not None
        live = self.registry.agent(self.agent)
        if live is None:
            raise InvalidParamsError(message=f"agent {self.agent!r} is not live")
        ids = live.skill_ids
        if asked is None and len(ids) == 1:
            return ids[0]
        if asked not in ids:
            raise InvalidParamsError(
                message=f"agent {self.agent!r} offers skills {ids}; name one in message "
                        f"metadata 'skill'")
        return asked

    async def _submit(self, params: SendMessageRequest) -> str:
        if not params.HasField("message"):
            raise InvalidParamsError(message="message is required")
        msg = params.message
        if msg.task_id:
            state = await self._state(msg.task_id)
            if state is None:
                raise TaskNotFoundError(message=f"task {msg.task_id} not found")
            raise UnsupportedOperationError(
                message="jetmesh tasks take no follow-up messages yet; send a new message")
        req_meta = MessageToDict(params.metadata) if params.HasField("metadata") else {}
        sub = message_to_submission(msg, req_meta)
        workflow = sub.workflow
        if self.agent is not None:
            workflow = skill_workflow(self._pick_skill(sub.skill))
        if not sub.goal and not sub.input:
            raise InvalidParamsError(message="the message has no text and no data part")
        try:
            await self.client.submit(sub.goal, input=sub.input, workflow=workflow,
                                     task_id=sub.task_id, metadata=sub.metadata)
        except ValueError as e:  # pydantic validation of the submission
            raise InvalidParamsError(message=str(e)) from e
        return sub.task_id

    async def _wait_terminal(self, task_id: str, timeout: float) -> TaskState:
        try:
            return await self.client.result(task_id, timeout=timeout)
        except TimeoutError:
            state = await self._state(task_id)
            assert state is not None
            return state

    async def _stream(self, task_id: str, after: int) -> AsyncGenerator[StreamEvent]:
        """The task folded up to `after`, then one event per later ledger entry."""
        entries = await self.client.ledger.read(task_id)
        state = fold(task_id, [e for e in entries if e.seq <= after])
        state.last_seq = max(state.last_seq, after)
        yield task_from_state(state)
        if state.terminal:
            return
        async for entry in self.client.ledger.follow(task_id, from_seq=after + 1):
            fold(task_id, [entry], state)
            yield entry_event(state, entry)
            if isinstance(entry.event, ev.TERMINAL_TASK_EVENTS):
                return

    # ------------------------------------------------------------------ the port

    async def on_message_send(self, params: SendMessageRequest, context: ServerCallContext
                              ) -> Task | Message:
        task_id = await self._submit(params)
        if params.configuration.return_immediately:
            state = await self._state(task_id) or TaskState(task_id=task_id)
        else:
            state = await self._wait_terminal(task_id, self.settings.send_wait_s)
        return task_from_state(state)

    async def on_message_send_stream(self, params: SendMessageRequest,
                                     context: ServerCallContext
                                     ) -> AsyncGenerator[StreamEvent]:
        task_id = await self._submit(params)
        async for event in self._stream(task_id, 0):
            yield event

    async def on_subscribe_to_task(self, params: SubscribeToTaskRequest,
                                   context: ServerCallContext) -> AsyncGenerator[StreamEvent]:
        resume = _resume_from(context)
        state = await self._state(params.id)
        if state is None:
            raise TaskNotFoundError(message=f"task {params.id} not found")
        if resume is None:
            if state.terminal:
                raise UnsupportedOperationError(
                    message=f"task {params.id} is {state.status.value}; nothing to follow "
                            "(resume with Last-Event-ID to read the events after a sequence)")
            resume = state.last_seq
        async for event in self._stream(params.id, resume):
            yield event

    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext
                          ) -> Task | None:
        state = await self._state(params.id)
        if state is None:
            return None
        task = task_from_state(state)
        if params.HasField("history_length") and params.history_length == 0:
            del task.history[:]
        return task

    async def on_list_tasks(self, params: ListTasksRequest, context: ServerCallContext
                            ) -> ListTasksResponse:
        states = [s for s in await all_tasks(self.client.ledger) if s.submitted is not None]
        if params.context_id:
            states = [s for s in states
                      if s.submitted and s.submitted.metadata.get(META_CONTEXT)
                      == params.context_id]
        if params.status != A2AState.TASK_STATE_UNSPECIFIED:
            wanted = jetmesh_status(params.status)
            states = [s for s in states if s.status == wanted]
        if params.HasField("status_timestamp_after"):
            after = params.status_timestamp_after.ToDatetime(tzinfo=None)
            states = [s for s in states
                      if s.updated_at and s.updated_at.replace(tzinfo=None) > after]
        size = params.page_size or DEFAULT_LIST_TASKS_PAGE_SIZE
        if not 1 <= size <= MAX_LIST_TASKS_PAGE_SIZE:
            raise InvalidParamsError(message=f"page_size must be 1..{MAX_LIST_TASKS_PAGE_SIZE}")
        try:
            start = int(params.page_token or 0)
        except ValueError as e:
            raise InvalidParamsError(message="invalid page_token") from e
        page = states[start:start + size]
        history = params.history_length if params.HasField("history_length") else 0
        tasks = [task_from_state(s, history=history != 0,
                                 artifacts=params.include_artifacts) for s in page]
        nxt = str(start + size) if start + size < len(states) else ""
        return ListTasksResponse(tasks=tasks, next_page_token=nxt, page_size=size,
                                 total_size=len(states))

    async def on_cancel_task(self, params: CancelTaskRequest, context: ServerCallContext
                             ) -> Task | None:
        state = await self._state(params.id)
        if state is None:
            return None
        if state.terminal:
            raise TaskNotCancelableError(
                message=f"task {params.id} is already {state.status.value}")
        try:
            await self.client.cancel(params.id, "canceled over A2A")
        except ControlRefused as e:  # it ended since the look above
            raise TaskNotCancelableError(message=str(e)) from e
        state = await self._wait_terminal(params.id, self.settings.cancel_wait_s)
        return task_from_state(state)

    async def on_create_task_push_notification_config(
            self, params: TaskPushNotificationConfig, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        raise PushNotificationNotSupportedError

    async def on_get_task_push_notification_config(
            self, params: GetTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        raise PushNotificationNotSupportedError

    async def on_list_task_push_notification_configs(
            self, params: ListTaskPushNotificationConfigsRequest, context: ServerCallContext
    ) -> ListTaskPushNotificationConfigsResponse:
        raise PushNotificationNotSupportedError

    async def on_delete_task_push_notification_config(
            self, params: DeleteTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> None:
        raise PushNotificationNotSupportedError

    async def on_get_extended_agent_card(
            self, params: GetExtendedAgentCardRequest, context: ServerCallContext
    ) -> AgentCard:
        raise ExtendedAgentCardNotConfiguredError


# ----------------------------------------------------------------------------- the app


def _etag(card: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in card.items() if k != "signatures"}, sort_keys=True)
    return f'W/"{hashlib.sha256(body.encode()).hexdigest()}"'


@dataclass
class _Cards:
    registry: Registry
    base_url: str
    nats_url: str | None
    signer: CardSigner | None

    def mesh(self) -> AgentCard:
        card = mesh_card(self.registry.skills().values(), base_url=self.base_url,
                         nats_url=self.nats_url)
        return self.signer.sign(card) if self.signer else card

    def agent(self, name: str) -> AgentCard | None:
        """The agent's verified card plus the gateway's HTTP interfaces for it.

        Adding interfaces changes the card: the gateway signs it again with its own key
        when it has one (without one, the served card is unsigned).
        """
        live = self.registry.agent(name)
        if live is None:
            return None
        card = AgentCard()
        card.CopyFrom(live.card)
        base = agent_http_base(self.base_url, name)
        if not any(i.url.startswith(base) for i in card.supported_interfaces):
            card.supported_interfaces.extend(http_interfaces(base))
            del card.signatures[:]
            if self.signer:
                card = self.signer.sign(card)
        return card


class _AgentApps:
    """ASGI app under ``/agents/{name}``: one small SDK app per agent, made on first use."""

    def __init__(self, make: Callable[[str], Starlette]) -> None:
        self._make = make
        self._apps: dict[str, Starlette] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = str(scope.get("path_params", {}).get("name", ""))
        app = self._apps.get(name)
        if app is None:
            app = self._apps[name] = self._make(name)
        await app(scope, receive, send)


def build_app(client: Client, registry: Registry, *, base_url: str,
              settings: GatewaySettings | None = None, nats_url: str | None = None,
              signer: CardSigner | None = None) -> Starlette:
    """The gateway's Starlette app (the caller owns `client` and `registry`)."""
    settings = settings or GatewaySettings()
    cards = _Cards(registry, base_url.rstrip("/"), nats_url, signer)
    cache = f"public, max-age={settings.card_max_age_s}"

    async def live_mesh_card(_: AgentCard) -> AgentCard:
        return cards.mesh()

    def agent_app(name: str) -> Starlette:
        handler = MeshRequestHandler(client, registry, settings, agent=name)

        async def agent_card(request: Request) -> Response:
            card = cards.agent(name)
            if card is None:
                return JSONResponse({"error": f"agent {name!r} is not live"}, status_code=404)
            body = card_to_dict(card)
            headers = {"ETag": _etag(body), "Cache-Control": cache}
            if request.headers.get("if-none-match") == headers["ETag"]:
                return Response(status_code=304, headers=headers)
            return JSONResponse(body, headers=headers)

        routes: list[BaseRoute] = [
            Route("/.well-known/agent-card.json", agent_card, methods=["GET"]),
            *create_jsonrpc_routes(handler, "/"),
            *create_rest_routes(handler),
        ]
        return Starlette(routes=routes)

    handler = MeshRequestHandler(client, registry, settings)
    routes: list[BaseRoute] = [
        *create_agent_card_routes(cards.mesh(), card_modifier=live_mesh_card,
                                  cache_control=cache),
        Mount("/agents/{name}", app=_AgentApps(agent_app)),
        ui_mount(client, registry),  # the dashboard at /ui (a2a/ui)
        *create_jsonrpc_routes(handler, "/"),
        *create_rest_routes(handler),
    ]
    return Starlette(routes=routes, middleware=[Middleware(BodyCheck)])


# ----------------------------------------------------------------------------- serving


class GatewayServer:
    """Runs the gateway in the current event loop (uvicorn); `start()` returns its URL."""

    def __init__(self, nats_url: str, *, settings: GatewaySettings | None = None,
                 signer: CardSigner | None = None,
                 verifier: CardVerifier | None = None) -> None:
        self.nats_url = nats_url
        self.settings = settings or GatewaySettings()
        self.signer = signer
        self.verifier = verifier
        self._task: asyncio.Task[None] | None = None
        self._server: Any = None
        self.client: Client | None = None
        self.registry: Registry | None = None
        self.url = ""

    async def start(self) -> str:
        import uvicorn

        self.client = Client(self.nats_url)
        await self.client.connect()
        self.registry = await Registry.open(self.client.js, ttl_s=self.settings.agent_ttl_s,
                                            verifier=self.verifier)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.settings.host, self.settings.port))
        port = sock.getsockname()[1]
        self.url = self.settings.public_url or f"http://{self.settings.host}:{port}"
        app = build_app(self.client, self.registry, base_url=self.url, settings=self.settings,
                        nats_url=self.nats_url, signer=self.signer)
        config = uvicorn.Config(app, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="gateway")
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.02)
        log.info("A2A gateway at %s", self.url)
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 5)
        if self.registry is not None:
            await self.registry.close()
        if self.client is not None:
            await self.client.close()


async def serve_until(stop: Awaitable[Any], nats_url: str, *,
                      settings: GatewaySettings | None = None,
                      signer: CardSigner | None = None,
                      verifier: CardVerifier | None = None) -> None:
    """Run a gateway until `stop` completes (``jetmesh gateway`` calls this)."""
    server = GatewayServer(nats_url, settings=settings, signer=signer, verifier=verifier)
    await server.start()
    try:
        await stop
    finally:
        await server.stop()
