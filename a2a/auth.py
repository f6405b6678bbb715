"""Gateway authentication: API keys and JWT bearer tokens (a JWKS; OAuth 2 client
credentials tokens are such JWTs), each mapped to a tenant and a role.

`GatewayAuth` is an ASGI middleware in front of the A2A routes. A request without valid
credentials is refused with HTTP 401 (`WWW-Authenticate: Bearer`, the A2A transport's
authentication error) before any handler runs; a role that may not do the operation with
403. The caller's `Identity` is then current for the request (`current()`, a context
variable): the gateway records it on the ledger (`submitted_by` and `tenant` on the
task's submission, `by` on cancels and approvals) and answers another tenant's task as
not found (`may_see`).

Roles: `reader` (get, list, subscribe, read push configs), `submitter` (reader + send a
new message, cancel, set push configs), `approver` (reader + answer a pending approval,
a follow-up message), `admin` (everything, every tenant). Cards and the AsyncAPI
document stay public; the dashboard (/ui) keeps its own logins.

Configuration: a YAML/JSON file (`JETMESH_GATEWAY_AUTH_FILE`, `AuthSettings`) with API
keys by their SHA-256 (the file holds no secret) and the JWT issuer's JWKS (URL or
inline), issuer, audience and claim names.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
import yaml
from a2a.types import a2a_pb2 as pb
from a2a.types.a2a_pb2 import AgentCard
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jetmesh.a2a.errors import MeshA2AError
from jetmesh.bus import headers as hn

Role = Literal["reader", "submitter", "approver", "admin"]
ROLES: tuple[Role, ...] = ("reader", "submitter", "approver", "admin")
AUTH_FILE_ENV = "JETMESH_GATEWAY_AUTH_FILE"
API_KEY_HEADER = hn.API_KEY
PUBLIC_PATHS = ("/.well-known/agent-card.json", "/asyncapi.json", "/asyncapi")
"""Paths (and `/agents/<name>/.well-known/agent-card.json`) anyone may read."""

_READ_METHODS = {"GetTask", "ListTasks", "SubscribeToTask", "GetTaskPushNotificationConfig",
                 "ListTaskPushNotificationConfigs", "GetExtendedAgentCard"}
_SUBMIT_METHODS = {"SendMessage", "SendStreamingMessage", "CancelTask",
                   "CreateTaskPushNotificationConfig", "DeleteTaskPushNotificationConfig"}


@dataclass(frozen=True)
class Identity:
    """Who is calling: the credential's subject, its tenant and role, and how it was
    proven (`api-key` or `jwt`)."""

    subject: str
    tenant: str | None
    role: Role
    scheme: str

    @property
    def label(self) -> str:
        """How the ledger names it: `<scheme>:<subject>`."""
        return f"{self.scheme}:{self.subject}"


_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "jetmesh_identity", default=None)


def current() -> Identity | None:
    """The identity of the request being served (None: authentication is off)."""
    return _current.get()


def may_see(tenant: str | None) -> bool:
    """Whether the current caller may see a task (or anything) of `tenant`: always with
    authentication off, for an admin, or when the tenants are the same."""
    return sees(current(), tenant)


def may_use(agent_tenants: list[str] | None) -> bool:
    """Whether the current caller may see and use an agent private to `agent_tenants`
    (None: a shared agent, everyone): with authentication off, an admin, or one of its
    tenants."""
    if agent_tenants is None:
        return True
    who = current()
    return who is None or who.role == "admin" or who.tenant in agent_tenants


def tenant() -> str | None:
    """The caller's tenant (a submission's; None: no tenant or authentication off)."""
    who = current()
    return who.tenant if who is not None else None


def submitted_by() -> str | None:
    """The caller's identity as a submission records it (None: authentication off)."""
    who = current()
    return who.label if who is not None else None


def by(default: str) -> str:
    """How a control (cancel, approval) names who did it: the caller's identity."""
    who = current()
    return who.label if who is not None else default


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Hex SHA-256 of the key (`jetmesh` never stores the key itself)."""
    subject: str
    tenant: str | None = None
    role: Role = "submitter"


class JwtSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jwks_url: str | None = None
    """The issuer's JWKS (fetched and cached; keys found by `kid`)."""
    jwks: dict[str, Any] | None = None
    """Or the JWKS itself, inline."""
    issuer: str | None = None
    audience: str | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    tenant_claim: str = "tenant"
    role_claim: str = "role"
    """A role name, or a space-separated `scope` style list (the highest role wins)."""
    token_url: str | None = None
    """The OAuth 2 token endpoint of the client credentials flow (declared in the card)."""
    leeway_s: float = 0.0


class AuthSettings(BaseModel):
    """What `JETMESH_GATEWAY_AUTH_FILE` holds."""

    model_config = ConfigDict(extra="forbid")

    api_keys: list[ApiKey] = Field(default_factory=list)
    jwt: JwtSettings | None = None

    @classmethod
    def load(cls, path: Path) -> AuthSettings:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})

    @classmethod
    def from_env(cls) -> AuthSettings | None:
        path = os.environ.get(AUTH_FILE_ENV)
        return cls.load(Path(path)) if path else None


API_KEY_ENV = "JETMESH_API_KEY"
"""A local client's own API key (`jetmesh mcp serve` over stdio acts as its identity)."""


def local_identity(settings: AuthSettings | None) -> Identity | None:
    """The identity of the API key in `JETMESH_API_KEY`, with authentication configured
    (None: off, or no key: the local operator); AuthError for a key the file does not
    hold."""
    key = os.environ.get(API_KEY_ENV)
    if settings is None or not key:
        return None
    return Authenticator(settings).api_key(key)


class AuthError(MeshA2AError):
    """Refused credentials: `status` 401 (who are you?) or 403 (not allowed)."""

    def __init__(self, status: int, message: str, error: str = "invalid_token") -> None:
        self.status, self.message, self.error = status, message, error
        super().__init__(message)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator:
    """Credentials -> Identity (pure apart from fetching the JWKS)."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        j = settings.jwt
        self._jwks_client = jwt.PyJWKClient(j.jwks_url, cache_keys=True) \
            if j is not None and j.jwks_url else None
        self._jwks = jwt.PyJWKSet.from_dict(j.jwks) if j is not None and j.jwks else None

    def api_key(self, key: str) -> Identity:
        digest = hash_key(key)
        for k in self.settings.api_keys:
            if hmac.compare_digest(k.sha256, digest):
                return Identity(k.subject, k.tenant, k.role, "api-key")
        raise AuthError(401, "unknown API key")

    def _signing_key(self, token: str) -> Any:
        if self._jwks is not None:
            kid = jwt.get_unverified_header(token).get("kid")
            for k in self._jwks.keys:
                if kid is None or k.key_id == kid:
                    return k.key
            raise AuthError(401, f"no key {kid!r} in the JWKS")
        if self._jwks_client is not None:
            return self._jwks_client.get_signing_key_from_jwt(token).key
        raise AuthError(401, "bearer tokens are not accepted here")

    async def bearer(self, token: str) -> Identity:
        j = self.settings.jwt
        if j is None:
            raise AuthError(401, "bearer tokens are not accepted here")
        try:
            key = await asyncio.to_thread(self._signing_key, token)
            claims = jwt.decode(token, key, algorithms=j.algorithms, audience=j.audience,
                                issuer=j.issuer, leeway=j.leeway_s,
                                options={"require": ["exp", "sub"],
                                         "verify_aud": j.audience is not None})
        except jwt.ExpiredSignatureError as e:
            raise AuthError(401, "the token has expired") from e
        except jwt.PyJWKClientError as e:
            raise AuthError(401, f"token key: {e}") from e
        except jwt.InvalidTokenError as e:
            raise AuthError(401, f"invalid token: {e}") from e
        raw = claims.get(j.role_claim)
        names = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
        granted = [r for r in ROLES if r in names]
        if not granted:
            raise AuthError(403, f"the token grants no jetmesh role ({j.role_claim})",
                            "insufficient_scope")
        tenant = claims.get(j.tenant_claim)
        return Identity(str(claims["sub"]), str(tenant) if tenant is not None else None,
                        granted[-1], "jwt")

    async def identify(self, headers: dict[str, str]) -> Identity:
        key = headers.get(API_KEY_HEADER)
        if key:
            return self.api_key(key)
        auth = headers.get(hn.AUTHORIZATION, "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return await self.bearer(token.strip())
        raise AuthError(401, "credentials required: an API key (X-API-Key) or a bearer "
                             "token", "invalid_request")


MCP_PATH_SUFFIX = "/mcp"
"""Requests to a path ending so are MCP (the gateway's /mcp): `operation_of` names them
`mcp:<method>` and `mcp:tools/call:<tool>`."""
MCP_READ_TOOLS = frozenset({"task_status"})
MCP_APPROVE_TOOLS = frozenset({"approve"})


def _mcp_allowed(role: Role, operation: str, follow_up: bool) -> bool:
    """MCP over the gateway: listing, reading and the protocol's own requests for every
    role; `task_status` reads; `approve`, and a resumed call answering input requests
    (approvals), for approvers; any other tool call submits a task."""
    prefix = "mcp:tools/call:"
    if not operation.startswith(prefix):
        return True
    tool = operation[len(prefix):]
    if tool in MCP_READ_TOOLS:
        return True
    if tool in MCP_APPROVE_TOOLS or follow_up:
        return role == "approver"
    return role == "submitter"


def allowed(role: Role, operation: str, follow_up: bool) -> bool:
    """Pure: whether `role` may do the A2A `operation` (a JSON-RPC method name); a
    follow-up message (one naming a task) answers an approval: approvers only. MCP
    operations (`mcp:...`): `_mcp_allowed`."""
    if role == "admin":
        return True
    if operation.startswith("mcp:"):
        return _mcp_allowed(role, operation, follow_up)
    if operation in _READ_METHODS:
        return True
    if operation in ("SendMessage", "SendStreamingMessage") and follow_up:
        return role == "approver"
    if operation in _SUBMIT_METHODS:
        return role == "submitter"
    return False


_REST = [  # (HTTP method, path suffix or infix, operation)
    ("POST", "/message:send", "SendMessage"), ("POST", "/message:stream", "SendStreamingMessage"),
    ("POST", ":cancel", "CancelTask"), ("GET", ":subscribe", "SubscribeToTask"),
    ("POST", ":subscribe", "SubscribeToTask"),
    ("POST", "/pushNotificationConfigs", "CreateTaskPushNotificationConfig"),
    ("DELETE", "/pushNotificationConfigs/", "DeleteTaskPushNotificationConfig"),
    ("GET", "/pushNotificationConfigs/", "GetTaskPushNotificationConfig"),
    ("GET", "/pushNotificationConfigs", "ListTaskPushNotificationConfigs"),
    ("GET", "/extendedAgentCard", "GetExtendedAgentCard"),
    ("GET", "/tasks/", "GetTask"), ("GET", "/tasks", "ListTasks"),
]


def operation_of(method: str, path: str, body: bytes) -> tuple[str, bool, Any]:
    """(operation, is a follow-up message, JSON-RPC id) of a request."""
    data: Any = None
    if body:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
    if path.rstrip("/").endswith(MCP_PATH_SUFFIX):
        return _mcp_operation(data)
    if isinstance(data, dict) and "jsonrpc" in data:
        raw = data.get("params")
        params: dict[str, Any] = raw if isinstance(raw, dict) else {}
        found = params.get("message")
        msg: dict[str, Any] = found if isinstance(found, dict) else {}
        return str(data.get("method", "")), bool(msg.get("taskId")), data.get("id")
    for verb, part, op in _REST:
        if method == verb and part in path:
            rest = data.get("message") if isinstance(data, dict) else None
            return op, isinstance(rest, dict) and bool(rest.get("taskId")), None
    return f"{method} {path}", False, None


def _mcp_operation(data: Any) -> tuple[str, bool, Any]:
    """(`mcp:<method>` or `mcp:tools/call:<tool>`, answers input requests, id) of an MCP
    message; a request with no JSON-RPC body (the GET stream, a DELETE) reads; a batch
    (a list: not in the protocol's current revision) is the admin's."""
    if data is None:
        return "mcp:stream", False, None
    if not isinstance(data, dict):
        return "mcp-batch", False, None
    method = str(data.get("method", ""))
    raw = data.get("params")
    params: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if method == "tools/call":
        answers = params.get("inputResponses") or params.get("input_responses")
        return f"mcp:tools/call:{params.get('name', '')}", bool(answers), data.get("id")
    return f"mcp:{method}", False, data.get("id")


IDENTITY_SCOPE_KEY = "jetmesh.identity"
"""Where `GatewayAuth` also leaves the caller's identity in the ASGI scope (for handlers
that run outside the request's context, e.g. the MCP server's tasks)."""


def identity_of(request: Any) -> Identity | None:
    """The identity of a Starlette request (or anything with a `scope`), else the
    current one."""
    scope = getattr(request, "scope", None)
    who = scope.get(IDENTITY_SCOPE_KEY) if isinstance(scope, dict) else None
    return who if isinstance(who, Identity) else current()


def sees(who: Identity | None, tenant: str | None) -> bool:
    """`may_see` for a given identity (None: authentication off)."""
    return who is None or who.role == "admin" or who.tenant == tenant


CARD_PATH = PUBLIC_PATHS[0]

ANONYMOUS = Identity(subject="anonymous", tenant=None, role="reader", scheme="none")
"""A caller with no valid credentials where none are required (a card's reader)."""


class GatewayAuth:
    """ASGI middleware: authenticate, authorise by role, make the identity current."""

    def __init__(self, app: ASGIApp, settings: AuthSettings) -> None:
        self.app = app
        self.auth = Authenticator(settings)

    @staticmethod
    def public(path: str) -> bool:
        return path.endswith(PUBLIC_PATHS) or path == "/ui" or path.startswith("/ui/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] == "http" and path.endswith(CARD_PATH):
            # Anyone may read a card; who asks decides which agents they see (a tenant's
            # private agent's card is its tenant's): credentials are optional here, and
            # without valid ones the caller is nobody's tenant.
            headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                       for k, v in scope.get("headers", [])}
            try:
                who = await self.auth.identify(headers)
            except AuthError:
                who = ANONYMOUS
            token = _current.set(who)
            try:
                await self.app(scope, receive, send)
            finally:
                _current.reset(token)
            return
        if scope["type"] != "http" or self.public(path):
            await self.app(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        op, follow_up, rpc_id = operation_of(scope.get("method", ""), scope.get("path", ""),
                                             body)
        try:
            who = await self.auth.identify(headers)
            if not allowed(who.role, op, follow_up):
                raise AuthError(403, f"role {who.role} may not {op}"
                                + (" (a follow-up answers an approval)" if follow_up else ""),
                                "insufficient_scope")
        except AuthError as e:
            await self._refuse(send, e, rpc_id)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        scope[IDENTITY_SCOPE_KEY] = who
        token = _current.set(who)
        try:
            await self.app(scope, replay, send)
        finally:
            _current.reset(token)

    @staticmethod
    async def _refuse(send: Send, e: AuthError, rpc_id: Any) -> None:
        error = {"code": e.status, "message": e.message}
        payload: dict[str, Any] = ({"jsonrpc": "2.0", "id": rpc_id, "error": error}
                                   if rpc_id is not None else {"error": error})
        raw = json.dumps(payload).encode()
        challenge = f'Bearer error="{e.error}", error_description="{e.message}"'
        await send({"type": "http.response.start", "status": e.status, "headers": [
            (hn.CONTENT_TYPE.encode(), b"application/json"),
            (hn.CONTENT_LENGTH.encode(), str(len(raw)).encode()),
            (b"www-authenticate", challenge.encode("latin-1", "replace"))]})
        await send({"type": "http.response.body", "body": raw})


def declare(card: AgentCard, settings: AuthSettings | None) -> AgentCard:
    """The card (an a2a-sdk AgentCard) with its `securitySchemes` and requirements."""
    if settings is None:
        return card
    out = pb.AgentCard()
    out.CopyFrom(card)
    names: list[str] = []
    if settings.api_keys:
        out.security_schemes["apiKey"].api_key_security_scheme.CopyFrom(
            pb.APIKeySecurityScheme(location="header", name=hn.API_KEY_DISPLAY,
                                    description="A jetmesh API key (tenant and role)"))
        names.append("apiKey")
    j = settings.jwt
    if j is not None:
        out.security_schemes["bearer"].http_auth_security_scheme.CopyFrom(
            pb.HTTPAuthSecurityScheme(scheme="Bearer", bearer_format="JWT",
                                      description="A JWT signed by a key in the issuer's "
                                                  f"JWKS; claims {j.tenant_claim!r}, "
                                                  f"{j.role_claim!r}"))
        names.append("bearer")
        if j.token_url:
            flows = pb.OAuthFlows(client_credentials=pb.ClientCredentialsOAuthFlow(
                token_url=j.token_url, scopes={r: f"jetmesh {r}" for r in ROLES}))
            out.security_schemes["oauth2"].oauth2_security_scheme.CopyFrom(
                pb.OAuth2SecurityScheme(flows=flows))
            names.append("oauth2")
    for name in names:
        req = out.security_requirements.add()
        req.schemes[name].SetInParent()
    return out


def middleware(settings: AuthSettings | None) -> list[Any]:
    """The Starlette middleware list for `build_app` ([] when authentication is off)."""
    if settings is None:
        return []
    from starlette.middleware import Middleware

    return [Middleware(GatewayAuth, settings=settings)]
