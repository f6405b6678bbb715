"""Bus settings, read from the environment (JETMESH_* and NATS_*)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class BusSettings(BaseSettings):
    """Where the bus is and how long to wait for it."""

    model_config = SettingsConfigDict(env_prefix="JETMESH_", extra="ignore")

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
    data_dir: Path = Path(".jetmesh")
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
