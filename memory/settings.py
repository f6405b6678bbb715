"""Settings of the memory store, read from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from jetmesh.bus.settings import DATA_DIR_ENV, DEFAULT_DATA_DIR


class MemorySettings(BaseSettings):
    """Where memories live and how they are embedded.

    Every field can be given by name in code or by its environment variable. Setting
    ``QDRANT_URL`` (and ``QDRANT_API_KEY``) switches from the embedded Qdrant folder to
    a Qdrant server with no code change.
    """

    model_config = SettingsConfigDict(populate_by_name=True, extra="ignore")

    data_dir: Path = Field(
        default=DEFAULT_DATA_DIR, validation_alias=AliasChoices("data_dir", DATA_DIR_ENV)
    )
    """Root of jetmesh's local state; the Qdrant folder and mem0's history DB live here."""

    qdrant_url: str | None = Field(
        default=None, validation_alias=AliasChoices("qdrant_url", "QDRANT_URL")
    )
    """Qdrant server URL; when unset the store uses embedded Qdrant under `data_dir`."""

    qdrant_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("qdrant_api_key", "QDRANT_API_KEY")
    )
    """API key of the Qdrant server, if it needs one."""

    collection: str = Field(
        default="jetmesh_memory",
        validation_alias=AliasChoices("collection", "JETMESH_MEMORY_COLLECTION"),
    )
    """Qdrant collection holding jetmesh's memories."""

    embedder: Literal["auto", "hash", "openai", "fastembed"] = Field(
        default="auto", validation_alias=AliasChoices("embedder", "JETMESH_MEMORY_EMBEDDER")
    )
    """Embedder: ``auto`` = OpenAI if keyed, else cached fastembed, else offline hashing."""

    hash_dims: int = Field(
        default=256, ge=8, validation_alias=AliasChoices("hash_dims", "JETMESH_MEMORY_HASH_DIMS")
    )
    """Vector size of the offline hashing embedder."""

    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("openai_api_key", "OPENAI_API_KEY")
    )
    """OpenAI key; enables OpenAI embeddings under ``auto``."""

    openai_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("openai_base_url", "OPENAI_BASE_URL")
    )
    """Alternative OpenAI-compatible endpoint for embeddings."""

    openai_embedding_model: str = Field(
        default="text-embedding-3-small",
        validation_alias=AliasChoices("openai_embedding_model", "JETMESH_MEMORY_OPENAI_MODEL"),
    )
    """OpenAI embedding model."""

    fastembed_model: str = Field(
        default="BAAI/bge-small-en-v1.5",
        validation_alias=AliasChoices("fastembed_model", "JETMESH_MEMORY_FASTEMBED_MODEL"),
    )
    """fastembed model, used only if already cached locally."""

    infer: bool = Field(
        default=True, validation_alias=AliasChoices("infer", "JETMESH_MEMORY_INFER")
    )
    """Allow LLM fact extraction (`add_facts`); it also needs `llm`."""

    llm: dict[str, Any] | None = Field(
        default=None, validation_alias=AliasChoices("llm", "JETMESH_MEMORY_LLM")
    )
    """mem0 LLM config, ``{"provider": ..., "config": {...}}``; None disables inference."""

    search_threshold: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        validation_alias=AliasChoices("search_threshold", "JETMESH_MEMORY_SEARCH_THRESHOLD"),
    )
    """Minimum score of a search hit."""

    @property
    def qdrant_path(self) -> Path:
        """Embedded Qdrant folder."""
        return self.data_dir / "qdrant"

    @property
    def history_db_path(self) -> Path:
        """mem0's history sqlite database."""
        return self.data_dir / "mem0_history.db"

    @property
    def mem0_dir(self) -> Path:
        """mem0's own config folder (MEM0_DIR), kept under the data dir, not in ~/.mem0."""
        return self.data_dir / "mem0"

    @property
    def inference_off_reason(self) -> str | None:
        """Why `add_facts` cannot run, or None when it can."""
        if not self.infer:
            return "JETMESH_MEMORY_INFER is off"
        if self.llm is None:
            return "no LLM is configured for memory (settings.llm / JETMESH_MEMORY_LLM)"
        return None
