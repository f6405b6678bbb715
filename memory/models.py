"""Data of the memory store: episodes in, memory items and forget reports out."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Identifier = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^\S+$")]
"""A user, agent, task or step id: non-empty, no whitespace (mem0 rejects whitespace)."""

MemoryKind = Literal["episode", "fact"]
"""An episode is a record of one task or step; a fact is distilled from episodes."""


def episode_id_for(task_id: str, step_id: str | None, attempt: int = 1) -> str:
    """The idempotency key of an episode: one per step attempt, or one for the whole task.

    The first attempt of a step is ``<task>:<step>``; a retry is ``<task>:<step>#<n>``.
    """
    key = f"{task_id}:{step_id or 'task'}"
    return key if attempt <= 1 else f"{key}#{attempt}"


_WHITESPACE = re.compile(r"\s+")


def as_identifier(value: str | None) -> str | None:
    """`value` made acceptable as an `Identifier` (whitespace -> ``_``, at most 256
    characters), or None when nothing is left."""
    if value is None:
        return None
    cleaned = _WHITESPACE.sub("_", value.strip())[:256]
    return cleaned or None


def tenant_scoped(value: str | None, tenant: str | None) -> str | None:
    """A user or agent identifier within its tenant (`<tenant>/<id>`), so that memories
    of one tenant's users and agents are never another tenant's (the readers enforce
    tenancy here: every memory request carries ids, none carries a tenant check). No
    tenant: the id as it is (the default tenant)."""
    ident = as_identifier(value)
    if ident is None or tenant is None:
        return ident
    return as_identifier(f"{tenant}/{ident}")


class EpisodeRecord(BaseModel):
    """What happened in one task (or one step of it), with where it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_id: Identifier
    """Task the episode belongs to (mem0's ``run_id``)."""
    request: str = Field(min_length=1)
    """What was asked."""
    outcome: str
    """What came out: the answer, or what went wrong."""
    user_id: Identifier | None = None
    """For whom."""
    agent_id: Identifier | None = None
    """Which agent did the work."""
    step_id: Identifier | None = None
    """Step of the plan; None for an episode of the whole task."""
    cost_usd: float = Field(default=0.0, ge=0.0)
    """Model spend of the task or step."""
    ledger_seqs: list[int] = Field(default_factory=list)
    """Ledger stream sequence numbers the episode was built from."""
    attempt: int = Field(default=1, ge=1)
    """Attempt of the step (a retried step has one episode per attempt)."""

    @property
    def episode_id(self) -> str:
        """Idempotency key: adding an episode with the same key again stores nothing."""
        return episode_id_for(self.task_id, self.step_id, self.attempt)

    def render(self) -> str:
        """The text that is embedded and searched."""
        return f"Asked: {self.request}\nOutcome: {self.outcome}"


class MemoryItem(BaseModel):
    """One stored memory, as the store returns it."""

    model_config = ConfigDict(frozen=True)

    id: str
    """mem0 memory id (a UUID)."""
    text: str
    """The memory text."""
    kind: MemoryKind
    """Episode or fact."""
    user_id: str | None = None
    """Scope: user."""
    agent_id: str | None = None
    """Scope: agent."""
    task_id: str | None = None
    """Scope: task (for episodes always set)."""
    step_id: str | None = None
    """Step of the task (episodes only)."""
    episode_id: str | None = None
    """Idempotency key (episodes only)."""
    attempt: int | None = None
    """Attempt of the step (step episodes only)."""
    cost_usd: float | None = None
    """Spend of the task or step (episodes only)."""
    ledger_seqs: list[int] = Field(default_factory=list)
    """Provenance of an episode: ledger sequence numbers."""
    derived_from: list[str] = Field(default_factory=list)
    """Provenance of a fact: the episode ids it was distilled from."""
    derived_task_ids: list[str] = Field(default_factory=list)
    """Provenance of a fact: the tasks of those episodes (sorted, unique)."""
    score: float | None = None
    """Search score; None outside search."""
    created_at: datetime | None = None
    """When the memory was stored."""


class ForgetReport(BaseModel):
    """What `forget_task` removed and what it kept."""

    model_config = ConfigDict(frozen=True)

    task_id: str
    """The forgotten task."""
    episodes_deleted: list[str] = Field(default_factory=list)
    """Memory ids of the task's episodes, now deleted."""
    facts_deleted: list[str] = Field(default_factory=list)
    """Memory ids of facts derived only from the task, now deleted."""
    facts_updated: list[str] = Field(default_factory=list)
    """Memory ids of facts also derived from other tasks: kept, provenance trimmed."""
