"""jetmesh's settings: the shared defaults, the settings groups, and the bus's own group.

Every setting is read from the environment by one pydantic-settings class per group; a
group's variables share its prefix. The groups (class: prefix, module)::

    BusSettings           JETMESH_BUS_          jetmesh.bus.settings (below); NATS_* too
    OrchestratorSettings  JETMESH_ORCHESTRATOR_ jetmesh.orchestrator.service
    WorkerSettings        JETMESH_WORKER_       jetmesh.agents.worker
    ModelSettings         JETMESH_MODEL*, ...   jetmesh.agents.models.factory
    BreakerSettings       JETMESH_BREAKER_*     jetmesh.agents.breakers
    SigningSettings       JETMESH_CARD_         jetmesh.agents.signing
    GatewaySettings       JETMESH_GATEWAY_      jetmesh.a2a.gateway
    DashboardSettings     JETMESH_UI_           jetmesh.a2a.ui.api
    MemorySettings        JETMESH_MEMORY_*      jetmesh.memory.settings (QDRANT_* too)
    MemoryToolSettings    JETMESH_MEMORY_       jetmesh.memory.tools

The bus, orchestrator and worker groups are `GroupSettings`: each of their variables
also has its older flat name, ``JETMESH_<FIELD>`` (``JETMESH_REPLICAS`` =
``JETMESH_BUS_REPLICAS``), which keeps working; the group's name wins when both are
set. ``JETMESH_DATA_DIR`` is shared by every group that keeps local state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import AliasChoices, Field
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "JETMESH_"
"""Every jetmesh environment variable starts with this (NATS_*, QDRANT_*, OPENAI_* and
the model vendors' keys are the exceptions, named as their tools name them)."""
DATA_DIR_ENV = "JETMESH_DATA_DIR"
DEFAULT_DATA_DIR = Path(".jetmesh")
"""Where jetmesh keeps its local state, relative to the working directory: the embedded
NATS server's data (``nats/``), credentials, card keys (``keys/``), the dashboard's
tokens, embedded Qdrant (``qdrant/``) and the built-in tools' records."""
NATS_PORT = 4222
"""The NATS client port `jetmesh up` and `jetmesh nats` prefer (a free one if taken)."""
LOCAL_NATS_URL = f"nats://localhost:{NATS_PORT}"
"""The server documents name when given none (the AsyncAPI contract, cards)."""
GATEWAY_PORT_ENV = "JETMESH_GATEWAY_PORT"
GATEWAY_PORT = 8080
"""The A2A HTTP gateway's (and dashboard's) default port."""


def data_dir() -> Path:
    """``$JETMESH_DATA_DIR``, else `DEFAULT_DATA_DIR`; read at each call (tests move it)."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


class GroupSettings(BaseSettings):
    """A settings group whose variables are ``<env_prefix><FIELD>`` (the group's own
    names) and, for each, the older flat ``JETMESH_<FIELD>``, read after it."""

    legacy_env_prefix: ClassVar[str] = ENV_PREFIX

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        legacy = EnvSettingsSource(settings_cls, env_prefix=cls.legacy_env_prefix)
        return init_settings, env_settings, legacy, dotenv_settings, file_secret_settings


class BusSettings(GroupSettings):
    """Where the bus is and how long to wait for it."""

    model_config = SettingsConfigDict(env_prefix="JETMESH_BUS_", extra="ignore",
                                      populate_by_name=True)

    nats_url: str | None = Field(
        default=None, validation_alias=AliasChoices("NATS_URL", "JETMESH_NATS_URL")
    )
    """NATS server URL(s), comma separated. When unset the CLI starts an embedded server."""
    nats_creds: Path | None = Field(
        default=None, validation_alias=AliasChoices("NATS_CREDS", "JETMESH_NATS_CREDS")
    )
    """A NATS credentials file (JWT + nkey)."""
    nats_user: str | None = Field(default=None, validation_alias=AliasChoices("NATS_USER"))
    nats_password: str | None = Field(
        default=None, validation_alias=AliasChoices("NATS_PASSWORD")
    )
    nats_inbox_prefix: str | None = Field(
        default=None, validation_alias=AliasChoices("NATS_INBOX_PREFIX",
                                                    "JETMESH_NATS_INBOX_PREFIX"))
    """Reply-inbox prefix; with `jetmesh nats-config` each role has its own, so no role
    can read another's replies (e.g. its pulled work)."""
    data_dir: Path = Field(default=DEFAULT_DATA_DIR,
                           validation_alias=AliasChoices(DATA_DIR_ENV, "data_dir"))
    """Where the embedded server keeps its JetStream data (`<data_dir>/nats`)."""
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 5.0
    replicas: int = Field(default=1, ge=1, le=5)
    """Replica count of streams and buckets (3 on a NATS cluster)."""
    ack_wait_s: float = 30.0
    """How long a consumer waits for an ack before redelivering."""
    max_deliver: int = 5
    """Deliveries before a message is dead-lettered."""
    duplicate_window_s: float = 120.0
    """How long JetStream remembers `Nats-Msg-Id`s to drop retried appends."""
    durability: Literal["strict", "balanced"] = "balanced"
    """`JETMESH_DURABILITY`. `balanced` (the default): every record whose loss could
    duplicate an effect or lose an outcome (claims, effect and policy records, side
    effects, results, controls, the task's own events, work commands) is fsync'd before
    its ack; the steps' logs (model calls, read-only tool calls) are acknowledged before
    they are flushed (stream JM_LOG, `persist_mode: async`): a power loss may cost a
    repeated model call, never a duplicate effect or a lost result. `strict`: the logs
    are fsync'd before their ack too. Both need nats-server's `sync_interval: always`
    (the embedded server's default)."""
