"""One live connection to one MCP server, with its resilience: reconnect, timeout, 401
refresh-once, 429 Retry-After, and the server's circuit breaker.

The SDK's `mcp.Client` lives inside anyio task groups that must be entered and left in
the same task, so each connection has an owner task that holds the client open until
`reset` or `aclose`; calls from any task go through it. A dropped connection (the
process died, the socket closed) or a timed-out call resets it, and the next call
reconnects (a stdio server is started again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncGenerator
from typing import Any

import httpx2
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.caching import CacheConfig
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult
from mcp.types import Tool as McpToolInfo
from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

from jetmesh.agents.breakers import CircuitBreaker
from jetmesh.agents.models.retry import parse_retry_after
from jetmesh.bus import headers as hn

from .config import HttpServer, McpServerConfig, StdioServer
from .errors import (
    McpAuthFailed,
    McpError,
    McpProtocolError,
    McpRateLimited,
    McpTimeout,
    McpUnavailable,
)

__all__ = ["HttpGate", "McpConnection", "retry_after_s"]

log = logging.getLogger("jetmesh.mcp")


def retry_after_s(value: str | None, default: float) -> float:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date; the model
    layer's parser), else `default`."""
    wait = parse_retry_after({hn.RETRY_AFTER: value} if value else None)
    return default if wait is None else wait


class HttpGate(httpx2.Auth):
    """The HTTP side of a server's resilience, as an httpx2 auth flow on every request:
    sets the bearer token, asks the credential source once more on a 401 and resends,
    waits out a 429's Retry-After (bounded). What it gives up on is kept in `failure`,
    since the SDK reports any 4xx only as "Server returned an error response"."""

    def __init__(self, config: McpServerConfig, http: HttpServer) -> None:
        self.config = config
        self.http = http
        self._token: str | None = None
        self._loaded = False
        self.refreshes = 0
        """Credential refreshes after a 401."""
        self.rate_limited = 0
        """429 answers waited out."""
        self.failure: tuple[float, McpError] | None = None
        """(monotonic time, error) of the last request given up on."""

    @property
    def has_credentials(self) -> bool:
        h = self.http
        return any(x is not None for x in (h.bearer_token, h.bearer_token_env,
                                            h.bearer_token_file, h.oauth))

    async def _fetch_token(self) -> str | None:
        oauth = self.http.oauth
        if oauth is None:
            return self.http.read_token()
        form = {"grant_type": "client_credentials", "client_id": oauth.client_id,
                "client_secret": oauth.client_secret.get_secret_value()}
        if oauth.scope:
            form["scope"] = oauth.scope
        async with httpx2.AsyncClient(timeout=self.config.timeout_s) as client:
            response = await client.post(oauth.token_url, data=form)
        if response.status_code != 200:
            raise McpAuthFailed(self.config.name, f"token endpoint {oauth.token_url} answered "
                                                  f"{response.status_code}")
        token = response.json().get("access_token")
        return str(token) if token else None

    async def token(self, *, refresh: bool = False) -> str | None:
        if refresh or not self._loaded:
            self._token = await self._fetch_token()
            self._loaded = True
        return self._token

    def _give_up(self, error: McpError) -> None:
        self.failure = (time.monotonic(), error)
        log.warning("%s", error)

    async def async_auth_flow(self, request: httpx2.Request
                              ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        name = self.config.name
        try:
            token = await self.token()
        except (McpAuthFailed, httpx2.HTTPError) as e:
            self._give_up(e if isinstance(e, McpAuthFailed) else
                          McpAuthFailed(name, f"cannot get a token: {e}"))
            token = None
        if token:
            request.headers[hn.AUTHORIZATION] = f"Bearer {token}"
        refreshed = False
        waited = 0
        while True:
            response = yield request
            if response.status_code == 401:
                if refreshed or not self.has_credentials:
                    why = ("rejected the refreshed credentials too" if refreshed
                           else "needs credentials and none are configured")
                    self._give_up(McpAuthFailed(name, f"401 Unauthorized: the server {why}; "
                                                      "the call was not retried"))
                    return
                refreshed = True
                self.refreshes += 1
                try:
                    token = await self.token(refresh=True)
                except (McpAuthFailed, httpx2.HTTPError) as e:
                    self._give_up(McpAuthFailed(name, f"401, and the refresh failed: {e}"))
                    return
                if token:
                    request.headers[hn.AUTHORIZATION] = f"Bearer {token}"
                continue
            if response.status_code == 429:
                wait = retry_after_s(response.headers.get(hn.RETRY_AFTER),
                                     self.config.backoff_s * 2 ** waited)
                if wait > self.config.max_retry_after_s or \
                        waited >= self.config.rate_limit_retries:
                    self._give_up(McpRateLimited(
                        name, f"429 Too Many Requests (Retry-After {wait:g}s, {waited} "
                              f"already waited out; limit {self.config.max_retry_after_s:g}s "
                              f"x {self.config.rate_limit_retries})"))
                    return
                waited += 1
                self.rate_limited += 1
                await asyncio.sleep(wait)
                continue
            return


class McpConnection:
    """A server's connection, breaker and counters (one per server per process)."""

    def __init__(self, config: McpServerConfig, *, errlog: Any = None) -> None:
        self.config = config
        self.breaker = CircuitBreaker(f"mcp:{config.name}",
                                      failure_threshold=config.breaker_threshold,
                                      reset_timeout_s=config.breaker_reset_s)
        self.gate = (HttpGate(config, config.transport)
                     if isinstance(config.transport, HttpServer) else None)
        self.errlog = errlog or sys.stderr
        self.connects = 0
        """Connections opened (the first one and every reconnect)."""
        self._client: Client | None = None
        self._owner: asyncio.Task[None] | None = None
        self._closing: asyncio.Event | None = None
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.config.name

    def _make_client(self, stack: contextlib.AsyncExitStack) -> Client:
        t = self.config.transport
        timeout = self.config.timeout_s
        if isinstance(t, StdioServer):
            params = StdioServerParameters(command=t.command, args=list(t.args),
                                           env=dict(t.env) or None, cwd=t.cwd)
            return Client(params, read_timeout_seconds=timeout, mode="auto")
        http = httpx2.AsyncClient(headers=dict(t.headers), auth=self.gate,
                                  timeout=httpx2.Timeout(timeout, read=timeout + 5))
        transport = streamable_http_client(t.url, http_client=http, terminate_on_close=False)
        stack.push_async_callback(http.aclose)
        # A Transport instance has no URL for the response cache to key on: give it one.
        return Client(transport, read_timeout_seconds=timeout, mode="auto",
                      cache=CacheConfig(target_id=t.url))

    async def _own(self, ready: asyncio.Future[Client], closing: asyncio.Event) -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                client = self._make_client(stack)
                await stack.enter_async_context(client)
                if not ready.done():
                    ready.set_result(client)
                await closing.wait()
        except BaseException as e:  # reported to whoever waits for the connection
            if not ready.done():
                ready.set_exception(e if isinstance(e, Exception) else
                                    McpUnavailable(self.name, f"connection task ended: {e!r}"))
            if not isinstance(e, Exception):
                raise

    async def client(self) -> Client:
        """The open client, connecting (again) if needed."""
        async with self._lock:
            if self._client is not None and self._owner is not None and not self._owner.done():
                return self._client
            await self._stop_owner()
            loop = asyncio.get_running_loop()
            ready: asyncio.Future[Client] = loop.create_future()
            self._closing = asyncio.Event()
            self._owner = asyncio.create_task(self._own(ready, self._closing),
                                              name=f"mcp-{self.name}")
            self.connects += 1
            try:
                async with asyncio.timeout(self.config.connect_timeout_s):
                    self._client = await asyncio.shield(ready)
            except TimeoutError as e:
                await self._stop_owner()
                raise McpUnavailable(self.name, f"no connection within "
                                                f"{self.config.connect_timeout_s:g}s") from e
            except McpError:
                await self._stop_owner()
                raise
            except Exception as e:
                await self._stop_owner()
                raise McpUnavailable(self.name, f"cannot connect: {type(e).__name__}: "
                                                f"{e}") from e
            return self._client

    async def _stop_owner(self) -> None:
        owner, self._owner, self._client = self._owner, None, None
        if self._closing is not None:
            self._closing.set()
        if owner is not None and not owner.done():
            try:
                async with asyncio.timeout(5):
                    await asyncio.shield(owner)
            except (TimeoutError, Exception):
                owner.cancel()
                with contextlib.suppress(BaseException):
                    await owner
        elif owner is not None:
            with contextlib.suppress(BaseException):
                owner.result()

    async def reset(self) -> None:
        """Drop the connection (a stdio server process ends); the next call reconnects."""
        async with self._lock:
            await self._stop_owner()

    async def aclose(self) -> None:
        await self.reset()

    def _failure(self, since: float, exc: BaseException, timeout: float) -> McpError:
        """The `McpError` an SDK failure stands for."""
        if self.gate is not None and self.gate.failure is not None \
                and self.gate.failure[0] >= since:
            return self.gate.failure[1]
        if isinstance(exc, McpError):
            return exc
        if isinstance(exc, TimeoutError):
            return McpTimeout(self.name, f"no answer within {timeout:g}s")
        if isinstance(exc, MCPError):
            if exc.code == CONNECTION_CLOSED:
                return McpUnavailable(self.name, f"connection lost: {exc.error.message}")
            if exc.code == REQUEST_TIMEOUT:
                return McpTimeout(self.name, f"no answer within {timeout:g}s")
            return McpProtocolError(self.name, exc.error.message, exc.code)
        if isinstance(exc, OSError | httpx2.HTTPError):
            return McpUnavailable(self.name, f"{type(exc).__name__}: {exc}")
        return McpProtocolError(self.name, f"{type(exc).__name__}: {exc}")

    async def _guarded(self, what: str, op: Any, timeout_s: float | None = None) -> Any:
        since = time.monotonic()
        timeout = min(timeout_s or self.config.timeout_s, self.config.timeout_s)
        try:
            client = await self.client()
            async with asyncio.timeout(timeout):
                return await op(client)
        except (Exception, TimeoutError) as e:
            error = self._failure(since, e, timeout)
            if isinstance(error, McpUnavailable | McpTimeout):
                await self.reset()  # a hung or dead server: start over next time
            raise error from e

    async def list_tools(self, *, refresh: bool = False, timeout_s: float | None = None
                         ) -> list[McpToolInfo]:
        """Every tool the server lists (all pages). Served from the SDK's response cache
        while the server's cache hint (``ttlMs``) says the last listing is fresh."""

        async def op(client: Client) -> list[McpToolInfo]:
            tools: list[McpToolInfo] = []
            cursor: str | None = None
            for _ in range(100):
                page = await client.list_tools(cursor=cursor,
                                               cache_mode="refresh" if refresh else "use")
                tools.extend(page.tools)
                cursor = page.next_cursor
                if cursor is None:
                    break
            return tools

        result: list[McpToolInfo] = await self._guarded("tools/list", op, timeout_s)
        return result

    async def call_tool(self, name: str, arguments: dict[str, Any], *,
                        meta: dict[str, Any] | None = None) -> CallToolResult:
        """One attempt of a ``tools/call`` (no breaker, no retry: see `McpTool`)."""

        async def op(client: Client) -> CallToolResult:
            return await client.call_tool(name, arguments,
                                          read_timeout_seconds=self.config.timeout_s,
                                          meta=meta)  # type: ignore[arg-type]

        result: CallToolResult = await self._guarded("tools/call", op)
        return result
