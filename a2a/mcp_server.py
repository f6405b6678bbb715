"""The mesh as an MCP server (``jetmesh mcp serve``): live skills and declared workflows
as MCP tools, tasks as resources, approvals as input requests.

Built on the SDK's low-level `Server` (revision 2026-07-28, stateless), over stdio or
streamable HTTP:

* ``tools/list``: every live skill of a verified card (``skill_<id>``, the skill's input
  schema) and every declared workflow (``workflow_<name>``: ``goal`` and ``input``), plus
  ``task_status`` and ``approve``. The list changes as agents come and go, so it carries
  a short cache hint (``ttlMs``).
* ``tools/call`` of a skill or workflow submits a task and follows its ledger, sending a
  progress notification for each step that ends, until the task ends (its result is the
  structured content; a failure is an error result). When the task waits for an
  approval and the client can answer input requests (elicitation), the call returns an
  input request bound to the pending call (tool, arguments, their hash); the client's
  answer approves or denies exactly that call and the call resumes following the task
  (the request state, sealed by the SDK, names the task). A client that cannot answer
  keeps waiting until someone approves elsewhere or ``wait_s`` passes.
* ``resources``: ``jetmesh://tasks/{task_id}`` reads a task's state.

Authentication is the gateway's. With its credentials configured
(``JETMESH_GATEWAY_AUTH_FILE``, a2a/auth) every HTTP request carries an API key or a
bearer token, the gateway's middleware checks the role (a2a.auth `allowed`: listing and
``task_status`` read, a tool call submits, ``approve`` and answering an input request
approve) and the server acts as that identity: its tasks are submitted with its tenant
and recorded as submitted by it, and a task of another tenant is not found (status,
resource, approval, a resumed call). Over stdio, ``jetmesh mcp serve`` takes the
identity of the API key in ``JETMESH_API_KEY`` (`identity`). Without credentials
configured: anyone who reaches it may submit, and approvals need the approver's token
(``JETMESH_GATEWAY_APPROVER_TOKEN``; over HTTP in the ``Jetmesh-Approver-Token`` header;
over stdio the local user who started the server is trusted with the approver role it
connects as).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import mcp.types as types
from mcp.server.caching import CacheHint
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.request_state import RequestStateBoundary, RequestStateSecurity
from mcp_types import ElicitRequestFormParams, InputRequiredResult

from jetmesh.a2a import auth
from jetmesh.agents.directory import skills_of, visible_to
from jetmesh.agents.registry import Registry
from jetmesh.agents.spec import SkillSpec
from jetmesh.bus import events as ev
from jetmesh.orchestrator.client import Client, ControlRefused
from jetmesh.orchestrator.state import TaskState, TaskStatus, apply
from jetmesh.orchestrator.workflows import WorkflowRegistry

__all__ = ["APPROVER_HEADER", "TASK_URI", "MeshMcpServer"]

log = logging.getLogger("jetmesh.mcp.serve")

APPROVER_HEADER = "jetmesh-approver-token"
"""The gateway's approver header (the same token unlocks approvals here)."""
TASK_URI = "jetmesh://tasks/{task_id}"
SKILL_PREFIX = "skill_"
WORKFLOW_PREFIX = "workflow_"
_WORKFLOW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"goal": {"type": "string", "description": "What the task is for."},
                   "input": {"type": "object", "description": "The task's input."}},
}
_APPROVE_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["task_id", "approve"],
    "properties": {"task_id": {"type": "string"}, "approve": {"type": "boolean"},
                   "args_hash": {"type": "string",
                                 "description": "Which pending call (when several)."},
                   "reason": {"type": "string"}},
}
_STATUS_SCHEMA: dict[str, Any] = {"type": "object", "required": ["task_id"],
                                  "properties": {"task_id": {"type": "string"}}}


def _key(p: ev.ApprovalRequestedData) -> str:
    """The input request key of one pending approval (bound to its exact call)."""
    return f"approve:{p.step_id}:{p.args_hash}"


def _text(data: Any) -> list[types.TextContent]:
    return [types.TextContent(type="text", text=json.dumps(data, ensure_ascii=False,
                                                           sort_keys=True, default=str))]


def _error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)],
                                is_error=True)


def task_summary(state: TaskState) -> dict[str, Any]:
    """A task as a tool result or resource: status, result, failure, pending approvals."""
    out: dict[str, Any] = {"task_id": state.task_id, "status": state.status.value,
                           "steps": {k: s.status for k, s in sorted(state.steps.items())}}
    if state.result is not None:
        out["result"] = state.result
    if state.code:
        out["code"], out["reason"] = state.code, state.reason
    if state.pending_approvals:
        out["pending_approvals"] = [
            {"step": p.step_id, "tool": p.tool, "arguments": p.arguments,
             "args_hash": p.args_hash, "reason": p.reason}
            for p in state.pending_approvals.values()]
    return out


@dataclass
class MeshMcpServer:
    """Serves one mesh (through its `Client` and the live `Registry`) over MCP."""

    client: Client
    registry: Registry
    workflows: WorkflowRegistry
    approver: Client | None = None
    """The connection approvals are written with (the approver's NATS login); None:
    `client`."""
    approver_token: str | None = None
    """Over HTTP, approvals need this token in `APPROVER_HEADER` (None: refused)."""
    trust_local: bool = False
    """stdio: the local user may approve without the token."""
    wait_s: float = 600.0
    """How long a call follows its task before it returns the task as it is."""
    list_ttl_ms: int = 2000
    """The tool list's cache hint (agents come and go)."""
    name: str = "jetmesh"
    identity: auth.Identity | None = None
    """Who every request is (stdio with an API key); None: each HTTP request's identity
    from the gateway's authentication, or none when that is off."""
    server: Server[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.server = Server(
            self.name, version="0.1.0",
            instructions="Run jetmesh skills and workflows as tasks; each call follows its "
                         "task to the end with progress notifications.",
            cache_hints={"tools/list": CacheHint(ttl_ms=self.list_ttl_ms, scope="private")},
            on_list_tools=self._list_tools, on_call_tool=self._call_tool,
            on_list_resources=self._list_resources,
            on_list_resource_templates=self._list_templates,
            on_read_resource=self._read_resource)
        self.server.middleware.append(RequestStateBoundary(
            RequestStateSecurity.ephemeral(), default_audience=self.name))

    # ------------------------------------------------------------------ tools

    def _skills(self, ctx: ServerRequestContext[Any] | None) -> dict[str, SkillSpec]:
        """The skills this caller may run: the shared agents' and its tenant's private
        agents' (every one for an admin or with authentication off)."""
        who = self._who(ctx) if ctx is not None else None
        if ctx is None or who is None or who.role == "admin":
            return self.registry.skills()
        return skills_of(visible_to(self.registry.agents(), who.tenant))

    def _tools(self, ctx: ServerRequestContext[Any] | None = None) -> list[types.Tool]:
        tools = [types.Tool(name=SKILL_PREFIX + sid, description=s.description or s.name,
                            input_schema=s.input_schema, title=s.name)
                 for sid, s in sorted(self._skills(ctx).items())]
        for name in self.workflows.names():
            wf = self.workflows.get(name)
            tools.append(types.Tool(
                name=WORKFLOW_PREFIX + name, input_schema=_WORKFLOW_SCHEMA,
                description=(wf.description if wf else "") or f"Run workflow {name}."))
        tools.append(types.Tool(name="task_status", input_schema=_STATUS_SCHEMA,
                                description="A task's status, result and pending approvals.",
                                annotations=types.ToolAnnotations(read_only_hint=True)))
        tools.append(types.Tool(name="approve", input_schema=_APPROVE_SCHEMA,
                                description="Approve or deny a task's pending gated call "
                                            "(needs the approver's token).",
                                annotations=types.ToolAnnotations(destructive_hint=True)))
        return tools

    async def _list_tools(self, ctx: ServerRequestContext[Any],
                          params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=self._tools(ctx))

    def _who(self, ctx: ServerRequestContext[Any]) -> auth.Identity | None:
        if self.identity is not None:
            return self.identity
        return auth.identity_of(ctx.request) if ctx.request is not None else auth.current()

    def _by(self, ctx: ServerRequestContext[Any]) -> str:
        who = self._who(ctx)
        return who.label if who is not None else "mcp"

    async def _state(self, ctx: ServerRequestContext[Any], task_id: str) -> TaskState:
        """The task's state, if the caller may see it (else: no such task)."""
        state = await self.client.state(task_id)
        who = self._who(ctx)
        if who is None:
            return state
        tenant = state.submitted.tenant if state.submitted is not None else None
        if state.submitted is None or not auth.sees(who, tenant):
            raise ValueError(f"no task {task_id!r}")
        return state

    def _may_approve(self, ctx: ServerRequestContext[Any]) -> bool:
        who = self._who(ctx)
        if who is not None:
            return who.role in ("approver", "admin")
        if self.trust_local and ctx.request is None:
            return True
        request = ctx.request
        headers = getattr(request, "headers", None)
        given = str(headers.get(APPROVER_HEADER, "")) if headers is not None else ""
        return bool(self.approver_token) and hmac.compare_digest(
            given.encode(), (self.approver_token or "").encode())

    async def _call_tool(self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
                         ) -> types.CallToolResult | InputRequiredResult:
        args = dict(params.arguments or {})
        name = params.name
        if self.identity is not None and not auth.allowed(
                self.identity.role, f"mcp:tools/call:{name}", bool(params.input_responses)):
            # Over HTTP the gateway's middleware refused it already; stdio checks here.
            return _error(f"role {self.identity.role} may not call {name}")
        try:
            if name == "task_status":
                return self._result(await self._state(ctx, str(args.get("task_id", ""))))
            if name == "approve":
                return await self._approve_tool(ctx, args)
            answered: set[str] = set()
            if params.request_state:  # a resumed call: the task it submitted
                task_id = params.request_state
                await self._state(ctx, task_id)
                answered = await self._answer(ctx, task_id, params.input_responses or {})
            else:
                task_id = await self._submit(ctx, name, args)
        except (ControlRefused, ValueError) as e:
            return _error(str(e))
        return await self._follow(ctx, task_id, answered)

    async def _submit(self, ctx: ServerRequestContext[Any], name: str, args: dict[str, Any]
                      ) -> str:
        who = self._who(ctx)
        as_who: dict[str, Any] = {} if who is None else {"tenant": who.tenant,
                                                         "submitted_by": who.label}
        if name.startswith(SKILL_PREFIX) and name[len(SKILL_PREFIX):] in self._skills(ctx):
            return await self.client.submit(f"MCP call of {name}", input=args,
                                            workflow=f"skill:{name[len(SKILL_PREFIX):]}",
                                            metadata={"via": "mcp"}, **as_who)
        if name.startswith(WORKFLOW_PREFIX) and \
                self.workflows.get(name[len(WORKFLOW_PREFIX):]) is not None:
            task_input = args.get("input") or {}
            if not isinstance(task_input, dict):
                raise ValueError("'input' must be an object")
            return await self.client.submit(str(args.get("goal", "")), input=task_input,
                                            workflow=name[len(WORKFLOW_PREFIX):],
                                            metadata={"via": "mcp"}, **as_who)
        raise ValueError(f"unknown tool {name!r} (no live skill or declared workflow by that "
                         "name)")

    def _result(self, state: TaskState) -> types.CallToolResult:
        summary = task_summary(state)
        return types.CallToolResult(content=_text(summary), structured_content=summary,
                                    is_error=state.status in (TaskStatus.FAILED,
                                                              TaskStatus.REJECTED))

    async def _follow(self, ctx: ServerRequestContext[Any], task_id: str,
                      answered: set[str] | None = None
                      ) -> types.CallToolResult | InputRequiredResult:
        """Follow the task until it ends (progress per step), waits for an approval this
        client can answer (an input request), or `wait_s` passes."""
        state = TaskState(task_id=task_id)
        done: set[str] = set()
        asks = self._may_approve(ctx) and self._elicits(ctx)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.wait_s):
                async for entry in self.client.follow(task_id):
                    state = apply(state, entry, check_seq=False)
                    event = entry.event
                    if isinstance(event, ev.StepCompleted | ev.StepFailed) and \
                            event.data.step_id not in done:
                        done.add(event.data.step_id)
                        total = max(len(state.plan), len(done))
                        await ctx.session.report_progress(
                            len(done), total, f"step {event.data.step_id}: "
                            f"{'completed' if isinstance(event, ev.StepCompleted) else 'failed'}")
                    if asks and state.status is TaskStatus.INPUT_REQUIRED:
                        ask = [p for p in state.pending_approvals.values()
                               if _key(p) not in (answered or set())]
                        if ask:
                            return self._ask(task_id, ask)
        if not state.terminal:
            state = await self.client.state(task_id)
        return self._result(state)

    @staticmethod
    def _elicits(ctx: ServerRequestContext[Any]) -> bool:
        caps = ctx.session.client_capabilities
        return caps is not None and caps.elicitation is not None

    def _ask(self, task_id: str, pending: list[ev.ApprovalRequestedData]
             ) -> InputRequiredResult:
        requests: dict[str, types.ElicitRequest] = {}
        for p in pending:
            args = json.dumps(p.arguments, ensure_ascii=False, sort_keys=True)
            requests[_key(p)] = types.ElicitRequest(
                params=ElicitRequestFormParams(
                    message=(f"Task {task_id}, step {p.step_id} asks to call {p.tool} "
                             f"({p.risk}) with {args}: {p.reason}. Approve?"),
                    requested_schema={"type": "object", "required": ["approve"],
                                      "properties": {"approve": {"type": "boolean"},
                                                     "reason": {"type": "string"}}}))
        return InputRequiredResult(input_requests=requests,  # type: ignore[arg-type]
                                   request_state=task_id)

    async def _answer(self, ctx: ServerRequestContext[Any], task_id: str,
                      responses: dict[str, Any]) -> set[str]:
        """Apply the client's answers to our approval requests (exact call each);
        returns the keys answered."""
        if responses and not self._may_approve(ctx):
            raise ValueError("approvals need the approver's token")
        for key, answer in responses.items():
            kind, _, rest = key.partition(":")
            step, _, h = rest.partition(":")
            if kind != "approve" or not isinstance(answer, types.ElicitResult):
                continue
            content = answer.content or {}
            granted = answer.action == "accept" and content.get("approve") is True
            reason = str(content.get("reason") or ("" if granted else answer.action))
            with contextlib.suppress(ControlRefused):  # already decided, or gone
                await (self.approver or self.client).decide(
                    task_id, granted, step=step, args_hash=h, by=self._by(ctx), reason=reason)
        return set(responses)

    async def _approve_tool(self, ctx: ServerRequestContext[Any], args: dict[str, Any]
                            ) -> types.CallToolResult:
        if not self._may_approve(ctx):
            return _error("approvals need the approver role" if self._who(ctx) is not None
                          else f"approvals need the approver's token in {APPROVER_HEADER}")
        granted = args.get("approve") is True
        await self._state(ctx, str(args["task_id"]))
        pending, _ = await (self.approver or self.client).decide(
            str(args["task_id"]), granted, args_hash=args.get("args_hash"), by=self._by(ctx),
            reason=str(args.get("reason") or ""))
        decided = {"task_id": args["task_id"], "tool": pending.tool, "step": pending.step_id,
                   "args_hash": pending.args_hash,
                   "decision": "granted" if granted else "denied"}
        return types.CallToolResult(content=_text(decided), structured_content=decided)

    # -------------------------------------------------------------- resources

    async def _list_resources(self, ctx: ServerRequestContext[Any],
                              params: types.PaginatedRequestParams | None
                              ) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[])

    async def _list_templates(self, ctx: ServerRequestContext[Any],
                              params: types.PaginatedRequestParams | None
                              ) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=[types.ResourceTemplate(
            uri_template=TASK_URI, name="task", mime_type="application/json",
            description="A jetmesh task: status, steps, result, pending approvals.")])

    async def _read_resource(self, ctx: ServerRequestContext[Any],
                             params: types.ReadResourceRequestParams
                             ) -> types.ReadResourceResult:
        uri = str(params.uri)
        prefix = TASK_URI.split("{", 1)[0]
        if not uri.startswith(prefix):
            raise ValueError(f"unknown resource {uri}")
        state = await self._state(ctx, uri[len(prefix):])
        return types.ReadResourceResult(contents=[types.TextResourceContents(
            uri=uri, mime_type="application/json",
            text=json.dumps(task_summary(state), sort_keys=True, default=str))])

    # -------------------------------------------------------------- running

    async def run_stdio(self) -> None:
        from mcp.server.stdio import stdio_server

        async with stdio_server() as (read, write):
            await self.server.run(read, write, self.server.create_initialization_options())

    def http_app(self, *, path: str = "/mcp", host: str = "127.0.0.1") -> Any:
        """The streamable-HTTP ASGI app (stateless), e.g. for the gateway to mount."""
        return self.server.streamable_http_app(streamable_http_path=path, stateless_http=True,
                                               host=host)
