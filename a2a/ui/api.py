"""The dashboard's HTTP API and page (Starlette, mounted by the gateway at ``/ui``).

Reads: task list and counts and the approvals inbox from the `jm-tasks` projection (a
live in-memory mirror, orchestrator.tasks_kv), one task from its own ledger subjects,
agents from the registry, dead letters from the DLQ, stats from `jm-stats`. Live
updates are server-sent events: the list from the projection's changes, a task's
timeline from its ledger subjects (resumable: ``?after=<seq>``).

Actions (approver role only, refused by the server otherwise): approve / deny exactly
the arguments shown (their hash must match), cancel, replay / fork a finished task,
redrive a dead letter. Each writes what the CLI writes, with ``by = ui:<login name>``;
approvals go through the NATS approver user and redrives through the admin user (their
credentials from the data directory of `jetmesh up`, as the CLI finds them), never
through the gateway's own user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from pydantic import AliasChoices, BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from jetmesh.agents.directory import visible_to
from jetmesh.agents.registry import Registry
from jetmesh.bus import events as ev
from jetmesh.bus import headers as hn
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.dlq import DeadLetter, list_dead_letters, redrive
from jetmesh.bus.ledger import Ledger, LedgerEntry
from jetmesh.bus.settings import DATA_DIR_ENV, DEFAULT_DATA_DIR, BusSettings
from jetmesh.bus.tasks import cancel_and_wait
from jetmesh.bus.tracecontext import parse_traceparent
from jetmesh.orchestrator.client import Client, ControlRefused, open_state, pending_one
from jetmesh.orchestrator.replay import fork_submission, replay_submission
from jetmesh.orchestrator.replay import submit as submit_replay
from jetmesh.orchestrator.state import TaskState, fold
from jetmesh.orchestrator.stats import aggregate, read_summaries
from jetmesh.orchestrator.tasks_kv import (
    TaskIndex,
    TaskProjector,
    TaskSummary,
    follow_logs,
    is_log,
)
from jetmesh.orchestrator.timeline import describe

from .. import auth as gateway_auth
from .auth import (
    CSRF_COOKIE,
    CSRF_HEADER,
    SESSION_COOKIE,
    TOKENS_FILE,
    Person,
    Role,
    TokenBook,
)

__all__ = ["Dashboard", "DashboardSettings"]

log = logging.getLogger("jetmesh.ui")
STATIC = resources.files("jetmesh.a2a.ui") / "static"
CONTENT_KEYS = frozenset({"goal", "input", "output", "result", "arguments", "response",
                          "messages", "content", "text", "data", "headers", "errors"})
"""Fields that carry message content: hidden from the read-only role unless configured."""
HIDDEN = "[hidden]"


class DashboardSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JETMESH_UI_", extra="ignore",
                                      populate_by_name=True)

    enabled: bool = True
    data_dir: Path = Field(default=DEFAULT_DATA_DIR,
                           validation_alias=AliasChoices(DATA_DIR_ENV, "data_dir"))
    tokens_file: Path | None = None
    """Default: `<data_dir>/ui-tokens.json` (written by `jetmesh up`)."""
    tokens: str | None = None
    """``name:role:token,...`` (roles: approver, read-only), instead of a file."""
    readonly_content: bool = False
    """Show message content (inputs, outputs, arguments, results) to the read-only role."""
    secure_cookies: bool = False
    """Mark cookies Secure (set it when the gateway is served over HTTPS)."""
    trace_url: str | None = None
    """A trace UI's URL with ``{trace_id}`` (e.g. Phoenix or Jaeger): the task page links
    to the task's trace."""
    heartbeat_s: float = 15.0
    eager: bool = False
    """Start the task projection with the gateway (`jetmesh up` sets it), not on the
    dashboard's first request."""


# ----------------------------------------------------------------------------- views


def redact(value: Any) -> Any:
    """`value` with every content field replaced by ``[hidden]``."""
    if isinstance(value, dict):
        return {k: (HIDDEN if k in CONTENT_KEYS and v not in (None, "", {}, [])
                    else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _line(e: ev.Event) -> str:
    """The timeline's line: no payloads (the arguments of an approval request neither)."""
    if isinstance(e, ev.ApprovalRequested):
        return f"approval requested: {e.data.tool} - {e.data.reason}"
    return describe(e, detail=False)


def entry_view(entry: LedgerEntry) -> dict[str, Any]:
    e = entry.event
    return {"seq": entry.seq, "type": e.type, "time": e.time.isoformat(), "source": e.source,
            "step_id": subjects.step_id_of(entry.subject), "line": _line(e),
            "data": e.data.model_dump(mode="json")}


def _calls(entries: list[LedgerEntry]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for entry in entries:
        e = entry.event
        if isinstance(e, ev.ModelCalled):
            d = e.data
            out.append({"seq": entry.seq, "kind": "model", "step_id": d.step_id,
                        "agent": d.agent, "name": f"{d.provider}/{d.model}",
                        "purpose": d.purpose, "input_tokens": d.input_tokens,
                        "output_tokens": d.output_tokens, "cost_usd": d.cost_usd,
                        "latency_ms": d.latency_ms, "output": d.response})
        elif isinstance(e, ev.ToolCalled):
            t = e.data
            out.append({"seq": entry.seq, "kind": "tool", "step_id": t.step_id,
                        "agent": t.agent, "name": t.tool, "latency_ms": t.latency_ms,
                        "arguments": t.arguments, "output": t.output, "error": t.error,
                        "side_effects": t.side_effects, "dry_run": t.dry_run})
    return out


def task_view(state: TaskState, entries: list[LedgerEntry], summary: TaskSummary,
              trace_url: str | None) -> dict[str, Any]:
    policy = [e.event.data.model_dump(mode="json") | {"seq": e.seq}
              for e in entries if isinstance(e.event, ev.PolicyDecided)]
    trace = None
    parsed = parse_traceparent(state.traceparent)
    if trace_url and parsed is not None:
        trace = trace_url.replace("{trace_id}", f"{parsed[0]:032x}")
    return {
        "summary": summary.model_dump(mode="json"),
        "plan": [p.model_dump(mode="json") for p in state.plan],
        "steps": {k: s.model_dump(mode="json") for k, s in state.steps.items()},
        "result": state.result, "cancel_requested": state.cancel_requested,
        "submitted": state.submitted.model_dump(mode="json") if state.submitted else None,
        "calls": _calls(entries), "policy": policy,
        "events": [entry_view(e) for e in entries],
        "last_seq": state.last_seq, "terminal": state.terminal, "trace_url": trace,
    }


# ----------------------------------------------------------------------------- bodies


class LoginBody(BaseModel):
    token: str = Field(min_length=1, max_length=512)


class DecisionBody(BaseModel):
    step_id: str
    tool: str
    args_hash: str
    """The hash of the arguments the person saw: nothing is decided for other ones."""
    reason: str = Field(default="", max_length=2000)


class CancelBody(BaseModel):
    reason: str = Field(default="canceled from the dashboard", max_length=2000)


class ForkBody(BaseModel):
    from_step: str | None = None
    """None: an exact replay."""
    models: dict[str, str] = Field(default_factory=dict)
    effects: str = "dry-run"


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


# ----------------------------------------------------------------------------- the app


class Dashboard:
    """The dashboard over one gateway's client and registry. `app` is the ASGI app; its
    background parts (projector, index) start with `start()` (or on first request)."""

    def __init__(self, client: Client, registry: Registry,
                 settings: DashboardSettings | None = None, *, project: bool = True) -> None:
        self.client = client
        self.registry = registry
        self.settings = settings or DashboardSettings()
        s = self.settings
        self.tokens = TokenBook(s.tokens_file or s.data_dir / TOKENS_FILE,
                                env_tokens=s.tokens)
        self.project = project
        self.projector: TaskProjector | None = None
        self.index: TaskIndex | None = None
        self._started: asyncio.Task[None] | None = None
        self._role_clients: dict[str, Client] = {}
        self._admin: tuple[NATS, Ledger] | None = None
        self._lock = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None
        auth_settings = gateway_auth.AuthSettings.from_env()
        self.gateway = (gateway_auth.Authenticator(auth_settings)
                        if auth_settings is not None else None)
        """The gateway's credentials (a2a/auth) also log in: a tenant's user sees only
        its tenant's tasks."""
        self.app = Starlette(routes=self._routes())
        self.app.state.dashboard = self

    # ------------------------------------------------------------------ lifecycle

    def start_soon(self) -> None:
        """With `eager` set, start the background parts in the running loop (if there is
        one); else they start on the first request."""
        if not self.settings.eager:
            return
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            self._started = loop.create_task(self._start(), name="ui-start")

    async def start(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        js = self.client.js
        if self.project:
            self.projector = TaskProjector(js, self.client.ledger)
            await self.projector.start()
        self.index = TaskIndex(js)
        await self.index.start()
        self._watchdog = asyncio.create_task(self._stop_with_client(), name="ui-watchdog")

    async def _stop_with_client(self) -> None:
        """The gateway closes its client when it stops: the dashboard stops with it.
        (nats-py has no close event to wait on once connected: its state is polled.)"""
        while self.client._nc is not None and not self.client._nc.is_closed:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        self._watchdog = None
        await self.stop()

    async def stop(self) -> None:
        if self._started is not None and not self._started.done():
            self._started.cancel()
        if self._watchdog is not None:
            await cancel_and_wait(self._watchdog)
        if self.projector is not None:
            await self.projector.stop()
        if self.index is not None:
            await self.index.stop()
        for c in self._role_clients.values():
            await c.close()
        self._role_clients = {}
        if self._admin is not None:
            await self._admin[0].close()
            self._admin = None

    async def _ready_index(self) -> TaskIndex:
        await self.start()
        assert self.index is not None
        if self.projector is not None:  # a fresh projection: answer once it caught up
            await self.projector.wait_caught_up(60)
        await self.index.wait_loaded(30)
        return self.index

    # ------------------------------------------------------------------ role logins

    def _role_settings(self, user: str) -> BusSettings:
        """The bus settings of NATS user `user` from the data directory of `jetmesh up`
        (none there: the gateway's own, e.g. a server without users)."""
        from jetmesh.bus.credentials import credentials_in

        base = self.client.settings
        found = credentials_in(self.settings.data_dir, user)
        if not found:
            return base
        return base.model_copy(update={
            "nats_user": found.get("NATS_USER"), "nats_password": found.get("NATS_PASSWORD"),
            "nats_inbox_prefix": found.get("NATS_INBOX_PREFIX"), "nats_creds": None})

    async def _approver(self) -> Client:
        async with self._lock:
            c = self._role_clients.get("approver")
            if c is None:
                c = Client(self.client.url, settings=self._role_settings("approver"))
                await c.connect()
                self._role_clients["approver"] = c
            return c

    async def _admin_bus(self) -> tuple[NATS, Ledger]:
        async with self._lock:
            if self._admin is None:
                s = self._role_settings("admin")
                nc = await connect(self.client.url, settings=s, name="jetmesh-ui-admin")
                js = jetstream(nc, s)
                self._admin = (nc, Ledger(nc, js))
            return self._admin

    # ------------------------------------------------------------------ access

    def _person(self, request: Request) -> Person | None:
        return self.tokens.session(request.cookies.get(SESSION_COOKIE))

    def _shown(self, person: Person, value: Any) -> Any:
        if person.may_act or self.settings.readonly_content:
            return value
        return redact(value)

    @staticmethod
    def _sees(person: Person, tenant: str | None) -> bool:
        return person.tenant is None or person.tenant == tenant

    def _sees_task(self, person: Person, task_id: str, index: TaskIndex | None = None
                   ) -> bool:
        index = index or self.index
        found = index.tasks.get(task_id) if index is not None else None
        return found is not None and self._sees(person, found.tenant)

    def _check_tenant(self, person: Person, state: TaskState) -> None:
        """Another tenant's task is not found (as through the gateway)."""
        tenant = state.submitted.tenant if state.submitted is not None else None
        if person.tenant is not None and (state.submitted is None or tenant != person.tenant):
            raise _Refused(404, f"no task {state.task_id}")

    async def _gateway_login(self, token: str) -> Person | None:
        """A login with the gateway's API key or bearer token: approvers and admins may
        act, readers and submitters read; an admin is an operator (every tenant)."""
        if self.gateway is None:
            return None
        try:
            who = (await self.gateway.bearer(token) if token.count(".") == 2
                   else self.gateway.api_key(token))
        except gateway_auth.AuthError:
            return None
        role: Role = "approver" if who.role in ("approver", "admin") else "read-only"
        if who.role == "admin":
            return self.tokens.person(who.label, role)
        return self.tokens.person(who.label, role, tenant=who.tenant, operator=False)

    def _guard(self, handler: Callable[[Request, Person], Awaitable[Response]], *,
               act: bool = False, operator: bool = False
               ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            person = self._person(request)
            if person is None:
                return JSONResponse({"error": "log in first"}, status_code=401)
            if operator and not person.operator:
                return JSONResponse({"error": f"{person.name} is a tenant's login: this "
                                              "view is the operators'"}, status_code=403)
            if request.method != "GET":
                problem = _csrf_problem(request, person)
                if problem:
                    return JSONResponse({"error": problem}, status_code=403)
                if act and not person.may_act:
                    return JSONResponse(
                        {"error": f"{person.name} is {person.role}: only an approver may "
                                  "do this"}, status_code=403)
            try:
                return await handler(request, person)
            except _Refused as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            except ControlRefused as e:
                return JSONResponse({"error": str(e)}, status_code=409)
            except subjects.InvalidIdError as e:
                return JSONResponse({"error": str(e)}, status_code=400)
        return endpoint

    def _routes(self) -> list[BaseRoute]:
        g = self._guard
        return [
            Route("/", self.page, methods=["GET"]),
            Route("/api/login", self.login, methods=["POST"]),
            Route("/api/logout", self.logout, methods=["POST"]),
            Route("/api/me", g(self.me), methods=["GET"]),
            Route("/api/tasks", g(self.tasks), methods=["GET"]),
            Route("/api/tasks/live", g(self.tasks_live), methods=["GET"]),
            Route("/api/tasks/{task_id}", g(self.task), methods=["GET"]),
            Route("/api/tasks/{task_id}/live", g(self.task_live), methods=["GET"]),
            Route("/api/tasks/{task_id}/approve", g(self.approve, act=True), methods=["POST"]),
            Route("/api/tasks/{task_id}/deny", g(self.deny, act=True), methods=["POST"]),
            Route("/api/tasks/{task_id}/cancel", g(self.cancel, act=True), methods=["POST"]),
            Route("/api/tasks/{task_id}/replay", g(self.replay, act=True), methods=["POST"]),
            Route("/api/approvals", g(self.approvals), methods=["GET"]),
            Route("/api/agents", g(self.agents), methods=["GET"]),
            Route("/api/dlq", g(self.dead_letters, operator=True), methods=["GET"]),
            Route("/api/dlq/{seq:int}/redrive", g(self.redrive, act=True, operator=True),
                  methods=["POST"]),
            Route("/api/stats", g(self.stats, operator=True), methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=str(STATIC))),
        ]

    # ------------------------------------------------------------------ page, login

    async def page(self, request: Request) -> Response:
        html = (STATIC / "index.html").read_text()
        return Response(html, media_type="text/html", headers={
            hn.CACHE_CONTROL: "no-store", hn.X_FRAME_OPTIONS: "DENY",
            "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'"})

    async def login(self, request: Request) -> Response:
        if not _is_json(request) or _cross_origin(request):
            return JSONResponse({"error": "a JSON request from this page is expected"},
                                status_code=403)
        try:
            body = LoginBody.model_validate_json(await request.body())
        except ValidationError:
            return JSONResponse({"error": "a token is required"}, status_code=400)
        person = self.tokens.login(body.token) or await self._gateway_login(body.token)
        if person is None:
            return JSONResponse({"error": "unknown token"}, status_code=401)
        resp = JSONResponse(_me(person))
        secure = self.settings.secure_cookies
        max_age = int(person.expires - datetime.now(UTC).timestamp())
        resp.set_cookie(SESSION_COOKIE, self.tokens.cookie(person), max_age=max_age,
                        path="/ui", httponly=True, samesite="strict", secure=secure)
        resp.set_cookie(CSRF_COOKIE, person.csrf, max_age=max_age, path="/ui",
                        httponly=False, samesite="strict", secure=secure)
        return resp

    async def logout(self, request: Request) -> Response:
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(SESSION_COOKIE, path="/ui")
        resp.delete_cookie(CSRF_COOKIE, path="/ui")
        return resp

    async def me(self, request: Request, person: Person) -> Response:
        return JSONResponse(_me(person))

    # ------------------------------------------------------------------ tasks

    async def tasks(self, request: Request, person: Person) -> Response:
        index = await self._ready_index()
        q = request.query_params
        try:
            limit = min(500, max(1, int(q.get("limit", "50"))))
            offset = max(0, int(q.get("offset", "0")))
        except ValueError:
            raise _Refused(400, "limit and offset are numbers") from None
        # `state`, not `status`: the gateway's edge check reads `status` on any path
        # ending in /tasks as an A2A ListTasks filter.
        rows, total, counts = index.query(status=q.get("state") or None,
                                          workflow=q.get("workflow") or None,
                                          user=q.get("user") or None, q=q.get("q") or None,
                                          limit=limit, offset=offset, tenant=person.tenant)
        mine = [t for t in index.tasks.values() if self._sees(person, t.tenant)]
        return JSONResponse({
            "tasks": [self._shown(person, r.model_dump(mode="json")) for r in rows],
            "total": total, "counts": counts, "all": len(mine),
            "workflows": sorted({t.workflow for t in mine if t.workflow}),
            "version": index.version})

    async def tasks_live(self, request: Request, person: Person) -> Response:
        """Server-sent events: `tasks` with the summaries that changed (or `reload`)."""
        index = await self._ready_index()
        try:
            version = int(request.query_params.get("version", index.version))
        except ValueError:
            version = index.version

        async def stream() -> AsyncIterator[str]:
            v = version
            yield f"event: hello\ndata: {json.dumps({'version': v})}\n\n"
            while True:
                v2, changed = await index.changes_after(v, self.settings.heartbeat_s)
                if await request.is_disconnected():
                    return
                if v2 == v:
                    yield ": keep-alive\n\n"
                    continue
                v = v2
                if changed is None:
                    yield f"event: reload\ndata: {json.dumps({'version': v})}\n\n"
                    continue
                rows = [self._shown(person, index.tasks[t].model_dump(mode="json"))
                        for t in changed if t in index.tasks
                        and self._sees(person, index.tasks[t].tenant)]
                yield f"event: tasks\ndata: {json.dumps({'version': v, 'tasks': rows})}\n\n"

        return _sse(stream())

    async def _task_state(self, task_id: str) -> tuple[TaskState, list[LedgerEntry]]:
        entries = list(await self.client.ledger.read(subjects.check_id(task_id, "task id")))
        if not entries:
            raise _Refused(404, f"no task {task_id}")
        return fold(task_id, entries), entries

    async def task(self, request: Request, person: Person) -> Response:
        from jetmesh.orchestrator.tasks_kv import summarize

        task_id = request.path_params["task_id"]
        state, entries = await self._task_state(task_id)
        self._check_tenant(person, state)
        view = task_view(state, entries, summarize(state), self.settings.trace_url)
        return JSONResponse(self._shown(person, view))

    async def task_live(self, request: Request, person: Person) -> Response:
        """Server-sent events: each ledger event of the task after ledger sequence
        `after` (and step log record after `after_log`, when the logs have a stream of
        their own); the event id is ``<ledger seq>:<log seq>``, so a reconnect resumes
        from Last-Event-ID with nothing lost or repeated."""
        task_id = subjects.check_id(request.path_params["task_id"], "task id")
        q = request.query_params
        raw = request.headers.get(hn.LAST_EVENT_ID) or \
            f"{q.get('after', '0')}:{q.get('after_log', '0')}"
        try:
            after, _, after_log = (int(x or 0) for x in (raw + "::").split(":")[:3])
        except ValueError:
            raise _Refused(400, "after and after_log are sequences") from None
        if person.tenant is not None:
            self._check_tenant(person, await self.client.state(task_id))

        async def stream() -> AsyncIterator[str]:
            yield "retry: 1000\n\n"
            last, last_log = after, after_log
            follow = self.client.ledger.follow(task_id, from_seq=after + 1,
                                               **follow_logs(after_log))
            nxt: asyncio.Task[LedgerEntry] | None = None
            try:
                while True:
                    if nxt is None:
                        nxt = asyncio.ensure_future(anext(follow))
                    done, _ = await asyncio.wait({nxt}, timeout=self.settings.heartbeat_s)
                    if await request.is_disconnected():
                        return
                    if not done:
                        yield ": keep-alive\n\n"
                        continue
                    entry = nxt.result()
                    nxt = None
                    if is_log(entry.seq):
                        last_log = entry.seq
                    else:
                        last = entry.seq
                    body = json.dumps(self._shown(person, entry_view(entry)))
                    yield f"id: {last}:{last_log}\nevent: ledger\ndata: {body}\n\n"
            finally:
                if nxt is not None:
                    nxt.cancel()
                close = getattr(follow, "aclose", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        await close()

        return _sse(stream())

    # ------------------------------------------------------------------ actions

    async def _decide(self, request: Request, person: Person, granted: bool) -> Response:
        task_id = request.path_params["task_id"]
        body = await _body(request, DecisionBody)
        approver = await self._approver()
        state = await approver.state(subjects.check_id(task_id, "task id"))
        self._check_tenant(person, state)
        p = pending_one(open_state(state), body.step_id, body.tool)
        if p.args_hash != body.args_hash:
            raise _Refused(409, "the pending call's arguments are not the ones shown "
                                f"(hash {p.args_hash[:12]}…): nothing decided; reload")
        by = f"ui:{person.name}"
        if granted:
            await approver.approve(task_id, step=p.step_id, tool=p.tool, by=by)
        else:
            await approver.deny(task_id, step=p.step_id, tool=p.tool, by=by,
                                reason=body.reason or "denied")
        return JSONResponse({"decided": "approved" if granted else "denied",
                             "step_id": p.step_id, "tool": p.tool, "by": by})

    async def approve(self, request: Request, person: Person) -> Response:
        return await self._decide(request, person, True)

    async def deny(self, request: Request, person: Person) -> Response:
        return await self._decide(request, person, False)

    async def cancel(self, request: Request, person: Person) -> Response:
        task_id = subjects.check_id(request.path_params["task_id"], "task id")
        body = await _body(request, CancelBody)
        found = await self.client.state(task_id)
        self._check_tenant(person, found)
        state = open_state(found)
        await self.client.ledger.append(ev.CancelRequested(
            subject=task_id, source="jetmesh/ui", traceparent=state.traceparent,
            data=ev.CancelRequestedData(reason=body.reason, by=f"ui:{person.name}")))
        return JSONResponse({"cancel_requested": task_id})

    async def replay(self, request: Request, person: Person) -> Response:
        task_id = subjects.check_id(request.path_params["task_id"], "task id")
        body = await _body(request, ForkBody)
        orig = await self.client.state(task_id)
        self._check_tenant(person, orig)
        try:
            sub = (replay_submission(orig) if body.from_step is None else
                   fork_submission(orig, body.from_step, models=body.models,
                                   effects=body.effects))
        except ValueError as e:
            raise _Refused(409, str(e)) from None
        sub = sub.model_copy(update={"metadata": {**sub.metadata,
                                                  "submitted_by": f"ui:{person.name}"}})
        new = await submit_replay(self.client, sub)
        await self._first_event(new)  # so that the page opened on it finds it
        return JSONResponse({"task_id": new, "kind": "replay" if body.from_step is None
                             else "fork"})

    async def _first_event(self, task_id: str, timeout: float = 15.0) -> None:
        follow = self.client.follow(task_id, until_done=False)
        try:
            await asyncio.wait_for(anext(follow), timeout)
        except TimeoutError:
            raise _Refused(504, f"task {task_id} was submitted but the orchestrator has "
                                "not taken it yet") from None
        finally:
            close = getattr(follow, "aclose", None)
            if close is not None:
                await close()

    # ------------------------------------------------------------------ other views

    async def approvals(self, request: Request, person: Person) -> Response:
        index = await self._ready_index()
        now = datetime.now(UTC)
        rows = []
        for p in index.pending():
            if not self._sees_task(person, p.task_id, index):
                continue
            row = p.model_dump(mode="json")
            row["seconds_left"] = max(0.0, (p.expires_at - now).total_seconds())
            rows.append(self._shown(person, row))
        return JSONResponse({"approvals": rows, "may_decide": person.may_act})

    async def agents(self, request: Request, person: Person) -> Response:
        from google.protobuf.json_format import MessageToDict

        out = []
        agents = self.registry.agents()
        if person.tenant is not None:  # a tenant's user: the shared agents and its own
            agents = visible_to(agents, person.tenant)
        for a in sorted(agents, key=lambda a: a.name):
            out.append({
                "name": a.name, "version": a.version, "signed": a.signed,
                "replicas": [{"replica": r.replica, "model": r.model,
                              "updated": r.updated.isoformat(), "steps_done": r.steps_done}
                             for r in a.replicas],
                "skills": [s.model_dump(mode="json") for s in a.skills],
                "breakers": a.breakers,  # each breaker's worst state across replicas
                "card": MessageToDict(a.card)})
        return JSONResponse({"agents": out, "refused": self.registry.refused()
                             if person.tenant is None else {}})

    async def dead_letters(self, request: Request, person: Person) -> Response:
        letters = await list_dead_letters(self.client.ledger)
        rows = []
        for seq, dl in letters:
            row = _letter(seq, dl)
            rows.append(self._shown(person, row))
        return JSONResponse({"dead_letters": rows[::-1],
                             "unreadable": [s.seq for s in letters.skipped]})

    async def redrive(self, request: Request, person: Person) -> Response:
        seq = int(request.path_params["seq"])
        _, ledger = await self._admin_bus()
        try:
            dl = await redrive(ledger.js, ledger, seq)
        except Exception as e:  # not found, truncated, not a letter
            raise _Refused(409, f"dead letter {seq} not redriven: {e}") from None
        log.info("dead letter %d redriven to %s by ui:%s", seq, dl.subject, person.name)
        return JSONResponse({"redriven": seq, "subject": dl.subject, "by": f"ui:{person.name}"})

    async def stats(self, request: Request, person: Person) -> Response:
        records = await read_summaries(self.client.js)
        try:
            hours = max(1, int(request.query_params.get("hours", "24") or 24))
        except ValueError:
            raise _Refused(400, "hours is a number") from None
        since = datetime.now(UTC) - timedelta(hours=hours)
        figures = aggregate(records, since=since, by="workflow")
        series: dict[str, dict[str, Any]] = {}
        hour = since.replace(minute=0, second=0, microsecond=0)
        while hours <= 24 * 31 and hour <= datetime.now(UTC):  # every hour, empty ones too
            key = hour.isoformat()
            series[key] = {"hour": key, "tasks": 0, "completed": 0, "cost_usd": 0.0,
                           "escalated": 0, "latency_s": []}
            hour += timedelta(hours=1)
        for r in records:
            ended = datetime.fromisoformat(r["ended_at"])
            if ended < since:
                continue
            bucket = ended.astimezone(UTC).replace(minute=0, second=0, microsecond=0
                                                  ).isoformat()
            b = series.setdefault(bucket, {"hour": bucket, "tasks": 0, "completed": 0,
                                           "cost_usd": 0.0, "escalated": 0,
                                           "latency_s": []})
            b["tasks"] += 1
            b["completed"] += r["status"] == "completed"
            b["cost_usd"] += r["cost_usd"]
            b["escalated"] += bool(r["approvals"]["requested"])
            b["latency_s"].append(r["duration_s"])
        rows = []
        for b in sorted(series.values(), key=lambda b: b["hour"]):
            lat = sorted(b.pop("latency_s"))
            b["latency_p50_s"] = lat[len(lat) // 2] if lat else None
            rows.append(b)
        return JSONResponse({"figures": figures, "series": rows, "hours": hours})


# ----------------------------------------------------------------------------- helpers


def _me(person: Person) -> dict[str, Any]:
    me: dict[str, Any] = {"name": person.name, "role": person.role,
                          "may_act": person.may_act}
    if not person.operator:  # a tenant's login (the gateway's credentials)
        me.update(tenant=person.tenant, operator=False)
    return me


def _letter(seq: int, dl: DeadLetter) -> dict[str, Any]:
    row = dl.model_dump(mode="json", exclude={"data_b64"})
    row["seq"] = seq
    row["data"] = dl.data.decode("utf-8", errors="replace")
    row["data_bytes"] = dl.data_bytes or len(dl.data)
    return row


def _is_json(request: Request) -> bool:
    return request.headers.get(hn.CONTENT_TYPE, "").split(";")[0].strip() == "application/json"


def _cross_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        return False
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1] != host


def _csrf_problem(request: Request, person: Person) -> str | None:
    if not _is_json(request):
        return "a JSON body is expected"
    if _cross_origin(request):
        return "cross-origin request refused"
    sent = request.headers.get(CSRF_HEADER, "")
    if not sent or sent != person.csrf:
        return "missing or wrong X-CSRF-Token"
    return None


B = TypeVar("B", bound=BaseModel)


async def _body(request: Request, model: type[B]) -> B:
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as e:
        raise _Refused(400, f"invalid request: {e.errors()[0]['msg']}") from None


def _sse(stream: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={hn.CACHE_CONTROL: "no-store", hn.X_ACCEL_BUFFERING: "no"})
