"""The memory service's wire protocol: one request and one result model per operation.

Requests go as JSON to ``subjects.memory(op)`` (core NATS request/reply). Every reply
is a `Reply` envelope: ``{"ok": true, "result": {...}}`` with the operation's result
model, or ``{"ok": false, "error": {"code": ..., "message": ..., "details": [...]}}``.
The service and `MemoryClient` both take the models from `OPERATIONS`, so no message
class is defined twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from jetmesh.memory.models import (
    EpisodeRecord,
    ForgetReport,
    Identifier,
    MemoryItem,
    MemoryKind,
)

MAX_LIST = 1000
"""Most memories one list request returns."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Scoped(_Request):
    user_id: Identifier | None = None
    """Only memories of this user."""
    agent_id: Identifier | None = None
    """Only memories of this agent."""
    task_id: Identifier | None = None
    """Only memories of this task."""


# --------------------------------------------------------------------------- add


class AddEpisode(_Request):
    """Store an episode (idempotent by its episode id)."""

    kind: Literal["episode"] = "episode"
    episode: EpisodeRecord


class AddNote(_Request):
    """Store a fact stated by an agent or a person, verbatim (no LLM)."""

    kind: Literal["note"] = "note"
    text: str = Field(min_length=1, max_length=20_000)
    """The fact."""
    user_id: Identifier | None = None
    agent_id: Identifier | None = None
    task_id: Identifier | None = None
    step_id: Identifier | None = None
    """The step that stated it; with `task_id`, its provenance."""
    key: str | None = Field(default=None, max_length=256)
    """Idempotency key: a second note with the same key stores nothing."""

    @model_validator(mode="after")
    def _needs_scope(self) -> AddNote:
        if not (self.user_id or self.agent_id or self.task_id):
            raise ValueError("a note needs a scope: user_id, agent_id or task_id")
        return self


AddRequest = Annotated[AddEpisode | AddNote, Field(discriminator="kind")]
"""What `add` takes: an episode or a note."""


class ItemResult(BaseModel):
    """One stored memory."""

    item: MemoryItem


class ItemsResult(BaseModel):
    """Memories, best first for a search."""

    items: list[MemoryItem]


# --------------------------------------------------------------------------- read


class SearchRequest(_Scoped):
    """Memories nearest to `query` within a scope."""

    query: str = Field(min_length=1, max_length=4000)
    kind: MemoryKind | None = None
    """Only episodes, or only facts."""
    limit: int = Field(default=5, ge=1, le=100)


class GetRequest(_Request):
    """One memory by id."""

    memory_id: str = Field(min_length=1, max_length=256)


class ListRequest(_Scoped):
    """Memories within a scope, unranked."""

    kind: MemoryKind | None = None
    limit: int = Field(default=100, ge=1, le=MAX_LIST)


# --------------------------------------------------------------------------- forget


class ForgetRequest(_Request):
    """Remove a task's episodes and the facts derived only from them."""

    task_id: Identifier


class ForgetResult(BaseModel):
    report: ForgetReport


# --------------------------------------------------------------------------- status


class StatusRequest(_Request):
    """Is the service there, and how is it set up."""


class StatusResult(BaseModel):
    collection: str
    """Qdrant collection."""
    backend: str
    """``embedded <path>`` or the Qdrant server URL."""
    embedder: str
    """Embedder name, e.g. ``jetmesh-hash-256``."""
    dims: int
    """Vector size."""
    inference: bool
    """Whether facts are extracted from finished tasks."""
    inference_off_reason: str | None = None
    """Why not, when not."""
    episodes: int | None = None
    """Episodes stored (embedded mode only)."""
    following_ledger: bool = False
    """Whether this instance records episodes from the ledger."""


# --------------------------------------------------------------------------- replies

ErrorCode = Literal["invalid_request", "not_found", "inference_disabled", "store_error",
                    "internal"]


class ErrorInfo(BaseModel):
    """Why a request failed."""

    code: ErrorCode
    message: str
    details: list[dict[str, Any]] = Field(default_factory=list)
    """For ``invalid_request``: one entry per invalid field (loc, msg, type)."""


class Reply(BaseModel):
    """The envelope of every reply."""

    ok: bool
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None


@dataclass(frozen=True)
class Operation:
    """One memory operation: its name (the subject token), request and result models."""

    name: str
    request: TypeAdapter[Any]
    result: type[BaseModel]


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("add", TypeAdapter(AddRequest), ItemResult),
        Operation("search", TypeAdapter(SearchRequest), ItemsResult),
        Operation("get", TypeAdapter(GetRequest), ItemResult),
        Operation("list", TypeAdapter(ListRequest), ItemsResult),
        Operation("forget", TypeAdapter(ForgetRequest), ForgetResult),
        Operation("status", TypeAdapter(StatusRequest), StatusResult),
    )
}
"""Every operation the service answers, by name."""
