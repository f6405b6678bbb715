"""MemoryService: the one process that opens the memory store, on the bus.

It does two things:

- **Requests.** It answers ``add``, ``search``, ``get``, ``list``, ``forget`` and
  ``status`` on ``subjects.memory(op)`` (core NATS request/reply, queue group
  ``subjects.MEMORY_QUEUE``, so a second instance against a Qdrant server shares the
  load and against embedded Qdrant is refused by the folder lock). Requests are
  validated at the edge; every failure is a typed error reply (`protocol.ErrorInfo`),
  never a crash and never silence.
- **Episodes.** A durable pull consumer (``subjects.CONSUMER_MEMORY_EPISODES``) on the
  LEDGER stream turns every finished step attempt and finished task into an episode
  (`episodes.build_episode`). It acks only after the episode is stored, and
  `MemoryStore.add_episode` is idempotent by episode id, so a service that was down or
  killed catches up from where it was: no episode missing, none written twice.
  When fact extraction is on, a completed task's episode is also distilled into facts
  (mem0 ``infer=True``) whose provenance is that episode.

`run_memory_service` wires it all for the CLI (`jetmesh memory`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from opentelemetry.trace import SpanKind
from pydantic import BaseModel, ValidationError

from jetmesh.bus import events as ev
from jetmesh.bus import headers as hn
from jetmesh.bus import subjects, tracing
from jetmesh.bus.consumer import PullRunner, Reject
from jetmesh.bus.events import MAX_MESSAGE_BYTES
from jetmesh.bus.ledger import Ledger
from jetmesh.bus.settings import BusSettings
from jetmesh.bus.streams import pull_consumer_config
from jetmesh.bus.tasks import cancel_and_wait
from jetmesh.bus.tenancy import TaskTenants
from jetmesh.memory.episodes import build_episode, is_episode_event
from jetmesh.memory.errors import (
    MemoryInferenceDisabled,
    MemoryNotFound,
    MemoryStoreError,
)
from jetmesh.memory.models import EpisodeRecord, MemoryItem, tenant_scoped
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
    StatusResult,
)
from jetmesh.memory.settings import MemorySettings
from jetmesh.memory.store import MemoryStore

log = logging.getLogger("jetmesh.memory")


def episode_consumer_config(durable: str = subjects.CONSUMER_MEMORY_EPISODES,
                            settings: BusSettings | None = None) -> ConsumerConfig:
    """The durable consumer over the ledger's task and step subjects."""
    config = pull_consumer_config(durable, subjects.ALL_TASK_EVENTS, settings)
    multi: ConsumerConfig = dataclasses.replace(
        config, filter_subject=None, filter_subjects=list(subjects.MEMORY_EPISODE_SUBJECTS))
    return multi


def error_reply(code: Any, message: str, details: list[dict[str, Any]] | None = None
                ) -> Reply:
    return Reply(ok=False, error=ErrorInfo(code=code, message=message, details=details or []))


def _validation_details(e: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(x["loc"]), "msg": x["msg"], "type": x["type"]} for x in e.errors()]


class MemoryService:
    """Serves one open `MemoryStore` on the bus. `start()`, then `stop()`.

    `episodes=False` answers requests only (no ledger consumer). `durable` names the
    ledger consumer (the default is the one every deployment shares).
    """

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        store: MemoryStore,
        *,
        bus_settings: BusSettings | None = None,
        episodes: bool = True,
        durable: str = subjects.CONSUMER_MEMORY_EPISODES,
        concurrency: int = 16,
        max_requests: int = 256,
    ) -> None:
        self.nc, self.js, self.store = nc, js, store
        self.bus_settings = bus_settings or BusSettings()
        self.ledger = Ledger(nc, js, timeout_s=self.bus_settings.request_timeout_s)
        self._tenants = TaskTenants(self.ledger)
        """Task -> tenant, for tenant accounts' requests that name a task."""
        self.episodes = episodes
        self.durable = durable
        self.concurrency = concurrency
        self.episodes_recorded = 0
        """Episodes this instance handed to the store (new or already there)."""
        self.facts_extracted = 0
        """Facts stored by extraction in this instance."""
        self._subs: list[Subscription] = []
        self._runner: PullRunner | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_requests)
        self._handlers: dict[str, Callable[[Any], Awaitable[BaseModel]]] = {
            "add": self._add, "search": self._search, "get": self._get, "list": self._list,
            "forget": self._forget, "status": self._status,
        }
        assert set(self._handlers) == set(OPERATIONS)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Subscribe to the request subjects and start following the ledger."""
        # One wildcard subscription: an unknown operation gets an error reply, not silence.
        self._subs.append(await self.nc.subscribe(
            subjects.MEMORY_ALL, queue=subjects.MEMORY_QUEUE, cb=self._on_request))
        # Tenant accounts' requests (bus.tenancy): NATS put the tenant in the subject.
        self._subs.append(await self.nc.subscribe(
            subjects.ALL_TENANT_MEMORY, queue=subjects.MEMORY_QUEUE, cb=self._on_request))
        if self.episodes:
            self._runner = PullRunner(
                self.js, subjects.STREAM_LEDGER,
                episode_consumer_config(self.durable, self.bus_settings),
                self._on_ledger, concurrency=self.concurrency,
                max_deliver=self.bus_settings.max_deliver,
            )
            await self._runner.start()
        await self.nc.flush()
        log.info("memory service ready: %s; %s", self._describe(),
                 "recording episodes from the ledger" if self.episodes else "episodes off")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking requests and ledger messages; finish what is in flight."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self._runner is not None:
            await self._runner.stop(grace_s)
            self._runner = None
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=grace_s)

    def _describe(self) -> str:
        s = self.store.settings
        where = s.qdrant_url or f"embedded Qdrant in {s.qdrant_path}"
        facts = ("fact extraction on" if self.store.inference_off_reason is None
                 else f"fact extraction off ({self.store.inference_off_reason})")
        return f"{where}, collection {s.collection!r}, embedder {self.store.embedder.name}, {facts}"

    # ------------------------------------------------------------------ requests

    async def _on_request(self, msg: Msg) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._respond(msg))
        self._inflight.add(task)
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _respond(self, msg: Msg) -> None:
        op = msg.subject.rsplit(".", 1)[-1]
        tenant = subjects.tenant_of(msg.subject)
        if tenant is None and msg.subject.startswith(f"{subjects.TENANT_PREFIX}."):
            # A tenant subject whose token is no tenant id (NATS allows unicode, '%', '$'
            # in a token): a tenant's request all the same, never served unscoped.
            if msg.reply:
                with contextlib.suppress(Exception):
                    await msg.respond(error_reply(
                        "invalid_request", f"{ascii(msg.subject)[:80]}: the tenant token is "
                        "not a tenant id").model_dump_json().encode())
            return
        # A live span of the request under the caller's context (see bus.tracing).
        with tracing.live_span(f"memory {op}", parent=(msg.headers or {}).get(hn.TRACEPARENT),
                               kind=SpanKind.SERVER,
                               attributes={"jetmesh.memory.operation": op}):
            reply = await self.handle(op, msg.data, tenant=tenant)
        data = reply.model_dump_json(exclude_none=True).encode()
        if len(data) > MAX_MESSAGE_BYTES:
            data = error_reply("invalid_request", f"the reply would be {len(data)} bytes, "
                               f"over the {MAX_MESSAGE_BYTES} limit; ask for fewer memories"
                               ).model_dump_json().encode()
        if msg.reply:
            try:
                await msg.respond(data)
            except Exception as e:  # the requester's connection may be gone
                log.debug("memory: could not reply on %s: %s", msg.subject, e)

    async def handle(self, op: str, data: bytes, tenant: str | None = None) -> Reply:
        """Decode, run and answer one request. Never raises (except cancellation).

        `tenant`: the request came from that tenant's NATS account (`jm.tenant.<T>.memory.
        <op>`): it is scoped to the tenant (`_scope`), whatever it names."""
        operation = OPERATIONS.get(op)
        if operation is None:
            return error_reply("invalid_request", f"unknown memory operation {op!r}; known: "
                               f"{', '.join(sorted(OPERATIONS))}")
        try:
            request = operation.request.validate_json(data or b"{}")
        except ValidationError as e:
            return error_reply("invalid_request",
                               f"invalid {op} request: {e.error_count()} error(s)",
                               _validation_details(e))
        try:
            if tenant is not None:
                refused = await self._scope(tenant, request)
                if isinstance(refused, Reply):
                    return refused
                request = refused
            result = await self._handlers[op](request)
            if tenant is not None and isinstance(result, ItemResult) \
                    and not await self._owned(tenant, result.item):
                raise MemoryNotFound(f"no memory {result.item.id!r} of tenant {tenant!r}")
        except MemoryNotFound as e:
            return error_reply("not_found", str(e))
        except MemoryInferenceDisabled as e:
            return error_reply("inference_disabled", e.reason)
        except (MemoryStoreError, ValueError) as e:
            return error_reply("store_error", str(e))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("memory: %s failed", op)
            return error_reply("internal", f"{type(e).__name__}: {e}")
        return Reply(ok=True, result=result.model_dump(mode="json"))

    async def _scope(self, tenant: str, request: Any) -> Any:
        """A tenant account's request within its tenant, or the refusal to send: user and
        agent ids become `<tenant>/<id>` (as the tenant's tasks store them), a task id
        must be one of the tenant's tasks (another's is not found), episodes are the
        mesh's to add, and a search or list must name a scope (an unscoped one would
        reach every tenant's memories)."""
        if isinstance(request, AddEpisode):
            return error_reply("invalid_request", "episodes are recorded by the mesh, not "
                                                  "added by a tenant")
        update: dict[str, Any] = {}
        for name in ("user_id", "agent_id"):
            value = getattr(request, name, None)
            if value is not None:
                update[name] = tenant_scoped(value, tenant)
        task_id = getattr(request, "task_id", None)
        if task_id is not None and not await self._tenants.owns(tenant, task_id):
            return error_reply("not_found", f"no task {task_id!r} of tenant {tenant!r}")
        if isinstance(request, SearchRequest | ListRequest) and not (
                update or task_id is not None):
            return error_reply("invalid_request", "a tenant's search or list must name "
                                                  "user_id, agent_id or task_id")
        return request.model_copy(update=update) if update else request

    async def _owned(self, tenant: str, item: MemoryItem) -> bool:
        """Whether a stored memory is the tenant's (its scope ids or its task)."""
        prefix = f"{tenant}/"
        if any(v is not None and v.startswith(prefix) for v in (item.user_id, item.agent_id)):
            return True
        return item.task_id is not None and await self._tenants.owns(tenant, item.task_id)

    async def _add(self, request: AddEpisode | AddNote) -> ItemResult:
        if isinstance(request, AddEpisode):
            return ItemResult(item=await self.store.add_episode(request.episode))
        return ItemResult(item=await self.store.add_note(
            request.text, user_id=request.user_id, agent_id=request.agent_id,
            task_id=request.task_id, step_id=request.step_id, key=request.key))

    async def _search(self, r: SearchRequest) -> ItemsResult:
        return ItemsResult(items=await self.store.search(
            r.query, user_id=r.user_id, agent_id=r.agent_id, task_id=r.task_id, kind=r.kind,
            limit=r.limit))

    async def _get(self, r: GetRequest) -> ItemResult:
        return ItemResult(item=await self.store.get(r.memory_id))

    async def _list(self, r: ListRequest) -> ItemsResult:
        return ItemsResult(items=await self.store.list(
            user_id=r.user_id, agent_id=r.agent_id, task_id=r.task_id, kind=r.kind,
            limit=r.limit))

    async def _forget(self, r: ForgetRequest) -> ForgetResult:
        report = await self.store.forget_task(r.task_id)
        log.info("memory: forgot task %s (%d episodes, %d facts deleted, %d facts trimmed)",
                 r.task_id, len(report.episodes_deleted), len(report.facts_deleted),
                 len(report.facts_updated))
        return ForgetResult(report=report)

    async def _status(self, _: Any) -> StatusResult:
        s = self.store.settings
        return StatusResult(
            collection=s.collection,
            backend=s.qdrant_url or f"embedded {s.qdrant_path}",
            embedder=self.store.embedder.name,
            dims=self.store.embedder.dims,
            inference=self.store.inference_off_reason is None,
            inference_off_reason=self.store.inference_off_reason,
            episodes=self.store.episode_count,
            following_ledger=self._runner is not None,
        )

    # ------------------------------------------------------------------ episodes

    async def _on_ledger(self, msg: Msg) -> None:
        try:
            event = ev.decode_event(msg.data)
        except ValidationError as e:
            raise Reject(f"undecodable ledger event on {msg.subject}",
                         _validation_details(e)) from e
        if not is_episode_event(event):
            return
        seq = int(msg.metadata.sequence.stream)
        entries = await self.ledger.read(event.subject)
        episode = build_episode(entries, seq)
        if episode is None:
            # The consumer delivered it, so the stream holds it: a read that misses it
            # is a transient lag; retry.
            raise RuntimeError(f"ledger read of task {event.subject} did not reach seq {seq}")
        keepalive = asyncio.create_task(self._keep_alive(msg))
        try:
            await self.store.add_episode(episode)
            self.episodes_recorded += 1
            if isinstance(event, ev.TaskCompleted) and self.store.inference_off_reason is None:
                await self._extract(episode, int(msg.metadata.num_delivered))
        finally:
            await cancel_and_wait(keepalive)

    async def _extract(self, episode: EpisodeRecord, delivery: int) -> None:
        """Facts from a completed task's episode, once (skipped if already extracted)."""
        if await self.store.facts_derived_from(episode.episode_id, limit=1):
            return
        messages = [{"role": "user", "content": episode.request},
                    {"role": "assistant", "content": episode.outcome}]
        try:
            facts = await self.store.add_facts(
                messages, derived_from=[episode.episode_id], user_id=episode.user_id,
                agent_id=episode.agent_id, task_id=episode.task_id)
        except Exception as e:
            if delivery < self.bus_settings.max_deliver:
                raise  # nak: retried with backoff; the episode is already stored
            log.error("memory: no facts extracted from %s after %d tries: %s",
                      episode.episode_id, delivery, e)
            return
        self.facts_extracted += len(facts)

    async def _keep_alive(self, msg: Msg) -> None:
        interval = max(0.5, self.bus_settings.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await msg.in_progress()


# --------------------------------------------------------------------------- wiring


async def open_store(settings: MemorySettings, *, fact_model: Any = None,
                     use_default_model: bool = True) -> tuple[MemoryStore, Any]:
    """Open the store, with fact extraction through jetmesh's model layer when possible.

    Precedence: an explicit `settings.llm` (a mem0 LLM config) is used as is; else
    `fact_model`, else (with `use_default_model`) the configured model provider; on the
    dry-run sim extraction is off, and this says so in the log. Returns the store and
    the model it owns (to close), or None.
    """
    from jetmesh.memory.store import disable_mem0_telemetry

    disable_mem0_telemetry(settings)  # before anything imports mem0
    owned = None
    reason: str | None = None
    if settings.llm is None and settings.infer:
        from jetmesh.memory.llm import fact_model as default_fact_model
        from jetmesh.memory.llm import jetmesh_llm_settings

        model = fact_model
        if model is None and use_default_model:
            owned, reason = default_fact_model()
            model = owned
        elif model is None:
            reason = "no model given"
        if model is not None:
            loop = asyncio.get_running_loop()
            settings = settings.model_copy(update={"llm": jetmesh_llm_settings(model, loop)})
            log.info("memory: facts are extracted by %s/%s", model.provider, model.name)
    store = await MemoryStore.open(settings)
    if store.inference_off_reason is not None:
        if reason:
            store.inference_off_reason = reason
        log.warning("memory: fact extraction is OFF (%s); episodes are still recorded",
                    store.inference_off_reason)
    return store, owned


async def run_memory_service(
    url: str,
    settings: MemorySettings | None = None,
    *,
    stop: asyncio.Event,
    bus_settings: BusSettings | None = None,
    fact_model: Any = None,
    ready: Callable[[MemoryService], None] | None = None,
) -> None:
    """Open the store, connect, serve until `stop` is set, then close everything.

    Raises `EmbeddingDimensionMismatch` (before connecting) when the collection holds
    vectors of another size than the configured embedder makes.
    """
    from jetmesh.bus.connection import connect, jetstream
    from jetmesh.bus.streams import declare_streams

    settings = settings or MemorySettings()
    bus = bus_settings or BusSettings()
    store, owned = await open_store(settings, fact_model=fact_model)
    try:
        nc = await connect(url, settings=bus, name="jetmesh-memory")
        try:
            js = jetstream(nc, bus)
            await declare_streams(js, bus)
            service = MemoryService(nc, js, store, bus_settings=bus)
            await service.start()
            if ready is not None:
                ready(service)
            try:
                await stop.wait()
            finally:
                await service.stop()
        finally:
            await nc.close()
    finally:
        await store.close()
        if owned is not None:
            await owned.aclose()
