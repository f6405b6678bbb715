"""MemoryClient: the memory store over NATS request/reply, for agents, CLIs and tests.

Each call sends one request to ``subjects.memory(op)`` and decodes the `Reply`. A
missing or slow service raises `MemoryServiceUnavailable`; an error reply raises the
store error it names (`MemoryNotFound`, `MemoryInferenceDisabled`) or
`MemoryRequestFailed` with the service's code and reason.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel, ValidationError

from jetmesh.bus import subjects, tracing
from jetmesh.memory.errors import (
    MemoryInferenceDisabled,
    MemoryNotFound,
    MemoryRequestFailed,
    MemoryServiceUnavailable,
)
from jetmesh.memory.models import EpisodeRecord, ForgetReport, MemoryItem, MemoryKind
from jetmesh.memory.protocol import (
    OPERATIONS,
    AddEpisode,
    AddNote,
    ErrorInfo,
    ForgetRequest,
    ForgetResult,
    GetRequest,
    ItemResult,
    ItemsResult,
    ListRequest,
    Reply,
    SearchRequest,
    StatusRequest,
    StatusResult,
)

R = TypeVar("R", bound=BaseModel)


def _raise_for(error: ErrorInfo, request: BaseModel) -> None:
    if error.code == "not_found":
        raise MemoryNotFound(getattr(request, "memory_id", error.message))
    if error.code == "inference_disabled":
        raise MemoryInferenceDisabled(error.message)
    raise MemoryRequestFailed(error.code, error.message, error.details)


class MemoryClient:
    """Talks to the memory service on `nc`. Cheap; share one per connection."""

    def __init__(self, nc: NATS, *, timeout_s: float = 5.0) -> None:
        self.nc = nc
        self.timeout_s = timeout_s
        """Longest wait for one reply."""

    async def _send(self, op: str, data: bytes, timeout_s: float | None) -> Reply:
        subject = subjects.memory(op)
        wait = self.timeout_s if timeout_s is None else timeout_s
        try:
            # The caller's trace context (a worker's step) travels with the request.
            headers = dict(tracing.inject({}))
            msg = await self.nc.request(subject, data, timeout=wait, headers=headers or None)
        except NoRespondersError:
            raise MemoryServiceUnavailable(subject, "no responders") from None
        except (NatsTimeoutError, TimeoutError):
            raise MemoryServiceUnavailable(subject, f"timed out after {wait:g}s") from None
        try:
            return Reply.model_validate_json(msg.data)
        except ValidationError as e:
            raise MemoryRequestFailed("internal", f"undecodable reply on {subject}: {e}") from e

    async def _call(self, op: str, request: BaseModel, result_type: type[R],
                    timeout_s: float | None = None) -> R:
        assert OPERATIONS[op].result is result_type
        reply = await self._send(op, request.model_dump_json().encode(), timeout_s)
        if reply.error is not None or not reply.ok:
            _raise_for(reply.error or ErrorInfo(code="internal", message="no error given"),
                       request)
        try:
            result: R = result_type.model_validate(reply.result or {})
        except ValidationError as e:
            raise MemoryRequestFailed("internal", f"unexpected {op} result: {e}") from e
        return result

    # -- writing ----------------------------------------------------------------------

    async def add_episode(self, episode: EpisodeRecord) -> MemoryItem:
        """Store an episode (idempotent by its episode id)."""
        return (await self._call("add", AddEpisode(episode=episode), ItemResult)).item

    async def add_note(
        self,
        text: str,
        *,
        user_id: str | None = None,
        agent_id: str | None = None,
        task_id: str | None = None,
        step_id: str | None = None,
        key: str | None = None,
    ) -> MemoryItem:
        """Store a fact verbatim in the given scope (idempotent by `key`)."""
        request = AddNote(text=text, user_id=user_id, agent_id=agent_id, task_id=task_id,
                          step_id=step_id, key=key)
        return (await self._call("add", request, ItemResult)).item

    async def forget(self, task_id: str) -> ForgetReport:
        """Remove the task's episodes and the facts derived only from them."""
        return (await self._call("forget", ForgetRequest(task_id=task_id), ForgetResult)).report

    # -- reading ----------------------------------------------------------------------

    async def search(
        self,
        query: str,
        *,
        user_id: str | None = None,
        agent_id: str | None = None,
        task_id: str | None = None,
        kind: MemoryKind | None = None,
        limit: int = 5,
    ) -> list[MemoryItem]:
        """Memories nearest to `query` within the scope, best first."""
        request = SearchRequest(query=query, user_id=user_id, agent_id=agent_id,
                                task_id=task_id, kind=kind, limit=limit)
        items: list[MemoryItem] = (await self._call("search", request, ItemsResult)).items
        return items

    async def get(self, memory_id: str) -> MemoryItem:
        """One memory by id (`MemoryNotFound` when there is none)."""
        return (await self._call("get", GetRequest(memory_id=memory_id), ItemResult)).item

    async def status(self, timeout_s: float | None = None) -> StatusResult:
        """The service's setup; raises `MemoryServiceUnavailable` when none answers."""
        return await self._call("status", StatusRequest(), StatusResult, timeout_s)

    async def available(self, timeout_s: float = 1.0) -> bool:
        """True when a memory service answers within `timeout_s`."""
        try:
            await self.status(timeout_s)
        except MemoryServiceUnavailable:
            return False
        return True

    async def raw(self, op: str, payload: bytes | dict[str, Any]) -> Reply:
        """Send any payload to an operation and return the reply envelope as data (to
        see error replies, e.g. for a malformed request)."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return await self._send(op, data, None)

    # `list` last: inside the class body its name shadows the builtin for later code.
    async def list(
        self,
        *,
        user_id: str | None = None,
        agent_id: str | None = None,
        task_id: str | None = None,
        kind: MemoryKind | None = None,
        limit: int = 100,
    ) -> list[MemoryItem]:
        """Memories within the scope, unranked, at most `limit` (<= 1000)."""
        request = ListRequest(user_id=user_id, agent_id=agent_id, task_id=task_id, kind=kind,
                              limit=limit)
        items: list[MemoryItem] = (await self._call("list", request, ItemsResult)).items
        return items
