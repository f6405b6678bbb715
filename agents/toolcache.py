"""A result cache for read-only tools, keyed on the tool, its version and the arguments.

A tool opts in with a `ToolCacheRule` in its agent's `CostPolicy` (TTL, scope, version);
only tools that are read-only (risk ``read``, no side effects) are ever cached. Scope
``task`` shares results between the steps of one task, ``shared`` across tasks. A hit is
recorded like any tool call, with ``cache_hit`` set (the tool did not run). The cache is
a port: `MemoryToolCache` for one process and tests, `KVToolCache` on NATS KV (bucket
`subjects.BUCKET_TOOL_CACHE`) for every replica; a cache that fails is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from jetmesh.bus import subjects

__all__ = [
    "KVToolCache",
    "MemoryToolCache",
    "ToolCache",
    "ToolCacheRule",
    "cache_key",
]

log = logging.getLogger(__name__)


class ToolCacheRule(BaseModel):
    """How one read-only tool's results are cached."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ttl_s: float = Field(default=300.0, gt=0)
    scope: Literal["task", "shared"] = "task"
    version: str = "1"
    """Bump when the tool's behaviour changes: older entries are no longer found."""


def cache_key(rule: ToolCacheRule, task_id: str, tool: str, arguments: Mapping[str, Any]
              ) -> str:
    """``<scope>.<sha256 of tool, version and canonical arguments>`` (a KV key)."""
    canonical = json.dumps([tool, rule.version, arguments], sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False, default=str)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    scope = "shared" if rule.scope == "shared" else f"task.{task_id}"
    return f"{scope}.{digest}"


class ToolCache(Protocol):
    """Where cached results live. `get` returns a stored, unexpired output or None;
    neither method raises for the cache's own failures (a miss, a lost write)."""

    async def get(self, key: str) -> dict[str, Any] | None: ...

    async def put(self, key: str, output: dict[str, Any], ttl_s: float) -> None: ...


class MemoryToolCache:
    """An in-process `ToolCache`."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[float, dict[str, Any]]] = {}

    async def get(self, key: str) -> dict[str, Any] | None:
        hit = self.entries.get(key)
        if hit is None or hit[0] <= time.time():
            return None
        return hit[1]

    async def put(self, key: str, output: dict[str, Any], ttl_s: float) -> None:
        self.entries[key] = (time.time() + ttl_s, output)


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_at: float
    output: dict[str, Any]


class KVToolCache:
    """A `ToolCache` in the NATS KV bucket `jm-toolcache`, shared by every replica. Each
    entry carries its own expiry (per-tool TTLs in one bucket); the bucket's max age
    (`max_age_s`) drops whatever is left."""

    def __init__(self, js: Any, *, replicas: int = 1, max_age_s: float = 86400.0) -> None:
        self.js, self.replicas, self.max_age_s = js, replicas, max_age_s
        self._kv: Any = None

    async def _bucket(self) -> Any:
        if self._kv is None:
            from jetmesh.bus.presence import ensure_bucket

            self._kv = await ensure_bucket(self.js, subjects.BUCKET_TOOL_CACHE,
                                           replicas=self.replicas, max_age_s=self.max_age_s)
        return self._kv

    async def get(self, key: str) -> dict[str, Any] | None:
        try:
            kv = await self._bucket()
            entry = await kv.get(key)
            stored = _Entry.model_validate_json(entry.value or b"{}")
        except Exception as e:  # not found, unreadable, or the bucket is unreachable
            if type(e).__name__ not in ("KeyNotFoundError", "KeyDeletedError"):
                log.debug("tool cache read %s: %s", key, e)
            return None
        return stored.output if stored.expires_at > time.time() else None

    async def put(self, key: str, output: dict[str, Any], ttl_s: float) -> None:
        try:
            kv = await self._bucket()
            await kv.put(key, _Entry(expires_at=time.time() + ttl_s,
                                     output=output).model_dump_json().encode())
        except Exception as e:
            log.warning("tool cache write %s failed: %s", key, e)
