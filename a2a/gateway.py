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
import hmac
import json
import logging
import socket
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
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
    Role,
    SendMessageConfiguration,
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
from a2a.utils.push_url_validator import validate_push_notification_url
from google.protobuf.json_format import MessageToDict
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from jetmesh.a2a import auth
from jetmesh.a2a.edge import BodyCheck, TraceContext, quiet_sdk_logs
from jetmesh.a2a.mcp_server import MeshMcpServer
from jetmesh.agents.cards import agent_http_base, card_to_dict, http_interfaces, mesh_card
from jetmesh.agents.directory import skills_of, visible_to
from jetmesh.agents.registry import Registry
from jetmesh.agents.signing import CardSigner, CardVerifier
from jetmesh.bus import events as ev
from jetmesh.bus import headers as hn
from jetmesh.bus import tracing
from jetmesh.bus.settings import GATEWAY_PORT, LOCAL_NATS_URL, BusSettings
from jetmesh.bus.subjects import InvalidIdError, check_id
from jetmesh.bus.tracecontext import parse_traceparent
from jetmesh.orchestrator.client import AmbiguousApproval, Client, ControlRefused, TaskExists
from jetmesh.orchestrator.projection import all_tasks
from jetmesh.orchestrator.service import OrchestratorSettings
from jetmesh.orchestrator.state import TaskState, TaskStatus, fold
from jetmesh.orchestrator.tasks_kv import current_summaries
from jetmesh.orchestrator.workflows import builtin_registry

from .asyncapi import asyncapi_document, asyncapi_html
from .push import PushNotifications, check_push_config
from .tasks import (
    META_CONTEXT,
    StreamEvent,
    Submission,
    answer_of,
    context_of,
    decision_of,
    entry_event,
    interrupted,
    jetmesh_status,
    message_to_submission,
    plain,
    questions,
    skill_workflow,
    step_of,
    task_from_state,
    upto,
)
from .ui import mount as ui_mount

__all__ = ["GatewayServer", "GatewaySettings", "MeshRequestHandler", "build_app"]

log = logging.getLogger("jetmesh.gateway")
RESUME_HEADER = hn.LAST_EVENT_ID


MCP_PATH = "/mcp"
"""Where the gateway serves the mesh as an MCP server (streamable HTTP)."""


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JETMESH_GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = GATEWAY_PORT
    public_url: str | None = None
    """Base URL put in cards (default: http://host:port)."""
    send_wait_s: float = 60.0
    """A blocking SendMessage waits this long for a terminal or interrupted state (the
    task waits for an approval), then returns the task as it is."""
    submit_wait_s: float = 10.0
    """How long a send waits for the orchestrator to take the submission (the task is in
    the ledger); after that the gateway answers for the task from the submission."""
    approver_token: SecretStr | None = None
    """Follow-up messages may approve or deny a gated call only with this token in the
    `Jetmesh-Approver-Token` header (unset: the gateway takes no approvals)."""
    approver_user: str | None = None
    """The approver role's NATS user (with approver_password, or approver_creds); the
    gateway's own user may not write approvals. Unset: the gateway's own settings."""
    approver_password: SecretStr | None = None
    approver_creds: Path | None = None
    id: str | None = None
    """This gateway's id (unique per live gateway; default: host, pid and a random
    part). A gateway restarted with the same id takes its push lease back at once."""
    push_delivery: bool = True
    """Take part in push delivery: the gateways that do share one lease (a2a/push), and
    its holder delivers. Off: this gateway stores configs only."""
    push_lease_s: float = 5.0
    """The push delivery lease: renewed every third of it; another gateway takes over
    when its holder went that long without renewing (a gateway killed with kill -9)."""
    push_private_urls: bool = False
    """Allow webhooks on loopback and private addresses (tests, one host). Off: the
    SDK's URL check refuses them (no requests into the gateway's own network)."""
    cancel_wait_s: float = 10.0
    card_max_age_s: int = 5
    """``Cache-Control: max-age`` of cards (cards change as agents come and go)."""
    agent_ttl_s: float = 5.0


APPROVER_HEADER = "jetmesh-approver-token"
_NEVER = 2 ** 62
"""A sequence no ledger reaches: wait for the task's end only."""


@dataclass(frozen=True)
class _Sent:
    """A message taken: its task and the ledger sequence from which to wait or stream."""

    task_id: str
    after: int


@dataclass(frozen=True)
class _Listed:
    """What ListTasks filters and orders a task by (before it folds the page's tasks)."""

    task_id: str
    status: TaskStatus
    updated_at: datetime | None
    tenant: str | None
    context_id: str | None


def _traceparent(context: ServerCallContext) -> str | None:
    """The task's parent context: the gateway's own span of this call (`TraceContext`,
    under the caller's), else the caller's W3C traceparent header."""
    current = tracing.current_traceparent()
    if current and parse_traceparent(current):
        return current
    headers = context.state.get("headers") or {}
    value = headers.get(hn.TRACEPARENT)
    return str(value) if value and parse_traceparent(str(value)) else None


def _trim_history(task: Task, length: int) -> None:
    """Keep the last `length` history messages (0: none)."""
    if length < len(task.history):
        keep = list(task.history)[len(task.history) - length:] if length else []
        del task.history[:]
        task.history.extend(keep)


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


async def _decided(approver: Client, task_id: str, granted: bool, verb: str, *,
                   step: str | None, tool: str | None, args_hash: str | None, reason: str,
                   by: str) -> _Sent:
    """A follow-up's decision (an approval, a denial or an answer) written as the
    approver, its refusals as the A2A errors a client can act on."""
    try:
        _, seq = await approver.decide(task_id, granted, step=step, tool=tool,
                                       args_hash=args_hash, reason=reason, by=by)
    except AmbiguousApproval as e:
        raise InvalidParamsError(message=f"{e} (data part 'step', 'tool' or "
                                         "'argsHash')") from e
    except ControlRefused as e:
        raise InvalidParamsError(message=str(e)) from e
    except PermissionError as e:
        raise UnsupportedOperationError(message=f"this gateway may not {verb}: {e}") from e
    return _Sent(task_id, seq)


class MeshRequestHandler(RequestHandler):
    """The SDK's request-handler port implemented on the jetmesh ledger.

    With `agent` set, messages run one of that agent's skills (metadata ``skill`` picks
    which; an agent with one skill needs none).
    """

    def __init__(self, client: Client, registry: Registry, settings: GatewaySettings,
                 agent: str | None = None, *, approver: Client | None = None,
                 push: PushNotifications | None = None) -> None:
        self.client = client
        self.registry = registry
        self.settings = settings
        self.agent = agent
        self.approver = approver
        """A connection as the approver role (follow-up approvals), if the gateway has one."""
        self.push = push
        self._unseen: dict[str, Submission] = {}
        """Tasks submitted here that the ledger did not show within submit_wait_s."""

    # ------------------------------------------------------------------ helpers

    async def _state(self, task_id: str) -> TaskState | None:
        try:
            state = await self.client.state(task_id)
        except InvalidIdError:
            return None
        if state.submitted is not None or state.last_seq:
            self._unseen.pop(task_id, None)
            # Another tenant's task is not found (a2a/auth).
            return state if auth.may_see(state.submitted.tenant if state.submitted
                                         else None) else None
        return self._unseen_state(task_id) if task_id in self._unseen else None

    def _pick_skill(self, asked: str | None) -> str:
        assert self.agent is not None
        live = self.registry.agent(self.agent)
        if live is None or not auth.may_use(live.tenants):  # another tenant's: not here
            raise InvalidParamsError(message=f"agent {self.agent!r} is not live")
        ids = live.skill_ids
        if asked is None and len(ids) == 1:
            return ids[0]
        if asked not in ids:
            raise InvalidParamsError(
                message=f"agent {self.agent!r} offers skills {ids}; name one in message "
                        f"metadata 'skill'")
        return asked

    def _check_message(self, msg: Message) -> None:
        """What A2A 1.0 requires of a client's message (the SDK's parser lets it pass)."""
        if not msg.message_id:
            raise InvalidParamsError(message="message.messageId is required")
        if msg.role != Role.ROLE_USER:
            raise InvalidParamsError(message="message.role must be ROLE_USER")
        if not msg.parts:
            raise InvalidParamsError(message="message.parts must not be empty")
        for i, p in enumerate(msg.parts):
            if p.WhichOneof("content") is None:
                raise InvalidParamsError(message=f"message.parts[{i}] has no content "
                                                 "(text, data, raw or url)")
        for what, value in (("taskId", msg.task_id), ("contextId", msg.context_id)):
            if value:
                try:
                    check_id(value, what)
                except InvalidIdError as e:
                    raise InvalidParamsError(message=str(e)) from e

    def _check_configuration(self, params: SendMessageRequest) -> None:
        conf = params.configuration
        if conf.HasField("history_length") and conf.history_length < 0:
            raise InvalidParamsError(message="configuration.historyLength must be >= 0")
        if conf.HasField("task_push_notification_config"):
            check_push_config(conf.task_push_notification_config)

    async def _submit(self, params: SendMessageRequest, context: ServerCallContext) -> _Sent:
        if not params.HasField("message"):
            raise InvalidParamsError(message="message is required")
        msg = params.message
        self._check_message(msg)
        self._check_configuration(params)
        if params.configuration.HasField("task_push_notification_config") \
                and self.push is not None:  # its URL policy, before the task is submitted
            await self.push.check(params.configuration.task_push_notification_config)
        if msg.task_id:
            return await self._follow_up(msg, context)
        req_meta = plain(MessageToDict(params.metadata)) if params.HasField("metadata") else {}
        for key in ("workflow", "skill"):
            for meta in (req_meta, plain(MessageToDict(msg.metadata))):
                if key in meta and not isinstance(meta[key], str):
                    raise InvalidParamsError(message=f"metadata {key!r} must be a string")
        sub = message_to_submission(msg, req_meta)
        workflow = sub.workflow
        if self.agent is not None:
            workflow = skill_workflow(self._pick_skill(sub.skill))
        if not sub.goal and not sub.input:
            raise InvalidParamsError(message="the message has no text and no data part")
        try:
            await self.client.submit(sub.goal, input=sub.input, workflow=workflow,
                                     task_id=sub.task_id, metadata=sub.metadata,
                                     traceparent=_traceparent(context),
                                     tenant=auth.tenant(), submitted_by=auth.submitted_by())
        except TaskExists as e:
            raise InvalidParamsError(message=f"{e} (a messageId names one task)") from e
        except ValueError as e:  # pydantic validation of the submission
            raise InvalidParamsError(message=str(e)) from e
        first = await self._known(sub.task_id, sub)
        if params.configuration.HasField("task_push_notification_config") \
                and self.push is not None:
            await self.push.register(sub.task_id, params.configuration
                                     .task_push_notification_config, context, from_seq=1)
        return _Sent(sub.task_id, first)

    async def _known(self, task_id: str, sub: Submission) -> int:
        """Wait until the ledger holds the task (the orchestrator took the submission), so
        that GetTask answers it at once; returns its first entry's sequence. If the
        orchestrator does not answer in time, the gateway answers for it from the
        submission until it does (0)."""
        async def first() -> int:
            async for entry in self.client.ledger.follow(task_id, from_seq=1):
                return entry.seq
            return 0
        try:
            return await asyncio.wait_for(first(), self.settings.submit_wait_s)
        except TimeoutError:
            self._unseen[task_id] = sub
            return 0

    async def _follow_up(self, msg: Message, context: ServerCallContext) -> _Sent:
        """A message on an existing task: the answer to what it waits for."""
        state = await self._state(msg.task_id)
        if state is None:
            raise TaskNotFoundError(message=f"task {msg.task_id} not found")
        if msg.context_id and msg.context_id != context_of(state):
            raise InvalidParamsError(message=f"task {msg.task_id} is in context "
                                             f"{context_of(state)}, not {msg.context_id}")
        if state.terminal:
            raise UnsupportedOperationError(
                message=f"task {msg.task_id} is {state.status.value} and takes no more "
                        f"messages; send a new message with contextId {context_of(state)} "
                        "to continue in its context")
        if not interrupted(state):
            raise UnsupportedOperationError(
                message=f"task {msg.task_id} is {state.status.value}: it takes a message "
                        "only while input-required")
        decision = decision_of(msg)
        asked = questions(state)
        if asked and (decision is None or len(asked) == len(state.pending_approvals)):
            return await self._answer(msg, state, asked)
        if decision is None:
            raise InvalidParamsError(message=f"task {msg.task_id} waits for an approval: "
                                             "answer 'approve' or 'deny <reason>'")
        approver = await self._approver(context)
        by = plain(MessageToDict(msg.metadata)).get("by") if msg.HasField("metadata") else None
        return await _decided(approver, msg.task_id, decision.granted, "approve",
                              step=decision.step, tool=decision.tool,
                              args_hash=decision.args_hash, reason=decision.reason,
                              by=auth.by(f"a2a:{by if isinstance(by, str) and by else 'approver'}"))

    async def _answer(self, msg: Message, state: TaskState,
                      asked: list[ev.ApprovalRequestedData]) -> _Sent:
        """The answer to the task's question (an `ask_user` call): whoever may see the
        task may answer it (it authorizes nothing else: the answer is bound to that
        call); written by the gateway's approver connection, the one that may write a
        task's approval subject."""
        answer = answer_of(msg)
        if not answer:
            raise InvalidParamsError(message=f"task {msg.task_id} asks: "
                                             f"{asked[0].arguments.get('question', '')!s:.300}"
                                             " - answer in a text part")
        if len(asked) > 1:
            wanted = step_of(msg)
            asked = [p for p in asked if p.step_id == wanted]
            if len(asked) != 1:
                raise InvalidParamsError(message=f"task {msg.task_id} asks more than one "
                                                 "question: name the step (data part "
                                                 "'step')")
        if self.approver is None:
            raise UnsupportedOperationError(message=(
                "this gateway cannot pass answers on (it has no approver connection: "
                "JETMESH_GATEWAY_APPROVER_TOKEN and the approver's NATS user)"))
        q = asked[0]
        return await _decided(self.approver, msg.task_id, True, "answer", step=q.step_id,
                              tool=q.tool, args_hash=q.args_hash, reason=answer,
                              by=auth.by("a2a:user"))

    async def _approver(self, context: ServerCallContext) -> Client:
        token = self.settings.approver_token
        if token is None or self.approver is None:
            raise UnsupportedOperationError(
                message="this gateway takes no approvals (start it with "
                        "JETMESH_GATEWAY_APPROVER_TOKEN and the approver's NATS user)")
        headers = context.state.get("headers") or {}
        given = str(headers.get(APPROVER_HEADER, ""))
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            raise UnsupportedOperationError(
                message=f"an approval over A2A needs the approver's token in {APPROVER_HEADER}")
        return self.approver

    async def _wait_settled(self, task_id: str, after: int, timeout: float) -> TaskState:
        """The task once it is terminal or waits for its client (an interrupted state)
        at or after sequence `after`; after `timeout`, as it is then."""
        state = TaskState(task_id=task_id)

        async def wait() -> None:
            async for entry in self.client.ledger.follow(task_id, from_seq=1):
                fold(task_id, [entry], state)
                if state.terminal or (entry.seq >= after and interrupted(state)):
                    return
        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            return await self._state(task_id) or state
        return state

    async def _stream(self, task_id: str, after: int, *, until_interrupted: bool = False
                      ) -> AsyncGenerator[StreamEvent]:
        """The task folded up to `after`, then one event per later ledger entry; ends at
        the task's end (and, with `until_interrupted`, when it waits for its client)."""
        entries = await self.client.ledger.read(task_id)
        state = fold(task_id, upto(list(entries), after))
        if state.submitted is None and task_id in self._unseen:
            state = self._unseen_state(task_id)
        state.last_seq = max(state.last_seq, after)
        yield task_from_state(state)
        if state.terminal or (until_interrupted and interrupted(state)):
            return
        async for entry in self.client.ledger.follow(task_id, from_seq=after + 1):
            fold(task_id, [entry], state)
            yield entry_event(state, entry)
            if isinstance(entry.event, ev.TERMINAL_TASK_EVENTS) or (
                    until_interrupted and interrupted(state)):
                return

    def _unseen_state(self, task_id: str) -> TaskState:
        """A task the gateway submitted that the orchestrator has not written yet."""
        sub = self._unseen[task_id]
        state = TaskState(task_id=task_id)
        state.submitted = ev.TaskSubmittedData(goal=sub.goal, input=sub.input,
                                               workflow=sub.workflow, metadata=sub.metadata)
        return state

    # ------------------------------------------------------------------ the port

    async def on_message_send(self, params: SendMessageRequest, context: ServerCallContext
                              ) -> Task | Message:
        sent = await self._submit(params, context)
        if params.configuration.return_immediately:
            state = await self._state(sent.task_id) or TaskState(task_id=sent.task_id)
        else:
            state = await self._wait_settled(sent.task_id, sent.after,
                                             self.settings.send_wait_s)
        return self._shaped(task_from_state(state), params.configuration)

    @staticmethod
    def _shaped(task: Task, conf: SendMessageConfiguration) -> Task:
        if conf.HasField("history_length"):
            _trim_history(task, conf.history_length)
        return task

    async def on_message_send_stream(self, params: SendMessageRequest,
                                     context: ServerCallContext
                                     ) -> AsyncGenerator[StreamEvent]:
        sent = await self._submit(params, context)
        async for event in self._stream(sent.task_id, sent.after, until_interrupted=True):
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
        if not params.id:
            raise InvalidParamsError(message="id is required")
        if params.HasField("history_length") and params.history_length < 0:
            raise InvalidParamsError(message="historyLength must be >= 0")
        state = await self._state(params.id)
        if state is None:
            return None
        task = task_from_state(state)
        if params.HasField("history_length"):
            _trim_history(task, params.history_length)
        return task

    async def on_list_tasks(self, params: ListTasksRequest, context: ServerCallContext
                            ) -> ListTasksResponse:
        # Filter, order and page the task listing projection (jm-tasks, kept by the
        # dashboard's projector, plus the ledger's tail past it); only the page's tasks are
        # folded. Without a projection, or one too far behind: the whole ledger, folded.
        current = await current_summaries(self.client.js, self.client.ledger)
        if current is not None and current[1] == 0:
            rows: list[_Listed] = [_Listed(x.task_id, x.status, x.updated_at, x.tenant,
                                           x.context_id) for x in current[0]]
        else:
            rows = [_Listed(s.task_id, s.status, s.updated_at, s.submitted.tenant,
                            s.submitted.metadata.get(META_CONTEXT))
                    for s in await all_tasks(self.client.ledger) if s.submitted is not None]
        states = [r for r in rows if auth.may_see(r.tenant)]
        states.sort(key=lambda s: (s.updated_at.timestamp() if s.updated_at else 0.0,
                                   s.task_id), reverse=True)  # latest update first
        if params.context_id:
            states = [s for s in states if s.context_id == params.context_id]
        if params.status != A2AState.TASK_STATE_UNSPECIFIED:
            wanted = jetmesh_status(params.status)  # None: a state jetmesh tasks never take
            states = [s for s in states if wanted is not None and s.status == wanted]
        if params.HasField("status_timestamp_after"):
            after = params.status_timestamp_after.ToDatetime(tzinfo=None)
            states = [s for s in states
                      if s.updated_at and s.updated_at.replace(tzinfo=None) > after]
        size = params.page_size if params.HasField("page_size") \
            else DEFAULT_LIST_TASKS_PAGE_SIZE
        if not 1 <= size <= MAX_LIST_TASKS_PAGE_SIZE:
            raise InvalidParamsError(message=f"pageSize must be 1..{MAX_LIST_TASKS_PAGE_SIZE}")
        if params.HasField("history_length") and params.history_length < 0:
            raise InvalidParamsError(message="historyLength must be >= 0")
        try:
            start = int(params.page_token or 0)
        except ValueError as e:
            raise InvalidParamsError(message="invalid pageToken") from e
        if start < 0 or (start and start >= len(states)):
            raise InvalidParamsError(message="invalid pageToken")
        page = [await self.client.state(r.task_id) for r in states[start:start + size]]
        history = params.history_length if params.HasField("history_length") else 0
        tasks = [task_from_state(s, history=history != 0,
                                 artifacts=params.include_artifacts) for s in page]
        for t in tasks:
            _trim_history(t, history)
        nxt = str(start + size) if start + size < len(states) else ""
        return ListTasksResponse(tasks=tasks, next_page_token=nxt, page_size=len(tasks),
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
            await self.client.cancel(params.id, "canceled over A2A", by=auth.by("a2a"))
        except ControlRefused as e:  # it ended since the look above
            raise TaskNotCancelableError(message=str(e)) from e
        state = await self._wait_settled(params.id, _NEVER, self.settings.cancel_wait_s)
        return task_from_state(state)

    def _push(self) -> PushNotifications:
        if self.push is None:
            raise PushNotificationNotSupportedError
        return self.push

    async def on_create_task_push_notification_config(
            self, params: TaskPushNotificationConfig, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        push = self._push()
        state = await self._state(params.task_id)
        if state is None:
            raise TaskNotFoundError(message=f"task {params.task_id} not found")
        if state.terminal:
            raise UnsupportedOperationError(
                message=f"task {params.task_id} is {state.status.value}: nothing to notify")
        return await push.register(params.task_id, params, context,
                                   from_seq=state.last_seq + 1)

    async def on_get_task_push_notification_config(
            self, params: GetTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        push = self._push()
        if await self._state(params.task_id) is None:
            raise TaskNotFoundError(message=f"task {params.task_id} not found")
        try:
            found = await push.store.get_one(params.task_id, params.id or params.task_id)
        except InvalidIdError as e:
            raise InvalidParamsError(message=str(e)) from e
        if found is None:
            raise TaskNotFoundError(
                message=f"no push notification config {params.id!r} on task {params.task_id}")
        return found

    async def on_list_task_push_notification_configs(
            self, params: ListTaskPushNotificationConfigsRequest, context: ServerCallContext
    ) -> ListTaskPushNotificationConfigsResponse:
        push = self._push()
        if await self._state(params.task_id) is None:
            raise TaskNotFoundError(message=f"task {params.task_id} not found")
        configs = await push.store.get_info(params.task_id, context)
        return ListTaskPushNotificationConfigsResponse(configs=configs)

    async def on_delete_task_push_notification_config(
            self, params: DeleteTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> None:
        push = self._push()
        if await self._state(params.task_id) is None:
            raise TaskNotFoundError(message=f"task {params.task_id} not found")
        try:
            await push.store.delete_info(params.task_id, context, params.id or None)
        except InvalidIdError as e:
            raise InvalidParamsError(message=str(e)) from e

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
    push: bool = False
    """The gateway delivers push notifications (the card says so)."""

    def mesh(self) -> AgentCard:
        # A public card (cached by anyone): the shared agents' skills only; a tenant's
        # private agents are not announced to everyone.
        card = mesh_card(skills_of(visible_to(self.registry.agents(), None)).values(),
                         base_url=self.base_url, nats_url=self.nats_url)
        card.capabilities.push_notifications = self.push
        return self.signer.sign(card) if self.signer else card

    def agent(self, name: str) -> AgentCard | None:
        """The agent's verified card plus the gateway's HTTP interfaces for it.

        Adding interfaces changes the card: the gateway signs it again with its own key
        when it has one (without one, the served card is unsigned).
        """
        live = self.registry.agent(name)
        if live is None or not auth.may_use(live.tenants):
            return None  # another tenant's private agent is not there for this caller
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


def _contract_routes(nats_url: str | None) -> list[BaseRoute]:
    """``/asyncapi.json`` (the mesh's NATS contract, AsyncAPI 3.0) and ``/asyncapi``."""
    server = (nats_url or LOCAL_NATS_URL).split(",")[0].strip()
    made: dict[str, Any] = {}

    async def document(_: Request) -> Response:
        if "json" not in made:
            made["json"] = asyncapi_document(server)
        return JSONResponse(made["json"])

    async def page(_: Request) -> Response:
        if "html" not in made:
            made["html"] = asyncapi_html(server)
        return HTMLResponse(made["html"])

    return [Route("/asyncapi.json", document, methods=["GET"]),
            Route("/asyncapi", page, methods=["GET"])]


def build_app(client: Client, registry: Registry, *, base_url: str,
              settings: GatewaySettings | None = None, nats_url: str | None = None,
              signer: CardSigner | None = None, approver: Client | None = None,
              push: PushNotifications | None = None,
              auth_settings: auth.AuthSettings | None = None,
              mcp: MeshMcpServer | None = None) -> Starlette:
    """The gateway's Starlette app (the caller owns `client`, `registry`, `approver`,
    `push`, and `mcp`, whose session manager it runs: served at /mcp)."""
    settings = settings or GatewaySettings()
    quiet_sdk_logs()
    cards = _Cards(registry, base_url.rstrip("/"), nats_url, signer, push is not None)
    cache = f"public, max-age={settings.card_max_age_s}"

    async def live_mesh_card(_: AgentCard) -> AgentCard:
        return auth.declare(cards.mesh(), auth_settings)

    def agent_app(name: str) -> Starlette:
        handler = MeshRequestHandler(client, registry, settings, agent=name,
                                     approver=approver, push=push)

        async def agent_card(request: Request) -> Response:
            card = cards.agent(name)
            if card is None:
                return JSONResponse({"error": f"agent {name!r} is not live"}, status_code=404)
            body = card_to_dict(card)
            live = registry.agent(name)
            private = live is not None and live.tenants is not None
            headers = {hn.ETAG: _etag(body),
                       hn.CACHE_CONTROL: "private, no-store" if private else cache}
            if request.headers.get(hn.IF_NONE_MATCH) == headers[hn.ETAG]:
                return Response(status_code=304, headers=headers)
            return JSONResponse(body, headers=headers)

        routes: list[BaseRoute] = [
            Route("/.well-known/agent-card.json", agent_card, methods=["GET"]),
            *create_jsonrpc_routes(handler, "/"),
            *create_rest_routes(handler),
        ]
        return Starlette(routes=routes)

    handler = MeshRequestHandler(client, registry, settings, approver=approver, push=push)
    routes: list[BaseRoute] = [
        *create_agent_card_routes(cards.mesh(), card_modifier=live_mesh_card,
                                  cache_control=cache),
        Mount("/agents/{name}", app=_AgentApps(agent_app)),
        *_contract_routes(nats_url),
        ui_mount(client, registry),  # the dashboard at /ui (a2a/ui)
        # The mesh as an MCP server (streamable HTTP), behind the same authentication.
        *(mcp.http_app(path=MCP_PATH, host=settings.host).routes if mcp is not None else []),
        *create_jsonrpc_routes(handler, "/"),
        *create_rest_routes(handler),
    ]
    return Starlette(routes=routes, middleware=[Middleware(TraceContext), Middleware(BodyCheck),
                                                *auth.middleware(auth_settings)])


# ----------------------------------------------------------------------------- serving


def _quiet_server(config: Any) -> Any:
    """A uvicorn server that leaves the process's signals alone: the caller owns them
    (``jetmesh gateway`` stops on its own signal handling), and several servers in one
    process (tests, a restart) must not find another's bound SIGTERM handler, which
    sse-starlette reads to end every open stream."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None]:
            yield

    return Server(config)


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
        self.mcp: MeshMcpServer | None = None
        self._mcp_task: asyncio.Task[None] | None = None
        self._mcp_stop = asyncio.Event()
        self.client: Client | None = None
        self.approver: Client | None = None
        self.push: PushNotifications | None = None
        self.registry: Registry | None = None
        self.url = ""

    async def start(self) -> str:
        import uvicorn

        self.client = Client(self.nats_url)
        await self.client.connect()
        self.registry = await Registry.open(self.client.js, ttl_s=self.settings.agent_ttl_s,
                                            verifier=self.verifier)
        s = self.settings
        if s.approver_token is not None:
            bus = BusSettings()
            if s.approver_user or s.approver_creds:
                bus = bus.model_copy(update={
                    "nats_user": s.approver_user, "nats_creds": s.approver_creds,
                    "nats_password": s.approver_password.get_secret_value()
                    if s.approver_password else None,
                    "nats_inbox_prefix": None if s.approver_creds else
                    f"_INBOX_{s.approver_user}"})
            self.approver = Client(self.nats_url, settings=bus)
            await self.approver.connect()
        self.push = await PushNotifications.open(
            self.client.js, self.client.ledger, deliver=s.push_delivery, holder=s.id,
            lease_s=s.push_lease_s,
            url_validator=None if s.push_private_urls else validate_push_notification_url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.settings.host, self.settings.port))
        port = sock.getsockname()[1]
        self.url = self.settings.public_url or f"http://{self.settings.host}:{port}"
        token = s.approver_token.get_secret_value() if s.approver_token else None
        self.mcp = MeshMcpServer(self.client, self.registry,
                                 builtin_registry(OrchestratorSettings().workflows_dir),
                                 approver=self.approver, approver_token=token)
        app = build_app(self.client, self.registry, base_url=self.url, settings=self.settings,
                        nats_url=self.nats_url, signer=self.signer, approver=self.approver,
                        push=self.push, auth_settings=auth.AuthSettings.from_env(),
                        mcp=self.mcp)
        self._mcp_task = asyncio.create_task(self._run_mcp(), name="gateway-mcp")
        config = uvicorn.Config(app, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = _quiet_server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="gateway")
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.02)
        log.info("A2A gateway at %s", self.url)
        return self.url

    async def _run_mcp(self) -> None:
        """The MCP endpoint's session manager, for as long as the gateway serves."""
        assert self.mcp is not None
        async with self.mcp.server.session_manager.run():
            await self._mcp_stop.wait()

    async def stop(self) -> None:
        self._mcp_stop.set()
        if self._mcp_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._mcp_task, 5)
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 5)
        if self.push is not None:
            await self.push.close()
        if self.registry is not None:
            await self.registry.close()
        if self.approver is not None:
            await self.approver.close()
        if self.client is not None:
            await self.client.close()
