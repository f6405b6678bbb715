"""MemoryStore: jetmesh's episodic and semantic memory over mem0 and Qdrant.

One memory-service process owns a store. Embedded Qdrant (a folder) locks that folder,
so only one process may open it; with ``QDRANT_URL`` the same code talks to a server.

Concurrency: mem0's calls are blocking, so each runs in a worker thread. All writes go
through **one store-wide asyncio lock**, not one lock per user/agent/task namespace:
mem0 issue 4892 reports index corruption under concurrent async writes, and the thing
being corrupted is shared by every namespace (one Qdrant collection, one history
sqlite DB, and in embedded mode one in-process Qdrant whose storage is not
thread-safe). Per-namespace locks would still let two namespaces write at once into
that shared state. The lock also makes the episode idempotency check and its insert
atomic. In embedded mode reads take the same lock (embedded Qdrant does no real
parallel work under the GIL anyway, so nothing is lost); against a Qdrant server,
reads run concurrently with each other and with writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from jetmesh.memory.embedders import EmbedderChoice, choose_embedder
from jetmesh.memory.errors import (
    EmbeddingDimensionMismatch,
    MemoryInferenceDisabled,
    MemoryNotFound,
    MemoryStoreError,
)
from jetmesh.memory.models import (
    EpisodeRecord,
    ForgetReport,
    MemoryItem,
    MemoryKind,
    episode_id_for,
)
from jetmesh.memory.settings import MemorySettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SCAN_PAGE = 1000
"""Page size of the internal scans (idempotency checks, forget)."""


def disable_mem0_telemetry(settings: MemorySettings) -> None:
    """mem0 reads these once, at import; set them before the first import of mem0."""
    os.environ["MEM0_TELEMETRY"] = "False"
    if "MEM0_DIR" not in os.environ:
        settings.mem0_dir.mkdir(parents=True, exist_ok=True)
        os.environ["MEM0_DIR"] = str(settings.mem0_dir)


def _vector_size(info: Any) -> int | None:
    """Size of the dense (unnamed) vector of a Qdrant collection, as mem0 creates it."""
    vectors = info.config.params.vectors
    if vectors is None:
        return None
    if isinstance(vectors, Mapping):
        dense = vectors.get("") or next(iter(vectors.values()), None)
        return int(dense.size) if dense is not None else None
    return int(vectors.size)


def _open_qdrant(settings: MemorySettings, choice: EmbedderChoice) -> Any:
    """Open Qdrant and check an existing collection's vector size before mem0 sees it."""
    from qdrant_client import QdrantClient

    if settings.qdrant_url:
        key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        client = QdrantClient(url=settings.qdrant_url, api_key=key)
    else:
        settings.qdrant_path.mkdir(parents=True, exist_ok=True)
        client = QdrantClient(path=str(settings.qdrant_path))
    try:
        if client.collection_exists(settings.collection):
            size = _vector_size(client.get_collection(settings.collection))
            if size is not None and size != choice.dims:
                raise EmbeddingDimensionMismatch(settings.collection, size, choice.dims)
    except BaseException:
        client.close()
        raise
    return client


def _item_from_mem0(row: Mapping[str, Any]) -> MemoryItem:
    """A mem0 result dict (from get, get_all or search) as a MemoryItem."""
    meta: Mapping[str, Any] = row.get("metadata") or {}
    created = row.get("created_at")
    return MemoryItem(
        id=str(row["id"]),
        text=str(row.get("memory", "")),
        kind=meta.get("kind", "fact"),
        user_id=row.get("user_id"),
        agent_id=row.get("agent_id"),
        task_id=row.get("run_id") or meta.get("task_id"),
        step_id=meta.get("step_id"),
        episode_id=meta.get("episode_id"),
        attempt=meta.get("attempt"),
        cost_usd=meta.get("cost_usd"),
        ledger_seqs=list(meta.get("ledger_seqs") or []),
        derived_from=list(meta.get("derived_from") or []),
        derived_task_ids=sorted(set(meta.get("derived_from_tasks") or [])),
        score=row.get("score"),
        created_at=datetime.fromisoformat(created) if created else None,
    )


def _item_from_point(point: Any) -> MemoryItem:
    """A raw Qdrant point (mem0 payload layout) as a MemoryItem."""
    p: dict[str, Any] = dict(point.payload or {})
    meta = {
        k: v
        for k, v in p.items()
        if k not in {"data", "user_id", "agent_id", "run_id", "created_at", "id"}
    }
    return _item_from_mem0(
        {
            "id": point.id,
            "memory": p.get("data", ""),
            "user_id": p.get("user_id"),
            "agent_id": p.get("agent_id"),
            "run_id": p.get("run_id"),
            "created_at": p.get("created_at"),
            "metadata": meta,
        }
    )


def _scope_filters(
    user_id: str | None, agent_id: str | None, task_id: str | None, kind: MemoryKind | None
) -> dict[str, Any]:
    filters: dict[str, Any] = {}
    if user_id is not None:
        filters["user_id"] = user_id
    if agent_id is not None:
        filters["agent_id"] = agent_id
    if task_id is not None:
        filters["run_id"] = task_id
    if kind is not None:
        filters["kind"] = kind
    return filters


class MemoryStore:
    """Episodes and facts of jetmesh's agents, stored through mem0 in Qdrant.

    Lifecycle: ``store = await MemoryStore.open(settings)``; use it; ``await
    store.close()`` (or ``async with await MemoryStore.open(...) as store``). `open`
    fails with `EmbeddingDimensionMismatch` if the collection was built by an embedder
    of another size. After `close` every call raises `MemoryStoreError`.

    Episodes are stored verbatim (mem0 ``infer=False``, no LLM), idempotent by
    `EpisodeRecord.episode_id`. Facts are extracted by mem0's LLM (``infer=True``) and
    carry their provenance: the episodes they were derived from.
    """

    def __init__(
        self, memory: Any, client: Any, settings: MemorySettings, embedder: EmbedderChoice
    ) -> None:
        """Wrap an open mem0 `Memory`; use `MemoryStore.open` rather than this."""
        self._memory = memory
        self._client = client
        self.settings = settings
        """The settings the store was opened with."""
        self.embedder = embedder
        """The embedder in use."""
        self._write_lock = asyncio.Lock()
        self._read_lock: asyncio.Lock | None = None if settings.qdrant_url else self._write_lock
        self._closed = False
        # Embedded mode: this process holds the folder lock, so an in-memory map of
        # episode_id -> (memory id, task id) is authoritative and saves a filtered
        # scan (a full scan in embedded Qdrant) per add. Server mode asks Qdrant.
        self._episodes: dict[str, tuple[str, str]] | None = (
            None if settings.qdrant_url else self._load_episode_index()
        )
        self.inference_off_reason = settings.inference_off_reason
        """Why `add_facts` is unavailable, or None."""
        if self.inference_off_reason:
            logger.info(
                "memory: fact extraction is off (%s); add_facts will raise",
                self.inference_off_reason,
            )

    @classmethod
    async def open(cls, settings: MemorySettings | None = None) -> MemoryStore:
        """Open (and create if needed) the store described by `settings`."""
        return await asyncio.to_thread(cls.open_sync, settings or MemorySettings())

    @classmethod
    def open_sync(cls, settings: MemorySettings) -> MemoryStore:
        """Blocking `open`, for scripts and benchmarks outside an event loop."""
        disable_mem0_telemetry(settings)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        choice = choose_embedder(settings)
        client = _open_qdrant(settings, choice)
        try:
            from jetmesh.memory._mem0 import build_memory

            memory = build_memory(
                client=client,
                collection=settings.collection,
                choice=choice,
                llm=settings.llm if settings.inference_off_reason is None else None,
                history_db_path=str(settings.history_db_path),
            )
        except BaseException:
            client.close()
            raise
        logger.info(
            "memory: opened collection %r (%s, %s)",
            settings.collection,
            settings.qdrant_url or settings.qdrant_path,
            choice.name,
        )
        return cls(memory, client, settings, choice)

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close mem0's history DB and the Qdrant client (releasing the folder lock)."""
        async with self._write_lock:
            if self._closed:
                return
            self._closed = True
            await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        try:
            self._memory.close()
        finally:
            self._client.close()

    # -- plumbing ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self, lock: asyncio.Lock | None) -> AsyncIterator[None]:
        if lock is None:
            self._check_open()
            yield
            return
        async with lock:
            self._check_open()
            yield

    def _check_open(self) -> None:
        if self._closed:
            raise MemoryStoreError("the memory store is closed")

    async def _write(self, fn: Callable[[], T]) -> T:
        async with self._locked(self._write_lock):
            return await asyncio.to_thread(fn)

    async def _read(self, fn: Callable[[], T]) -> T:
        async with self._locked(self._read_lock):
            return await asyncio.to_thread(fn)

    def _load_episode_index(self) -> dict[str, tuple[str, str]]:
        from qdrant_client import models

        index: dict[str, tuple[str, str]] = {}
        flt = models.Filter(
            must=[models.FieldCondition(key="kind", match=models.MatchValue(value="episode"))]
        )
        offset: Any = None
        while True:
            points, offset = self._client.scroll(
                self.settings.collection,
                scroll_filter=flt,
                limit=_SCAN_PAGE,
                offset=offset,
                with_payload=["episode_id", "task_id"],
            )
            for p in points:
                payload = p.payload or {}
                index[str(payload["episode_id"])] = (str(p.id), str(payload["task_id"]))
            if offset is None:
                return index

    def _find_episode(self, episode_id: str) -> tuple[str, str] | None:
        """(memory id, task id) of a stored episode, or None."""
        if self._episodes is not None:
            return self._episodes.get(episode_id)
        found = self._scan({"kind": "episode", "episode_id": episode_id}, 1)
        if not found:
            return None
        return str(found[0].id), str((found[0].payload or {}).get("task_id"))

    def _scan(self, filters: dict[str, Any], limit: int = _SCAN_PAGE) -> list[Any]:
        """Raw Qdrant points matching payload `filters` (no scope id required)."""
        rows = self._memory.vector_store.list(filters=filters, top_k=limit)
        if isinstance(rows, tuple):  # qdrant scroll: (points, next_offset)
            rows = rows[0]
        return list(rows or [])

    # -- episodes ---------------------------------------------------------------------

    async def add_episode(self, episode: EpisodeRecord) -> MemoryItem:
        """Store an episode verbatim; if its `episode_id` is stored already, return that."""
        return await self._write(lambda: self._add_episode_sync(episode))

    def _add_episode_sync(self, episode: EpisodeRecord) -> MemoryItem:
        existing = self._find_episode(episode.episode_id)
        if existing:
            return self._get_sync(existing[0])
        metadata: dict[str, Any] = {
            "kind": "episode",
            "episode_id": episode.episode_id,
            "task_id": episode.task_id,
            "step_id": episode.step_id,
            "request": episode.request,
            "outcome": episode.outcome,
            "cost_usd": episode.cost_usd,
            "ledger_seqs": list(episode.ledger_seqs),
            "attempt": episode.attempt,
        }
        result = self._memory.add(
            [{"role": "user", "content": episode.render()}],
            user_id=episode.user_id,
            agent_id=episode.agent_id,
            run_id=episode.task_id,
            metadata=metadata,
            infer=False,
        )
        added = result["results"]
        if len(added) != 1:
            raise MemoryStoreError(f"mem0 stored {len(added)} memories for one episode")
        memory_id = str(added[0]["id"])
        if self._episodes is not None:
            self._episodes[episode.episode_id] = (memory_id, episode.task_id)
        return self._get_sync(memory_id)

    # -- facts ------------------------------------------------------------------------

    async def add_facts(
        self,
        messages: str | list[dict[str, str]],
        *,
        derived_from: list[str],
        user_id: str | None = None,
        agent_id: str | None = None,
        task_id: str | None = None,
    ) -> list[MemoryItem]:
        """Extract facts from `messages` with mem0's LLM and store them with provenance.

        `derived_from` names the episode ids the facts come from; each must be stored
        (else `MemoryNotFound`). Raises `MemoryInferenceDisabled` when no LLM is
        configured or JETMESH_MEMORY_INFER is off.
        """
        if self.inference_off_reason:
            raise MemoryInferenceDisabled(self.inference_off_reason)
        if not (user_id or agent_id or task_id):
            raise ValueError("add_facts needs a scope: user_id, agent_id or task_id")
        return await self._write(
            lambda: self._add_facts_sync(
                messages, derived_from, user_id, agent_id, task_id, infer=True
            )
        )

    async def _add_facts_verbatim(
        self,
        texts: list[str],
        *,
        derived_from: list[str],
        user_id: str | None = None,
        agent_id: str | None = None,
        task_id: str | None = None,
    ) -> list[MemoryItem]:
        """Store `texts` as facts without an LLM (``infer=False``): for imports and tests."""
        msgs = [{"role": "user", "content": t} for t in texts]
        return await self._write(
            lambda: self._add_facts_sync(msgs, derived_from, user_id, agent_id, task_id, False)
        )

    def _add_facts_sync(
        self,
        messages: str | list[dict[str, str]],
        derived_from: list[str],
        user_id: str | None,
        agent_id: str | None,
        task_id: str | None,
        infer: bool,
    ) -> list[MemoryItem]:
        sources = list(dict.fromkeys(derived_from))
        tasks: list[str] = []
        for eid in sources:
            found = self._find_episode(eid)
            if found is None:
                raise MemoryNotFound(eid)
            tasks.append(found[1])
        metadata = {"kind": "fact", "derived_from": sources, "derived_from_tasks": tasks}
        result = self._memory.add(
            messages,
            user_id=user_id,
            agent_id=agent_id,
            run_id=task_id,
            metadata=metadata,
            infer=infer,
        )
        return [self._get_sync(str(r["id"])) for r in result["results"] if r.get("id")]

    # -- notes ------------------------------------------------------------------------

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
        """Store a fact an agent stated itself (the ``remember`` tool), verbatim, no LLM.

        Its provenance is the episode of the step (or task) that wrote it: that episode
        is recorded when the step finishes, and `forget_task` removes the note with the
        task. `key` (the tool call's idempotency key) makes a repeated call store nothing.
        """
        if not (user_id or agent_id or task_id):
            raise ValueError("add_note needs a scope: user_id, agent_id or task_id")
        return await self._write(
            lambda: self._add_note_sync(text, user_id, agent_id, task_id, step_id, key)
        )

    def _add_note_sync(
        self,
        text: str,
        user_id: str | None,
        agent_id: str | None,
        task_id: str | None,
        step_id: str | None,
        key: str | None,
    ) -> MemoryItem:
        if key:
            found = self._scan({"kind": "fact", "note_key": key}, 1)
            if found:
                return self._get_sync(str(found[0].id))
        sources = [episode_id_for(task_id, step_id)] if task_id else []
        metadata: dict[str, Any] = {
            "kind": "fact",
            "origin": "remember",
            "derived_from": sources,
            "derived_from_tasks": [task_id] if task_id else [],
        }
        if key:
            metadata["note_key"] = key
        if step_id:
            metadata["step_id"] = step_id
        result = self._memory.add(
            [{"role": "user", "content": text}],
            user_id=user_id,
            agent_id=agent_id,
            run_id=task_id,
            metadata=metadata,
            infer=False,
        )
        added = result["results"]
        if len(added) != 1:
            raise MemoryStoreError(f"mem0 stored {len(added)} memories for one note")
        return self._get_sync(str(added[0]["id"]))

    async def facts_derived_from(self, episode_id: str, limit: int = 100) -> list[MemoryItem]:
        """Facts whose provenance names this episode (to keep extraction idempotent)."""
        return await self._read(
            lambda: [
                _item_from_point(p)
                for p in self._scan({"kind": "fact", "derived_from": episode_id}, limit)
            ]
        )

    async def has_episode(self, episode_id: str) -> bool:
        """True when an episode with this id is stored."""
        return await self._read(lambda: self._find_episode(episode_id) is not None)

    @property
    def episode_count(self) -> int | None:
        """Episodes stored (embedded mode, where the index is in memory), else None."""
        return None if self._episodes is None else len(self._episodes)

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
        """Memories nearest to `query`, best first, within the given scope."""
        filters = _scope_filters(user_id, agent_id, task_id, kind)
        if not any(k in filters for k in ("user_id", "agent_id", "run_id")):
            # mem0 insists on one scope id; "*" is its documented match-anything value.
            filters["run_id"] = "*"
        threshold = self.settings.search_threshold

        def run() -> list[MemoryItem]:
            out = self._memory.search(query, top_k=limit, filters=filters, threshold=threshold)
            return [_item_from_mem0(r) for r in out["results"]]

        return await self._read(run)

    async def get(self, memory_id: str) -> MemoryItem:
        """The memory with this id, or `MemoryNotFound`."""
        return await self._read(lambda: self._get_sync(memory_id))

    def _get_sync(self, memory_id: str) -> MemoryItem:
        try:
            row = self._memory.get(memory_id)
        except ValueError:  # not a UUID
            row = None
        if row is None:
            raise MemoryNotFound(memory_id)
        return _item_from_mem0(row)

    # -- forgetting -------------------------------------------------------------------

    async def forget_task(self, task_id: str) -> ForgetReport:
        """Delete a task's episodes, and the facts derived only from them.

        A fact also derived from another task's episodes is kept, with the forgotten
        episodes removed from its provenance.
        """
        return await self._write(lambda: self._forget_task_sync(task_id))

    def _forget_task_sync(self, task_id: str) -> ForgetReport:
        episodes: list[str] = []
        while page := self._scan({"kind": "episode", "task_id": task_id}):
            for point in page:
                self._memory.delete(str(point.id))
                episodes.append(str(point.id))
                if self._episodes is not None:
                    self._episodes.pop(str((point.payload or {}).get("episode_id")), None)
        deleted: list[str] = []
        updated: list[str] = []
        # Each processed fact leaves the filter (deleted, or task dropped from its
        # provenance), so re-scanning from the start always makes progress.
        while page := self._scan({"kind": "fact", "derived_from_tasks": task_id}):
            for point in page:
                payload = point.payload or {}
                pairs = [
                    (e, t)
                    for e, t in zip(
                        payload.get("derived_from") or [],
                        payload.get("derived_from_tasks") or [],
                        strict=False,
                    )
                    if t != task_id
                ]
                if not pairs:
                    self._memory.delete(str(point.id))
                    deleted.append(str(point.id))
                    continue
                self._memory.update(
                    str(point.id),
                    metadata={
                        "derived_from": [e for e, _ in pairs],
                        "derived_from_tasks": [t for _, t in pairs],
                    },
                )
                updated.append(str(point.id))
        return ForgetReport(
            task_id=task_id,
            episodes_deleted=episodes,
            facts_deleted=deleted,
            facts_updated=updated,
        )

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
        """Memories in the given scope (no ranking), at most `limit`."""
        filters = _scope_filters(user_id, agent_id, task_id, kind)
        return await self._read(lambda: [_item_from_point(p) for p in self._scan(filters, limit)])
